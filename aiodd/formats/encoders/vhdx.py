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
"""

from __future__ import annotations

import struct
import sys
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import aiodd
from aiodd.errors import UsageError
from aiodd.formats.base import Extent
from aiodd.formats.crc32c import crc32c
from aiodd.formats.encoders._common import (
    SECTOR,
    Identity,
    MiB,
    div_round_up,
    pad,
    round_up,
    zeros,
)

NAME = "vhdx"

KiB = 1 << 10
GiB = 1 << 30
TiB = 1 << 40
HEADER_1 = 64 * KiB
HEADER_2 = 128 * KiB
REGION_TABLE_1 = 192 * KiB
REGION_TABLE_2 = 256 * KiB
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
LOG_OFFSET = 1 * MiB
LOG_LENGTH = 1 * MiB
BAT_OFFSET = 2 * MiB
METADATA_LENGTH = 1 * MiB
# A new qemu vhdx file ends 4 MiB past its metadata region, whatever the BAT size
# (seen with qemu-img create 7.2 from 3000 bytes to 60 TiB); blocks are then appended.
CREATE_SLACK = 4 * MiB
METADATA_ITEMS_OFFSET = 64 * KiB  # within the metadata region
LOGICAL_SECTOR = 512
PHYSICAL_SECTOR = 512  # what qemu 7.2 writes
MAX_SIZE = 64 * TiB  # qemu's VHDX_MAX_IMAGE_SIZE
# qemu 7.2 computes the BAT of a zero-size disk with an unsigned wrap-around
# ((0 - 1) >> chunk_ratio_bits) and refuses to open one whose BAT region is smaller.
EMPTY_BAT_ENTRIES = 0xFFFFFFFF >> 9

FULLY_PRESENT = 6  # PAYLOAD_BLOCK_FULLY_PRESENT

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
FILE_PARAMETERS_GUID = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
VIRTUAL_DISK_SIZE_GUID = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
PAGE83_GUID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746").bytes_le
LOGICAL_SECTOR_GUID = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F").bytes_le
PHYSICAL_SECTOR_GUID = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556").bytes_le

# Metadata item flags: IsUser 1, IsVirtualDisk 2, IsRequired 4.
_ITEMS = (
    (FILE_PARAMETERS_GUID, 0, 8, 4),
    (VIRTUAL_DISK_SIZE_GUID, 8, 8, 6),
    (PAGE83_GUID, 16, 16, 6),
    (LOGICAL_SECTOR_GUID, 32, 4, 6),
    (PHYSICAL_SECTOR_GUID, 36, 4, 6),
)
REGION_REQUIRED = 1

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
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


@dataclass(frozen=True)
class Layout:
    virtual_size: int
    block_size: int

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * LOGICAL_SECTOR // self.block_size

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


def _checksummed(raw: bytes, at: int) -> bytes:
    """``raw`` with its CRC-32C (computed with the field zero) stored at ``at``."""
    return raw[:at] + crc32c(raw).to_bytes(4, "little") + raw[at + 4 :]


@dataclass(frozen=True)
class VhdxPlan:
    layout: Layout
    identity: Identity = field(default_factory=Identity)

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
        creator = f"aiodd v{aiodd.__version__}".encode("utf-16-le")
        return pad(b"vhdxfile" + creator, HEADER_1)

    def header(self, sequence: int) -> bytes:
        raw = _HEADER.pack(
            b"head",
            0,  # checksum
            sequence,
            self.identity.guid("vhdx file write"),
            self.identity.guid("vhdx data write"),
            bytes(16),  # log GUID: zero, the log is empty
            0,  # log version
            1,  # version
            LOG_LENGTH,
            LOG_OFFSET,
        )
        return _checksummed(pad(raw, HEADER_SIZE), 4)

    def region_table(self) -> bytes:
        lay = self.layout
        raw = struct.pack("<4sIII", b"regi", 0, 2, 0)
        raw += struct.pack("<16sQII", BAT_GUID, BAT_OFFSET, lay.bat_length, REGION_REQUIRED)
        raw += struct.pack(
            "<16sQII", METADATA_GUID, lay.metadata_offset, METADATA_LENGTH, REGION_REQUIRED
        )
        return _checksummed(pad(raw, REGION_TABLE_SIZE), 4)

    def metadata_region(self) -> bytes:
        lay = self.layout
        table = struct.pack("<8sHH20s", b"metadata", 0, len(_ITEMS), b"")
        for guid, offset, length, flags in _ITEMS:
            table += struct.pack(
                "<16sIII4s", guid, METADATA_ITEMS_OFFSET + offset, length, flags, b""
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
        return pad(pad(table, METADATA_ITEMS_OFFSET) + items, METADATA_LENGTH)

    def metadata(self) -> Iterator[tuple[int, bytes]]:
        lay = self.layout
        yield 0, self.file_identifier()
        yield HEADER_1, pad(self.header(1), HEADER_2 - HEADER_1)
        yield HEADER_2, pad(self.header(2), REGION_TABLE_1 - HEADER_2)
        table = self.region_table()
        yield REGION_TABLE_1, table
        yield REGION_TABLE_2, table
        yield from zeros(
            REGION_TABLE_2 + REGION_TABLE_SIZE, LOG_OFFSET - REGION_TABLE_2 - REGION_TABLE_SIZE
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
            start = (lay.payload_offset + first_block * lay.block_size) | FULLY_PRESENT
            unit = start.to_bytes(8, "little") * ratio + bytes(8)
            value = template + int.from_bytes(unit * chunks_per_piece, "little")
            piece = value.to_bytes(per_piece * 8, "little")
            piece = piece[: (lay.bat_entries - entry) * 8]
            yield offset, piece
            offset += len(piece)
        yield from zeros(offset, BAT_OFFSET + lay.bat_length - offset)


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


def plan(out: int, *, identity: Identity | None = None) -> VhdxPlan:
    """The plan for a window of ``out`` bytes (virtual size: ``out`` rounded up to 512)."""
    if out < 0:
        raise ValueError("negative window length")
    size = round_up(out, SECTOR)
    if size > MAX_SIZE:
        raise UsageError(f"vhdx cannot hold {size} bytes: the maximum is 64 TiB")
    return VhdxPlan(Layout(size, block_size_for(size)), identity or Identity())
