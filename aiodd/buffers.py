"""The pipeline's memory: a fixed pool of I/O buffers, and the items that carry them.

The pool is the pipeline's memory bound and its back-pressure: a reader that finds no
free buffer waits until the sink has written one out.  All buffers are slices of one
``mmap`` so that, with isolation on, the guest process can fill them in place (the
mmap is then backed by a memfd it maps too); without a guest, one private to this
process (:func:`private_memory`).

A :class:`Chunk` carries a buffer from the reader through the windower to the encoder;
a :class:`WriteOp` carries it (with the container's metadata) from the encoder to the
sink, which gives it back to the pool.  They live here, below the stages, so that no
stage imports another: see docs/architecture.md ("The flow").
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Sequence

from aiodd.io import buffer_address, libc_function

TYPE_CHECKING = False
if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

MiB = 1024 * 1024
DEFAULT_UNIT = 4 * MiB  # a thread hand-off costs ~100 µs: move megabytes per hand-off
DEFAULT_COUNT = 8
# The unit in which --sparse finds zeros: a page, the block of the common filesystems, and
# a divisor of every output format's cluster, grain and block (docs/usage.md, "Sparse").
ZERO_GRANULE = 4096

Run = tuple[int, int]  # (offset, length)


# Plain classes with slots, not dataclasses: importing dataclasses (with inspect) costs
# every copy milliseconds of start-up (docs/performance.md, "Start-up").  Compared by
# identity: two chunks of equal bytes are still two hand-offs.
class Buffer:
    __slots__ = ("index", "view")

    def __init__(self, index: int, view: memoryview) -> None:
        self.index = index
        self.view = view  # the whole slot; stages use ``view[:length]``


class Chunk:
    """``length`` bytes at ``offset`` (virtual-disk or output offset, per stage) in ``buffer``."""

    __slots__ = ("buffer", "length", "offset", "runs")

    def __init__(
        self, offset: int, length: int, buffer: Buffer, runs: list[Run] | None = None
    ) -> None:
        self.offset = offset
        self.length = length
        self.buffer = buffer
        # The parts that hold a non-zero byte, relative to ``offset``, at ZERO_GRANULE
        # (aligned to the output's offsets); None when nobody looked (then all of it is
        # data).
        self.runs = runs

    def __repr__(self) -> str:
        return f"Chunk(offset={self.offset}, length={self.length}, buffer={self.buffer.index})"

    @property
    def data(self) -> memoryview:
        return self.buffer.view[: self.length]


Bytes = bytes | memoryview


class WriteOp:
    """Writes for the sink; ``chunk`` goes back to the pool once they are done."""

    __slots__ = ("chunk", "data_bytes", "writes")

    def __init__(
        self, writes: list[tuple[int, Bytes]], chunk: Chunk | None = None, data_bytes: int = 0
    ) -> None:
        self.writes = writes
        self.chunk = chunk
        self.data_bytes = data_bytes  # window bytes in this op, for progress


_ZERO_GRANULE_BYTES = bytes(ZERO_GRANULE)


def data_runs(
    view: memoryview, granule: int = ZERO_GRANULE, holes: Sequence[Run] = ()
) -> list[Run]:
    """The runs of ``view`` that hold a non-zero byte, in whole granules from its start
    (the last one may be short), merged: ``[]`` for all zeros, ``[(0, len)]`` for data.

    ``holes``, ranges ``(start, length)`` known to be zeros (in order, not overlapping:
    a disk's report), are not looked at; only the granules outside them are.  One
    ``memcmp`` of a stretch with itself one byte further settles a stretch that is all
    zeros (about 80 GB/s here) or starts with data; then each 64 KiB of one that is not,
    and only then its granules one by one.  A read-only view (never a pool buffer) is
    compared by copies.
    """
    if not holes:
        return _data_runs(view, granule)
    runs: list[Run] = []
    n = len(view)
    at = 0
    for start, length in (*holes, (n, 0)):
        # The granules that a known hole does not cover wholly are looked at.
        lo = at - at % granule
        hi = min(n, -(-start // granule) * granule)
        if lo < hi:
            for rel, size in _data_runs(view[lo:hi], granule):
                first, end = runs[-1] if runs else (0, 0)
                end += first
                if runs and end >= lo + rel:  # the granule two stretches share, or adjacent
                    runs[-1] = (first, max(end, lo + rel + size) - first)
                else:
                    runs.append((lo + rel, size))
        at = max(at, start + length)
    return runs


def _data_runs(view: memoryview, granule: int) -> list[Run]:
    n = len(view)
    if not n:
        return []
    # libc's memcmp compares in place and releases the GIL.
    memcmp = libc_function(("memcmp",), ("c_void_p", "c_void_p", "c_size_t"))
    address = buffer_address(view) if memcmp is not None else None
    if memcmp is not None and address:

        def is_zero(at: int, length: int) -> bool:
            # Each byte equal to the next one, and the first one zero (the callers
            # test it first): no zero buffer to compare with, and one stream of memory.
            return memcmp(address + at, address + at + 1, length - 1) == 0
    else:

        def is_zero(at: int, length: int) -> bool:
            piece = view[at : at + length]
            return bytes(piece) == (
                _ZERO_GRANULE_BYTES if length == ZERO_GRANULE else bytes(length)
            )

    if view[0] == 0 and is_zero(0, n):
        return []
    runs: list[Run] = []
    start = -1  # where the run of data being built began
    coarse = granule * 16
    for outer in range(0, n, coarse):
        outer_end = min(outer + coarse, n)
        if view[outer] == 0 and is_zero(outer, outer_end - outer):
            if start >= 0:
                runs.append((start, outer - start))
                start = -1
            continue
        for at in range(outer, outer_end, granule):
            # A first byte that is not zero settles most granules of data without a call.
            if view[at] != 0 or not is_zero(at, min(granule, n - at)):
                if start < 0:
                    start = at
            elif start >= 0:
                runs.append((start, at - start))
                start = -1
    if start >= 0:
        runs.append((start, n - start))
    return runs


def private_memory(size: int) -> mmap.mmap:
    """``size`` bytes of buffers that no other process maps, in huge pages where the
    kernel offers them to a program that asks (transparent huge pages, ``madvise``).

    An ``O_DIRECT`` write goes to the disk as requests of at most ``max_segments``
    pieces of physically contiguous memory, about 1 MiB of 4 KiB pages: from 2 MiB
    pages, a 4 MiB write is one request.  On a virtual disk that serves requests one at
    a time, that halved the time of a durable copy (docs/performance.md, "Huge pages
    for the buffers").  Private, not shared: the kernel gives a program's shared memory
    huge pages only where its administrator turned that on (``shmem_enabled``).
    """
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        # A kernel without transparent huge pages refuses: small pages it is.
        with contextlib.suppress(OSError):
            memory.madvise(advice)
    return memory


class BufferPool:
    def __init__(
        self, count: int = DEFAULT_COUNT, size: int = DEFAULT_UNIT, memory: mmap.mmap | None = None
    ) -> None:
        if count < 2 or size < 4096 or size % 4096:
            raise ValueError("a pool needs at least 2 buffers of a multiple of 4 KiB")
        if memory is None:
            memory = private_memory(count * size)
        elif len(memory) < count * size:
            raise ValueError("the pool's memory is smaller than count * size")
        self.memory = memory
        self.size = size
        self.count = count
        whole = memoryview(memory)
        self._buffers = [Buffer(i, whole[i * size : (i + 1) * size]) for i in range(count)]
        self._holds = [0] * count  # releases still owed before a buffer is free again
        self._send: MemoryObjectSendStream[Buffer]
        self._receive: MemoryObjectReceiveStream[Buffer]
        import anyio  # here: a short copy (aiodd.api) needs the constants, not the pool

        self._send, self._receive = anyio.create_memory_object_stream[Buffer](count)
        for buffer in self._buffers:
            self._send.send_nowait(buffer)

    async def acquire(self) -> Buffer:
        return await self._receive.receive()

    def hold(self, buffer: Buffer) -> None:
        """One more :meth:`release` is needed before ``buffer`` is free: a second stage
        reads it beside the first (the digest, beside the encoder and the sink)."""
        self._holds[buffer.index] += 1

    def release(self, buffer: Buffer) -> None:
        if self._holds[buffer.index]:
            self._holds[buffer.index] -= 1
            return
        self._send.send_nowait(buffer)

    def close(self) -> None:
        """Drop the views so the mmap can be closed (by whoever owns it)."""
        self._send.close()
        self._receive.close()
        for buffer in self._buffers:
            buffer.view.release()
        self._buffers.clear()
