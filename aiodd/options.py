"""The operands and options of a copy, checked in one place for the CLI and the library.

Each function takes a value as the caller got it (a command-line string, or whatever
a library caller passed), returns it checked, and otherwise raises
:class:`~aiodd.errors.UsageError` (made by ``UsageError.invalid``), whose message
names the library's spelling (``isolation``, ``allow_backing``); the CLI renders it
with its own (``--isolation``, ``--allow-backing``) through
:meth:`~aiodd.errors.UsageError.naming`.  The rules are
written down in docs/usage.md ("Sizes", "Options" and "dd() parameters").

No I/O beyond a ``stat`` of a directory, and cheap to import: the CLI checks its
whole command line with it before the pipeline is imported.
"""

from __future__ import annotations

import os

from aiodd.errors import UsageError
from aiodd.window import (
    BS_MAX,
    INT64_MAX,
    SizeRangeError,
    SizeSyntaxError,
    hex_suffix_warning,
    parse_size,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal, TypeAlias

    Isolation: TypeAlias = Literal["auto", "kvm", "sandbox", "inline"]
    # qemu's cache modes, as qemu-img convert -t spells them (docs/usage.md, "-t CACHE").
    Cache: TypeAlias = Literal["none", "writeback", "writethrough", "directsync", "unsafe"]

ISOLATION_MODES: tuple[Isolation, ...] = ("auto", "kvm", "sandbox", "inline")
CACHE_MODES: tuple[Cache, ...] = ("none", "writeback", "writethrough", "directsync", "unsafe")
PROGRESS_MODES = ("none", "percent", "bar", "json")
# The digests --checksum offers, by their hashlib names: strong, and fast enough in
# hashlib to keep up with the disk (docs/usage.md, "Checksum").
CHECKSUM_ALGORITHMS = ("sha256", "sha512", "blake2b")
# qemu-img dd's ranges: bs is an int, count and skip are int64.
SIZE_RANGES = {"bs": (1, BS_MAX), "count": (0, INT64_MAX), "skip": (0, INT64_MAX)}
IO_SIZE_MIN = 64 * 1024
IO_ALIGN = 4096

_NOT_A_SIZE = (
    "not a size (use a number with an optional k, M, G, T, P or E suffix, e.g. 4K or 1.5M)"
)


def _shown(value: object) -> str:
    """A value as a message shows it: text and integers quoted, anything else as repr."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return f"'{value}'"
    return repr(value)


def size_operand(name: str, value: object, warnings: list[str] | None = None) -> int:
    """``bs``, ``count`` or ``skip``: an integer, or a size string parsed as qemu does.

    qemu's deprecation warning for a suffix on a hex number (``0x1K``) is appended to
    ``warnings``.
    """
    low, high = SIZE_RANGES[name]
    if isinstance(value, str):
        try:
            parsed = parse_size(value)
        except SizeSyntaxError:
            raise UsageError.invalid(name, _shown(value), _NOT_A_SIZE) from None
        except SizeRangeError:
            number = high + 1  # beyond 64 bits: out of range like any other
        else:
            number = parsed.value
            if parsed.deprecated_hex_suffix and warnings is not None:
                warnings.append(hex_suffix_warning(value))
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise UsageError.invalid(name, _shown(value), "must be an integer or a size string")
    if not low <= number <= high:
        raise UsageError.invalid(name, _shown(value), f"must be between {low} and {high}")
    return number


def isolation(value: object) -> Isolation:
    """Where the image is decoded: ``kvm`` (a micro-VM inside the guest process),
    ``sandbox`` (the guest process), ``auto`` (``kvm`` where it runs, else ``sandbox``)
    or ``inline`` (this process)."""
    for mode in ISOLATION_MODES:
        if value == mode and isinstance(value, str):
            return mode
    raise UsageError.invalid("isolation", _shown(value), "use auto, kvm, sandbox or inline")


def cache(value: object) -> Cache:
    """How the output is written and flushed: one of qemu's cache modes."""
    for mode in CACHE_MODES:
        if value == mode:
            return mode
    raise UsageError.invalid(
        "cache", _shown(value), "use none, writeback, writethrough, directsync or unsafe"
    )


def progress_mode(value: str) -> str:
    """The CLI's ``--progress`` mode."""
    if value in PROGRESS_MODES:
        return value
    raise UsageError.invalid("progress", _shown(value), "use none, percent, bar or json")


def checksum(value: object) -> str:
    """The ``--checksum`` algorithm: one of :data:`CHECKSUM_ALGORITHMS`."""
    if isinstance(value, str) and value in CHECKSUM_ALGORITHMS:
        return value
    choices = ", ".join(CHECKSUM_ALGORITHMS[:-1]) + " or " + CHECKSUM_ALGORITHMS[-1]
    raise UsageError.invalid("checksum", _shown(value), f"use {choices}")


def allow_backing_dir(value: str | os.PathLike[str]) -> str:
    """A directory images may refer into: it must exist (symlinks to one are fine)."""
    path = os.fspath(value)
    if not os.path.isdir(path):
        raise UsageError.invalid("allow_backing", _shown(path), "not a directory")
    return path


def io_size(value: object) -> int:
    """The size of each pool buffer, in bytes."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < IO_SIZE_MIN
        or value % IO_ALIGN
    ):
        raise UsageError.invalid(
            "io_size",
            _shown(value),
            f"must be a multiple of {IO_ALIGN} of at least {IO_SIZE_MIN}",
        )
    return value


def __getattr__(name: str) -> object:
    """``Isolation`` and ``Cache`` (``aiodd.Isolation`` among them) for a caller that
    looks them up at run time: made on first use, since a copy never does and ``typing``
    costs its start milliseconds (docs/performance.md, "Start-up")."""
    modes = {"Isolation": ISOLATION_MODES, "Cache": CACHE_MODES}.get(name)
    if modes is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from typing import Literal

    alias = Literal[modes]  # type: ignore[valid-type]  # a tuple of the values: the same alias
    globals()[name] = alias
    return alias
