"""Local files behind the :class:`~aiodd.formats.base.RandomAccessFile` interface (with
the :class:`~aiodd.formats.base.SparseFile` capability)."""

from __future__ import annotations

import errno
import os

from aiodd.formats.zeros import zero_fill

# The guest process imports this module: functools and collections would cost its
# start-up milliseconds (docs/performance.md, "Start-up").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from aiodd.formats.base import RandomAccessFile

_libc_functions: dict[tuple[tuple[str, ...], tuple[str, ...]], Callable[..., int] | None] = {}


# ctypes is loaded on first use, not at import: it costs a copy 2 ms of start-up, and a
# copy that needs no libc function (a -t unsafe one) does not pay it.
def libc_function(names: tuple[str, ...], argtypes: tuple[str, ...]) -> Callable[..., int] | None:
    """The first of libc's ``names`` that exists, for what Python's os module does not
    offer: taking ``argtypes`` (ctypes type names), returning a C int, keeping
    ``errno``; None where libc has none of them.  Looked up once."""
    key = (names, argtypes)
    if key not in _libc_functions:
        _libc_functions[key] = _libc_function(names, argtypes)
    return _libc_functions[key]


def _libc_function(names: tuple[str, ...], argtypes: tuple[str, ...]) -> Callable[..., int] | None:
    import ctypes

    try:
        # The process's own symbols: find_library would run ldconfig at every start-up.
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc
        return None
    for name in names:
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.argtypes = [getattr(ctypes, t) for t in argtypes]
            fn.restype = ctypes.c_int
            return fn  # type: ignore[no-any-return]
    return None


def buffer_address(view: memoryview) -> int | None:
    """Where ``view``'s bytes are in memory; None for a read-only buffer."""
    import ctypes

    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


def filesystem_magic(fd: int) -> int | None:
    """The filesystem type of ``fd`` (``fstatfs().f_type``), or None if unknown."""
    import ctypes  # only the host asks; the guest never imports it

    fstatfs = libc_function(("fstatfs",), ("c_int", "c_void_p"))
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is the first field
    if fstatfs is None or fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


# A hole shorter than this, followed by data in the same read, is read rather than
# zeroed in memory (docs/performance.md, "Where the holes are").
SMALL_HOLE = 16 * 1024

SPARSE_MIN = 256 << 10
"""A read this long asks where the file's holes are (two ``lseek`` calls)."""


def read_through_holes(file: RandomAccessFile, offset: int, buf: memoryview) -> int:
    """Fill ``buf`` from ``file`` at ``offset``: how many bytes lie before its end.

    A read of :data:`SPARSE_MIN` or more zeroes the holes of a file that knows them
    (:meth:`LocalFile.readinto_sparse`) instead of reading them: reading a hole makes
    the kernel zero a page-cache page per 4 KiB, several times slower.  The method is
    looked up, not ``isinstance(file, SparseFile)``: a Protocol's isinstance walks its
    members, about 25 µs a call."""
    sparse = getattr(file, "readinto_sparse", None)
    if len(buf) >= SPARSE_MIN and sparse is not None:
        got: int = sparse(offset, buf)
        return got
    return file.readinto(offset, buf)


class LocalFile:
    """A read-only descriptor read with ``pread``; safe to share between threads."""

    def __init__(self, fd: int, name: str, *, owned: bool = True) -> None:
        self._fd = fd
        self._name = name
        self._owned = owned
        # lseek, not fstat: a block device's st_size is 0.
        self._size = os.lseek(fd, 0, os.SEEK_END)
        # The last data and hole the kernel reported, as [start, end) (readinto_sparse).
        self._data_seen = (0, 0)
        self._hole_seen = (0, 0)

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
        if offset >= self._size:  # also keeps an image's 2**64 offsets away from the kernel
            return b""
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
        if offset >= self._size:
            return 0
        done = 0
        total = len(buf)
        while done < total:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def readinto_sparse(
        self, offset: int, buf: memoryview, holes: list[tuple[int, int]] | None = None
    ) -> int:
        """Like :meth:`readinto`, but holes are zeroed here rather than read.

        Reading a hole makes the kernel zero a page-cache page for every 4 KiB of it,
        several times slower than zeroing our buffer; ``SEEK_DATA``/``SEEK_HOLE`` tell
        where the holes are.  Returns the bytes filled before the end of the file; each
        hole zeroed is appended to ``holes``, if given, as ``(start, length)`` in ``buf``.
        A hole of less than :data:`SMALL_HOLE` after data is the exception: two lookups
        and a read per hole of a block or two cost more than the kernel's zeroing, so
        from there on the read is a plain one (its holes are not reported).

        The last data and hole the kernel reported are remembered, and a read inside
        them asks nothing: ``SEEK_HOLE`` searches to the next hole, however far, and on
        ext4 a file with unwritten extents in the page cache (a preallocated image, as
        qemu-img makes parallels and ``preallocation=falloc`` images) costs it a walk
        of those pages every time, about 3 ms a call on a GiB (docs/performance.md,
        "Where the holes are").  An input does not change while it is read: its lock
        keeps writers out.
        """
        end = min(offset + len(buf), self._size)
        pos = offset
        while pos < end:
            # Where the data at or after pos begins: known, or asked.
            start, stop = self._data_seen  # one tuple: a thread reads it whole
            if start <= pos < stop:
                data = pos
            else:
                start, stop = self._hole_seen
                if start < stop and start <= pos <= stop:  # in it, or where its data begins
                    data = stop
                else:
                    try:
                        data = os.lseek(self._fd, pos, os.SEEK_DATA)
                    except OSError as exc:
                        if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                            data = self._size
                        elif exc.errno == errno.EINVAL:  # SEEK_DATA unsupported: plain reads
                            return (
                                pos - offset + self.readinto(pos, buf[pos - offset : end - offset])
                            )
                        else:
                            raise
                    if data > pos:
                        self._hole_seen = (pos, data)
            if data > pos:
                if offset < pos and data < min(end, pos + SMALL_HOLE):
                    # Only a hole that begins where this read's data ended is known to
                    # be small: one the read starts in may have begun long before.
                    return pos - offset + self.readinto(pos, buf[pos - offset : end - offset])
                data = min(data, end)
                zero_fill(buf[pos - offset : data - offset])
                if holes is not None:
                    holes.append((pos - offset, data - pos))
                pos = data
                if pos >= end:
                    break
            # Where the data at pos ends.
            start, stop = self._data_seen
            if start <= pos < stop:
                hole = stop
            else:
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
                self._data_seen = (pos, hole)
            hole = min(hole, end)
            n = self.readinto(pos, buf[pos - offset : hole - offset])
            pos += n
            if pos < hole:  # the file shrank under us
                break
        return pos - offset

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __repr__(self) -> str:
        return f"LocalFile({self._name!r}, size={self._size})"
