"""The digest stage (``--checksum``): hashes the output's data stream on its way from the
windower to the encoder.

The windower's stream is the output's virtual disk in order, from offset 0, up to the
plan's ``data_size``; past it, up to the virtual size, the output reads as zeros (a
VHD's blocks of CHS padding), which are hashed last from a small zero buffer.  So the
digest is that of the whole guest-visible disk, exactly what converting the output back
to raw gives (docs/usage.md, "Checksum").

The stage is a side branch: each chunk goes on to the encoder at once, and one worker
thread hashes the chunks in order beside it (hashlib releases the GIL on large buffers),
so neither the writes nor the hash wait for the other; a chunk's buffer returns to the
pool once both the sink and the hash are done with it (:meth:`BufferPool.hold`).  The
hash falls behind by at most the pool's depth, and the copy ends when both are done.
No stage after the windower writes into a buffer, so the hash reads what is written.

The thread runs for the whole copy and takes its chunks from a queue, so it never waits
for the event loop between two of them: on a 1 GiB copy the hash is the slower branch,
and a hand-off per batch left it idle for 5 % of the copy (docs/performance.md, "The
hash alone").  Each hashed chunk goes back through a second queue, with a byte on a pipe
to wake the loop, which gives its buffer back to the pool.
"""

from __future__ import annotations

import os
from contextlib import suppress
from queue import Empty, SimpleQueue
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
    to_hash: SimpleQueue[Chunk | None] = SimpleQueue()
    hashed: SimpleQueue[Chunk] = SimpleQueue()
    bell, ring = os.pipe()
    os.set_blocking(bell, False)
    failed = False  # the copy is failing: the thread only hands the chunks back

    def hash_all() -> None:
        while (chunk := to_hash.get()) is not None:
            if not failed:
                hasher.update(chunk.data)
            hashed.put(chunk)
            # At most one byte per buffer of the pool is ever unread: never blocks.
            os.write(ring, b"\0")
        if not failed:
            _pad(hasher, padding)

    def release_hashed() -> None:
        while True:
            try:
                chunk = hashed.get_nowait()
            except Empty:
                return
            pool.release(chunk.buffer)

    async def answer_the_bell() -> None:
        while True:
            await anyio.wait_readable(bell)
            with suppress(BlockingIOError):  # read already, by an earlier wake-up
                os.read(bell, 4096)
            release_hashed()

    async def hash_in_thread() -> None:
        try:
            await anyio.to_thread.run_sync(hash_all)
        finally:
            finished.set()

    finished = anyio.Event()
    try:
        async with anyio.create_task_group() as releases:
            releases.start_soon(answer_the_bell)
            async with anyio.create_task_group() as branches:
                branches.start_soon(hash_in_thread)
                try:
                    # The encoder hears of the end at once; the hash may finish after it.
                    async with receive, send:
                        async for chunk in receive:
                            pool.hold(chunk.buffer)  # the hash's release, beside the sink's
                            to_hash.put(chunk)
                            await send.send(chunk)
                except BaseException:
                    failed = True
                    raise
                finally:
                    to_hash.put(None)
                try:
                    await finished.wait()
                except BaseException:  # cancelled: the chunks still queued go unhashed
                    failed = True
                    raise
            releases.cancel_scope.cancel()
        release_hashed()
    finally:
        os.close(bell)
        os.close(ring)
