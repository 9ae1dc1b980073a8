"""Stage 2, the block windower: turns disk chunks into the output's data stream.

It restores the order the readers lost, moves offsets from the disk's ``[start, end)``
to the output's ``[0, out)``, and appends the zero tail up to the output plan's
``data_size`` (the 512-byte rounding; for VHD, the end of the last block the window
touches, capped at the CHS-rounded size).
"""

from __future__ import annotations

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from aiodd.buffers import BufferPool, Chunk


async def window_stream(
    start: int,
    end: int,
    padded_size: int,
    pool: BufferPool,
    receive: MemoryObjectReceiveStream[Chunk],
    send: MemoryObjectSendStream[Chunk],
) -> None:
    async with receive, send:
        expected = start
        pending: dict[int, Chunk] = {}
        async for chunk in receive:
            pending[chunk.offset] = chunk
            while expected in pending:
                ready = pending.pop(expected)
                expected += ready.length
                await send.send(Chunk(ready.offset - start, ready.length, ready.buffer, ready.runs))
        if pending or expected < end:
            raise RuntimeError(f"reader stopped at {expected:#x} of {end:#x}")
        offset = max(0, end - start)
        while offset < padded_size:
            buffer = await pool.acquire()
            length = min(pool.size, padded_size - offset)
            buffer.view[:length] = bytes(length)
            await send.send(Chunk(offset, length, buffer, runs=[]))  # zeros, and known to be
            offset += length
