"""Wiring: the stages as tasks in one task group, joined by bounded streams.

reader → windower → [digest →] encoder → sink: the digest stage runs only for
``--checksum``; with ``--sparse`` the reader finds the zeros and the encoder is the
sparse one.

Every stream holds at most as many items as the pool has buffers, so memory is the
pool's, whatever the image size.  The first stage to fail cancels the others; its error
comes out once, as an :class:`~aiodd.errors.AioddError` naming the stage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from aiodd.buffers import BufferPool, Chunk, WriteOp
from aiodd.errors import AioddError, StageError
from aiodd.formats.base import OutputPlan, SparsePlan, VirtualDisk
from aiodd.progress import ProgressMeter
from aiodd.stages.digest import Hasher, digest_stream
from aiodd.stages.encoder import encode_sparse, encode_stream
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
    *,
    sparse: SparsePlan | None = None,
    hasher: Hasher | None = None,
) -> None:
    """Copy ``disk[start:end]`` into ``output`` laid out by ``plan``; commit is the caller's.

    ``sparse``, a sparse plan of the same output, lays it out instead (``plan`` still
    gives the data stream's size); ``hasher`` is fed the output's virtual disk.
    """
    depth = pool.count
    read_tx, read_rx = anyio.create_memory_object_stream[Chunk](depth)
    win_tx, win_rx = anyio.create_memory_object_stream[Chunk](depth)
    enc_tx, enc_rx = anyio.create_memory_object_stream[WriteOp](depth)
    dig_tx, dig_rx = anyio.create_memory_object_stream[Chunk](depth)
    to_encoder = dig_rx if hasher is not None else win_rx
    find_zeros = sparse is not None

    async def encode() -> None:
        if sparse is not None:
            await encode_sparse(sparse, to_encoder, enc_tx)
        else:
            await encode_stream(plan, to_encoder, enc_tx)

    try:
        meter.start()  # inside: a callback that raises must not leave the streams open
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                _stage,
                "reader",
                lambda: read_window(
                    disk, start, end, pool, read_tx, readers, find_zeros=find_zeros
                ),
            )
            tg.start_soon(
                _stage,
                "windower",
                lambda: window_stream(start, end, plan.data_size, pool, read_rx, win_tx),
            )
            if hasher is not None:
                padding = plan.virtual_size - plan.data_size
                tg.start_soon(
                    _stage, "digest", lambda: digest_stream(hasher, padding, pool, win_rx, dig_tx)
                )
            tg.start_soon(_stage, "encoder", encode)
            # A dense output is allocated whole first: see OutputFile.reserve.
            reserve = plan.file_size if sparse is None else 0
            tg.start_soon(_stage, "sink", lambda: sink_stream(output, pool, enc_rx, meter, reserve))
    except BaseExceptionGroup as group:
        first = _first_error(group)
        if first is None:
            raise
        raise first from None
    finally:
        for stream in (read_tx, read_rx, win_tx, win_rx, dig_tx, dig_rx, enc_tx, enc_rx):
            stream.close()
