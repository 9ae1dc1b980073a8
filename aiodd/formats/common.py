"""What several formats share: units, the layout error, and the reading steps every
decoder of a chained format repeats.  Pure; no I/O but through the interfaces of
:mod:`aiodd.formats.base`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from aiodd._typing_names import Generic, TypeVar
from aiodd.errors import ImageError
from aiodd.formats.units import SECTOR as SECTOR  # the decoders' room for the units
from aiodd.formats.units import KiB as KiB
from aiodd.formats.units import MiB as MiB
from aiodd.formats.units import div_round_up as div_round_up
from aiodd.formats.units import round_up as round_up
from aiodd.formats.zeros import zero_fill as zero_fill  # and for zeroing

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import RandomAccessFile, VirtualDisk

_Key = TypeVar("_Key", bound=Hashable)
_Table = TypeVar("_Table")


class LayoutError(ImageError):
    """A structure is invalid, found by a layout function that is not told the file's
    name: the decoder names the file (:func:`naming`).  Its text is the message alone."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)
        self.args = (self.detail,)


@contextmanager
def naming(file: str, fmt: str) -> Iterator[None]:
    """Turn the :class:`LayoutError` raised inside into an :class:`ImageError` naming
    ``file``: the one place a decoder adds the context a layout does not have."""
    try:
        yield
    except LayoutError as exc:
        raise ImageError(file, exc.detail, fmt) from None


def block_pieces(
    offset: int, buf: memoryview, block: int
) -> Iterator[tuple[int, int, int, memoryview]]:
    """``buf``, the virtual disk's bytes from ``offset``, cut where its blocks of
    ``block`` bytes end: (the block's index, the offset in it, the position in ``buf``,
    the piece of ``buf``) each."""
    pos = 0
    total = len(buf)
    while pos < total:
        index, within = divmod(offset + pos, block)
        n = min(block - within, total - pos)
        yield index, within, pos, buf[pos : pos + n]
        pos += n


def read_parent(parent: VirtualDisk | None, offset: int, view: memoryview) -> None:
    """``view`` from ``parent`` (a backing file, a parent disk) at ``offset``: zeros past
    its end, or all zeros without one, as qemu reads what no layer holds."""
    inside = 0 if parent is None else max(0, min(len(view), parent.virtual_size - offset))
    if inside:
        assert parent is not None
        parent.read_into(offset, view[:inside])
    if inside < len(view):
        zero_fill(view[inside:])


def bit_runs(
    bitmap: bytes, first: int, last: int, base: int, *, msb_first: bool
) -> list[tuple[int, int, int]]:
    """Runs ``(start, end, bit)`` of sectors ``first..last`` (inclusive) with equal bits;
    ``bitmap`` starts at sector ``base``, each byte's most (VHD) or least (VHDX)
    significant bit first."""
    flip = 7 if msb_first else 0

    def bit(rel: int) -> int:
        return (bitmap[rel >> 3] >> ((rel & 7) ^ flip)) & 1

    runs = []
    start = first
    current = bit(first - base)
    sector = first + 1
    while sector <= last:
        rel = sector - base
        if rel & 7 == 0 and sector + 8 <= last + 1 and bitmap[rel >> 3] == (0xFF if current else 0):
            sector += 8
            continue
        b = bit(rel)
        if b != current:
            runs.append((start, sector, current))
            start, current = sector, b
        sector += 1
    runs.append((start, last + 1, current))
    return runs


def read_by_bitmap(
    view: memoryview,
    start: int,
    *,
    bitmap: RandomAccessFile,
    bitmap_at: int,
    origin: int,
    sector: int,
    msb_first: bool,
    read_here: Callable[[int, memoryview], None],
    parent: VirtualDisk | None,
    voffset: int,
    truncated: str,
    fmt: str,
) -> None:
    """Fill ``view`` by a sector bitmap, as the differencing disks of VHD and VHDX read:
    where a sector's bit is set from this layer, ``read_here(lo, part)`` (``lo`` relative
    to ``view``), where it is clear from ``parent`` at ``voffset + lo``.

    ``view`` holds the bytes from ``start`` in the bitmap's numbering, whose bit 0 is
    sector ``origin``; the bitmap is read from ``bitmap`` at ``bitmap_at``, just the
    bytes the range needs; ``truncated`` is the message when they are not all there.
    """
    first = start // sector
    last = (start + len(view) - 1) // sector
    byte0 = (first - origin) // 8
    count = (last - origin) // 8 - byte0 + 1
    bits = bitmap.pread(bitmap_at + byte0, count)
    if len(bits) < count:
        raise ImageError(bitmap.name, truncated, fmt)
    end = start + len(view)
    for lo_s, hi_s, b in bit_runs(bits, first, last, origin + byte0 * 8, msb_first=msb_first):
        lo, hi = max(lo_s * sector, start) - start, min(hi_s * sector, end) - start
        if b:
            read_here(lo, view[lo:hi])
        else:
            read_parent(parent, voffset + lo, view[lo:hi])


class MappedDisk:
    """What the disks of qcow2, qcow and qed share: the file, a backing disk (or none), reads
    clamped to the virtual size (zeros past it) and handed to ``_read``, errors naming
    the file.  A subclass sets ``format_name`` and implements ``_read``."""

    format_name = ""

    def __init__(
        self, file: RandomAccessFile, backing: VirtualDisk | None, virtual_size: int
    ) -> None:
        self._file = file
        self._backing = backing
        self._virtual_size = virtual_size

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    @property
    def backing(self) -> VirtualDisk | None:
        return self._backing

    def close(self) -> None:
        if self._backing is not None:
            self._backing.close()
        self._file.close()

    def _error(self, message: str) -> ImageError:
        return ImageError(self._file.name, message, self.format_name)

    def read_into(self, offset: int, buf: memoryview) -> None:
        total = len(buf)
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        stop = min(total, max(0, self._virtual_size - offset))
        if stop < total:
            zero_fill(buf[stop:total])
        if stop:
            self._read(offset, buf, stop)

    def _read(self, base: int, buf: memoryview, stop: int) -> None:
        """Fill ``buf[:stop]`` with the virtual bytes from ``base`` (inside the disk)."""
        raise NotImplementedError


class TableCache(Generic[_Key, _Table]):
    """A bounded LRU of the tables a disk has read, for threads reading at once: a table
    is loaded outside the lock (two threads may both load one; either copy serves)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._tables: OrderedDict[_Key, _Table] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, key: _Key, load: Callable[[], _Table]) -> _Table:
        """The table under ``key``, from ``load()`` (which may raise) when not held."""
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                return table
        table = load()
        with self._lock:
            self._tables[key] = table
            self._tables.move_to_end(key)
            while len(self._tables) > self._limit:
                self._tables.popitem(last=False)
        return table


class Runs:
    """One read of a table-mapped disk, as coalesced runs: clusters that follow each other
    in the file become one ``readinto``, neighbouring zero or parent pieces one fill or
    one read of the parent.  Positions are in ``buf``; ``base`` is the virtual offset of
    ``buf[0]``.  Used by the formats whose tables map whole clusters (qcow, qed)."""

    __slots__ = ("base", "buf", "file", "kind", "length", "parent", "source", "start")

    NONE, DATA, ZERO, PARENT = 0, 1, 2, 3

    def __init__(
        self, file: RandomAccessFile, parent: VirtualDisk | None, base: int, buf: memoryview
    ) -> None:
        self.file = file
        self.parent = parent
        self.base = base
        self.buf = buf
        self.kind = Runs.NONE
        self.start = 0
        self.length = 0
        self.source = 0  # the file offset of a data run

    def add(self, kind: int, start: int, length: int, source: int = 0) -> None:
        """Pieces come in order: ``buf[start:start + length]`` is ``kind`` (from file
        offset ``source`` for data)."""
        if kind == self.kind and (kind != Runs.DATA or self.source + self.length == source):
            self.length += length
            return
        self.flush()
        self.kind, self.start, self.length, self.source = kind, start, length, source

    def flush(self) -> None:
        kind, start, length = self.kind, self.start, self.length
        self.kind = Runs.NONE
        view = self.buf[start : start + length]
        if kind == Runs.DATA:
            n = self.file.readinto(self.source, view)
            if n < length:  # a cluster the file's end cuts: zeros, as qemu reads them
                zero_fill(view[n:])
        elif kind == Runs.ZERO:
            zero_fill(view)
        elif kind == Runs.PARENT:
            read_parent(self.parent, self.base + start, view)
