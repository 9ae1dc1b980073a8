"""vpc output: a dynamic VHD with 2 MiB blocks, as qemu 7.2's ``vpc`` driver creates
it, with every block of the window allocated in order::

    footer copy | dynamic header | BAT (padded to 512) | {bitmap, block} ... | footer

Blocks that hold only the CHS padding past the window stay unallocated, as in
qemu-img dd's output, which never writes there: the files are then the same size.

Each block is a 512-byte sector bitmap of all ones (every sector present, as qemu sets
it when it allocates a block) followed by 2 MiB of data.  The virtual size is the CHS
geometry's product (the VHD specification's algorithm, searched upwards as qemu does),
so the window is padded with zeros up to it; above the geometry's ceiling (about
127.5 GiB) qemu keeps the exact size and records the maximum geometry.

The sparse plan (``--sparse``) allocates only the blocks that hold a non-zero byte,
packed in guest order after the BAT as qemu appends them; the others keep the BAT's
0xffffffff (unallocated, read as zeros).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from aiodd._typing_names import NamedTuple
from aiodd.errors import UsageError
from aiodd.formats.base import Extent
from aiodd.formats.common import SECTOR, div_round_up, round_up
from aiodd.formats.plans import (
    Identity,
    PackedPlan,
    Packer,
    lanes,
    strided_extents,
    table_entries,
    zeros,
)
from aiodd.formats.vpc import layout as L
from aiodd.formats.vpc.layout import FOOTER_SIZE
from aiodd.formats.vpc.layout import MAX_GEOMETRY as MAX_GEOMETRY
from aiodd.formats.vpc.layout import MAX_SECTORS as MAX_SECTORS
from aiodd.formats.vpc.layout import VHD_EPOCH as VHD_EPOCH

NAME = L.NAME

BLOCK = 2 << 20
BITMAP = SECTOR  # 2 MiB / 512 sectors, one bit each, padded to a sector
STRIDE = BITMAP + BLOCK
DYN_HEADER_OFFSET = FOOTER_SIZE
BAT_OFFSET = DYN_HEADER_OFFSET + L.DYN_HEADER_SIZE
# qemu's creator fields (application, version, host OS): qemu sizes such disks by CHS.
CREATOR = (b"qemu", 0x00050003, b"Wi2k")
# BAT entries per metadata piece (256 KiB).
_BAT_PIECE = 65536


def geometry(sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for ``sectors``, the VHD specification's
    algorithm as qemu 7.2's ``calculate_geometry`` implements it."""
    total = min(sectors, MAX_GEOMETRY)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


class Size(NamedTuple):
    """The disk's size and geometry for a window of ``n`` sectors."""

    sectors: int
    cylinders: int
    heads: int
    spt: int


def size_for(n: int) -> Size:
    """qemu's search: the first ``geometry(n + i)`` whose product holds ``n`` sectors;
    the exact size (with the maximum geometry) when that is the ceiling."""
    if n == 0:
        return Size(0, 0, 0, 0)
    target = min(n, MAX_GEOMETRY)
    cyls = heads = spt = 0
    i = 0
    while cyls * heads * spt < target:
        cyls, heads, spt = geometry(target + i)
        i += 1
    if cyls * heads * spt == MAX_GEOMETRY:
        if n > MAX_SECTORS:
            raise UsageError(
                f"vpc cannot hold {n * SECTOR} bytes: the VHD format's maximum is 2040 GiB"
            )
        return Size(n, cyls, heads, spt)
    return Size(cyls * heads * spt, cyls, heads, spt)


class VpcPlan(NamedTuple):
    size: Size
    window: int  # bytes of data the window holds, before the CHS padding
    identity: Identity

    @property
    def virtual_size(self) -> int:
        return self.size.sectors * SECTOR

    @property
    def blocks(self) -> int:
        """BAT entries: the whole virtual disk."""
        return div_round_up(self.virtual_size, BLOCK)

    @property
    def allocated(self) -> int:
        """Blocks written: those the window touches."""
        return div_round_up(self.window, BLOCK)

    @property
    def data_size(self) -> int:
        return min(self.virtual_size, self.allocated * BLOCK)

    @property
    def bat_bytes(self) -> int:
        return round_up(self.blocks * 4, SECTOR)

    @property
    def data_start(self) -> int:
        """Offset of block 0's bitmap."""
        return BAT_OFFSET + self.bat_bytes

    @property
    def file_size(self) -> int:
        return self.data_start + self.allocated * STRIDE + FOOTER_SIZE

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        if offset < 0 or length < 0 or offset + length > self.data_size:
            raise ValueError(f"range {offset}+{length} outside the allocated blocks")
        base = self.data_start + BITMAP
        return strided_extents(offset, length, base=base, block=BLOCK, stride=STRIDE)

    def footer(self) -> bytes:
        size = self.size
        return L.build_footer(
            data_offset=DYN_HEADER_OFFSET,
            timestamp=max(0, self.identity.timestamp - VHD_EPOCH) & 0xFFFFFFFF,
            creator=CREATOR,
            size=size.sectors * SECTOR,
            geometry=(size.cylinders, size.heads, size.spt),
            disk_type=L.TYPE_DYNAMIC,
            uuid=self.identity.guid("vpc unique id"),
        )

    def dynamic_header(self) -> bytes:
        return L.build_dynamic_header(
            table_offset=BAT_OFFSET, entries=self.blocks, block_size=BLOCK
        )

    def metadata(self) -> Iterator[tuple[int, bytes]]:
        footer = self.footer()
        yield 0, footer
        yield DYN_HEADER_OFFSET, self.dynamic_header()
        # BAT: block b's bitmap sits at data_start + b * STRIDE (sector numbers); the
        # padding to a whole sector is 0xff (unallocated) like qemu's.
        first = self.data_start // SECTOR
        step = STRIDE // SECTOR
        for lo in range(0, self.allocated, _BAT_PIECE):
            n = min(_BAT_PIECE, self.allocated - lo)
            yield BAT_OFFSET + lo * 4, lanes(first + lo * step, n, step, 4, "big")
        # Unallocated entries, then the padding to a whole sector: 0xff, like qemu's.
        slack = self.bat_bytes - self.allocated * 4
        if slack:
            yield BAT_OFFSET + self.allocated * 4, b"\xff" * slack
        bitmap = b"\xff" * BITMAP
        for b in range(self.allocated):
            yield self.data_start + b * STRIDE, bitmap
        tail = self.allocated * BLOCK - self.data_size
        yield from zeros(self.file_size - FOOTER_SIZE - tail, tail)
        yield self.file_size - FOOTER_SIZE, footer


_UNALLOCATED = 0xFFFFFFFF


class VpcSparsePlan(PackedPlan):
    """The dense plan's footer, header and BAT position; blocks packed as data arrives."""

    dense: VpcPlan
    _packer: Packer
    _bitmaps: int  # blocks whose bitmap is out

    def __init__(self, dense: VpcPlan) -> None:
        self.dense = dense
        self._bitmaps = 0
        self._packer = Packer(
            block=BLOCK,
            blocks=self.dense.blocks,
            per_table=_BAT_PIECE,
            base=self.dense.data_start + BITMAP,
            stride=STRIDE,
            render=self._bat,
        )

    @property
    def file_size(self) -> int:
        return self.dense.data_start + self._packer.count * STRIDE + FOOTER_SIZE

    def head(self) -> Iterator[tuple[int, bytes]]:
        yield 0, self.dense.footer()
        yield DYN_HEADER_OFFSET, self.dense.dynamic_header()

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        if offset < 0 or length < 0 or offset + length > self.data_size:
            raise ValueError(f"range {offset}+{length} outside the allocated blocks")
        return self._packer.extents(offset, length)

    def ready(self, offset: int) -> list[tuple[int, bytes]]:
        return self._packer.ready(offset) + self._new_bitmaps()

    def _new_bitmaps(self) -> list[tuple[int, bytes]]:
        """The sector bitmap of each block allocated since last asked: all ones, every
        sector present, as qemu writes it."""
        start = self.dense.data_start
        bitmaps = [
            (start + s * STRIDE, b"\xff" * BITMAP) for s in range(self._bitmaps, self._packer.count)
        ]
        self._bitmaps = self._packer.count
        return bitmaps

    def _bat(self, index: int, slots: array[int] | None) -> list[tuple[int, bytes]]:
        count = min(_BAT_PIECE, self.dense.blocks - index * _BAT_PIECE)
        offset = BAT_OFFSET + index * _BAT_PIECE * 4
        if slots is None:
            return [(offset, b"\xff" * (count * 4))]
        first = self.dense.data_start // SECTOR
        table = table_entries(slots, count, first, STRIDE // SECTOR, 4, "big", empty=_UNALLOCATED)
        return [(offset, table)]

    def finish(self) -> Iterator[tuple[int, bytes]]:
        yield from self._packer.finish()
        yield from self._new_bitmaps()
        dense = self.dense
        slack = dense.bat_bytes - dense.blocks * 4  # to a whole sector: 0xff, like qemu's
        if slack:
            yield BAT_OFFSET + dense.blocks * 4, b"\xff" * slack
        yield self.file_size - FOOTER_SIZE, dense.footer()


def plan(out: int, *, filename: str | None = None, identity: Identity | None = None) -> VpcPlan:
    """The plan for a window of ``out`` bytes (virtual size: CHS-rounded, see module)."""
    if out < 0:
        raise ValueError("negative window length")
    return VpcPlan(size_for(div_round_up(out, SECTOR)), out, identity or Identity.fresh())


def sparse_plan(
    out: int, *, filename: str | None = None, identity: Identity | None = None
) -> VpcSparsePlan:
    """The sparse plan for a window of ``out`` bytes: :func:`plan`'s disk, blocks packed."""
    return VpcSparsePlan(plan(out, filename=filename, identity=identity))
