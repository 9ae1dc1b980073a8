"""Disk image formats: sans-IO decoders (input) and encoders (output plans).

The names are here, apart from the modules, so that checking ``-f``/``-O`` does not
import every decoder and encoder (the CLI's start-up time is part of every copy).
"""

from __future__ import annotations

from aiodd.errors import UsageError

INPUT_FORMATS = ("qcow2", "raw", "vhdx", "vmdk", "vpc")
# The order qemu-img's users know them in; raw is the default.
OUTPUT_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx")


def check_input_format(name: str) -> str:
    if name not in INPUT_FORMATS:
        raise UsageError(
            f"unknown input format '{name}': supported formats are {', '.join(INPUT_FORMATS)}"
        )
    return name


def check_output_format(name: str) -> str:
    if name not in OUTPUT_FORMATS:
        raise UsageError(
            f"unknown output format '{name}': supported formats are {', '.join(OUTPUT_FORMATS)}"
        )
    return name
