"""Stage 4, the file sink: writes the container and puts it in place atomically.

The output is written to a temporary file beside ``of=`` and renamed over it only once
complete and fsynced, so ``of=`` is either the whole new image or what it was before.
An existing block device is the exception: it is written in place.

Aligned data goes out through a second, ``O_DIRECT`` descriptor.  The fsync that
SPEC §6 requires makes the copy wait for the disk anyway, so staging the output in
the page cache only adds a memory copy per byte and fills memory with pages nobody
will read; on these VMs, taking fresh page-cache pages is also what made half of
the buffered copies two to three times slower.  Whatever the filesystem refuses to
take directly (unaligned pieces, small metadata) is written through the page cache,
and so is everything on a filesystem that is not a local disk's (NFS, tmpfs, FUSE...).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from aiodd.errors import OutputError, UsageError
from aiodd.io import filesystem_magic
from aiodd.pipeline.buffers import BufferPool
from aiodd.pipeline.progress import ProgressMeter
from aiodd.stages.encoder import Bytes, WriteOp


def _load_sync_file_range() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's sync_file_range, which Python's os module does not offer."""
    try:
        # The process's own symbols: find_library would run ldconfig at every start-up.
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2

# O_DIRECT needs the file offset, the length and the memory address aligned to the
# device's logical block.  512 is the common case; a device that wants 4096 says so
# with EINVAL, and the writer moves up once before giving O_DIRECT up.
_DIRECT_ALIGNMENTS = (512, 4096)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# Local disk filesystems, where a large O_DIRECT write goes to the device as it is.
# Elsewhere it can cost more than it saves: on NFS each one is a synchronous round
# trip, on tmpfs there is no disk to go to.
DIRECT_FILESYSTEMS = {
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
}


def _open_direct(path: str, fd: int, *, device: bool) -> int | None:
    """A second, ``O_DIRECT`` descriptor on ``path`` (open as ``fd``), or None."""
    if not _O_DIRECT:
        return None
    if not device and filesystem_magic(fd) not in DIRECT_FILESYSTEMS:
        return None
    try:
        return os.open(path, os.O_WRONLY | _O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


def _address(view: memoryview) -> int | None:
    """Where ``view``'s bytes are in memory; None for read-only buffers (never aligned)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


def direct_length(offset: int, length: int, address: int | None, alignment: int) -> int:
    """How many leading bytes of a write can go through O_DIRECT (a multiple of ``alignment``)."""
    if address is None or offset % alignment or address % alignment:
        return 0
    return length - length % alignment


class OutputFile:
    """The destination being written: a temporary file, or a block device."""

    def __init__(self, fd: int, path: str, temp_path: str | None) -> None:
        self.fd = fd
        self.path = path
        self.temp_path = temp_path  # None: written in place (a block device)
        self.direct_fd = _open_direct(temp_path or path, fd, device=temp_path is None)
        self._alignment = 0
        self.direct_bytes = 0  # written through O_DIRECT, for tests and the bench

    @classmethod
    def create(cls, path: str, size: int, *, raw: bool) -> OutputFile:
        if not path:
            raise UsageError("of= names no file")
        # Like qemu, write through a symlink to the file it names.
        target = os.path.realpath(path)
        try:
            st: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise OutputError(f"{path}: cannot create output: {exc.strerror}") from None
        if st is not None and stat.S_ISBLK(st.st_mode):
            return cls._open_device(path, target, size, raw=raw)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{path}: cannot create output: not a regular file or block device")
        directory, base = os.path.split(target)
        temp = os.path.join(directory, f".{base}.{os.urandom(4).hex()}.aiodd-tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create output: {exc.strerror}") from None
        if st is not None:
            # Replacing a file: keep its permissions, as writing into it would.
            with contextlib.suppress(OSError):
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
        return cls(fd, target, temp)

    @classmethod
    def _open_device(cls, path: str, target: str, size: int, *, raw: bool) -> OutputFile:
        if not raw:
            raise UsageError(f"{path}: only raw output can be written into a block device")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OutputError(f"{path}: cannot open output device: {exc.strerror}") from None
        capacity = os.lseek(fd, 0, os.SEEK_END)
        if capacity < size:
            os.close(fd)
            raise OutputError(f"{path}: the device holds {capacity} bytes, the output needs {size}")
        return cls(fd, target, None)

    def write(self, writes: list[tuple[int, Bytes]]) -> None:
        try:
            for offset, data in writes:
                view = memoryview(data).cast("B")
                done = self._write_direct(offset, view) if self.direct_fd is not None else 0
                if done < len(view):
                    self._write_buffered(offset + done, view[done:])
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed: {exc.strerror}") from None

    def _write_direct(self, offset: int, view: memoryview) -> int:
        """Write what O_DIRECT takes of ``view``; return how many bytes that was."""
        assert self.direct_fd is not None
        address = _address(view)
        while True:
            alignment = _DIRECT_ALIGNMENTS[self._alignment]
            length = direct_length(offset, len(view), address, alignment)
            if not length:
                return 0
            try:
                done = 0
                while done < length:
                    n = os.pwrite(self.direct_fd, view[done:length], offset + done)
                    done += n
                    if n % alignment:
                        break  # a short, odd write: the rest goes buffered
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The filesystem wants a coarser alignment, or no O_DIRECT at all.
                # Returning 0 makes the buffered path redo the whole piece.
                if self._alignment + 1 < len(_DIRECT_ALIGNMENTS):
                    self._alignment += 1
                    continue
                self._stop_direct()
                return 0
            self.direct_bytes += done
            return done

    def _write_buffered(self, offset: int, view: memoryview) -> None:
        start = offset
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
        if _sync_file_range is not None and offset - start >= 1 << 20:
            # Start writeback now, so the fsync before the rename finds little
            # left to do: flushing overlaps copying instead of following it.
            _sync_file_range(self.fd, start, offset - start, _SYNC_FILE_RANGE_WRITE)

    def _stop_direct(self) -> None:
        if self.direct_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.direct_fd)
            self.direct_fd = None

    def commit(self, size: int) -> None:
        """Finish the file at ``size`` bytes, make it durable and put it in place."""
        try:
            if self.temp_path is not None:
                os.ftruncate(self.fd, size)
            # fsync works on the inode: it covers what went through either descriptor.
            os.fsync(self.fd)
            self._stop_direct()
            os.close(self.fd)
            self.fd = -1
            if self.temp_path is not None:
                os.rename(self.temp_path, self.path)
                self.temp_path = None
                dir_fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot finish output: {exc.strerror}") from None

    def abort(self) -> None:
        """Forget the output: the temporary file goes, ``of=`` stays as it was."""
        self._stop_direct()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.temp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp_path)
            self.temp_path = None


async def sink_stream(
    output: OutputFile,
    pool: BufferPool,
    receive: MemoryObjectReceiveStream[WriteOp],
    meter: ProgressMeter,
) -> None:
    async with receive:
        async for op in receive:
            try:
                await anyio.to_thread.run_sync(output.write, op.writes)
            finally:
                if op.chunk is not None:
                    pool.release(op.chunk.buffer)
            if op.data_bytes:
                meter.advance(op.data_bytes)
