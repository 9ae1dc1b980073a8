"""Operand values and the copy window: pure functions, no I/O.

:func:`parse_size` reproduces qemu's ``qemu_strtosz`` as qemu-img 7.2 applies it to
``bs``, ``count`` and ``skip``, quirks included (``b`` means bytes, fractions round half
up in 64.64 fixed point, a hex number may take a suffix with a deprecation warning).
:func:`compute_window` applies the window rules of docs/window.md, with Python's
unbounded integers standing in for qemu's overflow checks: a product that would
overflow simply exceeds every size.
"""

from __future__ import annotations

import re

from aiodd._typing_names import NamedTuple

SECTOR = 512
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
BS_MAX = 2**31 - 1  # qemu-img: INT_MAX

_SUFFIXES = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SPACE = " \t\n\v\f\r"  # C isspace(), which strtoull skips
# strtoull: optional sign, then digits.  The sign is checked separately (qemu rejects '-').
_INTEGER = re.compile(r"[+-]?([0-9]+)")
_HEX = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+)")
# strtod on the text from the '.' on: digits after the point, then an exponent that
# strtod consumes only when it has digits.
_FRACTION = re.compile(r"\.([0-9]*)([eE][+-]?[0-9]+)?")


class SizeSyntaxError(ValueError):
    """The text is not a size at all."""


class SizeRangeError(ValueError):
    """The text is a size, but one that does not fit in 64 bits."""


class ParsedSize(NamedTuple):
    value: int
    deprecated_hex_suffix: bool = False


def hex_suffix_warning(text: str) -> str:
    """qemu's deprecation warning for a suffix on a hex number, such as ``0x10K``."""
    return f"warning: using a multiplier suffix on hex numbers is deprecated: {text}"


def parse_size(text: str) -> ParsedSize:
    """Parse ``text`` exactly as ``qemu_strtosz`` does; raise on what qemu refuses."""
    stripped = text.lstrip(_SPACE)
    match = _INTEGER.match(stripped)
    if match is None or "-" in match.group(0):
        raise SizeSyntaxError(text)
    integral = int(match.group(1))
    rest = stripped[match.end() :]
    _check_overflow(text, integral, rest)
    hex_number = False
    fraction_bits = 0  # the fraction as a 64-bit fixed-point number

    if integral == 0 and rest[:1] in ("x", "X"):
        hex_match = _HEX.match(stripped)
        if hex_match is None:
            raise SizeSyntaxError(text)  # "0x" with no digit: strtoull stops at the x
        integral = int(hex_match.group(1), 16)
        rest = stripped[hex_match.end() :]
        _check_overflow(text, integral, rest)
        if rest[:1] == ".":
            raise SizeSyntaxError(text)
        hex_number = True
    elif rest[:1] == ".":
        frac = _FRACTION.match(rest)
        assert frac is not None
        if not frac.group(1):
            rest = rest[1:]  # strtod found no number: qemu skips the '.' ("1.K" is 1K)
        elif frac.group(2):
            raise SizeSyntaxError(text)  # an exponent makes the whole text invalid
        else:
            scaled = float("0." + frac.group(1)) * 2.0**64
            # C's double -> uint64 conversion of 2**64 (a fraction that rounds up to 1.0)
            # gives 0 on x86-64; qemu inherits that, so "15.999999999999999999K" is 15K.
            fraction_bits = int(scaled) if scaled < 2.0**64 else 0
            rest = rest[frac.end() :]

    exponent = _SUFFIXES.get(rest[:1].lower()) if rest else None
    if exponent is not None:
        rest = rest[1:]
    if rest:
        raise SizeSyntaxError(text)
    multiplier = 1024 ** (exponent or 0)
    if multiplier == 1:
        if fraction_bits:
            raise SizeSyntaxError(text)  # a fraction needs a scaling suffix
        return ParsedSize(integral)
    product = fraction_bits * multiplier
    value = integral * multiplier + (product >> 64) + ((product & UINT64_MAX) >> 63)
    if value > UINT64_MAX:
        raise SizeRangeError(text)
    return ParsedSize(value, deprecated_hex_suffix=hex_number and exponent is not None)


def _check_overflow(text: str, integral: int, rest: str) -> None:
    """strtoull's ERANGE; qemu then reports trailing text, if any, as a syntax error."""
    if integral > UINT64_MAX:
        raise SizeSyntaxError(text) if rest else SizeRangeError(text)


class Window(NamedTuple):
    """The bytes ``[start, end)`` of the virtual disk, copied to output offset 0."""

    start: int
    end: int
    skip_past_end: bool  # qemu warns "cannot skip to specified offset" and copies nothing

    @property
    def length(self) -> int:
        return max(0, self.end - self.start)


def compute_window(virtual_size: int, bs: int, count: int | None, skip: int) -> Window:
    """The window of docs/window.md ("The rules").

    ``virtual_size`` is already rounded up to 512 for raw input.
    """
    if bs < 1:
        raise ValueError("bs must be positive")
    end = virtual_size if count is None else min(count * bs, virtual_size)
    start = skip * bs
    if start > end:
        return Window(end, end, skip_past_end=True)
    return Window(start, end, skip_past_end=False)


def round_up(value: int, multiple: int = SECTOR) -> int:
    return -(-value // multiple) * multiple
