"""The digest stage (``--checksum``): hashes the output's data stream on its way from the
windower to the encoder.

The windower's stream is the output's virtual disk in order, from offset 0, up to the
plan's ``data_size``; past it, up to the virtual size, the output reads as zeros (a
VHD's blocks of CHS padding), which are hashed last from a small zero buffer.  So the
digest is that of the whole guest-visible disk, exactly what converting the output back
to raw gives (docs/usage.md, "Checksum").

The stage is a side branch: each chunk goes on to the encoder at once, and a worker
thread hashes the chunks in order beside it (hashlib releases the GIL on large buffers),
so neither the writes nor the hash wait for the other; a chunk's buffer returns to the
pool once both the sink and the hash are done with it (:meth:`BufferPool.hold`).  The
hash falls behind by at most the pool's depth, and the copy ends when both are done.
No stage after the windower writes into a buffer, so the hash reads what is written.
"""

from __future__ import annotations

from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from aiodd.buffers import BufferPool, Chunk

_ZERO_PIECE = bytes(1 << 20)


class Hasher(Protocol):
    """What the stage needs of a ``hashlib`` object."""

    def update(self, data: bytes | memoryview, /) -> None: ...


def _pad(hasher: Hasher, length: int) -> None:
    """Hash ``length`` zeros, a MiB at a time."""
    while length > 0:
        n = min(length, len(_ZERO_PIECE))
        hasher.update(_ZERO_PIECE if n == len(_ZERO_PIECE) else memoryview(_ZERO_PIECE)[:n])
        length -= n


async def digest_stream(
    hasher: Hasher,
    padding: int,
    pool: BufferPool,
    receive: MemoryObjectReceiveStream[Chunk],
    send: MemoryObjectSendStream[Chunk],
) -> None:
    """Hash every chunk in order, then ``padding`` zeros, passing the chunks on unchanged."""
    hash_tx, hash_rx = anyio.create_memory_object_stream[Chunk](pool.count)

    async def hash_chunks() -> None:
        async with hash_rx:
            async for chunk in hash_rx:
                # Every chunk waiting, in one hand-off to the thread (~100 µs each).
                batch = [chunk]
                while True:
                    try:
                        batch.append(hash_rx.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                try:
                    await anyio.to_thread.run_sync(_update, hasher, batch)
                finally:
                    for done in batch:
                        pool.release(done.buffer)
            if padding > 0:
                await anyio.to_thread.run_sync(_pad, hasher, padding)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hash_chunks)
        # The encoder hears of the end at once; the hash may finish after it.
        async with receive, send, hash_tx:
            async for chunk in receive:
                pool.hold(chunk.buffer)  # the hash's release, beside the sink's
                try:
                    hash_tx.send_nowait(chunk)  # room: the pool has no more chunks
                except BaseException:
                    pool.release(chunk.buffer)  # neither hashed nor handed on
                    pool.release(chunk.buffer)
                    raise
                await send.send(chunk)


def _update(hasher: Hasher, batch: list[Chunk]) -> None:
    for chunk in batch:
        hasher.update(chunk.data)
