"""Stage 1, the reader: fills pool buffers from the virtual disk, in worker threads.

Several workers read disjoint chunks at once, so a decoder that decompresses (and
releases the GIL) keeps both cores busy; the windower puts the chunks back in order.

With ``find_zeros`` (``--sparse``), the same worker thread then finds the chunk's
zeros while its bytes are still in the CPU's cache, so the search runs on both cores
too; the chunk carries the runs of data it found (:func:`~aiodd.buffers.data_runs`).
A disk that reports its holes (:class:`~aiodd.formats.base.HoleReportingDisk`: a raw
file read inline) spares the search there.

A corrupt image is reported as a sequential reader would report it: the error of the
lowest chunk that fails, whichever worker happened to fail first.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from aiodd.buffers import BufferPool, Chunk, Run, data_runs
from aiodd.errors import AioddError
from aiodd.formats.base import VirtualDisk


async def read_window(
    disk: VirtualDisk,
    start: int,
    end: int,
    pool: BufferPool,
    send: MemoryObjectSendStream[Chunk],
    workers: int = 2,
    *,
    find_zeros: bool = False,
) -> None:
    """Send ``[start, end)`` of ``disk`` as chunks of at most ``pool.size`` bytes.

    Chunks start ``pool.size`` apart from ``start``, a multiple of the zero granule in
    the output's offsets, so the runs ``find_zeros`` reports are aligned there.
    """

    # A HoleReportingDisk's method, looked up: the protocols are mypy's alone.
    read_into_holes: Callable[[int, memoryview], list[tuple[int, int]]] | None = getattr(
        disk, "read_into_holes", None
    )

    def read(offset: int, view: memoryview) -> list[Run] | None:
        if not find_zeros:
            disk.read_into(offset, view)
            return None
        if read_into_holes is not None:  # its holes need no looking at
            return data_runs(view, holes=read_into_holes(offset, view))
        disk.read_into(offset, view)
        return data_runs(view)

    next_offset = start
    limit = end  # lowered to the first failing chunk: nothing past it is started
    failures: list[tuple[int, AioddError]] = []

    async def worker(out: MemoryObjectSendStream[Chunk]) -> None:
        nonlocal next_offset, limit
        async with out:
            while True:
                # Take the buffer before the offset: a chunk that has an offset always
                # has a buffer, so the windower's reordering can never starve it.
                buffer = await pool.acquire()
                if next_offset >= limit:
                    pool.release(buffer)
                    return
                offset = next_offset
                length = min(pool.size, end - offset)
                next_offset += length
                try:
                    runs = await anyio.to_thread.run_sync(read, offset, buffer.view[:length])
                except AioddError as exc:
                    pool.release(buffer)
                    failures.append((offset, exc))
                    limit = min(limit, offset)
                    return
                except BaseException:
                    pool.release(buffer)
                    raise
                await out.send(Chunk(offset, length, buffer, runs))

    async with send:
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, workers)):
                tg.start_soon(worker, send.clone())
        if failures:
            # Every chunk below the lowest failure was handed out before it and read.
            raise min(failures, key=lambda failure: failure[0])[1]
