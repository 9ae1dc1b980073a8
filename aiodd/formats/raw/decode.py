"""raw input: the file is the disk, read through its holes when it knows them."""

from __future__ import annotations

from aiodd.formats.raw import layout as L
from aiodd.formats.zeros import zero_fill

# Only the modules above at run time: a guest that reads a raw input imports this
# module alone of the decoders, without base's and common's typing and threading
# (docs/performance.md, "Start-up").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from aiodd.formats.base import RandomAccessFile, Resolver

    class _ReadSparse(Protocol):
        """A :class:`~aiodd.formats.base.SparseFile`'s ``readinto_sparse``, bound."""

        def __call__(
            self, offset: int, buf: memoryview, holes: list[tuple[int, int]] | None = None, /
        ) -> int: ...


NAME = L.NAME
probe = L.probe


class RawDisk:
    format_name = NAME

    def __init__(self, file: RandomAccessFile) -> None:
        self._file = file
        self._virtual_size = L.virtual_size(file.size)
        # A file that knows its holes (base.SparseFile) reads through them.  Asked once,
        # as the Protocol's isinstance would (it only looks for the method).
        self._sparse: _ReadSparse | None = getattr(file, "readinto_sparse", None)
        self._readinto = file.readinto if self._sparse is None else self._sparse

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
            n = self._sparse(offset, buf, holes)
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
