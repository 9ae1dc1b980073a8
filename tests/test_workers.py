"""aiodd.workers.WorkerThreads: threads that stay up for a copy, fed through a queue."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from aiodd.workers import WorkerThreads

pytestmark = pytest.mark.anyio


async def test_a_thread_goes_on_to_the_next_item_without_the_event_loop() -> None:
    """Items queued behind a busy thread are worked while the loop is blocked: no
    hand-off through the loop between two of them."""
    gate, started = threading.Event(), threading.Event()
    worked: list[int] = []
    finished: list[int] = []

    def work(item: int) -> None:
        if item == 1:
            started.set()
            assert gate.wait(10)
        worked.append(item)

    threads = WorkerThreads(work, lambda item, error: finished.append(item))
    async with threads.running():
        threads.put(1)
        await anyio.to_thread.run_sync(started.wait, 10)
        threads.put(2)
        threads.put(3)
        gate.set()
        deadline = time.monotonic() + 10
        while len(worked) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)  # the loop does not run meanwhile
        assert worked == [1, 2, 3]
        assert finished == []  # answered by the loop, which has not run yet
    assert finished == [1, 2, 3]


async def test_each_item_is_answered_in_the_loop_with_its_error() -> None:
    loop_thread = threading.get_ident()
    answers: list[tuple[int, str | None, bool]] = []

    def work(item: int) -> None:
        if item == 2:
            raise ValueError("two")

    def finished(item: int, error: BaseException | None) -> None:
        answers.append(
            (item, None if error is None else str(error), loop_thread == threading.get_ident())
        )

    threads = WorkerThreads(work, finished)
    async with threads.running():
        for item in (1, 2, 3):
            threads.put(item)
    assert answers == [(1, None, True), (2, "two", True), (3, None, True)]


async def test_several_threads_work_at_once() -> None:
    both = threading.Barrier(2, timeout=10)
    threads: WorkerThreads[int] = WorkerThreads(
        lambda item: both.wait(), lambda item, error: None, count=2
    )
    with anyio.fail_after(10):
        async with threads.running():
            threads.put(1)
            threads.put(2)


async def test_an_error_in_the_answer_fails_the_block_and_waits_for_the_threads() -> None:
    release = threading.Event()
    worked: list[int] = []

    def work(item: int) -> None:
        worked.append(item)
        if item == 2:
            assert release.wait(10)

    def finished(item: int, error: BaseException | None) -> None:
        if item == 1:
            release.set()
            raise KeyError("answer")

    threads = WorkerThreads(work, finished)
    with anyio.fail_after(10), pytest.raises(BaseExceptionGroup) as caught:
        async with threads.running():
            for item in (1, 2, 3):
                threads.put(item)
            await anyio.sleep_forever()
    assert caught.value.subgroup(KeyError) is not None
    assert threads.failing
