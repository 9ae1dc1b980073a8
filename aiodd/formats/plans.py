"""Pure helpers shared by the output plans: identity (UUIDs, timestamps), zero padding,
table packing and the strided data layout every sparse format reduces to once it is
written densely."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache

from aiodd._typing_names import NamedTuple, Protocol
from aiodd.formats.base import Extent
from aiodd.formats.common import MiB

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal, TypeAlias

    ByteOrder: TypeAlias = Literal["big", "little"]

# Zero padding is handed out in pieces of at most this size, so a 64 MiB VHDX block
# tail never sits in memory at once.
ZERO_CHUNK = MiB
_ZEROS = bytes(ZERO_CHUNK)
_NATIVE: ByteOrder = "little" if sys.byteorder == "little" else "big"


# The records of the output plans are NamedTuples and plain classes, not dataclasses:
# importing dataclasses (with inspect) costs every copy milliseconds of start-up
# (docs/performance.md, "Start-up").
class Identity(NamedTuple):
    """What makes one output image distinct from another of the same size: the seed its
    UUIDs and IDs are derived from, and its creation time (Unix seconds).

    :meth:`fresh` gives fresh randomness and the current time, as qemu-img gives each
    image it creates; tests pass a fixed identity to get byte-reproducible metadata.
    """

    seed: bytes
    timestamp: int

    @classmethod
    def fresh(cls) -> Identity:
        return cls(os.urandom(16), int(time.time()))

    def guid(self, label: str) -> bytes:
        """16 bytes shaped as a random (version 4, RFC 4122 variant) UUID."""
        raw = bytearray(hashlib.sha256(self.seed + label.encode()).digest()[:16])
        raw[6] = (raw[6] & 0x0F) | 0x40
        raw[8] = (raw[8] & 0x3F) | 0x80
        return bytes(raw)

    def u32(self, label: str) -> int:
        return int.from_bytes(hashlib.sha256(self.seed + label.encode()).digest()[:4], "big")


def zeros(offset: int, length: int) -> Iterator[tuple[int, bytes]]:
    """Zero padding at ``[offset, offset + length)`` as metadata blocks of bounded size."""
    end = offset + length
    while offset < end:
        n = min(ZERO_CHUNK, end - offset)
        yield offset, _ZEROS if n == ZERO_CHUNK else bytes(n)
        offset += n


def pad(data: bytes, size: int) -> bytes:
    """``data`` followed by zeros up to ``size`` bytes."""
    if len(data) > size:
        raise ValueError(f"{len(data)} bytes do not fit in {size}")
    return data + bytes(size - len(data))


def strided_extents(
    offset: int, length: int, *, base: int, block: int, stride: int
) -> list[Extent]:
    """Window bytes laid out as blocks of ``block`` bytes, block ``b`` at file offset
    ``base + b * stride`` (``stride == block``: one contiguous run)."""
    if length <= 0:
        return []
    if stride == block:
        return [Extent(base + offset, length)]
    extents: list[Extent] = []
    end = offset + length
    while offset < end:
        index, within = divmod(offset, block)
        n = min(block - within, end - offset)
        extents.append(Extent(base + index * stride + within, n))
        offset += n
    return extents


def pack_u16_ones(count: int) -> bytes:
    """``count`` big-endian 16-bit ones (a qcow2 refcount block's "used once")."""
    return b"\x00\x01" * count


@lru_cache(maxsize=32)
def _lane_template(count: int, step: int, width: int, order: ByteOrder) -> int:
    """The integer whose ``width``-byte lanes (lane 0 first in the byte string) hold
    ``k * step``."""
    table = array("I" if width == 4 else "Q", range(0, count * step, step))
    if table.itemsize != width:  # pragma: no cover - no supported platform
        raise RuntimeError("array item sizes differ from 4 and 8 bytes")
    if order != _NATIVE:
        table.byteswap()
    return int.from_bytes(table.tobytes(), order)


def lanes(first: int, count: int, step: int, width: int, order: ByteOrder) -> bytes:
    """``count`` unsigned ``width``-byte integers ``first + k * step`` in byte order
    ``order``: a table of consecutive offsets (an L2 table, a grain table, a BAT run).

    One big-integer addition adds ``first`` to every lane of a cached template at once:
    no lane overflows into the next, so the lanes add independently.  About ten times
    faster than packing an array built from a ``range`` of large integers.
    """
    if count <= 0:
        return b""
    if first < 0 or first + (count - 1) * step >= 1 << (8 * width):
        raise ValueError("table entry out of range")
    base = int.from_bytes(first.to_bytes(width, order) * count, order)
    return (_lane_template(count, step, width, order) + base).to_bytes(width * count, order)


def without_zeros(blocks: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """Metadata blocks as a sparse output writes them: trailing zeros cut off and blocks
    of nothing but zeros left out, as a fresh file reads zeros wherever nothing was
    written (the file's size is set at the end)."""
    for offset, data in blocks:
        kept = data.rstrip(b"\0")
        if kept:
            yield offset, kept


Render = Callable[[int, "array[int] | None"], list[tuple[int, bytes]]]


class Packer:
    """Where a sparse output's blocks go, decided as the data stream passes by.

    The virtual disk is cut in ``blocks`` blocks of ``block`` bytes.  A block gets the
    next free slot the first time a run of data reaches it, slot ``s`` at file offset
    ``base + s * stride``; the stream comes in order, so the slots follow the blocks'
    order and the file holds no gap, as qemu appends the blocks it allocates.  A block
    no data reaches gets none.

    The blocks' table entries come in tables of ``per_table`` blocks (an L2 table, a
    grain table, a piece of a BAT).  Once none of a table's blocks can get a slot any
    more, ``render(index, slots)`` turns it into metadata blocks, with each block's slot
    (-1: none), or ``None`` when none of them has one; so only one table is held in
    memory, whatever the size of the disk.
    """

    def __init__(
        self, *, block: int, blocks: int, per_table: int, base: int, stride: int, render: Render
    ) -> None:
        self.block = block
        self.blocks = blocks
        self.per_table = per_table
        self.base = base
        self.stride = stride
        self.count = 0  # slots given
        self._render = render
        self._tables = -(-blocks // per_table)
        self._table = 0  # the first table not rendered yet
        self._slots: array[int] | None = None  # its slots, once one of its blocks has one
        self._last = -1  # the last block given a slot
        self._ready: list[tuple[int, bytes]] = []

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The file extents of data bytes ``[offset, offset + length)``; the blocks they
        touch get slots.  Offsets must not go back to a block before the last one."""
        extents: list[Extent] = []
        end = offset + length
        while offset < end:
            index, within = divmod(offset, self.block)
            n = min(self.block - within, end - offset)
            where = self.base + self._slot(index) * self.stride + within
            if extents and extents[-1].file_offset + extents[-1].length == where:
                extents[-1] = Extent(extents[-1].file_offset, extents[-1].length + n)
            else:
                extents.append(Extent(where, n))
            offset += n
        return extents

    def _slot(self, index: int) -> int:
        if index == self._last:
            return self.count - 1
        table, entry = divmod(index, self.per_table)
        if index < self._last or table < self._table or not 0 <= index < self.blocks:
            raise ValueError(f"block {index} placed out of order or outside the disk")
        self._finish_tables(table)
        if self._slots is None:
            self._slots = array("q", [-1]) * self.per_table
        self._slots[entry] = self.count
        self._last = index
        self.count += 1
        return self.count - 1

    def _finish_tables(self, upto: int) -> None:
        """Render every table before table ``upto``."""
        while self._table < min(upto, self._tables):
            self._ready += self._render(self._table, self._slots)
            self._table += 1
            self._slots = None

    def ready(self, offset: int) -> list[tuple[int, bytes]]:
        """The metadata blocks of the tables whose blocks all lie before ``offset``."""
        self._finish_tables(offset // (self.block * self.per_table))
        ready, self._ready = self._ready, []
        return ready

    def finish(self) -> list[tuple[int, bytes]]:
        """The metadata blocks of every table not rendered yet."""
        self._finish_tables(self._tables)
        ready, self._ready = self._ready, []
        return ready


class _Sized(Protocol):
    @property
    def virtual_size(self) -> int: ...

    @property
    def data_size(self) -> int: ...


class PackedPlan:
    """What a sparse plan over a dense one shares with the others: the dense plan's
    sizes, and data bytes placed by a :class:`Packer` as the stream passes.  A subclass
    sets ``dense`` and ``_packer``."""

    dense: _Sized
    _packer: Packer

    @property
    def virtual_size(self) -> int:
        return self.dense.virtual_size

    @property
    def data_size(self) -> int:
        return self.dense.data_size

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        return self._packer.extents(offset, length)

    def ready(self, offset: int) -> list[tuple[int, bytes]]:
        return self._packer.ready(offset)


def table_entries(
    slots: array[int],
    count: int,
    base: int,
    step: int,
    width: int,
    order: ByteOrder,
    *,
    flag: int = 0,
    empty: int = 0,
) -> bytes:
    """The first ``count`` entries of a table: ``(base + slot * step) | flag`` for a block
    with a slot, ``empty`` for one without, ``width``-byte integers in byte order ``order``."""
    values = array(
        "I" if width == 4 else "Q",
        [(base + slot * step) | flag if slot >= 0 else empty for slot in slots[:count]],
    )
    if values.itemsize != width:  # pragma: no cover - no supported platform
        raise RuntimeError("array item sizes differ from 4 and 8 bytes")
    if order != _NATIVE:
        values.byteswap()
    return values.tobytes()
