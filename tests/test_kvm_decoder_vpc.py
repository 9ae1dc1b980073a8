"""The KVM guest's C vpc decoder against its Python twin (docs/kvm.md, "Testing the
decoders").

Every image is read by both decoders (tests/fuzz/hosted.c serves the files from
memory): the same bytes, or the same error -- class and text -- for the open and for
each read.  The images: hand-built VHDs of every block size (fixed, dynamic,
differencing with sector bitmaps and every kind of parent locator, good and bad), the
qemu-made ones of tests/test_decode_vpc.py, chains (a VHD over a VHD over raw, a qcow2
parent, a qcow2 over a VHD), the corrupt-vpc and truncation cases of tests/hostile.py,
and random mutations of all of them (hypothesis).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiodd.formats.common import round_up
from aiodd.formats.vpc import layout as L
from tests import hostile
from tests.conftest import QEMU_IMG, QEMU_IO, needs_qemu, qemu_img, qemu_io
from tests.differential import (
    Differential,
    compare_each,
    cut_short,
    damaged,
    edit_lists,
    mutated,
    searching,
)
from tests.fuzz.hosted import Hosted
from tests.test_decode_vpc import reseal

MiB = 1 << 20
NAME = "t.vhd"
UNALLOCATED = L.UNALLOCATED


compare = Differential("vpc", NAME)


# -- hand-built images --------------------------------------------------------------------


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF or seed for i in range(n))


def dynamic(
    size: int,
    block_size: int,
    blocks: dict[int, tuple[bytes | None, bytes]],
    *,
    disk_type: int = L.TYPE_DYNAMIC,
    locators: Sequence[tuple[bytes, bytes]] = (),
    creator: bytes = b"win ",
    entries: int | None = None,
) -> bytes:
    """A dynamic (or differencing) VHD of ``size`` bytes: ``blocks`` maps a BAT index to
    (its sector bitmap, None for all set; its data), locators (platform, data) after."""
    entries = -(-size // block_size) if entries is None else entries
    table_offset = 512 + 1024
    bat = [UNALLOCATED] * entries
    bitmap_size = round_up(block_size // (8 * 512), 512)
    out = bytearray(bytes(table_offset) + bytes(round_up(4 * entries, 512)))
    for index, (bitmap, data) in sorted(blocks.items()):
        bat[index] = len(out) // 512
        bits = bitmap if bitmap is not None else b"\xff" * bitmap_size
        out += bits.ljust(bitmap_size, b"\0")[:bitmap_size] + data.ljust(block_size, b"\0")
    header = bytearray(L.build_dynamic_header(table_offset=table_offset, entries=entries,
                                              block_size=block_size))  # fmt: skip
    for i, (platform, payload) in enumerate(locators):
        at = len(out)
        out += payload + bytes(-len(payload) % 512)
        struct.pack_into(">4sIIIQ", header, 576 + 24 * i, platform, 1, len(payload), 0, at)
    header = hostile.vpc_reseal_header(header)
    footer = L.build_footer(
        data_offset=512,
        timestamp=0,
        creator=(creator, 0x10000, b"Wi2k"),
        size=size,
        geometry=(65535, 16, 255),
        disk_type=disk_type,
        uuid=bytes(16),
    )
    out[0:512] = footer
    out[512:1536] = header
    struct.pack_into(f">{entries}I", out, table_offset, *bat)
    return bytes(out + footer)


def fixed(data: bytes, size: int | None = None) -> bytes:
    footer = L.build_footer(
        data_offset=0xFFFFFFFFFFFFFFFF,
        timestamp=0,
        creator=(b"win ", 0x10000, b"Wi2k"),
        size=len(data) if size is None else size,
        geometry=(65535, 16, 255),
        disk_type=L.TYPE_FIXED,
        uuid=bytes(16),
    )
    return data + footer


def u16(text: str) -> bytes:
    return text.encode("utf-16-le")


def child(locators: Sequence[tuple[bytes, bytes]], block_size: int = 4096) -> bytes:
    """A differencing disk of 6 blocks: block 0 with a patchy bitmap, block 1 all set,
    block 3 all clear, the rest from the parent."""
    bits0 = bytes([0b10110000, 0b00000001]) if block_size >= 8 * 512 else b"\x80"
    return dynamic(
        6 * block_size,
        block_size,
        {0: (bits0, pattern(block_size, 3)), 1: (None, pattern(block_size, 5)),
         3: (b"", pattern(block_size, 9))},
        disk_type=L.TYPE_DIFFERENCING,
        locators=locators,
    )  # fmt: skip


PARENT = {"base.raw": pattern(5 * 4096 + 100, 1)}
ABSOLUTE = {"/base.raw": PARENT["base.raw"]}
LONG = "d/" * 2047 + "x"  # 4095 bytes: the longest path


def _named() -> list[tuple[str, bytes, dict[str, bytes]]]:
    base = pattern(64 * 1024, 11)
    cases: list[tuple[str, bytes, dict[str, bytes]]] = [
        ("empty file", b"", {}),
        ("short cookie", b"conectix" + bytes(100), {}),
        ("no footer", b"x" * 5000, {}),
        ("tiny", b"x" * 100, {}),
        ("fixed", fixed(base), {}),
        ("fixed short", fixed(base[:1000], 4096), {}),
        ("fixed typed dynamic", fixed(base)[:-512] + _retyped(fixed(base)[-512:], 3), {}),
        ("fixed footer bad checksum", fixed(base)[:-1] + b"\x01", {}),
        ("dynamic 512", dynamic(4096, 512, {1: (None, pattern(512, 2)), 5: (None, b"\x09")}), {}),
        ("dynamic 4k", dynamic(40960, 4096, {0: (None, base[:4096]), 9: (None, base[:4096])}), {}),
        ("dynamic 2M", dynamic(5 * MiB, 2 * MiB, {1: (None, pattern(2 * MiB, 4))}), {}),
        ("dynamic empty", dynamic(0, 4096, {}), {}),
        ("dynamic extra entries", dynamic(8192, 4096, {3: (None, b"\x07")}, entries=9), {}),
        ("dynamic small BAT", dynamic(8192, 4096, {}, entries=1), {}),
        ("dynamic CHS size", dynamic(8192, 4096, {}, creator=b"vpc "), {}),
        ("differencing raw parent", child([(b"W2ru", u16(".\\base.raw"))]), PARENT),
        ("differencing 512", child([(b"W2ru", u16("base.raw"))], 512), PARENT),
        ("differencing 64k", child([(b"W2ru", u16("base.raw"))], 65536), PARENT),
        ("differencing W2ku", child([(b"W2ku", u16("C:\\x\\b"))]), {"C:/x/b": PARENT["base.raw"]}),
        ("W2ru first", child([(b"W2ku", u16("nope")), (b"W2ru", u16("base.raw"))]), PARENT),
        ("differencing MacX", child([(b"MacX", b"file://localhost/base.raw")]), ABSOLUTE),
        ("MacX relative", child([(b"MacX", b"FiLe:base.raw?q=1#f")]), PARENT),
        ("MacX escapes", child([(b"MacX", b"file:///b%61se%2Eraw")]), ABSOLUTE),
        ("MacX bad escapes", child([(b"MacX", b"file:/%ff%e2%82x%C3%A9%zz%4%")]), {}),
        ("MacX escapes and text", child([(b"MacX", "file:/%E2%82€%F0%9F%98%80".encode())]), {}),
        ("MacX authority only", child([(b"MacX", b"file://host")]), {}),
        ("MacX bracket", child([(b"MacX", b"file://[x/base.raw")]), ABSOLUTE),
        ("MacX not file", child([(b"MacX", b"http://x/base.raw")]), {}),
        ("MacX no colon", child([(b"MacX", b"base.raw")]), {}),
        ("MacX quotes", child([(b"MacX", b"it's \"\\ \t\x1b\x7f")]), {}),
        ("MacX single quote", child([(b"MacX", "it's é\u0085\u200b".encode())]), {}),
        ("MacX non-ascii scheme", child([(b"MacX", "ﬁle:/x".encode())]), {}),
        ("MacX invalid utf-8", child([(b"MacX", b"file:/\xc0\xaf")]), {}),
        ("MacX surrogate", child([(b"MacX", b"file:/\xed\xa0\x80")]), {}),
        ("MacX nul", child([(b"MacX", b"file:base.raw\0garbage")]), PARENT),
        ("MacX invalid after nul", child([(b"MacX", b"file:base.raw\0\xff")]), PARENT),
        ("W2ru odd length", child([(b"W2ru", u16("base.raw") + b"\0")]), PARENT),
        ("W2ru lone low surrogate", child([(b"W2ru", u16("base") + b"\x00\xdc")]), PARENT),
        ("W2ru lone high surrogate", child([(b"W2ru", u16("base") + b"\x00\xd8a\x00")]), PARENT),
        ("W2ru high surrogate at end", child([(b"W2ru", u16("base") + b"\x00\xd8")]), PARENT),
        ("W2ru astral", child([(b"W2ru", u16("b\U0001f600.raw"))]), {}),
        ("W2ru nul", child([(b"W2ru", u16("base.raw\0junk"))]), PARENT),
        ("W2ru empty", child([(b"W2ru", u16(".\\.\\"))]), {}),
        ("W2ru only nul", child([(b"W2ru", u16("\0x"))]), {}),
        ("W2ru dot dot", child([(b"W2ru", u16("..\\outside\\parent.vhd"))]), {}),
        ("longest path", child([(b"W2ru", u16(LONG))]), {LONG: PARENT["base.raw"]}),
        ("path too long", child([(b"W2ru", u16(LONG + "y"))]), {}),
        ("MacX path too long", child([(b"MacX", ("file:" + LONG).encode())]), {}),
        ("MacX repr long", child([(b"MacX", b"\\'" * 2047)]), {}),
        ("locator 64k", child([(b"W2ru", u16("a") * 32768)]), {}),
        ("locator over 64k", child([(b"W2ru", u16("a") * 32769)]), {}),
        ("no locator", child([]), {}),
        ("Mac alias only", child([(b"Mac ", b"alias")]), {}),
        ("zero-length locator", child([(b"W2ru", b""), (b"W2ku", u16("base.raw"))]), PARENT),
        ("parent refused", child([(b"W2ru", u16("missing.vhd"))]), {}),
        ("parent is itself", child([(b"W2ru", u16(NAME))]), {NAME: child([(b"W2ru", u16(NAME))])}),
        ("parent foreign", child([(b"W2ru", u16("p"))]), {"p": b"QFI\xfb\0\0\0\x01" + bytes(600)}),
    ]  # fmt: skip
    mid = child([(b"W2ru", u16("base.raw"))])
    cases.append(("chain of three", child([(b"W2ru", u16("mid.vhd"))]), {"mid.vhd": mid, **PARENT}))
    bad_mid = mid[:600]
    cases.append(
        ("chain with a corrupt middle", child([(b"W2ru", u16("mid.vhd"))]), {"mid.vhd": bad_mid})
    )
    cases.append(
        ("fixed parent probes raw", child([(b"W2ru", u16("f.vhd"))]), {"f.vhd": fixed(base)})
    )
    # An unterminated extent of the parent locator data past the end of the file.
    data = bytearray(child([(b"W2ru", u16("base.raw"))]))
    header = bytearray(data[512:1536])
    struct.pack_into(">Q", header, 576 + 16, len(data) - 10)
    data[512:1536] = hostile.vpc_reseal_header(header)
    cases.append(("locator past end", bytes(data), PARENT))
    return cases


def _retyped(footer: bytes, disk_type: int) -> bytes:
    raw = bytearray(footer)
    struct.pack_into(">I", raw, 60, disk_type)
    return bytes(reseal(raw))


NAMED = _named()


@pytest.mark.parametrize(("data", "files"), [c[1:] for c in NAMED], ids=[c[0] for c in NAMED])
def test_named_cases(hosted: Hosted, data: bytes, files: dict[str, bytes]) -> None:
    compare(hosted, data, files)


def test_the_cases_reach_what_they_are_named_for(hosted: Hosted) -> None:
    """A few cases, checked for what they show, so that the comparisons above are not
    between two decoders that both refuse everything."""
    by_name = {name: (data, files) for name, data, files in NAMED}
    got = compare(hosted, *by_name["differencing raw parent"])
    assert got.error is None and got.reads[0][:512] == pattern(4096, 3)[:512]
    assert got.reads[0][512:1024] == PARENT["base.raw"][512:1024]
    got = compare(hosted, *by_name["MacX quotes"])
    assert got.error == (
        "ImageError",
        "t.vhd: vpc parent locator 'MacX' is not a file URL: 'it\\'s \"\\\\ \\t\\x1b\\x7f'",
    )
    got = compare(hosted, *by_name["MacX bad escapes"])
    assert got.error is not None and "'/\ufffd\ufffdx\u00e9%zz%4%' is refused" in got.error[1]
    got = compare(hosted, *by_name["path too long"])
    assert got.error is not None and "names a path of 4096 bytes (at most 4095)" in got.error[1]
    assert compare(hosted, *by_name["longest path"]).error is None


def test_a_qcow2_over_a_vhd(hosted: Hosted, tmp_path: Path) -> None:
    """A VHD as a qcow2's backing file: the qcow2 decoder opens it as a vpc layer."""
    from tests.test_decode_qcow2 import image

    base = dynamic(5 * 65536, 65536, {0: (None, pattern(65536, 8)), 4: (None, b"\x05" * 9)})
    top = image({1: (4 * 65536) | (1 << 63)}, [b"\x41" * 65536], backing=b"b.vhd", size=6 * 65536)
    got = compare(hosted, top, {"b.vhd": base}, fmt="qcow2", name="t.qcow2")
    assert got.error is None


# -- qemu-made images ---------------------------------------------------------------------


def _make(tmp: Path, name: str, size: str, *opts: str) -> Path:
    path = tmp / name
    args: list[str | Path] = ["create", "-q", "-f", "vpc"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, size)
    return path


WRITES = ["write -P 0xab 0 3M", "write -P 0xcd 5000k 100k", "write -z 4M 512k", "write -P 7 8M 1k"]


@needs_qemu
@pytest.mark.parametrize(
    "opts",
    [
        ("subformat=dynamic",),
        ("subformat=dynamic", "force_size=on"),
        ("subformat=fixed",),
        ("subformat=fixed", "force_size=on"),
    ],
)
def test_qemu_images(hosted: Hosted, tmp_path: Path, opts: tuple[str, ...]) -> None:
    image = _make(tmp_path, "d.vhd", "9M", *opts)
    qemu_io(image, WRITES, "vpc")
    got = compare(hosted, image.read_bytes())
    assert got.error is None and got.reads[0][:1] == b"\xab"


@needs_qemu
@pytest.mark.parametrize("creator", [b"vpc ", b"qem2", b"tap\0"])
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_creator_patched(
    hosted: Hosted, tmp_path: Path, creator: bytes, subformat: str
) -> None:
    image = _make(tmp_path, "c.vhd", "10000k", f"subformat={subformat}")
    qemu_io(image, ["write -P 0x31 9000k 1000k"], "vpc")
    data = bytearray(image.read_bytes())
    for at in ([0] if subformat == "dynamic" else []) + [len(data) - 512]:
        footer = bytearray(data[at : at + 512])
        footer[48:56] = struct.pack(">Q", 10000 * 1024 - 3 * 512)
        footer[28:32] = creator
        data[at : at + 512] = reseal(footer)
    assert compare(hosted, bytes(data)).error is None


def _differencing(tmp: Path) -> tuple[bytes, dict[str, bytes]]:
    base = _make(tmp, "base.vhd", "8M")
    qemu_io(base, ["write -P 0x11 0 8M"], "vpc")
    kid = _make(tmp, "child.vhd", "8M")
    qemu_io(kid, ["write -P 0x22 0 64k", "write -P 0x33 4M 2M"], "vpc")
    hostile.vpc_differencing(
        kid, [(b"W2ku", u16("C:\\vms\\base.vhd")), (b"W2ru", u16(".\\base.vhd"))]
    )
    data = bytearray(kid.read_bytes())
    header_at = struct.unpack_from(">Q", data, 16)[0]
    table = struct.unpack_from(">Q", data, header_at + 16)[0]
    entry = struct.unpack_from(">I", data, table)[0]
    bits = bytearray(512)
    bits[0], bits[2], bits[12] = 0xFF, 0xFF, 0b00001000
    data[entry * 512 : entry * 512 + 512] = bits
    return bytes(data), {"base.vhd": base.read_bytes()}


@needs_qemu
def test_qemu_differencing_over_a_vhd(hosted: Hosted, tmp_path: Path) -> None:
    data, files = _differencing(tmp_path)
    got = compare(hosted, data, files)
    assert got.error is None and got.reads[0][:512] == b"\x22" * 512
    assert got.reads[0][8 * 512 : 9 * 512] == b"\x11" * 512


@needs_qemu
def test_qemu_differencing_over_a_qcow2(hosted: Hosted, tmp_path: Path) -> None:
    data, _ = _differencing(tmp_path)
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "6M")
    qemu_io(base, ["write -P 0x44 0 1M", "write -c -P 0x45 2M 64k"], "qcow2")
    files = {"base.vhd": base.read_bytes()}
    got = compare(hosted, data, files)
    assert got.error is None and got.reads[2][:64] == b"\x45" * 64


# -- the corrupt-vpc cases of tests/hostile.py ------------------------------------------


def _hostile_vpc() -> list[tuple[str, bytes]]:
    b = hostile.base("vpc")
    cases = []
    for name, (_expect, footer, header) in hostile._VPC_CASES.items():
        data = bytearray(b.data)
        foot = bytearray(data[:512])
        if footer is not None:
            footer(foot)
            foot = hostile.vpc_reseal_footer(foot)
            data[:512] = foot
            data[-512:] = foot
        if header is not None:
            at = struct.unpack_from(">Q", foot, 16)[0]
            dyn = bytearray(data[at : at + 1024])
            header(dyn)
            data[at : at + 1024] = hostile.vpc_reseal_header(dyn)
        cases.append((name, bytes(data)))
    header_at = struct.unpack_from(">Q", b.data, 16)[0]
    table = struct.unpack_from(">Q", b.data, header_at + 16)[0]
    data = bytearray(b.data)
    struct.pack_into(">I", data, table, 0xFFFF_FF00)
    cases.append(("bat_entry_past_end", bytes(data)))
    data = bytearray(b.data)
    struct.pack_into(">I", data, 64, 0x12345678)
    cases.append(("bad_checksum", bytes(data)))
    return cases + damaged("vpc", flips=20)


@needs_qemu
def test_hostile_vpc_cases(hosted: Hosted) -> None:
    compare_each(compare, hosted, _hostile_vpc())


@needs_qemu
def test_hostile_parent_locators(hosted: Hosted, tmp_path: Path) -> None:
    """The locators of tests/hostile.py's VHD parent cases: refused by the resolver the
    same way, named the same."""
    for i, locators in enumerate(
        [
            [(b"W2ru", u16("..\\outside\\parent.vhd"))],
            [(b"W2ku", u16("/outside/parent.vhd"))],
            [(b"MacX", b"file:///outside/parent.vhd")],
            [(b"MacX", b"file:///proc/self/environ")],
            [(b"W2ru", u16(".\\child.vhd"))],
        ]
    ):
        kid = hostile.vpc_dynamic(tmp_path / f"child{i}.vhd", "1M")
        data = hostile.vpc_differencing(kid, locators).read_bytes()
        got = compare(hosted, data, {"child.vhd": data}, name="child.vhd")
        assert got.error is not None


# -- mutations ----------------------------------------------------------------------------

_BASES: list[tuple[bytes, dict[str, bytes]]] = []


def _bases() -> list[tuple[bytes, dict[str, bytes]]]:
    """Small images to mutate: hand-built ones always, qemu-made ones where qemu is."""
    if not _BASES:
        _BASES.append((child([(b"W2ru", u16("base.raw")), (b"MacX", b"file:base.raw")]), PARENT))
        _BASES.append((dynamic(8 * 512, 512, {1: (None, pattern(512, 2))}), {}))
        _BASES.append((fixed(pattern(8192, 4)), {}))
        if QEMU_IMG is not None and QEMU_IO is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                image = _make(Path(tmp), "d.vhd", "3M")
                qemu_io(image, ["write -P 0x55 0 64k", "write -P 0x66 2M 4k"], "vpc")
                _BASES.append((image.read_bytes(), {}))
    return _BASES


def _mutate(base: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Byte edits aimed at the structures (footer, dynamic header, BAT, locators, the
    first bitmap) as often as anywhere."""
    hot = [0, 512, 1536, len(base) - 512]

    def aim(where: int, pos: int) -> int:
        return hot[where % len(hot)] + pos % 1100 if where < 8 else pos

    data = bytearray(mutated(base, edits, aim))
    # reseal both checksums, half the time, so the edits reach past them
    if edits and edits[0][2] & 1 and len(data) >= 1536:
        footer = reseal(bytearray(data[:512]))
        data[:512] = footer
        data[512:1536] = hostile.vpc_reseal_header(bytearray(data[512:1536]))
    return bytes(data)


@searching
@given(which=st.integers(0, 3), edits=edit_lists(), cut=st.integers(0, 1 << 20))
def test_mutated_images(
    hosted: Hosted, which: int, edits: list[tuple[int, int, int]], cut: int
) -> None:
    bases = _bases()
    data, files = bases[which % len(bases)]
    compare(hosted, cut_short(_mutate(data, edits), cut), files)


@searching
@given(locator=st.binary(max_size=64), platform=st.sampled_from([b"W2ru", b"W2ku", b"MacX"]))
def test_mutated_locators(hosted: Hosted, locator: bytes, platform: bytes) -> None:
    """Any locator data: decoded (UTF-16, UTF-8, a file URL, escapes) to the same name or
    refused with the same message."""
    if platform == b"MacX" and locator[:1] != b"\xff":
        locator = b"file:" + locator
    compare(hosted, child([(platform, locator)]), PARENT, reads=lambda vs: [(0, 4096)])
