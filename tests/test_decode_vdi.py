"""The vdi (VirtualBox) decoder: pure parsing, parity with qemu-img 7.2 on images qemu
makes and on VirtualBox-style images built by hand, corruption."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats import registry
from aiodd.formats.plans import Identity
from aiodd.formats.vdi import decode as vdi
from aiodd.formats.vdi import layout as L
from aiodd.formats.vdi.encode import plan
from aiodd.options import Isolation
from tests import test_decode_vpc
from tests.conftest import needs_qemu, qemu_img, qemu_io, qemu_raw_bytes
from tests.fuzz.hosted import MemFile

MiB = 1 << 20
ORACLE_TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"

# --- hand-built images ---------------------------------------------------------------


def image(
    size: int,
    blocks: dict[int, bytes],
    *,
    order: list[int] | None = None,
    discarded: tuple[int, ...] = (),
    image_type: int = L.TYPE_DYNAMIC,
    align: int = 512,
    virtualbox: bool = False,
    entries: int | None = None,
    fields: dict[str, int | bytes] | None = None,
) -> bytes:
    """A VDI of ``size`` bytes (the header's disk size, any byte count): ``blocks`` maps a
    block index to its data, stored in ``order`` (index order by default); ``discarded``
    entries are 0xfffffffe.  ``virtualbox`` writes the header as VirtualBox does: its
    text, header size 0x190, a geometry, the block map and data each on a 1 MiB
    boundary.  ``fields`` overrides header fields (tests/hostile.py's VDI names)."""
    n = -(-size // MiB) if entries is None else entries
    align = MiB if virtualbox else align
    bmap_at = MiB if virtualbox else 512
    data_at = -(-(bmap_at + 4 * n) // align) * align
    bmap = [L.UNALLOCATED] * n
    for index in discarded:
        bmap[index] = L.DISCARDED
    body = bytearray()
    for slot, index in enumerate(sorted(blocks) if order is None else order):
        bmap[index] = slot
        body += blocks[index].ljust(MiB, b"\0")
    header = bytearray(
        L.build_header(
            image_type=image_type,
            offset_bmap=bmap_at,
            offset_data=data_at,
            disk_size=size,
            blocks=n,
            allocated=len(blocks),
            uuid_image=bytes(range(16)),
            uuid_last_snap=bytes(range(16, 32)),
        )
    )
    if virtualbox:
        header[:64] = ORACLE_TEXT.ljust(64, b"\0")
        struct.pack_into("<I", header, 72, 0x190)
        struct.pack_into("<IIII", header, 348, 1024, 16, 63, 512)  # legacy geometry
        struct.pack_into("<IIII", header, 456, 1024, 16, 63, 512)  # LCHS geometry
    for name, value in (fields or {}).items():
        at, fmt = FIELDS[name]
        struct.pack_into(fmt, header, at, value)
    out = bytearray(header.ljust(bmap_at, b"\0"))
    out += struct.pack(f"<{n}I", *bmap)
    out = out.ljust(data_at, b"\0") + body
    return bytes(out)


FIELDS = {
    "signature": (64, "<I"),
    "version": (68, "<I"),
    "header_size": (72, "<I"),
    "offset_bmap": (340, "<I"),
    "offset_data": (344, "<I"),
    "sector_size": (360, "<I"),
    "disk_size": (368, "<Q"),
    "block_size": (376, "<I"),
    "blocks_in_image": (384, "<I"),
    "uuid_link": (424, "16s"),
    "uuid_parent": (440, "16s"),
}


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF or seed for i in range(n))


class NoResolver:
    def open_file(self, ref: object) -> object:
        raise AssertionError("a VDI names no file")

    open_disk = open_layer = open_file


def read(data: bytes) -> bytes:
    disk = vdi.open_disk(MemFile(data, "t.vdi"), NoResolver())  # type: ignore[arg-type]
    buf = bytearray(disk.virtual_size)
    chunk = 3 * MiB + 512  # unaligned, across blocks
    for at in range(0, len(buf), chunk):
        disk.read_into(at, memoryview(buf)[at : at + chunk])
    return bytes(buf)


def refusal(data: bytes) -> tuple[type[ImageError], str]:
    with pytest.raises(ImageError) as info:
        read(data)
    return type(info.value), str(info.value)


# --- pure parsing --------------------------------------------------------------------


def test_probe_is_qemus() -> None:
    head = image(MiB, {})
    assert L.probe(head) == 100
    assert L.probe(head[:511]) == 0  # qemu wants a whole header in the buffer
    assert L.probe(bytes(64) + head[64:68] + bytes(444)) == 100  # nothing else counts
    assert registry.detect(head) == "vdi"


def test_blocks_read_through_the_map() -> None:
    """Stored out of order; never-written and discarded blocks read as zeros; the last
    block partly outside an odd-sized disk."""
    size = 4 * MiB + 1000
    data = {0: pattern(MiB, 1), 2: pattern(MiB, 2), 4: pattern(1000, 3)}
    raw = image(size, data, order=[4, 2, 0], discarded=(3,))
    got = read(raw)
    assert len(got) == 4 * MiB + 1024  # rounded up to a sector, as qemu does
    want = data[0] + bytes(MiB) + data[2] + bytes(MiB) + data[4] + bytes(24)
    assert got == want


def test_a_short_last_block_is_enough() -> None:
    """The file may end where the disk does: a block needs only its part inside it."""
    raw = image(MiB + 512, {1: b"\x33" * 512})
    cut = raw[: len(raw) - MiB + 512]
    assert read(cut)[MiB:] == b"\x33" * 512
    kind, message = refusal(cut[:-1])
    assert (kind, message) == (
        ImageError,
        "t.vdi: vdi block map entry 1 (block at 0x400) lies past the end of the file",
    )


@pytest.mark.parametrize(
    ("fields", "kind", "message"),
    [
        ({"disk_size": L.MAX_DISK_SIZE + 1, "signature": 0}, UnsupportedImageError,
         f"vdi disk size {L.MAX_DISK_SIZE + 1} is larger than {L.MAX_DISK_SIZE} bytes"),
        ({"signature": 0x12345678, "version": 0}, ImageError,
         "not in vdi format: bad signature 0x12345678"),
        ({"version": 0x00010000, "sector_size": 0}, UnsupportedImageError,
         "vdi version 1.0 is not supported (qemu reads 1.1)"),
        ({"version": 0x00020001}, UnsupportedImageError,
         "vdi version 2.1 is not supported (qemu reads 1.1)"),
        ({"offset_bmap": 0x201, "offset_data": 0x401}, UnsupportedImageError,
         "vdi block map offset 0x201 is not a multiple of 512"),
        ({"offset_data": 0x401, "sector_size": 0}, UnsupportedImageError,
         "vdi data offset 0x401 is not a multiple of 512"),
        ({"sector_size": 4096, "block_size": 0}, UnsupportedImageError,
         "vdi sector size 4096 is not 512"),
        ({"block_size": 2 * MiB, "blocks_in_image": 0}, UnsupportedImageError,
         "vdi block size 2097152 is not supported (qemu reads 1 MiB blocks)"),
        ({"blocks_in_image": 2, "uuid_link": b"x" * 16}, ImageError,
         "vdi block map of 2 entries is too small for the disk size 3146240"),
        ({"uuid_link": b"x" * 16, "uuid_parent": b"y" * 16}, UnsupportedImageError,
         "vdi differencing images are not supported (link UUID set)"),
        ({"uuid_parent": b"y" * 16}, UnsupportedImageError,
         "vdi differencing images are not supported (parent UUID set)"),
        ({"blocks_in_image": L.MAX_BLOCKS + 1, "offset_bmap": 0}, UnsupportedImageError,
         f"vdi block map of {L.MAX_BLOCKS + 1} entries is larger than {L.MAX_BLOCKS}"),
        ({"offset_bmap": 0}, ImageError, "vdi block map at 0x0 overlaps the header"),
        ({"offset_data": 0x200}, ImageError, "vdi data at 0x200 overlaps the block map"),
        ({"offset_bmap": 4 << 20, "offset_data": 5 << 20}, ImageError,
         "vdi block map at 0x400000 (4 entries) lies past the end of the file"),
    ],
)  # fmt: skip
def test_header_checks_in_qemus_order(
    fields: dict[str, int | bytes], kind: type[ImageError], message: str
) -> None:
    """Each check with a later one also broken: the first in qemu's order wins."""
    raw = image(3 * MiB + 100, {0: b"\x01"}, fields=fields)
    assert refusal(raw) == (kind, f"t.vdi: {message}")


def test_a_truncated_header() -> None:
    assert refusal(image(MiB, {})[:511]) == (ImageError, "t.vdi: vdi header is truncated")


def test_an_empty_disk_needs_no_map() -> None:
    raw = image(0, {}, fields={"offset_bmap": 0, "offset_data": 0})
    assert read(raw) == b""


def test_entries_past_the_disk_are_not_read() -> None:
    """blocks_in_image larger than the disk needs (VirtualBox after a shrink): the extra
    entries are neither read nor checked."""
    raw = image(MiB, {0: b"\x07"}, entries=1)
    grown = bytearray(raw)
    struct.pack_into("<I", grown, 384, 5)
    assert read(bytes(grown))[:1] == b"\x07"


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.integers(0, 300))
def test_parsers_raise_only_layout_errors(raw: bytes, entries: int) -> None:
    for parse in (
        lambda: L.parse_header(raw),
        lambda: L.parse_header(
            raw[:64] + struct.pack("<II", L.SIGNATURE, L.VERSION_1_1) + raw[72:]
        ),
        lambda: L.parse_bmap(raw, entries),
    ):
        with contextlib.suppress(L.LayoutError):
            parse()


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(sorted(FIELDS)), st.integers(0, 2**32 - 1), max_size=3),
    st.integers(0, 5 * MiB),
    st.integers(0, 3 * MiB),
)
def test_random_images_raise_only_image_errors(values: dict[str, int], size: int, cut: int) -> None:
    fields: dict[str, int | bytes] = {
        k: (v.to_bytes(16, "little") if k.startswith("uuid") else v) for k, v in values.items()
    }
    raw = image(size, {0: b"\x01", 2: b"\x02"} if size > 2 * MiB else {}, fields=fields)
    raw = raw[: len(raw) - cut % (len(raw) + 1)] if cut % 3 == 0 else raw
    try:
        disk = vdi.open_disk(MemFile(raw, "t.vdi"), NoResolver())  # type: ignore[arg-type]
        disk.read_into(0, memoryview(bytearray(min(disk.virtual_size, 3 * MiB))))
    except ImageError:
        pass


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=3 * MiB // 256), st.integers(0, 3 * MiB))
def test_written_images_read_back(seed: bytes, out: int) -> None:
    """What the encoder plans, the decoder reads back: the window, then zeros."""
    window = (seed * (out // max(len(seed), 1) + 1))[:out] if seed else bytes(out)
    p = plan(out, identity=Identity(seed=b"x" * 16, timestamp=0))
    file = bytearray(p.file_size)
    for offset, data in p.metadata():
        file[offset : offset + len(data)] = data
    padded = window.ljust(p.data_size, b"\0")
    pos = 0
    for extent in p.data_extents(0, p.data_size):
        file[extent.file_offset : extent.file_offset + extent.length] = padded[
            pos : pos + extent.length
        ]
        pos += extent.length
    assert read(bytes(file)) == padded


# --- parity with qemu-img --------------------------------------------------------------


def read_all(path: Path, fmt: str | None = "vdi", isolation: Isolation = "inline") -> bytes:
    return test_decode_vpc.read_all(path, fmt, isolation)


WRITES = ["write -P 0xab 0 3M", "write -P 0xcd 5000k 100k", "write -z 4M 512k", "write -P 7 8M 1k"]


@needs_qemu
@pytest.mark.parametrize("opts", ["", "static=on"])
def test_parity_with_qemu(tmp_path: Path, opts: str) -> None:
    path = tmp_path / "d.vdi"
    qemu_img("create", "-q", "-f", "vdi", *(["-o", opts] if opts else []), path, "9M")
    qemu_io(path, WRITES, "vdi")
    expected = qemu_raw_bytes(path, tmp_path, "vdi")
    assert len(expected) == 9 * MiB
    isolation: Isolation = "sandbox" if opts else "inline"
    assert read_all(path, None, isolation=isolation) == expected


VIRTUALBOX: dict[str, Callable[[], bytes]] = {
    "dynamic": lambda: image(5 * MiB + 3000, {0: pattern(MiB, 1), 3: pattern(MiB, 4),
                             5: pattern(3000, 9)}, order=[3, 0, 5], discarded=(1,),
                             virtualbox=True),
    "static": lambda: image(3 * MiB, {i: pattern(MiB, i + 1) for i in range(3)},
                            image_type=L.TYPE_STATIC, virtualbox=True),
    "old 512-aligned": lambda: image(2 * MiB, {1: pattern(MiB, 6)}, fields={"header_size": 0x190}),
}  # fmt: skip


@needs_qemu
@pytest.mark.parametrize("kind", sorted(VIRTUALBOX))
def test_virtualbox_images_read_as_qemu_reads_them(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "vbox.vdi"
    path.write_bytes(VIRTUALBOX[kind]())
    info = qemu_img("info", "--output=json", path).stdout
    assert b'"format": "vdi"' in info
    expected = qemu_raw_bytes(path, tmp_path)
    assert read_all(path, None) == expected
    assert qemu_img("check", path, check=False).returncode == 0


@needs_qemu
@pytest.mark.parametrize(
    "fields",
    [{"version": 0x00010000}, {"sector_size": 4096}, {"block_size": 2 * MiB},
     {"uuid_parent": b"p" * 16}, {"offset_bmap": 0x201}, {"disk_size": L.MAX_DISK_SIZE + 512}],
    ids=["version", "sector size", "block size", "parent", "unaligned map", "too large"],
)  # fmt: skip
def test_refused_where_qemu_refuses(tmp_path: Path, fields: dict[str, int | bytes]) -> None:
    path = tmp_path / "bad.vdi"
    path.write_bytes(image(MiB, {0: b"\x01"}, fields=fields))
    proc = qemu_img("info", path, check=False)
    assert proc.returncode != 0 and b"VDI" in proc.stderr
    with pytest.raises(UnsupportedImageError):
        read_all(path, None)
