"""The vpc (VHD) decoder: pure parsing, parity with qemu-img 7.2, corruption."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiodd.chain import open_input
from aiodd.errors import ImageError
from aiodd.formats import registry as decoders
from aiodd.formats.vpc import decode as vpc
from aiodd.formats.vpc import layout as L
from aiodd.io import LocalFile
from aiodd.options import Isolation
from tests.conftest import needs_qemu, qemu_img, qemu_io, qemu_raw_bytes

MiB = 1 << 20


# --- helpers -------------------------------------------------------------------------


def read_all(path: Path, fmt: str | None = "vpc", isolation: Isolation = "inline") -> bytes:
    disk = open_input(str(path), fmt, isolation=isolation)
    try:
        buf = bytearray(disk.virtual_size)
        # Odd-sized chunks cross block boundaries at unaligned places.
        chunk = 3 * MiB + 512
        for at in range(0, len(buf), chunk):
            disk.read_into(at, memoryview(buf)[at : at + chunk])
        return bytes(buf)
    finally:
        disk.close()


def qemu_virtual_size(path: Path) -> int:
    out = qemu_img("info", "-f", "vpc", "--output=json", path).stdout
    size: int = json.loads(out)["virtual-size"]
    return size


def reseal(footer: bytearray) -> bytearray:
    footer[64:68] = bytes(4)
    footer[64:68] = struct.pack(">I", L.checksum(footer))
    return footer


def make(tmp_path: Path, name: str, size: str, *opts: str) -> Path:
    path = tmp_path / name
    args = ["create", "-f", "vpc"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, size)
    return path


# --- pure parsing --------------------------------------------------------------------


def footer_bytes(
    creator: bytes = b"vpc ", size: int = 10 * MiB, chs: tuple[int, int, int] = (20, 16, 63)
) -> bytearray:
    f = bytearray(512)
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBI", f, 0, b"conectix", 2, 0x10000, 512, 0, creator, 0, b"Wi2k",
        size, size, *chs, 3,
    )  # fmt: skip
    return reseal(f)


@pytest.mark.parametrize(
    ("creator", "expected"),
    [
        (b"vpc ", 20 * 16 * 63 * 512),
        (b"qemu", 20 * 16 * 63 * 512),
        (b"wa\0\0", 20 * 16 * 63 * 512),  # qemu 7.2 does not know Azure yet: CHS
        (b"tap ", 20 * 16 * 63 * 512),  # only "tap\0" is XenServer
        (b"qem2", 10 * MiB),
        (b"win ", 10 * MiB),
        (b"d2v ", 10 * MiB),
        (b"CTXS", 10 * MiB),
        (b"tap\0", 10 * MiB),
    ],
)
def test_virtual_size_rule(creator: bytes, expected: int) -> None:
    assert L.parse_footer(bytes(footer_bytes(creator))).virtual_size == expected


def test_max_geometry_uses_current_size() -> None:
    footer = L.parse_footer(bytes(footer_bytes(b"vpc ", 5 * MiB, (65535, 16, 255))))
    assert footer.virtual_size == 5 * MiB


def test_footer_checksum_and_size_limit() -> None:
    f = footer_bytes()
    f[100] ^= 1
    with pytest.raises(L.LayoutError, match=r"^vpc footer checksum is incorrect$"):
        L.parse_footer(bytes(f))
    huge = footer_bytes(b"win ", 2041 << 30)
    with pytest.raises(L.LayoutError, match="larger than 2040 GiB"):
        L.parse_footer(bytes(huge))
    assert L.parse_footer(bytes(footer_bytes(b"win ", 2040 << 30))).virtual_size == 2040 << 30


def test_dynamic_header_checks() -> None:
    raw = bytearray(1024)
    struct.pack_into(">8sQQIII", raw, 0, b"cxsparse", 2**64 - 1, 1536, 0x10000, 5, 3 * MiB)
    with pytest.raises(L.LayoutError, match="not a power of two"):
        L.parse_dynamic_header(bytes(raw), 10 * MiB)
    struct.pack_into(">I", raw, 32, 2 * MiB)
    with pytest.raises(L.LayoutError, match="too small for the virtual size"):
        L.parse_dynamic_header(bytes(raw), 11 * MiB)
    header = L.parse_dynamic_header(bytes(raw), 10 * MiB)
    assert header.bitmap_size == 512
    assert header.locators == ()
    struct.pack_into(">I", raw, 32, 512 * MiB)
    with pytest.raises(L.LayoutError, match="larger than 256 MiB"):
        L.parse_dynamic_header(bytes(raw), 10 * MiB)


def test_locators() -> None:
    loc = (L.Locator(b"W2ku", 10, 0), L.Locator(b"W2ru", 10, 0), L.Locator(b"MacX", 10, 0))
    assert L.choose_locator(loc) == loc[1]
    assert L.choose_locator(loc[::2]) == loc[0]
    assert L.choose_locator((L.Locator(b"Mac ", 10, 0),)) is None
    assert L.decode_locator(b"W2ru", ".\\dir\\base.vhd".encode("utf-16-le")) == "dir/base.vhd"
    assert L.decode_locator(b"MacX", b"file://localhost/x/b%20c.vhd") == "/x/b c.vhd"
    with pytest.raises(L.LayoutError, match="not valid text"):
        L.decode_locator(b"W2ru", b"\x00\xd8")


def test_runs_most_significant_bit_first() -> None:
    bitmap = bytes([0b10000000, 0xFF, 0x00, 0b00000001])
    assert vpc._runs(bitmap, 0, 31, 0) == [
        (0, 1, 1),
        (1, 8, 0),
        (8, 16, 1),
        (16, 31, 0),
        (31, 32, 1),
    ]
    assert vpc._runs(bitmap, 3, 9, 0) == [(3, 8, 0), (8, 10, 1)]


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:///x/b.vhd", "/x/b.vhd"),
        ("FILE://host/x?q#f", "/x"),
        ("file:b.vhd#x?y", "b.vhd"),
        ("file://host", ""),
        ("file://[x/b.vhd", "/b.vhd"),  # urlsplit raises ValueError on this one
        ("file:", ""),
        ("http://x/b.vhd", None),
        ("b.vhd", None),
        (" file:/x", None),
        ("\ufb01le:/x", None),  # a ligature is not "fi"
    ],
)
def test_file_url_path(url: str, path: str | None) -> None:
    assert L.file_url_path(url) == path


def test_parent_paths_are_bounded() -> None:
    longest = "d/" * 2047 + "x"
    assert L.decode_locator(b"W2ru", longest.encode("utf-16-le")) == longest
    with pytest.raises(L.LayoutError, match=r"^vpc parent locator 'W2ru' names a path of 4097"):
        L.decode_locator(b"W2ru", (longest + "\u00e9").encode("utf-16-le"))
    with pytest.raises(L.LayoutError, match=r"^vpc parent locator 'MacX' names a path of 4100"):
        L.decode_locator(b"MacX", f"file:{longest}".encode())
    assert L.decode_locator(b"MacX", b"file:/a%ffb%") == "/a\ufffdb%"


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=1100), st.integers(0, 2**44))
def test_parsers_raise_only_layout_errors(raw: bytes, size: int) -> None:
    for parse in (
        lambda: L.parse_footer(b"conectix" + raw),
        lambda: L.parse_dynamic_header(b"cxsparse" + raw, size),
        lambda: L.parse_bat(raw, size % 300),
        lambda: L.decode_locator(raw[:4], raw[4:]),
    ):
        with contextlib.suppress(L.LayoutError):
            parse()


class MemoryFile:
    def __init__(self, data: bytes, name: str = "mem.vhd") -> None:
        self._data = data
        self.name = name
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
        raise ImageError("mem.vhd", "no references here")

    def open_disk(self, ref: object) -> object:
        raise ImageError("mem.vhd", "no references here")

    def open_layer(self, ref: object) -> object:
        raise ImageError("mem.vhd", "no references here")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=4096), st.data())
def test_random_images_raise_only_image_errors(tail: bytes, data: st.DataObject) -> None:
    # A valid footer at the start so the fuzzing reaches the dynamic header and BAT.
    footer = footer_bytes(b"win ", data.draw(st.integers(0, 1 << 30)))
    struct.pack_into(">Q", footer, 16, data.draw(st.integers(0, 6000)))
    struct.pack_into(">I", footer, 60, data.draw(st.sampled_from([2, 3, 4, 7])))
    image = bytes(reseal(footer)) + tail
    try:
        disk = vpc.open_disk(MemoryFile(image), NoResolver())  # type: ignore[arg-type]
        length = min(disk.virtual_size, 1 << 20)
        disk.read_into(0, memoryview(bytearray(length)))
    except ImageError:
        pass


# --- parity with qemu-img --------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("subformat=dynamic", "force_size=on"),
        ("subformat=fixed",),
        ("subformat=fixed", "force_size=on"),
    ],
)
def test_parity_with_qemu(tmp_path: Path, opts: tuple[str, ...]) -> None:
    image = make(tmp_path, "d.vhd", "9M", *opts)
    qemu_io(
        image,
        ["write -P 0xab 0 3M", "write -P 0xcd 5000k 100k", "write -z 4M 512k", "write -P 7 8M 1k"],
        "vpc",
    )
    expected = qemu_raw_bytes(image, tmp_path, "vpc")
    assert len(expected) == qemu_virtual_size(image)
    # The default case also goes through the sandboxed guest reader.
    isolation: Isolation = "inline" if opts else "sandbox"
    assert read_all(image, isolation=isolation) == expected


@needs_qemu
def test_fixed_vhd_probes_as_raw(tmp_path: Path) -> None:
    image = make(tmp_path, "f.vhd", "1M", "subformat=fixed")
    head = image.read_bytes()[:2048]
    assert decoders.detect(head) == "raw"
    disk = open_input(str(image), None, isolation="inline")
    assert disk.format_name == "raw"
    assert disk.virtual_size == image.stat().st_size  # footer included, as qemu
    disk.close()
    assert (
        open_input(str(image), "vpc", isolation="inline").virtual_size
        == qemu_virtual_size(image)
        == 1079296
    )


@needs_qemu
def test_dynamic_probes_as_vpc(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhd", "1M")
    assert decoders.detect(image.read_bytes()[:2048]) == "vpc"
    assert read_all(image, None) == bytes(qemu_virtual_size(image))


@needs_qemu
@pytest.mark.parametrize(
    "creator", [b"vpc ", b"qemu", b"qem2", b"win ", b"d2v ", b"CTXS", b"tap\0"]
)
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_creator_patched_sizes_match_qemu(tmp_path: Path, creator: bytes, subformat: str) -> None:
    # force_size=on stores the exact size with the maximum geometry; give it a real
    # geometry so the creator field decides.
    image = make(tmp_path, "c.vhd", "10000k", f"subformat={subformat}")
    data = bytearray(image.read_bytes())
    for at in ([0] if subformat == "dynamic" else []) + [len(data) - 512]:
        footer = bytearray(data[at : at + 512])
        footer[48:56] = struct.pack(">Q", 10000 * 1024)  # current size below the CHS size
        footer[28:32] = creator
        data[at : at + 512] = reseal(footer)
    image.write_bytes(bytes(data))
    assert open_input(str(image), "vpc", isolation="inline").virtual_size == qemu_virtual_size(
        image
    )
    assert read_all(image) == qemu_raw_bytes(image, tmp_path, "vpc")


@needs_qemu
def test_bad_footer_checksum_is_refused_like_qemu(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhd", "1M")
    data = bytearray(image.read_bytes())
    data[40] ^= 1
    image.write_bytes(bytes(data))
    assert qemu_img("info", image, check=False).returncode == 1
    with pytest.raises(ImageError) as info:
        open_input(str(image), "vpc", isolation="inline")
    assert info.value.detail == "vpc footer checksum is incorrect"


@needs_qemu
def test_truncated_dynamic_disk_names_the_bat_entry(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhd", "8M")
    qemu_io(image, ["write -P 1 0 1k", "write -P 2 6M 1k"], "vpc")
    size = image.stat().st_size
    with open(image, "r+b") as f:
        f.truncate(size - 2 * MiB)
    with pytest.raises(ImageError) as info:
        open_input(str(image), "vpc", isolation="inline")
    assert info.value.detail.startswith("vpc BAT entry 3 (block at 0x")
    assert info.value.detail.endswith(") lies past the end of the file")


@needs_qemu
def test_bat_past_end_of_file(tmp_path: Path) -> None:
    image = make(tmp_path, "d.vhd", "8M")
    data = bytearray(image.read_bytes())
    struct.pack_into(">Q", data, 512 + 16, len(data) + 4096)  # table_offset
    image.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"vpc BAT at 0x[0-9a-f]+ \(5 entries\) lies past the end"):
        open_input(str(image), "vpc", isolation="inline")


@needs_qemu
def test_fixed_disk_shorter_than_its_size(tmp_path: Path) -> None:
    image = make(tmp_path, "f.vhd", "1M", "subformat=fixed")
    data = image.read_bytes()
    image.write_bytes(data[: 512 * 1000] + data[-512:])
    with pytest.raises(ImageError, match="is shorter than its virtual size"):
        open_input(str(image), "vpc", isolation="inline")
    image.write_bytes(b"x" * 5000)
    with pytest.raises(ImageError, match=r"^.*: not in vpc format: no 'conectix' footer$"):
        open_input(str(image), "vpc", isolation="inline")


# --- differencing ----------------------------------------------------------------------


def make_differencing(child: Path, locators: list[tuple[bytes, bytes]]) -> None:
    """Turn a qemu dynamic VHD into a differencing one whose locators hold ``locators``
    (platform, data); the locator data goes where the footer was, the footer after."""
    data = bytearray(child.read_bytes())
    footer = bytearray(data[-512:])
    del data[-512:]
    header_at = struct.unpack_from(">Q", data, 16)[0]
    for i, (platform, payload) in enumerate(locators):
        at = len(data)
        space = -(-len(payload) // 512)
        data += payload + bytes(space * 512 - len(payload))
        struct.pack_into(
            ">4sIIIQ", data, header_at + 576 + 24 * i, platform, space, len(payload), 0, at
        )
    footer[60:64] = struct.pack(">I", L.TYPE_DIFFERENCING)
    footer = reseal(footer)
    data[:512] = footer
    data += footer
    child.write_bytes(bytes(data))


def set_bitmap(child: Path, block: int, bits: bytes) -> None:
    data = bytearray(child.read_bytes())
    header_at = struct.unpack_from(">Q", data, 16)[0]
    table = struct.unpack_from(">Q", data, header_at + 16)[0]
    entry = struct.unpack_from(">I", data, table + 4 * block)[0]
    assert entry != L.UNALLOCATED
    data[entry * 512 : entry * 512 + len(bits)] = bits
    child.write_bytes(bytes(data))


@needs_qemu
def test_differencing_reads_clear_bits_from_the_parent(tmp_path: Path) -> None:
    base = make(tmp_path, "base.vhd", "8M")
    qemu_io(base, ["write -P 0x11 0 8M"], "vpc")
    child = make(tmp_path, "child.vhd", "8M")
    qemu_io(child, ["write -P 0x22 0 64k", "write -P 0x33 4M 2M"], "vpc")
    # qemu reads allocated blocks whole, ignoring the bitmap: its view of the child
    # gives the child's own sectors.
    own = qemu_raw_bytes(child, tmp_path, "vpc")
    parent = qemu_raw_bytes(base, tmp_path, "vpc")
    make_differencing(
        child,
        [
            (b"W2ku", "C:\\vms\\base.vhd".encode("utf-16-le")),
            (b"W2ru", ".\\base.vhd".encode("utf-16-le")),
        ],
    )
    # Block 0: sectors 0..7 and 16..23 of the child, sector 100 too; the rest from base.
    bits = bytearray(512)
    bits[0] = 0xFF
    bits[2] = 0xFF
    bits[12] = 0b00001000  # sector 100 (MSB first: bit 7 - 100 % 8 = 3)
    set_bitmap(child, 0, bytes(bits))
    expected = bytearray(parent)
    for sector in [*range(8), *range(16, 24), 100]:
        expected[sector * 512 : sector * 512 + 512] = own[sector * 512 : sector * 512 + 512]
    expected[4 * MiB : 6 * MiB] = own[4 * MiB : 6 * MiB]  # block 2: all bits set by qemu
    assert read_all(child) == bytes(expected)


@needs_qemu
def test_differencing_parent_by_mac_url_and_shorter_parent(tmp_path: Path) -> None:
    base = make(tmp_path, "base.vhd", "2M")
    qemu_io(base, ["write -P 0x11 0 2M"], "vpc")
    parent = qemu_raw_bytes(base, tmp_path, "vpc")
    child = make(tmp_path, "child.vhd", "6M")
    pristine = child.read_bytes()
    make_differencing(child, [(b"MacX", b"file://localhost/base.vhd")])
    # An absolute path: the stand-in policy refuses it, naming the reference.
    with pytest.raises(ImageError, match=r"parent '/base\.vhd' is refused"):
        open_input(str(child), "vpc", isolation="inline")
    child.write_bytes(pristine)
    make_differencing(child, [(b"MacX", b"file:base.vhd")])
    data = read_all(child)
    assert data == parent + bytes(len(data) - len(parent))


@needs_qemu
def test_differencing_without_locator_or_with_bad_one(tmp_path: Path) -> None:
    child = make(tmp_path, "child.vhd", "2M")
    make_differencing(child, [])
    with pytest.raises(ImageError) as info:
        open_input(str(child), "vpc", isolation="inline")
    assert info.value.detail == "vpc differencing disk has no usable parent locator"
    child2 = make(tmp_path, "child2.vhd", "2M")
    make_differencing(child2, [(b"W2ru", "missing.vhd".encode("utf-16-le"))])
    with pytest.raises(ImageError, match=r"missing\.vhd"):
        open_input(str(child2), "vpc", isolation="inline")


def test_local_file_reads_through_interface(tmp_path: Path) -> None:
    # The decoder reads only through RandomAccessFile: a LocalFile under another name
    # is reported under that name.
    path = tmp_path / "x.vhd"
    path.write_bytes(bytes(footer_bytes(b"win ", 4096)) + bytes(100))
    file = LocalFile.open(str(path), name="shown-name")
    with pytest.raises(ImageError) as info:
        vpc.open_disk(file, NoResolver())  # type: ignore[arg-type]
    assert info.value.file == "shown-name"
    file.close()


@given(st.text(st.sampled_from("%aF09gZ/é€\u00a9 ") | st.characters(codec="utf-8"), max_size=40))
def test_percent_decoding_is_urllibs(text: str) -> None:
    """The guest's own unquote (it may not import urllib) agrees with urllib's."""
    from urllib.parse import unquote

    assert L.unquote(text) == unquote(text)
