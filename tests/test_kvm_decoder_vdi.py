"""The KVM guest's C vdi decoder against its Python twin (docs/kvm.md, "Testing the
decoders").

Every image is read by both decoders (tests/fuzz/hosted.c serves the files from
memory): the same bytes, or the same error -- class and text -- for the open and for
each read.  The images: the hand-built ones of tests/test_decode_vdi.py (every header
check, VirtualBox-style layouts, blocks out of order, discarded blocks), qemu-made
dynamic and static ones, a qcow2 over a VDI, the corrupt-vdi and truncation cases of
tests/hostile.py, and random mutations of all of them (hypothesis).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiodd.formats.vdi import layout as L
from tests import hostile
from tests.conftest import QEMU_IMG, QEMU_IO, needs_qemu, qemu_img, qemu_io
from tests.differential import (
    Differential,
    compare_each,
    cut_short,
    damaged,
    edit_lists,
    edited,
    mutated,
    searching,
)
from tests.fuzz.hosted import Hosted
from tests.test_decode_vdi import VIRTUALBOX, image, pattern

MiB = 1 << 20
NAME = "t.vdi"


compare = Differential("vdi", NAME)


# -- hand-built images --------------------------------------------------------------------


def _named() -> list[tuple[str, bytes]]:
    three = {0: pattern(MiB, 1), 2: pattern(MiB, 2)}
    odd = 3 * MiB + 100
    cases: list[tuple[str, bytes]] = [
        ("empty file", b""),
        ("short header", image(MiB, {})[:300]),
        ("empty disk", image(0, {})),
        ("empty disk, no map", image(0, {}, fields={"offset_bmap": 0, "offset_data": 0})),
        ("one block", image(MiB, {0: pattern(MiB, 7)})),
        ("none allocated", image(5 * MiB, {})),
        ("out of order", image(4 * MiB, three, order=[2, 0], discarded=(1,))),
        ("odd size", image(odd, {3: pattern(100, 5)})),
        ("odd size, short file", image(odd, {3: pattern(100, 5)})[: -MiB + 512]),
        ("odd size, too short", image(odd, {3: pattern(100, 5)})[: -MiB + 511]),
        ("extra entries", image(MiB, {0: b"\x07"}, entries=3)),
        ("static", image(3 * MiB, three | {1: b"\x09"}, image_type=L.TYPE_STATIC)),
        ("all discarded", image(2 * MiB, {}, discarded=(0, 1))),
        ("entry beyond blocks", image(2 * MiB, {0: b"\x01", 1: b"\x02"}, order=[1, 0])),
    ]
    cases += [(f"virtualbox {k}", make()) for k, make in VIRTUALBOX.items()]
    broken: list[dict[str, int | bytes]] = [
        {"disk_size": L.MAX_DISK_SIZE + 1, "signature": 0},
        {"disk_size": L.MAX_DISK_SIZE, "blocks_in_image": L.MAX_BLOCKS},
        {"disk_size": 2**64 - 1},
        {"signature": 0x12345678},
        {"version": 0x00010000},
        {"version": 0xFFFFFFFF},
        {"offset_bmap": 0x201},
        {"offset_bmap": 0xFFFFFE00, "offset_data": 0xFFFFFE00},
        {"offset_data": 0x401},
        {"offset_data": 0xFFFFFE00},
        {"sector_size": 4096},
        {"block_size": 2 * MiB},
        {"block_size": 0},
        {"blocks_in_image": 2},
        {"blocks_in_image": 0},
        {"uuid_link": b"x" * 16},
        {"uuid_parent": b"y" * 16},
        {"blocks_in_image": L.MAX_BLOCKS + 1},
        {"blocks_in_image": 0xFFFFFFFF},
        {"offset_bmap": 0},
        {"offset_data": 0x200},
        {"offset_bmap": 4 << 20, "offset_data": 5 << 20},
        {"disk_size": 1},
        {"disk_size": 3 * MiB + 1},
    ]
    for fields in broken:
        label = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        cases.append((label, image(odd, three, fields=fields)))
    data = bytearray(image(4 * MiB, three))
    struct.pack_into("<I", data, 512 + 4, 0xFFFF_FF00)
    cases.append(("entry past end", bytes(data)))
    struct.pack_into("<I", data, 512 + 4, 0xFFFF_FFFD)
    cases.append(("largest entry", bytes(data)))
    return cases


NAMED = _named()


@pytest.mark.parametrize("data", [c[1] for c in NAMED], ids=[c[0] for c in NAMED])
def test_named_cases(hosted: Hosted, data: bytes) -> None:
    compare(hosted, data)


def test_the_cases_reach_what_they_are_named_for(hosted: Hosted) -> None:
    """A few cases, checked for what they show, so that the comparisons above are not
    between two decoders that both refuse everything."""
    by_name = dict(NAMED)
    got = compare(hosted, by_name["out of order"])
    assert got.error is None and got.reads[0] == pattern(MiB, 1)
    assert got.reads[1] == bytes(MiB) and got.reads[2] == pattern(MiB, 2)
    assert compare(hosted, by_name["odd size, short file"]).error is None
    got = compare(hosted, by_name["odd size, too short"])
    assert got.error == (
        "ImageError",
        "t.vdi: vdi block map entry 3 (block at 0x400) lies past the end of the file",
    )
    got = compare(hosted, by_name["version=65536"])
    assert got.error == (
        "UnsupportedImageError",
        "t.vdi: vdi version 1.0 is not supported (qemu reads 1.1)",
    )
    got = compare(hosted, by_name["signature=305419896"])
    assert got.error == ("ImageError", "t.vdi: not in vdi format: bad signature 0x12345678")
    assert compare(hosted, by_name["offset_bmap=0"]).error == (
        "ImageError",
        "t.vdi: vdi block map at 0x0 overlaps the header",
    )
    assert compare(hosted, by_name["virtualbox dynamic"]).error is None


def test_a_qcow2_over_a_vdi(hosted: Hosted) -> None:
    """A VDI as a qcow2's backing file: the qcow2 decoder opens it as a vdi layer."""
    from tests.test_decode_qcow2 import image as qcow2_image

    base = image(3 * MiB, {0: pattern(MiB, 8), 2: b"\x05" * 9})
    top = qcow2_image(
        {1: (4 * 65536) | (1 << 63)}, [b"\x41" * 65536], backing=b"b.vdi", size=4 * MiB
    )
    got = compare(hosted, top, {"b.vdi": base}, fmt="qcow2", name="t.qcow2")
    assert got.error is None and got.reads[0][:65536] == pattern(MiB, 8)[:65536]


# -- qemu-made images ---------------------------------------------------------------------

WRITES = ["write -P 0xab 0 3M", "write -P 0xcd 5000k 100k", "write -z 4M 512k", "write -P 7 8M 1k"]


@needs_qemu
@pytest.mark.parametrize("opts", ["", "static=on"])
def test_qemu_images(hosted: Hosted, tmp_path: Path, opts: str) -> None:
    path = hostile.vdi_image(tmp_path / "d.vdi", "9M", tuple(WRITES), opts)
    got = compare(hosted, path.read_bytes())
    assert got.error is None and got.reads[0][:1] == b"\xab"


@needs_qemu
def test_qemu_converted_image(hosted: Hosted, tmp_path: Path) -> None:
    """`qemu-img convert -O vdi` leaves zero blocks out: unallocated entries among
    allocated ones, the blocks packed."""
    raw = tmp_path / "r.raw"
    raw.write_bytes(pattern(MiB, 3) + bytes(2 * MiB) + pattern(MiB + 512, 4))
    out = tmp_path / "c.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", raw, out)
    assert compare(hosted, out.read_bytes()).error is None


# -- the corrupt-vdi cases of tests/hostile.py ------------------------------------------


def _hostile_vdi() -> list[tuple[str, bytes]]:
    fields = {
        k: [(*hostile.VDI[f], v) for f, v in c[1].items()] for k, c in hostile._VDI_CASES.items()
    }
    return edited("vdi", fields) + damaged("vdi", flips=20)


@needs_qemu
def test_hostile_vdi_cases(hosted: Hosted) -> None:
    compare_each(compare, hosted, _hostile_vdi())


# -- mutations ----------------------------------------------------------------------------

_BASES: list[bytes] = []


def _bases() -> list[bytes]:
    """Small images to mutate: hand-built ones always, qemu-made ones where qemu is."""
    if not _BASES:
        _BASES.append(image(3 * MiB + 100, {0: pattern(4096, 1), 3: b"\x02" * 100}, order=[3, 0]))
        _BASES.append(image(2 * MiB, {1: b"\x03" * 512}, discarded=(0,), virtualbox=True))
        if QEMU_IMG is not None and QEMU_IO is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "d.vdi"
                qemu_img("create", "-q", "-f", "vdi", path, "3M")
                qemu_io(path, ["write -P 0x55 0 64k", "write -P 0x66 2M 4k"], "vdi")
                _BASES.append(path.read_bytes())
    return _BASES


def _mutate(base: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Byte edits aimed at the header's fields and the block map as often as anywhere."""
    bmap_at = struct.unpack_from("<I", base, 340)[0]
    hot = [64, 340, 368, 376, 384, 424, bmap_at]

    def aim(where: int, pos: int) -> int:
        return hot[where % len(hot)] + pos % 24 if where < 10 else pos

    return mutated(base, edits, aim)


@searching
@given(which=st.integers(0, 2), edits=edit_lists(reach=1 << 22), cut=st.integers(0, 1 << 22))
def test_mutated_images(
    hosted: Hosted, which: int, edits: list[tuple[int, int, int]], cut: int
) -> None:
    bases = _bases()
    compare(hosted, cut_short(_mutate(bases[which % len(bases)], edits), cut))
