"""The KVM guest's vhdx decoder against its Python twin (docs/kvm.md, "Testing the
decoders").

Every image is read by both decoders, built as in tests/test_kvm_decoder.py: the same
bytes, or the same error -- class and text -- for the open and for each read.  The
images: qemu-made ones of every variant the Python decoder reads (fixed, dynamic, each
block size, 4 KiB sectors), dirty logs replayed or refused (16 MiB ones too, their
overlays over many windows, in the guest's VM as well), differencing disks over
vhdx, qcow2 and raw parents, the hostile corpus's vhdx cases and its vhdx base with
each field set to edge values and cut short, and random mutations (hypothesis).
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodd.formats.base import VirtualDisk
from aiodd.formats.common import read_parent
from aiodd.formats.vhdx import decode
from aiodd.formats.vhdx import layout as L
from tests import hostile
from tests.conftest import QEMU_IMG, QEMU_IO, needs_kvm, needs_qemu, qemu_img, qemu_io
from tests.differential import agree, vm_outcome
from tests.fuzz.hosted import (
    FMT_VHDX,
    ChainResolver,
    Hosted,
    MemFile,
    NotInGuest,
    Outcome,
    python_outcome,
)
from tests.hostile import VhdxImage as Image
from tests.test_decode_vhdx import WRITES, dirty_guid, log_entry, make_differencing, put_log

MiB = 1 << 20
KiB = 1 << 10
NAME = "t.vhdx"
EXAMPLES = int(os.environ.get("AIODD_DIFF_EXAMPLES", "300"))


class Clipped:
    """A disk read as the guest's CMD_READ reads it: zeros past the virtual disk's end
    (the Python decoders leave that to their caller)."""

    format_name = "vhdx"

    def __init__(self, disk: VirtualDisk) -> None:
        self._disk = disk
        self.virtual_size = disk.virtual_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        read_parent(self._disk, offset, buf)

    def close(self) -> None:
        self._disk.close()


def plan(virtual_size: int, seed: int = 0) -> list[tuple[int, int]]:
    """The start in 1 MiB commands, the end, odd ranges across blocks, past the end."""
    import random

    reads = [
        (start, min(MiB, virtual_size - start))
        for start in range(0, min(virtual_size, 6 * MiB), MiB)
    ]
    if virtual_size > 6 * MiB:
        reads.append((virtual_size - MiB, MiB))
        reads.append((virtual_size // 2 - 3 * MiB - 700, 7 * MiB + 1400))
    rng = random.Random(seed)
    for _ in range(6):
        start = rng.randrange(max(virtual_size, 1))
        reads.append((start, rng.choice([1, 511, 4097, 65537, 300000, 2 * MiB + 3])))
    reads.append((max(virtual_size - 50, 0), 100))
    reads.append((virtual_size + 12345, 10))
    return reads


Reads = Callable[[int], Sequence[tuple[int, int]]]


def compare(
    hosted: Hosted, data: bytes, files: dict[str, bytes] | None = None, reads: Reads = plan
) -> Outcome:
    """Both decoders over ``data``; they must agree.  A parent the guest cannot take
    fails the test: every format a vhdx parent is made in here is in the guest."""
    files = files or {}
    expected = python_outcome(
        lambda: Clipped(decode.open_disk(MemFile(data, NAME), ChainResolver(files))), reads
    )
    try:
        got = hosted.outcome(data, ChainResolver(files), reads, name=NAME, fmt=FMT_VHDX)
    except NotInGuest as exc:
        raise AssertionError(f"a parent in a format the guest does not read: {exc}") from None
    agree(got, expected, reads)
    return got


def _make(tmp: Path, name: str, size: str, *opts: str, writes: Sequence[str] = ()) -> Path:
    path = tmp / name
    args: list[str | Path] = ["create", "-q", "-f", "vhdx"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, size)
    if writes:
        qemu_io(path, list(writes), "vhdx")
    return path


# -- images qemu made ------------------------------------------------------------------

QEMU_CASES = [
    ("dynamic", "20M", ()),
    ("fixed-1M", "20M", ("subformat=fixed", "block_size=1M")),
    ("log-2M", "20M", ("block_size=1M", "log_size=2M")),
    ("2M-no-zero", "20M", ("block_size=2M", "block_state_zero=off")),
    ("256M", "20M", ("block_size=256M",)),
    ("8M-odd-size", "30000k", ("block_size=8M",)),
    ("fixed-default", "12M", ("subformat=fixed",)),
]


@needs_qemu
@pytest.mark.parametrize(
    ("size", "opts"), [c[1:] for c in QEMU_CASES], ids=[c[0] for c in QEMU_CASES]
)
def test_qemu_images(hosted: Hosted, tmp_path: Path, size: str, opts: tuple[str, ...]) -> None:
    writes = [w for w in WRITES if not w.startswith("write -P 0x5a 17M") or size == "20M"]
    path = _make(tmp_path, "d.vhdx", size, *opts, writes=writes)
    got = compare(hosted, path.read_bytes())
    assert got.error is None and got.reads[0] == b"\xab" * MiB


@needs_qemu
def test_empty_disk(hosted: Hosted, tmp_path: Path) -> None:
    got = compare(hosted, _make(tmp_path, "z.vhdx", "0").read_bytes())
    assert got.virtual_size == 0


@needs_qemu
def test_4096_byte_logical_sectors(hosted: Hosted, tmp_path: Path) -> None:
    path = _make(
        tmp_path,
        "d.vhdx",
        "12M",
        "block_size=1M",
        writes=["write -P 0x42 1M 5M", "write -P 0x43 11M 4k"],
    )
    img = Image(path)
    struct.pack_into("<I", img.data, img.item_at(L.LOGICAL_SECTOR_GUID), 4096)
    got = compare(hosted, bytes(img.data))
    assert got.error is None and got.reads[1] == b"\x42" * MiB


@needs_qemu
def test_a_bat_too_large_to_hold(hosted: Hosted, tmp_path: Path) -> None:
    """600 GiB of 1 MiB blocks: a BAT of 4.8 MB, over the budget for tables held whole."""
    path = _make(tmp_path, "big.vhdx", "600G", "block_size=1M")
    qemu_io(path, ["write -P 0x61 0 1M", "write -P 0x62 300G 2M", "write -P 0x63 599G 1M"], "vhdx")

    def reads(vs: int) -> list[tuple[int, int]]:
        return [(0, 2 * MiB), (300 * 1024 * MiB - 5, 3 * MiB), (vs - 2 * MiB, 2 * MiB)]

    got = compare(hosted, path.read_bytes(), reads=reads)
    assert got.error is None and got.reads[0][:MiB] == b"\x61" * MiB


# -- BAT states and corruption (test_decode_vhdx's cases) -------------------------------


@cache
def _small(opts: tuple[str, ...] = ("block_size=1M",), writes: tuple[str, ...] = ()) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return _make(Path(tmp), "d.vhdx", "8M", *opts, writes=writes).read_bytes()


def _image(data: bytes, tmp: Path) -> Image:
    path = tmp / "x.vhdx"
    path.write_bytes(data)
    return Image(path)


def _bat_cases(tmp: Path) -> Iterator[tuple[str, bytes]]:
    pristine = _small(writes=("write -P 1 0 2M", "write -P 2 6M 1k"))
    img = _image(pristine, tmp)
    img.set_bat(1, img.bat(1) | L.PAYLOAD_PARTIALLY_PRESENT)
    yield "partial without parent", bytes(img.data)
    img = _image(pristine, tmp)
    img.set_bat(1, (img.bat(0) & L.OFFSET_MASK) | L.PAYLOAD_FULLY_PRESENT)
    img.set_bat(0, MiB | L.PAYLOAD_FULLY_PRESENT)
    yield "block over the log", bytes(img.data)
    img = _image(pristine, tmp)
    img.set_bat(2, 4)
    img.set_bat(3, L.PAYLOAD_UNMAPPED_V095)
    img.set_bat(4, L.PAYLOAD_UNDEFINED)
    img.set_bat(5, L.PAYLOAD_UNMAPPED)
    yield "reserved and zero states", bytes(img.data)
    img = _image(pristine, tmp)
    img.set_bat(1, img.bat(0))  # two blocks, one place
    yield "shared block", bytes(img.data)
    img = _image(pristine, tmp)
    yield "truncated", bytes(img.data[: (img.bat(6) & L.OFFSET_MASK) + 4096])
    img = _image(pristine, tmp)
    img.set_bat(0, img.regions.bat.offset | L.PAYLOAD_FULLY_PRESENT)
    yield "block over the BAT", bytes(img.data)
    img = _image(pristine, tmp)
    data = bytearray(img.data)
    data[L.HEADER_OFFSETS[0] + 30] ^= 0x40
    yield "one bad header", bytes(data)
    data[L.HEADER_OFFSETS[1] + 30] ^= 0x40
    yield "two bad headers", bytes(data)
    data = bytearray(pristine)
    first = L.HEADER_OFFSETS[0]
    data[L.HEADER_OFFSETS[1] : L.HEADER_OFFSETS[1] + 4096] = data[first : first + 4096]
    yield "equal headers", bytes(data)
    data[L.HEADER_OFFSETS[1] + 16] ^= 1
    data[L.HEADER_OFFSETS[1] : L.HEADER_OFFSETS[1] + 4096] = hostile.crc_reseal(
        bytearray(data[L.HEADER_OFFSETS[1] : L.HEADER_OFFSETS[1] + 4096])
    )
    yield "equal sequences, different headers", bytes(data)
    img = _image(pristine, tmp)
    data = bytearray(img.data)
    data[L.REGION_TABLE_OFFSET + 40] ^= 0x40
    yield "region table checksum", bytes(data)
    img = _image(pristine, tmp)
    struct.pack_into("<I", img.data, img.item_at(L.FILE_PARAMETERS_GUID), 3 * MiB)
    yield "block size", bytes(img.data)
    meta = img.regions.metadata.offset
    data = bytearray(pristine)
    at = bytes(data[meta : meta + 65536]).index(L.VIRTUAL_DISK_SIZE_GUID)
    data[meta + at] ^= 0xFF
    yield "required unknown item", bytes(data)
    data[meta + at + 24] &= ~4
    yield "missing item", bytes(data)
    data[meta + at] ^= 0xFF
    data[meta : meta + 8] = b"metadatX"
    yield "metadata signature", bytes(data)
    yield "signature", b"vhdxfilf" + pristine[8:]
    yield "short", pristine[:5]
    yield "headers only", pristine[: 192 * KiB]


BAT_CASES = list(_bat_cases(Path(__import__("tempfile").mkdtemp()))) if QEMU_IMG else []


@needs_qemu
@pytest.mark.parametrize("data", [c[1] for c in BAT_CASES], ids=[c[0] for c in BAT_CASES])
def test_bat_and_corruption(hosted: Hosted, data: bytes) -> None:
    compare(hosted, data)


# -- the log -----------------------------------------------------------------------------


PAGE = bytes(range(256)) * 16


def _log_cases(tmp: Path) -> Iterator[tuple[str, bytes]]:
    base = _small(writes=("write -P 0x11 0 2M",))
    img = _image(base, tmp)
    block0 = img.bat(0) & L.OFFSET_MASK
    guid = dirty_guid(img)
    size = len(img.data)
    new_block = -(-size // MiB) * MiB
    bat_at = img.regions.bat.offset
    bat_page = bytearray(img.data[bat_at : bat_at + 4096])
    struct.pack_into("<Q", bat_page, 8, new_block | L.PAYLOAD_FULLY_PRESENT)
    first = log_entry(5, guid, [(block0 + 8192, PAGE), (block0 + 65536, 8192)], size, size)
    second = log_entry(
        6, guid, [(bat_at, bytes(bat_page)), (new_block + MiB - 4096, PAGE)], size, new_block + MiB
    )
    clean = bytes(img.data)
    put_log(img, 0, first)
    put_log(img, len(first), second)
    yield "replayed, the file grown", bytes(img.data)

    img = _image(clean, tmp)
    entry = bytearray(log_entry(5, guid, [(block0, bytes(4096))], size, size))
    entry[4100] ^= 1
    put_log(img, 0, bytes(entry))
    yield "bad entry ignored", bytes(img.data)

    img = _image(clean, tmp)
    put_log(img, 0, log_entry(5, guid, [(2 * MiB, bytes(4096))], size + MiB, size + MiB))
    yield "expects a longer file", bytes(img.data)

    img = _image(clean, tmp)
    put_log(img, 0, log_entry(5, guid, [(block0, PAGE)], size, 1 << 49))
    yield "absurd size", bytes(img.data)

    img = _image(clean, tmp)
    put_log(img, 0, log_entry(5, guid, [(size, PAGE)], size, size))
    yield "writes past the end", bytes(img.data)

    img = _image(clean, tmp)
    put_log(img, 0, log_entry(5, guid, [(block0, (1 << 64) - 4096)], size, size))
    yield "huge zero write", bytes(img.data)

    # Overlapping writes, newest wins; a zero run across them; the entry wraps around
    # the end of the circular log.
    img = _image(clean, tmp)
    log_length = img.header.log_length
    older = log_entry(
        8, guid, [(block0, PAGE), (block0 + 4096, PAGE[::-1]), (block0 + 12288, 20480)], size, size
    )
    newer = log_entry(
        9,
        guid,
        [(block0 + 4096, bytes([7]) * 4096), (block0 + 8192, 8192), (block0, PAGE)],
        size,
        size,
    )
    at = log_length - 4096
    put_log(img, at, older)
    put_log(img, (at + len(older)) % log_length, newer)
    # an older, separate run that loses to the newer one
    put_log(img, 20 * 4096, log_entry(3, guid, [(block0, bytes([9]) * 4096)], size, size))
    yield "overlapping, wrapped", bytes(img.data)

    # Two runs: the longer one ending at the highest sequence number wins.
    img = _image(clean, tmp)
    a = log_entry(20, guid, [(block0, bytes([1]) * 4096)], size, size)
    b = log_entry(21, guid, [(block0 + 4096, bytes([2]) * 4096)], size, size)
    c = log_entry(21, guid, [(block0 + 8192, bytes([3]) * 4096)], size, size)
    put_log(img, 0, a)
    put_log(img, len(a), b)
    put_log(img, 40 * 4096, c)
    yield "two runs", bytes(img.data)

    img = _image(clean, tmp)
    img.edit_headers(lambda h: struct.pack_into("<H", h, 64, 1))
    yield "log version", bytes(img.data)
    img = _image(clean, tmp)
    img.edit_headers(lambda h: struct.pack_into("<Q", h, 72, MiB + 4096))
    yield "log misaligned", bytes(img.data)
    img = _image(clean, tmp)
    img.edit_headers(lambda h: struct.pack_into("<I", h, 68, 512 * MiB))
    yield "log too large", bytes(img.data)
    img = _image(clean, tmp)
    img.edit_headers(lambda h: struct.pack_into("<Q", h, 72, 64 * MiB))
    yield "log past the end", bytes(img.data)
    img = _image(clean, tmp)
    img.edit_headers(lambda h: struct.pack_into("<I", h, 68, 0))
    yield "no log length", bytes(img.data)


LOG_CASES = list(_log_cases(Path(__import__("tempfile").mkdtemp()))) if QEMU_IMG else []


@needs_qemu
@pytest.mark.parametrize("data", [c[1] for c in LOG_CASES], ids=[c[0] for c in LOG_CASES])
def test_logs(hosted: Hosted, data: bytes) -> None:
    compare(hosted, data)


def test_a_log_replay_changes_what_is_read(hosted: Hosted) -> None:
    if not LOG_CASES:
        pytest.skip("qemu-img not installed")
    got = compare(hosted, LOG_CASES[0][1])
    assert got.error is None
    assert got.reads[0][8192:12288] == PAGE  # the log's page, not the file's
    assert got.reads[1][MiB - 4096 :] == PAGE  # in the block the log moved past the end


# -- logs larger than a window of the guest's ----------------------------------------------
#
# The guest streams the log through IN a window at a time and builds the overlay a window
# of the file at a time: these logs are larger than 8 MiB, their chains wrap the log's
# end and span its windows, and their writes fall on both sides of the overlay's windows
# (the tiny-tables build cuts both windows down, so every case here crosses many).

BIG_LOG = 16 * MiB
ROTATING = bytes(range(256)) * 17
FAR = 64 * MiB  # past the file's end: a block the log moves there reads the log's bytes


def _page(i: int) -> bytes:
    return ROTATING[i % 256 : i % 256 + 4096]


def _place(img: Image, position: int, entries: Sequence[bytes]) -> None:
    """The entries one after another from ``position``, wrapping at the log's end."""
    start, size = img.header.log_offset, img.header.log_length
    for entry in entries:
        for at in range(0, len(entry), 4096):
            sector = (position + at) % size
            img.data[start + sector : start + sector + 4096] = entry[at : at + 4096]
        position = (position + len(entry)) % size


def _big_log(tmp: Path) -> tuple[Image, bytes, int, list[int]]:
    """A 16 MiB-log image, its log's GUID, its file's size, its first blocks' offsets."""
    img = _image(_small(("block_size=1M", f"log_size={BIG_LOG >> 20}M"), ("write -P 1 0 4M",)), tmp)
    assert img.header.log_length == BIG_LOG
    return img, dirty_guid(img), len(img.data), [img.bat(i) & L.OFFSET_MASK for i in range(4)]


def _bat_sector(img: Image, changes: dict[int, int]) -> tuple[int, bytes]:
    """The BAT's first sector with ``changes`` (block: entry) made, and where it lies."""
    at = img.regions.bat.offset
    sector = bytearray(img.data[at : at + 4096])
    for block, entry in changes.items():
        struct.pack_into("<Q", sector, 8 * block, entry)
    return at, bytes(sector)


def _mixed_log(tmp: Path) -> bytes:
    """A chain of four entries wrapping the end of a 16 MiB log: pages and zeros over
    the first blocks, the newer over the older, one entry of 300 pages (longer than the
    guest's 1 MiB windows), the BAT rewritten to move a block past the file's end, and
    a stale chain elsewhere in the log that must not be replayed."""
    img, guid, size, blocks = _big_log(tmp)
    b0, b1, b2, _ = blocks
    bat_at, bat = _bat_sector(img, {6: FAR | L.PAYLOAD_FULLY_PRESENT})
    grown = FAR + MiB
    moving: list[tuple[int, bytes | int]] = [(bat_at, bat), (FAR, MiB)]
    entries = [
        log_entry(
            100,
            guid,
            [(b0, _page(1)), (b0 + 4096, _page(2)), (b0 + 64 * KiB, 128 * KiB), (b2, _page(3))],
            size,
            size,
        ),
        log_entry(
            101,
            guid,
            [(b1 + 4096 * i, _page(10 + i)) for i in range(300)]
            + [(b0 + 68 * KiB, _page(7)), (b0 + 4096, 4096)],
            size,
            size,
        ),
        log_entry(
            102,
            guid,
            moving
            + [(b2 + 8192 * i, 4096) for i in range(100)]
            + [(FAR + 12288 * i, _page(50 + i)) for i in range(40)],
            size,
            grown,
        ),
        log_entry(
            103,
            guid,
            [(b1 + 8 * KiB, 20 * KiB), (FAR + 12288 * 3, 4096), (b2 + 8192 * 7, _page(99))],
            size,
            grown,
        ),
    ]
    assert len(entries[1]) > MiB
    _place(img, BIG_LOG - 2 * 4096, entries)
    # an older chain the search passes over: its write would show in block 0
    _place(img, 9 * MiB, [log_entry(40, guid, [(b0 + 8192, _page(200))], size, size)])
    return bytes(img.data)


def _refused_logs(tmp: Path) -> Iterator[tuple[str, bytes]]:
    """Chains a replay must refuse part-way: what comes before the bad entry is valid and
    long (past a window of the guest's), the bad entry's sequence number in the message."""
    img, guid, size, blocks = _big_log(tmp)
    pristine = bytes(img.data)
    long_entry = log_entry(
        7, guid, [(blocks[1] + 4096 * i, _page(i)) for i in range(300)], size, size
    )
    bad = {
        "writes past the end": log_entry(
            8, guid, [(blocks[0], _page(1)), (1 << 44, 4096)], size, size
        ),
        "expects a longer file": log_entry(8, guid, [(blocks[0], _page(1))], size + MiB, size),
        "absurd file size": log_entry(8, guid, [], size, (1 << 48) + 1),
    }
    for name, entry in bad.items():
        img.data[:] = pristine
        tail = log_entry(9, guid, [(blocks[2], _page(5))], size, size)
        _place(img, BIG_LOG - 4096, [log_entry(6, guid, [], size, size), long_entry, entry, tail])
        yield name, bytes(img.data)


def _reads(vs: int) -> list[tuple[int, int]]:
    return [(0, 4 * MiB), (6 * MiB - 5000, MiB + 9000), (MiB + 4090, 20), (7 * MiB, MiB)]


@needs_qemu
def test_a_log_larger_than_8_mib_is_replayed(hosted: Hosted, tmp_path: Path) -> None:
    data = _mixed_log(tmp_path)
    got = compare(hosted, data, reads=_reads)
    assert got.error is None and not any(isinstance(r, tuple) for r in got.reads)
    first = got.reads[0]
    assert first[:4096] == _page(1) and first[4096:8192] == bytes(4096)  # 101 zeroes 100's page
    assert first[8192:12288] == b"\x01" * 4096  # the stale chain's page is not replayed
    assert first[64 * KiB : 68 * KiB] == bytes(4096) and first[68 * KiB : 72 * KiB] == _page(7)
    assert first[MiB : MiB + 8192] == _page(10) + _page(11)
    assert first[MiB + 8192 : MiB + 28 * KiB] == bytes(20 * KiB)  # 103 over 101
    moved = got.reads[1][5000 : 5000 + MiB]  # block 6, moved past the file's end
    assert moved[:4096] == _page(50) and moved[36864 : 36864 + 4096] == bytes(4096)
    assert moved[12288 * 4 : 12288 * 4 + 4096] == _page(54)
    assert hosted.heap_peak < 16 * MiB


@needs_qemu
def test_a_log_refused_part_way(hosted: Hosted, tmp_path: Path) -> None:
    for name, data in _refused_logs(tmp_path):
        got = compare(hosted, data, reads=_reads)
        assert got.error is not None and "log entry 8 " in got.error[1], name


@needs_qemu
def test_an_overlay_of_many_windows(hosted: Hosted, tmp_path: Path) -> None:
    """40,000 writes: 80,000 edges, more than a window of the shipped guest's holds, so
    its reads cross from one window to the next (and back)."""
    if hosted.tiny_tables:
        pytest.skip("a two-edge window over 80,000 edges is the normal build's case")
    img, guid, size, _ = _big_log(tmp_path)
    # the first window from the file's start ends 4 KiB short of FAR + 256 MiB: block 6
    # straddles its end, block 7 lies in the next
    moved = {
        4 + k: (FAR + at * MiB) | L.PAYLOAD_FULLY_PRESENT for k, at in enumerate((0, 100, 255, 300))
    }
    bat_at, bat = _bat_sector(img, moved)
    far = FAR + 320 * MiB
    writes: list[tuple[int, bytes | int]] = [(bat_at, bat)]
    writes += [(FAR + 8192 * i, 4096) for i in range(40_000)]
    writes += [(FAR + 8192 * i + 4096, _page(i)) for i in range(0, 40_000, 97)]
    _place(img, BIG_LOG - 4096, [log_entry(3, guid, writes, size, far)])
    data = bytes(img.data)

    def reads(vs: int) -> list[tuple[int, int]]:
        return [(4 * MiB, 4 * MiB), (0, MiB), (7 * MiB - 4096, 8192), (4 * MiB + 5, 3)]

    got = compare(hosted, data, reads=reads)
    assert got.error is None
    block4, block7 = got.reads[0][:MiB], got.reads[0][3 * MiB :]
    assert block4[4096:8192] == _page(0) and block4[97 * 8192 + 4096 : 98 * 8192] == _page(97)
    first = 300 * MiB // 8192
    assert block7[12 * 8192 + 4096 : 13 * 8192] == _page(first + 12)  # 97 * 396
    assert block7[:8192] == bytes(8192)
    assert hosted.heap_peak < 16 * MiB  # 40,000 writes, a window of them at a time


# -- through the VMM ----------------------------------------------------------------------


def _python_disk(data: bytes) -> VirtualDisk:
    return Clipped(decode.open_disk(MemFile(data, NAME), ChainResolver({})))


@needs_qemu
@needs_kvm
def test_large_logs_in_the_vm(tmp_path: Path) -> None:
    """The shipped guest.elf in its micro-VM replays and refuses the logs above as Python
    does, with its own windows and its 32 MiB heap."""
    from aiodd.guest.kvm.reader import KvmReader

    cases = [_mixed_log(tmp_path), *(data for _, data in _refused_logs(tmp_path))]
    reader = KvmReader(NAME)
    try:
        for data in cases:
            expected = python_outcome(partial(_python_disk, data), _reads)
            assert vm_outcome(reader, data, ChainResolver({}), "vhdx", NAME, _reads) == expected
    finally:
        reader.close()


# -- differencing ------------------------------------------------------------------------


def _differencing(tmp: Path, parent_name: str, pairs: list[tuple[str, str]] | None = None) -> bytes:
    child = _make(
        tmp,
        "child.vhdx",
        "8M",
        "block_size=1M",
        "block_state_zero=off",
        writes=["write -P 0x22 0 1M", "write -P 0x33 1M 1M", "write -P 0x44 3M 1M"],
    )
    img = Image(child)
    make_differencing(img, parent_name)
    img.set_bat(1, img.bat(1) & L.OFFSET_MASK | L.PAYLOAD_PARTIALLY_PRESENT)
    chunk_sector = MiB // 512
    bitmap_at: int = img.bitmap_at  # type: ignore[attr-defined]
    img.data[bitmap_at + chunk_sector // 8] = 0xFF
    img.data[bitmap_at + chunk_sector // 8 + 2] = 0xFF
    img.data[bitmap_at + (chunk_sector + 2000) // 8] |= 1 << (2000 % 8)
    img.data[bitmap_at + (chunk_sector + 2047) // 8] |= 0x80
    img.set_bat(2, L.PAYLOAD_ZERO)
    if pairs is not None:
        item = hostile.vhdx_locator_item(pairs)
        at = img.regions.metadata.offset + 256 * KiB
        img.data[at : at + 4096] = item.ljust(4096, b"\0")
        meta = img.regions.metadata.offset
        count = struct.unpack_from("<H", img.data, meta + 10)[0]
        struct.pack_into("<I", img.data, meta + 32 + 32 * (count - 1) + 20, len(item))
    return bytes(img.data)


def _parents(tmp: Path) -> dict[str, bytes]:
    files = {}
    for fmt, name in (("vhdx", "base.vhdx"), ("qcow2", "base.qcow2")):
        path = tmp / name
        qemu_img("create", "-q", "-f", fmt, path, "6M")
        qemu_io(path, ["write -P 0x11 0 6M", "write -z 1M 4k"], fmt)
        files[name] = path.read_bytes()
    files["base.raw"] = bytes([0x55]) * (3 * MiB + 1000)
    return files


@needs_qemu
@pytest.mark.parametrize("parent", ["base.vhdx", "base.qcow2", "base.raw", "missing.vhdx"])
def test_differencing(hosted: Hosted, tmp_path: Path, parent: str) -> None:
    files = _parents(tmp_path)
    got = compare(hosted, _differencing(tmp_path, parent), files)
    if parent != "missing.vhdx":
        assert got.error is None and got.reads[0] == b"\x22" * MiB
        assert got.reads[1][:4096] == b"\x33" * 4096


@needs_qemu
def test_a_chain_of_differencing_disks(hosted: Hosted, tmp_path: Path) -> None:
    files = _parents(tmp_path)
    files["mid.vhdx"] = _differencing(tmp_path, "base.qcow2")
    top = _differencing(tmp_path, "mid.vhdx")
    assert compare(hosted, top, files).error is None
    files["loop.vhdx"] = _differencing(tmp_path, "loop.vhdx")
    assert "too deep" in str(compare(hosted, files["loop.vhdx"], files).error)


LOCATORS = [
    ("absolute only", [("absolute_win32_path", "C:\\x\\base.vhdx")]),
    (
        "absolute after empty relative",
        [("relative_path", ".\\"), ("absolute_win32_path", "base.raw")],
    ),
    ("last key wins", [("relative_path", "nope"), ("relative_path", "base.raw")]),
    ("non-ascii", [("relative_path", "bäse\U0001f600.vhdx")]),
    ("no path", [("volume_path", "\\\\?\\Volume{x}\\base.vhdx")]),
    ("too long", [("relative_path", "é" * 2100)]),
    ("long but fits", [("relative_path", "./" * 1000 + "base.raw")]),
]


@needs_qemu
@pytest.mark.parametrize("pairs", [c[1] for c in LOCATORS], ids=[c[0] for c in LOCATORS])
def test_parent_locators(hosted: Hosted, tmp_path: Path, pairs: list[tuple[str, str]]) -> None:
    compare(hosted, _differencing(tmp_path, "x", pairs), _parents(tmp_path))


def _locator_bytes(tmp: Path) -> Iterator[tuple[str, bytes]]:
    data = _differencing(tmp, "base.raw")
    img = _image(data, tmp)
    at = img.item_at(L.PARENT_LOCATOR_GUID)
    length = img.items[L.PARENT_LOCATOR_GUID].length
    bad = bytearray(data)
    bad[at] ^= 1
    yield "wrong type", bytes(bad)
    bad = bytearray(data)
    struct.pack_into("<H", bad, at + 18, 500)
    yield "entries past the item", bytes(bad)
    bad = bytearray(data)
    struct.pack_into("<I", bad, at + 20 + 12 + 4, length - 2)
    yield "value outside", bytes(bad)
    bad = bytearray(data)
    struct.pack_into("<H", bad, at + 20 + 12 + 10, 3)
    yield "odd length", bytes(bad)
    bad = bytearray(data)
    value_at = struct.unpack_from("<I", bad, at + 20 + 12 + 4)[0]
    struct.pack_into("<H", bad, at + value_at, 0xDC00)
    yield "lone surrogate", bytes(bad)
    bad = bytearray(data)
    struct.pack_into("<H", bad, at + value_at, 0xD800)
    yield "unpaired high surrogate", bytes(bad)


@needs_qemu
def test_bad_parent_locators(hosted: Hosted, tmp_path: Path) -> None:
    files = _parents(tmp_path)
    for _, data in _locator_bytes(tmp_path):
        assert compare(hosted, data, files).error is not None


# -- the hostile corpus ----------------------------------------------------------------

HOSTILE = [c for c in hostile.CASES if "vhdx" in c.id]


@needs_qemu
@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_cases(hosted: Hosted, tmp_path: Path, case: hostile.Case) -> None:
    tree = hostile.make_tree(tmp_path)
    built = case.build(tree)
    files = {p.name: p.read_bytes() for p in tree.img.iterdir() if p.is_file()}
    for p in tree.outside.iterdir():
        if p.is_file():
            files[f"../outside/{p.name}"] = p.read_bytes()
            files[str(p)] = p.read_bytes()
    compare(hosted, built.image.read_bytes(), files)


def _field_values(width: int) -> list[int]:
    top = (1 << (8 * width)) - 1
    return sorted(v for v in {0, 1, 2, 7, 4096, MiB, top, top >> 1, top - 1} if v <= top)


def _field_cases() -> Iterator[bytes]:
    base = hostile.base("vhdx")
    for at, width, _ in base.fields:
        for value in _field_values(width):
            data = bytearray(base.data)
            data[at : at + width] = value.to_bytes(width, "little")
            yield bytes(data)
            # and with the structure's checksum made right again
            for start, size in ((L.HEADER_OFFSETS[0], 4096), (L.HEADER_OFFSETS[1], 4096)):
                if start <= at < start + size:
                    hostile.crc_reseal(memoryview(data)[start : start + size])  # type: ignore[arg-type]
                    yield bytes(data)
            for start in (L.REGION_TABLE_OFFSET, L.REGION_TABLE_OFFSET + 64 * KiB):
                if start <= at < start + 64 * KiB:
                    table = hostile.crc_reseal(bytearray(data[start : start + 64 * KiB]))
                    data[start : start + 64 * KiB] = table
                    yield bytes(data)


@needs_qemu
def test_hostile_base_fields_and_cuts(hosted: Hosted) -> None:
    count = 0
    for data in _field_cases():  # one at a time: each is a copy of the image
        compare(hosted, data, reads=lambda vs: [(0, min(vs, 3 * MiB)), (max(vs - 7, 0), 20)])
        count += 1
    assert count > 300
    base = hostile.base("vhdx")
    for cut in hostile.CUTS:
        end = cut if isinstance(cut, int) else int(base.floor * cut)
        compare(hosted, base.data[:end])


# -- mutations ---------------------------------------------------------------------------


@cache
def _mutation_bases() -> tuple[tuple[bytes, dict[str, bytes]], ...]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = _parents(d)
        out = [
            (
                _make(
                    d,
                    "a.vhdx",
                    "3M",
                    "block_size=1M",
                    writes=["write -P 0x55 0 1M", "write -P 6 2M 4k"],
                ).read_bytes(),
                files,
            ),
            (
                _make(
                    d,
                    "b.vhdx",
                    "2M",
                    "block_size=1M",
                    "subformat=fixed",
                    writes=["write -P 7 0 4k"],
                ).read_bytes(),
                files,
            ),
            (_differencing(d, "base.raw"), files),
            (LOG_CASES[0][1], files),
            (LOG_CASES[7][1], files),
        ]
    return tuple(out)


def _regions(data: bytes) -> list[int]:
    """Offsets worth hitting: the structures at the start, the metadata and the BAT, the
    log, the sector bitmap."""
    spots = [0, 64 * KiB, 128 * KiB, 192 * KiB, 256 * KiB, MiB, MiB + 4096]
    try:
        rt = L.parse_region_table(data[192 * KiB : 256 * KiB])
        spots += [rt.metadata.offset, rt.metadata.offset + 64 * KiB, rt.bat.offset]
    except L.LayoutError:
        pass
    spots.append(max(len(data) - MiB, 0))
    return spots


def _mutate(data: bytes, edits: list[tuple[int, int, int, int]]) -> bytes:
    out = bytearray(data)
    spots = _regions(data)
    for spot, delta, value, width in edits:
        at = (spots[spot % len(spots)] + delta) % len(out)
        out[at : at + width] = bytes([value]) * width
    return bytes(out[: len(data)])


def _reseal_all(data: bytes) -> bytes:
    """Checksums made right, so that edits reach past them."""
    out = bytearray(data)
    for at in (*L.HEADER_OFFSETS,):
        out[at : at + 4096] = hostile.crc_reseal(bytearray(out[at : at + 4096]))
    for at in (L.REGION_TABLE_OFFSET, L.REGION_TABLE_OFFSET + 64 * KiB):
        out[at : at + 64 * KiB] = hostile.crc_reseal(bytearray(out[at : at + 64 * KiB]))
    return bytes(out)


@pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None, reason="qemu-img/qemu-io not installed")
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 4),
    st.lists(
        st.tuples(
            st.integers(0, 20),
            st.integers(0, 5000),
            st.integers(0, 255),
            st.sampled_from([1, 1, 2, 4, 8]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
    st.integers(0, 1 << 24),
)
def test_mutated_images(
    hosted: Hosted, which: int, edits: list[tuple[int, int, int, int]], reseal: bool, cut: int
) -> None:
    data, files = _mutation_bases()[which]
    mutated = _mutate(data, edits)
    if reseal:
        mutated = _reseal_all(mutated)
    if cut % 5 == 0:
        mutated = mutated[: cut % len(mutated)]
    compare(
        hosted, mutated, files, reads=lambda vs: [(0, min(vs, 4 * MiB)), (max(vs - 5000, 0), 9000)]
    )


def test_guid_constants_match_python() -> None:
    """The C tables spell the GUIDs byte for byte as layout.py does."""
    source = (Path(decode.__file__).parent / "guest.c").read_text()
    for guid in (L.BAT_GUID, L.METADATA_GUID, L.PARENT_LOCATOR_TYPE_VHDX, L.FILE_PARAMETERS_GUID,
                 L.VIRTUAL_DISK_SIZE_GUID, L.PAGE83_GUID, L.LOGICAL_SECTOR_GUID,
                 L.PHYSICAL_SECTOR_GUID, L.PARENT_LOCATOR_GUID):  # fmt: skip
        spelled = ", ".join(f"0x{b:02X}" for b in guid)
        assert spelled in " ".join(source.split()), uuid.UUID(bytes_le=guid)
