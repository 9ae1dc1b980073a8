"""A bounded fuzz target for the decoders (docs/architecture.md#adding-an-input-format).

Hypothesis mutates small valid images of every input format -- qcow2 (v3, v2, extended
L2, deflate- and zstd-compressed clusters), vmdk (monolithicSparse and a VMware-style
streamOptimized with a footer), vpc (dynamic) and vhdx -- with bit flips, byte and
integer overwrites (the integers that break parsers: 0, 2**31, 2**63, all ones...) and
truncations, mostly over their headers and tables, sometimes resealing the checksums a
format has so the mutation reaches past them.  Each mutated image is decoded in this
process (``open_input(..., isolation="inline")``) and its whole virtual disk read (only
the first and last MiB of a disk that claims more than 8 MiB).

The properties: only :class:`aiodd.errors.AioddError` escapes (never ``struct.error``,
``IndexError``, ``ZeroDivisionError``, ``MemoryError``, ``RecursionError``,
``OverflowError``...), its message is one line, and each example is quick and small: at
most ``CPU_LIMIT`` seconds of CPU (``ITIMER_VIRTUAL``) and ``MEMORY_LIMIT`` bytes of
memory beyond what the process already holds (``RLIMIT_DATA``, which covers anonymous
mappings: a decoder that asks for a huge buffer gets a ``MemoryError``, which fails the
example).

Size of a run:
    By default every base gets ``DEFAULT_EXAMPLES`` examples (about 8,000 in all, with
    the truncations), drawn deterministically (``derandomize``) so CI is reproducible
    and bounded: the file runs in about a minute on 2 cores.  Every header and table
    field of every base is also set, one at a time, to each of ``EXTREMES``.
    ``AIODD_FUZZ_EXAMPLES=N`` gives each base N examples drawn at random (a new search
    every run), e.g.::

        AIODD_FUZZ_EXAMPLES=20000 pytest -q tests/test_fuzz.py -p no:cacheprovider

Crashes found are kept below as explicit regression cases (``REGRESSIONS``), marked
``xfail(strict=True)`` while the bug is open.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodd.chain import open_input
from aiodd.errors import AioddError
from aiodd.formats.crc32c import crc32c
from tests.conftest import needs_qemu
from tests.hostile import BASE_BUILDERS, Base, base, vpc_checksum

KiB = 1 << 10
MiB = 1 << 20

DEFAULT_EXAMPLES = 700
EXAMPLES = int(os.environ.get("AIODD_FUZZ_EXAMPLES", "0") or 0)
RANDOM = EXAMPLES > 0
PER_BASE = EXAMPLES if RANDOM else DEFAULT_EXAMPLES

FULL_READ = 8 * MiB  # disks up to this size are read whole
CHUNK = 256 * KiB + 512  # reads cross cluster and block boundaries at odd places
CPU_LIMIT = 5.0  # seconds of CPU one example may use
MEMORY_LIMIT = 256 * MiB  # bytes one example may allocate beyond the process's own

FUZZ = settings(
    max_examples=PER_BASE,
    deadline=None,  # the CPU limit below is the bound, and it is not fooled by a busy host
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

pytestmark = needs_qemu  # the bases are made by qemu-img


# --------------------------------------------------------------------------- mutations

INTERESTING = (
    0,
    1,
    2,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x1FF,
    0x200,
    0x1000,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x100000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 32,
    1 << 40,
    1 << 48,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
)

# (kind, (anywhere?, region, offset), value, width, big-endian)
Where = tuple[bool, int, int]
Mutation = tuple[str, Where, int, int, bool]


def mutations() -> st.SearchStrategy[Mutation]:
    # three in four land in a header or table region
    anywhere = st.sampled_from((True, False, False, False))
    where = st.tuples(anywhere, st.integers(0, 15), st.integers(0, 1 << 32))
    flip = st.tuples(st.just("flip"), where, st.integers(0, 7), st.just(1), st.just(True))
    byte = st.tuples(st.just("byte"), where, st.integers(0, 255), st.just(1), st.just(True))
    number = st.tuples(
        st.just("int"),
        where,
        st.sampled_from(INTERESTING),
        st.sampled_from((2, 4, 8)),
        st.booleans(),
    )
    # a known field of the format set to a chosen value (the field's index in ``where``)
    value = st.sampled_from(INTERESTING) | st.sampled_from(RELATIVE)
    field = st.tuples(st.just("field"), where, value, st.just(0), st.just(False))
    return st.one_of(flip, byte, number, field, field)


# Values relative to the file, as negative codes resolved by ``_value``.
RELATIVE = (-1, -2, -3, -4, -5)


def _value(code: int, size: int) -> int:
    """An INTERESTING value, or one relative to the file's size: its size in bytes,
    in sectors, minus one, in 4 KiB units, in MiB."""
    if code >= 0:
        return code
    return {-1: size, -2: size // 512, -3: size - 1, -4: size // 4096, -5: size >> 20}[code]


def locate(b: Base, size: int, where: Where) -> int:
    """A file offset: anywhere in the file, or inside one of the base's header and
    table regions."""
    anywhere, region, offset = where
    if anywhere:
        return offset % size
    start, length = b.regions[region % len(b.regions)]
    return min(start + offset % length, size - 1)


def mutate(b: Base, ops: list[Mutation], cut: int | None, reseal: bool) -> bytes:
    data = bytearray(b.data)
    for kind, where, value, width, big in ops:
        if kind == "at":  # an exact offset (the regression cases below)
            at = where[2]
        elif kind == "field":
            at, width, big = b.fields[where[2] % len(b.fields)]
            value = _value(value, len(b.data))
        else:
            at = locate(b, len(data), where)
        if kind == "flip":
            data[at] ^= 1 << value
        elif kind == "byte":
            data[at] = value
        else:
            raw = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big" if big else "little")
            data[at : at + width] = raw[: len(data) - at]
    if reseal:
        _reseal(b, data)
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    return bytes(data)


VHDX_CHECKSUMMED = ((64 * KiB, 4 * KiB), (128 * KiB, 4 * KiB), (192 * KiB, 64 * KiB),
                    (256 * KiB, 64 * KiB))  # fmt: skip


def _reseal(b: Base, data: bytearray) -> None:
    """Recompute the checksums a format keeps, so the mutation is looked at further."""
    if b.fmt == "vpc":
        for at in (0, len(data) - 512):
            if data[at : at + 8] == b"conectix":
                data[at + 64 : at + 68] = bytes(4)
                data[at + 64 : at + 68] = struct.pack(">I", vpc_checksum(data[at : at + 512]))
    elif b.fmt == "vhdx":
        for at, length in VHDX_CHECKSUMMED:
            block = data[at : at + length]
            if len(block) == length:
                block[4:8] = bytes(4)
                data[at + 4 : at + 8] = struct.pack("<I", crc32c(bytes(block)))


# --------------------------------------------------------------------------- decoding


class ExampleTooSlow(BaseException):
    """Raised in the decoder by the CPU timer; a BaseException, so no ``except
    Exception`` in the code under test can swallow it."""


@contextlib.contextmanager
def cpu_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` of CPU time (ITIMER_VIRTUAL: a busy host
    does not count, and pytest-timeout's SIGALRM is left alone)."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise ExampleTooSlow(f"an example used more than {seconds:g} s of CPU")

    previous = signal.signal(signal.SIGVTALRM, expire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def _data_size() -> int:
    with open("/proc/self/status") as status:
        match = re.search(r"^VmData:\s+(\d+) kB", status.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


@contextlib.contextmanager
def memory_limit(extra: int) -> Iterator[None]:
    """Let the block allocate at most ``extra`` more bytes of data (heap and anonymous
    mappings): beyond that, allocations raise MemoryError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = _data_size() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def read_disk(path: Path, fmt: str | None) -> None:
    """Open ``path`` inline and read its virtual disk (the ends only, when large)."""
    disk = open_input(str(path), fmt, isolation="inline")
    try:
        size = disk.virtual_size
        assert isinstance(size, int) and size >= 0
        spans = [(0, size)] if size <= FULL_READ else [(0, MiB), (size - MiB, MiB)]
        buf = memoryview(bytearray(CHUNK))
        for start, length in spans:
            at = start
            while at < start + length:
                n = min(CHUNK, start + length - at)
                disk.read_into(at, buf[:n])
                at += n
    finally:
        disk.close()


def check_decodes_cleanly(data: bytes, fmt: str | None) -> None:
    """The property: decoding ``data`` succeeds, or fails with one clean AioddError,
    within the CPU and memory limits."""
    with tempfile.TemporaryDirectory(prefix="aiodd-fuzz-") as work:
        path = Path(work) / "fuzzed.img"
        path.write_bytes(data)
        try:
            with cpu_limit(CPU_LIMIT), memory_limit(MEMORY_LIMIT):
                read_disk(path, fmt)
        except AioddError as exc:
            message = str(exc)
            assert message and "\n" not in message, f"not one line: {message!r}"
        except ExampleTooSlow as exc:  # an Exception, so hypothesis shrinks and reports it
            raise AssertionError(str(exc)) from None


# --------------------------------------------------------------------------- the target


@pytest.mark.parametrize("name", sorted(BASE_BUILDERS))
@FUZZ
@given(
    ops=st.lists(mutations(), min_size=1, max_size=6),
    cut=st.none() | st.none() | st.integers(0, 1 << 24),
    reseal=st.booleans(),
    forced=st.booleans(),
)
def test_mutated_images_fail_cleanly(
    name: str, ops: list[Mutation], cut: int | None, reseal: bool, forced: bool
) -> None:
    b = base(name)
    check_decodes_cleanly(mutate(b, ops, cut, reseal), b.fmt if forced else None)


@pytest.mark.parametrize("name", sorted(BASE_BUILDERS))
def test_bases_are_valid(name: str) -> None:
    """The unmutated bases decode (so the fuzzer starts from valid images)."""
    b = base(name)
    with tempfile.TemporaryDirectory(prefix="aiodd-fuzz-") as work:
        path = Path(work) / "base.img"
        path.write_bytes(b.data)
        read_disk(path, None)
        disk = open_input(str(path), None, isolation="inline")
        try:
            assert disk.format_name == b.fmt
        finally:
            disk.close()


@pytest.mark.parametrize("name", sorted(BASE_BUILDERS))
@settings(FUZZ, max_examples=max(1, PER_BASE // 4))
@given(cut=st.integers(0, 1 << 24), forced=st.booleans())
def test_truncated_images_fail_cleanly(name: str, cut: int, forced: bool) -> None:
    b = base(name)
    check_decodes_cleanly(b.data[: cut % (len(b.data) + 1)], b.fmt if forced else None)


EXTREMES = (0, 1, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 63, (1 << 64) - 1, -1, -2)


@pytest.mark.parametrize("name", sorted(BASE_BUILDERS))
def test_every_field_at_extreme_values(name: str) -> None:
    """A deterministic sweep: each known field alone at each extreme (the file's size
    in bytes and in sectors included), checksums resealed, the format forced."""
    b = base(name)
    for index in range(len(b.fields)):
        for value in EXTREMES:
            op: Mutation = ("field", (False, 0, index), value, 0, False)
            check_decodes_cleanly(mutate(b, [op], None, True), b.fmt)


# --------------------------------------------------------------------------- regressions

# A KDMV header with capacity 0 and a descriptor offset of 2**63 sectors or more once
# reached os.pread unchecked (OverflowError); found by the pair sweep of header fields.
REGRESSIONS: list[object] = [
    pytest.param(
        name,
        [("at", (False, 0, 12), 0, 8, False), ("at", (False, 0, 28), 1 << 63, 8, False)],
        None,
        False,
        True,
        id=f"{name}-capacity-0-descriptor-offset-2**63",
    )
    for name in ("vmdk", "vmdk_stream")
]
"""Crashes the fuzzer found: (base, mutations, cut, reseal, forced), one param each."""


@pytest.mark.parametrize(("name", "ops", "cut", "reseal", "forced"), REGRESSIONS)
def test_regressions(
    name: str, ops: list[Mutation], cut: int | None, reseal: bool, forced: bool
) -> None:
    b = base(name)
    check_decodes_cleanly(mutate(b, ops, cut, reseal), b.fmt if forced else None)
