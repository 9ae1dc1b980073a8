"""The stages in threads (aiodd.pipeline.threads): the copy without an event loop keeps
the pipeline's rules, with small buffers so that a few MiB take every thread many times."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aiodd.buffers import Bytes
from aiodd.errors import ImageError, StageError
from aiodd.formats import registry
from aiodd.formats.base import Extent, OutputPlan
from aiodd.pipeline.threads import copy_in_threads
from aiodd.stages.sink import WRITES_IN_FLIGHT, OutputFile, Span, granules_clash
from tests.harness import virtual_disk

UNIT = 64 << 10
THREADS = 4
SIZE = 3 * (1 << 20) + 4096 + 777  # 50 chunks and a bit: no multiple of 512


class FakeDisk:
    """A virtual disk of ``size`` bytes whose byte i is ``i * 7 % 251``, and whose
    ``read_into`` runs ``before(offset)`` first."""

    format_name = "raw"

    def __init__(self, size: int, before: Callable[[int], None] = lambda offset: None) -> None:
        self.virtual_size = size
        self.before = before
        self.reads: list[int] = []
        self.lock = threading.Lock()

    def read_into(self, offset: int, buf: memoryview) -> None:
        with self.lock:
            self.reads.append(offset)
        self.before(offset)
        buf[:] = expected(offset, len(buf))

    def close(self) -> None:
        pass


def expected(offset: int, length: int) -> bytes:
    return bytes((i * 7) % 251 for i in range(offset, offset + length))


@pytest.fixture
def buffers() -> Iterator[list[memoryview]]:
    memory = mmap.mmap(-1, THREADS * UNIT)
    whole = memoryview(memory)
    views = [whole[i * UNIT : (i + 1) * UNIT] for i in range(THREADS)]
    yield views
    for view in views:
        view.release()
    whole.release()
    with contextlib.suppress(BufferError):  # a failure's traceback may hold a view still
        memory.close()


def _output(tmp_path: Path, fmt: str, length: int) -> tuple[OutputFile, OutputPlan]:
    plan = registry.plan(fmt, length)
    return OutputFile.create(str(tmp_path / f"out.{fmt}"), plan.file_size, raw=fmt == "raw"), plan


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vpc", "vhdx", "vmdk"])
@pytest.mark.parametrize(("start", "end"), [(0, SIZE), (4096 + 3, SIZE - 100), (0, 100)])
def test_the_threads_copy_the_window(
    tmp_path: Path, buffers: list[memoryview], fmt: str, start: int, end: int
) -> None:
    disk = FakeDisk(SIZE)
    output, plan = _output(tmp_path, fmt, end - start)
    try:
        assert copy_in_threads(disk, start, end, plan, output, buffers, lambda: False)
        output.commit(plan.file_size)
    finally:
        output.abort()
    data = virtual_disk(tmp_path / f"out.{fmt}", fmt)
    assert data[: end - start] == expected(start, end - start)
    assert not any(data[end - start : plan.data_size])  # the zero padding
    if end - start > UNIT:
        assert len(set(disk.reads)) == len(disk.reads)  # each chunk read once


def test_a_window_of_one_buffer_is_copied_without_threads(
    tmp_path: Path, buffers: list[memoryview]
) -> None:
    seen: set[str] = set()

    def before(offset: int) -> None:
        seen.add(threading.current_thread().name)

    output, plan = _output(tmp_path, "raw", UNIT)
    try:
        assert copy_in_threads(
            FakeDisk(SIZE, before), 0, UNIT, plan, output, buffers, lambda: False
        )
    finally:
        output.abort()
    assert seen == {threading.main_thread().name}


def test_writes_stay_under_the_limit_and_share_no_granule(
    tmp_path: Path, buffers: list[memoryview], monkeypatch: pytest.MonkeyPatch
) -> None:
    """vpc's blocks start 512 bytes past a 4 KiB boundary: neighbouring chunks' writes
    meet in a granule that both write through the page cache, and may be in flight
    together, up to the limit; never two that share a granule either may write past
    it."""
    output, plan = _output(tmp_path, "vpc", SIZE)
    output.reserve(plan.file_size)
    limit = output.writes_in_flight
    in_flight: list[list[Span]] = []
    most = 0
    clashes = 0
    lock = threading.Lock()
    write = output.write

    def watched(writes: list[tuple[int, Bytes]]) -> None:
        nonlocal most, clashes
        spans = output.granules(writes)
        with lock:
            for other in in_flight:
                clashes += granules_clash(spans, other)
            in_flight.append(spans)
            most = max(most, len(in_flight))
        time.sleep(0.002)  # long enough for the others to try
        write(writes)
        with lock:
            in_flight.remove(spans)

    monkeypatch.setattr(output, "write", watched)
    try:
        assert copy_in_threads(FakeDisk(SIZE), 0, SIZE, plan, output, buffers, lambda: False)
    finally:
        output.abort()
    assert clashes == 0
    assert most == limit <= WRITES_IN_FLIGHT


def test_writes_overlap_where_the_output_allows(
    tmp_path: Path, buffers: list[memoryview], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above could pass with one write at a time: here two must meet."""
    output, plan = _output(tmp_path, "raw", SIZE)
    monkeypatch.setattr(OutputFile, "writes_in_flight", property(lambda self: 2))
    both = threading.Barrier(2, timeout=10)
    write = output.write
    met: list[bool] = []

    def meeting(writes: list[tuple[int, Bytes]]) -> None:
        if not met:
            both.wait()  # the first two writes wait for each other
            met.append(True)
        write(writes)

    monkeypatch.setattr(output, "write", meeting)
    try:
        assert copy_in_threads(FakeDisk(SIZE), 0, SIZE, plan, output, buffers, lambda: False)
    finally:
        output.abort()
    assert met


def test_a_corrupt_image_is_reported_as_a_sequential_reader_would(
    tmp_path: Path, buffers: list[memoryview]
) -> None:
    """Chunk 9 fails at once, chunk 7 later: the copy reports chunk 7, and starts no
    chunk past the first failure it saw."""
    bad = {7 * UNIT: 0.05, 9 * UNIT: 0.0}

    def before(offset: int) -> None:
        if offset in bad:
            time.sleep(bad[offset])
            raise ImageError("disk", f"bad cluster at {offset}")
        if offset == 8 * UNIT:
            time.sleep(0.05)

    disk = FakeDisk(SIZE, before)
    output, plan = _output(tmp_path, "raw", SIZE)
    try:
        with pytest.raises(ImageError, match=f"^disk: bad cluster at {7 * UNIT}$"):
            copy_in_threads(disk, 0, SIZE, plan, output, buffers, lambda: False)
    finally:
        output.abort()
    assert max(disk.reads) < 9 * UNIT + THREADS * UNIT


class BrokenPlan:
    """``plan``, but for its data extents."""

    def __init__(self, plan: OutputPlan) -> None:
        self.virtual_size = plan.virtual_size
        self.data_size = plan.data_size
        self.file_size = plan.file_size
        self.metadata = plan.metadata

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        raise ValueError("broken")


@pytest.mark.parametrize(
    ("where", "stage"),
    [("read_into", "reader"), ("data_extents", "encoder"), ("write", "sink")],
)
def test_an_unexpected_error_names_its_stage(
    tmp_path: Path, buffers: list[memoryview], monkeypatch: pytest.MonkeyPatch, where: str,
    stage: str,
) -> None:  # fmt: skip
    disk = FakeDisk(SIZE)
    output, plan = _output(tmp_path, "raw", SIZE)

    def broken(*args: object) -> None:
        raise ValueError("broken")

    if where == "data_extents":
        plan = BrokenPlan(plan)
    else:
        monkeypatch.setattr(disk if where == "read_into" else output, where, broken)
    try:
        with pytest.raises(StageError, match=f"^{stage} stage failed: broken$"):
            copy_in_threads(disk, 0, SIZE, plan, output, buffers, lambda: False)
    finally:
        output.abort()


def test_a_stop_is_heard_before_the_next_chunk(tmp_path: Path, buffers: list[memoryview]) -> None:
    disk = FakeDisk(SIZE)
    asked = threading.Event()

    def stopped() -> bool:
        return asked.is_set()

    def before(offset: int) -> None:
        if offset == 5 * UNIT:
            asked.set()

    disk.before = before
    output, plan = _output(tmp_path, "raw", SIZE)
    try:
        assert not copy_in_threads(disk, 0, SIZE, plan, output, buffers, stopped)
    finally:
        output.abort()
    # Chunks already taken are finished; no new one starts.
    assert len(disk.reads) <= 6 + THREADS
    assert os.listdir(tmp_path) == []


class Hash:
    """A hasher that checks it is fed one chunk at a time."""

    def __init__(self) -> None:
        import hashlib

        self.digest = hashlib.sha256()
        self.busy = threading.Lock()

    def update(self, data: bytes | memoryview, /) -> None:
        assert self.busy.acquire(blocking=False), "two updates at once"
        try:
            time.sleep(0.001)
            self.digest.update(data)
        finally:
            self.busy.release()


@pytest.mark.parametrize("fmt", ["raw", "vpc"])
def test_the_hash_is_of_the_virtual_disk_in_order(
    tmp_path: Path, buffers: list[memoryview], fmt: str
) -> None:
    """vpc's virtual size runs past its data stream (CHS rounding): zeros hashed last."""
    import hashlib

    def jitter(offset: int) -> None:
        time.sleep((offset // UNIT) % 3 * 0.002)  # chunks finish reading out of order

    output, plan = _output(tmp_path, fmt, SIZE)
    hasher = Hash()
    try:
        assert copy_in_threads(
            FakeDisk(SIZE, jitter), 0, SIZE, plan, output, buffers, lambda: False, hasher=hasher
        )
    finally:
        output.abort()
    assert plan.virtual_size > SIZE
    whole = expected(0, SIZE) + bytes(plan.virtual_size - SIZE)
    assert hasher.digest.hexdigest() == hashlib.sha256(whole).hexdigest()


def test_a_hash_waiting_for_a_chunk_that_fails_gives_up(
    tmp_path: Path, buffers: list[memoryview]
) -> None:
    def before(offset: int) -> None:
        if offset == 2 * UNIT:
            time.sleep(0.05)  # the chunks after it are read, and wait to be hashed
            raise ImageError("disk", "bad cluster")

    output, plan = _output(tmp_path, "raw", SIZE)
    hasher = Hash()
    try:
        with pytest.raises(ImageError, match="bad cluster"):
            copy_in_threads(
                FakeDisk(SIZE, before), 0, SIZE, plan, output, buffers, lambda: False, hasher=hasher
            )
    finally:
        output.abort()


def test_progress_is_reported_one_call_at_a_time_up_to_the_end(
    tmp_path: Path, buffers: list[memoryview]
) -> None:
    from aiodd.progress import Progress, ProgressMeter

    busy = threading.Lock()
    seen: list[int] = []

    def on_progress(progress: Progress) -> None:
        assert busy.acquire(blocking=False), "two callbacks at once"
        try:
            time.sleep(0.001)
            seen.append(progress.bytes_done)
        finally:
            busy.release()

    output, plan = _output(tmp_path, "raw", SIZE)
    meter = ProgressMeter(plan.data_size, on_progress, interval=0)
    meter.start()
    try:
        assert copy_in_threads(FakeDisk(SIZE), 0, SIZE, plan, output, buffers, lambda: False, meter)
    finally:
        output.abort()
    assert seen == sorted(seen)
    assert seen[0] == 0 and seen[-1] == plan.data_size
    assert len(seen) == 1 + -(-plan.data_size // UNIT)


def test_a_progress_callback_that_raises_fails_the_copy_and_hears_no_more(
    tmp_path: Path, buffers: list[memoryview]
) -> None:
    from aiodd.progress import Progress, ProgressMeter

    calls: list[int] = []

    def on_progress(progress: Progress) -> None:
        calls.append(progress.bytes_done)
        if len(calls) == 3:
            raise ValueError("no more")

    output, plan = _output(tmp_path, "raw", SIZE)
    meter = ProgressMeter(plan.data_size, on_progress, interval=0)
    meter.start()
    try:
        with pytest.raises(StageError, match=r"^progress stage failed: no more$"):
            copy_in_threads(FakeDisk(SIZE), 0, SIZE, plan, output, buffers, lambda: False, meter)
    finally:
        output.abort()
    assert len(calls) == 3


def test_the_writes_do_not_wait_for_the_hash(
    tmp_path: Path, buffers: list[memoryview], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first chunk's hash is held until every buffer's chunk is written."""
    output, plan = _output(tmp_path, "raw", SIZE)
    written = threading.Semaphore(0)
    write = output.write

    def counted(writes: list[tuple[int, Bytes]]) -> None:
        write(writes)
        written.release()

    class HeldHash(Hash):
        def update(self, data: bytes | memoryview, /) -> None:
            if not hasattr(self, "held"):
                self.held = all(written.acquire(timeout=10) for _ in range(THREADS))
            super().update(data)

    monkeypatch.setattr(output, "write", counted)
    hasher = HeldHash()
    try:
        assert copy_in_threads(
            FakeDisk(SIZE), 0, SIZE, plan, output, buffers, lambda: False, hasher=hasher
        )
    finally:
        output.abort()
    assert hasher.held


@pytest.mark.parametrize("with_hash", [False, True])
def test_a_thread_that_cannot_start_stops_the_others(
    tmp_path: Path, buffers: list[memoryview], monkeypatch: pytest.MonkeyPatch, with_hash: bool
) -> None:
    """The threads already running finish their chunk and end; none is left behind."""
    real_start = threading.Thread.start
    calls: list[threading.Thread] = []

    def start(self: threading.Thread) -> None:
        calls.append(self)
        if len(calls) == 3:
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    output, plan = _output(tmp_path, "raw", SIZE)
    try:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            copy_in_threads(
                FakeDisk(SIZE), 0, SIZE, plan, output, buffers, lambda: False,
                hasher=Hash() if with_hash else None,
            )  # fmt: skip
    finally:
        output.abort()
    assert not any(thread.is_alive() for thread in calls)
