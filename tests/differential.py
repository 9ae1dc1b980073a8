"""The C decoders against their Python twins: what the differential tests share
(docs/kvm.md, "Testing the decoders").

:func:`agree` is the comparison itself: the same open error, the same virtual size and
the same bytes or error for each read, the first read that differs named in the
failure.  :class:`Differential` runs both decoders over one image of a format the
registry opens and :func:`plan` is the reads a format's tests make by default.
:func:`damaged`, :func:`edited`, :func:`field_cases` and :func:`compare_each` give and
compare the cases of tests/hostile.py; :data:`searching`, :func:`edit_lists`,
:func:`mutated` and :func:`cut_short` make the hypothesis tests' mutations.
:func:`vm_outcome` is what the shipped guest reads in its micro-VM, and
:func:`command_doorbells` counts the doorbells of a copy's commands.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from aiodd.formats import registry
from aiodd.formats.base import VirtualDisk
from tests import hostile
from tests.fuzz.hosted import (
    GUEST_FORMATS,
    ChainResolver,
    Hosted,
    Layers,
    MemFile,
    Outcome,
    Reads,
    python_outcome,
)

MiB = 1 << 20


def plan(virtual_size: int, seed: int = 0) -> list[tuple[int, int]]:
    """The reads of one image, all inside the virtual disk (the decoders' contract: a
    caller never reads past it): the start in 1 MiB commands, the end, and odd ranges
    across sectors, clusters and tables."""
    if virtual_size == 0:
        return [(0, 0)]
    reads = [
        (start, min(MiB, virtual_size - start))
        for start in range(0, min(virtual_size, 4 * MiB), MiB)
    ]
    if virtual_size > 4 * MiB:
        reads.append((virtual_size - MiB, MiB))
    rng = random.Random(seed)
    for _ in range(6):
        start = rng.randrange(virtual_size)
        length = rng.choice([1, 511, 4097, 65537, 300000])
        reads.append((start, min(length, virtual_size - start)))
    reads.append((max(virtual_size - 50, 0), min(50, virtual_size)))
    return reads


def _short(read: bytes | tuple[str, str]) -> object:
    return read if isinstance(read, tuple) else f"{len(read)} bytes"


def agree(got: Outcome, expected: Outcome, reads: Reads) -> None:
    """The C decoder's outcome ``got`` is Python's ``expected``; a read that differs is
    named by its range, its bytes shown by their length."""
    assert got.error == expected.error
    assert got.virtual_size == expected.virtual_size
    assert len(got.reads) == len(expected.reads)
    for i, (a, b) in enumerate(zip(got.reads, expected.reads, strict=True)):
        if a != b:
            where = reads(expected.virtual_size or 0)[i]
            assert a == b, f"read {where}: C {_short(a)}, Python {_short(b)}"


@dataclass(frozen=True)
class Differential:
    """Both decoders over an image opened as ``fmt`` (named ``name``) by default; the
    call's ``fmt`` and ``name`` open another format's image, a qcow2 over this one."""

    fmt: str
    name: str

    def __call__(
        self,
        hosted: Hosted,
        data: bytes,
        files: dict[str, bytes] | None = None,
        reads: Reads = plan,
        *,
        fmt: str | None = None,
        name: str | None = None,
    ) -> Outcome:
        fmt = fmt or self.fmt
        name = name or self.name
        files = files or {}
        expected = python_outcome(
            lambda: registry.open_disk(MemFile(data, name), ChainResolver(files), fmt), reads
        )
        got = hosted.outcome(data, ChainResolver(files), reads, name=name, fmt=GUEST_FORMATS[fmt])
        agree(got, expected, reads)
        return got


def damaged(fmt: str, flips: int) -> list[tuple[str, bytes]]:
    """tests/hostile.py's base image of ``fmt`` cut at each of its places, then with a
    few bits flipped for each of ``flips`` seeds."""
    b = hostile.base(fmt)
    cases = [(f"truncated_at_{cut}", b.data[: hostile.cut_offset(b, cut)]) for cut in hostile.CUTS]
    cases += [
        (f"flipped_{seed}", hostile.flip_bits(b, seed, 1 + seed % 4)) for seed in range(flips)
    ]
    return cases


def edited(
    fmt: str, edits: Mapping[str, Sequence[tuple[int, str, int | bytes]]]
) -> list[tuple[str, bytes]]:
    """tests/hostile.py's base image of ``fmt`` with each case's values packed in (at,
    struct format, value), the case named by its key."""
    b = hostile.base(fmt)
    cases = []
    for name, values in edits.items():
        data = bytearray(b.data)
        for at, form, value in values:
            struct.pack_into(form, data, at, value)
        cases.append((name, bytes(data)))
    return cases


def field_cases(fmt: str, names: Iterable[str], tmp: Path) -> list[tuple[str, bytes]]:
    """tests/hostile.py's cases ``{fmt}_{name}``, each built in its own folder under
    ``tmp``."""
    cases = []
    for name in names:
        case = next(c for c in hostile.CASES if c.id == f"{fmt}_{name}")
        (tmp / name).mkdir()
        cases.append((name, case.build(hostile.make_tree(tmp / name)).image.read_bytes()))
    return cases


# Examples per mutation test; AIODD_DIFF_EXAMPLES=N for a longer search.
EXAMPLES = int(os.environ.get("AIODD_DIFF_EXAMPLES", "300"))
# A mutation test's search: every example runs both decoders, slow by design.
searching = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def edit_lists(
    aims: int = 16, reach: int = 1 << 20
) -> st.SearchStrategy[list[tuple[int, int, int]]]:
    """Up to 6 byte edits (where, pos, value): ``where`` below ``aims`` picks the kind of
    place, ``pos`` up to ``reach`` the place."""
    edit = st.tuples(st.integers(0, aims - 1), st.integers(0, reach), st.integers(0, 255))
    return st.lists(edit, max_size=6)


def mutated(
    base: bytes, edits: Iterable[tuple[int, int, int]], aim: Callable[[int, int], int]
) -> bytes:
    """``base`` with each edit (where, pos, value) setting the byte at ``aim(where,
    pos)``, wrapped to the image."""
    data = bytearray(base)
    for where, pos, value in edits:
        data[aim(where, pos) % len(data)] = value
    return bytes(data)


def cut_short(data: bytes, cut: int) -> bytes:
    """``data`` cut at ``cut`` (wrapped), one time in four."""
    return data[: cut % (len(data) + 1)] if cut % 4 == 0 else data


def compare_each(
    compare: Callable[[Hosted, bytes], Outcome], hosted: Hosted, cases: Iterable[tuple[str, bytes]]
) -> dict[str, Outcome]:
    """Each case through ``compare``, a failure named by its case."""
    outcomes = {}
    for name, data in cases:
        try:
            outcomes[name] = compare(hosted, data)
        except AssertionError as exc:
            raise AssertionError(f"hostile case {name}: {exc}") from None
    return outcomes


# The 4 MiB commands of a 16 MiB disk, as the VMM sends a copy's.
COMMANDS = [(start, 4 * MiB) for start in range(0, 16 * MiB, 4 * MiB)]


def command_doorbells(hosted: Hosted, data: bytes, fill: bytes) -> int:
    """The doorbells COMMANDS ring over ``data`` (a disk written ``fill`` throughout),
    after the open's."""
    hosted.outcome(data, ChainResolver({}), lambda vs: [])
    opened = hosted.doorbells
    got = hosted.outcome(data, ChainResolver({}), lambda vs: COMMANDS)
    assert all(r == fill * 4 * MiB for r in got.reads)
    return hosted.doorbells - opened


def vm_outcome(
    reader: object, data: bytes, layers: Layers, fmt: str, name: str, reads: Reads
) -> Outcome:
    """What ``data`` reads as through the VMM's reader (the shipped guest in its
    micro-VM), as :func:`~tests.fuzz.hosted.python_outcome` gives Python's; the disk
    closed after."""
    kvm_reader: Any = reader
    opened: list[VirtualDisk] = []

    def open_disk() -> VirtualDisk:
        opened.append(kvm_reader.open_disk(MemFile(data, name), layers, fmt))
        return opened[-1]

    try:
        return python_outcome(open_disk, reads)
    finally:
        for disk in opened:
            disk.close()
