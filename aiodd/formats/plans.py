"""Pure helpers shared by the output plans: identity (UUIDs, timestamps), zero padding,
table packing and the strided data layout every sparse format reduces to once it is
written densely."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from aiodd.formats.base import Extent
from aiodd.formats.common import MiB

# Zero padding is handed out in pieces of at most this size, so a 64 MiB VHDX block
# tail never sits in memory at once.
ZERO_CHUNK = MiB
_ZEROS = bytes(ZERO_CHUNK)
_NATIVE: Literal["big", "little"] = "little" if sys.byteorder == "little" else "big"


@dataclass(frozen=True)
class Identity:
    """What makes one output image distinct from another of the same size: the seed its
    UUIDs and IDs are derived from, and its creation time (Unix seconds).

    The default is fresh randomness and the current time, as qemu-img gives each image
    it creates; tests pass a fixed identity to get byte-reproducible metadata.
    """

    seed: bytes = field(default_factory=lambda: os.urandom(16))
    timestamp: int = field(default_factory=lambda: int(time.time()))

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


ByteOrder = Literal["big", "little"]


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
