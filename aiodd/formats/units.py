"""Sizes and their rounding, which every format uses: a module that imports nothing, so
that the raw decoder, which needs only these, does not bring :mod:`aiodd.formats.common`'s
``typing`` and ``threading`` into a guest that reads a raw input (docs/performance.md,
"Start-up")."""

from __future__ import annotations

SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def div_round_up(n: int, unit: int) -> int:
    return -(-n // unit)
