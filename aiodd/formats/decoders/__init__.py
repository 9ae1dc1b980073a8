"""Input formats: detection as qemu does it, and the decoder registry.

Each decoder module exposes ``NAME``, ``probe(head) -> int`` (a qemu-style score: 0 for
"not mine", 100 for a sure match; raw answers 1) and
``open_disk(file, resolver) -> VirtualDisk``.  Detection also runs qemu's probes for the
formats aiodd does not read (:mod:`aiodd.formats.probes`), so that such an image is
refused instead of being read as raw (docs/formats.md).
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

from aiodd.formats import INPUT_FORMATS, check_input_format, probes
from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk
from aiodd.formats.probes import PROBE_SIZE, Probe

# qemu 7.2's list of format drivers, in the order it asks them.  The first highest score
# wins, so the order settles a tie: a VDI signature at offset 64 of a qcow2, vmdk, vpc,
# vhdx, qcow or luks header makes the file a VDI, of a qed or parallels header not; a
# cloop file named *.dmg is a DMG.  Measured with `qemu-img --trace bdrv_open_common
# info` on such files; the formats that cannot tie are in no particular place.
PROBE_ORDER = (
    "parallels", "qed", "vdi", "qcow", "qcow2", "vmdk", "vpc", "vhdx", "luks", "bochs",
    "dmg", "cloop", "raw",
)  # fmt: skip


class Decoder(Protocol):
    NAME: str

    def probe(self, head: bytes) -> int: ...

    def open_disk(self, file: RandomAccessFile, resolver: Resolver) -> VirtualDisk: ...


def _load() -> dict[str, ModuleType]:
    import importlib

    return {
        name: importlib.import_module(f"aiodd.formats.decoders.{name}") for name in INPUT_FORMATS
    }


DECODERS: dict[str, ModuleType] = _load()


def input_formats() -> list[str]:
    return list(INPUT_FORMATS)


def _probes() -> list[tuple[str, Probe]]:
    def of(module: ModuleType) -> Probe:
        return lambda head, filename: int(module.probe(head))

    table = {**probes.PROBES, **{name: of(module) for name, module in DECODERS.items()}}
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


def decoder(name: str) -> ModuleType:
    return DECODERS[check_input_format(name)]


def open_disk(file: RandomAccessFile, resolver: Resolver, fmt: str | None = None) -> VirtualDisk:
    """Decode ``file`` as ``fmt``, or as the format qemu would detect; an image of a
    format aiodd does not read is refused (:class:`~aiodd.errors.UnsupportedImageError`)."""
    if fmt is None:
        fmt = detect(file.pread(0, PROBE_SIZE), file.name)
        if fmt not in DECODERS:
            raise probes.refusal(file.name, fmt)
    disk: VirtualDisk = decoder(fmt).open_disk(file, resolver)
    return disk
