"""Stage 4, the file sink: writes the container and puts it in place atomically.

The output is written to a temporary file beside ``of=`` and renamed over it only once
complete and fsynced, so ``of=`` is either the whole new image or what it was before.
An existing block device is the exception: it is written in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from aiodd.errors import OutputError, UsageError
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


class OutputFile:
    """The destination being written: a temporary file, or a block device."""

    def __init__(self, fd: int, path: str, temp_path: str | None) -> None:
        self.fd = fd
        self.path = path
        self.temp_path = temp_path  # None: written in place (a block device)

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
                start = offset
                view = memoryview(data)
                while view:
                    n = os.pwrite(self.fd, view, offset)
                    view = view[n:]
                    offset += n
                if _sync_file_range is not None and offset - start >= 1 << 20:
                    # Start writeback now, so the fsync before the rename finds little
                    # left to do: flushing overlaps copying instead of following it.
                    _sync_file_range(self.fd, start, offset - start, _SYNC_FILE_RANGE_WRITE)
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed: {exc.strerror}") from None

    def commit(self, size: int) -> None:
        """Finish the file at ``size`` bytes, make it durable and put it in place."""
        try:
            if self.temp_path is not None:
                os.ftruncate(self.fd, size)
            os.fsync(self.fd)
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
