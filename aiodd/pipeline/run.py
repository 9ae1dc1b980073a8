"""Wiring: the four stages as tasks in one task group, joined by bounded streams.

Every stream holds at most as many items as the pool has buffers, so memory is the
pool's, whatever the image size.  The first stage to fail cancels the others; its error
comes out once, as an :class:`~aiodd.errors.AioddError` naming the stage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from aiodd.buffers import BufferPool, Chunk, WriteOp
from aiodd.errors import AioddError, StageError
from aiodd.formats.base import OutputPlan, VirtualDisk
from aiodd.progress import ProgressMeter
from aiodd.stages.encoder import encode_stream
from aiodd.stages.reader import read_window
from aiodd.stages.sink import OutputFile, sink_stream
from aiodd.stages.windower import window_stream


async def _stage(name: str, fn: Callable[[], Awaitable[None]]) -> None:
    try:
        await fn()
    except AioddError:
        raise
    except BaseExceptionGroup as group:
        # A stage with task groups of its own (the reader's workers) fails as a group.
        first = _first_error(group)
        if first is None:
            raise
        if isinstance(first, AioddError | KeyboardInterrupt):
            raise first from None
        raise StageError(name, first) from first
    except Exception as exc:
        raise StageError(name, exc) from exc


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The error that started the failure: an AioddError, else any non-cancellation."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    # A stage's own error first: a StageError downstream may only be its echo (the
    # windower finding the stream ended early because the reader failed).
    for exc in leaves:
        if isinstance(exc, AioddError | KeyboardInterrupt) and not isinstance(exc, StageError):
            return exc
    for exc in leaves:
        if isinstance(exc, StageError):
            return exc
    cancelled = anyio.get_cancelled_exc_class()
    return next((exc for exc in leaves if not isinstance(exc, cancelled)), None)


async def run_pipeline(
    disk: VirtualDisk,
    start: int,
    end: int,
    plan: OutputPlan,
    output: OutputFile,
    pool: BufferPool,
    meter: ProgressMeter,
    readers: int = 2,
) -> None:
    """Copy ``disk[start:end]`` into ``output`` laid out by ``plan``; commit is the caller's."""
    depth = pool.count
    read_tx, read_rx = anyio.create_memory_object_stream[Chunk](depth)
    win_tx, win_rx = anyio.create_memory_object_stream[Chunk](depth)
    enc_tx, enc_rx = anyio.create_memory_object_stream[WriteOp](depth)
    try:
        meter.start()  # inside: a callback that raises must not leave the streams open
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                _stage, "reader", lambda: read_window(disk, start, end, pool, read_tx, readers)
            )
            tg.start_soon(
                _stage,
                "windower",
                lambda: window_stream(start, end, plan.data_size, pool, read_rx, win_tx),
            )
            tg.start_soon(_stage, "encoder", lambda: encode_stream(plan, win_rx, enc_tx))
            tg.start_soon(_stage, "sink", lambda: sink_stream(output, pool, enc_rx, meter))
    except BaseExceptionGroup as group:
        first = _first_error(group)
        if first is None:
            raise
        raise first from None
    finally:
        for stream in (read_tx, read_rx, win_tx, win_rx, enc_tx, enc_rx):
            stream.close()
