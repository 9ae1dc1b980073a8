"""The pipeline's memory: a fixed pool of I/O buffers, and the items that carry them.

The pool is the pipeline's memory bound and its back-pressure: a reader that finds no
free buffer waits until the sink has written one out.  All buffers are slices of one
``mmap`` so that, with isolation on, the guest process can fill them in place (the
mmap is then backed by a memfd it maps too).

A :class:`Chunk` carries a buffer from the reader through the windower to the encoder;
a :class:`WriteOp` carries it (with the container's metadata) from the encoder to the
sink, which gives it back to the pool.  They live here, below the stages, so that no
stage imports another: see docs/architecture.md ("The flow").
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

MiB = 1024 * 1024
DEFAULT_UNIT = 4 * MiB  # a thread hand-off costs ~100 µs: move megabytes per hand-off
DEFAULT_COUNT = 8


@dataclass(eq=False)
class Buffer:
    index: int
    view: memoryview  # the whole slot; stages use ``view[:length]``


@dataclass(eq=False)
class Chunk:
    """``length`` bytes at ``offset`` (virtual-disk or output offset, per stage) in ``buffer``."""

    offset: int
    length: int
    buffer: Buffer

    @property
    def data(self) -> memoryview:
        return self.buffer.view[: self.length]


Bytes = bytes | memoryview


@dataclass(eq=False)
class WriteOp:
    """Writes for the sink; ``chunk`` goes back to the pool once they are done."""

    writes: list[tuple[int, Bytes]]
    chunk: Chunk | None = None
    data_bytes: int = 0  # window bytes in this op, for progress


class BufferPool:
    def __init__(
        self, count: int = DEFAULT_COUNT, size: int = DEFAULT_UNIT, memory: mmap.mmap | None = None
    ) -> None:
        if count < 2 or size < 4096 or size % 4096:
            raise ValueError("a pool needs at least 2 buffers of a multiple of 4 KiB")
        if memory is None:
            memory = mmap.mmap(-1, count * size)
        elif len(memory) < count * size:
            raise ValueError("the pool's memory is smaller than count * size")
        self.memory = memory
        self.size = size
        self.count = count
        whole = memoryview(memory)
        self._buffers = [Buffer(i, whole[i * size : (i + 1) * size]) for i in range(count)]
        self._send: MemoryObjectSendStream[Buffer]
        self._receive: MemoryObjectReceiveStream[Buffer]
        self._send, self._receive = anyio.create_memory_object_stream[Buffer](count)
        for buffer in self._buffers:
            self._send.send_nowait(buffer)

    async def acquire(self) -> Buffer:
        return await self._receive.receive()

    def release(self, buffer: Buffer) -> None:
        self._send.send_nowait(buffer)

    def close(self) -> None:
        """Drop the views so the mmap can be closed (by whoever owns it)."""
        self._send.close()
        self._receive.close()
        for buffer in self._buffers:
            buffer.view.release()
        self._buffers.clear()
