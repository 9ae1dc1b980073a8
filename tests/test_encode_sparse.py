"""Sparse output plans (``--sparse``) as pure state machines: fed every byte as data they
rebuild the dense plan's file exactly; fed data with zeros, the file they describe
decodes (with aiodd's own decoders) to the same disk, with a block allocated exactly
where the disk holds a non-zero byte.  The zero finder is checked against a plain
scan.  No files, no qemu: tests/test_sparse.py runs the real thing against qemu-img."""

from __future__ import annotations

import itertools
import mmap
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiodd.buffers import ZERO_GRANULE, data_runs
from aiodd.formats import registry
from aiodd.formats.base import OutputPlan, Reference, SparsePlan, VirtualDisk
from aiodd.formats.plans import Identity, Packer
from aiodd.formats.qcow2 import encode as qcow2
from aiodd.formats.vdi import encode as vdi
from aiodd.formats.vhdx import encode as vhdx
from aiodd.formats.vmdk import encode as vmdk
from aiodd.formats.vpc import encode as vpc

KiB, MiB = 1 << 10, 1 << 20
FIXED = Identity(seed=b"0123456789abcdef", timestamp=1_700_000_000)
FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi")
ENCODERS = {"qcow2": qcow2, "vmdk": vmdk, "vpc": vpc, "vhdx": vhdx, "vdi": vdi}
# Allocation unit of each structured format (vhdx: the block size qemu picks below 1 GiB).
UNIT = {
    "raw": ZERO_GRANULE, "qcow2": 64 * KiB, "vmdk": 64 * KiB, "vpc": 2 * MiB, "vhdx": 8 * MiB,
    "vdi": MiB,
}  # fmt: skip


class MemFile:
    def __init__(self, data: bytes, name: str = "mem") -> None:
        self._data = data
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return len(self._data)

    def pread(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def readinto(self, offset: int, buf: memoryview) -> int:
        chunk = self._data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        pass


class NoResolver:
    def open_file(self, ref: Reference) -> MemFile:
        raise AssertionError("a plain output names no other file")

    def open_disk(self, ref: Reference) -> VirtualDisk:
        raise AssertionError("a plain output names no other file")

    def open_layer(self, ref: Reference) -> tuple[MemFile, NoResolver]:
        raise AssertionError("a plain output names no other file")


def _sparse(fmt: str, out: int) -> SparsePlan:
    if fmt in ("raw", "qcow2"):  # no identity
        return registry.sparse_plan(fmt, out)
    plan: SparsePlan = ENCODERS[fmt].sparse_plan(out, identity=FIXED)
    return plan


def _dense(fmt: str, out: int) -> OutputPlan:
    if fmt in ("raw", "qcow2"):
        return registry.plan(fmt, out)
    plan: OutputPlan = ENCODERS[fmt].plan(out, identity=FIXED)
    return plan


def dense_file(fmt: str, disk: bytes) -> bytes:
    plan = _dense(fmt, len(disk))
    image = bytearray(plan.file_size)
    for offset, data in plan.metadata():
        image[offset : offset + len(data)] = data
    padded = disk + bytes(plan.data_size - len(disk))
    pos = 0
    for extent in plan.data_extents(0, plan.data_size):
        end = extent.file_offset + extent.length
        image[extent.file_offset : end] = padded[pos : pos + extent.length]
        pos += extent.length
    return bytes(image)


def sparse_file(fmt: str, disk: bytes, chunk: int = MiB) -> tuple[bytes, set[int], SparsePlan]:
    """The file a sparse plan describes for ``disk`` (fed ``chunk`` bytes at a time, each
    chunk's runs found as the reader finds them), the sectors written, and the plan."""
    plan = _sparse(fmt, len(disk))
    writes: list[tuple[int, bytes]] = list(plan.head())
    padded = disk + bytes(plan.data_size - len(disk))
    for start in range(0, plan.data_size, chunk):
        piece = memoryview(padded)[start : start + chunk]
        for rel, length in data_runs(piece):
            pos = rel
            for extent in plan.data_extents(start + rel, length):
                writes.append((extent.file_offset, bytes(piece[pos : pos + extent.length])))
                pos += extent.length
            assert pos == rel + length
        writes += plan.ready(start + len(piece))
    writes += list(plan.finish())
    image = bytearray(plan.file_size)
    written: set[int] = set()
    for offset, data in writes:
        assert offset + len(data) <= plan.file_size, "a write past the file's end"
        image[offset : offset + len(data)] = data
        written.update(range(offset // 512, -(-(offset + len(data)) // 512)))
    return bytes(image), written, plan


def read_back(fmt: str, image: bytes) -> tuple[bytes, VirtualDisk]:
    disk = registry.open_disk(MemFile(image), NoResolver(), fmt)
    out = bytearray(disk.virtual_size)
    step = 4 * MiB
    for offset in range(0, disk.virtual_size, step):
        disk.read_into(offset, memoryview(out)[offset : offset + step])
    return bytes(out), disk


def disk_with(size: int, pieces: list[tuple[int, int]], seed: int = 1) -> bytes:
    rng = random.Random(seed)
    data = bytearray(size)
    for offset, length in pieces:
        data[offset : offset + length] = rng.randbytes(length)
    return bytes(data)


# --- every byte data: the dense file, to the byte ------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [1, 3000, 65536 + 512, 2 * MiB + 4097, 9 * MiB + 1000])
def test_all_data_gives_the_dense_file(fmt: str, size: int) -> None:
    disk = (bytes(range(1, 252)) * (size // 251 + 1))[:size]  # no zero byte
    image, _, _ = sparse_file(fmt, disk)
    assert image == dense_file(fmt, disk)


# --- data and zeros: same disk, blocks only where data is ---------------------------------


def _allocated(fmt: str, image: bytes, disk: VirtualDisk) -> set[int]:
    """The units of the virtual disk the image allocates, read from its own tables."""
    unit = UNIT[fmt]
    units = -(-disk.virtual_size // unit)
    if fmt == "qcow2":
        found = set()
        l1_size, l1_offset = struct.unpack_from(">IQ", image, 36)
        for i in range(l1_size):
            (l2,) = struct.unpack_from(">Q", image, l1_offset + 8 * i)
            l2 &= (1 << 56) - 512
            for j in range(8192 if l2 else 0):
                (entry,) = struct.unpack_from(">Q", image, l2 + 8 * j)
                if entry & ((1 << 56) - 512):
                    found.add(i * 8192 + j)
        return found
    if fmt == "vmdk":
        gd_offset = struct.unpack_from("<Q", image, 56)[0] * 512
        found = set()
        for g in range(-(-units // 512)):
            (gt,) = struct.unpack_from("<I", image, gd_offset + 4 * g)
            for j in range(512):
                if g * 512 + j < units and struct.unpack_from("<I", image, gt * 512 + 4 * j)[0]:
                    found.add(g * 512 + j)
        return found
    if fmt == "vpc":
        bat = vpc.BAT_OFFSET
        return {
            b for b in range(units) if struct.unpack_from(">I", image, bat + 4 * b)[0] != 0xFFFFFFFF
        }
    if fmt == "vdi":
        return {
            b for b in range(units) if struct.unpack_from("<I", image, 512 + 4 * b)[0] < 0xFFFFFFFE
        }
    if fmt == "vhdx":
        ratio = 2**23 * 512 // unit
        states = {
            b: struct.unpack_from("<Q", image, vhdx.BAT_OFFSET + 8 * (b + b // ratio))[0] & 7
            for b in range(units)
        }
        assert set(states.values()) <= {0, 6}
        return {b for b, state in states.items() if state == 6}
    raise AssertionError(fmt)


def _units_with_data(disk: bytes, unit: int) -> set[int]:
    return {u for u in range(-(-len(disk) // unit)) if any(disk[u * unit : (u + 1) * unit])}


PATTERNS = {
    "all zeros": (9 * MiB + 1000, []),
    "one byte": (5 * MiB, [(3 * MiB + 77, 1)]),
    "head and tail": (9 * MiB + 1000, [(0, 4096), (9 * MiB + 999, 1)]),
    "mixed": (
        13 * MiB + 512,
        [
            (100, 5000),
            (64 * KiB, 64 * KiB),
            (2 * MiB - 1, 2),
            (5 * MiB, 3 * MiB + 5),
            (12 * MiB, 7),
        ],
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_zeros_are_left_out(fmt: str, pattern: str) -> None:
    size, pieces = PATTERNS[pattern]
    disk = disk_with(size, pieces)
    image, written, _ = sparse_file(fmt, disk, chunk=4 * MiB)
    content, decoded = read_back(fmt, image)
    assert content[:size] == disk and not any(content[size:])
    if fmt == "raw":
        # Only the granules with data are written.
        granules = {offset * 512 // ZERO_GRANULE for offset in written}
        assert granules == _units_with_data(disk, ZERO_GRANULE)
        return
    assert _allocated(fmt, image, decoded) == _units_with_data(disk, UNIT[fmt])
    # Packed: the blocks with data follow the metadata, and the file ends with them.
    blocks = len(_units_with_data(disk, UNIT[fmt]))
    assert len(image) == _first_block(fmt, size) + blocks * _stride(fmt) + (
        512 if fmt == "vpc" else 0
    )


def _first_block(fmt: str, size: int) -> int:
    if fmt == "qcow2":
        return qcow2.plan(size).layout.data_offset
    if fmt == "vmdk":
        return vmdk.plan(size).layout.grain_offset * 512
    if fmt == "vpc":
        return vpc.plan(size).data_start
    if fmt == "vdi":
        return vdi.plan(size).data_start
    return vhdx.plan(size).layout.payload_offset


def _stride(fmt: str) -> int:
    return vpc.STRIDE if fmt == "vpc" else UNIT[fmt]


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    size=st.integers(1, 6 * MiB),
    pieces=st.lists(st.tuples(st.integers(0, 6 * MiB), st.integers(1, 200_000)), max_size=6),
    chunk=st.sampled_from([64 * KiB, MiB, 4 * MiB]),
)
def test_any_pattern_reads_back(
    fmt: str, size: int, pieces: list[tuple[int, int]], chunk: int
) -> None:
    disk = disk_with(size, [(o % size, n) for o, n in pieces])[:size]
    image, _, _ = sparse_file(fmt, disk, chunk)
    content, decoded = read_back(fmt, image)
    assert content[:size] == disk and not any(content[size:])
    if fmt != "raw":
        assert _allocated(fmt, image, decoded) == _units_with_data(disk, UNIT[fmt])


def test_the_packer_refuses_data_out_of_order() -> None:
    packer = Packer(block=4, blocks=10, per_table=3, base=100, stride=5, render=lambda i, s: [])
    assert [(e.file_offset, e.length) for e in packer.extents(5, 10)] == [
        (101, 3), (105, 4), (110, 3),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="out of order"):
        packer.extents(0, 1)
    with pytest.raises(ValueError, match="outside the disk"):
        packer.extents(40, 1)
    assert packer.ready(24) == []  # tables 0 and 1 are final: nothing may land there now
    with pytest.raises(ValueError, match="out of order"):
        packer.extents(22, 1)


def test_the_packer_renders_each_table_once_in_order() -> None:
    seen: list[tuple[int, list[int] | None]] = []

    def render(index: int, slots: object) -> list[tuple[int, bytes]]:
        seen.append((index, None if slots is None else list(slots)))  # type: ignore[call-overload]
        return [(index, b"x")]

    packer = Packer(block=1, blocks=7, per_table=2, base=0, stride=1, render=render)
    packer.extents(1, 1)
    assert packer.ready(2) == [(0, b"x")]
    packer.extents(5, 1)  # table 1 is passed over: rendered without slots
    assert packer.ready(5) == [(1, b"x")]
    assert packer.finish() == [(2, b"x"), (3, b"x")]
    assert seen == [(0, [-1, 0]), (1, None), (2, [-1, 1]), (3, None)]


# --- the zero finder -------------------------------------------------------------------------


def _scan(data: bytes, granule: int = ZERO_GRANULE) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for at in range(0, len(data), granule):
        if any(data[at : at + granule]):
            if runs and runs[-1][0] + runs[-1][1] == at:
                runs[-1] = (runs[-1][0], runs[-1][1] + len(data[at : at + granule]))
            else:
                runs.append((at, len(data[at : at + granule])))
    return runs


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 300_000),
    marks=st.lists(st.tuples(st.integers(0, 299_999), st.integers(1, 255)), max_size=12),
    writable=st.booleans(),
)
def test_data_runs_matches_a_plain_scan(
    size: int, marks: list[tuple[int, int]], writable: bool
) -> None:
    data = bytearray(size)
    for at, value in marks:
        data[at % size] = value
    if writable:  # a pool buffer: compared in place
        with mmap.mmap(-1, size) as memory:
            memory[:] = data
            view = memoryview(memory)
            try:
                assert data_runs(view) == _scan(bytes(data))
            finally:
                view.release()
    else:
        assert data_runs(memoryview(bytes(data))) == _scan(bytes(data))


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 200_000),
    data=st.lists(st.tuples(st.integers(0, 199_999), st.integers(1, 30_000)), max_size=6),
    cuts=st.lists(st.integers(0, 200_000), max_size=12),
)
def test_data_runs_trusts_the_holes_it_is_told(
    size: int, data: list[tuple[int, int]], cuts: list[int]
) -> None:
    """Known holes (a raw file's) are not looked at, whatever their alignment: the runs
    are those of a plain scan."""
    buf = bytearray(size)
    for at, length in data:
        at %= size
        buf[at : at + length] = b"\x01" * len(buf[at : at + length])
    # Holes: the zero stretches between the cut points (as a file reports them).
    points = sorted({0, size, *(c % size for c in cuts)})
    holes = [(lo, hi - lo) for lo, hi in itertools.pairwise(points) if not any(buf[lo:hi])]
    with mmap.mmap(-1, size) as memory:
        memory[:] = buf
        view = memoryview(memory)
        try:
            assert data_runs(view, holes=holes) == _scan(bytes(buf))
        finally:
            view.release()


def test_data_runs_of_random_data_is_one_run() -> None:
    data = bytearray(os.urandom(4 * MiB))
    data[0] = 1
    assert data_runs(memoryview(data)) == [(0, 4 * MiB)]
    assert data_runs(memoryview(bytearray(4 * MiB))) == []
    assert data_runs(memoryview(b"")) == []
