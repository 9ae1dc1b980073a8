"""vhdx output: a dynamic VHDX laid out as ``qemu-img create -f vhdx`` lays it out, with
every payload block present and in order::

    0       file identifier ("vhdxfile" + creator)
    64 KiB  header 1, 128 KiB header 2 (CRC-32C, log GUID zero: nothing to replay)
    192 KiB region table 1, 256 KiB region table 2 (BAT and metadata regions)
    1 MiB   log (1 MiB, empty)
    2 MiB   BAT (a whole number of MiB)
    ...     metadata region (1 MiB): file parameters, virtual disk size, page 83 data,
            logical and physical sector sizes
    ...     4 MiB of zeros: qemu-img create leaves the file this much longer, and
            qemu places the first block at the end of the file
    ...     payload blocks, contiguous; the last one zero-padded to the block size

Every payload BAT entry is PAYLOAD_BLOCK_FULLY_PRESENT; the sector bitmap entries that
follow every ``chunk ratio`` payload entries are NOT_PRESENT (no parent, no bitmaps).

The sparse plan (``--sparse``) keeps that layout and packs only the payload blocks that
hold a non-zero byte from the same place on, in guest order; the others stay
PAYLOAD_BLOCK_NOT_PRESENT, which a disk without a parent reads as zeros, as in a new
image of ``qemu-img create``.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from functools import lru_cache

from aiodd._typing_names import NamedTuple
from aiodd._version import __version__
from aiodd.errors import UsageError
from aiodd.formats.base import Extent
from aiodd.formats.common import SECTOR, KiB, MiB, div_round_up, round_up
from aiodd.formats.plans import (
    Identity,
    PackedPlan,
    Packer,
    pad,
    table_entries,
    without_zeros,
    zeros,
)
from aiodd.formats.vhdx import layout as L
from aiodd.formats.vhdx.layout import BAT_GUID as BAT_GUID
from aiodd.formats.vhdx.layout import FILE_PARAMETERS_GUID as FILE_PARAMETERS_GUID
from aiodd.formats.vhdx.layout import HEADER_1 as HEADER_1
from aiodd.formats.vhdx.layout import HEADER_2 as HEADER_2
from aiodd.formats.vhdx.layout import LOGICAL_SECTOR_GUID as LOGICAL_SECTOR_GUID
from aiodd.formats.vhdx.layout import METADATA_GUID as METADATA_GUID
from aiodd.formats.vhdx.layout import PAGE83_GUID as PAGE83_GUID
from aiodd.formats.vhdx.layout import PHYSICAL_SECTOR_GUID as PHYSICAL_SECTOR_GUID
from aiodd.formats.vhdx.layout import REGION_TABLE_1 as REGION_TABLE_1
from aiodd.formats.vhdx.layout import REGION_TABLE_2 as REGION_TABLE_2
from aiodd.formats.vhdx.layout import VIRTUAL_DISK_SIZE_GUID as VIRTUAL_DISK_SIZE_GUID

NAME = L.NAME

GiB = 1 << 30
TiB = 1 << 40
LOG_OFFSET = 1 * MiB
LOG_LENGTH = 1 * MiB
BAT_OFFSET = 2 * MiB
METADATA_LENGTH = 1 * MiB
# A new qemu vhdx file ends 4 MiB past its metadata region, whatever the BAT size
# (seen with qemu-img create 7.2 from 3000 bytes to 60 TiB); blocks are then appended.
CREATE_SLACK = 4 * MiB
METADATA_ITEMS_OFFSET = 64 * KiB  # within the metadata region
LOGICAL_SECTOR = SECTOR
PHYSICAL_SECTOR = SECTOR  # what qemu 7.2 writes
# qemu 7.2 computes the BAT of a zero-size disk with an unsigned wrap-around
# ((0 - 1) >> chunk_ratio_bits) and refuses to open one whose BAT region is smaller.
EMPTY_BAT_ENTRIES = 0xFFFFFFFF >> 9

_VIRTUAL = L.ITEM_VIRTUAL_DISK | L.ITEM_REQUIRED
# (guid, offset among the items, length, flags) of the metadata items qemu writes.
_ITEMS = (
    (FILE_PARAMETERS_GUID, 0, 8, L.ITEM_REQUIRED),
    (VIRTUAL_DISK_SIZE_GUID, 8, 8, _VIRTUAL),
    (PAGE83_GUID, 16, 16, _VIRTUAL),
    (LOGICAL_SECTOR_GUID, 32, 4, _VIRTUAL),
    (PHYSICAL_SECTOR_GUID, 36, 4, _VIRTUAL),
)
_BAT_PIECE = 128 * KiB  # BAT entries per metadata piece (1 MiB)


def block_size_for(size: int) -> int:
    """The payload block size ``qemu-img create -f vhdx`` picks for ``size`` bytes."""
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


class Layout(NamedTuple):
    virtual_size: int
    block_size: int

    @property
    def chunk_ratio(self) -> int:
        return L.chunk_ratio(self.block_size, LOGICAL_SECTOR)

    @property
    def payload_blocks(self) -> int:
        return div_round_up(self.virtual_size, self.block_size)

    @property
    def bat_entries(self) -> int:
        n = self.payload_blocks
        return n + (n - 1) // self.chunk_ratio if n else 0

    @property
    def bat_length(self) -> int:
        entries = self.bat_entries if self.payload_blocks else EMPTY_BAT_ENTRIES
        return max(MiB, round_up(entries * 8, MiB))

    @property
    def metadata_offset(self) -> int:
        return BAT_OFFSET + self.bat_length

    @property
    def payload_offset(self) -> int:
        return self.metadata_offset + METADATA_LENGTH + CREATE_SLACK

    @property
    def file_size(self) -> int:
        return self.payload_offset + self.payload_blocks * self.block_size


class VhdxPlan(NamedTuple):
    layout: Layout
    identity: Identity

    @property
    def virtual_size(self) -> int:
        return self.layout.virtual_size

    @property
    def data_size(self) -> int:
        return self.layout.virtual_size

    @property
    def file_size(self) -> int:
        return self.layout.file_size

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(f"range {offset}+{length} outside the virtual disk")
        return [Extent(self.layout.payload_offset + offset, length)] if length else []

    def file_identifier(self) -> bytes:
        creator = f"aiodd v{__version__}".encode("utf-16-le")
        return pad(L.SIGNATURE + creator, HEADER_1)

    def header(self, sequence: int) -> bytes:
        return L.build_header(
            sequence,
            self.identity.guid("vhdx file write"),
            self.identity.guid("vhdx data write"),
            LOG_LENGTH,
            LOG_OFFSET,
        )

    def region_table(self) -> bytes:
        lay = self.layout
        return L.build_region_table(
            L.Regions(
                bat=L.Region(BAT_OFFSET, lay.bat_length),
                metadata=L.Region(lay.metadata_offset, METADATA_LENGTH),
            )
        )

    def metadata_region(self) -> bytes:
        lay = self.layout
        table = L.build_metadata_table(
            [(guid, METADATA_ITEMS_OFFSET + at, n, flags) for guid, at, n, flags in _ITEMS]
        )
        items = struct.pack(
            "<IIQ16sII",
            lay.block_size,
            0,  # flags: LeaveBlocksAllocated 0, HasParent 0
            lay.virtual_size,
            self.identity.guid("vhdx page 83"),
            LOGICAL_SECTOR,
            PHYSICAL_SECTOR,
        )
        return pad(table + items, METADATA_LENGTH)

    def metadata(self) -> Iterator[tuple[int, bytes]]:
        lay = self.layout
        yield 0, self.file_identifier()
        yield HEADER_1, pad(self.header(1), HEADER_2 - HEADER_1)
        yield HEADER_2, pad(self.header(2), REGION_TABLE_1 - HEADER_2)
        table = self.region_table()
        yield REGION_TABLE_1, table
        yield REGION_TABLE_2, table
        yield from zeros(
            REGION_TABLE_2 + L.REGION_TABLE_SIZE, LOG_OFFSET - REGION_TABLE_2 - L.REGION_TABLE_SIZE
        )
        yield from zeros(LOG_OFFSET, LOG_LENGTH)
        yield from self._bat()
        yield lay.metadata_offset, self.metadata_region()
        yield from zeros(lay.metadata_offset + METADATA_LENGTH, CREATE_SLACK)
        tail = lay.payload_blocks * lay.block_size - lay.virtual_size
        yield from zeros(lay.file_size - tail, tail)

    def _bat(self) -> Iterator[tuple[int, bytes]]:
        """The BAT in pieces of about 1 MiB: runs of ``chunk ratio`` payload entries,
        each followed by a (zero) sector bitmap entry, up to ``bat_entries``."""
        lay = self.layout
        ratio = lay.chunk_ratio
        chunks_per_piece = max(1, _BAT_PIECE // (ratio + 1))
        per_piece = chunks_per_piece * (ratio + 1)
        template = _bat_template(chunks_per_piece, ratio, lay.block_size)
        offset = BAT_OFFSET
        for entry in range(0, lay.bat_entries, per_piece):
            first_block = entry // (ratio + 1) * ratio
            start = (lay.payload_offset + first_block * lay.block_size) | L.PAYLOAD_FULLY_PRESENT
            unit = start.to_bytes(8, "little") * ratio + bytes(8)
            value = template + int.from_bytes(unit * chunks_per_piece, "little")
            piece = value.to_bytes(per_piece * 8, "little")
            piece = piece[: (lay.bat_entries - entry) * 8]
            yield offset, piece
            offset += len(piece)
        yield from zeros(offset, BAT_OFFSET + lay.bat_length - offset)


class VhdxSparsePlan(PackedPlan):
    """The dense plan's headers, regions and metadata; payload blocks packed as data
    arrives.  Each BAT piece is the dense plan's: ``chunks`` runs of ``chunk ratio``
    payload entries, each followed by its (zero) sector bitmap entry."""

    dense: VhdxPlan
    _packer: Packer
    _chunks: int  # chunks per BAT piece

    def __init__(self, dense: VhdxPlan) -> None:
        self.dense = dense
        lay = self.dense.layout
        self._chunks = max(1, _BAT_PIECE // (lay.chunk_ratio + 1))
        self._packer = Packer(
            block=lay.block_size,
            blocks=lay.payload_blocks,
            per_table=self._chunks * lay.chunk_ratio,
            base=lay.payload_offset,
            stride=lay.block_size,
            render=self._bat,
        )

    @property
    def file_size(self) -> int:
        lay = self.dense.layout
        return lay.payload_offset + self._packer.count * lay.block_size

    def head(self) -> Iterator[tuple[int, bytes]]:
        dense = self.dense
        table = dense.region_table()
        return without_zeros(
            [
                (0, dense.file_identifier()),
                (HEADER_1, dense.header(1)),
                (HEADER_2, dense.header(2)),
                (REGION_TABLE_1, table),
                (REGION_TABLE_2, table),
                (dense.layout.metadata_offset, dense.metadata_region()),
            ]
        )

    def finish(self) -> Iterator[tuple[int, bytes]]:
        yield from self._packer.finish()

    def _bat(self, index: int, slots: array[int] | None) -> list[tuple[int, bytes]]:
        if slots is None:
            return []  # all NOT_PRESENT: zeros
        lay = self.dense.layout
        ratio = lay.chunk_ratio
        first_block = index * self._chunks * ratio
        count = min(self._chunks * ratio, lay.payload_blocks - first_block)
        entries = table_entries(
            slots,
            count,
            lay.payload_offset,
            lay.block_size,
            8,
            "little",
            flag=L.PAYLOAD_FULLY_PRESENT,
        )
        # A bitmap entry (zero) after every ratio payload entries, but for the last
        # chunk's when the BAT ends there.
        width = ratio * 8
        piece = b"".join(
            entries[at : at + width] + bytes(8) for at in range(0, len(entries), width)
        )
        first_entry = first_block + first_block // ratio
        piece = piece[: (lay.bat_entries - first_entry) * 8]
        return [(BAT_OFFSET + first_entry * 8, piece)]


@lru_cache(maxsize=8)
def _bat_template(chunks: int, ratio: int, block_size: int) -> int:
    """BAT lanes relative to a piece's first payload block: payload entry ``k`` of chunk
    ``c`` holds ``(c * ratio + k) * block_size``, each chunk's bitmap entry 0."""
    table = array("Q", bytes(8 * chunks * (ratio + 1)))
    for c in range(chunks):
        lane = c * (ratio + 1)
        table[lane : lane + ratio] = array(
            "Q", range(c * ratio * block_size, (c + 1) * ratio * block_size, block_size)
        )
    if sys.byteorder != "little":
        table.byteswap()
    return int.from_bytes(table.tobytes(), "little")


def plan(out: int, *, filename: str | None = None, identity: Identity | None = None) -> VhdxPlan:
    """The plan for a window of ``out`` bytes (virtual size: ``out`` rounded up to 512)."""
    if out < 0:
        raise ValueError("negative window length")
    size = round_up(out, SECTOR)
    if size > L.MAX_VIRTUAL_SIZE:
        raise UsageError(f"vhdx cannot hold {size} bytes: the maximum is 64 TiB")
    return VhdxPlan(Layout(size, block_size_for(size)), identity or Identity.fresh())


def sparse_plan(
    out: int, *, filename: str | None = None, identity: Identity | None = None
) -> VhdxSparsePlan:
    """The sparse plan for a window of ``out`` bytes: :func:`plan`'s layout, packed."""
    return VhdxSparsePlan(plan(out, identity=identity))
