"""Maps for the Python decoders: a read's reads of the host's files, left to the host.

Under the ``sandbox`` mode the Python decoders decode a read into a staging slot, which
the host copies into its own buffer.  Asked with a map (``Read.map``), the reads they
make of the files the host holds open (the image and the layers it numbered below
:data:`~aiodd.guest.protocol.MAP_LAYERS`) into that read's output are not made here:
each is recorded as an extent, ``(layer, file offset, length, offset in the output)``,
and the host makes it straight into its buffer, which is then the one copy of those
bytes, as inline.  The ``kvm`` mode's VMM does the same for the C decoders
(docs/kvm.md, "Reads the host finishes"); the wire format is the same ``Done.map``.

The decoders' side of it: bytes that a ``readinto`` puts into a disk's output are
final, never read or written again by the decoder in that read
(:class:`~aiodd.formats.base.RandomAccessFile`).  tests/test_guest_maps.py holds every
decoder to it, with the bytes left poisoned until the read ends.

A read of a file past its end is made here (what the file holds there is left, the
rest the decoder handles as it would without a map), and so is a read into any other
buffer.  Past :data:`~aiodd.guest.protocol.MAP_EXTENTS` extents or
:data:`~aiodd.guest.protocol.MAP_FACTOR` times the output's length, the leaving ends:
the reads left so far are made here, in order, and so is every later one; the map is
then empty.
"""

from __future__ import annotations

import _thread
import ctypes  # noqa: F401  # buffer_address's, loaded before the guest seals itself

from aiodd.guest.protocol import MAP_EXTENTS, MAP_FACTOR
from aiodd.io import LocalFile, buffer_address

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import VirtualDisk

# The map of the read this thread is decoding, if it was asked for one.
_reading = _thread._local()


class _Map:
    """One read's extents, and the reads they stand for (made here if the leaving ends)."""

    __slots__ = ("budget", "end", "extents", "left", "over", "reads", "start")

    def __init__(self, out: memoryview) -> None:
        self.start = buffer_address(out) or 0
        self.end = self.start + len(out) if self.start else 0
        self.extents: list[int] = []
        self.reads: list[tuple[LocalFile, int, memoryview]] = []
        self.left = 0
        self.budget = MAP_FACTOR * len(out)
        self.over = False

    def leave(self, file: LocalFile, layer: int, offset: int, buf: memoryview, n: int) -> bool:
        """Record the read of ``n`` bytes of ``file`` at ``offset`` into ``buf``, if
        ``buf`` lies in the output and the map has room; whether it did."""
        at = buffer_address(buf)
        if at is None or not self.start <= at <= self.end - len(buf):
            return False  # a buffer of the decoder's own (a table, a compressed cluster)
        if len(self.extents) >= 4 * MAP_EXTENTS or self.left + n > self.budget:
            self.make_all()
            return False
        self.extents += (layer, offset, n, at - self.start)
        self.reads.append((file, offset, buf[:n]))
        self.left += n
        return True

    def make_all(self) -> None:
        """End the leaving: make the reads left so far, in the order they were asked."""
        self.over = True
        reads, self.reads = self.reads, []
        self.extents.clear()
        for file, offset, buf in reads:
            LocalFile.readinto(file, offset, buf)


class MappableFile(LocalFile):
    """A file the host holds open as its layer ``layer``: read into the output of a read
    being mapped (:func:`read_map`), it leaves the read to the host."""

    def __init__(self, fd: int, name: str, layer: int) -> None:
        super().__init__(fd, name)
        self.layer = layer

    def _left(self, offset: int, buf: memoryview) -> int:
        """How many bytes of the read were left to the host (0: none, make it)."""
        reading: _Map | None = getattr(_reading, "map", None)
        if reading is None or reading.over or offset >= self.size:
            return 0
        n = min(len(buf), self.size - offset)
        return n if n and reading.leave(self, self.layer, offset, buf, n) else 0

    def readinto(self, offset: int, buf: memoryview) -> int:
        return self._left(offset, buf) or super().readinto(offset, buf)

    def readinto_sparse(
        self, offset: int, buf: memoryview, holes: list[tuple[int, int]] | None = None
    ) -> int:
        # The host reads a map's extents through their holes itself.
        return self._left(offset, buf) or super().readinto_sparse(offset, buf, holes)


def read_map(disk: VirtualDisk, offset: int, out: memoryview) -> tuple[int, ...]:
    """Decode ``disk`` at ``offset`` into ``out``, leaving to the host the reads of its
    files that it holds: their extents, four numbers each, in order (protocol.Done)."""
    reading = _Map(out)
    _reading.map = reading
    try:
        disk.read_into(offset, out)
    finally:
        _reading.map = None
    reading.reads.clear()  # the views into ``out``, which its owner may want to release
    return tuple(reading.extents)
