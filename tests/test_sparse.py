"""``--sparse`` / ``dd(sparse=True)`` judged by qemu (docs/usage.md, "Sparse output"):
every output format holds the same disk (``qemu-img compare``), allocates nothing where
the disk holds only zeros (``qemu-img map``, the vhdx BAT, the file's blocks), and
passes ``qemu-img check``; a block device gets its zeros written."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

import aiodd
from aiodd.cli import main
from aiodd.formats.vhdx import encode as vhdx
from tests.conftest import needs_qemu, qemu_img
from tests.test_sink import loop_device as loop_device

pytestmark = [pytest.mark.anyio, needs_qemu]

KiB, MiB = 1 << 10, 1 << 20
GRANULE = 4 * KiB
UNIT = {
    "raw": GRANULE, "qcow2": 64 * KiB, "vmdk": 64 * KiB, "vpc": 2 * MiB, "vhdx": 8 * MiB,
    "vdi": MiB,
}  # fmt: skip
FORMATS = tuple(UNIT)
CHECKABLE = {"qcow2", "vmdk", "vhdx", "vdi"}
SKIP = 129  # sectors: the window starts inside the input's first 64 KiB cluster
# Data in the window's own offsets: a few bytes, whole clusters, a byte at a block's
# edge, zero clusters, zero 2 MiB and 8 MiB blocks, and a last byte in an unaligned tail.
PIECES = [
    (0, 5000),
    (128 * KiB, 64 * KiB),
    (2 * MiB - 1, 2),
    (3 * MiB + 100, 10),
    (17 * MiB + 3, 70 * KiB),
    (20 * MiB + 999, 1),
]
WINDOW = 20 * MiB + 1000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same disk as raw and as qcow2 (qemu-img convert: zero clusters unallocated),
    and the window it yields as raw, the reference."""
    root = tmp_path_factory.mktemp("sparse")
    disk = bytearray(SKIP * 512 + WINDOW + 3 * MiB)
    for offset, length in PIECES:
        at = SKIP * 512 + offset
        disk[at : at + length] = os.urandom(length)
        disk[at] |= 1  # never a zero where data is meant
    raw = root / "disk.raw"
    raw.write_bytes(disk)
    qcow = root / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    window = root / "window.raw"
    window.write_bytes(bytes(disk[SKIP * 512 : SKIP * 512 + WINDOW]))
    return {"raw": raw, "qcow2": qcow, "window": window}


def data_ranges(image: Path, fmt: str) -> list[tuple[int, int]]:
    """``qemu-img map``'s ranges that hold data, merged."""
    ranges: list[tuple[int, int]] = []
    for entry in json.loads(qemu_img("map", "-f", fmt, "--output=json", image).stdout):
        if entry["data"]:
            start, end = entry["start"], entry["start"] + entry["length"]
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def units_with_data(window: bytes, unit: int, size: int) -> list[tuple[int, int]]:
    """The units that hold a non-zero byte, as merged ranges clipped to ``size``."""
    ranges: list[tuple[int, int]] = []
    for u in range(-(-len(window) // unit)):
        if any(window[u * unit : (u + 1) * unit]):
            start, end = u * unit, min((u + 1) * unit, size)
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def vhdx_allocated(image: Path) -> list[int]:
    """The payload blocks the BAT says are present (qemu-img map cannot say for vhdx)."""
    data = image.read_bytes()
    size = WINDOW + (-WINDOW % 512)
    layout = vhdx.plan(size).layout
    ratio = layout.chunk_ratio
    present = []
    for block in range(layout.payload_blocks):
        (entry,) = struct.unpack_from("<Q", data, vhdx.BAT_OFFSET + 8 * (block + block // ratio))
        assert entry & 7 in (0, 6)
        if entry & 7 == 6:
            present.append(block)
    return present


@pytest.mark.parametrize(
    ("fmt", "source", "isolation"),
    [
        ("raw", "raw", "inline"),
        ("raw", "qcow2", "sandbox"),
        ("qcow2", "raw", "inline"),
        ("qcow2", "qcow2", "sandbox"),
        ("vmdk", "qcow2", "inline"),
        ("vpc", "raw", "sandbox"),
        ("vhdx", "qcow2", "inline"),
        ("vdi", "qcow2", "sandbox"),
    ],
)
async def test_same_disk_and_no_block_of_zeros(
    sources: dict[str, Path], tmp_path: Path, fmt: str, source: str, isolation: aiodd.Isolation
) -> None:
    out = tmp_path / f"out.{fmt}"
    result = await aiodd.dd(
        sources[source], out, bs=512, skip=SKIP, count=SKIP + -(-WINDOW // 512),
        output_format=fmt, isolation=isolation, sparse=True,
    )  # fmt: skip
    window = sources["window"].read_bytes()
    window += bytes(-len(window) % 512)
    assert result.bytes_copied == len(window)
    compared = qemu_img("compare", "-f", "raw", "-F", fmt, sources["window"], out, check=False)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    if fmt in CHECKABLE:
        checked = qemu_img("check", "-f", fmt, out, check=False)
        assert checked.returncode == 0 and b"leak" not in checked.stdout, checked.stdout
    size = result.output_size
    expected = units_with_data(window, UNIT[fmt], size)
    if fmt == "vhdx":
        assert vhdx_allocated(out) == [start // UNIT[fmt] for start, _ in expected]
    else:
        assert data_ranges(out, fmt) == expected
    # The file holds the granules with data and the metadata, nothing more.
    granules = len(units_with_data(window, GRANULE, size))
    used = out.stat().st_blocks * 512
    if fmt == "raw":
        blocks = sum(-(-(end - start) // GRANULE) for start, end in expected)
        assert blocks * GRANULE <= used <= (blocks + 1) * GRANULE  # + the fs's extent block
    else:
        assert used <= 2 * granules * GRANULE + MiB  # a granule may straddle two fs blocks


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_window_of_zeros_allocates_nothing(
    sources: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / f"zeros.{fmt}"
    start = (SKIP * 512 + 5 * MiB) // 512  # [5 MiB, 16 MiB) of the window: all zeros
    await aiodd.dd(
        sources["qcow2"], out, bs=512, skip=start, count=start + 11 * MiB // 512,
        output_format=fmt, isolation="inline", sparse=True,
    )  # fmt: skip
    if fmt == "vhdx":
        assert vhdx_allocated(out) == []
        assert out.stat().st_blocks * 512 < MiB
    else:
        assert data_ranges(out, fmt) == []
    back = tmp_path / "back.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", out, back)
    assert back.stat().st_size >= 11 * MiB  # vpc: CHS-rounded
    with back.open("rb") as f:
        assert not any(f.read())


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vpc", "vhdx", "vdi"])
async def test_an_empty_window(sources: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"empty.{fmt}"
    result = await aiodd.dd(
        sources["raw"], out, count=0, output_format=fmt, isolation="inline", sparse=True
    )
    assert result.output_size == 0
    info = json.loads(qemu_img("info", "-f", fmt, "--output=json", out).stdout)
    assert info["virtual-size"] == 0


def test_the_flag_on_the_command_line(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli.qcow2"
    status = main(
        ["--isolation=inline", "--sparse", "-O", "qcow2", f"if={sources['window']}", f"of={out}"]
    )
    assert status == 0
    window = sources["window"].read_bytes()
    assert data_ranges(out, "qcow2") == units_with_data(
        window, 64 * KiB, len(window) + (-len(window) % 512)
    )
    dense = tmp_path / "dense.qcow2"
    assert (
        main(["--isolation=inline", "-O", "qcow2", f"if={sources['window']}", f"of={dense}"]) == 0
    )
    assert out.stat().st_size < dense.stat().st_size // 10


def test_a_block_device_gets_its_zeros_written(
    loop_device: Path,
    tmp_path: Path,
) -> None:
    src = tmp_path / "in.raw"
    data = bytearray(MiB)
    data[5000:6000] = os.urandom(1000)
    src.write_bytes(data)
    status = main(["--isolation=inline", "--sparse", f"if={src}", f"of={loop_device}"])
    assert status == 0
    with loop_device.open("rb") as device:
        written = device.read(4 * MiB)
    assert written[:MiB] == data  # the zeros too: a device has no holes
    assert written[MiB:] == b"\xee" * (3 * MiB)


async def test_vdi_is_what_qemu_img_convert_writes(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """``--sparse -O vdi`` lays out the file as ``qemu-img convert -O vdi`` does: the same
    blocks allocated, packed in order, the same file size; the same bytes but for the
    two random UUIDs."""
    ours, theirs = tmp_path / "ours.vdi", tmp_path / "theirs.vdi"
    await aiodd.dd(sources["window"], ours, output_format="vdi", isolation="inline", sparse=True)
    qemu_img("convert", "-f", "raw", "-O", "vdi", sources["window"], theirs)
    mine, qemus = bytearray(ours.read_bytes()), bytearray(theirs.read_bytes())
    mine[392:424] = qemus[392:424] = bytes(32)
    assert len(mine) == len(qemus)
    assert mine == qemus
