"""Local files behind the :class:`~aiodd.formats.base.RandomAccessFile` interface."""

from __future__ import annotations

import os


class LocalFile:
    """A read-only descriptor read with ``pread``; safe to share between threads."""

    def __init__(self, fd: int, name: str, *, owned: bool = True) -> None:
        self._fd = fd
        self._name = name
        self._owned = owned
        # lseek, not fstat: a block device's st_size is 0.
        self._size = os.lseek(fd, 0, os.SEEK_END)

    @classmethod
    def open(cls, path: str, name: str | None = None) -> LocalFile:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls(fd, path if name is None else name)
        except BaseException:
            os.close(fd)
            raise

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        chunks: list[bytes] = []
        while length > 0:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def readinto(self, offset: int, buf: memoryview) -> int:
        done = 0
        total = len(buf)
        while done < total:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __repr__(self) -> str:
        return f"LocalFile({self._name!r}, size={self._size})"
