"""parallels: an expanding image, read as qemu 7.2 reads it (docs/formats.md#parallels).

Detection is qemu's: either magic, then version 2.  A cluster the BAT names is read
from the file (zeros where the file ends inside it); an absent cluster, or one past the
BAT's end, reads as zeros.  A cluster a read reaches must start inside the file and
after the BAT, or the read fails naming its entry.
"""

from __future__ import annotations

from array import array

from aiodd.formats.common import naming, zero_fill
from aiodd.formats.parallels import layout as L

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk

NAME = L.NAME
probe = L.probe
_BAT_PIECE = 1 << 20  # entries per read of the BAT


class ParallelsDisk:
    format_name = NAME

    def __init__(
        self, file: RandomAccessFile, header: L.Header, bat: array[int], file_size: int
    ) -> None:
        self._file = file
        self._header = header
        self._virtual_size = header.virtual_size
        self._cluster = header.cluster_size
        self._bat = bat
        self._file_size = file_size

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    def _host(self, index: int) -> int:
        """Where cluster ``index`` starts in the file; 0 for an absent cluster."""
        entry = self._bat[index] if index < len(self._bat) else L.UNALLOCATED
        if entry == L.UNALLOCATED:
            return 0
        return L.cluster_at(index, entry, self._header, self._file_size)

    def read_into(self, offset: int, buf: memoryview) -> None:
        with naming(self._file.name, NAME):
            self._read(offset, buf)

    def _read(self, offset: int, buf: memoryview) -> None:
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


def _read_bat(file: RandomAccessFile, entries: int) -> array[int]:
    """The first ``entries`` entries, read in pieces: a large BAT is held once, as
    integers, and never also as one bytes object."""
    bat: array[int] = array("I")
    for first in range(0, entries, _BAT_PIECE):
        n = min(_BAT_PIECE, entries - first)
        bat.extend(L.parse_bat(file.pread(L.HEADER_SIZE + 4 * first, 4 * n), n))
    return bat


def open_disk(file: RandomAccessFile, resolver: Resolver) -> VirtualDisk:
    with naming(file.name, NAME):
        header = L.parse_header(file.pread(0, L.HEADER_SIZE))
        L.check_extents(header, file.size)
    bat = _read_bat(file, header.used_entries)
    return ParallelsDisk(file, header, bat, file.size)
