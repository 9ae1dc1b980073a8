"""qcow (version 1) input, as QEMU 7.2 reads it read-only.

The header is parsed by :mod:`aiodd.formats.qcow.layout`; this module maps virtual
ranges through the L1 table (held whole, its size bounded by the file's) and the L2
tables (kept in a bounded LRU under a lock, so two threads may read at once).  An
unallocated cluster reads from the backing file, or as zeros without one; a compressed
cluster is inflated, outside the lock.
"""

from __future__ import annotations

from array import array

from aiodd.formats.common import SECTOR, MappedDisk, Runs, TableCache
from aiodd.formats.qcow import layout
from aiodd.formats.qcow.layout import OFLAG_COMPRESSED, Header
from aiodd.formats.qcow2.layout import be64_table
from aiodd.formats.reference import Reference

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk

NAME = layout.NAME
probe = layout.probe
L2_CACHE_BYTES = 8 * 1024 * 1024


class QcowDisk(MappedDisk):
    format_name = NAME

    def __init__(
        self, file: RandomAccessFile, header: Header, l1: array[int], backing: VirtualDisk | None
    ) -> None:
        super().__init__(file, backing, header.virtual_size)
        self._header = header
        self._l1 = l1
        self._cache: TableCache[int, array[int]] = TableCache(
            max(1, L2_CACHE_BYTES >> (header.l2_bits + 3))
        )

    @property
    def header(self) -> Header:
        return self._header

    def _l2_table(self, l2_offset: int) -> array[int]:
        return self._cache.get(l2_offset, lambda: self._load_l2(l2_offset))

    def _load_l2(self, l2_offset: int) -> array[int]:
        if l2_offset >= self._file.size:
            raise self._error(f"qcow L2 table at {l2_offset:#x} lies past the end of the file")
        length = 8 << self._header.l2_bits
        raw = self._file.pread(l2_offset, length)
        return be64_table(raw.ljust(length, b"\0"))  # zeros past the end, as qemu reads

    def _read(self, base: int, buf: memoryview, stop: int) -> None:
        header = self._header
        cluster_bits = header.cluster_bits
        cluster_mask = (1 << cluster_bits) - 1
        span_bits = cluster_bits + header.l2_bits
        l2_mask = (1 << header.l2_bits) - 1
        file_size = self._file.size
        runs = Runs(self._file, self._backing, base, buf)
        pos = 0
        while pos < stop:
            guest = base + pos
            l1_index = guest >> span_bits
            span_end = min(stop, ((l1_index + 1) << span_bits) - base)
            l2_offset = self._l1[l1_index]
            if not l2_offset:
                runs.add(Runs.PARENT, pos, span_end - pos)
                pos = span_end
                continue
            table = self._l2_table(l2_offset)
            index = (guest >> cluster_bits) & l2_mask
            while pos < span_end:
                in_cluster = (base + pos) & cluster_mask
                n = min(cluster_mask + 1 - in_cluster, span_end - pos)
                entry = table[index]
                if not entry:
                    runs.add(Runs.PARENT, pos, n)
                elif entry & OFLAG_COMPRESSED:
                    runs.flush()
                    self._compressed(entry, buf[pos : pos + n], in_cluster)
                else:
                    if entry & (SECTOR - 1):
                        raise self._error(
                            f"qcow data cluster offset {entry:#x} is not sector aligned"
                            f" (L2 table at {l2_offset:#x}, index {index})"
                        )
                    if entry >= file_size:
                        raise self._error(
                            f"qcow data cluster at {entry:#x} lies past the end of the file"
                        )
                    runs.add(Runs.DATA, pos, n, entry + in_cluster)
                pos += n
                index += 1
        runs.flush()

    def _compressed(self, entry: int, view: memoryview, in_cluster: int) -> None:
        cluster_bits = self._header.cluster_bits
        host, length = layout.compressed_location(entry, cluster_bits)
        file = self._file
        if host >= file.size:
            raise self._error(f"qcow compressed cluster at {host:#x} lies past the end of the file")
        raw = file.pread(host, length).ljust(length, b"\0")
        out = layout.decompress_cluster(raw, 1 << cluster_bits, file.name, host)
        view[:] = memoryview(out)[in_cluster : in_cluster + len(view)]


def open_disk(file: RandomAccessFile, resolver: Resolver) -> QcowDisk:
    name = file.name
    header = layout.parse_header(file.pread(0, layout.HEADER_SIZE), file.size, name)
    l1_bytes = header.l1_size * 8
    l1 = be64_table(file.pread(header.l1_table_offset, l1_bytes))
    backing: VirtualDisk | None = None
    if header.backing_file_offset:
        size = header.backing_file_size
        # Past the file's end the name reads as zeros (as qemu reads it): no backing file.
        inside = size and header.backing_file_offset < file.size
        raw = file.pread(header.backing_file_offset, size) if inside else b""
        backing_file = layout.backing_name(raw)
        if backing_file is not None:
            backing = resolver.open_disk(Reference("backing", backing_file, name))
    return QcowDisk(file, header, l1, backing)
