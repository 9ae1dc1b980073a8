"""raw: no structure at all; the disk's size is the file's, rounded up to a sector."""

from __future__ import annotations

# Detection imports the probe's module alone (docs/performance.md, "Start-up").
from aiodd.formats.raw.probe import probe as probe
from aiodd.formats.units import SECTOR, round_up

NAME = "raw"


def virtual_size(file_size: int) -> int:
    """The disk a file of ``file_size`` bytes holds, as qemu sees it: the tail past the
    end of the file reads as zeros."""
    return round_up(file_size, SECTOR)
