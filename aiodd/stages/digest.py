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

The thread runs for the whole copy and takes its chunks from a queue
(:class:`~aiodd.workers.WorkerThreads`), so it never waits for the event loop between
two of them: on a 1 GiB copy the hash is the slower branch, and a hand-off per batch
left it idle for 5 % of the copy (docs/performance.md, "The hash alone").
"""

from __future__ import annotations

from aiodd._typing_names import Protocol

TYPE_CHECKING = False
if TYPE_CHECKING:  # the copy without an event loop hashes with this module too
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from aiodd.buffers import BufferPool, Chunk

_ZERO_PIECE = bytes(1 << 20)


class Hasher(Protocol):
    """What the stage needs of a ``hashlib`` object."""

    def update(self, data: bytes | memoryview, /) -> None: ...


def hash_zeros(hasher: Hasher, length: int) -> None:
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
    import anyio

    from aiodd.workers import WorkerThreads

    def hashed(chunk: Chunk, error: BaseException | None) -> None:
        pool.release(chunk.buffer)
        if error is not None:
            raise error

    hash_thread = WorkerThreads(lambda chunk: hasher.update(chunk.data), hashed)
    # The encoder hears of the end at once (``send`` closes first); the hash may finish
    # after it.
    async with hash_thread.running(), receive, send:
        async for chunk in receive:
            pool.hold(chunk.buffer)  # the hash's release, beside the sink's
            hash_thread.put(chunk)
            await send.send(chunk)
    if padding > 0:
        await anyio.to_thread.run_sync(hash_zeros, hasher, padding)
