"""The formats aiodd reads and writes, one :class:`Format` each, and detection as qemu
does it.

A :class:`Format` is tiny: it imports its ``decode`` or ``encode`` module on first use,
so a copy pays only for the formats it touches.  Detection runs every reader's probe,
which sits in a ``probe`` module of its own, so it loads no decoder (the KVM guest
reader's process detects formats and decodes none).  Nothing here knows one format
from another: what a format needs is a property of its modules
(:class:`~aiodd.formats.base.Decoder`, :class:`~aiodd.formats.base.Encoder`).
Detection also runs qemu's probes for the formats aiodd does not read
(:mod:`aiodd.formats.foreign`), so that such an image is refused instead of being read
as raw (docs/formats.md).
"""

from __future__ import annotations

import importlib

from aiodd.formats import (
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    check_input_format,
    check_output_format,
    foreign,
)
from aiodd.formats.foreign import PROBE_SIZE

# The KVM guest's process detects formats with this module: typing, functools and
# collections would cost its start-up milliseconds (docs/performance.md, "Start-up").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from aiodd.formats.base import (
        Decoder,
        Encoder,
        OutputPlan,
        RandomAccessFile,
        Resolver,
        SparsePlan,
        VirtualDisk,
    )
    from aiodd.formats.foreign import Probe

__all__ = (
    "FORMATS",
    "PROBES",
    "PROBE_ORDER",
    "Format",
    "check_input_format",
    "check_output_format",
    "decoder",
    "detect",
    "encoder",
    "import_probes",
    "input_formats",
    "open_disk",
    "output_formats",
    "plan",
    "sparse_plan",
)


class Format:
    """One format's room, ``aiodd/formats/<name>/``: its ``layout``, ``decode`` and
    ``encode`` modules, the last two imported when first asked for.

    A plain class, not a dataclass: the guest process imports this module, and importing
    dataclasses would cost it milliseconds of start-up (docs/performance.md, "Start-up").
    """

    def __init__(self, name: str, reads: bool = True, writes: bool = True) -> None:
        self.name = name
        self.reads = reads
        self.writes = writes

    def __repr__(self) -> str:
        return f"Format({self.name!r}, reads={self.reads}, writes={self.writes})"

    # Each module is imported once: the import system's own cache (sys.modules) answers
    # again, and a sealed guest finds there what it imported before its seal.

    @property
    def probe(self) -> Callable[[bytes], int]:
        """The decoder's ``probe``, from a module that holds only it."""
        module: Decoder = importlib.import_module(f"aiodd.formats.{self.name}.probe")
        return module.probe

    @property
    def decoder(self) -> Decoder:
        return importlib.import_module(f"aiodd.formats.{self.name}.decode")

    @property
    def encoder(self) -> Encoder:
        return importlib.import_module(f"aiodd.formats.{self.name}.encode")


FORMATS: dict[str, Format] = {
    name: Format(name, name in INPUT_FORMATS, name in OUTPUT_FORMATS)
    for name in sorted({*INPUT_FORMATS, *OUTPUT_FORMATS})
}

if TYPE_CHECKING:
    # mypy holds every format's modules to the protocols the Format objects promise.
    from aiodd.formats.parallels import decode as _parallels_decode
    from aiodd.formats.qcow import decode as _qcow_decode
    from aiodd.formats.qcow2 import decode as _qcow2_decode
    from aiodd.formats.qcow2 import encode as _qcow2_encode
    from aiodd.formats.qed import decode as _qed_decode
    from aiodd.formats.raw import decode as _raw_decode
    from aiodd.formats.raw import encode as _raw_encode
    from aiodd.formats.vdi import decode as _vdi_decode
    from aiodd.formats.vdi import encode as _vdi_encode
    from aiodd.formats.vhdx import decode as _vhdx_decode
    from aiodd.formats.vhdx import encode as _vhdx_encode
    from aiodd.formats.vmdk import decode as _vmdk_decode
    from aiodd.formats.vmdk import encode as _vmdk_encode
    from aiodd.formats.vpc import decode as _vpc_decode
    from aiodd.formats.vpc import encode as _vpc_encode

    _DECODERS: tuple[Decoder, ...] = (
        _parallels_decode, _qcow_decode, _qcow2_decode, _qed_decode, _raw_decode, _vdi_decode,
        _vhdx_decode, _vmdk_decode,
        _vpc_decode,
    )  # fmt: skip
    _ENCODERS: tuple[Encoder, ...] = (
        _qcow2_encode, _raw_encode, _vdi_encode, _vhdx_encode, _vmdk_encode, _vpc_encode,
    )  # fmt: skip

# qemu 7.2's list of format drivers, in the order it asks them.  The first highest score
# wins, so the order settles a tie: a VDI signature at offset 64 of a qcow2, vmdk, vpc,
# vhdx, qcow or luks header makes the file a VDI, of a qed or parallels header not; a
# cloop file named *.dmg is a DMG.  Measured with `qemu-img --trace bdrv_open_common
# info` on such files; the formats that cannot tie are in no particular place.
PROBE_ORDER = (
    "parallels", "qed", "vdi", "qcow", "qcow2", "vmdk", "vpc", "vhdx", "luks", "bochs",
    "dmg", "cloop", "raw",
)  # fmt: skip


def input_formats() -> list[str]:
    return list(INPUT_FORMATS)


def output_formats() -> list[str]:
    return list(OUTPUT_FORMATS)


def decoder(name: str) -> Decoder:
    return FORMATS[check_input_format(name)].decoder


def encoder(name: str) -> Encoder:
    """The encoder of output format ``name``, imported on first use: a copy needs one."""
    return FORMATS[check_output_format(name)].encoder


def import_probes() -> None:
    """Import every probe now (a process about to lose the right to open files), and
    nothing else that decodes."""
    for fmt in FORMATS.values():
        if fmt.reads:
            fmt.probe  # noqa: B018


def _probes() -> list[tuple[str, Probe]]:
    def of(fmt: Format) -> Probe:
        return lambda head, filename: fmt.probe(head)

    table = {
        **foreign.PROBES,
        **{name: of(fmt) for name, fmt in FORMATS.items() if fmt.reads},
    }
    return [(name, table[name]) for name in PROBE_ORDER]


PROBES = _probes()


def detect(head: bytes, filename: str = "") -> str:
    """The format qemu 7.2 would pick for a file named ``filename`` that starts with
    ``head`` (at least its first :data:`PROBE_SIZE` bytes, or all of a shorter file):
    one of :data:`PROBE_ORDER`, not necessarily a format aiodd reads."""
    if not head:
        return "raw"  # qemu does not probe an empty file
    # Past a short file's end qemu's probe buffer holds zeros.
    buf = head[:PROBE_SIZE].ljust(PROBE_SIZE, b"\x00")
    best, best_score = "raw", 0
    for name, probe in PROBES:
        score = probe(buf, filename)
        if score > best_score:
            best, best_score = name, score
    return best


def open_disk(file: RandomAccessFile, resolver: Resolver, fmt: str | None = None) -> VirtualDisk:
    """Decode ``file`` as ``fmt``, or as the format qemu would detect; an image of a
    format aiodd does not read is refused (:class:`~aiodd.errors.UnsupportedImageError`)."""
    if fmt is None:
        fmt = detect(file.pread(0, PROBE_SIZE), file.name)
        if fmt not in INPUT_FORMATS:
            raise foreign.refusal(file.name, fmt)
    return decoder(fmt).open_disk(file, resolver)


def plan(name: str, out: int, *, filename: str | None = None) -> OutputPlan:
    """The plan for a window of ``out`` bytes; ``filename`` is the output's base name
    (see :class:`~aiodd.formats.base.Encoder`)."""
    return encoder(name).plan(out, filename=filename)


def sparse_plan(name: str, out: int, *, filename: str | None = None) -> SparsePlan:
    """The sparse plan (``--sparse``) for a window of ``out`` bytes."""
    return encoder(name).sparse_plan(out, filename=filename)
