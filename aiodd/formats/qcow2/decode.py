"""qcow2 input: versions 2 and 3, as QEMU reads them read-only.

The header is parsed by :mod:`aiodd.formats.qcow2.layout` (no I/O); this module maps
virtual ranges through the L1 and L2 tables and reads them.  A read is split into runs
of one kind -- data (physically contiguous clusters, one ``readinto`` straight into the
caller's buffer), zeros, backing (unallocated: the backing disk or zeros) and
compressed clusters (inflated one by one, outside any lock).  L2 tables are kept in a
bounded LRU guarded by a lock, so two threads may read disjoint ranges at once.
"""

from __future__ import annotations

from array import array

from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats import INPUT_FORMATS
from aiodd.formats.common import MappedDisk, TableCache, read_parent, zero_fill
from aiodd.formats.qcow2 import layout
from aiodd.formats.qcow2.layout import (
    ALL_ALLOC,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Header,
)
from aiodd.formats.reference import Reference

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk

NAME = layout.NAME
probe = layout.probe
L2_CACHE_BYTES = 32 * 1024 * 1024


# Run kinds.
_NONE, _DATA, _ZERO, _BACKING = 0, 1, 2, 3
_SPECIAL = OFLAG_COMPRESSED | OFLAG_ZERO


def _zero_fill(buf: memoryview, start: int, stop: int) -> None:
    zero_fill(buf[start:stop])


class Qcow2Disk(MappedDisk):
    format_name = NAME

    def __init__(
        self,
        file: RandomAccessFile,
        header: Header,
        l1: array[int],
        data_file: RandomAccessFile | None,
        backing: VirtualDisk | None,
    ) -> None:
        super().__init__(file, backing, header.virtual_size)
        self._header = header
        self._l1 = l1
        self._data = data_file if data_file is not None else file
        self._external = data_file is not None
        self._cluster_bits = header.cluster_bits
        self._l2_bits = header.l2_bits
        self._extended = header.extended_l2
        self._v2 = header.version < 3
        self._cache: TableCache[int, array[int]] = TableCache(
            max(1, L2_CACHE_BYTES >> header.cluster_bits)
        )

    @property
    def header(self) -> Header:
        return self._header

    def close(self) -> None:
        if self._external:
            self._data.close()
        super().close()

    # -- L2 tables ---------------------------------------------------------------------

    def _l2_table(self, l2_offset: int, l1_index: int) -> array[int]:
        return self._cache.get(l2_offset, lambda: self._load_l2(l2_offset, l1_index))

    def _load_l2(self, l2_offset: int, l1_index: int) -> array[int]:
        cluster_size = 1 << self._cluster_bits
        if l2_offset & (cluster_size - 1):
            raise self._error(
                f"qcow2 L2 table offset {l2_offset:#x} is not cluster aligned (L1 index {l1_index})"
            )
        if l2_offset >= self._file.size:
            raise self._error(f"qcow2 L2 table at {l2_offset:#x} lies past the end of the file")
        raw = self._file.pread(l2_offset, cluster_size)
        if len(raw) < cluster_size:  # qemu reads zeros past the end of the file
            raw += bytes(cluster_size - len(raw))
        return layout.be64_table(raw)

    # -- reading -------------------------------------------------------------------------

    def _read(self, base: int, buf: memoryview, stop: int) -> None:
        _Reader(self, base, buf).run(stop)


class _Reader:
    """One ``read_into`` call: walks the tables and issues coalesced runs."""

    __slots__ = ("buf", "disk", "kind", "length", "offset", "source", "start")

    def __init__(self, disk: Qcow2Disk, offset: int, buf: memoryview) -> None:
        self.disk = disk
        self.offset = offset  # the guest offset of buf[0]
        self.buf = buf
        self.kind = _NONE  # the pending run
        self.start = 0  # its position in buf
        self.length = 0
        self.source = 0  # its data-file offset (data) or guest offset (backing)

    def add(self, kind: int, start: int, length: int, source: int) -> None:
        if kind == self.kind and (kind != _DATA or self.source + self.length == source):
            self.length += length
            return
        self.flush()
        self.kind, self.start, self.length, self.source = kind, start, length, source

    def flush(self) -> None:
        kind, start, length, source = self.kind, self.start, self.length, self.source
        self.kind = _NONE
        if kind == _NONE:
            return
        buf = self.buf
        if kind == _DATA:
            n = self.disk._data.readinto(source, buf[start : start + length])
            if n < length:  # a cluster that starts inside the file but ends past it
                _zero_fill(buf, start + n, start + length)
        elif kind == _ZERO:
            _zero_fill(buf, start, start + length)
        else:
            read_parent(self.disk._backing, source, buf[start : start + length])

    def run(self, stop: int) -> None:
        disk = self.disk
        cluster_bits = disk._cluster_bits
        cluster_size = 1 << cluster_bits
        l2_span_bits = cluster_bits + disk._l2_bits
        l2_mask = (1 << disk._l2_bits) - 1
        l1 = disk._l1
        base = self.offset
        cluster_mask = cluster_size - 1
        extended = disk._extended
        # With an external data file every cluster needs the 1:1 check: no fast path.
        fast_limit = 0 if disk._external else disk._data.size
        pos = 0
        while pos < stop:
            guest = base + pos
            l1_index = guest >> l2_span_bits
            span_end = min(stop, ((l1_index + 1) << l2_span_bits) - base)
            l2_offset = l1[l1_index] & L1E_OFFSET_MASK
            if not l2_offset:
                self.add(_BACKING, pos, span_end - pos, guest)
                pos = span_end
                continue
            table = disk._l2_table(l2_offset, l1_index)
            index = (guest >> cluster_bits) & l2_mask
            while pos < span_end:
                in_cluster = (base + pos) & cluster_mask
                n = min(cluster_size - in_cluster, span_end - pos)
                if extended:
                    self._extended_entry(
                        table[2 * index], table[2 * index + 1], l2_offset, index, pos, n
                    )
                else:
                    entry = table[index]
                    host = entry & L2E_OFFSET_MASK
                    if (
                        host
                        and not entry & _SPECIAL
                        and not host & cluster_mask
                        and host < fast_limit
                    ):
                        # The common case, inline: a plain allocated cluster.
                        source = host + in_cluster
                        if self.kind == _DATA and self.source + self.length == source:
                            self.length += n
                        else:
                            self.add(_DATA, pos, n, source)
                    else:
                        self._entry(entry, l2_offset, index, pos, n)
                pos += n
                index += 1
        self.flush()

    def _host_cluster(self, entry: int, l2_offset: int, index: int, guest_cluster: int) -> int:
        disk = self.disk
        host = entry & L2E_OFFSET_MASK
        if host & ((1 << disk._cluster_bits) - 1):
            raise disk._error(
                f"qcow2 data cluster offset {host:#x} is not cluster aligned"
                f" (L2 table at {l2_offset:#x}, index {index})"
            )
        if disk._external and host != guest_cluster:
            raise disk._error(
                f"qcow2 data cluster at {host:#x} in the external data file does not match"
                f" its guest offset {guest_cluster:#x}"
            )
        return host

    def _past_end(self, host: int) -> ImageError:
        disk = self.disk
        where = f"data file '{disk._data.name}'" if disk._external else "file"
        return disk._error(f"qcow2 data cluster at {host:#x} lies past the end of the {where}")

    def _entry(self, entry: int, l2_offset: int, index: int, pos: int, n: int) -> None:
        disk = self.disk
        guest = self.offset + pos
        if entry & OFLAG_COMPRESSED:
            self._compressed(entry, l2_offset, index, pos, n)
        elif entry & OFLAG_ZERO:
            if disk._v2:
                raise disk._error(
                    f"qcow2 zero cluster flag in a version 2 image"
                    f" (L2 table at {l2_offset:#x}, index {index})"
                )
            self.add(_ZERO, pos, n, 0)
        elif not entry & L2E_OFFSET_MASK and not (disk._external and entry & OFLAG_COPIED):
            self.add(_BACKING, pos, n, guest)
        else:
            cluster_mask = (1 << disk._cluster_bits) - 1
            host = self._host_cluster(entry, l2_offset, index, guest & ~cluster_mask)
            if host >= disk._data.size:
                raise self._past_end(host)
            self.add(_DATA, pos, n, host + (guest & cluster_mask))

    def _extended_entry(
        self, entry: int, bitmap: int, l2_offset: int, index: int, pos: int, n: int
    ) -> None:
        disk = self.disk
        guest = self.offset + pos
        if entry & OFLAG_COMPRESSED:
            self._compressed(entry, l2_offset, index, pos, n)
            return
        cluster_mask = (1 << disk._cluster_bits) - 1
        alloc = bitmap & ALL_ALLOC
        zero = bitmap >> 32
        allocated = bool(entry & L2E_OFFSET_MASK) or bool(disk._external and entry & OFLAG_COPIED)
        if (alloc & zero) if allocated else alloc:
            raise disk._error(
                f"qcow2 extended L2 entry has an invalid subcluster bitmap {bitmap:#018x}"
                f" (L2 table at {l2_offset:#x}, index {index})"
            )
        host = (
            self._host_cluster(entry, l2_offset, index, guest & ~cluster_mask) if allocated else 0
        )
        if not zero and alloc == (ALL_ALLOC if allocated else 0):
            if not allocated:
                self.add(_BACKING, pos, n, guest)
                return
            if host >= disk._data.size:
                raise self._past_end(host)
            self.add(_DATA, pos, n, host + (guest & cluster_mask))
            return
        sc_bits = disk._cluster_bits - 5
        sc_size = 1 << sc_bits
        end = pos + n
        while pos < end:
            guest = self.offset + pos
            in_cluster = guest & cluster_mask
            sc = in_cluster >> sc_bits
            m = min(sc_size - (in_cluster & (sc_size - 1)), end - pos)
            if zero >> sc & 1:
                self.add(_ZERO, pos, m, 0)
            elif alloc >> sc & 1:
                sc_host = host + (sc << sc_bits)
                if sc_host >= disk._data.size:
                    raise self._past_end(sc_host)
                self.add(_DATA, pos, m, host + in_cluster)
            else:
                self.add(_BACKING, pos, m, guest)
            pos += m

    def _compressed(self, entry: int, l2_offset: int, index: int, pos: int, n: int) -> None:
        disk = self.disk
        if disk._external:
            raise disk._error(
                f"qcow2 compressed cluster in an image with an external data file"
                f" (L2 table at {l2_offset:#x}, index {index})"
            )
        cluster_bits = disk._cluster_bits
        host, length = layout.compressed_location(entry, cluster_bits)
        file = disk._file
        if host >= file.size:
            raise disk._error(
                f"qcow2 compressed cluster at {host:#x} lies past the end of the file"
            )
        self.flush()
        raw = file.pread(host, length)
        out = layout.decompress_cluster(
            raw, 1 << cluster_bits, disk._header.compression_type, file.name, host
        )
        in_cluster = (self.offset + pos) & ((1 << cluster_bits) - 1)
        self.buf[pos : pos + n] = memoryview(out)[in_cluster : in_cluster + n]


def open_disk(file: RandomAccessFile, resolver: Resolver) -> Qcow2Disk:
    name = file.name
    cluster_bits = layout.header_cluster_bits(file.pread(0, 24), name)
    header = layout.parse_header(file.pread(0, min(1 << cluster_bits, file.size)), file.size, name)
    l1_bytes = header.l1_entries * 8
    raw = file.pread(header.l1_table_offset, l1_bytes) if l1_bytes else b""
    if len(raw) < l1_bytes:
        raise ImageError(
            name,
            f"qcow2 L1 table at {header.l1_table_offset:#x} extends past the end of the file",
            NAME,
        )
    l1 = layout.be64_table(raw)

    data_file: RandomAccessFile | None = None
    backing: VirtualDisk | None = None
    try:
        if header.data_file is not None:
            data_file = resolver.open_file(Reference("data_file", header.data_file, name))
        if header.backing_file is not None:
            fmt = header.backing_format
            if fmt is not None and fmt not in INPUT_FORMATS:
                raise UnsupportedImageError(
                    name,
                    f"qcow2 backing file '{header.backing_file}' has format '{fmt}',"
                    " which aiodd does not read",
                    NAME,
                )
            backing = resolver.open_disk(Reference("backing", header.backing_file, name, fmt))
    except BaseException:
        if data_file is not None:
            data_file.close()
        raise
    return Qcow2Disk(file, header, l1, data_file, backing)
