"""Output formats: each module exposes ``NAME`` and ``plan(out) -> OutputPlan``, a pure
function of the window's length in bytes.  A plan that cannot be built (a vmdk of size
0, a VHD over 2040 GiB) raises :class:`aiodd.errors.UsageError`."""

from __future__ import annotations

import importlib
from types import ModuleType

from aiodd.errors import UsageError
from aiodd.formats.base import OutputPlan
from aiodd.formats.encoders import raw

# The order qemu-img's users know them in; raw is the default.
_NAMES = ("raw", "qcow2", "vmdk", "vpc", "vhdx")


def _load() -> dict[str, ModuleType]:
    modules: dict[str, ModuleType] = {"raw": raw}
    for name in _NAMES[1:]:
        try:
            modules[name] = importlib.import_module(f"aiodd.formats.encoders.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"aiodd.formats.encoders.{name}":
                raise
    return modules


ENCODERS: dict[str, ModuleType] = _load()


def output_formats() -> list[str]:
    return [name for name in _NAMES if name in ENCODERS]


def check_output_format(name: str) -> str:
    if name not in ENCODERS:
        supported = ", ".join(output_formats())
        raise UsageError(f"unknown output format '{name}': supported formats are {supported}")
    return name


def plan(name: str, out: int, *, filename: str | None = None) -> OutputPlan:
    """The plan for a window of ``out`` bytes; ``filename`` is the output's base name,
    which a vmdk's embedded descriptor names as its extent (as qemu writes it)."""
    module = ENCODERS[check_output_format(name)]
    if name == "vmdk" and filename:
        result: OutputPlan = module.plan(out, filename=filename)
    else:
        result = module.plan(out)
    return result
