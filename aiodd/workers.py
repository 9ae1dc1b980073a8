"""Worker threads that stay up for a whole copy, fed through a queue.

A stage whose work per item is one long call that releases the GIL (an ``O_DIRECT``
write, a hash) loses time if each item is its own ``anyio.to_thread.run_sync`` job:
between two items the thread's result goes back through the event loop, which must run
before the next item is handed out, and the disk or the CPU idles meanwhile
(docs/performance.md, "Durable at the disk's speed").  Here the threads take their
items from a queue that the event loop fills ahead of them, so a thread that finishes
one item starts the next at once.  Each finished item comes back through a second
queue, with a byte on a pipe to wake the loop, which calls the stage's ``finished``
callback there, where the stage's own state lives.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from queue import Empty, SimpleQueue
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")

_STOP = object()  # one per thread, after the last item


class WorkerThreads(Generic[T]):
    """``count`` threads running ``work(item)`` on every item :meth:`put`.

    With one thread the items are worked in the order put.  ``finished(item, error)``
    runs in the event loop for every item, in the order they finished; ``error`` is what
    ``work`` raised, or None.  Once :attr:`failing` is set the threads hand the items
    still queued back without working them (``error`` None): a copy that is failing
    wants its buffers back, not its work done.
    """

    def __init__(
        self,
        work: Callable[[T], object],
        finished: Callable[[T, BaseException | None], None],
        count: int = 1,
    ) -> None:
        self._work = work
        self._finished = finished
        self._count = count
        self._todo: SimpleQueue[object] = SimpleQueue()
        self._done: SimpleQueue[tuple[T, BaseException | None]] = SimpleQueue()
        self.failing = False

    def put(self, item: T) -> None:
        self._todo.put(item)

    def _thread(self, ring: int) -> None:
        while (item := self._todo.get()) is not _STOP:
            error: BaseException | None = None
            if not self.failing:
                try:
                    self._work(item)  # type: ignore[arg-type]
                except BaseException as exc:  # the loop's side decides what it means
                    error = exc
            self._done.put((item, error))  # type: ignore[arg-type]
            # At most one byte per item put and not yet answered is unread: the
            # queue's producer is bounded by the stage's own buffers, far below a pipe.
            os.write(ring, b"\0")

    def _answer(self) -> None:
        while True:
            try:
                item, error = self._done.get_nowait()
            except Empty:
                return
            self._finished(item, error)

    async def _answer_the_bell(self, bell: int) -> None:
        while True:
            await anyio.wait_readable(bell)
            with suppress(BlockingIOError):  # read already, after an earlier wake-up
                os.read(bell, 4096)
            self._answer()

    async def _run_thread(self, ring: int, stopped: anyio.Event) -> None:
        try:
            await anyio.to_thread.run_sync(self._thread, ring)
        finally:
            stopped.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[WorkerThreads[T]]:
        """Run the threads; on the way out, wait until every item put is finished.

        Leaving on an error or a cancellation sets :attr:`failing` first, so the wait is
        for the items being worked, not for those still queued.
        """
        bell, ring = os.pipe()
        os.set_blocking(bell, False)
        stopped = [anyio.Event() for _ in range(self._count)]
        try:
            async with anyio.create_task_group() as answers:
                answers.start_soon(self._answer_the_bell, bell)
                async with anyio.create_task_group() as threads:
                    for event in stopped:
                        threads.start_soon(self._run_thread, ring, event)
                    try:
                        yield self
                    except BaseException:
                        self.failing = True
                        raise
                    finally:
                        for _ in range(self._count):
                            self._todo.put(_STOP)
                    try:
                        for event in stopped:
                            await event.wait()
                    except BaseException:  # cancelled while the threads work on
                        self.failing = True
                        raise
                answers.cancel_scope.cancel()
            self._answer()
        finally:
            os.close(bell)
            os.close(ring)
