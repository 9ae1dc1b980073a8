"""raw input: the file is the disk, read through its holes when it knows them."""

from __future__ import annotations

from aiodd.formats.base import RandomAccessFile, Resolver, SparseFile
from aiodd.formats.common import zero_fill
from aiodd.formats.raw import layout as L

NAME = L.NAME
probe = L.probe


class RawDisk:
    format_name = NAME

    def __init__(self, file: RandomAccessFile) -> None:
        self._file = file
        self._virtual_size = L.virtual_size(file.size)
        # Asked once: a Protocol's isinstance walks its members, ~25 µs a call.
        self._sparse = file if isinstance(file, SparseFile) else None
        self._readinto = file.readinto if self._sparse is None else self._sparse.readinto_sparse

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    @property
    def file(self) -> RandomAccessFile:
        return self._file

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = self._readinto(offset, buf)
        if n < len(buf):
            zero_fill(buf[n:])

    def read_into_holes(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        """:meth:`read_into`, and the holes it zeroed (the file's, and past its end)."""
        holes: list[tuple[int, int]] = []
        if self._sparse is not None:
            n = self._sparse.readinto_sparse(offset, buf, holes)
        else:
            n = self._file.readinto(offset, buf)
        if n < len(buf):
            zero_fill(buf[n:])
            holes.append((n, len(buf) - n))
        return holes

    def close(self) -> None:
        self._file.close()


def open_disk(file: RandomAccessFile, resolver: Resolver) -> RawDisk:
    return RawDisk(file)
