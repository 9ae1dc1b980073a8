"""Input formats: detection from content and the decoder registry.

Each decoder module exposes ``NAME``, ``probe(head) -> int`` (a qemu-style score: 0 for
"not mine", 100 for a sure match; raw answers 1) and
``open_disk(file, resolver) -> VirtualDisk``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

from aiodd.formats import INPUT_FORMATS, check_input_format
from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk

# How much of the file's start the probes see, as qemu's BLOCK_PROBE_BUF_SIZE.
PROBE_SIZE = 2048


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


def detect(head: bytes) -> str:
    """The format qemu's probes would pick for a file starting with ``head``."""
    best, best_score = "raw", 0
    for name, module in DECODERS.items():
        score = module.probe(head)
        if score > best_score:
            best, best_score = name, score
    return best


def decoder(name: str) -> ModuleType:
    return DECODERS[check_input_format(name)]


def open_disk(file: RandomAccessFile, resolver: Resolver, fmt: str | None = None) -> VirtualDisk:
    """Decode ``file`` as ``fmt``, or as the format its content shows."""
    if fmt is None:
        fmt = detect(file.pread(0, PROBE_SIZE))
    disk: VirtualDisk = decoder(fmt).open_disk(file, resolver)
    return disk
