"""Stage 3, the format encoder: places the output data stream in the container.

The output plan (a pure function of the window's length, made by the output format's
own ``encode`` module) says which file offsets each data byte goes to and which
metadata blocks surround it; this stage only turns that into write operations for the
sink.

A sparse output (``--sparse``) has a :class:`~aiodd.formats.base.SparsePlan` instead:
:func:`encode_sparse` gives it only the runs of each chunk that hold data (the reader
found them), writes nothing for the zeros, and adds the metadata that each chunk made
final, then the rest at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiodd.buffers import Bytes, WriteOp

TYPE_CHECKING = False
if TYPE_CHECKING:  # the copy without an event loop batches metadata here too, without anyio
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from aiodd.buffers import Chunk
    from aiodd.formats.base import OutputPlan, SparsePlan

# Metadata blocks are small and many (L2 tables, BAT pages): batch them into writes
# of about a pool buffer so each thread hand-off moves enough bytes.
METADATA_BATCH = 4 * 1024 * 1024


def metadata_batches(
    blocks: Iterator[tuple[int, bytes]],
) -> Iterator[list[tuple[int, Bytes]]]:
    batch: list[tuple[int, Bytes]] = []
    size = 0
    for offset, data in blocks:
        batch.append((offset, data))
        size += len(data)
        if size >= METADATA_BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def place(plan: OutputPlan, offset: int, data: memoryview) -> list[tuple[int, Bytes]]:
    """The writes that put ``data``, the data stream's bytes at ``offset``, where ``plan``
    says they go."""
    writes: list[tuple[int, Bytes]] = []
    pos = 0
    for extent in plan.data_extents(offset, len(data)):
        writes.append((extent.file_offset, data[pos : pos + extent.length]))
        pos += extent.length
    if pos != len(data):
        raise RuntimeError(f"output plan mapped {pos} of {len(data)} bytes at {offset:#x}")
    return writes


async def encode_stream(
    plan: OutputPlan,
    receive: MemoryObjectReceiveStream[Chunk],
    send: MemoryObjectSendStream[WriteOp],
) -> None:
    async with receive, send:
        for batch in metadata_batches(plan.metadata()):
            await send.send(WriteOp(batch))
        async for chunk in receive:
            await send.send(WriteOp(place(plan, chunk.offset, chunk.data), chunk, chunk.length))


async def encode_sparse(
    plan: SparsePlan,
    receive: MemoryObjectReceiveStream[Chunk],
    send: MemoryObjectSendStream[WriteOp],
) -> None:
    async with receive, send:
        for batch in metadata_batches(plan.head()):
            await send.send(WriteOp(batch))
        async for chunk in receive:
            data = chunk.data
            writes: list[tuple[int, Bytes]] = []
            runs = [(0, chunk.length)] if chunk.runs is None else chunk.runs
            for start, length in runs:
                pos = start
                for extent in plan.data_extents(chunk.offset + start, length):
                    writes.append((extent.file_offset, data[pos : pos + extent.length]))
                    pos += extent.length
                if pos != start + length:
                    raise RuntimeError(
                        f"sparse plan mapped {pos - start} of {length} bytes"
                        f" at {chunk.offset + start:#x}"
                    )
            writes += plan.ready(chunk.offset + chunk.length)
            await send.send(WriteOp(writes, chunk, chunk.length))
        for batch in metadata_batches(plan.finish()):
            await send.send(WriteOp(batch))
