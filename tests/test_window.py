"""Size parsing and window math: pure functions, checked against tables, a reference
model and (where qemu-img is installed) the real parser."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiodd.window import (
    INT64_MAX,
    SizeRangeError,
    SizeSyntaxError,
    Window,
    compute_window,
    parse_size,
    round_up,
)
from tests.conftest import needs_qemu

VALID = [
    ("512", 512),
    ("+5", 5),
    (" 5", 5),
    ("\t5", 5),
    ("010", 10),
    ("0x10", 16),
    ("0X1f", 31),
    ("1k", 1024),
    ("1K", 1024),
    ("1m", 1 << 20),
    ("1G", 1 << 30),
    ("1t", 1 << 40),
    ("1P", 1 << 50),
    ("1e", 1 << 60),
    ("7E", 7 << 60),
    ("1b", 1),
    ("1B", 1),
    ("1.5K", 1536),
    ("0.5K", 512),
    ("1.K", 1024),
    ("1.0", 1),
    ("1.", 1),
    ("1.0b", 1),
    # qemu-img 7.2 rounds fractions half up (64.64 fixed point), not down
    ("0.5005K", 513),
    ("0.50049K", 513),
    ("0.5004K", 512),
    ("0.0005K", 1),
    # an 'e' after a fraction is the exabyte suffix, not an exponent
    ("1.5e", 1729382256910270464),
    # a fraction that rounds to 1.0 becomes 0 through C's double -> uint64 conversion
    ("15.999999999999999999K", 15360),
]

INVALID_SYNTAX = [
    "",
    " ",
    "-1",
    "-0",
    " -1",
    "abc",
    "1KB",
    "1KiB",
    "1kb",
    "1s",
    "1KK",
    "5 ",
    "1.5",
    ".5K",
    "1.5b",
    "1e3",
    "5.e3",
    "1.5e3K",
    "0x1.8K",
    "0x",
    "0xK",
    "0xg",
    "99999999999999999999K",
    "1 K",
]

INVALID_RANGE = ["99999999999999999999", "16E", "0x10000000000000000"]


@pytest.mark.parametrize(("text", "value"), VALID)
def test_valid_sizes(text: str, value: int) -> None:
    assert parse_size(text).value == value


@pytest.mark.parametrize("text", INVALID_SYNTAX)
def test_invalid_sizes(text: str) -> None:
    with pytest.raises(SizeSyntaxError):
        parse_size(text)


@pytest.mark.parametrize("text", INVALID_RANGE)
def test_out_of_range_sizes(text: str) -> None:
    with pytest.raises(SizeRangeError):
        parse_size(text)


def test_hex_with_suffix_is_deprecated_but_valid() -> None:
    parsed = parse_size("0x1K")
    assert parsed.value == 1024
    assert parsed.deprecated_hex_suffix
    assert not parse_size("0x10").deprecated_hex_suffix
    assert not parse_size("1K").deprecated_hex_suffix


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_plain_integers_round_trip(n: int) -> None:
    assert parse_size(str(n)).value == n


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from("kKmMgGtTpPeEbB"))
def test_suffixes_multiply(n: int, suffix: str) -> None:
    power = "bkmgtpe".index(suffix.lower())
    expected = n * 1024**power
    if expected > 2**64 - 1:
        with pytest.raises(SizeRangeError):
            parse_size(f"{n}{suffix}")
    else:
        assert parse_size(f"{n}{suffix}").value == expected


# --- the window ---------------------------------------------------------------------


def reference_window(size: int, bs: int, count: int | None, skip: int) -> tuple[int, int, bool]:
    """qemu-img dd's window as its C code computes it, with int64 overflow guards."""
    end = size
    if count is not None and count <= INT64_MAX // bs and count * bs < size:
        end = count * bs
    if skip > INT64_MAX // bs or end < bs * skip:
        return end, end, True
    return bs * skip, end, False


sizes = st.one_of(st.integers(0, 10**7), st.integers(0, 2**62).map(lambda n: round_up(n)))
blocks = st.one_of(st.integers(0, 64), st.integers(0, INT64_MAX))


@given(sizes, st.integers(1, 2**31 - 1), st.one_of(st.none(), blocks), blocks)
@example(3072, 512, None, 6)  # skip exactly at the end: empty, no warning
@example(3072, 512, None, 7)  # past the end: empty, warning
@example(3072, 512, 0, 1)  # count=0 with a skip: qemu warns too
@example(3072, 2**31 - 1, INT64_MAX, INT64_MAX)
@settings(max_examples=2000)
def test_window_matches_reference(size: int, bs: int, count: int | None, skip: int) -> None:
    window = compute_window(size, bs, count, skip)
    start, end, warned = reference_window(size, bs, count, skip)
    assert (window.start, window.end, window.skip_past_end) == (start, end, warned)
    assert 0 <= window.length <= size
    assert window.length == max(0, end - start)


def test_window_examples() -> None:
    assert compute_window(3072, 512, None, 0) == Window(0, 3072, False)
    assert compute_window(3072, 1, 5, 2) == Window(2, 5, False)
    assert compute_window(3072, 512, 0, 0).length == 0
    assert compute_window(3072, 512, None, 6) == Window(3072, 3072, False)
    assert compute_window(3072, 512, None, 7).skip_past_end


# --- against the real parser -----------------------------------------------------------

size_text = st.text(alphabet="0123456789.xX+- kKmMgGbBeE", min_size=0, max_size=8)


def qemu_size(text: str) -> int | str:
    """What qemu's cvtnum makes of ``text``: the value rounded up to 512, or the error."""
    proc = subprocess.run(
        ["qemu-img", "measure", "--size", text, "-O", "raw"], capture_output=True, text=True
    )
    if proc.returncode == 0:
        return int(proc.stdout.split("required size: ")[1].split()[0])
    return "range" if "Must be between" in proc.stderr else "syntax"


@needs_qemu
@given(size_text)
@example("0x1.8K")
@example("1.5e")
@settings(max_examples=150, deadline=None)
def test_parse_size_agrees_with_qemu(text: str) -> None:
    if text.startswith("-") and len(text) > 1 and text[1:2] != "-":
        text = " " + text  # getopt would read a leading '-' as an option
    try:
        value = parse_size(text).value
        ours: int | str = round_up(value) if value <= INT64_MAX else "range"
    except SizeSyntaxError:
        ours = "syntax"
    except SizeRangeError:
        ours = "range"
    assert ours == qemu_size(text)
