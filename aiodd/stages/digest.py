"""The digest stage (``--checksum``): hashes the output's data stream on its way from the
windower to the encoder.

The windower's stream is the output's virtual disk in order, from offset 0, up to the
plan's ``data_size``; past it, up to the virtual size, the output reads as zeros (a
VHD's blocks of CHS padding), which are hashed last from a small zero buffer.  So the
digest is that of the whole guest-visible disk, exactly what converting the output back
to raw gives (docs/usage.md, "Checksum").

Each chunk is hashed in a worker thread (hashlib releases the GIL on large buffers) and
then passed on: the hashing of one chunk overlaps the writing of the one before it.
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
    async with receive, send:
        async for chunk in receive:
            try:
                await anyio.to_thread.run_sync(hasher.update, chunk.data)
            except BaseException:
                pool.release(chunk.buffer)  # not handed on: back to the pool
                raise
            await send.send(chunk)
        if padding > 0:
            await anyio.to_thread.run_sync(_pad, hasher, padding)
