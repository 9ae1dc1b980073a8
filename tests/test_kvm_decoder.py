"""The KVM guest's C decoders against their Python twins (docs/kvm.md, "Testing the
decoders").

The C sources the guest runs are built natively (tests/fuzz/hosted.c serves the files
from memory) and every image is read by both decoders: the same bytes, or the same
error -- class and text -- for the open and for each read.  The images are those of
tests/test_decode_qcow2.py (hand-built header and table mutations, hostile cases),
images made by qemu-img of every cluster size and feature, hostile compressed clusters,
and random mutations of all of them (hypothesis).
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodd.formats.base import VirtualDisk
from aiodd.formats.qcow2 import decode as decoder
from aiodd.formats.qcow2 import layout
from tests.conftest import QEMU_IMG, QEMU_IO, needs_qemu, qemu_img, qemu_io
from tests.differential import COMMANDS, agree, command_doorbells, vm_outcome
from tests.fuzz.hosted import ChainResolver, Hosted, MemFile, NotInGuest, Outcome, python_outcome
from tests.test_decode_qcow2 import (
    BAD_HEADERS,
    CS,
    EXT_FUZZ_IMAGE,
    FUZZ_IMAGE,
    HEADER_FOR_FUZZ,
    NAME,
    _compressed_entry,
    _ext,
    header,
    image,
    writes,
)

MiB = 1 << 20
# Examples per mutation test; AIODD_DIFF_EXAMPLES=N for a longer search.
EXAMPLES = int(os.environ.get("AIODD_DIFF_EXAMPLES", "300"))


def plan(virtual_size: int, seed: int = 0) -> list[tuple[int, int]]:
    """The reads of one image: the start in 1 MiB commands, the end, odd ranges across
    clusters and tables, and past the end."""
    reads = [
        (start, min(MiB, virtual_size - start))
        for start in range(0, min(virtual_size, 6 * MiB), MiB)
    ]
    if virtual_size > 6 * MiB:
        reads.append((virtual_size - MiB, MiB))
    rng = random.Random(seed)
    for _ in range(6):
        start = rng.randrange(max(virtual_size, 1))
        reads.append((start, rng.choice([1, 511, 4097, 65537, 300000])))
    reads.append((max(virtual_size - 50, 0), 100))
    reads.append((virtual_size + 12345, 10))
    return reads


def compare(
    hosted: Hosted,
    data: bytes,
    files: dict[str, bytes] | None = None,
    reads: Callable[[int], Sequence[tuple[int, int]]] = plan,
) -> Outcome | None:
    """Both decoders over ``data``; they must agree.  None when the C decoder cannot
    take the image (a backing file in a format the guest leaves to Python)."""
    files = files or {}
    expected = python_outcome(
        lambda: decoder.open_disk(MemFile(data, NAME), ChainResolver(files)), reads
    )
    try:
        got = hosted.outcome(data, ChainResolver(files), reads)
    except NotInGuest:
        return None
    agree(got, expected, reads)
    return got


# -- the hand-built cases of test_decode_qcow2 -------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in BAD_HEADERS], ids=[c[0] for c in BAD_HEADERS]
)
def test_bad_headers(hosted: Hosted, data: bytes, expected: str) -> None:
    # As the whole file, and as the first cluster of a file long enough for its tables.
    got = compare(hosted, data)
    assert got is not None and got.error is not None
    compare(hosted, data + bytes(16 * CS - len(data)))


def _mutated_header(edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(HEADER_FOR_FUZZ)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data[:cut])


def _compressed(payload: bytes, **fields: object) -> bytes:
    return image({0: _compressed_entry(4 * CS, len(payload))}, [payload], **fields)  # type: ignore[arg-type]


def _deflate(data: bytes, wbits: int = -12) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


def _zstd(data: bytes, **kwargs: object) -> bytes:
    return zstandard.ZstdCompressor(**kwargs).compress(data)  # type: ignore[arg-type]


ZSTD = {"compression_type": 1, "incompatible": layout.INCOMPAT_COMPRESSION}
PATTERN = bytes(range(256)) * (CS // 256)
EXT_DATA = [(layout.EXT_DATA_FILE, b"t.data")]


def _named_cases() -> Iterator[tuple[str, bytes, dict[str, bytes]]]:
    base = {"b.img": b"\x42" * 3 * CS}
    yield "fuzz image", FUZZ_IMAGE, {}
    yield "extended fuzz image", EXT_FUZZ_IMAGE, base
    yield "l2 past end", image({}, l1_entry=(0x50000 * 16) | (1 << 63)), {}
    yield "l2 unaligned", image({}, l1_entry=3 * CS + 512), {}
    yield "data past end", image({1: 0x90000 | (1 << 63)}), {}
    yield "data unaligned", image({0: 4 * CS + 512}, [bytes(CS)]), {}
    yield "v2 zero flag", image({2: 1}, version=2), {}
    yield "zero flag preallocated", image({0: (4 * CS) | 1 | (1 << 63)}, [b"\xcc" * CS]), {}
    yield "compressed past end", image({0: _compressed_entry(0x900000, 100)}), {}
    yield "garbage deflate", _compressed(b"\xff" * 600), {}
    yield "short deflate", _compressed(_deflate(bytes(CS // 2))), {}
    yield "long deflate", _compressed(_deflate(bytes(CS + 1))), {}
    yield "exact deflate", _compressed(_deflate(PATTERN)), {}
    yield "deflate with trailing bytes", _compressed(_deflate(PATTERN) + b"\x13" * 700), {}
    yield "truncated deflate", _compressed(_deflate(PATTERN)[:-40]), {}
    # qemu writes windowBits -12; a 32 KiB-window stream may reach back too far
    yield "deflate far back", _compressed(_deflate(bytes(range(256)) * 20 + PATTERN, wbits=-15)), {}
    yield "zlib header", _compressed(zlib.compress(PATTERN)), {}
    yield "zstd exact", _compressed(_zstd(PATTERN, write_content_size=False), **ZSTD), {}
    yield "zstd sized", _compressed(_zstd(PATTERN), **ZSTD), {}
    yield "zstd bomb", _compressed(_zstd(bytes(64 * CS)), **ZSTD), {}
    yield "zstd short", _compressed(_zstd(PATTERN[:1000]), **ZSTD), {}
    yield (
        "zstd two frames",
        _compressed(_zstd(PATTERN[: CS // 2]) + _zstd(PATTERN[CS // 2 :]), **ZSTD),
        {},
    )
    yield "zstd empty frame first", _compressed(_zstd(b"") + _zstd(PATTERN), **ZSTD), {}
    skippable = struct.pack("<II", 0x184D2A50, 8) + b"skipme!!"
    yield "zstd skippable first", _compressed(skippable + _zstd(PATTERN), **ZSTD), {}
    yield "zstd truncated", _compressed(_zstd(PATTERN, level=19)[:-30], **ZSTD), {}
    yield "zstd garbage", _compressed(b"\x28\xb5\x2f\xfd" + b"\xee" * 500, **ZSTD), {}
    big_window = zstandard.ZstdCompressionParameters(window_log=24)
    streamed = zstandard.ZstdCompressor(compression_params=big_window).compressobj()
    frame = streamed.compress(PATTERN) + streamed.flush()
    yield "zstd window too large", _compressed(frame, **ZSTD), {}
    ext_image = {
        0: _ext(4 * CS | (1 << 63), 0b0101, 0b1000),
        1: _ext(0, 0, 0b10),
        2: _ext(4 * CS | (1 << 63), layout.ALL_ALLOC, 0),
        3: _ext(_compressed_entry(5 * CS, 300), 0, 0),
    }
    data = bytes((i // (CS // 32)) & 0xFF or 1 for i in range(CS))
    extended = image(
        ext_image,
        [data, _deflate(PATTERN)],
        incompatible=layout.INCOMPAT_EXTL2,
        backing=b"base.raw",
        extensions=[(layout.EXT_BACKING_FORMAT, b"raw")],
        size=6 * CS,
    )
    yield "extended subclusters", extended, {"base.raw": bytes([7]) * 4 * CS}
    yield (
        "extended alloc and zero",
        image({0: _ext(4 * CS, 1, 1)}, [bytes(CS)], incompatible=layout.INCOMPAT_EXTL2),
        {},
    )
    yield (
        "extended alloc without cluster",
        image({0: _ext(0, 1, 0)}, [bytes(CS)], incompatible=layout.INCOMPAT_EXTL2),
        {},
    )
    data_file = b"\x01" * CS + b"\x02" * CS
    yield (
        "data file",
        image(
            {0: 1 << 63, 1: CS | (1 << 63), 2: 0},
            incompatible=layout.INCOMPAT_DATA_FILE,
            extensions=EXT_DATA,
        ),
        {"t.data": data_file},
    )
    yield (
        "data file mismatch",
        image({1: 1 << 63}, incompatible=layout.INCOMPAT_DATA_FILE, extensions=EXT_DATA),
        {"t.data": data_file},
    )
    yield (
        "data file past end",
        image({3: 3 * CS | (1 << 63)}, incompatible=layout.INCOMPAT_DATA_FILE, extensions=EXT_DATA),
        {"t.data": data_file},
    )
    yield (
        "data file compressed",
        image(
            {0: _compressed_entry(4 * CS, 100)},
            incompatible=layout.INCOMPAT_DATA_FILE,
            extensions=EXT_DATA,
        ),
        {"t.data": data_file},
    )
    yield (
        "data file refused",
        image(
            {},
            incompatible=layout.INCOMPAT_DATA_FILE,
            extensions=[(layout.EXT_DATA_FILE, b"/etc/passwd")],
        ),
        {},
    )
    long_name = b"./" * 2000 + b"t.data"
    yield (
        "data file long name",
        image(
            {0: 1 << 63},
            incompatible=layout.INCOMPAT_DATA_FILE,
            extensions=[(layout.EXT_DATA_FILE, long_name)],
        ),
        {long_name.decode(): data_file},
    )
    yield (
        "backing format unknown",
        image({}, backing=b"b.img", extensions=[(layout.EXT_BACKING_FORMAT, b"vvfat")]),
        {"b.img": b""},
    )
    yield (
        "backing format non-utf8",
        image(
            {}, backing=b"b\xff\x01.img", extensions=[(layout.EXT_BACKING_FORMAT, b"q\xfe\x1b[1m")]
        ),
        {},
    )
    yield "backing probed raw", image({}, backing=b"b.img"), {"b.img": b"x" * 1000}
    yield "backing refused", image({}, backing=b"missing.img"), {}
    yield (
        "backing foreign",
        image({}, backing=b"b.img"),
        {"b.img": b"QFI\xfb\0\0\0\x01" + bytes(600)},
    )
    mid = image(
        {0: (4 * CS) | (1 << 63), 1: 0, 2: 1}, [b"\x31" * CS], backing=b"base.raw", size=5 * CS
    )
    top = image(
        {1: (4 * CS) | (1 << 63)},
        [b"\x41" * CS],
        backing=b"mid.qcow2",
        extensions=[(layout.EXT_BACKING_FORMAT, b"qcow2")],
        size=6 * CS,
    )
    chain = {"mid.qcow2": mid, "base.raw": b"\x21" * (3 * CS + 100)}
    yield "chain", top, chain
    bad_mid = image({0: 4 * CS + 512}, [b""], size=5 * CS)
    yield "chain with a bad middle", top, {"mid.qcow2": bad_mid}
    yield "chain with a corrupt middle", top, {"mid.qcow2": mid[:100]}
    looped = image({}, backing=b"t.qcow2")
    yield "chain loop", looped, {"t.qcow2": looped}


NAMED = list(_named_cases())


@pytest.mark.parametrize(("data", "files"), [c[1:] for c in NAMED], ids=[c[0] for c in NAMED])
def test_named_cases(hosted: Hosted, data: bytes, files: dict[str, bytes]) -> None:
    assert compare(hosted, data, files) is not None


def test_compressed_errors_and_table_errors_come_in_python_order(hosted: Hosted) -> None:
    """A bad compressed cluster before a bad table entry: the cluster's error, as
    Python decompresses it first; after it, the entry's; backing runs between."""
    bad = _deflate(bytes(10))
    entries = {0: _compressed_entry(4 * CS, len(bad)), 2: 4 * CS + 512, 3: 0}
    got = compare(hosted, image(entries, [bad], backing=b"b.img"), {"b.img": bytes(CS)})
    assert got is not None and "inflates to 10 bytes" in str(got.reads[0])
    entries = {0: 4 * CS + 512, 1: _compressed_entry(4 * CS, len(bad))}
    got = compare(hosted, image(entries, [bad]))
    assert got is not None and "not cluster aligned" in str(got.reads[0])


# A decoder's command standing in for one that keeps off (0) or writes over (1) the byte
# a read into its output asked for, run by the hosted build's check (tests/fuzz/hosted.c).
_WRITE_AFTER_READ = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.hosted_add_file.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
lib.hosted_write_after_read.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
lib.hosted_reset()
data, dest, seen = (ctypes.create_string_buffer(b"\\x7f", 1), ctypes.create_string_buffer(1),
                    ctypes.create_string_buffer(1))
lib.hosted_add_file(data, 1)
status = lib.hosted_write_after_read(dest, int(sys.argv[2]), seen)
print(status, dest.raw.hex(), seen.raw.hex())
"""


def test_a_decoder_that_writes_over_a_put_off_read_is_caught(hosted: Hosted) -> None:
    # The host makes a read into the output when the command ends (docs/kvm.md, "Reads
    # the host finishes"); until then the bytes hold a pattern, which a decoder that
    # reads them back would see, and one that writes over them breaks.
    def run(overwrite: int) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-c", _WRITE_AFTER_READ, str(hosted.library), str(overwrite)]
        return subprocess.run(args, capture_output=True, text=True, check=False)

    kept = run(0)
    assert kept.returncode == 0, kept.stderr
    status, dest, seen = kept.stdout.split()
    assert (status, dest) == ("0", "7f") and seen != "7f"
    broken = run(1)
    assert broken.returncode == -signal.SIGABRT
    assert "a write into the output's bytes a read was put off for" in broken.stderr


def test_a_long_chain_of_small_layers(hosted: Hosted) -> None:
    files = {"l0.raw": bytes([1]) * 8 * CS}
    below = "l0.raw"
    for depth in range(1, 40):
        name = f"l{depth}.qcow2"
        files[name] = image(
            {depth % 8: (4 * CS) | (1 << 63)},
            [bytes([depth + 1]) * CS],
            backing=below.encode(),
            size=8 * CS,
        )
        below = name
    got = compare(hosted, files.pop(below), files)
    assert got is not None and got.error is None
    assert hosted.heap_peak < 16 * MiB


def test_an_l1_table_too_large_to_hold_is_read_through_the_cache(hosted: Hosted) -> None:
    entries = 600_000  # 4.8 MB of L1: over the budget for tables held whole
    cb = 16
    size = entries << (cb + cb - 3)
    l1_offset = 2 * CS
    l1 = bytearray(entries * 8)
    l2_at = l1_offset + len(l1) + (-len(l1) % CS)
    for index in (0, 1, entries // 2, entries - 1):
        struct.pack_into(">Q", l1, 8 * index, l2_at | (1 << 63))
    table = bytearray(CS)
    struct.pack_into(">Q", table, 0, (l2_at + CS) | (1 << 63))
    struct.pack_into(">Q", table, 8 * 8191, 3 * CS + 512)  # unaligned: an error at the end
    first = header(size=size, l1_size=entries, l1_offset=l1_offset)
    data = first + bytes(CS) + bytes(l1) + bytes(-len(l1) % CS) + bytes(table) + b"\x5a" * CS

    def reads(vs: int) -> list[tuple[int, int]]:
        span = 1 << (cb + cb - 3)
        return [
            (0, 2 * CS),
            (span - 100, 200),
            (entries // 2 * span, CS),
            (vs - 2 * CS, 2 * CS),
            (vs - CS + 5, 10),
        ]

    got = compare(hosted, data, reads=reads)
    assert got is not None and got.reads[0][:CS] == b"\x5a" * CS
    assert "not cluster aligned" in str(got.reads[3])
    assert hosted.heap_peak < 20 * MiB


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), max_size=8), st.integers(0, 4096)
)
def test_mutated_headers(hosted: Hosted, edits: list[tuple[int, int]], cut: int) -> None:
    data = _mutated_header(edits, cut)
    padded = data + bytes(max(0, (1 << 20) - len(data))) if cut > 2048 else data
    compare(hosted, padded, {"base.img": b"b" * 9000, "d": b"d" * 5000})


def _mutate(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(base)
    for pos, value in edits:
        where = pos % 5
        target = [pos % 112, 2 * CS + pos % 16, 3 * CS + pos % 64, 5 * CS + pos % 2048, pos]
        data[target[where] % len(data)] = value
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(NAMED))),
    st.lists(st.tuples(st.integers(0, 8 * CS), st.integers(0, 255)), max_size=6),
)
def test_mutated_images(hosted: Hosted, which: int, edits: list[tuple[int, int]]) -> None:
    _, data, files = NAMED[which]
    compare(hosted, _mutate(data, edits), files)


# -- images qemu made --------------------------------------------------------------------


def _make(tmp: Path, name: str, size: str, *opts: str, fmt: str = "qcow2") -> Path:
    path = tmp / name
    args: list[str | Path] = ["create", "-f", fmt]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, size)
    return path


def _files(tmp: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()}


QEMU_CASES = [
    ("512", ("cluster_size=512",)),
    ("4k-v2", ("cluster_size=4k", "compat=0.10")),
    ("64k", ()),
    ("64k-v2", ("compat=0.10",)),
    ("2M", ("cluster_size=2M",)),
    ("extl2-64k", ("extended_l2=on",)),
    ("extl2-16k", ("extended_l2=on", "cluster_size=16k")),
    ("zstd", ("compression_type=zstd",)),
    ("zstd-2M", ("compression_type=zstd", "cluster_size=2M")),
    ("zlib-4k", ("cluster_size=4k",)),
    ("prealloc-metadata", ("preallocation=metadata",)),
    ("lazy-refcounts", ("lazy_refcounts=on",)),
]


@needs_qemu
@pytest.mark.parametrize("opts", [c[1] for c in QEMU_CASES], ids=[c[0] for c in QEMU_CASES])
def test_qemu_images(hosted: Hosted, tmp_path: Path, opts: tuple[str, ...]) -> None:
    path = _make(tmp_path, "a.qcow2", "5M", *opts)
    cluster = next((o.split("=")[1] for o in opts if o.startswith("cluster_size=")), "64k")
    prealloc = any(o.startswith("preallocation=") for o in opts)
    qemu_io(path, writes(cluster, compressed=not prealloc))
    got = compare(hosted, path.read_bytes())
    assert got is not None and got.error is None


@needs_qemu
@pytest.mark.parametrize("zstd", [False, True], ids=["zlib", "zstd"])
def test_qemu_converted_compressed(hosted: Hosted, tmp_path: Path, zstd: bool) -> None:
    raw = tmp_path / "src.raw"
    rng = random.Random(1)
    blob = bytearray(3 << 20)
    for i in range(0, len(blob), 4096):
        if rng.random() < 0.5:
            blob[i : i + 4096] = bytes([rng.randrange(4)]) * 2048 + rng.randbytes(2048)
    raw.write_bytes(bytes(blob))
    path = tmp_path / "c.qcow2"
    opts = ["-o", "compression_type=zstd"] if zstd else []
    qemu_img("convert", "-c", "-O", "qcow2", *opts, raw, path)
    got = compare(hosted, path.read_bytes())
    assert got is not None and got.reads[0] == bytes(blob[:MiB])


@needs_qemu
@pytest.mark.parametrize(
    "base_size", [2 << 20, 5 << 20, 1_000_001], ids=["shorter", "longer", "odd"]
)
def test_qemu_backing_chain(hosted: Hosted, tmp_path: Path, base_size: int) -> None:
    (tmp_path / "base.raw").write_bytes(bytes([0x21]) * base_size)
    mid = _make(tmp_path, "mid.qcow2", "3M", "backing_file=base.raw", "backing_fmt=raw")
    qemu_io(mid, ["write -P 0x31 64k 64k", "write -z 1M 64k", "write -c -P 0x32 2M 64k"])
    top = _make(
        tmp_path,
        "top.qcow2",
        "4M",
        "backing_file=mid.qcow2",
        "backing_fmt=qcow2",
        "cluster_size=4k",
    )
    qemu_io(
        top,
        [
            "write -P 0x41 60k 8k",
            "discard 1M 64k",
            "write -P 0x42 3M 4k",
            "write -c -P 0x43 3100k 4k",
        ],
    )
    files = _files(tmp_path)
    assert compare(hosted, files["top.qcow2"], files) is not None
    assert compare(hosted, files["mid.qcow2"], files) is not None


@needs_qemu
@pytest.mark.parametrize("raw_bit", [False, True], ids=["data-file", "data-file-raw"])
def test_qemu_data_file(
    hosted: Hosted, tmp_path: Path, raw_bit: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    opts = ["data_file=a.data"] + (["data_file_raw=on"] if raw_bit else [])
    path = _make(tmp_path, "a.qcow2", "3M", *opts)
    qemu_io(
        path, ["write -P 0x61 0 1M", "write -z 64k 64k", "discard 256k 64k", "write -P 0x62 2M 512"]
    )
    files = _files(tmp_path)
    got = compare(hosted, files["a.qcow2"], files)
    assert got is not None and got.error is None
    # the data file cut short: clusters past its end
    files["a.data"] = files["a.data"][: 1 << 19]
    compare(hosted, files["a.qcow2"], files)


@needs_qemu
def test_qemu_snapshots_and_extended_subclusters_over_backing(
    hosted: Hosted, tmp_path: Path
) -> None:
    path = _make(tmp_path, "s.qcow2", "3M")
    qemu_io(path, ["write -P 0x71 0 1M"])
    qemu_img("snapshot", "-c", "one", path)
    qemu_io(path, ["write -P 0x72 512k 1M", "discard 0 64k"])
    base = _make(tmp_path, "base.qcow2", "3M", "cluster_size=4k")
    qemu_io(base, ["write -P 0x66 0 3M"])
    top = _make(
        tmp_path,
        "top.qcow2",
        "3M",
        "extended_l2=on",
        "backing_file=base.qcow2",
        "backing_fmt=qcow2",
    )
    qemu_io(
        top,
        ["write -P 0x01 2k 2k", "write -z 20k 2k", "write -z 128k 64k", "write -c -P 0x04 2M 64k"],
    )
    files = _files(tmp_path)
    for name in ("s.qcow2", "top.qcow2"):
        got = compare(hosted, files[name], files)
        assert got is not None and got.error is None


@cache
def _qemu_bases() -> tuple[tuple[bytes, dict[str, bytes]], ...]:
    """Small qemu-made images for the mutation test, made once."""
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "base.raw").write_bytes(bytes([0x21]) * 300_000)
        for name, opts, cmds in [
            (
                "a.qcow2",
                ("cluster_size=4k",),
                ["write -P 0x11 0 20k", "write -c -P 0x22 64k 8k", "write -z 100k 4k"],
            ),
            (
                "b.qcow2",
                ("cluster_size=16k", "extended_l2=on", "backing_file=base.raw", "backing_fmt=raw"),
                ["write -P 0x33 2k 4k", "write -z 40k 1k", "write -c -P 0x44 64k 16k"],
            ),
            (
                "c.qcow2",
                ("cluster_size=4k", "compression_type=zstd", "compat=1.1"),
                ["write -c -P 0x55 0 8k", "write -P 0x66 12k 4k"],
            ),
            (
                "d.qcow2",
                ("cluster_size=512", "compat=0.10"),
                ["write -P 0x77 0 4k", "write -c -P 0x88 8k 1k"],
            ),
        ]:
            path = _make(d, name, "256k", *opts)
            qemu_io(path, cmds)
        files = _files(d)
        for name in ("a.qcow2", "b.qcow2", "c.qcow2", "d.qcow2"):
            out.append((files[name], files))
    return tuple(out)


def _mutate_anywhere(base: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(base)
    for pos, value, width in edits:
        pos %= len(data)
        data[pos : pos + width] = bytes([value]) * width
    return bytes(data[: len(base)])


@pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None, reason="qemu-img/qemu-io not installed")
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 3),
    st.lists(
        st.tuples(st.integers(0, 1 << 20), st.integers(0, 255), st.sampled_from([1, 1, 2, 8])),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 1 << 20),
)
def test_mutated_qemu_images(
    hosted: Hosted, which: int, edits: list[tuple[int, int, int]], cut: int
) -> None:
    data, files = _qemu_bases()[which]
    mutated = _mutate_anywhere(data, edits)
    if cut % 4 == 0:
        mutated = mutated[: cut % len(mutated)]
    compare(hosted, mutated, files)


def test_the_heap_holds_the_largest_cluster_and_zstd_window(hosted: Hosted) -> None:
    """2 MiB clusters, zstd with the largest window Python accepts (8 MiB): the open
    image's tables, the cluster and zstd's window fit the guest's 32 MiB with room."""
    cb, cs = 21, 1 << 21
    params = zstandard.ZstdCompressionParameters(window_log=23)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = stream.compress(PATTERN * (cs // CS)) + stream.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 8 * MiB
    first = header(cluster_bits=cb, size=4 * cs, l1_offset=2 * cs, refcount_offset=cs, **ZSTD)  # type: ignore[arg-type]
    l1, l2 = bytearray(cs), bytearray(cs)
    struct.pack_into(">Q", l1, 0, (3 * cs) | (1 << 63))
    sectors = -(-len(frame) // 512) - 1
    struct.pack_into(">Q", l2, 0, (1 << 62) | (sectors << (62 - (cb - 8))) | (4 * cs))
    got = compare(
        hosted,
        first + bytes(cs) + bytes(l1) + bytes(l2) + frame,
        reads=lambda vs: [(0, cs), (5, 100)],
    )
    assert got is not None and got.reads[0] == PATTERN * (cs // CS)
    assert hosted.heap_peak < 24 * MiB


# -- through the VMM -----------------------------------------------------------------------


def _python_disk(data: bytes, files: dict[str, bytes]) -> VirtualDisk:
    return decoder.open_disk(MemFile(data, NAME), ChainResolver(files))


def test_the_guest_in_its_vm_reads_as_python(hosted: Hosted) -> None:
    """The shipped guest.elf, in a micro-VM, under the VMM's reader: the named cases and
    their mutations read as Python reads them (the error records, the names the guest
    opens, the slots) -- where KVM runs and the reader is built."""
    if hosted.tiny_tables:
        pytest.skip("the shipped guest has the guest's budgets")
    from aiodd.guest.kvm import availability

    available, why = availability()
    if not available:
        pytest.skip(f"KVM guest reader unavailable: {why}")
    module: Any = pytest.importorskip("aiodd.guest.kvm.reader")
    reader = module.KvmReader(NAME)
    rng = random.Random(3)
    cases = [(data, files) for _, data, files in NAMED]
    for _ in range(200):
        _, data, files = NAMED[rng.randrange(len(NAMED))]
        edits = [(rng.randrange(8 * CS), rng.randrange(256)) for _ in range(rng.randrange(1, 7))]
        cases.append((_mutate(data, edits), files))
    try:
        for data, files in cases:
            expected = python_outcome(partial(_python_disk, data, files), plan)
            assert vm_outcome(reader, data, ChainResolver(files), "qcow2", NAME, plan) == expected
    finally:
        reader.close()


# -- batching -------------------------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize(
    ("opts", "cmds", "per_command"),
    [
        ((), ["write -P 0x11 0 16M"], 2),
        # an L2 table of 4 KiB clusters maps 2 MiB: one more doorbell each
        (("cluster_size=4k",), ["write -P 0x11 0 16M"], 3),
        ((), ["write -c -P 0x11 0 16M"], 3),
    ],
    ids=["64k", "4k", "compressed"],
)
def test_doorbells_per_command(
    hosted: Hosted, tmp_path: Path, opts: tuple[str, ...], cmds: list[str], per_command: int
) -> None:
    """A 4 MiB command costs a handful of doorbells, never one per cluster."""
    if hosted.tiny_tables:
        pytest.skip("a one-slot cache reloads tables by design")
    path = _make(tmp_path, "p.qcow2", "16M", *opts)
    qemu_io(path, cmds)
    rung = command_doorbells(hosted, path.read_bytes(), b"\x11")
    assert rung <= per_command * len(COMMANDS) + 1, rung


def test_raw_reads_are_the_file(hosted: Hosted) -> None:
    data = bytes(range(256)) * 10 + b"tail"
    got = hosted.outcome(
        data, ChainResolver({}), lambda vs: [(0, vs), (2000, 1000), (vs, 10)], fmt=1
    )
    assert got.virtual_size == 3072
    assert got.reads == (
        data + bytes(3072 - len(data)),
        data[2000:] + bytes(3000 - len(data)),
        bytes(10),
    )
