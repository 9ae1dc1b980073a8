"""vmdk output: a monolithicSparse extent (version 1 header, 64 KiB grains) with an
embedded descriptor and a redundant grain directory, laid out as ``qemu-img create -f
vmdk`` lays it out, with every grain of the window allocated in order::

    header | descriptor (20 sectors) | redundant GD | redundant GTs | GD | GTs | pad | grains

All offsets are in 512-byte sectors; grain table entries are 32-bit sector numbers, so
no grain may start at or past sector 2**32 (qemu's ``VMDK_EXTENT_MAX_SECTORS``): a
window whose grains would is refused up front, where qemu-img dd fails part-way.

The sparse plan (``--sparse``) keeps that layout and packs only the grains that hold a
non-zero byte after the tables, in guest order; a grain table with no grain is left as
zeros (unwritten), as qemu-img create leaves every grain table of a new image.
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
    pad,
    table_entries,
    without_zeros,
    zeros,
)
from aiodd.formats.vmdk import layout as L

NAME = L.NAME

GRAIN_SECTORS = 128
GRAIN = GRAIN_SECTORS * SECTOR
GTES_PER_GT = L.MAX_GTES_PER_GT
GT_SECTORS = GTES_PER_GT * 4 // SECTOR
DESCRIPTOR_OFFSET = 1
DESCRIPTOR_SECTORS = 20
FLAGS = L.FLAG_NL_DETECT | L.FLAG_RGD
# Grain tables are emitted this many at a time (256 KiB) to bound the metadata pieces.
_GTS_PER_PIECE = 128

DEFAULT_FILENAME = "image.vmdk"


class Layout(NamedTuple):
    capacity: int  # sectors
    grains: int
    gt_count: int
    gd_sectors: int

    @property
    def rgd_offset(self) -> int:
        return DESCRIPTOR_OFFSET + DESCRIPTOR_SECTORS

    @property
    def gd_offset(self) -> int:
        return self.rgd_offset + self.gd_sectors + GT_SECTORS * self.gt_count

    @property
    def grain_offset(self) -> int:
        return round_up(
            self.gd_offset + self.gd_sectors + GT_SECTORS * self.gt_count, GRAIN_SECTORS
        )


def layout(capacity: int) -> Layout:
    grains = div_round_up(capacity, GRAIN_SECTORS)
    gt_count = div_round_up(grains, GTES_PER_GT)
    lay = Layout(capacity, grains, gt_count, div_round_up(gt_count * 4, SECTOR))
    if lay.grain_offset + (grains - 1) * GRAIN_SECTORS >= L.MAX_SECTOR:
        raise UsageError(
            f"vmdk cannot hold {capacity * SECTOR} bytes densely: a monolithicSparse "
            "extent addresses grains by 32-bit sector numbers (at most 2 TiB of file)"
        )
    return lay


def descriptor(capacity: int, cid: int, filename: str) -> bytes:
    """The embedded descriptor, line for line as qemu 7.2 writes it."""
    # qemu writes the name as it is, quotes included (libvmdk and qemu read it back);
    # only a character that would break the line-based descriptor is replaced.
    safe = "".join(c if c.isprintable() else "_" for c in filename) or "_"
    cylinders = capacity * SECTOR // (63 * 16 * SECTOR)
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="monolithicSparse"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity} SPARSE "{safe}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "16"\n'
        'ddb.geometry.sectors = "63"\n'
        'ddb.adapterType = "ide"\n'
        'ddb.toolsVersion = "2147483647"\n'
    )
    raw = text.encode("utf-8")
    if len(raw) > DESCRIPTOR_SECTORS * SECTOR:
        raise UsageError("vmdk descriptor does not fit: the output file name is too long")
    return pad(raw, DESCRIPTOR_SECTORS * SECTOR)


class VmdkPlan(NamedTuple):
    layout: Layout
    filename: str
    identity: Identity

    @property
    def virtual_size(self) -> int:
        return self.layout.capacity * SECTOR

    @property
    def data_size(self) -> int:
        return self.virtual_size

    @property
    def file_size(self) -> int:
        return (self.layout.grain_offset + self.layout.grains * GRAIN_SECTORS) * SECTOR

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(f"range {offset}+{length} outside the virtual disk")
        return [Extent(self.layout.grain_offset * SECTOR + offset, length)] if length else []

    def header(self) -> bytes:
        lay = self.layout
        return L.build_sparse_header(
            L.SparseHeader(
                version=1,
                flags=FLAGS,
                capacity=lay.capacity,
                granularity=GRAIN_SECTORS,
                desc_offset=DESCRIPTOR_OFFSET,
                desc_size=DESCRIPTOR_SECTORS,
                num_gtes_per_gt=GTES_PER_GT,
                rgd_offset=lay.rgd_offset,
                gd_offset=lay.gd_offset,
                grain_offset=lay.grain_offset,
                compress_algorithm=0,
            )
        )

    def metadata(self) -> Iterator[tuple[int, bytes]]:
        lay = self.layout
        yield 0, self.header()
        cid = self.identity.u32("vmdk CID")
        yield DESCRIPTOR_OFFSET * SECTOR, descriptor(lay.capacity, cid, self.filename)
        yield from self._directory(lay.rgd_offset)
        yield from self._directory(lay.gd_offset)
        end = lay.gd_offset + lay.gd_sectors + GT_SECTORS * lay.gt_count
        yield from zeros(end * SECTOR, (lay.grain_offset - end) * SECTOR)
        tail = lay.grains * GRAIN - self.virtual_size
        yield from zeros(self.file_size - tail, tail)

    def _directory(self, gd_offset: int, *, tables: bool = True) -> Iterator[tuple[int, bytes]]:
        """A grain directory at ``gd_offset`` followed by the grain tables it points at."""
        lay = self.layout
        first_gt = gd_offset + lay.gd_sectors
        gd = lanes(first_gt, lay.gt_count, GT_SECTORS, 4, "little")
        yield gd_offset * SECTOR, pad(gd, lay.gd_sectors * SECTOR)
        if not tables:
            return
        for piece in range(0, lay.gt_count, _GTS_PER_PIECE):
            gts = min(_GTS_PER_PIECE, lay.gt_count - piece)
            first_grain = piece * GTES_PER_GT
            count = min(gts * GTES_PER_GT, lay.grains - first_grain)
            start = lay.grain_offset + first_grain * GRAIN_SECTORS
            table = lanes(start, count, GRAIN_SECTORS, 4, "little")
            yield (first_gt + piece * GT_SECTORS) * SECTOR, pad(table, gts * GT_SECTORS * SECTOR)


class VmdkSparsePlan(PackedPlan):
    """The dense plan's header, descriptor and directories; grains packed as data arrives."""

    dense: VmdkPlan
    _packer: Packer

    def __init__(self, dense: VmdkPlan) -> None:
        self.dense = dense
        lay = self.dense.layout
        self._packer = Packer(
            block=GRAIN,
            blocks=lay.grains,
            per_table=GTES_PER_GT,
            base=lay.grain_offset * SECTOR,
            stride=GRAIN,
            render=self._grain_table,
        )

    @property
    def file_size(self) -> int:
        return (self.dense.layout.grain_offset + self._packer.count * GRAIN_SECTORS) * SECTOR

    def head(self) -> Iterator[tuple[int, bytes]]:
        dense, lay = self.dense, self.dense.layout
        cid = dense.identity.u32("vmdk CID")
        return without_zeros(
            [
                (0, dense.header()),
                (DESCRIPTOR_OFFSET * SECTOR, descriptor(lay.capacity, cid, dense.filename)),
                *dense._directory(lay.rgd_offset, tables=False),
                *dense._directory(lay.gd_offset, tables=False),
            ]
        )

    def finish(self) -> Iterator[tuple[int, bytes]]:
        yield from self._packer.finish()

    def _grain_table(self, index: int, slots: array[int] | None) -> list[tuple[int, bytes]]:
        """Grain table ``index`` in both directories."""
        if slots is None:
            return []
        lay = self.dense.layout
        count = min(GTES_PER_GT, lay.grains - index * GTES_PER_GT)
        table = table_entries(slots, count, lay.grain_offset, GRAIN_SECTORS, 4, "little")
        return [
            ((gd + lay.gd_sectors + index * GT_SECTORS) * SECTOR, table)
            for gd in (lay.rgd_offset, lay.gd_offset)
        ]


def plan(out: int, *, filename: str | None = None, identity: Identity | None = None) -> VmdkPlan:
    """The plan for a window of ``out`` bytes (capacity: ``out`` rounded up to sectors).

    ``filename`` is the name the embedded descriptor's extent line gives the file
    (qemu writes the output's base name; readers of monolithicSparse ignore it);
    :data:`DEFAULT_FILENAME` when not given.
    """
    if out < 0:
        raise ValueError("negative window length")
    if out == 0:
        raise UsageError(
            "vmdk cannot hold an empty image: a monolithicSparse extent needs a capacity "
            "of at least one sector (the window is 0 bytes)"
        )
    return VmdkPlan(
        layout(div_round_up(out, SECTOR)),
        filename or DEFAULT_FILENAME,
        identity or Identity.fresh(),
    )


def sparse_plan(
    out: int, *, filename: str | None = None, identity: Identity | None = None
) -> VmdkSparsePlan:
    """The sparse plan for a window of ``out`` bytes: :func:`plan`'s layout, packed."""
    return VmdkSparsePlan(plan(out, filename=filename, identity=identity))
