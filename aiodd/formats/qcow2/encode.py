"""qcow2 output: version 3 (compat 1.1), 64 KiB clusters, 16-bit refcounts, every
cluster of the window allocated.

Layout, one cluster per structure unless it needs more, all metadata first so the
data clusters are one contiguous run in guest order::

    header (+ feature name table) | refcount table | refcount blocks | L1 | L2 ... | data

The refcount blocks cover every cluster of the file, themselves included, with
refcount 1; nothing leaks and nothing is shared, so ``qemu-img check`` is clean.

The sparse plan (``--sparse``) keeps the metadata where the dense one has it, and packs
only the data clusters that hold a non-zero byte after it, in guest order; an L2 table
whose clusters are all left out is not written either (its L1 entry is 0), and the
refcounts say 1 for exactly the clusters in use, 0 for the unused L2 and refcount block
clusters.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator

from aiodd._typing_names import NamedTuple
from aiodd.errors import UsageError
from aiodd.formats.base import Extent
from aiodd.formats.common import SECTOR, div_round_up, round_up
from aiodd.formats.plans import (
    Packer,
    lanes,
    pack_u16_ones,
    pad,
    table_entries,
    without_zeros,
    zeros,
)
from aiodd.formats.qcow2 import layout as L

NAME = L.NAME
# The feature name table's extension type, by the name this module's readers know.
EXT_FEATURE_NAMES = L.EXT_FEATURE_TABLE

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4  # 16-bit refcounts
ENTRIES_PER_L2 = CLUSTER // 8
REFCOUNTS_PER_BLOCK = CLUSTER * 8 >> REFCOUNT_ORDER
HEADER_LENGTH = 112  # v3 header with the compression type byte, padded to 8
# The largest image qemu opens: the most L1 entries it accepts.
MAX_L1_ENTRIES = L.MAX_L1_BYTES // 8


class Layout(NamedTuple):
    """Cluster indexes of every structure, a pure function of the virtual size."""

    virtual_size: int
    data_clusters: int
    l1_entries: int
    refcount_table_clusters: int
    refcount_blocks: int
    l1_clusters: int

    @property
    def refcount_table_offset(self) -> int:
        return CLUSTER

    @property
    def refcount_blocks_offset(self) -> int:
        return self.refcount_table_offset + self.refcount_table_clusters * CLUSTER

    @property
    def l1_offset(self) -> int:
        return self.refcount_blocks_offset + self.refcount_blocks * CLUSTER

    @property
    def l2_offset(self) -> int:
        return self.l1_offset + self.l1_clusters * CLUSTER

    @property
    def data_offset(self) -> int:
        return self.l2_offset + self.l1_entries * CLUSTER

    @property
    def total_clusters(self) -> int:
        return self.data_offset // CLUSTER + self.data_clusters


def layout(virtual_size: int) -> Layout:
    data = div_round_up(virtual_size, CLUSTER)
    l1_entries = div_round_up(data, ENTRIES_PER_L2)
    if l1_entries > MAX_L1_ENTRIES:
        raise UsageError(
            f"qcow2 cannot hold {virtual_size} bytes with 64 KiB clusters: "
            f"the L1 table would exceed qemu's limit of {MAX_L1_ENTRIES} entries"
        )
    l1_clusters = div_round_up(l1_entries * 8, CLUSTER)
    fixed = 1 + l1_clusters + l1_entries + data
    # The refcount structures count themselves: grow them until they cover everything.
    table, blocks = 1, 1
    while True:
        total = fixed + table + blocks
        need_blocks = div_round_up(total, REFCOUNTS_PER_BLOCK)
        need_table = div_round_up(need_blocks * 8, CLUSTER)
        if (need_blocks, need_table) == (blocks, table):
            break
        blocks, table = max(blocks, need_blocks), max(table, need_table)
    return Layout(virtual_size, data, l1_entries, table, blocks, l1_clusters)


class Qcow2Plan(NamedTuple):
    layout: Layout

    @property
    def virtual_size(self) -> int:
        return self.layout.virtual_size

    @property
    def data_size(self) -> int:
        return self.virtual_size

    @property
    def file_size(self) -> int:
        return self.layout.total_clusters * CLUSTER

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(f"range {offset}+{length} outside the virtual disk")
        return [Extent(self.layout.data_offset + offset, length)] if length else []

    def header(self) -> bytes:
        lay = self.layout
        header = L.build_header(
            cluster_bits=CLUSTER_BITS,
            size=lay.virtual_size,
            l1_size=lay.l1_entries,
            l1_table_offset=lay.l1_offset if lay.l1_entries else 0,
            refcount_table_offset=lay.refcount_table_offset,
            refcount_table_clusters=lay.refcount_table_clusters,
            refcount_order=REFCOUNT_ORDER,
            header_length=HEADER_LENGTH,
        )
        return pad(header, CLUSTER)

    def metadata(self) -> Iterator[tuple[int, bytes]]:
        lay = self.layout
        yield 0, self.header()
        # Refcount table: refcount block i is at refcount_blocks_offset + i clusters.
        yield from _table_clusters(
            lay.refcount_table_offset,
            lay.refcount_table_clusters,
            lay.refcount_blocks_offset,
            lay.refcount_blocks,
            copied=False,
        )
        # Refcount blocks: 1 for every cluster of the file, 0 past its end.
        total = lay.total_clusters
        full = pack_u16_ones(REFCOUNTS_PER_BLOCK)
        for i in range(lay.refcount_blocks):
            covered = min(REFCOUNTS_PER_BLOCK, total - i * REFCOUNTS_PER_BLOCK)
            block = full if covered == REFCOUNTS_PER_BLOCK else pad(pack_u16_ones(covered), CLUSTER)
            yield lay.refcount_blocks_offset + i * CLUSTER, block
        # L1: entry i points at L2 table i, which is in use once (COPIED).
        yield from _table_clusters(
            lay.l1_offset, lay.l1_clusters, lay.l2_offset, lay.l1_entries, copied=True
        )
        # L2 tables: data cluster j at data_offset + j clusters, COPIED.
        for i in range(lay.l1_entries):
            first = i * ENTRIES_PER_L2
            count = min(ENTRIES_PER_L2, lay.data_clusters - first)
            start = lay.data_offset + first * CLUSTER
            yield lay.l2_offset + i * CLUSTER, _entries(start, count, CLUSTER, copied=True)
        # The last data cluster's tail past the virtual size.
        tail = lay.data_clusters * CLUSTER - lay.virtual_size
        yield from zeros(lay.data_offset + lay.virtual_size, tail)


class Qcow2SparsePlan:
    """The dense plan's metadata positions; data clusters packed as data arrives."""

    layout: Layout
    _l2_used: bytearray
    _packer: Packer

    def __init__(self, layout: Layout) -> None:
        self.layout = lay = layout
        self._l2_used = bytearray(lay.l1_entries)
        self._packer = Packer(
            block=CLUSTER,
            blocks=lay.data_clusters,
            per_table=ENTRIES_PER_L2,
            base=lay.data_offset,
            stride=CLUSTER,
            render=self._l2_table,
        )

    @property
    def virtual_size(self) -> int:
        return self.layout.virtual_size

    @property
    def data_size(self) -> int:
        return self.virtual_size

    @property
    def file_size(self) -> int:
        return self.layout.data_offset + self._packer.count * CLUSTER

    def head(self) -> Iterator[tuple[int, bytes]]:
        return without_zeros([(0, Qcow2Plan(self.layout).header())])

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        return self._packer.extents(offset, length)

    def ready(self, offset: int) -> list[tuple[int, bytes]]:
        return self._packer.ready(offset)

    def _l2_table(self, index: int, slots: array[int] | None) -> list[tuple[int, bytes]]:
        if slots is None:
            return []
        self._l2_used[index] = 1
        lay = self.layout
        count = min(ENTRIES_PER_L2, lay.data_clusters - index * ENTRIES_PER_L2)
        table = table_entries(slots, count, lay.data_offset, CLUSTER, 8, "big", flag=L.OFLAG_COPIED)
        return [(lay.l2_offset + index * CLUSTER, table)]

    def finish(self) -> Iterator[tuple[int, bytes]]:
        yield from self._packer.finish()
        lay = self.layout
        # L1: the L2 tables written, each used once (COPIED); 0 for the others.
        per = CLUSTER // 8
        for c in range(lay.l1_clusters):
            written = self._l2_used[c * per : (c + 1) * per]
            if any(written):
                entries = array("q", [i if flag else -1 for i, flag in enumerate(written)])
                table = table_entries(
                    entries,
                    len(written),
                    lay.l2_offset + c * per * CLUSTER,
                    CLUSTER,
                    8,
                    "big",
                    flag=L.OFLAG_COPIED,
                )
                yield lay.l1_offset + c * CLUSTER, table
        # The refcount table: as many refcount blocks as the file now needs.
        total = self.file_size // CLUSTER
        blocks = div_round_up(total, REFCOUNTS_PER_BLOCK)
        yield from without_zeros(
            _table_clusters(
                lay.refcount_table_offset,
                lay.refcount_table_clusters,
                lay.refcount_blocks_offset,
                blocks,
                copied=False,
            )
        )
        used = self._used_clusters(blocks)
        for i in range(blocks):
            yield (
                lay.refcount_blocks_offset + i * CLUSTER,
                _refcounts(
                    used, i * REFCOUNTS_PER_BLOCK, min(total, (i + 1) * REFCOUNTS_PER_BLOCK)
                ),
            )

    def _used_clusters(self, refcount_blocks: int) -> list[tuple[int, int]]:
        """The runs ``(first, end)`` of clusters in use, in order."""
        lay = self.layout
        first_block = lay.refcount_blocks_offset // CLUSTER
        runs = [(0, first_block + refcount_blocks)]  # header, refcount table and blocks
        l1 = lay.l1_offset // CLUSTER
        runs.append((l1, l1 + lay.l1_clusters))
        l2 = lay.l2_offset // CLUSTER
        for index, flag in enumerate(self._l2_used):
            if flag:
                runs.append((l2 + index, l2 + index + 1))
        data = lay.data_offset // CLUSTER
        runs.append((data, data + self._packer.count))
        merged: list[tuple[int, int]] = []
        for first, end in runs:
            if merged and merged[-1][1] == first:
                merged[-1] = (merged[-1][0], end)
            elif end > first:
                merged.append((first, end))
        return merged


def _refcounts(used: list[tuple[int, int]], first: int, end: int) -> bytes:
    """One refcount block for clusters ``[first, end)``: 1 for those in ``used`` (runs
    in order, which do not touch each other)."""
    block = bytearray(CLUSTER)
    at = bisect.bisect_right(used, (first, first))
    at = at - 1 if at and used[at - 1][1] > first else at
    while at < len(used) and used[at][0] < end:
        lo, hi = max(used[at][0], first), min(used[at][1], end)
        block[(lo - first) * 2 : (hi - first) * 2] = pack_u16_ones(hi - lo)
        at += 1
    return bytes(block)


def _entries(first: int, count: int, step: int, *, copied: bool) -> bytes:
    """One cluster of big-endian 64-bit entries ``first + k * step`` for ``k < count``,
    with the COPIED flag (bit 63) when asked, zero-filled after them."""
    table = lanes(first | L.OFLAG_COPIED if copied else first, count, step, 8, "big")
    return table + bytes(CLUSTER - len(table)) if len(table) < CLUSTER else table


def _table_clusters(
    offset: int, clusters: int, first: int, count: int, *, copied: bool
) -> Iterator[tuple[int, bytes]]:
    """A table of ``count`` entries pointing at consecutive clusters from ``first``,
    spread over ``clusters`` clusters at ``offset``, yielded a cluster at a time."""
    per = CLUSTER // 8
    for c in range(clusters):
        lo = c * per
        n = max(0, min(per, count - lo))
        yield offset + c * CLUSTER, _entries(first + lo * CLUSTER, n, CLUSTER, copied=copied)


def plan(out: int, *, filename: str | None = None) -> Qcow2Plan:
    """The plan for a window of ``out`` bytes (virtual size: ``out`` rounded up to 512)."""
    if out < 0:
        raise ValueError("negative window length")
    return Qcow2Plan(layout(round_up(out, SECTOR)))


def sparse_plan(out: int, *, filename: str | None = None) -> Qcow2SparsePlan:
    """The sparse plan for a window of ``out`` bytes: :func:`plan`'s layout, packed."""
    return Qcow2SparsePlan(plan(out).layout)
