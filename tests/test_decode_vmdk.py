"""The vmdk decoder: pure parsing, parity with qemu-img, corruption."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodd.chain import open_input
from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats import registry as decoders
from aiodd.formats.base import RandomAccessFile, Reference, VirtualDisk
from aiodd.formats.vmdk import decode as vmdk
from aiodd.formats.vmdk import layout as L
from tests.conftest import needs_qemu, qemu_img, qemu_io, qemu_raw_bytes

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --------------------------------------------------------------------------- helpers


class MemFile:
    """An in-memory RandomAccessFile."""

    def __init__(self, data: bytes, name: str = "mem.vmdk") -> None:
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


class MemResolver:
    """Resolves extents from a dict of in-memory files; parents are refused."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files = files or {}

    def open_file(self, ref: Reference) -> RandomAccessFile:
        if ref.name not in self.files:
            raise ImageError(ref.referrer, f"cannot open {ref.kind} '{ref.name}'")
        return MemFile(self.files[ref.name], ref.name)

    def open_disk(self, ref: Reference) -> VirtualDisk:
        raise ImageError(ref.referrer, f"no parent '{ref.name}' here")

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, MemResolver]:
        raise ImageError(ref.referrer, f"no parent '{ref.name}' here")


def read_all(disk: VirtualDisk, offset: int = 0, length: int | None = None) -> bytes:
    if length is None:
        length = disk.virtual_size - offset
    buf = bytearray(length)
    disk.read_into(offset, memoryview(buf))
    return bytes(buf)


def open_inline(path: Path | str, fmt: str | None = None) -> VirtualDisk:
    """Decode in this process (the guest reader is tested once, in the subformat matrix)."""
    return open_input(str(path), fmt, isolation="inline")


def decode(path: Path, *, guest: bool = False) -> bytes:
    disk = open_input(str(path), None) if guest else open_inline(path)
    try:
        assert disk.format_name == "vmdk"
        return read_all(disk)
    finally:
        disk.close()


def qemu_window(image: Path, tmp_path: Path, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the image as qemu-img dd reads them."""
    start = offset // 512
    end = -(-(offset + length) // 512)
    out = tmp_path / "qemu-window.raw"
    qemu_img(
        "dd", "-f", "vmdk", "-O", "raw", f"if={image}", f"of={out}", "bs=512",
        f"skip={start}", f"count={end}",  # count ends the window, as qemu-img dd
    )  # fmt: skip
    data = out.read_bytes()
    out.unlink()
    return data[offset - start * 512 :][:length]


def sparse_header(
    *,
    version: int = 1,
    flags: int = 3,
    capacity: int = 2048,
    granularity: int = 128,
    desc_offset: int = 1,
    desc_size: int = 20,
    gtes: int = 512,
    rgd: int = 0,
    gd: int = 21,
    grain_offset: int = 128,
    compress: int = 0,
) -> bytes:
    head = L.MAGIC_KDMV + struct.pack(
        "<IIQQQQIQQQ",
        version,
        flags,
        capacity,
        granularity,
        desc_offset,
        desc_size,
        gtes,
        rgd,
        gd,
        grain_offset,
    )
    head += b"\0\n \r\n" + struct.pack("<H", compress)
    return head.ljust(512, b"\0")


def descriptor(create_type: str, extents: str, cid: str = "1234abcd", extra: str = "") -> bytes:
    return (
        "# Disk DescriptorFile\nversion=1\n"
        f'CID={cid}\nparentCID=ffffffff\n{extra}createType="{create_type}"\n\n'
        f"# Extent description\n{extents}\n"
    ).encode()


def marker(value: int, kind: int) -> bytes:
    return struct.pack("<QII", value, 0, kind).ljust(512, b"\0")


def build_stream_optimized(
    data: bytes, grain: int = 64 * KiB, gtes: int = 512, name: str = "so.vmdk"
) -> bytes:
    """A VMware-style streamOptimized file: grains, then GTs and the GD behind markers,
    and the real header in a footer (gdOffset = GD_AT_END).  qemu never writes one."""
    capacity = -(-len(data) // 512)
    gs = grain // 512
    desc = descriptor("streamOptimized", f'RW {capacity} SPARSE "{name}"').ljust(1024, b"\0")
    out = bytearray(512) + desc
    grain_offset = len(out) // 512
    ngrains = -(-capacity // gs)
    gt_entries = [0] * (-(-ngrains // gtes) * gtes)
    for g in range(ngrains):
        chunk = data[g * grain : (g + 1) * grain]
        if not chunk.strip(b"\0"):
            continue
        gt_entries[g] = len(out) // 512
        z = zlib.compress(chunk)
        rec = struct.pack("<QI", g * gs, len(z)) + z
        out += rec.ljust(-(-len(rec) // 512) * 512, b"\0")
    gd_entries = []
    for t in range(len(gt_entries) // gtes):
        entries = gt_entries[t * gtes : (t + 1) * gtes]
        if not any(entries):
            gd_entries.append(0)
            continue
        table = struct.pack(f"<{gtes}I", *entries)
        table = table.ljust(-(-len(table) // 512) * 512, b"\0")
        out += marker(len(table) // 512, L.MARKER_GT)
        gd_entries.append(len(out) // 512)
        out += table
    gd = struct.pack(f"<{len(gd_entries)}I", *gd_entries)
    gd = gd.ljust(-(-len(gd) // 512) * 512, b"\0")
    out += marker(len(gd) // 512, L.MARKER_GD)
    gd_sector = len(out) // 512
    out += gd
    common = {
        "version": 3,
        "flags": L.FLAG_NL_DETECT | L.FLAG_COMPRESS | L.FLAG_MARKER,
        "capacity": capacity,
        "granularity": gs,
        "desc_offset": 1,
        "desc_size": 2,
        "gtes": gtes,
        "grain_offset": grain_offset,
        "compress": 1,
    }
    out[:512] = sparse_header(gd=L.GD_AT_END, **common)
    out += marker(1, L.MARKER_FOOTER)
    out += sparse_header(gd=gd_sector, **common)
    out += bytes(512)  # end-of-stream marker
    return bytes(out)


def build_cowd(data: bytes, granularity: int = 8) -> bytes:
    """A COWD (ESX vmfsSparse) extent holding ``data``; zero grains stay unallocated."""
    capacity = -(-len(data) // 512)
    grain = granularity * 512
    ngrains = -(-capacity // granularity)
    ngts = -(-ngrains // L.COWD_GTES_PER_GT)
    gd_sector = 4
    gt_sector = gd_sector + -(-ngts * 4 // 512)
    first_grain = gt_sector + ngts * L.COWD_GTES_PER_GT * 4 // 512
    gd = [gt_sector + t * L.COWD_GTES_PER_GT * 4 // 512 for t in range(ngts)]
    gts = [0] * (ngts * L.COWD_GTES_PER_GT)
    body = bytearray()
    for g in range(ngrains):
        chunk = data[g * grain : (g + 1) * grain]
        if chunk.strip(b"\0"):
            gts[g] = first_grain + len(body) // 512
            body += chunk.ljust(grain, b"\0")
    head = L.MAGIC_COWD + struct.pack(
        "<10I", 1, 3, capacity, granularity, gd_sector, ngts, first_grain + len(body) // 512,
        0, 0, 0,
    )  # fmt: skip
    out = bytearray(head.ljust(gd_sector * 512, b"\0"))
    out += struct.pack(f"<{ngts}I", *gd).ljust((gt_sector - gd_sector) * 512, b"\0")
    out += struct.pack(f"<{len(gts)}I", *gts)
    out += body
    return bytes(out)


def pattern(size: int, seed: int = 1) -> bytes:
    """Deterministic data with zero stretches, some grains compressible."""
    out = bytearray()
    block = 0
    while len(out) < size:
        kind = (block * 7 + seed) % 5
        if kind == 0:
            out += bytes(64 * KiB)
        elif kind == 1:
            out += bytes([block & 0xFF]) * (64 * KiB)
        else:
            out += os.urandom(16 * KiB) * 4
        block += 1
    return bytes(out[:size])


# --------------------------------------------------------------------------- probe


def test_probe_magics_and_descriptors() -> None:
    assert L.probe(b"KDMV" + bytes(100)) == 100
    assert L.probe(b"COWD") == 100
    assert L.probe(b"KDM") == 0
    assert L.probe(b"# Disk DescriptorFile\nversion=1\nCID=1\n") == 100
    assert L.probe(b"# Disk DescriptorFile\r\nversion=3\r\n") == 100
    assert L.probe(b"#a\n   \n  \r\nversion=2\n") == 100
    # qemu takes only blank lines of spaces: an empty line, a tab or another key stops it.
    assert L.probe(b"# Disk DescriptorFile\n\nversion=1\n") == 0
    assert L.probe(b"\tversion=1\n") == 0
    assert L.probe(b"# x\nCID=1\nversion=1\n") == 0
    assert L.probe(b"version=4\n") == 0
    assert L.probe(b"version=1") == 0  # no line end
    assert L.probe(b"# only a comment") == 0
    assert decoders.detect(b"# Disk DescriptorFile\nversion=1\n") == "vmdk"


@given(st.binary(max_size=2048))
def test_probe_never_fails(head: bytes) -> None:
    assert L.probe(head) in (0, 100)


# --------------------------------------------------------------------------- descriptor


def test_parse_extents_follows_qemu_sscanf() -> None:
    text = (
        b'RW 100 FLAT "a.img" 0\n'
        b"RW 2048 ZERO\n"  # no file name: qemu skips it (and so adds no size)
        b'RDONLY 50 FLAT "b.img" 0\n'  # only RW extents are kept
        b'RW 0 SPARSE "c.vmdk"\n'  # 0 sectors: skipped
        b'RW 10 FOO "d.vmdk"\n'  # unknown kind: skipped
        b'RW 7 VMFS "e.img"\n'
        b'  RW   8   SPARSE   "f g.vmdk"  \r\n'
        b'RW\n9 SPARSE "h.vmdk"\n'  # sscanf reads across the line end
    )
    got = L.parse_extents(text, "d.vmdk")
    assert [(e.kind, e.sectors, e.file, e.offset) for e in got] == [
        ("FLAT", 100, "a.img", 0),
        ("VMFS", 7, "e.img", 0),
        ("SPARSE", 8, "f g.vmdk", 0),
        ("SPARSE", 9, "h.vmdk", 0),
    ]


@pytest.mark.parametrize(
    "line",
    [b'RW 100 FLAT "a.img"', b'RW 100 FLAT "a.img" -1', b'RW 1 VMFS "a" 5', b'RW 1 SPARSE "a" 0'],
)
def test_parse_extents_invalid_line(line: bytes) -> None:
    with pytest.raises(ImageError) as info:
        L.parse_extents(b"# x\n" + line + b"\n", "d.vmdk")
    shown = line.decode()
    assert str(info.value) == f"d.vmdk: vmdk descriptor line 2 is an invalid extent line: {shown!r}"


def test_too_many_extents() -> None:
    text = b'RW 1 FLAT "a" 0\n' * (L.MAX_EXTENTS + 1)
    with pytest.raises(ImageError, match="names more than 4096 extents"):
        L.parse_extents(text, "d.vmdk")


def test_cid_and_parent_hint_like_qemu() -> None:
    area = b'CID=fffffffe\nparentCID=1a2B\nparentFileNameHint="base.vmdk"\n'
    assert L.read_cid(area, parent=False) == 0xFFFFFFFE
    assert L.read_cid(area, parent=True) == 0x1A2B
    assert L.parent_hint(area, "x") == "base.vmdk"
    # strstr finds "CID" inside "parentCID" when that comes first, as in qemu.
    assert L.read_cid(b"parentCID=12\nCID=34\n", parent=False) == 0x12
    assert L.read_cid(b"CID=zz\n", parent=False) is None
    assert L.read_cid(b"no id here", parent=True) is None
    assert L.read_cid(b"CID=0x1f", parent=False) == 0x1F
    assert L.parent_hint(b'parentFileNameHint=""', "x") is None
    assert L.read_cid(b"CID=1\0parentCID=2", parent=True) is None  # C string ends at NUL
    with pytest.raises(ImageError, match="parentFileNameHint is not a quoted value"):
        L.parent_hint(b'parentFileNameHint="open', "x")


def test_create_type() -> None:
    assert L.create_type(b'createType="monolithicFlat"\n', "x") == "monolithicFlat"
    with pytest.raises(ImageError, match="descriptor is invalid: it has no createType"):
        L.create_type(b"version=1\n", "x")
    with pytest.raises(ImageError, match="not a quoted value"):
        L.create_type(b'createType="' + b"a" * 200 + b'"', "x")


@given(st.binary(max_size=600))
def test_descriptor_parsers_raise_only_image_errors(text: bytes) -> None:
    for parse in (
        lambda: L.parse_extents(text, "x"),
        lambda: L.create_type(text, "x"),
        lambda: L.read_cid(text, parent=False),
        lambda: L.read_cid(text, parent=True),
        lambda: L.parent_hint(text, "x"),
    ):
        with contextlib.suppress(ImageError):
            parse()


_line_parts = st.sampled_from(
    ["RW", "RDONLY", " ", "  ", "\t", "\n", "\r", '"', "FLAT", "SPARSE", "VMFS", "ZERO",
     "VMFSSPARSE", "SESPARSE", "a.img", "0", "1", "-5", "99999999999999999999999", "#"]
)  # fmt: skip


@given(st.lists(_line_parts, max_size=30))
def test_extent_lines_from_tokens(tokens: list[str]) -> None:
    try:
        extents = L.parse_extents("".join(tokens).encode(), "x")
    except ImageError:
        return
    for e in extents:
        assert e.sectors > 0 and e.kind in ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE")


# --------------------------------------------------------------------------- headers


@given(st.binary(min_size=0, max_size=600), st.integers(0, 1 << 40))
def test_header_parsers_raise_only_image_errors(block: bytes, size: int) -> None:
    for parse in (
        lambda: L.sparse_layout(L.parse_sparse_header(block), size, "x"),
        lambda: L.cowd_layout(block, size, "x"),
        lambda: L.parse_footer(block * 3, "x"),
    ):
        with contextlib.suppress(ImageError):
            parse()


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    version=st.integers(0, 5),
    flags=st.sampled_from([0, 3, 7, 0x30003, 0x30007, 0xFFFFFFFF]),
    capacity=st.integers(0, 1 << 22),
    granularity=st.sampled_from([0, 1, 8, 128, 0x200000, 0x200001]),
    gtes=st.sampled_from([0, 1, 4, 512, 513]),
    gd=st.integers(0, 40),
    grain_offset=st.integers(0, 200),
    compress=st.integers(0, 2),
    gd_fill=st.integers(0, 0xFFFFFFFF),
    gt_fill=st.integers(0, 0xFFFFFFFF),
    tail=st.binary(max_size=64),
)
def test_random_sparse_images_raise_only_image_errors(
    version: int,
    flags: int,
    capacity: int,
    granularity: int,
    gtes: int,
    gd: int,
    grain_offset: int,
    compress: int,
    gd_fill: int,
    gt_fill: int,
    tail: bytes,
) -> None:
    head = sparse_header(
        version=version, flags=flags, capacity=capacity, granularity=granularity, gtes=gtes,
        gd=gd, grain_offset=grain_offset, compress=compress,
    )  # fmt: skip
    body = bytearray(head + descriptor("monolithicSparse", "").ljust(512 * 20, b"\0"))
    body += struct.pack("<I", gd_fill) * 128 + struct.pack("<I", gt_fill) * 1024 + tail
    try:
        disk = vmdk.open_disk(MemFile(bytes(body)), MemResolver())
    except ImageError:
        return
    for offset in (0, disk.virtual_size // 2, max(0, disk.virtual_size - 70000)):
        length = min(70000, disk.virtual_size - offset)
        with contextlib.suppress(ImageError):
            read_all(disk, offset, length)


def test_inflate_grain_bounds() -> None:
    grain = 4096
    data = os.urandom(100) * 40
    assert L.inflate_grain(zlib.compress(data), grain, "x", 0) == data
    assert L.inflate_grain(zlib.compress(bytes(grain)), grain, "x", 0) == bytes(grain)
    with pytest.raises(ImageError, match=r"inflates to more than one grain \(4096 bytes\)"):
        L.inflate_grain(zlib.compress(bytes(grain + 1)), grain, "x", 0x200)
    with pytest.raises(ImageError, match="compressed grain at 0x200 is truncated"):
        L.inflate_grain(zlib.compress(data)[:50], grain, "x", 0x200)
    with pytest.raises(ImageError, match=r"compressed grain at 0x200 is corrupt \("):
        L.inflate_grain(b"\xff" * 50, grain, "x", 0x200)


@given(st.binary(max_size=300))
def test_inflate_grain_raises_only_image_errors(data: bytes) -> None:
    try:
        out = L.inflate_grain(data, 512, "x", 0)
    except ImageError:
        return
    assert len(out) <= 512


# --------------------------------------------------------------------------- in memory


def test_stream_optimized_footer_in_memory() -> None:
    data = pattern(3 * MiB + 4096)
    image = build_stream_optimized(data)
    disk = vmdk.open_disk(MemFile(image, "so.vmdk"), MemResolver())
    assert disk.virtual_size == len(data)
    assert read_all(disk) == data
    assert read_all(disk, 65536 - 3, 200001) == data[65536 - 3 : 65536 - 3 + 200001]


def test_cowd_in_a_vmfs_sparse_descriptor() -> None:
    data = pattern(1 * MiB + 8192, seed=3)
    cowd = build_cowd(data)
    desc = descriptor("vmfsSparse", 'RW 1 VMFSSPARSE "delta.vmdk"')
    disk = vmdk.open_disk(MemFile(desc, "d.vmdk"), MemResolver({"delta.vmdk": cowd}))
    assert disk.virtual_size == len(data)  # the COWD header's size, not the line's
    assert read_all(disk) == data


def test_two_threads_read_disjoint_ranges() -> None:
    data = pattern(4 * MiB)
    image = build_stream_optimized(data, grain=4096, gtes=64)
    disk = vmdk.open_disk(MemFile(image), MemResolver())
    vmdk_disk = disk
    vmdk_disk.tables._capacity = 4  # force evictions while both threads run
    results: dict[int, bytes] = {}

    def worker(k: int) -> None:
        for _ in range(3):
            results[k] = read_all(disk, k * 2 * MiB, 2 * MiB)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] + results[1] == data


# --------------------------------------------------------------------------- corruption

Patch = Callable[[bytearray], None]


def _monolithic(tmp_path: Path, subformat: str = "monolithicSparse") -> Path:
    raw = tmp_path / "src.raw"
    raw.write_bytes(pattern(1 * MiB, seed=2))
    image = tmp_path / "img.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", f"subformat={subformat}", raw, image)
    return image


def _patch(image: Path, patch: Patch) -> None:
    data = bytearray(image.read_bytes())
    patch(data)
    image.write_bytes(bytes(data))


def _gd(data: bytearray) -> int:
    gd: int = struct.unpack_from("<Q", data, 0x38)[0]
    return gd * 512


def _first_gt(data: bytearray) -> int:
    gt: int = struct.unpack_from("<I", data, _gd(data))[0]
    return gt * 512


def _set_gd0(data: bytearray, value: int) -> None:
    struct.pack_into("<I", data, _gd(data), value)


def _set_gte0(data: bytearray, value: int) -> None:
    struct.pack_into("<I", data, _first_gt(data) + 4, value)  # grain 1 (grain 0 is zeros)


def _set_header(field: int, fmt: str, value: int) -> Patch:
    return lambda data: struct.pack_into(fmt, data, field, value)


@needs_qemu
@pytest.mark.parametrize(
    ("patch", "message", "at_open", "error"),
    [
        (
            lambda d: _set_gd0(d, 0x100000),
            "img.vmdk: vmdk grain table at 0x20000000 lies past the end of the file",
            False,
            ImageError,
        ),
        (
            lambda d: _set_gte0(d, 0x7FFFFF),
            "img.vmdk: vmdk grain at 0xfffffe00 lies past the end of the file",
            False,
            ImageError,
        ),
        (
            _set_header(0x38, "<Q", 0x100000),
            "img.vmdk: vmdk grain directory at 0x20000000 lies past the end of the file",
            True,
            ImageError,
        ),
        (
            _set_header(4, "<I", 4),
            "img.vmdk: vmdk version 4 is not supported",
            True,
            UnsupportedImageError,
        ),
        (
            _set_header(0x2C, "<I", 1024),
            "img.vmdk: vmdk grain table size 1024 is too big (max 512)",
            True,
            ImageError,
        ),
        (
            _set_header(0x14, "<Q", 0),
            "img.vmdk: vmdk grain table coverage is invalid (512 entries of 0 sectors)",
            True,
            ImageError,
        ),
        (
            _set_header(0x40, "<Q", 1 << 30),
            "img.vmdk: vmdk file is truncated: the header expects at least 549755813888"
            " bytes, the file has",
            True,
            ImageError,
        ),
        (
            lambda d: d.__setitem__(slice(0x200, 0x400), bytes(512)),
            "img.vmdk: vmdk descriptor has no readable CID",
            True,
            ImageError,
        ),
    ],
    ids=["gt-past-eof", "grain-past-eof", "gd-past-eof", "version", "gtes", "granularity",
         "truncated", "no-cid"],
)  # fmt: skip
def test_corrupt_sparse(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    patch: Patch,
    message: str,
    at_open: bool,
    error: type[ImageError],
) -> None:
    image = _monolithic(tmp_path)
    _patch(image, patch)
    monkeypatch.chdir(tmp_path)
    if at_open:
        with pytest.raises(error) as info:
            open_inline("img.vmdk")
    else:
        disk = open_inline("img.vmdk")
        with pytest.raises(error) as info:
            read_all(disk)
        disk.close()
    assert type(info.value) is error
    assert str(info.value).startswith(message)


@needs_qemu
def test_corrupt_compressed_grain(tmp_path: Path) -> None:
    image = _monolithic(tmp_path, "streamOptimized")
    data = bytearray(image.read_bytes())
    gte = struct.unpack_from("<I", data, _first_gt(data) + 4)[0] * 512
    size = struct.unpack_from("<I", data, gte + 8)[0]
    # A stream that is not zlib at all: refused before anything is inflated.
    header = bytes(data[gte + 12 : gte + 14])
    data[gte + 12 : gte + 14] = b"\x5a\x5a"
    image.write_bytes(bytes(data))
    disk = open_inline(image)
    with pytest.raises(ImageError, match=rf"vmdk compressed grain at {gte:#x} is corrupt \("):
        read_all(disk)
    disk.close()
    assert qemu_img("convert", "-O", "raw", image, tmp_path / "o.raw", check=False).returncode == 1

    # Garbage in the middle of the stream: the inflater either stops at it or runs on
    # past a grain's worth of output. Which one depends on the compressed bytes, and
    # qemu-img's are not the same from one conversion to the next (the stream's length
    # here varies by tens of bytes), so either refusal is the right one.
    data[gte + 12 : gte + 14] = header
    data[gte + 12 + size // 2 : gte + 12 + size // 2 + 64] = b"\x5a" * 64
    image.write_bytes(bytes(data))
    disk = open_inline(image)
    with pytest.raises(
        ImageError,
        match=rf"vmdk compressed grain at {gte:#x} (is (corrupt|truncated)"
        rf"|inflates to more than one grain \(65536 bytes\))",
    ):
        read_all(disk)
    disk.close()
    assert qemu_img("convert", "-O", "raw", image, tmp_path / "o.raw", check=False).returncode == 1

    struct.pack_into("<I", data, gte + 8, 0)
    image.write_bytes(bytes(data))
    disk = open_inline(image)
    with pytest.raises(ImageError, match=rf"grain marker at {gte:#x} has an invalid size \(0\)"):
        read_all(disk)
    disk.close()


def test_bad_footer_and_flat_extent_too_short() -> None:
    image = bytearray(build_stream_optimized(pattern(256 * KiB)))
    image[-1024:-1020] = b"XXXX"
    with pytest.raises(ImageError) as info:
        vmdk.open_disk(MemFile(bytes(image), "so.vmdk"), MemResolver())
    assert str(info.value) == (
        "so.vmdk: vmdk footer (1024 bytes before the end of the file) is invalid"
    )
    desc = descriptor("monolithicFlat", 'RW 4 FLAT "f.img" 2')
    with pytest.raises(ImageError) as info:
        vmdk.open_disk(MemFile(desc, "d.vmdk"), MemResolver({"f.img": bytes(3000)}))
    assert str(info.value) == (
        "d.vmdk: vmdk FLAT extent 'f.img' (descriptor line 8) needs 3072 bytes, the file has 3000"
    )


def test_descriptor_refusals() -> None:
    cases = [
        (descriptor("monolithicSparse", ""), UnsupportedImageError,
         "d.vmdk: vmdk image type 'monolithicSparse' is not supported in a descriptor"),
        (descriptor("seSparse", 'RW 8 SESPARSE "s.vmdk"'), UnsupportedImageError,
         "d.vmdk: vmdk SESPARSE extents are not supported"),
        (b"# Disk DescriptorFile\nversion=1\n", ImageError,
         "d.vmdk: vmdk descriptor is invalid: it has no createType"),
    ]  # fmt: skip
    for text, error, message in cases:
        with pytest.raises(error) as info:
            vmdk.open_disk(MemFile(text, "d.vmdk"), MemResolver({"s.vmdk": bytes(4096)}))
        assert str(info.value) == message
    nested = sparse_header(capacity=0, desc_offset=1) + descriptor("monolithicFlat", "")
    desc = descriptor("twoGbMaxExtentSparse", 'RW 8 SPARSE "n.vmdk"')
    with pytest.raises(UnsupportedImageError, match="nested descriptors"):
        vmdk.open_disk(MemFile(desc, "d.vmdk"), MemResolver({"n.vmdk": nested}))


# --------------------------------------------------------------------------- qemu parity

SUBFORMATS = [
    "monolithicSparse",
    "streamOptimized",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
]


def _ranges(size: int, grain: int = 64 * KiB) -> list[tuple[int, int]]:
    return [
        (0, 1),
        (511, 2),
        (grain - 7, 19),
        (grain - 1, grain + 2),
        (3 * grain + 5, 5 * grain + 123),
        (size - 700, 700),
    ]


@needs_qemu
@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_parity_subformats(tmp_path: Path, subformat: str) -> None:
    size = 2 * MiB + 64 * KiB + 1024  # a partial last grain
    image = tmp_path / "img.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", f"subformat={subformat}", image, str(size))
    if subformat == "streamOptimized":  # compressed grains are written whole, in order
        raw = tmp_path / "src.raw"
        raw.write_bytes(pattern(size, seed=5))
        image.unlink()
        qemu_img("convert", "-O", "vmdk", "-o", f"subformat={subformat}", raw, image)
    else:
        qemu_io(
            image,
            # descending, so grains lie in the file out of virtual order
            [f"write -P 0xee {size - 1536} 1536", "write -P 0xcd 1M 300k",
             "write -P 0x11 70000 3000", "write -P 0xab 0 64k", "write -z 1100k 64k"],
            "vmdk",
        )  # fmt: skip
    expected = qemu_raw_bytes(image, tmp_path, "vmdk")
    assert len(expected) == size
    assert decode(image, guest=True) == expected
    disk = open_inline(image)
    for offset, length in _ranges(size):
        assert read_all(disk, offset, length) == expected[offset : offset + length]
    disk.close()


@needs_qemu
@pytest.mark.parametrize("options", ["compat6=on", "hwversion=6", "zeroed_grain=on"])
def test_qemu_parity_header_options(tmp_path: Path, options: str) -> None:
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "1M")
    qemu_io(base, ["write -P 0x55 0 1M"], "vmdk")
    image = tmp_path / "img.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", options, "-b", "base.vmdk", "-F", "vmdk", image)
    qemu_io(image, ["write -P 0x66 64k 64k", "write -z 192k 128k", "write -P 0x77 900k 1k"])
    expected = qemu_raw_bytes(image, tmp_path, "vmdk")
    got = decode(image)
    assert got == expected
    if options == "zeroed_grain=on":  # zeroed grains hide the parent's 0x55
        assert got[192 * KiB : 320 * KiB] == bytes(128 * KiB)
        assert struct.unpack_from("<I", image.read_bytes(), 8)[0] & L.FLAG_ZERO_GRAIN


@needs_qemu
def test_qemu_parity_backing_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "2M")
    qemu_io(base, ["write -P 0xa1 0 2M"], "vmdk")
    mid = tmp_path / "mid.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", mid)
    qemu_io(mid, ["write -P 0xb2 100k 200k"], "vmdk")
    top = tmp_path / "top.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "mid.vmdk", "-F", "vmdk", top, "3M")
    qemu_io(top, ["write -P 0xc3 1000 5000", "write -P 0xd4 2500k 100k"], "vmdk")
    expected = qemu_raw_bytes(top, tmp_path, "vmdk")
    assert len(expected) == 3 * MiB
    got = decode(top)
    assert got == expected
    assert got[2 * MiB + 10 : 2 * MiB + 20] == bytes(10)  # past the parents' end: zeros
    disk = open_inline(top)
    assert isinstance(disk, vmdk.VmdkDisk) and disk.parent_name == "mid.vmdk"
    disk.close()


@needs_qemu
def test_parent_cid_mismatch(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "1M")
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    qemu_io(child, ["write -P 1 0 64k"], "vmdk")
    data = bytearray(child.read_bytes())
    at = data.find(b"parentCID=") + len(b"parentCID=")
    # qemu writes the CID in hex without leading zeros: keep the value's width, or the
    # descriptor (and every offset after it) would shift.
    width = data.index(b"\n", at) - at
    cid = L.read_cid(base.read_bytes()[512:], parent=False)
    wrong = int("f" * width, 16)
    if wrong == cid:
        wrong = int("e" * width, 16)
    data[at : at + width] = f"{wrong:x}".encode()
    child.write_bytes(bytes(data))
    # qemu-img dd reads every block, so it meets the check (convert skips unallocated ones)
    result = qemu_img("dd", "-f", "vmdk", f"if={child}", f"of={tmp_path / 'o.raw'}", check=False)
    assert result.returncode == 1
    disk = open_inline(child)
    assert read_all(disk, 0, 64 * KiB) == b"\1" * (64 * KiB)  # allocated: no check, as qemu
    with pytest.raises(ImageError) as info:
        read_all(disk)
    disk.close()
    assert str(info.value) == (
        f"{child}: vmdk parentCID {wrong:08x} does not match the CID ({cid:08x}) of parent"
        " 'base.vmdk'"
    )


@needs_qemu
def test_qemu_parity_big_two_gb_extents(tmp_path: Path) -> None:
    """Windows across the 2 GiB extent boundaries of multi-extent images."""
    size = 4 * GiB + 512 * KiB
    for subformat in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        image = tmp_path / f"{subformat}.vmdk"
        qemu_img("create", "-f", "vmdk", "-o", f"subformat={subformat}", image, str(size))
        qemu_io(
            image,
            [f"write -P 0x3c {2 * GiB - 96 * KiB} 200k", f"write -P 0x4d {4 * GiB - 5} 300k"],
            "vmdk",
        )
        assert len(list(tmp_path.glob(f"{subformat}-*.vmdk"))) == 3
        disk = open_inline(image)
        assert disk.virtual_size == size
        for offset, length in [
            (2 * GiB - 100 * KiB - 7, 200 * KiB + 13),
            (4 * GiB - 64 * KiB + 1, 128 * KiB),
            (size - 1000, 1000),
        ]:
            assert read_all(disk, offset, length) == qemu_window(image, tmp_path, offset, length)
        disk.close()


@needs_qemu
def test_qemu_parity_hand_built(tmp_path: Path) -> None:
    """Layouts qemu reads but does not write: footer, COWD, odd descriptors."""
    data = pattern(1 * MiB + 4096, seed=7)
    so = tmp_path / "so.vmdk"
    so.write_bytes(build_stream_optimized(data))
    assert decode(so) == qemu_raw_bytes(so, tmp_path, "vmdk") == data

    (tmp_path / "delta.vmdk").write_bytes(build_cowd(data, granularity=16))
    vmfs = tmp_path / "vmfs.vmdk"
    vmfs.write_bytes(descriptor("vmfsSparse", 'RW 1 VMFSSPARSE "delta.vmdk"'))
    assert decode(vmfs) == qemu_raw_bytes(vmfs, tmp_path, "vmdk") == data

    (tmp_path / "flat.bin").write_bytes(data)
    odd = tmp_path / "odd.vmdk"
    odd.write_bytes(
        descriptor(
            "twoGbMaxExtentFlat",
            'RW 1024 FLAT "flat.bin" 0\nRW 2048 ZERO\nRDONLY 8 FLAT "flat.bin" 0\n'
            'RW 512 FLAT "flat.bin" 1030\nRW 8 VMFS "flat.bin"\n'
            'RW 100 SPARSE "delta.vmdk"\n',
        )
    )
    expected = qemu_raw_bytes(odd, tmp_path, "vmdk")
    assert len(expected) == (1024 + 512 + 8) * 512 + len(data)
    assert decode(odd) == expected

    # A sparse header of capacity 0 pointing at an embedded descriptor.
    embedded = tmp_path / "emb.vmdk"
    embedded.write_bytes(
        sparse_header(capacity=0, desc_offset=1) + descriptor("monolithicFlat",
                                                              'RW 2000 FLAT "flat.bin" 4')
    )  # fmt: skip
    assert decode(embedded) == qemu_raw_bytes(embedded, tmp_path, "vmdk")


@needs_qemu
def test_qemu_agrees_on_refusals(tmp_path: Path) -> None:
    """Images both tools refuse (exit 1 for qemu, ImageError for us)."""
    cases = {
        "nocid.vmdk": b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
        b'RW 8 FLAT "f.bin" 0\n',
        "ms.vmdk": descriptor("monolithicSparse", 'RW 8 FLAT "f.bin" 0'),
        "badline.vmdk": descriptor("monolithicFlat", 'RW 8 FLAT "f.bin"'),
        "cowd.vmdk": build_cowd(b"\1" * 4096),  # standalone COWD: no CID at 0x200
    }
    (tmp_path / "f.bin").write_bytes(bytes(4096))
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        result = qemu_img("convert", "-f", "vmdk", "-O", "raw", path, tmp_path / "o", check=False)
        assert result.returncode == 1, name
        with pytest.raises(ImageError):
            open_inline(path, "vmdk").close()


@pytest.mark.parametrize(
    "text",
    [
        b"\n" * L.DESC_READ_MAX,
        b" \n" * (L.DESC_READ_MAX // 2),
        b"\n" * (L.DESC_READ_MAX // 2) + b"RW " + b"9" * (L.DESC_READ_MAX // 2 - 10),
        b'RW 1 FLAT "' + b"\n" * (L.DESC_READ_MAX - 20) + b'a" 0\n',
    ],
    ids=["newlines", "blank-lines", "long-number", "split-line"],
)
def test_hostile_descriptors_parse_in_linear_time(text: bytes) -> None:
    import time

    start = time.perf_counter()
    with contextlib.suppress(ImageError):
        L.parse_extents(text, "x")
    assert time.perf_counter() - start < 5


@needs_qemu
def test_qemu_parity_parent_behind_later_extents(tmp_path: Path) -> None:
    """Unallocated grains of the second and third extents read the parent at the disk's
    offset, not the extent's."""
    size = 4 * GiB + 512 * KiB
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, str(size - 256 * KiB))
    qemu_io(
        base,
        [f"write -P 0x21 {2 * GiB - 64 * KiB} 192k", f"write -P 0x32 {4 * GiB - 64 * KiB} 128k"],
        "vmdk",
    )
    top = tmp_path / "top.vmdk"
    qemu_img(
        "create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "-b", "base.vmdk",
        "-F", "vmdk", top, str(size),
    )  # fmt: skip
    qemu_io(top, [f"write -P 0x43 {2 * GiB + 3 * KiB} 10k", f"write -P 0x54 {4 * GiB} 1k"], "vmdk")
    disk = open_inline(top)
    for offset, length in [
        (2 * GiB - 70 * KiB, 300 * KiB),
        (4 * GiB - 65 * KiB, 130 * KiB),
        (size - 520 * KiB, 520 * KiB),  # the parent ends 256 KiB before the disk does
    ]:
        got = read_all(disk, offset, length)
        assert got == qemu_window(top, tmp_path, offset, length)
        assert got.strip(b"\0")
    disk.close()
