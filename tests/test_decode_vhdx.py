"""The vhdx decoder: pure parsing, the log, parity with qemu-img 7.2, corruption."""

from __future__ import annotations

import contextlib
import shutil
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodd.chain import open_input
from aiodd.errors import ImageError
from aiodd.formats import registry as decoders
from aiodd.formats.crc32c import crc32c
from aiodd.formats.vhdx import decode as vhdx
from aiodd.formats.vhdx import layout as L
from aiodd.options import Isolation
from tests.conftest import QEMU_IMG, needs_qemu, qemu_img, qemu_io, qemu_raw_bytes
from tests.hostile import VhdxImage as Image
from tests.hostile import vhdx_locator_item as locator_item

MiB = 1 << 20
KiB = 1 << 10


# --- helpers -------------------------------------------------------------------------


def read_all(path: Path, fmt: str | None = "vhdx", isolation: Isolation = "inline") -> bytes:
    disk = open_input(str(path), fmt, isolation=isolation)
    try:
        buf = bytearray(disk.virtual_size)
        chunk = 3 * MiB + 4096 + 512  # crosses block boundaries at odd places
        for at in range(0, len(buf), chunk):
            disk.read_into(at, memoryview(buf)[at : at + chunk])
        return bytes(buf)
    finally:
        disk.close()


def make(tmp_path: Path, name: str, size: str, *opts: str) -> Path:
    path = tmp_path / name
    args = ["create", "-f", "vhdx"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, size)
    return path


def reseal(raw: bytearray, at: int = 4) -> bytearray:
    raw[at : at + 4] = bytes(4)
    raw[at : at + 4] = struct.pack("<I", crc32c(raw))
    return raw


def log_entry(
    seq: int,
    guid: bytes,
    writes: list[tuple[int, bytes | int]],
    flushed: int,
    last: int,
) -> bytes:
    """A valid log entry: ``writes`` are (file offset, 4 KiB page or zero length)."""
    count = len(writes)
    desc_sectors = -(-(count + 2) // 128)
    descs: list[bytes] = []
    sectors: list[bytes] = []
    for offset, what in writes:
        if isinstance(what, int):
            descs.append(struct.pack("<4s4sQQQ", b"zero", bytes(4), what, offset, seq))
        else:
            assert len(what) == 4096
            descs.append(struct.pack("<4s4s8sQQ", b"desc", what[4092:], what[:8], offset, seq))
            sectors.append(
                b"data"
                + struct.pack("<I", seq >> 32)
                + what[8:4092]
                + struct.pack("<I", seq & 0xFFFFFFFF)
            )
    length = (desc_sectors + len(sectors)) * 4096
    head = struct.pack("<4sIIIQII16sQQ", b"loge", 0, length, 0, seq, count, 0, guid, flushed, last)
    body = b"".join([head, *descs]).ljust(desc_sectors * 4096, b"\0") + b"".join(sectors)
    return bytes(reseal(bytearray(body)))


def dirty_guid(image: Image) -> bytes:
    guid = uuid.UUID("12345678-1234-5678-9abc-def012345678").bytes_le
    for at in L.HEADER_OFFSETS:
        header = bytearray(image.data[at : at + 4096])
        header[48:64] = guid
        image.data[at : at + 4096] = reseal(header)
    return guid


def put_log(image: Image, position: int, entry: bytes) -> None:
    start = image.header.log_offset
    length = image.header.log_length
    for i, byte in enumerate(entry):  # circular
        image.data[start + (position + i) % length] = byte


def qemu_replayed(path: Path, tmp_path: Path) -> bytes:
    """qemu's view once it has replayed the log (``qemu-img check -r all`` on a copy)."""
    copy = tmp_path / "replayed.vhdx"
    shutil.copy(path, copy)
    qemu_img("check", "-r", "all", copy, check=False)
    return qemu_raw_bytes(copy, tmp_path, "vhdx")


# --- pure parsing --------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=70000))
def test_parsers_raise_only_layout_errors(raw: bytes) -> None:
    guid = raw[:16].ljust(16, b"\0")
    for parse in (
        lambda: L.parse_header(raw),
        lambda: L.parse_region_table(raw),
        lambda: L.parse_region_table(bytes(reseal(bytearray(b"regi" + raw[4:65536])))),
        lambda: L.parse_metadata_table(b"metadata" + raw[8:], 1 << 20),
        lambda: L.parse_parent_locator(L.PARENT_LOCATOR_TYPE_VHDX + raw[16:]),
        lambda: L.parent_path(L.parse_parent_locator(raw)),
        lambda: L.find_active_sequence(raw[: len(raw) // 4096 * 4096], guid),
    ):
        with contextlib.suppress(L.LayoutError):
            parse()


def test_header_choice() -> None:
    def header(seq: int, extra: bytes = b"") -> L.Header:
        raw = bytearray(4096)
        struct.pack_into("<4sIQ", raw, 0, b"head", 0, seq)
        struct.pack_into("<HHIQ", raw, 64, 0, 1, MiB, MiB)
        raw[100 : 100 + len(extra)] = extra
        parsed = L.parse_header(bytes(reseal(raw)))
        assert parsed is not None
        return parsed

    assert L.choose_header(header(1), header(2)).sequence == 2
    assert L.choose_header(header(3), None).sequence == 3
    assert L.choose_header(None, header(4)).sequence == 4
    assert L.choose_header(header(5), header(5)).sequence == 5
    # qemu compares the 80 header bytes, checksum included: any difference is fatal.
    with pytest.raises(L.LayoutError, match="same sequence number"):
        L.choose_header(header(5, b"x"), header(5, b"y"))
    with pytest.raises(L.LayoutError, match=r"^vhdx has no valid header"):
        L.choose_header(None, None)
    bad = bytearray(4096)
    bad[:4] = b"head"
    assert L.parse_header(bytes(bad)) is None


def test_region_table_checks() -> None:
    def table(*entries: tuple[bytes, int, int, int]) -> bytes:
        raw = bytearray(65536)
        struct.pack_into("<4sII", raw, 0, b"regi", 0, len(entries))
        for i, entry in enumerate(entries):
            struct.pack_into("<16sQII", raw, 16 + 32 * i, *entry)
        return bytes(reseal(raw))

    good = table((L.BAT_GUID, 2 * MiB, MiB, 1), (L.METADATA_GUID, 3 * MiB, MiB, 1))
    assert L.parse_region_table(good) == L.Regions(L.Region(2 * MiB, MiB), L.Region(3 * MiB, MiB))
    corrupt = bytearray(good)
    corrupt[40] ^= 1
    with pytest.raises(L.LayoutError, match=r"^vhdx region table checksum mismatch$"):
        L.parse_region_table(bytes(corrupt))
    with pytest.raises(L.LayoutError, match="overlaps another region"):
        L.parse_region_table(
            table((L.BAT_GUID, 2 * MiB, 2 * MiB, 1), (L.METADATA_GUID, 3 * MiB, MiB, 1))
        )
    with pytest.raises(L.LayoutError, match="no metadata region"):
        L.parse_region_table(table((L.BAT_GUID, 2 * MiB, MiB, 1)))
    with pytest.raises(L.LayoutError, match="required but unknown"):
        L.parse_region_table(table((bytes(16), 5 * MiB, MiB, 1)))
    with pytest.raises(L.LayoutError, match="overlaps the file header"):
        L.parse_region_table(table((L.BAT_GUID, 0, MiB, 1)))


def test_parameters_bat_entries() -> None:
    params = L.Parameters(MiB, False, False, 10 * MiB, 512, 4096)
    assert params.chunk_ratio == 4096
    assert params.bat_entries == 10
    assert L.Parameters(MiB, False, True, 10 * MiB, 512, 512).bat_entries == 4097
    assert L.Parameters(256 * MiB, False, False, 64 * 256 * MiB, 512, 512).bat_entries == 67
    assert L.Parameters(MiB, False, False, 0, 512, 512).bat_entries == 0
    assert L.Parameters(MiB, False, False, 0, 4096, 512).chunk_ratio == 32768


def test_parent_locator_parsing() -> None:
    pairs = [("parent_linkage", "{guid}"), ("relative_path", ".\\dir\\base.vhdx")]
    raw = bytearray(L.PARENT_LOCATOR_TYPE_VHDX + struct.pack("<2xH", len(pairs)))
    table_end = len(raw) + 12 * len(pairs)
    blob = b""
    for key, value in pairs:
        k = key.encode("utf-16-le")
        v = value.encode("utf-16-le")
        raw += struct.pack(
            "<IIHH", table_end + len(blob), table_end + len(blob) + len(k), len(k), len(v)
        )
        blob += k + v
    entries = L.parse_parent_locator(bytes(raw + blob))
    assert entries == dict(pairs)
    assert L.parent_path(entries) == "dir/base.vhdx"
    assert L.parent_path({"absolute_win32_path": "C:\\x.vhdx"}) == "C:/x.vhdx"
    with pytest.raises(L.LayoutError, match="no relative_path"):
        L.parent_path({"volume_path": "x"})


def test_log_search_picks_the_newest_consecutive_run() -> None:
    guid = b"g" * 16
    page = bytes(range(256)) * 16
    log = bytearray(MiB)

    def place(position: int, entry: bytes) -> None:
        log[position : position + len(entry)] = entry

    place(0, log_entry(7, guid, [(0x300000, page)], 0, 0))
    place(8192, log_entry(8, guid, [(0x301000, 12288)], 0, 0))
    place(12288, log_entry(9, b"x" * 16, [(0x302000, page)], 0, 0))  # other log: ignored
    stale = log_entry(3, guid, [(0x303000, page)], 0, 0)
    place(65536, stale)
    bad = bytearray(log_entry(20, guid, [(0x304000, page)], 0, 0))
    bad[5000] ^= 1  # checksum mismatch: ignored
    place(131072, bytes(bad))
    chain = L.find_active_sequence(bytes(log), guid)
    assert [e.sequence for e in chain] == [7, 8]
    assert chain[0].writes == [L.Write(0x300000, 4096, page)]
    assert chain[1].writes == [L.Write(0x301000, 12288, None)]
    # An entry that wraps around the end of the circular log.
    wrapped = bytearray(MiB)
    entry = log_entry(30, guid, [(0x300000, page)], 0, 0)
    for i, byte in enumerate(entry):
        wrapped[(MiB - 4096 + i) % MiB] = byte
    assert [e.sequence for e in L.find_active_sequence(bytes(wrapped), guid)] == [30]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 60), st.integers(1, 20), st.one_of(st.none(), st.integers(1, 255))
        ),
        max_size=12,
    ),
    st.integers(0, 80),
    st.integers(0, 40),
)
def test_overlay_matches_sequential_writes(
    writes: list[tuple[int, int, int | None]], offset: int, length: int
) -> None:
    model = bytearray(b"\xee" * 200)
    ops = []
    for start, size, fill in writes:
        data = None if fill is None else bytes([fill]) * size
        model[start : start + size] = bytes(size) if data is None else data
        ops.append(L.Write(start, size, data))
    overlay = L.Overlay(ops)
    buf = bytearray(b"\xee" * length)
    overlay.apply(offset, memoryview(buf))
    assert bytes(buf) == bytes(model[offset : offset + length])


def test_runs_least_significant_bit_first() -> None:
    bitmap = bytes([0b00000001, 0xFF, 0x00, 0b10000000])
    assert vhdx._runs(bitmap, 0, 31, 0) == [
        (0, 1, 1),
        (1, 8, 0),
        (8, 16, 1),
        (16, 31, 0),
        (31, 32, 1),
    ]


# --- parity with qemu-img --------------------------------------------------------------

WRITES = [
    "write -P 0xab 0 3M",
    "write -P 0xcd 9M 100k",
    "write -z 1M 512k",
    "discard 2M 1M",
    "write -P 0x5a 17M 4k",
]


@needs_qemu
@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("subformat=fixed", "block_size=1M"),
        ("block_size=1M", "log_size=2M"),
        ("block_size=2M", "block_state_zero=off"),
        ("block_size=256M",),
    ],
)
def test_parity_with_qemu(tmp_path: Path, opts: tuple[str, ...]) -> None:
    image = make(tmp_path, "d.vhdx", "20M", *opts)
    qemu_io(image, WRITES, "vhdx")
    # The default case also goes through the sandboxed guest reader.
    isolation: Isolation = "inline" if opts else "sandbox"
    assert read_all(image, isolation=isolation) == qemu_raw_bytes(image, tmp_path, "vhdx")


@needs_qemu
@pytest.mark.full_matrix
@pytest.mark.parametrize("block_size", ["1M", "4M", "8M", "16M", "32M", "64M", "128M", "256M"])
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_parity_matrix(tmp_path: Path, block_size: str, subformat: str) -> None:
    image = make(tmp_path, "d.vhdx", "300M", f"block_size={block_size}", f"subformat={subformat}")
    qemu_io(image, [*WRITES, "write -P 0x77 255M 3M"], "vhdx")
    assert read_all(image) == qemu_raw_bytes(image, tmp_path, "vhdx")


@needs_qemu
def test_probe_and_empty_disk(tmp_path: Path) -> None:
    image = make(tmp_path, "z.vhdx", "0")
    assert decoders.detect(image.read_bytes()[:2048]) == "vhdx"
    disk = open_input(str(image), None, isolation="inline")
    assert disk.format_name == "vhdx"
    assert disk.virtual_size == 0
    disk.close()


@needs_qemu
def test_4096_byte_logical_sectors(tmp_path: Path) -> None:
    # qemu cannot create them (and 7.2 refuses to open them): patch a 512 one.
    image = make(tmp_path, "d.vhdx", "12M", "block_size=1M")
    qemu_io(image, ["write -P 0x42 1M 5M", "write -P 0x43 11M 4k"], "vhdx")
    expected = qemu_raw_bytes(image, tmp_path, "vhdx")
    img = Image(image)
    struct.pack_into("<I", img.data, img.item_at(L.LOGICAL_SECTOR_GUID), 4096)
    img.save()
    assert qemu_img("info", image, check=False).returncode == 1
    disk = open_input(str(image), "vhdx", isolation="inline")
    assert isinstance(disk, vhdx.VhdxDisk)
    assert disk.logical_sector_size == 4096
    disk.close()
    assert read_all(image) == expected


# --- the log ---------------------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize("isolation", ["inline", "sandbox"])  # sandbox: reads mapped
def test_dirty_log_is_replayed_in_memory(tmp_path: Path, isolation: Isolation) -> None:
    image = make(tmp_path, "d.vhdx", "8M", "block_size=1M")
    qemu_io(image, ["write -P 0x11 0 2M"], "vhdx")
    img = Image(image)
    block0 = img.bat(0) & L.OFFSET_MASK
    guid = dirty_guid(img)
    page = bytes(range(256)) * 16
    size = len(img.data)
    # A second entry in the same run: block 1 moves to a new place past the end of
    # the file (the log extends the file), its last page written by the log.
    new_block = -(-size // MiB) * MiB
    bat_page_at = img.regions.bat.offset
    bat_page = bytearray(img.data[bat_page_at : bat_page_at + 4096])
    struct.pack_into("<Q", bat_page, 8, new_block | L.PAYLOAD_FULLY_PRESENT)
    first = log_entry(5, guid, [(block0 + 8192, page), (block0 + 65536, 8192)], size, size)
    # (The page is the block's last: qemu's replay grows the file only by its writes.)
    writes: list[tuple[int, bytes | int]] = [
        (bat_page_at, bytes(bat_page)),
        (new_block + MiB - 4096, page),
    ]
    second = log_entry(6, guid, writes, size, new_block + MiB)
    put_log(img, 0, first)
    put_log(img, len(first), second)
    img.save()
    before = image.read_bytes()
    # qemu refuses to open a dirty image read-only; aiodd replays it in memory.
    info = qemu_img("info", image, check=False)
    assert info.returncode == 1
    assert b"contains a log that needs to be replayed" in info.stderr
    assert read_all(image, isolation=isolation) == qemu_replayed(image, tmp_path)
    assert image.read_bytes() == before  # never written back


@needs_qemu
def test_invalid_log_entries_are_ignored_like_qemu(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhdx", "8M", "block_size=1M")
    qemu_io(image, ["write -P 0x11 0 2M"], "vhdx")
    expected = qemu_raw_bytes(image, tmp_path, "vhdx")
    img = Image(image)
    guid = dirty_guid(img)
    size = len(img.data)
    entry = bytearray(log_entry(5, guid, [(img.bat(0) & L.OFFSET_MASK, bytes(4096))], size, size))
    entry[4100] ^= 1
    put_log(img, 0, bytes(entry))
    img.save()
    assert qemu_img("info", image, check=False).returncode == 0  # no valid entry: clean
    assert read_all(image) == expected


@needs_qemu
def test_log_expecting_a_longer_file_is_truncation(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhdx", "8M", "block_size=1M")
    img = Image(image)
    guid = dirty_guid(img)
    size = len(img.data)
    put_log(img, 0, log_entry(5, guid, [(2 * MiB, bytes(4096))], size + MiB, size + MiB))
    img.save()
    with pytest.raises(ImageError) as info:
        open_input(str(image), "vhdx", isolation="inline")
    assert info.value.detail == (
        f"vhdx log entry 5 expects a file of {size + MiB} bytes, the file has {size}:"
        " it was truncated"
    )


# --- corruption ------------------------------------------------------------------------


def corrupt(image: Path, offset: int) -> None:
    data = bytearray(image.read_bytes())
    data[offset] ^= 0x40
    image.write_bytes(bytes(data))


@needs_qemu
def test_region_table_checksum_mismatch(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhdx", "8M")
    corrupt(image, L.REGION_TABLE_OFFSET + 40)
    assert qemu_img("info", image, check=False).returncode == 1
    with pytest.raises(ImageError) as info:
        open_input(str(image), "vhdx", isolation="inline")
    assert info.value.detail == "vhdx region table checksum mismatch"


@needs_qemu
def test_headers(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhdx", "8M")
    qemu_io(image, ["write -P 3 0 1M"], "vhdx")
    expected = qemu_raw_bytes(image, tmp_path, "vhdx")
    corrupt(image, L.HEADER_OFFSETS[0] + 30)  # one bad copy: the other one is used
    assert read_all(image) == expected
    corrupt(image, L.HEADER_OFFSETS[1] + 30)
    assert qemu_img("info", image, check=False).returncode == 1
    with pytest.raises(ImageError) as info:
        open_input(str(image), "vhdx", isolation="inline")
    assert info.value.detail == "vhdx has no valid header (both header checksums mismatch)"


@needs_qemu
def test_metadata_errors(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhdx", "8M")
    img = Image(image)
    pristine = bytes(img.data)
    struct.pack_into("<I", img.data, img.item_at(L.FILE_PARAMETERS_GUID), 3 * MiB)
    img.save()
    with pytest.raises(ImageError, match=r"vhdx block size 3145728 is not a power of two"):
        open_input(str(image), "vhdx", isolation="inline")
    # Rename the virtual size item: a required item is then missing.
    data = bytearray(pristine)
    meta = img.regions.metadata.offset
    at = bytes(data[meta : meta + 65536]).index(L.VIRTUAL_DISK_SIZE_GUID)
    data[meta + at] ^= 0xFF
    image.write_bytes(bytes(data))
    with pytest.raises(ImageError) as info:
        open_input(str(image), "vhdx", isolation="inline")
    assert info.value.detail == "vhdx metadata item 1 is required but unknown"
    data[meta + at + 24] &= ~4  # no longer required: then the item is missing
    image.write_bytes(bytes(data))
    with pytest.raises(ImageError) as info:
        open_input(str(image), "vhdx", isolation="inline")
    assert info.value.detail == "vhdx metadata has no virtual disk size item"
    data[meta + at] ^= 0xFF
    data[meta : meta + 8] = b"metadatX"
    image.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="signature is not 'metadata'"):
        open_input(str(image), "vhdx", isolation="inline")


@needs_qemu
def test_truncated_file_names_the_bat_entry(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhdx", "8M", "block_size=1M")
    qemu_io(image, ["write -P 1 0 1k", "write -P 2 6M 1k"], "vhdx")
    img = Image(image)
    last = img.bat(6) & L.OFFSET_MASK
    with open(image, "r+b") as f:
        f.truncate(last + 4096)
    assert qemu_img("info", image, check=False).returncode == 1
    with pytest.raises(ImageError) as info:
        open_input(str(image), "vhdx", isolation="inline")
    assert (
        info.value.detail == f"vhdx BAT entry 6 (block at {last:#x}) lies past the end of the file"
    )


@needs_qemu
def test_bat_entry_states(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhdx", "8M", "block_size=1M")
    qemu_io(image, ["write -P 1 0 2M"], "vhdx")
    img = Image(image)
    pristine = bytes(img.data)
    img.set_bat(1, img.bat(1) | L.PAYLOAD_PARTIALLY_PRESENT)
    img.save()
    with pytest.raises(ImageError, match=r"partially present in a disk without a parent"):
        open_input(str(image), "vhdx", isolation="inline")
    img.data = bytearray(pristine)
    img.set_bat(1, (img.bat(0) & L.OFFSET_MASK) | L.PAYLOAD_FULLY_PRESENT)
    img.set_bat(0, L.MiB | L.PAYLOAD_FULLY_PRESENT)  # the log
    img.save()
    with pytest.raises(
        ImageError, match=r"vhdx BAT entry 0 \(block at 0x100000\) overlaps the log"
    ):
        open_input(str(image), "vhdx", isolation="inline")
    img.data = bytearray(pristine)
    img.set_bat(2, 4)  # a reserved state: refused when read
    img.set_bat(3, L.PAYLOAD_UNMAPPED_V095)
    img.save()
    disk = open_input(str(image), "vhdx", isolation="inline")
    buf = bytearray(MiB)
    disk.read_into(3 * MiB, memoryview(buf))
    assert buf == bytes(MiB)
    with pytest.raises(ImageError, match="block 2 has state 4"):
        disk.read_into(2 * MiB, memoryview(buf))
    disk.close()


# --- differencing ----------------------------------------------------------------------


def make_differencing(img: Image, parent_name: str) -> None:
    """Turn a qemu dynamic vhdx (1 MiB blocks) into a differencing one naming
    ``parent_name``, with a sector bitmap block appended to the file."""
    params_at = img.item_at(L.FILE_PARAMETERS_GUID)
    bits = struct.unpack_from("<I", img.data, params_at + 4)[0]
    struct.pack_into("<I", img.data, params_at + 4, bits | 2)
    meta = img.regions.metadata.offset
    count = struct.unpack_from("<H", img.data, meta + 10)[0]
    item = locator_item([("parent_linkage", "{0}"), ("relative_path", f".\\{parent_name}")])
    item_offset = 256 * KiB
    img.data[meta + item_offset : meta + item_offset + len(item)] = item
    struct.pack_into(
        "<16sIII4x",
        img.data,
        meta + 32 + 32 * count,
        L.PARENT_LOCATOR_GUID,
        item_offset,
        len(item),
        4,
    )
    struct.pack_into("<H", img.data, meta + 10, count + 1)
    bitmap_at = -(-len(img.data) // MiB) * MiB
    img.data += bytes(bitmap_at + MiB - len(img.data))
    img.set_bat(4096, bitmap_at | L.SB_BLOCK_PRESENT)  # chunk ratio 4096 at 1 MiB blocks
    img.bitmap_at = bitmap_at  # type: ignore[attr-defined]


@needs_qemu
def test_differencing_vhdx(tmp_path: Path) -> None:
    base = make(tmp_path, "base.vhdx", "8M", "block_size=1M")
    qemu_io(base, ["write -P 0x11 0 8M"], "vhdx")
    parent = qemu_raw_bytes(base, tmp_path, "vhdx")
    child = make(tmp_path, "child.vhdx", "8M", "block_size=1M", "block_state_zero=off")
    qemu_io(child, ["write -P 0x22 0 1M", "write -P 0x33 1M 1M", "write -P 0x44 3M 1M"], "vhdx")
    own = qemu_raw_bytes(child, tmp_path, "vhdx")
    img = Image(child)
    make_differencing(img, "base.vhdx")
    # Block 1 partially present: sectors 0..7, 16..23 and 2000 of it are the child's.
    img.set_bat(1, img.bat(1) & L.OFFSET_MASK | L.PAYLOAD_PARTIALLY_PRESENT)
    chunk_sector = MiB // 512  # block 1's first sector in the chunk
    bitmap_at = img.bitmap_at  # type: ignore[attr-defined]
    img.data[bitmap_at + chunk_sector // 8] = 0xFF
    img.data[bitmap_at + chunk_sector // 8 + 2] = 0xFF
    img.data[bitmap_at + (chunk_sector + 2000) // 8] |= 1 << (2000 % 8)
    img.set_bat(2, L.PAYLOAD_ZERO)  # zeros, not the parent's
    img.save()
    expected = bytearray(parent)
    expected[0:MiB] = own[0:MiB]
    for sector in [*range(8), *range(16, 24), 2000]:
        at = MiB + sector * 512
        expected[at : at + 512] = own[at : at + 512]
    expected[2 * MiB : 3 * MiB] = bytes(MiB)
    expected[3 * MiB : 4 * MiB] = own[3 * MiB : 4 * MiB]
    assert qemu_img("info", child, check=False).returncode == 1  # qemu 7.2: not supported
    assert read_all(child) == bytes(expected)


@needs_qemu
def test_differencing_vhdx_missing_parent(tmp_path: Path) -> None:
    child = make(tmp_path, "child.vhdx", "8M", "block_size=1M")
    img = Image(child)
    make_differencing(img, "nope.vhdx")
    img.save()
    with pytest.raises(ImageError, match=r"cannot open parent 'nope\.vhdx'"):
        open_input(str(child), "vhdx", isolation="inline")


# --- mutation fuzzing -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if QEMU_IMG is None:
        pytest.skip("qemu-img not installed")
    path = tmp_path_factory.mktemp("vhdx") / "s.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", path, "4M")
    qemu_io(path, ["write -P 9 0 1536k"], "vhdx")
    return path.read_bytes()


class MemoryFile:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.name = "mem.vhdx"
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def readinto(self, offset: int, buf: memoryview) -> int:
        chunk = self._data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        pass


class NoResolver:
    def open_file(self, ref: object) -> object:
        raise ImageError("mem.vhdx", "no references here")

    def open_disk(self, ref: object) -> object:
        raise ImageError("mem.vhdx", "no references here")

    def open_layer(self, ref: object) -> object:
        raise ImageError("mem.vhdx", "no references here")


@needs_qemu
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["bat", "meta", "region"]), st.integers(0, 511), st.integers(0, 255)
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 8 * MiB),
)
def test_mutated_images_raise_only_image_errors(
    small_image: bytes, mutations: list[tuple[str, int, int]], truncate: int
) -> None:
    data = bytearray(small_image)
    for where, offset, value in mutations:
        if where == "bat":
            data[2 * MiB + offset] = value
        elif where == "meta":
            data[3 * MiB + offset % 64 + (0 if offset < 256 else 65536)] = value
        else:
            data[L.REGION_TABLE_OFFSET + 16 + offset % 64] = value
            data[L.REGION_TABLE_OFFSET : L.REGION_TABLE_OFFSET + 65536] = reseal(
                bytearray(data[L.REGION_TABLE_OFFSET : L.REGION_TABLE_OFFSET + 65536])
            )
    if truncate < len(data):
        del data[max(truncate, 4 * MiB) :]
    try:
        disk = vhdx.open_disk(MemoryFile(bytes(data)), NoResolver())  # type: ignore[arg-type]
        length = min(disk.virtual_size, 8 * MiB)
        disk.read_into(0, memoryview(bytearray(length)))
    except ImageError:
        pass


def _reference_search(log: bytes, guid: bytes) -> list[int]:
    """The search as first written, walking every chain from every entry (quadratic)."""
    size = len(log)
    valid = {}
    for position in range(0, size, 4096):
        entry = L.parse_log_entry(log, position, guid)
        if entry is not None:
            valid[position] = entry
    best: list[L.LogEntry] = []
    for entry in valid.values():
        chain = [entry]
        while True:
            following = valid.get((chain[-1].position + chain[-1].length) % size)
            if following is None or following.sequence != chain[-1].sequence + 1:
                break
            chain.append(following)
        if not best or (chain[-1].sequence, len(chain)) > (best[-1].sequence, len(best)):
            best = chain
    return [e.position for e in best]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(1, 12)), min_size=1, max_size=32))
def test_log_search_matches_the_exhaustive_search(slots: list[int | None]) -> None:
    """Entries of 4 KiB in consecutive slots (None: an empty slot), any sequence numbers."""
    guid = b"g" * 16
    log = bytearray(len(slots) * 4096)
    for i, seq in enumerate(slots):
        if seq is not None:
            entry = log_entry(seq, guid, [], 0, 0)
            log[i * 4096 : i * 4096 + len(entry)] = entry
    got = [e.position for e in L.find_active_sequence(bytes(log), guid)]
    assert got == _reference_search(bytes(log), guid)
