"""QED input, as QEMU 7.2 reads it read-only.

The header is parsed by :mod:`aiodd.formats.qed.layout`; this module maps virtual ranges
through the L1 and L2 tables.  A table may be as large as 16 clusters of 64 MiB, so the
L1 is read only as far as the image size reaches and the L2 tables in pieces, kept in a
bounded LRU under a lock (two threads may read at once).  An unallocated cluster reads
from the backing file, or as zeros without one; a zero cluster reads as zeros.

The "needs check" feature (an image not closed cleanly) is read as qemu reads it
read-only: as it is.
"""

from __future__ import annotations

from aiodd.formats.common import MappedDisk, Runs, TableCache
from aiodd.formats.qed import layout
from aiodd.formats.qed.layout import UNALLOCATED, ZERO_CLUSTER, Header
from aiodd.formats.reference import Reference

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk

NAME = layout.NAME
probe = layout.probe
PIECE_ENTRIES = 8192  # an L2 table is read 64 KiB at a time
CACHE_PIECES = 256


class QedDisk(MappedDisk):
    format_name = NAME

    def __init__(
        self, file: RandomAccessFile, header: Header, l1: list[int], backing: VirtualDisk | None
    ) -> None:
        super().__init__(file, backing, header.image_size)
        self._header = header
        self._l1 = l1
        self._cache: TableCache[tuple[int, int], list[int]] = TableCache(CACHE_PIECES)

    @property
    def header(self) -> Header:
        return self._header

    def _l2_piece(self, l2_offset: int, piece: int) -> list[int]:
        return self._cache.get((l2_offset, piece), lambda: self._load_piece(l2_offset, piece))

    def _load_piece(self, l2_offset: int, piece: int) -> list[int]:
        count = min(PIECE_ENTRIES, self._header.table_entries - piece * PIECE_ENTRIES)
        # The table lies wholly inside the file: table_offset_valid said so.
        return layout.le64_table(self._file.pread(l2_offset + piece * PIECE_ENTRIES * 8, count * 8))

    def _read(self, base: int, buf: memoryview, stop: int) -> None:
        header = self._header
        cluster_bits = header.cluster_bits
        cluster_mask = header.cluster_size - 1
        span_bits = header.l1_shift
        l2_mask = header.table_entries - 1
        runs = Runs(self._file, self._backing, base, buf)
        pos = 0
        while pos < stop:
            guest = base + pos
            l1_index = guest >> span_bits
            span_end = min(stop, ((l1_index + 1) << span_bits) - base)
            l2_offset = self._l1[l1_index]
            if l2_offset == UNALLOCATED:
                runs.add(Runs.PARENT, pos, span_end - pos)
                pos = span_end
                continue
            if not header.table_offset_valid(l2_offset):
                raise self._error(
                    f"qed L2 table offset {l2_offset:#x} is invalid (L1 index {l1_index})"
                )
            index = (guest >> cluster_bits) & l2_mask
            while pos < span_end:
                piece = self._l2_piece(l2_offset, index // PIECE_ENTRIES)
                in_cluster = (base + pos) & cluster_mask
                n = min(cluster_mask + 1 - in_cluster, span_end - pos)
                entry = piece[index % PIECE_ENTRIES]
                if entry == UNALLOCATED:
                    runs.add(Runs.PARENT, pos, n)
                elif entry == ZERO_CLUSTER:
                    runs.add(Runs.ZERO, pos, n)
                elif header.cluster_offset_valid(entry):
                    runs.add(Runs.DATA, pos, n, entry + in_cluster)
                else:
                    raise self._error(
                        f"qed data cluster offset {entry:#x} is invalid"
                        f" (L2 table at {l2_offset:#x}, index {index})"
                    )
                pos += n
                index += 1
        runs.flush()


def open_disk(file: RandomAccessFile, resolver: Resolver) -> QedDisk:
    name = file.name
    header = layout.parse_header(file.pread(0, layout.HEADER_SIZE), file.size, name)
    # Inside the file (table_offset_valid), and no larger than the table.
    l1 = layout.le64_table(file.pread(header.l1_table_offset, header.l1_entries * 8))
    backing: VirtualDisk | None = None
    if header.has_backing_file and header.backing_filename_size:
        raw = file.pread(header.backing_filename_offset, header.backing_filename_size)
        backing_file = layout.backing_name(raw)
        if backing_file is not None:
            ref = Reference("backing", backing_file, name, header.backing_format)
            backing = resolver.open_disk(ref)
    return QedDisk(file, header, l1, backing)
