"""parallels: an expanding image, read as qemu 7.2 reads it (docs/formats.md#parallels).

Detection is qemu's: either magic, then version 2.  A cluster the BAT names is read
from the file (zeros where the file ends inside it); an absent cluster, or one past the
BAT's end, reads as zeros.  Every cluster the virtual disk reaches is checked at open:
it must start inside the file and after the BAT.
"""

from __future__ import annotations

from array import array

from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk
from aiodd.formats.common import naming, zero_fill
from aiodd.formats.parallels import layout as L

NAME = L.NAME
probe = L.probe


class ParallelsDisk:
    format_name = NAME

    def __init__(self, file: RandomAccessFile, header: L.Header, bat: array[int]) -> None:
        self._file = file
        self._virtual_size = header.virtual_size
        self._cluster = header.cluster_size
        self._unit = header.entry_unit
        self._bat = bat

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    def _host(self, index: int) -> int:
        """Where cluster ``index`` starts in the file; 0 for an absent cluster."""
        entry = self._bat[index] if index < len(self._bat) else L.UNALLOCATED
        return entry * self._unit

    def read_into(self, offset: int, buf: memoryview) -> None:
        cs = self._cluster
        pos, total = 0, len(buf)
        while pos < total:
            index, within = divmod(offset + pos, cs)
            host = self._host(index)
            n = min(cs - within, total - pos)
            # Clusters that follow each other in the file are one read.
            prev = host
            while pos + n < total:
                following = self._host(index + 1)
                if (prev == 0) != (following == 0) or (prev and following != prev + cs):
                    break
                index += 1
                prev = following
                n = min(n + cs, total - pos)
            view = buf[pos : pos + n]
            if host == 0:
                zero_fill(view)
            else:
                got = self._file.readinto(host + within, view)
                if got < n:
                    zero_fill(view[got:])
            pos += n

    def close(self) -> None:
        self._file.close()


def open_disk(file: RandomAccessFile, resolver: Resolver) -> VirtualDisk:
    with naming(file.name, NAME):
        header = L.parse_header(file.pread(0, L.HEADER_SIZE))
        L.check_extents(header, file.size)
        bat = L.parse_bat(file.pread(L.HEADER_SIZE, 4 * header.used_entries), header.used_entries)
        L.check_bat(header, bat, file.size)
    return ParallelsDisk(file, header, bat)
