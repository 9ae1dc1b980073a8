"""raw: the file is the disk.  Its virtual size is the file size rounded up to 512,
as qemu sees it: the tail past the end of the file reads as zeros."""

from __future__ import annotations

from aiodd.formats.base import RandomAccessFile, Resolver
from aiodd.io import LocalFile, zero_fill

NAME = "raw"
SECTOR = 512


def probe(head: bytes) -> int:
    """Anything is a raw disk, with the lowest confidence."""
    return 1


class RawDisk:
    format_name = NAME

    def __init__(self, file: RandomAccessFile) -> None:
        self._file = file
        self._virtual_size = -(-file.size // SECTOR) * SECTOR

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    @property
    def file(self) -> RandomAccessFile:
        return self._file

    def read_into(self, offset: int, buf: memoryview) -> None:
        file = self._file
        if isinstance(file, LocalFile):
            n = file.readinto_sparse(offset, buf)
        else:
            n = file.readinto(offset, buf)
        if n < len(buf):
            zero_fill(buf[n:])

    def close(self) -> None:
        close = getattr(self._file, "close", None)
        if close is not None:
            close()


def open_disk(file: RandomAccessFile, resolver: Resolver) -> RawDisk:
    return RawDisk(file)
