"""Stage 1, the reader: fills pool buffers from the virtual disk, in worker threads.

Several workers read disjoint chunks at once, so a decoder that decompresses (and
releases the GIL) keeps both cores busy; the windower puts the chunks back in order.
"""

from __future__ import annotations

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from aiodd.formats.base import VirtualDisk
from aiodd.pipeline.buffers import BufferPool, Chunk


async def read_window(
    disk: VirtualDisk,
    start: int,
    end: int,
    pool: BufferPool,
    send: MemoryObjectSendStream[Chunk],
    workers: int = 2,
) -> None:
    """Send ``[start, end)`` of ``disk`` as chunks of at most ``pool.size`` bytes."""
    next_offset = start

    async def worker(out: MemoryObjectSendStream[Chunk]) -> None:
        nonlocal next_offset
        async with out:
            while True:
                # Take the buffer before the offset: a chunk that has an offset always
                # has a buffer, so the windower's reordering can never starve it.
                buffer = await pool.acquire()
                if next_offset >= end:
                    pool.release(buffer)
                    return
                offset = next_offset
                length = min(pool.size, end - offset)
                next_offset += length
                try:
                    await anyio.to_thread.run_sync(disk.read_into, offset, buffer.view[:length])
                except BaseException:
                    pool.release(buffer)
                    raise
                await out.send(Chunk(offset, length, buffer))

    async with send, anyio.create_task_group() as tg:
        for _ in range(max(1, workers)):
            tg.start_soon(worker, send.clone())
