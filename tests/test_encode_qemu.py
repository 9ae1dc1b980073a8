"""Encoded outputs judged by the oracles: real ``qemu-img dd -O FMT`` for the same window
(virtual size), ``qemu-img check``, ``qemu-img convert -O raw`` (the bytes), and the
independent readers ``vmdkinfo`` / ``vhdiinfo`` (libvmdk-utils, libvhdi-utils).

Files are written by a small synchronous sink (:func:`write_image`): metadata blocks and
window bytes at the offsets the plan gives.  Huge sizes are checked *sparse*: metadata
written, data left as a hole (qemu-img check and map never read guest data)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from aiodd.errors import UsageError
from aiodd.formats import registry as encoders
from aiodd.formats.base import OutputPlan
from aiodd.formats.vdi import encode as vdi
from aiodd.formats.vhdx import encode as vhdx
from aiodd.formats.vmdk import encode as vmdk
from aiodd.formats.vpc import encode as vpc
from tests.conftest import needs_qemu, qemu_img

pytestmark = needs_qemu

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
FORMATS = ("qcow2", "vmdk", "vpc", "vhdx", "vdi")
WINDOWS = (0, 1, 511, 513, 3000, 65535, 65537, MiB, 2 * MiB - 1, 2 * MiB + 1, 8 * MiB + 1)
CHECKABLE = {"qcow2", "vmdk", "vhdx", "vdi"}  # qemu-img check does not support vpc
INFO_TOOL = {"vmdk": "vmdkinfo", "vpc": "vhdiinfo", "vhdx": "vhdiinfo"}


def write_image(plan: OutputPlan, window: bytes, path: Path, *, data: bool = True) -> None:
    """The reference sink: every metadata block and window byte at its offset.  With
    ``data=False`` the data extents are left as holes (sparse, for huge plans)."""
    padded = window + bytes(plan.data_size - len(window)) if data else b""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset, block in plan.metadata():
            os.pwrite(fd, block, offset)
        if data:
            position = 0
            view = memoryview(padded)
            for extent in plan.data_extents(0, plan.data_size):
                os.pwrite(fd, view[position : position + extent.length], extent.file_offset)
                position += extent.length
        os.ftruncate(fd, plan.file_size)
    finally:
        os.close(fd)
    assert path.stat().st_size == plan.file_size


def info(path: Path, fmt: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(
        qemu_img("info", "-f", fmt, "--output=json", path).stdout
    )
    return result


def check_clean(path: Path, fmt: str) -> None:
    """qemu-img check: no errors, no leaks (exit 0)."""
    result = qemu_img("check", "-f", fmt, path, check=False)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    assert "No errors were found" in output
    assert "leak" not in output


def to_raw(path: Path, fmt: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"{path.name}.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_dd(fmt: str, source: Path, out: int, dest: Path) -> subprocess.CompletedProcess[bytes]:
    """qemu-img dd of exactly the ``out``-byte window of ``source``."""
    bs, count = (out, 1) if out else (512, 0)
    return qemu_img(
        "dd", "-f", "raw", "-O", fmt, f"if={source}", f"of={dest}", f"bs={bs}", f"count={count}",
        check=False,
    )  # fmt: skip


def reader_verdict(fmt: str, path: Path) -> int | None:
    """vmdkinfo / vhdiinfo's exit status on ``path`` (None: no such tool)."""
    tool = INFO_TOOL.get(fmt)
    if tool is None or shutil.which(tool) is None:
        return None
    return subprocess.run([tool, str(path)], capture_output=True, check=False).returncode


def reader_accepts(fmt: str, path: Path) -> None:
    assert reader_verdict(fmt, path) in (0, None)


def window_bytes(out: int) -> bytes:
    rng = random.Random(out)
    # randbytes takes at most 2**31 bits at a time: draw in pieces.
    data = bytearray()
    while len(data) < out:
        data += rng.randbytes(min(out - len(data), 64 << 20))
    # Some zero stretches too: a dense writer must not drop them.
    for start in range(0, out, 3 * 65536):
        data[start : start + 40000] = bytes(len(data[start : start + 40000]))
    return bytes(data)


def compare_with_qemu(fmt: str, out: int, tmp_path: Path) -> None:
    window = window_bytes(out)
    source = tmp_path / "in.raw"
    source.write_bytes(window)
    theirs = tmp_path / f"qemu.{fmt}"
    ours = tmp_path / f"ours.{fmt}"
    done = qemu_dd(fmt, source, out, theirs)
    if fmt == "vmdk" and out == 0:
        assert done.returncode == 1  # qemu fails too (and leaves a broken file)
        with pytest.raises(UsageError, match="vmdk cannot hold an empty image"):
            encoders.plan(fmt, out)
        return
    assert done.returncode == 0, done.stderr.decode()
    plan = encoders.plan(fmt, out)
    write_image(plan, window, ours)
    assert info(ours, fmt)["virtual-size"] == info(theirs, fmt)["virtual-size"]
    assert plan.virtual_size == info(theirs, fmt)["virtual-size"]
    if fmt in CHECKABLE:
        check_clean(ours, fmt)
    raw = to_raw(ours, fmt, tmp_path)
    assert raw == window + bytes(plan.virtual_size - out)
    assert raw == to_raw(theirs, fmt, tmp_path)
    if fmt == "vdi":
        # the same file but for the two UUIDs qemu draws at random
        mine, qemus = bytearray(ours.read_bytes()), bytearray(theirs.read_bytes())
        mine[392:424] = qemus[392:424] = bytes(32)
        assert mine == qemus
    if out:
        reader_accepts(fmt, ours)
    else:  # libvhdi refuses a BAT of 0 entries: qemu's empty VHD/VHDX as well as ours
        assert reader_verdict(fmt, ours) == reader_verdict(fmt, theirs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out", WINDOWS)
def test_matches_qemu_img_dd(fmt: str, out: int, tmp_path: Path) -> None:
    compare_with_qemu(fmt, out, tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_qemu_img_dd_100_mib(fmt: str, tmp_path: Path) -> None:
    compare_with_qemu(fmt, 100 * MiB + 7, tmp_path)


@pytest.mark.full_matrix
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out", [17 * MiB - 1, 130 * MiB + 513, 600 * MiB])
def test_matches_qemu_img_dd_larger(fmt: str, out: int, tmp_path: Path) -> None:
    compare_with_qemu(fmt, out, tmp_path)


# --- huge plans, written sparse -------------------------------------------------------


def map_extents(path: Path, fmt: str) -> list[dict[str, object]]:
    result: list[dict[str, object]] = json.loads(
        qemu_img("map", "-f", fmt, "--output=json", path).stdout
    )
    return result


@pytest.mark.parametrize(
    ("fmt", "out"),
    [
        ("qcow2", 5 * GiB + 3),  # 3 refcount blocks, 10 L2 tables
        ("qcow2", 64 * GiB),
        ("vmdk", 5 * GiB + 3),
        ("vmdk", 64 * GiB),
        ("vhdx", 5 * GiB),  # 16 MiB blocks, a sector bitmap entry after 256 blocks
        ("vhdx", 200 * GiB + 512),  # 32 MiB blocks
        ("vpc", 5 * GiB + 3),
        ("vpc", 200 * GiB),  # above the CHS ceiling: exact size
        ("vdi", 5 * GiB + 3),
        ("vdi", 2 * TiB),  # a 8 MiB block map
    ],
)
def test_huge_plan_sparse(fmt: str, out: int, tmp_path: Path) -> None:
    plan = encoders.plan(fmt, out)
    ours = tmp_path / f"ours.{fmt}"
    write_image(plan, b"", ours, data=False)
    theirs = tmp_path / f"qemu.{fmt}"
    qemu_img("create", "-q", "-f", fmt, theirs, str(-(-out // 512) * 512))
    assert info(ours, fmt)["virtual-size"] == info(theirs, fmt)["virtual-size"]
    assert info(ours, fmt)["virtual-size"] == plan.virtual_size
    if fmt in CHECKABLE:
        check_clean(ours, fmt)
    # Every byte of the data stream is allocated and maps where the plan says.
    expected = plan.data_extents(0, plan.data_size)
    pieces = [e for e in map_extents(ours, fmt) if e["data"]]
    assert sum(int(str(e["length"])) for e in pieces) == plan.data_size
    # qemu's vpc map splits at every block; its vhdx driver reports no file offsets.
    if fmt in ("qcow2", "vmdk"):
        assert len(expected) == 1
        for piece in pieces:
            start = int(str(piece["start"]))
            assert piece["offset"] == expected[0].file_offset + start
    reader_accepts(fmt, ours)


# --- the size rules against qemu-img create -------------------------------------------


def _vpc_sectors() -> list[int]:
    branches = [17 * 4 * 1024, 17 * 16 * 1024, 31 * 16 * 1024, 65535 * 16 * 63, vpc.MAX_GEOMETRY]
    rng = random.Random(7)
    points = {b + d for b in branches for d in (-1, 0, 1)} | {1, 67, 68, 69, 2047}
    points |= {rng.randrange(1, vpc.MAX_GEOMETRY) for _ in range(8)}
    return sorted(points)


@pytest.mark.parametrize("sectors", _vpc_sectors())
def test_vpc_geometry_matches_qemu(sectors: int, tmp_path: Path) -> None:
    # qemu-img dd creates its output with the window's length, as qemu-img create does.
    theirs = tmp_path / "g.vpc"
    qemu_img("create", "-q", "-f", "vpc", theirs, str(sectors * 512))
    footer = theirs.read_bytes()[:512]
    size = vpc.size_for(sectors)
    assert info(theirs, "vpc")["virtual-size"] == size.sectors * 512
    chs = (int.from_bytes(footer[56:58], "big"), footer[58], footer[59])
    assert chs == (size.cylinders, size.heads, size.spt)
    assert int.from_bytes(footer[48:56], "big") == size.sectors * 512  # current size


def test_vpc_limit_matches_qemu(tmp_path: Path) -> None:
    refused = qemu_img("create", "-q", "-f", "vpc", tmp_path / "x.vpc", "2041G", check=False)
    assert refused.returncode == 1
    with pytest.raises(UsageError):
        vpc.plan(2041 * GiB)


def test_vdi_limit_matches_qemu(tmp_path: Path) -> None:
    """qemu creates no VDI of more than 0x1fffff80 blocks of 1 MiB (one at the limit
    would write a 2 GiB block map: tests/test_encode_plans.py plans it instead)."""
    top = vdi.MAX_DISK_SIZE
    refused = qemu_img("create", "-q", "-f", "vdi", tmp_path / "x.vdi", str(top + 512), check=False)
    assert refused.returncode == 1
    with pytest.raises(UsageError):
        vdi.plan(top + 1)


@pytest.mark.parametrize(
    "size", [GiB, GiB + 512, 100 * GiB, 100 * GiB + 512, 32 * TiB, 32 * TiB + 512]
)
def test_vhdx_block_size_matches_qemu(size: int, tmp_path: Path) -> None:
    theirs = tmp_path / "b.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", theirs, str(size))
    assert info(theirs, "vhdx")["cluster-size"] == vhdx.block_size_for(size)


def test_vmdk_file_name_in_descriptor(tmp_path: Path) -> None:
    plan = vmdk.plan(3000, filename="disk.vmdk")
    ours = tmp_path / "disk.vmdk"
    write_image(plan, window_bytes(3000), ours)
    check_clean(ours, "vmdk")
    assert b'RW 6 SPARSE "disk.vmdk"' in ours.read_bytes()[512:1536]
