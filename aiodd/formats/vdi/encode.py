"""vdi output: a dynamic VDI with 1 MiB blocks, as qemu 7.2's ``vdi`` driver creates it
and ``qemu-img dd`` fills it, every block of the window allocated in order::

    header (512) | block map (padded to 512 with zeros) | block 0 | block 1 | ...

The virtual size is the window rounded up to 512 bytes; the last block is whole in the
file, zeros past the window.  The header is qemu's: its text, a header size of 0x180,
no geometry, two fresh UUIDs (image and last snapshot), and the count of blocks
allocated.

The sparse plan (``--sparse``) allocates only the blocks that hold a non-zero byte,
packed in guest order after the block map as qemu appends them; the others keep the
map's 0xffffffff (never written, read as zeros), as ``qemu-img convert -O vdi`` leaves
them.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from aiodd._typing_names import NamedTuple
from aiodd.errors import UsageError
from aiodd.formats.base import Extent
from aiodd.formats.common import SECTOR, div_round_up, round_up
from aiodd.formats.plans import Identity, PackedPlan, Packer, lanes, table_entries, zeros
from aiodd.formats.vdi import layout as L
from aiodd.formats.vdi.layout import MAX_DISK_SIZE as MAX_DISK_SIZE

NAME = L.NAME

BLOCK = L.BLOCK_SIZE
BMAP_OFFSET = L.HEADER_SIZE
# Block map entries per metadata piece (256 KiB).
_BMAP_PIECE = 65536


class VdiPlan(NamedTuple):
    window: int  # bytes of data the window holds
    identity: Identity

    @property
    def virtual_size(self) -> int:
        return round_up(self.window, SECTOR)

    @property
    def blocks(self) -> int:
        """Block map entries: the whole virtual disk, every one allocated."""
        return div_round_up(self.virtual_size, BLOCK)

    @property
    def data_size(self) -> int:
        return self.virtual_size

    @property
    def data_start(self) -> int:
        """``offset_data``: block 0's offset."""
        return BMAP_OFFSET + L.bmap_bytes(self.blocks)

    @property
    def file_size(self) -> int:
        return self.data_start + self.blocks * BLOCK

    def header(self, allocated: int) -> bytes:
        return L.build_header(
            image_type=L.TYPE_DYNAMIC,
            offset_bmap=BMAP_OFFSET,
            offset_data=self.data_start,
            disk_size=self.virtual_size,
            blocks=self.blocks,
            allocated=allocated,
            uuid_image=self.identity.guid("vdi image uuid"),
            uuid_last_snap=self.identity.guid("vdi last snapshot uuid"),
        )

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        if offset < 0 or length < 0 or offset + length > self.data_size:
            raise ValueError(f"range {offset}+{length} outside the allocated blocks")
        return [Extent(self.data_start + offset, length)] if length else []

    def metadata(self) -> Iterator[tuple[int, bytes]]:
        yield 0, self.header(self.blocks)
        for lo in range(0, self.blocks, _BMAP_PIECE):
            n = min(_BMAP_PIECE, self.blocks - lo)
            yield BMAP_OFFSET + lo * 4, lanes(lo, n, 1, 4, "little")
        # the map's padding to a whole sector is zeros, as qemu leaves it
        yield from zeros(
            BMAP_OFFSET + self.blocks * 4, self.data_start - BMAP_OFFSET - self.blocks * 4
        )
        yield from zeros(
            self.data_start + self.data_size, self.file_size - self.data_start - self.data_size
        )


class VdiSparsePlan(PackedPlan):
    """The dense plan's header and block map position; blocks packed as data arrives.
    The header, which counts the blocks allocated, comes last."""

    dense: VdiPlan
    _packer: Packer

    def __init__(self, dense: VdiPlan) -> None:
        self.dense = dense
        self._packer = Packer(
            block=BLOCK,
            blocks=self.dense.blocks,
            per_table=_BMAP_PIECE,
            base=self.dense.data_start,
            stride=BLOCK,
            render=self._bmap,
        )

    @property
    def file_size(self) -> int:
        return self.dense.data_start + self._packer.count * BLOCK

    def head(self) -> Iterator[tuple[int, bytes]]:
        return iter(())

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        if offset < 0 or length < 0 or offset + length > self.data_size:
            raise ValueError(f"range {offset}+{length} outside the allocated blocks")
        return self._packer.extents(offset, length)

    def _bmap(self, index: int, slots: array[int] | None) -> list[tuple[int, bytes]]:
        count = min(_BMAP_PIECE, self.dense.blocks - index * _BMAP_PIECE)
        offset = BMAP_OFFSET + index * _BMAP_PIECE * 4
        if slots is None:
            return [(offset, b"\xff" * (count * 4))]
        return [(offset, table_entries(slots, count, 0, 1, 4, "little", empty=L.UNALLOCATED))]

    def finish(self) -> Iterator[tuple[int, bytes]]:
        yield from self._packer.finish()
        yield 0, self.dense.header(self._packer.count)


def plan(out: int, *, filename: str | None = None, identity: Identity | None = None) -> VdiPlan:
    """The plan for a window of ``out`` bytes (virtual size: rounded up to 512)."""
    if out < 0:
        raise ValueError("negative window length")
    if round_up(out, SECTOR) > MAX_DISK_SIZE:
        raise UsageError(
            f"vdi cannot hold {out} bytes: qemu's VDI maximum is {MAX_DISK_SIZE} bytes"
        )
    return VdiPlan(out, identity or Identity.fresh())


def sparse_plan(
    out: int, *, filename: str | None = None, identity: Identity | None = None
) -> VdiSparsePlan:
    """The sparse plan for a window of ``out`` bytes: :func:`plan`'s disk, blocks packed."""
    return VdiSparsePlan(plan(out, filename=filename, identity=identity))
