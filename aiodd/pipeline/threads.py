"""The stages in threads, for a copy that needs no event loop.

The command line runs a copy this way unless it asks for holes (``--sparse``): asyncio
and anyio take longer to import and start than the rest of aiodd's start-up together,
a tenth of a whole durable GiB on a fast disk (docs/performance.md, "Start-up" and
"Durable at the disk's speed").

The stages and their rules are the pipeline's (docs/architecture.md, "The copy without
an event loop"): read a chunk of the window, pad the window's end with zeros up to the
plan's data size, hash it in order (``--checksum``), map it to the file's extents,
write, count it for progress.  Each thread takes one chunk through all of them, in its
own buffer, but for the hash: one more thread hashes the chunks in order as they are
read, beside their writes, and a buffer is taken again once both are done with it.
At most ``output.writes_in_flight`` writes run at once, and never two that share a
write granule.  A corrupt image is reported as a sequential reader
would report it: the error of the lowest chunk that fails; once the copy fails, no
further chunk is written, hashed or counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from aiodd._typing_names import TypeVar
from aiodd.buffers import Bytes
from aiodd.errors import AioddError, StageError
from aiodd.formats.base import OutputPlan, VirtualDisk
from aiodd.progress import ProgressMeter
from aiodd.stages.digest import Hasher, hash_zeros
from aiodd.stages.encoder import metadata_batches, place
from aiodd.stages.sink import OutputFile, Span, granules_clash


def copy_in_threads(
    disk: VirtualDisk,
    start: int,
    end: int,
    plan: OutputPlan,
    output: OutputFile,
    buffers: list[memoryview],
    stopped: Callable[[], bool],
    meter: ProgressMeter | None = None,
    hasher: Hasher | None = None,
) -> bool:
    """Copy ``disk[start:end]`` into ``output`` laid out by ``plan``, one thread per buffer
    (none where one buffer holds it all); commit is the caller's.

    ``stopped`` is asked before each chunk; False when it said so.  Every buffer must be
    as long as the first.  ``meter`` counts the data stream's bytes as they are written;
    ``hasher`` is fed the output's virtual disk, the zeros past the data stream included.
    """
    batches = metadata_batches(plan.metadata())
    while (batch := _in_stage("encoder", next, batches, None)) is not None:
        if stopped():
            return False
        _in_stage("sink", output.write, batch)
    unit = len(buffers[0])
    copy = _Copy(disk, start, end, plan, output, unit, stopped, meter, hasher)
    alone = plan.data_size <= unit  # one chunk: read and written in this thread
    threads = [] if alone else [threading.Thread(target=copy.run, args=(v,)) for v in buffers]
    if threads:
        output.reserve(plan.file_size)  # a dense file, allocated whole: OutputFile.reserve
    if hasher is not None:  # first: the others wait for it
        threads.insert(0, threading.Thread(target=copy.hash_in_order))
    started: list[threading.Thread] = []
    try:
        for thread in threads:
            thread.start()
            started.append(thread)
        if alone:
            copy.run(buffers[0])
    finally:
        if len(started) < len(threads):  # no thread to be had: the others stop too
            copy.stop()
        for thread in started:
            thread.join()
    if copy.failures:
        raise min(copy.failures, key=lambda failure: failure[0])[1]
    if copy.stopped:
        return False
    if hasher is not None:
        _in_stage("digest", hash_zeros, hasher, plan.virtual_size - plan.data_size)
    return True


T = TypeVar("T")


def _in_stage(stage: str, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``, failing as the pipeline's stage ``stage`` would: an unexpected error
    becomes a :class:`~aiodd.errors.StageError` naming it."""
    try:
        return fn(*args)
    except AioddError:
        raise
    except Exception as exc:
        raise StageError(stage, exc) from exc


class _Copy:
    """What the threads share: the next chunk, the writes in flight, the failures."""

    def __init__(
        self,
        disk: VirtualDisk,
        start: int,
        end: int,
        plan: OutputPlan,
        output: OutputFile,
        unit: int,
        stopped: Callable[[], bool],
        meter: ProgressMeter | None,
        hasher: Hasher | None,
    ) -> None:
        self.disk = disk
        self.start = start
        self.length = max(0, end - start)  # of the window; the rest of data_size is zeros
        self.plan = plan
        self.output = output
        self.unit = unit
        self.asked_to_stop = stopped
        self.meter = meter
        self.hasher = hasher
        self.unhashed: dict[int, memoryview] = {}  # read, for the hash thread
        self.hashed = 0  # the data stream's bytes hashed, in order
        self.hash_done = False
        self.next_offset = 0  # in the output's data stream
        self.failures: list[tuple[int, BaseException]] = []
        self.stopped = False
        self.changed = threading.Condition()
        self.writing: dict[int, list[Span]] = {}  # offset -> its granules

    def run(self, buffer: memoryview) -> None:
        while (offset := self._take()) is not None:
            view = buffer[: min(self.unit, self.plan.data_size - offset)]
            try:
                writes = self._read(offset, view)
                handed = self._hand_to_hash(offset, view)
                try:
                    self._write(offset, writes, len(view))
                finally:
                    if handed:  # the buffer is free once the hash is done with it too
                        self._wait_hashed(offset + len(view))
            except BaseException as exc:
                with self.changed:
                    self.failures.append((offset, exc))
                    self.changed.notify_all()
                return
            finally:
                view.release()

    def stop(self) -> None:
        """No further chunk: those taken are finished (``changed`` is re-entrant: callers
        may hold it)."""
        with self.changed:
            self.stopped = True
            self.changed.notify_all()

    def _take(self) -> int | None:
        """The next chunk's offset, or None once there is none, or the copy stops."""
        with self.changed:
            if self.stopped or self.failures or self.next_offset >= self.plan.data_size:
                return None
            if self.asked_to_stop():
                self.stop()  # the hash thread then waits for no further chunk
                return None
            offset = self.next_offset
            self.next_offset += self.unit
            return offset

    def _hand_to_hash(self, offset: int, view: memoryview) -> bool:
        if self.hasher is None:
            return False
        with self.changed:
            self.unhashed[offset] = view
            self.changed.notify_all()
        return True

    def _wait_hashed(self, end: int) -> None:
        with self.changed:
            while self.hashed < end and not self.hash_done:
                self.changed.wait()

    def hash_in_order(self) -> None:
        """The hash thread: every chunk the others hand over, in order, beside their
        writes; it ends when the data stream is hashed, or once no chunk will come."""
        hasher = self.hasher
        assert hasher is not None
        offset = 0
        try:
            while offset < self.plan.data_size:
                with self.changed:
                    while offset not in self.unhashed:
                        if self.failures or (self.stopped and offset >= self.next_offset):
                            return
                        self.changed.wait()
                    view = self.unhashed.pop(offset)
                try:
                    _in_stage("digest", hasher.update, view)
                except BaseException as exc:
                    with self.changed:
                        self.failures.append((offset, exc))
                    return
                offset += len(view)
                with self.changed:
                    self.hashed = offset
                    self.changed.notify_all()
        finally:
            with self.changed:
                self.hash_done = True
                self.changed.notify_all()

    def _read(self, offset: int, view: memoryview) -> list[tuple[int, Bytes]]:
        """Fill ``view`` with the data stream at ``offset``; its writes, as the encoder's."""
        have = max(0, min(len(view), self.length - offset))
        if have:
            _in_stage("reader", self.disk.read_into, self.start + offset, view[:have])
        if have < len(view):
            view[have:] = bytes(len(view) - have)
        return _in_stage("encoder", place, self.plan, offset, view)

    def _write(self, offset: int, writes: list[tuple[int, Bytes]], length: int) -> None:
        """Write, once a write may start: under the limit in flight, sharing no granule;
        then count ``length`` bytes done."""
        spans = self.output.granules(writes)
        with self.changed:
            while len(self.writing) >= self.output.writes_in_flight or any(
                granules_clash(busy, spans) for busy in self.writing.values()
            ):
                if self.failures:  # the copy failed: this chunk's write is of no use
                    return
                self.changed.wait()
            if self.failures:
                return
            self.writing[offset] = spans
        try:
            _in_stage("sink", self.output.write, writes)
        finally:
            with self.changed:
                del self.writing[offset]
                self.changed.notify_all()
        # Under the lock: the callback is called by one thread at a time, and never
        # again once the copy fails (a callback that raises fails it).
        with self.changed:
            if self.meter is not None and not self.failures and not self.stopped:
                self.meter.advance(length)
        for _, piece in writes:
            if isinstance(piece, memoryview):
                piece.release()
