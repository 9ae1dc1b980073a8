"""The hosted build of the KVM guest's decoders (hosted.c), driven from Python.

:class:`Hosted` loads the shared library and plays the host as the VMM does: file 0 is
the image, every file the decoder names is opened through a resolver and detected the
way ``aiodd.formats.registry.open_disk`` detects it, and an error record becomes the
same :class:`~aiodd.errors.ImageError` the VMM raises (the layer's file name, the
message decoded as UTF-8 with surrogateescape).  :func:`python_outcome` and
:meth:`Hosted.outcome` give what one image reads as, for the two decoders to be
compared: the bytes of each read, or the error's class and text.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aiodd.errors import ImageError, PolicyError, UnsupportedImageError
from aiodd.formats import INPUT_FORMATS, foreign, registry
from aiodd.formats.base import RandomAccessFile, Reference, VirtualDisk
from aiodd.formats.foreign import PROBE_SIZE
from aiodd.formats.registry import detect

if TYPE_CHECKING:
    from aiodd.formats.base import ReferenceKind

FMT_NONE, FMT_RAW, FMT_QCOW2, FMT_VMDK, FMT_VPC, FMT_VHDX, FMT_VDI = 0, 1, 2, 3, 4, 5, 6
FMT_PARALLELS = 9
FMT_QCOW, FMT_QED = 7, 8
REF_BACKING, REF_DATA_FILE, REF_EXTENT, REF_PARENT = 1, 2, 3, 4
E_IMAGE, E_UNSUPPORTED, E_REFUSED = 6, 7, 8
GUEST_FORMATS = {
    "raw": FMT_RAW,
    "qcow2": FMT_QCOW2,
    "vmdk": FMT_VMDK,
    "vpc": FMT_VPC,
    "vhdx": FMT_VHDX,
    "vdi": FMT_VDI,
    "parallels": FMT_PARALLELS,
    "qcow": FMT_QCOW,
    "qed": FMT_QED,
}
# The plain files a layer names, and the Reference kind the Python decoders give them.
PLAIN_REFS: dict[int, ReferenceKind] = {REF_DATA_FILE: "data_file", REF_EXTENT: "extent"}

OPENER = ctypes.CFUNCTYPE(
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint32),
)


class Layers(Protocol):
    """A resolver as the VMM uses one: files by reference, and for a layer of the chain
    the file and the resolver of the references it makes in turn."""

    def open_file(self, ref: Reference) -> RandomAccessFile: ...

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, Layers]: ...


MAX_CHAIN = 64


class ChainResolver:
    """Named in-memory files (as tests/test_decode_qcow2.py's MemResolver serves them),
    for both decoders, with the policy's two rules a chain needs: an unknown name is
    refused, and a chain stops at MAX_CHAIN layers (a looping chain ends there)."""

    def __init__(self, files: dict[str, bytes], depth: int = 0, name: str = "") -> None:
        self.files = files
        self.depth = depth

    def open_file(self, ref: Reference) -> RandomAccessFile:
        if ref.name not in self.files:
            raise PolicyError(ref.referrer, f"{ref.kind} '{ref.name}' is refused")
        return MemFile(self.files[ref.name], ref.name)

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, ChainResolver]:
        if self.depth + 1 >= MAX_CHAIN:
            raise PolicyError(ref.referrer, f"{ref.kind} '{ref.name}' is refused: too deep")
        return self.open_file(ref), ChainResolver(self.files, self.depth + 1)

    def open_disk(self, ref: Reference) -> VirtualDisk:
        file, resolver = self.open_layer(ref)
        return registry.open_disk(file, resolver, ref.format)


class MemFile:
    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self.name = name
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def readinto(self, offset: int, buf: memoryview) -> int:
        chunk = self._data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        pass


class NotInGuest(Exception):
    """A layer in a format this native build has no code for: no comparison is
    possible."""


@dataclass(frozen=True)
class Outcome:
    """What reading an image gave: the open's error, or each read's bytes or error."""

    virtual_size: int | None
    reads: tuple[bytes | tuple[str, str], ...]
    error: tuple[str, str] | None = None


def _error(exc: BaseException) -> tuple[str, str]:
    return (type(exc).__name__, str(exc))


Reads = Callable[[int], Sequence[tuple[int, int]]]


def python_outcome(open_disk: Callable[[], VirtualDisk], reads: Reads) -> Outcome:
    """Run the Python decoder: ``open_disk()``, then each of ``reads(virtual_size)``."""
    try:
        disk = open_disk()
    except ImageError as exc:
        return Outcome(None, (), _error(exc))
    out: list[bytes | tuple[str, str]] = []
    for offset, length in reads(disk.virtual_size):
        buf = bytearray(length)
        try:
            disk.read_into(offset, memoryview(buf))
            out.append(bytes(buf))
        except ImageError as exc:
            out.append(_error(exc))
    return Outcome(disk.virtual_size, tuple(out))


class Hosted:
    def __init__(self, library: Path, *, tiny_tables: bool = False) -> None:
        self.tiny_tables = tiny_tables  # how the library was built (build.TINY_TABLES)
        self.library = library
        lib = ctypes.CDLL(str(library))
        lib.hosted_reset.restype = None
        lib.hosted_add_file.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
        lib.hosted_add_file.restype = ctypes.c_uint32
        lib.hosted_set_opener.argtypes = [OPENER]
        lib.hosted_set_opener.restype = None
        lib.hosted_open.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64)]
        lib.hosted_open.restype = ctypes.c_uint32
        lib.hosted_read.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64]
        lib.hosted_read.restype = ctypes.c_uint32
        lib.hosted_error.argtypes = [
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_uint32),
        ]
        lib.hosted_error.restype = ctypes.c_void_p
        lib.hosted_doorbells.restype = ctypes.c_uint64
        lib.hosted_heap_peak.restype = ctypes.c_uint64
        self._lib = lib
        self._keep: list[object] = []
        self._names: list[str] = []
        self._resolvers: list[Layers | None] = []
        self._refused: BaseException | None = None

    # -- the host --------------------------------------------------------------------

    def _add(self, data: bytes, name: str, resolver: Layers | None) -> int:
        buf = ctypes.create_string_buffer(data, len(data) or 1)
        self._keep.append(buf)
        self._names.append(name)
        self._resolvers.append(resolver)
        handle: int = self._lib.hosted_add_file(ctypes.addressof(buf), len(data))
        return handle

    def _open(self, referrer: int, kind: int, name: bytes, fmt: bytes) -> tuple[int, int, int]:
        text = name.decode("utf-8", "surrogateescape")
        declared = fmt.decode("utf-8", "surrogateescape") or None
        referrer_name = self._names[referrer]
        resolver = self._resolvers[referrer]
        assert resolver is not None  # a data file names nothing
        if kind in PLAIN_REFS:
            file = resolver.open_file(Reference(PLAIN_REFS[kind], text, referrer_name))
            return self._add(file.pread(0, file.size), file.name, None), file.size, FMT_NONE
        # vmdk's parent is declared vmdk, as decode.open_disk declares it; vpc's and
        # vhdx's never declare one
        ref_kind: ReferenceKind = "parent" if kind == REF_PARENT else "backing"
        file, below = resolver.open_layer(Reference(ref_kind, text, referrer_name, declared))
        detected = declared
        if detected is None:
            detected = detect(file.pread(0, PROBE_SIZE), file.name)
            if detected not in INPUT_FORMATS:
                raise foreign.refusal(file.name, detected)
        if detected not in GUEST_FORMATS:
            raise NotInGuest(detected)
        handle = self._add(file.pread(0, file.size), file.name, below)
        return handle, file.size, GUEST_FORMATS[detected]

    def _opener(self) -> object:
        def opener(
            referrer: int, kind: int, name: int, name_length: int, fmt: int, fmt_length: int,
            handle: object, size: object, code: object,
        ) -> int:  # fmt: skip
            try:
                h, s, c = self._open(
                    referrer,
                    kind,
                    ctypes.string_at(name, name_length),
                    ctypes.string_at(fmt, fmt_length) if fmt_length else b"",
                )
            except BaseException as exc:  # kept, and raised where the VMM would
                self._refused = exc
                return E_REFUSED
            handle[0], size[0], code[0] = h, s, c  # type: ignore[index]
            return 0

        return OPENER(opener)

    def _raise(self, status: int) -> None:
        if status == 0:
            return
        if status == E_REFUSED:
            assert self._refused is not None
            refused, self._refused = self._refused, None
            raise refused
        if status in (E_IMAGE, E_UNSUPPORTED):
            length, layer = ctypes.c_uint64(), ctypes.c_uint32()
            text = ctypes.string_at(self._lib.hosted_error(length, layer), length.value)
            cls = ImageError if status == E_IMAGE else UnsupportedImageError
            raise cls(self._names[layer.value], text.decode("utf-8", "surrogateescape"), "qcow2")
        raise AssertionError(f"the hosted decoder ended with status {status}")

    # -- the image -------------------------------------------------------------------

    def outcome(
        self,
        data: bytes,
        resolver: Layers,
        reads: Reads,
        *,
        name: str = "t.qcow2",
        fmt: int = FMT_QCOW2,
    ) -> Outcome:
        """Open ``data`` as ``fmt`` and make each read, as the VMM would."""
        lib = self._lib
        lib.hosted_reset()
        self._keep, self._names, self._resolvers, self._refused = [], [], [], None
        opener = self._opener()
        self._keep.append(opener)
        lib.hosted_set_opener(opener)
        self._add(data, name, resolver)
        size = ctypes.c_uint64()
        try:
            self._raise(lib.hosted_open(fmt, ctypes.byref(size)))
        except ImageError as exc:
            return Outcome(None, (), _error(exc))
        out: list[bytes | tuple[str, str]] = []
        for offset, length in reads(size.value):
            buf = ctypes.create_string_buffer(length or 1)
            try:
                self._raise(lib.hosted_read(offset, buf, length))
                out.append(buf.raw[:length])
            except ImageError as exc:
                out.append(_error(exc))
        return Outcome(size.value, tuple(out))

    @property
    def doorbells(self) -> int:
        return int(self._lib.hosted_doorbells())

    @property
    def heap_peak(self) -> int:
        return int(self._lib.hosted_heap_peak())
