"""``-t CACHE``: qemu's cache modes for the output (docs/usage.md, "-t CACHE").

What each mode flushes, counted by wrapping ``os.fsync`` and ``os.fdatasync``; where
``copy_file_range`` is used and where it may not be (docs/security.md); the fallback
to the pipeline when the kernel refuses, at the first call or in the middle; progress,
cancellation and signals on the kernel's copy; the output still atomic under
``unsafe``; the command line's spelling; and the bytes against ``qemu-img dd``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

import aiodd
from aiodd import chain, options
from aiodd.cli import parse_args
from aiodd.errors import StageError, UsageError
from aiodd.io import filesystem_magic
from aiodd.stages import sink
from aiodd.stages.sink import DIRECT_FILESYSTEMS, OutputFile
from tests.conftest import needs_qemu
from tests.harness import aiodd_run, leftovers, qemu_dd, virtual_disk

MiB = 1 << 20
CACHES = list(options.CACHE_MODES)
PRECIOUS = b"the old output, which a failed copy leaves as it was\n" * 50
_real_copy_range = os.copy_file_range


def _data(size: int) -> bytes:
    """Bytes that differ at every 4 KiB, so a misplaced piece shows."""
    block = bytes(range(256)) * 16
    pieces = [i.to_bytes(8, "little") + block[8:] for i in range(-(-size // 4096))]
    return b"".join(pieces)[:size]


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    """A raw input whose size is not a multiple of 512: the output gets a zero tail."""
    data = _data(5 * MiB + 1234)
    path = tmp_path / "in.raw"
    path.write_bytes(data)
    return path, data


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


@dataclass
class Calls:
    """What the copy asked of the kernel, by wrapping the os functions the sink calls."""

    fsync_files: int = 0
    fsync_dirs: int = 0
    fdatasync: int = 0
    copy_range: list[tuple[int, int, int]] = field(default_factory=list)  # (length, src, dst)
    refused: list[int] = field(default_factory=list)  # errno of each failed call


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    seen = Calls()
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.fsync_dirs += 1
        else:
            seen.fsync_files += 1
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        seen.fdatasync += 1
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    _wrap_copy_range(monkeypatch, seen, lambda n: None)
    return seen


def _wrap_copy_range(
    monkeypatch: pytest.MonkeyPatch, seen: Calls, fail: Callable[[int], int | None]
) -> None:
    """Count copy_file_range calls; ``fail(n)`` gives an errno to raise at call n (from 1)."""

    def copy_range(src: int, dst: int, length: int, offset_src: int, offset_dst: int) -> int:
        seen.copy_range.append((length, offset_src, offset_dst))
        code = fail(len(seen.copy_range))
        if code is not None:
            seen.refused.append(code)
            raise OSError(code, os.strerror(code))
        try:
            return _real_copy_range(src, dst, length, offset_src, offset_dst)
        except OSError as exc:
            seen.refused.append(exc.errno or 0)
            raise

    monkeypatch.setattr(os, "copy_file_range", copy_range)


def _dd(src: Path, dst: Path, **kwargs: object) -> aiodd.DdResult:
    async def run() -> aiodd.DdResult:
        return await aiodd.dd(src, dst, **kwargs)  # type: ignore[arg-type]

    return anyio.run(run)


# --- what each mode flushes ------------------------------------------------------------

# (fsync of the file, fsync of its directory, an fdatasync after every write)
FLUSHES = {
    "none": (1, 1, False),
    "writeback": (1, 1, False),
    "writethrough": (1, 1, True),
    "directsync": (1, 1, True),
    "unsafe": (0, 0, False),
}


@pytest.mark.parametrize("cache", CACHES)
def test_each_mode_flushes_as_qemus_does(
    cache: str, source: tuple[Path, bytes], tmp_path: Path, calls: Calls
) -> None:
    src, data = source
    out = tmp_path / "out.raw"
    # Sandboxed, as by default: the pipeline, whatever the mode (no -f raw).
    _dd(src, out, cache=cache, io_size=1 * MiB)
    assert out.read_bytes() == _padded(data)
    files, dirs, each = FLUSHES[cache]
    assert (calls.fsync_files, calls.fsync_dirs) == (files, dirs)
    if each:
        assert calls.fdatasync >= len(_padded(data)) // MiB  # one per 1 MiB buffer written
    else:
        assert calls.fdatasync == 0
    assert calls.copy_range == []


def test_unsafe_skips_the_flushes_on_the_kernels_copy_too(
    source: tuple[Path, bytes], tmp_path: Path, calls: Calls
) -> None:
    src, data = source
    out = tmp_path / "out.raw"
    _dd(src, out, cache="unsafe", isolation="inline")
    assert out.read_bytes() == _padded(data)
    assert calls.copy_range and (calls.fsync_files, calls.fsync_dirs, calls.fdatasync) == (0, 0, 0)


def test_writeback_flushes_after_the_kernels_copy(
    source: tuple[Path, bytes], tmp_path: Path, calls: Calls
) -> None:
    src, data = source
    out = tmp_path / "out.raw"
    _dd(src, out, cache="writeback", isolation="inline")
    assert out.read_bytes() == _padded(data)
    assert calls.copy_range and (calls.fsync_files, calls.fsync_dirs) == (1, 1)


@pytest.mark.parametrize("cache", CACHES)
def test_only_none_and_directsync_write_past_the_page_cache(cache: str, tmp_path: Path) -> None:
    probe = os.open(tmp_path, os.O_RDONLY)
    try:
        magic = filesystem_magic(probe)
    finally:
        os.close(probe)
    if magic not in DIRECT_FILESYSTEMS:
        pytest.skip(f"{tmp_path} is not on a local disk filesystem: no O_DIRECT in any mode")
    output = OutputFile.create(str(tmp_path / "o.raw"), 4096, raw=True, cache=cache)  # type: ignore[arg-type]
    try:
        assert (output.direct_fd is not None) == (cache in ("none", "directsync"))
    finally:
        output.abort()


def test_page_cache_writes_go_in_small_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4 MiB buffer reaches the page cache as 128 KiB writes, each at its place
    (docs/performance.md, "Cache modes (-t)": large writes get large, slow folios)."""
    lengths: list[int] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        lengths.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = _data(4 * MiB + 4096 + 100)
    path = tmp_path / "o.raw"
    output = OutputFile.create(str(path), len(data), raw=True, cache="unsafe")
    try:
        output.write([(0, data[: 4 * MiB]), (4 * MiB, memoryview(data)[4 * MiB :])])
        output.commit(len(data))
    finally:
        output.abort()
    assert path.read_bytes() == data
    assert max(lengths) == sink.PAGE_CACHE_PIECE and sum(lengths) == len(data)
    assert len(lengths) == 4 * MiB // sink.PAGE_CACHE_PIECE + 1


# --- where copy_file_range is used -----------------------------------------------------


@pytest.mark.parametrize(
    ("isolation", "input_format", "cache", "used"),
    [
        ("inline", None, "unsafe", True),  # detected raw in this process
        ("inline", None, "writeback", True),
        ("sandbox", "raw", "unsafe", True),  # -f raw: the host knows, without reading
        ("sandbox", None, "unsafe", False),  # detected in the guest: not on its word
        ("inline", None, "none", False),  # the default writes past the page cache
        ("inline", None, "writethrough", False),
        ("inline", None, "directsync", False),
    ],
)
def test_copy_file_range_only_where_allowed(
    isolation: str,
    input_format: str | None,
    cache: str,
    used: bool,
    source: tuple[Path, bytes],
    tmp_path: Path,
    calls: Calls,
) -> None:
    src, data = source
    out = tmp_path / "out.raw"
    _dd(src, out, cache=cache, isolation=isolation, input_format=input_format, bs=1000, skip=3)
    assert out.read_bytes() == _padded(_padded(data)[3000:])
    assert bool(calls.copy_range) == used
    if used:
        # From the window's start, to the output's start; the unaligned tail is the
        # pipeline's.
        assert calls.copy_range[0][1:] == (3000, 0)


def test_a_name_swapped_after_the_open_is_not_copied(
    source: tuple[Path, bytes], tmp_path: Path, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's copy reopens the name: another file there now is never copied."""
    src, data = source
    impostor = tmp_path / "impostor.raw"
    impostor.write_bytes(b"\xee" * len(data))
    real_open = chain.open_input

    def open_then_swap(*args: Any, **kwargs: Any) -> Any:
        disk = real_open(*args, **kwargs)
        os.rename(impostor, src)
        return disk

    monkeypatch.setattr(chain, "open_input", open_then_swap)
    out = tmp_path / "out.raw"
    _dd(src, out, cache="unsafe", isolation="inline")
    assert out.read_bytes() == _padded(data)  # the file the chain opened
    assert calls.copy_range == []


def test_no_copy_file_range_into_another_format(tmp_path: Path, calls: Calls) -> None:
    src = tmp_path / "in.raw"
    src.write_bytes(_data(2 * MiB))
    _dd(src, tmp_path / "o.qcow2", cache="unsafe", isolation="inline", output_format="qcow2")
    assert calls.copy_range == []


def test_chunks_report_progress_and_end_with_the_pipelines_tail(
    source: tuple[Path, bytes], tmp_path: Path, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, data = source
    out = tmp_path / "out.raw"
    monkeypatch.setattr(sink, "CLONE_CHUNK", MiB)
    events: list[aiodd.Progress] = []
    _dd(
        src, out, cache="unsafe", isolation="inline", on_progress=events.append, progress_interval=0
    )
    assert out.read_bytes() == _padded(data)
    assert [c[0] for c in calls.copy_range] == [MiB] * 5
    done = [e.bytes_done for e in events]
    assert done[0] == 0 and done == sorted(done)
    assert {MiB, 2 * MiB, 3 * MiB, 4 * MiB, 5 * MiB} <= set(done)  # one event per chunk
    assert done[-1] == len(_padded(data)) and events[-1].finished


# --- the fallback to the pipeline --------------------------------------------------------

REFUSALS = [errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS]


@pytest.mark.parametrize("at", [1, 3], ids=["first-call", "mid-copy"])
@pytest.mark.parametrize("code", REFUSALS, ids=errno.errorcode.get)
def test_a_refusal_hands_the_rest_to_the_pipeline(
    code: int,
    at: int,
    source: tuple[Path, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, data = source
    out = tmp_path / "out.raw"
    seen = Calls()
    _wrap_copy_range(monkeypatch, seen, lambda n: code if n == at else None)
    monkeypatch.setattr(sink, "CLONE_CHUNK", MiB)
    events: list[aiodd.Progress] = []
    _dd(
        src, out, cache="unsafe", isolation="inline", on_progress=events.append, progress_interval=0
    )
    assert out.read_bytes() == _padded(data)
    assert len(seen.copy_range) == at and seen.refused == [code]  # never tried again
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and done[-1] == len(_padded(data))  # counted once


def test_a_short_unaligned_copy_resumes_on_an_aligned_boundary(
    source: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may copy less than asked; the pipeline redoes from a 4 KiB boundary."""
    src, data = source
    out = tmp_path / "out.raw"
    asked: list[tuple[int, int]] = []

    def copy_range(src_fd: int, dst_fd: int, length: int, offset_src: int, offset_dst: int) -> int:
        asked.append((length, offset_dst))
        if len(asked) == 2:
            return _real_copy_range(src_fd, dst_fd, 1000, offset_src, offset_dst)
        if len(asked) == 3:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return _real_copy_range(src_fd, dst_fd, length, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", copy_range)
    monkeypatch.setattr(sink, "CLONE_CHUNK", MiB)
    monkeypatch.setattr(sink, "CLONE_WAYS", 1)  # the calls in a known order
    events: list[aiodd.Progress] = []
    _dd(
        src, out, cache="unsafe", isolation="inline", on_progress=events.append, progress_interval=0
    )
    assert out.read_bytes() == _padded(data)
    assert [offset for _, offset in asked] == [0, MiB, MiB + 1000]
    # The 1000 bytes redone by the pipeline are counted once.
    assert [e.bytes_done for e in events][-1] == len(_padded(data))


def _clone_in_chunks_of_a_mib(
    monkeypatch: pytest.MonkeyPatch,
    copy_range: Callable[[int, int, int, int, int], int],
    src: Path,
    out: Path,
) -> list[int]:
    """Copy ``src`` with ``-t unsafe`` inline, through ``copy_range`` in 1 MiB chunks;
    the bytes done of each progress event."""
    monkeypatch.setattr(os, "copy_file_range", copy_range)
    monkeypatch.setattr(sink, "CLONE_CHUNK", MiB)
    events: list[aiodd.Progress] = []
    _dd(
        src, out, cache="unsafe", isolation="inline", on_progress=events.append, progress_interval=0
    )
    return [e.bytes_done for e in events]


def test_after_the_first_chunk_two_go_at_once(
    source: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunks of a round are copied side by side: each call waits for the other."""
    src, data = source
    out = tmp_path / "out.raw"
    both = threading.Barrier(2, timeout=10)
    apart: list[int] = []

    def copy_range(src_fd: int, dst_fd: int, length: int, offset_src: int, offset_dst: int) -> int:
        if offset_dst in (MiB, 2 * MiB):  # the second round
            try:
                both.wait()
            except threading.BrokenBarrierError:
                apart.append(offset_dst)
        return _real_copy_range(src_fd, dst_fd, length, offset_src, offset_dst)

    done = _clone_in_chunks_of_a_mib(monkeypatch, copy_range, src, out)
    assert out.read_bytes() == _padded(data)
    assert apart == []
    assert done == sorted(done) and {MiB, 2 * MiB, 3 * MiB, 4 * MiB, 5 * MiB} <= set(done)


def test_without_a_second_thread_a_round_is_copied_in_one(
    source: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that cannot start another thread still gets the whole clone, one chunk
    after the other."""
    from aiodd.progress import ProgressMeter

    src, data = source

    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(sink, "CLONE_CHUNK", MiB)
    out = OutputFile.create(str(tmp_path / "out.raw"), len(data), raw=True, cache="unsafe")
    fd = os.open(src, os.O_RDONLY)
    meter = ProgressMeter(len(data), None)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(threading, "Thread", NoThread)
            done = sink.clone_range(out, fd, 0, len(data), meter, lambda: False)
    finally:
        os.close(fd)
    whole = len(data) - len(data) % sink.CLONE_ALIGN
    assert done == meter.done == whole
    out.commit(whole)
    assert (tmp_path / "out.raw").read_bytes() == data[:whole]


def test_a_chunk_stopped_short_beside_a_whole_one_ends_the_clone_there(
    source: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What counts is the run of whole chunks from the start: the chunk beside the one
    that stopped is copied again by the pipeline, and counted once."""
    src, data = source
    out = tmp_path / "out.raw"
    asked: list[int] = []

    def copy_range(src_fd: int, dst_fd: int, length: int, offset_src: int, offset_dst: int) -> int:
        asked.append(offset_dst)
        if offset_dst == MiB:
            return _real_copy_range(src_fd, dst_fd, 1000, offset_src, offset_dst)
        if offset_dst == MiB + 1000:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return _real_copy_range(src_fd, dst_fd, length, offset_src, offset_dst)

    done = _clone_in_chunks_of_a_mib(monkeypatch, copy_range, src, out)
    assert out.read_bytes() == _padded(data)
    assert sorted(asked) == [0, MiB, MiB + 1000, 2 * MiB]  # no round after that one
    assert done == sorted(done) and done[-1] == len(_padded(data))


@pytest.mark.parametrize("cache", ["writeback", "unsafe"])
def test_the_clone_starts_writeback_where_the_mode_flushes_at_the_end(
    cache: str, source: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under writeback each chunk the kernel copied is sent on to the disk at once, so
    the fsync before the rename does not write the whole file after the copy."""
    src, data = source
    out = tmp_path / "out.raw"
    started: list[tuple[int, int, int]] = []
    monkeypatch.setattr(sink, "CLONE_CHUNK", MiB)
    monkeypatch.setattr(
        sink,
        "_sync_file_range",
        lambda fd, offset, length, flags: started.append((offset, length, flags)),
    )
    _dd(src, out, cache=cache, isolation="inline")
    assert out.read_bytes() == _padded(data)
    chunks = [(i * MiB, MiB, 2) for i in range(5)]  # SYNC_FILE_RANGE_WRITE
    assert sorted(started) == (chunks if cache == "writeback" else [])


@pytest.mark.parametrize("filesystem", [0xEF53, 0x58465342], ids=["ext4", "xfs"])
def test_the_clone_allocates_its_output_first_where_the_kernel_copies(
    filesystem: int, source: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext4 copies into blocks it allocated first faster; xfs shares the input's blocks
    instead, so blocks allocated first would only be dropped."""
    src, data = source
    out = tmp_path / "out.raw"
    steps: list[str] = []

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        steps.append(f"fallocate {mode} {offset} {length}")
        return 0

    def copy_range(src_fd: int, dst_fd: int, length: int, offset_src: int, offset_dst: int) -> int:
        steps.append("copy")
        return _real_copy_range(src_fd, dst_fd, length, offset_src, offset_dst)

    monkeypatch.setattr(sink, "filesystem_magic", lambda fd: filesystem)
    monkeypatch.setattr(sink, "PAGE_CACHE_RESERVE", MiB)
    monkeypatch.setattr(sink, "_fallocate", fallocate)
    monkeypatch.setattr(os, "copy_file_range", copy_range)
    _dd(src, out, cache="unsafe", isolation="inline")
    assert out.read_bytes() == _padded(data)
    first = steps.index("copy")
    whole = len(data) - len(data) % sink.CLONE_ALIGN
    assert steps[:first] == ([f"fallocate 0 0 {whole}"] if filesystem == 0xEF53 else [])


def test_an_input_that_shrinks_is_read_as_zeros_past_its_end(
    source: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """copy_file_range returning 0 (the end of the input) leaves the rest to the
    pipeline, which reads zeros there, as it would have anyway."""
    src, data = source
    out = tmp_path / "out.raw"

    def copy_range(src_fd: int, dst_fd: int, length: int, offset_src: int, offset_dst: int) -> int:
        if offset_src >= 2 * MiB:
            return 0
        return _real_copy_range(src_fd, dst_fd, length, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", copy_range)
    monkeypatch.setattr(sink, "CLONE_CHUNK", MiB)
    _dd(src, out, cache="unsafe", isolation="inline")
    assert out.read_bytes() == _padded(data)


def _other_filesystem(tmp_path: Path) -> Path:
    for candidate in (Path("/dev/shm"), Path("/run")):
        try:
            if candidate.is_dir() and candidate.stat().st_dev != tmp_path.stat().st_dev:
                probe = os.open(candidate, os.O_RDONLY)
                try:
                    other, ours = filesystem_magic(probe), None
                finally:
                    os.close(probe)
                probe = os.open(tmp_path, os.O_RDONLY)
                try:
                    ours = filesystem_magic(probe)
                finally:
                    os.close(probe)
                if other != ours and os.access(candidate, os.W_OK):
                    return candidate
        except OSError:
            continue
    pytest.skip("no writable directory on a filesystem of another type (/dev/shm, /run)")


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    directory = _other_filesystem(tmp_path) / f"aiodd-test-{os.getpid()}-{tmp_path.name}"
    directory.mkdir()
    try:
        yield directory
    finally:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


def test_across_filesystems_the_pipeline_copies(
    elsewhere: Path, tmp_path: Path, calls: Calls
) -> None:
    """A real refusal: between filesystems of two types the kernel says EXDEV."""
    data = _data(3 * MiB + 100)
    src = elsewhere / "in.raw"
    src.write_bytes(data)
    out = tmp_path / "out.raw"
    _dd(src, out, cache="unsafe", isolation="inline")
    assert out.read_bytes() == _padded(data)
    assert len(calls.copy_range) == 1
    assert calls.refused == [errno.EXDEV] or calls.refused == [errno.EOPNOTSUPP]


# --- cancellation, failure, signals: still atomic ----------------------------------------


def test_cancelling_mid_copy_leaves_the_old_output(
    source: tuple[Path, bytes], tmp_path: Path, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = source
    out = tmp_path / "out.raw"
    out.write_bytes(PRECIOUS)
    monkeypatch.setattr(sink, "CLONE_CHUNK", MiB)

    async def run() -> bool:
        with anyio.CancelScope() as scope:

            def progress(p: aiodd.Progress) -> None:
                if p.bytes_done >= MiB:
                    scope.cancel()

            await aiodd.dd(
                src,
                out,
                cache="unsafe",
                isolation="inline",
                on_progress=progress,
                progress_interval=0,
            )
        return scope.cancelled_caught

    assert anyio.run(run, backend="trio")
    assert out.read_bytes() == PRECIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw", "out.raw"]
    assert len(calls.copy_range) == 1  # no chunk after the cancel


def test_a_failure_mid_copy_leaves_the_old_output_and_no_name(
    source: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = source
    out = tmp_path / "out.raw"
    out.write_bytes(PRECIOUS)
    monkeypatch.setattr(sink, "CLONE_CHUNK", MiB)
    names: list[list[str]] = []

    def copy_range(src_fd: int, dst_fd: int, length: int, offset_src: int, offset_dst: int) -> int:
        names.append(sorted(p.name for p in tmp_path.iterdir()))  # unnamed while written
        return _real_copy_range(src_fd, dst_fd, length, offset_src, offset_dst)

    def progress(p: aiodd.Progress) -> None:
        if p.bytes_done >= 2 * MiB:
            raise RuntimeError("the caller's callback failed")

    monkeypatch.setattr(os, "copy_file_range", copy_range)
    with pytest.raises(StageError) as caught:
        _dd(src, out, cache="unsafe", isolation="inline", on_progress=progress, progress_interval=0)
    assert caught.value.stage == "progress"
    assert names and all(n == ["in.raw", "out.raw"] for n in names)
    assert out.read_bytes() == PRECIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw", "out.raw"]
    assert leftovers(tmp_path) == []


@pytest.fixture
def big(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A sparse input far too big to be copied before the signal, and an existing of=."""
    src = tmp_path / "in" / "big.raw"
    src.parent.mkdir()
    with src.open("wb") as f:
        f.truncate(64 << 30)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.raw"
    out.write_bytes(PRECIOUS)
    return src, out_dir, out


def _start_copy(src: Path, out: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiodd",
            "-t",
            "unsafe",
            "-f",
            "raw",
            "--progress=json",
            f"if={src}",
            f"of={out}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        assert line, "aiodd ended before copying anything"
        if line.startswith("{") and json.loads(line)["bytes_done"] > 0:
            return proc


def test_sigkill_mid_copy_under_unsafe_leaves_no_file(big: tuple[Path, Path, Path]) -> None:
    src, out_dir, out = big
    proc = _start_copy(src, out)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert proc.stderr is not None
    proc.stderr.close()
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.raw"]
    assert out.read_bytes() == PRECIOUS


def test_sigterm_mid_copy_under_unsafe_removes_everything(big: tuple[Path, Path, Path]) -> None:
    src, out_dir, out = big
    proc = _start_copy(src, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    with proc.stderr:
        rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert rest.splitlines()[-1] == "aiodd: interrupted by SIGTERM; no output was written"
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.raw"]
    assert out.read_bytes() == PRECIOUS


# --- the command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["-t", "unsafe", "if=a", "of=b"],
        ["-tunsafe", "if=a", "of=b"],
        ["if=a", "of=b", "-t", "unsafe"],
        ["-f", "raw", "-t", "writeback", "-t", "unsafe", "if=a", "of=b"],  # the last wins
    ],
)
def test_t_is_spelled_as_qemu_img_convert_spells_it(argv: list[str]) -> None:
    assert parse_args(argv).cache == "unsafe"


def test_the_default_is_none() -> None:
    assert parse_args(["if=a", "of=b"]).cache == "none"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["-t", "fast"],
            "aiodd: invalid -t 'fast': use none, writeback, writethrough, directsync or unsafe\n",
        ),
        (
            ["-t", "None"],
            "aiodd: invalid -t 'None': use none, writeback, writethrough, directsync or unsafe\n",
        ),
        (["-t"], "aiodd: option -t requires argument (see 'aiodd --help')\n"),
    ],
)
def test_a_bad_mode_is_one_usage_line(
    argv: list[str], line: str, source: tuple[Path, bytes], tmp_path: Path
) -> None:
    src, _ = source
    out = tmp_path / "out.raw"
    operands = [f"if={src}", f"of={out}"]
    outcome = aiodd_run([*operands, *argv], out)
    assert (outcome.status, outcome.stderr, outcome.output) == (1, line, None)


@pytest.mark.parametrize("value", ["fast", "", None, 1, "UNSAFE"])
def test_the_library_checks_the_mode_with_the_same_rule(value: object, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^invalid cache .*: use none, writeback, "):
        _dd(tmp_path / "nowhere.raw", tmp_path / "out.raw", cache=value)
    assert not (tmp_path / "out.raw").exists()


def test_help_names_every_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert aiodd.cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "[-t CACHE]" in text
    for mode in CACHES:
        assert mode in text


# --- parity with qemu-img dd ---------------------------------------------------------------

WINDOWS = [["bs=1000", "skip=3"], ["bs=4K", "skip=1", "count=700"], ["bs=1M"]]


@needs_qemu
@pytest.mark.parametrize(
    "config",
    [["--isolation=inline"], ["-f", "raw"], []],
    ids=["inline", "sandbox-f-raw", "sandbox"],
)
@pytest.mark.parametrize("cache", CACHES)
def test_the_bytes_are_qemu_img_dds_in_every_mode(
    cache: str, config: list[str], source: tuple[Path, bytes], tmp_path: Path
) -> None:
    src, _ = source
    for window in WINDOWS:
        theirs = tmp_path / "qemu.raw"
        ours = tmp_path / "aiodd.raw"
        expected = qemu_dd(["-f", "raw", "-O", "raw", *window, f"if={src}", f"of={theirs}"], theirs)
        got = aiodd_run(["-t", cache, *config, *window, f"if={src}", f"of={ours}"], ours)
        assert expected.status == 0 and got.status == 0, got.stderr
        assert got.output == expected.output, window
        assert leftovers(tmp_path) == []


@pytest.mark.parametrize("cache", CACHES)
def test_the_threads_cut_their_memory_by_where_the_output_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    """Past the page cache, four buffers of the pipeline's unit keep two writes in
    flight while the others read; through it, two threads in buffers twice as big copy
    as fast as the cores allow, with half the reads to ask of a guest."""
    from aiodd import api
    from aiodd.pipeline import threads

    data = _data(3 * api.PLAIN_MEMORY + 1234)  # every buffer taken more than once
    src = tmp_path / "in.raw"
    src.write_bytes(data)
    seen: list[tuple[bool, list[int]]] = []
    real = threads.copy_in_threads

    def record(*args: Any, **kwargs: Any) -> bool:
        output, buffers = args[4], args[5]
        seen.append((output.direct_fd is not None, [len(view) for view in buffers]))
        return real(*args, **kwargs)

    monkeypatch.setattr(threads, "copy_in_threads", record)
    dst = tmp_path / "out.qcow2"  # an image format: the threads copy all of it
    result = api.plain_copy(
        str(src), str(dst), bs=MiB, count=None, skip=0, input_format="raw",
        output_format="qcow2", isolation="inline", allow_backing=(), require_isolation=False,
        force_share=False, cache=cache, stopped=lambda: False,  # type: ignore[arg-type]
    )  # fmt: skip
    assert result is not None
    takes_direct = False
    if cache in ("none", "directsync"):  # where the filesystem takes O_DIRECT (tmpfs does not)
        probe = OutputFile.create(str(tmp_path / "probe.raw"), MiB, raw=True, cache=cache)  # type: ignore[arg-type]
        takes_direct = probe.direct_fd is not None
        probe.abort()
    shape = [4 * MiB] * 4 if takes_direct else [8 * MiB] * 2
    assert seen == [(takes_direct, shape)]
    assert virtual_disk(dst, "qcow2") == _padded(data)
