"""The interfaces every format plugs into (docs/architecture.md ("The formats")).

Decoders are sans-IO in the sense that matters: they never open a path and import
nothing that does.  They are handed :class:`RandomAccessFile` objects (already opened
by the host under the backing-file policy) and a :class:`Resolver` that turns the
references an image makes (backing file, data file, extents, parents) into more of the
same.  Whether the bytes come from a local descriptor or from the isolated guest
process is not their concern.

Encoders are pure: from the output's geometry they build an :class:`OutputPlan`, which
says where each byte of the window lands in the container file and which metadata
blocks surround it.  A sparse output (``--sparse``) has a :class:`SparsePlan` instead,
which learns which blocks hold data as the data stream passes by, in order, and lays
out only those: still a computation over offsets, fed by the encoder stage.

A format's ``decode`` module satisfies :class:`Decoder` and its ``encode`` module
:class:`Encoder`; the registry (:mod:`aiodd.formats.registry`) has mypy check both.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiodd._typing_names import NamedTuple, Protocol
from aiodd.formats.reference import Reference as Reference

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal, TypeAlias

    ReferenceKind: TypeAlias = Literal["backing", "data_file", "extent", "parent"]


class RandomAccessFile(Protocol):
    """A file opened read-only, read by offset.  Thread-safe (``pread``)."""

    @property
    def name(self) -> str:
        """The name as the user or the referring image spelled it, for messages."""
        ...

    @property
    def size(self) -> int:
        """The file's size in bytes, taken when it was opened."""
        ...

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; shorter only at the end of the file."""
        ...

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the byte count (short only at EOF).

        Into a disk's output, what it reads is final: in that read the decoder neither
        reads those bytes back nor writes them again, but by a later ``readinto`` (a
        child's sectors over its parent's), so a guest may leave the read to the host
        (docs/kvm.md, "Reads the host finishes"; tests/test_guest_maps.py).  A decoder
        that changes what it read reads it elsewhere (``pread``) and copies it in.
        """
        ...

    def close(self) -> None:
        """Release the file; whoever holds it (a disk, a resolver's caller) closes it once."""
        ...


class SparseFile(Protocol):
    """A capability some files have: reading that skips the file's holes.

    A raw disk reads through it when its file has it (a local file knows its holes
    from ``SEEK_DATA``/``SEEK_HOLE``): zeroing a hole in memory is several times faster
    than having the kernel read it.
    """

    def readinto_sparse(
        self, offset: int, buf: memoryview, holes: list[tuple[int, int]] | None = None
    ) -> int:
        """Like :meth:`RandomAccessFile.readinto`, holes zeroed instead of read; each hole
        zeroed is appended to ``holes`` (if given) as ``(start, length)`` in ``buf``."""
        ...


class HoleReportingDisk(Protocol):
    """A capability some disks have: reading that says which parts were holes.

    ``--sparse`` looks for zeros in what the reader read; a range the disk reports as a
    hole it knows to be zeros without looking (a raw disk whose file knows its holes).
    """

    def read_into_holes(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        """Like :meth:`VirtualDisk.read_into`; returns the ``(start, length)`` ranges of
        ``buf`` that it zeroed as holes, in order (possibly not all of them)."""
        ...


class VirtualDisk(Protocol):
    """A decoded image: a virtual disk of ``virtual_size`` bytes."""

    @property
    def format_name(self) -> str: ...

    @property
    def virtual_size(self) -> int: ...

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` with the virtual bytes at ``[offset, offset + len(buf))``.

        The caller keeps the range inside ``[0, virtual_size)``; except for raw disks,
        whose tail past the file's end (up to the 512-byte rounding) reads as zeros.
        Raises :class:`aiodd.errors.ImageError` on corruption.
        """
        ...

    def close(self) -> None:
        """Release what the disk holds (its backing chain included)."""
        ...


class Resolver(Protocol):
    """Turns references into opened files, under the policy of whoever supplies it."""

    def open_file(self, ref: Reference) -> RandomAccessFile:
        """A referenced file read as bytes (vmdk extents, qcow2 data files)."""
        ...

    def open_disk(self, ref: Reference) -> VirtualDisk:
        """A referenced image decoded as a disk (backing files, parents).

        Uses ``ref.format`` when given, probes the content once otherwise.
        """
        ...

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, Resolver]:
        """Open the image file ``ref`` names (under the policy, as :meth:`open_disk`
        would) without decoding it: the file, and the resolver for the references it
        makes in turn.  For a decoder that runs elsewhere (the KVM guest reader)."""
        ...


# A NamedTuple, not a dataclass: importing dataclasses costs milliseconds of start-up.
class Extent(NamedTuple):
    """``length`` bytes of the window land at ``file_offset`` in the container."""

    file_offset: int
    length: int


class OutputPlan(Protocol):
    """Where the window's bytes go in an output container, and what surrounds them.

    Built by a pure function of the window's length (each format's ``encode`` module).  The
    data extents of ``[0, data_size)`` and the metadata blocks together cover every
    byte of ``[0, file_size)`` exactly once (zero padding is metadata too), so the sink
    writes a dense file without tracking gaps.  The windower pads the window with zeros
    up to ``data_size``.
    """

    @property
    def virtual_size(self) -> int: ...

    @property
    def data_size(self) -> int:
        """How much of the virtual disk the data stream covers: the window and its zero
        padding up to ``virtual_size`` (the 512-byte rounding), except for VHD, whose
        blocks holding only CHS padding stay unallocated, as qemu leaves them."""
        ...

    @property
    def file_size(self) -> int: ...

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        """Map output bytes ``[offset, offset + length)`` to container extents, in order."""
        ...

    def metadata(self) -> Iterator[tuple[int, bytes]]:
        """``(file_offset, bytes)`` blocks of metadata, in ascending offset order,
        produced lazily so a 2 TiB output's tables need not all be in memory at once."""
        ...


class SparsePlan(Protocol):
    """An output plan that leaves out the blocks that hold only zeros (``--sparse``).

    The encoder stage feeds it the runs of the data stream that hold data, in ascending
    order, and asks what became final after each chunk: a block gets its place in the
    file when the first run reaches it, and a table of blocks is written once all of its
    blocks are behind.  What the plan does not write (zero runs, unused blocks, zero
    padding, zero tables) is left to read as zeros: the output is a fresh file, sized at
    the end to :attr:`file_size`.  docs/architecture.md, "Sparse outputs".
    """

    @property
    def virtual_size(self) -> int: ...

    @property
    def data_size(self) -> int:
        """As :attr:`OutputPlan.data_size`: how far the data stream goes."""
        ...

    @property
    def file_size(self) -> int:
        """The file's size, final once :meth:`finish` has been consumed."""
        ...

    def head(self) -> Iterator[tuple[int, bytes]]:
        """The metadata blocks that do not depend on which blocks hold data."""
        ...

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        """Where output bytes ``[offset, offset + length)``, a run that holds data, go;
        called in ascending order of ``offset``."""
        ...

    def ready(self, offset: int) -> list[tuple[int, bytes]]:
        """The metadata blocks that became final once everything before ``offset`` was
        placed."""
        ...

    def finish(self) -> Iterator[tuple[int, bytes]]:
        """Every other metadata block, once the whole data stream was placed."""
        ...


class Decoder(Protocol):
    """An input format, as its ``decode`` module implements it."""

    NAME: str

    def probe(self, head: bytes) -> int:
        """qemu's score for a file starting with ``head``: 0 "not mine", 100 a sure match
        (raw answers 1)."""
        ...

    def open_disk(self, file: RandomAccessFile, resolver: Resolver) -> VirtualDisk:
        """Decode ``file``.  The returned disk owns it (its ``close`` closes it); on an
        error the caller still does."""
        ...


class Encoder(Protocol):
    """An output format, as its ``encode`` module implements it."""

    NAME: str

    def plan(self, out: int, *, filename: str | None = None) -> OutputPlan:
        """The plan for a window of ``out`` bytes, a pure function of it.  ``filename``
        is the output's base name, for a format that records it (a vmdk descriptor
        names its extent); the others ignore it.  A plan that cannot be built raises
        :class:`aiodd.errors.UsageError`."""
        ...

    def sparse_plan(self, out: int, *, filename: str | None = None) -> SparsePlan:
        """The sparse plan for a window of ``out`` bytes (``--sparse``): the same
        container as :meth:`plan`'s, with the blocks that hold only zeros left out."""
        ...
