"""Output formats: each module exposes ``NAME`` and ``plan(out) -> OutputPlan``, a pure
function of the window's length in bytes.  A plan that cannot be built (a vmdk of size
0, a VHD over 2040 GiB) raises :class:`aiodd.errors.UsageError`."""

from __future__ import annotations

import importlib
from types import ModuleType

from aiodd.formats import OUTPUT_FORMATS, check_output_format
from aiodd.formats.base import OutputPlan

__all__ = ("check_output_format", "encoder", "output_formats", "plan")


def output_formats() -> list[str]:
    return list(OUTPUT_FORMATS)


def encoder(name: str) -> ModuleType:
    """The module of output format ``name``, imported on first use: a copy needs one."""
    return importlib.import_module(f"aiodd.formats.encoders.{check_output_format(name)}")


def plan(name: str, out: int, *, filename: str | None = None) -> OutputPlan:
    """The plan for a window of ``out`` bytes; ``filename`` is the output's base name,
    which a vmdk's embedded descriptor names as its extent (as qemu writes it)."""
    module = encoder(name)
    if name == "vmdk" and filename:
        result: OutputPlan = module.plan(out, filename=filename)
    else:
        result = module.plan(out)
    return result
