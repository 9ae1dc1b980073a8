"""The KVM guest's C vmdk decoder against its Python twin (docs/kvm.md, "Testing the
decoders").

Every image is read by both decoders, as tests/test_kvm_decoder.py reads qcow2: the
same bytes, or the same error -- class and text -- for the open and for each read.  The
images: every subformat qemu-img writes (monolithicSparse, streamOptimized,
monolithicFlat, twoGbMaxExtentSparse/Flat, the header options, parent chains), the
hand-built ones of tests/test_decode_vmdk.py (VMware's streamOptimized with a footer,
COWD, odd descriptors), descriptors and headers made to reach each message, the vmdk
cases of the hostile corpus (tests/hostile.py), and random mutations of all of them.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodd.errors import PolicyError
from aiodd.formats.base import RandomAccessFile, Reference
from aiodd.formats.registry import detect
from aiodd.formats.vmdk import decode as decoder
from aiodd.formats.vmdk import layout as L
from tests import hostile
from tests.conftest import needs_qemu, qemu_img, qemu_io
from tests.differential import agree
from tests.fuzz.hosted import (
    FMT_VMDK,
    ChainResolver,
    Hosted,
    MemFile,
    Outcome,
    python_outcome,
)
from tests.test_decode_vmdk import (
    build_cowd,
    build_stream_optimized,
    descriptor,
    pattern,
    sparse_header,
)

KiB = 1 << 10
MiB = 1 << 20
# Examples per mutation test; AIODD_DIFF_EXAMPLES=N for a longer search.
EXAMPLES = int(os.environ.get("AIODD_DIFF_EXAMPLES", "200"))
NAME = "t.vmdk"


def plan(virtual_size: int, seed: int = 0) -> list[tuple[int, int]]:
    """The reads of one image: the start in 1 MiB commands, the end, odd ranges across
    grains and tables, and past the end."""
    reads = [
        (start, min(MiB, virtual_size - start))
        for start in range(0, min(virtual_size, 4 * MiB), MiB)
    ]
    if virtual_size > 4 * MiB:
        reads.append((virtual_size - MiB, MiB))
    rng = random.Random(seed)
    for _ in range(5):
        start = rng.randrange(max(virtual_size, 1))
        reads.append((start, rng.choice([1, 511, 4097, 65537, 300000])))
    reads.append((max(virtual_size - 50, 0), 100))
    reads.append((virtual_size + 12345, 10))
    return reads


Reads = Callable[[int], Sequence[tuple[int, int]]]


def compare(
    hosted: Hosted,
    data: bytes,
    files: dict[str, bytes] | None = None,
    *,
    name: str = NAME,
    reads: Reads = plan,
    resolver: ChainResolver | None = None,
) -> Outcome:
    """Both decoders over ``data`` (named ``name``); they must agree."""
    res = resolver if resolver is not None else ChainResolver(files or {})
    expected = python_outcome(lambda: decoder.open_disk(MemFile(data, name), res), reads)
    got = hosted.outcome(data, res, reads, name=name, fmt=FMT_VMDK)
    agree(got, expected, reads)
    return got


def _ok(got: Outcome) -> None:
    assert got.error is None
    assert all(isinstance(r, bytes) for r in got.reads), got.reads


# -- hand-built images --------------------------------------------------------------------


def _sparse(
    data: bytes,
    *,
    grain_sectors: int = 8,
    per_gt: int = 16,
    zero_grains: Sequence[int] = (),
    desc: bytes | None = None,
    **header: int,
) -> bytes:
    """A small monolithicSparse file holding ``data`` (zero grains unallocated), its GD
    and GTs after the descriptor; ``header`` overrides fields of its header."""
    grain = grain_sectors * 512
    capacity = -(-len(data) // 512)
    ngrains = -(-capacity // grain_sectors)
    gtes = per_gt
    ngts = -(-ngrains // gtes)
    text = desc if desc is not None else descriptor("monolithicSparse", 'RW 1 SPARSE "t.vmdk"')
    out = bytearray(512) + text.ljust(20 * 512, b"\0")
    gd_sector = len(out) // 512
    gd_bytes = -(-ngts * 4 // 512) * 512
    out += bytes(gd_bytes)
    gt_bytes = -(-gtes * 4 // 512) * 512
    gt_sectors = []
    for _ in range(ngts):
        gt_sectors.append(len(out) // 512)
        out += bytes(gt_bytes)
    struct.pack_into(f"<{ngts}I", out, gd_sector * 512, *gt_sectors)
    grain_offset = len(out) // 512
    for g in range(ngrains):
        chunk = data[g * grain : (g + 1) * grain]
        entry = 0
        if g in zero_grains:
            entry = 1
        elif chunk.strip(b"\0"):
            entry = len(out) // 512
            out += chunk.ljust(grain, b"\0")
        struct.pack_into("<I", out, gt_sectors[g // gtes] * 512 + 4 * (g % gtes), entry)
    fields = {
        "capacity": capacity,
        "granularity": grain_sectors,
        "gtes": gtes,
        "gd": gd_sector,
        "grain_offset": grain_offset,
        "flags": 3 | (L.FLAG_ZERO_GRAIN if zero_grains else 0),
    }
    fields.update(header)
    out[:512] = sparse_header(**fields)
    return bytes(out)


def _stream(data: bytes, payloads: dict[int, bytes], grain: int = 64 * KiB) -> bytes:
    return hostile.stream_optimized(data, grain, payloads)


DATA = pattern(200 * KiB, seed=4)
GRAIN = 64 * KiB


def _desc(create_type: str, lines: str, extra: str = "", cid: str = "1234abcd") -> bytes:
    return descriptor(create_type, lines, cid=cid, extra=extra)


def _with_parent(child: bytes, parent_cid: str, hint: str) -> bytes:
    """``child`` (a descriptor or sparse file) naming ``hint`` as its parent."""
    out = bytearray(child)
    at = out.find(b"parentCID=ffffffff\n")
    assert at >= 0
    new = f'parentCID={parent_cid}\nparentFileNameHint="{hint}"\n'.encode()
    out[at : at + 19] = new
    if out[:4] == b"KDMV":  # keep the header's offsets: cut as much from the padding
        end = out.index(b"\0", at)
        del out[end : end + len(new) - 19]
    return bytes(out)


def _named_cases() -> Iterator[tuple[str, bytes, dict[str, bytes]]]:
    data = DATA
    flat = {"f.bin": data}
    yield "sparse", _sparse(data), {}
    yield "sparse one gte per table", _sparse(data, per_gt=1), {}
    yield "sparse odd gtes", _sparse(data, per_gt=3, grain_sectors=1), {}
    yield "sparse zeroed grains", _sparse(data, zero_grains=(1, 5)), {}
    yield "sparse zeroed grain flag clear", _sparse(data, zero_grains=(1,), flags=3), {}
    yield "stream footer", build_stream_optimized(data), {}
    yield "stream small grains", build_stream_optimized(data, grain=4096, gtes=4), {}
    yield "cowd", build_cowd(data), {}
    yield (
        "vmfsSparse cowd extent",
        _desc("vmfsSparse", 'RW 1 VMFSSPARSE "delta.vmdk"'),
        {"delta.vmdk": build_cowd(data, granularity=16)},
    )
    yield "monolithicFlat", _desc("monolithicFlat", 'RW 400 FLAT "f.bin" 0'), flat
    yield (
        "odd extents",
        _desc(
            "twoGbMaxExtentFlat",
            'RW 100 FLAT "f.bin" 0\nRW 2048 ZERO\nRDONLY 8 FLAT "f.bin" 0\n'
            'RW 50 FLAT "f.bin" 30\nRW 8 VMFS "f.bin"\nRW 100 SPARSE "s.vmdk"\n'
            'RW 7 VMFSSPARSE "c.vmdk"\n',
        ),
        {"f.bin": data, "s.vmdk": _sparse(data[: 100 * KiB]), "c.vmdk": build_cowd(data)},
    )
    yield (
        "blank lines scan the next line",
        _desc("monolithicFlat", '\n\n   \nRW 4 FLAT "f.bin" 1\n'),
        flat,
    )
    yield "across a line end", _desc("monolithicFlat", 'RW\n9 VMFS "f.bin"'), flat
    yield (
        "embedded descriptor",
        sparse_header(capacity=0, desc_offset=1) + _desc("monolithicFlat", 'RW 200 FLAT "f.bin" 4'),
        flat,
    )
    yield "embedded descriptor past end", sparse_header(capacity=0, desc_offset=1 << 60), {}
    yield "embedded descriptor max", sparse_header(capacity=0, desc_offset=(1 << 64) - 1), {}
    yield (
        "nested descriptor",
        _desc("twoGbMaxExtentSparse", 'RW 8 SPARSE "n.vmdk"'),
        {"n.vmdk": sparse_header(capacity=0, desc_offset=1) + _desc("monolithicFlat", "")},
    )
    yield "no createType", b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=2\n", {}
    yield "createType no value", b'CID=1\nparentCID=2\ncreateType="', {}
    yield "createType unquoted", b"CID=1\nparentCID=2\ncreateType=" + b"x" * 300, {}
    yield "createType unsupported", _desc("monolithicSparse", ""), {}
    yield "createType latin-1", _desc("caf\xe9\x1b[1m", "").replace(b"\xc3\xa9", b"\xe9"), {}
    yield "sesparse", _desc("seSparse", 'RW 8 SESPARSE "s.vmdk"'), {"s.vmdk": bytes(4096)}
    yield (
        "sesparse after an extent",
        _desc("seSparse", 'RW 8 FLAT "f.bin" 0\nRW 8 SESPARSE "s.vmdk"'),
        flat,
    )
    for i, line in enumerate(
        [
            b'RW 100 FLAT "a.img"',
            b'RW 100 FLAT "a.img" -1',
            b'RW 1 VMFS "a" 5',
            b'RW 1 SPARSE "a" 0',
            b'RW 1 FOO "a" 0',
            b'RW 1 FLAT "it\'s"',
            b'RW 1 FLAT "it\'s" "',
            b'RW 1 FLAT "\\x\t\x7f\xa0\xad\xe9\xff\x01"',
            b'RW 5 FLAT "' + b"\xe9" * 300 + b'"',
            b"RW 5 FLAT \"'" + b"'" * 300 + b'"',
        ]
    ):
        text = b'CID=1\nparentCID=ffffffff\ncreateType="vmfs"\n' + line + b"\r\n"
        yield f"invalid line {i}", text, {}
    blank = b'CID=1\nparentCID=1\ncreateType="vmfs"\n\t  \nRW 1 VMFS "a" 5\n'
    yield "invalid line after a blank one", blank, {}
    yield "no parentCID", b'CID=1\ncreateType="vmfs"\n', {}
    yield "too many extents", _desc("vmfs", 'RW 1 FLAT "f.bin" 0\n' * 4097), flat
    yield "many extents", _desc("vmfs", 'RW 1 FLAT "f.bin" 0\n' * 4096), flat
    yield (
        "huge numbers",
        _desc("vmfs", 'RW 99999999999999999999999 FLAT "f.bin" -0\nRW +5 FLAT "f.bin" +2'),
        flat,
    )
    yield "extent size huge", _desc("vmfs", 'RW 9223372036854775807 FLAT "f.bin" 0'), flat
    yield "extent offset huge", _desc("vmfs", 'RW 128 FLAT "f.bin" 9223372036854775807'), flat
    yield "flat too short", _desc("monolithicFlat", 'RW 4 FLAT "f.img" 2'), {"f.img": bytes(3000)}
    yield "extent refused", _desc("monolithicFlat", 'RW 4 FLAT "missing" 0'), {}
    odd_name = _desc("vmfs", 'RW 4 FLAT "f?.bin" 0').replace(b"f?", b"f\xff")
    yield "extent non-utf8 name", odd_name, {"f\udcff.bin": data}
    yield "sparse extent not vmdk", _desc("vmfs", 'RW 4 SPARSE "f.bin"'), flat
    yield "sparse extent tiny", _desc("vmfs", 'RW 4 SPARSE "t"'), {"t": b"KDM"}
    yield (
        "virtual size too large",
        _desc("vmfs", 'RW 9223372036854775807 VMFSSPARSE "c.vmdk"\n' * 2),
        {"c.vmdk": build_cowd(data)},
    )
    huge = _sparse(bytes(512), capacity=1 << 53, granularity=1 << 21, gtes=512)
    huge += bytes(21 * 512 + (32 << 20) - len(huge))
    yield "virtual size past 2^63", _desc("vmfs", 'RW 1 SPARSE "h.vmdk"\n' * 3), {"h.vmdk": huge}
    yield (
        "sparse extents too large together",
        _desc("vmfs", 'RW 1 SPARSE "s.vmdk"\n' * 3),
        {"s.vmdk": _sparse(bytes(512), capacity=1 << 53)},
    )
    yield "no CID", _desc("vmfs", 'RW 4 FLAT "f.bin" 0').replace(b"CID", b"CIX"), flat
    for i, cid in enumerate(["0x1f", "0xg", "-5", "+ff", "ffffffffffffffffffff1", " \t7", "zz"]):
        ids = f'CID={cid}\nparentCID={cid}\ncreateType="vmfs"\nRW 4 FLAT "f.bin" 0\n'
        yield f"cid {i}", ids.encode(), flat
    yield "CID in parentCID", b'parentCID=12\nCID=34\ncreateType="vmfs"\n', {}
    yield "CID at the end", b'createType="vmfs"\nparentCID=1\nCID', {}
    yield (
        "hint unquoted",
        _desc("vmfs", "", extra='parentFileNameHint="open'),
        {},
    )
    yield "hint long", _desc("vmfs", "", extra='parentFileNameHint="' + "a" * 4096 + '"'), {}
    yield "hint empty", _desc("vmfs", "", extra='parentFileNameHint=""\n'), {}
    yield "hint at the end", b'CID=1 parentCID=2 createType="vmfs" parentFileNameHint', {}
    yield "hint refused", _desc("vmfs", "", extra='parentFileNameHint="nope.vmdk"\n'), {}
    # corrupt sparse headers
    yield "version 4", _sparse(data, version=4), {}
    yield "gtes 513", _sparse(data, gtes=513), {}
    yield "gtes 0", _sparse(data, gtes=0), {}
    yield "granularity 0", _sparse(data, granularity=0), {}
    yield "coverage wraps", _sparse(data, gtes=512, granularity=1 << 23), {}
    yield "granularity huge", _sparse(data, granularity=0x200001), {}
    yield "compressed grains too big", _sparse(data, granularity=0x10000, compress=1), {}
    yield "gd entries huge", _sparse(data, capacity=1 << 40, granularity=1, gtes=4), {}
    yield "grain offset huge", _sparse(data, grain_offset=1 << 60), {}
    yield "gd past end", _sparse(data, gd=1 << 40), {}
    yield "gd offset wraps", _sparse(data, gd=(1 << 64) - 2), {}
    cut = _sparse(data)
    yield "gd cut short", cut[: struct.unpack_from("<Q", cut, 56)[0] * 512 + 6], {}
    yield "capacity max", _sparse(data, capacity=(1 << 64) - 1, granularity=1 << 21), {}
    yield "capacity past gd", _sparse(data, capacity=4 * len(data) // 512), {}
    sparse = bytearray(_sparse(data))
    gd_at = struct.unpack_from("<Q", sparse, 56)[0] * 512
    gt0 = struct.unpack_from("<I", sparse, gd_at)[0]
    struct.pack_into("<I", sparse, gd_at, 0xFFFFFFF0)
    yield "gt past end", bytes(sparse), {}
    struct.pack_into("<I", sparse, gd_at, len(sparse) // 512 - 1)
    yield "gt cut short", bytes(sparse), {}
    struct.pack_into("<I", sparse, gd_at, gt0)
    struct.pack_into("<I", sparse, gt0 * 512 + 4, 0xFFFFFF00)
    yield "grain past end", bytes(sparse), {}
    struct.pack_into("<I", sparse, gt0 * 512 + 4, len(sparse) // 512 - 1)
    yield "grain cut short", bytes(sparse), {}
    cowd = bytearray(build_cowd(data))
    yield "cowd granularity 0", bytes(cowd[:16]) + bytes(4) + bytes(cowd[20:]), {}
    struct.pack_into("<I", cowd, 16, 0x200001)
    yield "cowd granularity huge", bytes(cowd), {}
    cowd = bytearray(build_cowd(data))
    struct.pack_into("<I", cowd, 24, 1 << 26)
    yield "cowd gd huge", bytes(cowd), {}
    struct.pack_into("<I", cowd, 24, 1 << 20)
    yield "cowd gd past end", bytes(cowd), {}
    cowd = bytearray(build_cowd(data))
    struct.pack_into("<I", cowd, 12, 70000)  # past the 32768 sectors its one GT maps
    vmfs = _desc("vmfsSparse", 'RW 1 VMFSSPARSE "c.vmdk"')
    yield "cowd capacity past gd", vmfs, {"c.vmdk": bytes(cowd)}
    # streamOptimized: footers and compressed grains
    so = bytearray(build_stream_optimized(data))
    yield "footer garbage", bytes(so[:-1024]) + b"XXXX" + bytes(so[-1020:]), {}
    yield "footer marker", bytes(so[:-1524]) + b"\1" + bytes(so[-1523:]), {}
    yield "footer eos", bytes(so[:-500]) + b"\1" + bytes(so[-499:]), {}
    yield "footer short file", bytes(so[:512]) + bytes(so[-512:]), {}
    yield "footer odd size", bytes(so[:-100]), {}
    grain0 = bytes(range(256)) * (GRAIN // 256)
    base = grain0 + DATA[GRAIN : 3 * GRAIN]
    for label, payload in [
        ("exact", zlib.compress(grain0)),
        ("short", zlib.compress(grain0[:1000])),
        ("long", zlib.compress(grain0 + b"x")),
        ("bomb", zlib.compress(bytes(8 * MiB), 9)),
        ("truncated", zlib.compress(grain0)[:-40]),
        ("no adler", zlib.compress(grain0)[:-4]),
        ("bad adler", zlib.compress(grain0)[:-1] + b"\0"),
        ("trailing", zlib.compress(grain0) + b"\x13" * 700),
        ("garbage", b"\xff" * 600),
        ("raw deflate", zlib.compress(grain0)[2:-4]),
        ("dictionary", b"\x78\xbb" + b"\0\0\0\1" + b"\x03\x00"),
        ("empty stored", zlib.compress(b"")),
        ("bad distance", _far_back(grain0)),
    ]:
        yield f"deflate {label}", _stream(base, {0: payload}), {}
    big = _stream(base, {1: b"\x78\x9c" + b"\0" * (2 * GRAIN + 1)})
    yield "marker size over two grains", big, {}
    so = bytearray(_stream(base, {}))
    footer = len(so) - 1024
    gt_sector = struct.unpack_from("<I", so, struct.unpack_from("<Q", so, footer + 56)[0] * 512)[0]
    first = struct.unpack_from("<I", so, gt_sector * 512)[0] * 512
    for size in (0, 0xFFFFFFFF, 2 * GRAIN):
        struct.pack_into("<I", so, first + 8, size)
        yield f"marker size {size:#x}", bytes(so), {}
    yield "no markers", _no_markers(base), {}
    yield from _batched_grain_cases()
    # parents
    base_img = _sparse(data)
    base_cid = "1234abcd"
    child = _with_parent(_sparse(DATA[:GRAIN] + bytes(2 * GRAIN)), base_cid, "b.vmdk")
    yield "parent", child, {"b.vmdk": base_img}
    mismatch = _with_parent(_sparse(DATA[:GRAIN] + bytes(GRAIN)), "1", "b.vmdk")
    yield "parent cid mismatch", mismatch, {"b.vmdk": base_img}
    flat_child = _with_parent(
        _desc("twoGbMaxExtentSparse", 'RW 64 SPARSE "s.vmdk"\nRW 300 SPARSE "e.vmdk"'),
        base_cid,
        "b.vmdk",
    )
    yield (
        "parent behind later extents",
        flat_child,
        {
            "b.vmdk": base_img,
            "s.vmdk": _sparse(bytes(32 * KiB)),
            "e.vmdk": _sparse(DATA[:GRAIN] + bytes(200 * KiB)),
        },
    )
    yield "parent corrupt", child, {"b.vmdk": base_img[:600]}
    yield "parent not vmdk", child, {"b.vmdk": b"just bytes" * 100}
    looped = _with_parent(_sparse(bytes(GRAIN)), base_cid, "t.vmdk")
    yield "parent loop", looped, {"t.vmdk": looped}


def _far_back(data: bytes) -> bytes:
    """A zlib stream that refers to a preset dictionary it does not declare: its first
    match reaches back before the start."""
    c = zlib.compressobj(9, zlib.DEFLATED, 15, zdict=data[:4096])
    stream = c.compress(data) + c.flush()
    return b"\x78\x9c" + stream[6:]


def _no_markers(data: bytes) -> bytes:
    """A compressed sparse file without grain markers: each grain's zlib stream at its
    sector, read as one grain's worth of bytes."""
    grain_sectors = GRAIN // 512
    capacity = -(-len(data) // 512)
    ngrains = -(-capacity // grain_sectors)
    text = descriptor("streamOptimized", 'RW 1 SPARSE "t.vmdk"').ljust(20 * 512, b"\0")
    out = bytearray(512) + text
    gd = len(out) // 512
    out += bytes(512)
    gt = len(out) // 512
    out += bytes(2048)
    struct.pack_into("<I", out, gd * 512, gt)
    grain_offset = len(out) // 512
    for g in range(ngrains):
        z = zlib.compress(data[g * GRAIN : (g + 1) * GRAIN])
        struct.pack_into("<I", out, gt * 512 + 4 * g, len(out) // 512)
        out += z.ljust(-(-len(z) // 512) * 512, b"\0")
    out[:512] = sparse_header(
        version=3, flags=3 | L.FLAG_COMPRESS, capacity=capacity, granularity=grain_sectors,
        gd=gd, grain_offset=grain_offset, compress=1,
    )  # fmt: skip
    return bytes(out)


def _footer_gd(so: bytes | bytearray) -> int:
    """The file offset of a footer-style streamOptimized file's grain directory."""
    return int(struct.unpack_from("<Q", so, len(so) - 1024 + 56)[0]) * 512


def _batched_grain_cases() -> Iterator[tuple[str, bytes, dict[str, bytes]]]:
    """The guest reads and inflates a command's grains in a batch: whatever fails after a
    grain in Python's order (a later grain, a grain table, the parent) must still come
    after that grain's own error."""
    three = DATA[GRAIN : 3 * GRAIN] + DATA[GRAIN : 2 * GRAIN]
    so = bytearray(_stream(three, {0: b"\xff" * 600}))
    gt = struct.unpack_from("<I", so, _footer_gd(so))[0] * 512
    struct.pack_into("<I", so, gt + 8, 0xFFFFFF00)
    yield "corrupt grain then a grain past the end", bytes(so), {}
    so = bytearray(_stream(three, {}))
    gt = struct.unpack_from("<I", so, _footer_gd(so))[0] * 512
    struct.pack_into("<I", so, struct.unpack_from("<I", so, gt)[0] * 512 + 8, 0)
    struct.pack_into("<I", so, gt + 8, 0xFFFFFF00)
    yield "bad marker then a grain past the end", bytes(so), {}
    # four 4 KiB grains per table: a command crosses tables
    small = bytearray(build_stream_optimized(DATA[GRAIN : GRAIN + 40 * KiB], grain=4096, gtes=4))
    gd = _footer_gd(bytes(small))
    first = struct.unpack_from("<I", small, struct.unpack_from("<I", small, gd)[0] * 512)[0]
    small[first * 512 + 12 : first * 512 + 20] = b"\xff" * 8
    struct.pack_into("<I", small, gd + 4, 0xFFFFFF00)
    yield "corrupt grain then a grain table past the end", bytes(small), {}
    # a grain between two that the parent holds
    holes = DATA[GRAIN : 2 * GRAIN] + bytes(GRAIN) + DATA[GRAIN : 2 * GRAIN]
    base_img = _sparse(DATA)
    over = _with_parent(build_stream_optimized(holes), "1234abcd", "b.vmdk")
    yield "stream over a parent", over, {"b.vmdk": base_img}
    bad = bytearray(build_stream_optimized(holes))
    gt = struct.unpack_from("<I", bad, _footer_gd(bytes(bad)))[0] * 512
    first = struct.unpack_from("<I", bad, gt)[0]
    bad[first * 512 + 12 : first * 512 + 20] = b"\xff" * 8
    corrupt = _with_parent(bytes(bad), "1", "b.vmdk")
    yield "corrupt grain then a parent cid mismatch", corrupt, {"b.vmdk": base_img}


NAMED = list(_named_cases())


@pytest.mark.parametrize(("data", "files"), [c[1:] for c in NAMED], ids=[c[0] for c in NAMED])
def test_named_cases(hosted: Hosted, data: bytes, files: dict[str, bytes]) -> None:
    compare(hosted, data, files)


def test_the_cases_reach_their_messages(hosted: Hosted) -> None:
    """Every message of the decoder is among the named cases' outcomes (a case that no
    longer reaches its check would compare nothing)."""
    seen = []
    for _, data, files in NAMED:
        got = compare(hosted, data, files, reads=lambda vs: [(0, min(vs, 300 * KiB)), (0, vs)])
        seen += [got.error] if got.error else [r for r in got.reads if isinstance(r, tuple)]
    text = "\n".join(message for _, message in seen)
    needles = [
        "version 4 is not supported",
        "grain table size 513",
        "grain table coverage is invalid",
        "grain size of 2097153 sectors",
        "compressed grains of 65536 sectors are not supported",
        "grain directory of 274877906944 entries",
        "the header expects at least 590295810358705651712 bytes",
        "grain directory at 0x1fffffffffffffffc00 lies past",
        "cut short by the end of the file",
        "does not cover offset",
        "grain table at 0x1ffffffe000 lies past",
        "grain at 0x1fffffe0000 lies past",
        "COWD grain size of 0",
        "COWD grain size of 2097153",
        "COWD grain directory of 67108864 entries",
        "footer (1024 bytes before the end of the file) is invalid",
        "too small to hold a footer",
        "inflates to more than one grain",
        "is truncated",
        "is corrupt (Error -3 while decompressing data: incorrect header check)",
        "is corrupt (Error 2 while decompressing data)",
        "invalid distance too far back",
        "short of the",
        "has an invalid size (0)",
        "it has no createType",
        "createType has no value",
        "createType is not a quoted value",
        "image type 'monolithicSparse' is not supported",
        "image type 'café",
        "SESPARSE extents are not supported",
        "line 4 is an invalid extent line: 'RW 1 SPARSE \"a\" 0\\r'",
        "line 4 is an invalid extent line: 'RW 1 FLAT \"it\\'s\"\\r'",
        r"""'RW 1 FLAT "\\x\t\x7f\xa0\xadéÿ\x01"\r'""",
        "éé...'",
        "line 4 is an invalid extent line: '\\t  '",
        "names more than 4096 extents",
        "needs 4722366482869645213184 bytes",
        "extent is not in VMDK format",
        "file is too small to be an image",
        "nested descriptors",
        "virtual size is too large",
        "has no readable CID",
        "has no readable parentCID",
        "parentFileNameHint is not a quoted value",
        "parentFileNameHint is longer than 4095 bytes",
        "parentCID 00000001 does not match the CID (1234abcd) of parent 'b.vmdk'",
        "is refused",
    ]
    missing = [needle for needle in needles if needle not in text]
    assert not missing


# -- batching -----------------------------------------------------------------------------


def _half_random(size: int) -> bytes:
    """Grains of half random bytes, half zeros: about 2:1 under deflate."""
    rng = random.Random(11)
    return b"".join(rng.randbytes(32 * KiB) + bytes(32 * KiB) for _ in range(size // GRAIN))


@needs_qemu
@pytest.mark.parametrize("source", ["half random", "random", "pattern"])
def test_stream_doorbells_per_command(hosted: Hosted, tmp_path: Path, source: str) -> None:
    """A 4 MiB command of a streamOptimized image reads its compressed grains in spans
    of IN, never a doorbell per grain (64 of them here)."""
    if hosted.tiny_tables:
        pytest.skip("a one-slot cache reloads the directory and a table per grain by design")
    size = 16 * MiB
    raw = tmp_path / "src.raw"
    if source == "half random":
        raw.write_bytes(_half_random(size))
    elif source == "random":
        raw.write_bytes(random.Random(5).randbytes(size))
    else:
        raw.write_bytes(pattern(size, seed=5))
    image = tmp_path / "so.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, image)
    data = image.read_bytes()
    hosted.outcome(data, ChainResolver({}), lambda vs: [], name="so.vmdk", fmt=FMT_VMDK)
    opened = hosted.doorbells
    commands = [(start, 4 * MiB) for start in range(0, size, 4 * MiB)]
    got = hosted.outcome(data, ChainResolver({}), lambda vs: commands, name="so.vmdk", fmt=FMT_VMDK)
    assert b"".join(r for r in got.reads if isinstance(r, bytes)) == raw.read_bytes()
    # a span per 4 MiB of compressed bytes (two for random data), a grain table per 32 MiB
    per_command = 3
    assert hosted.doorbells - opened <= per_command * len(commands) + 1, hosted.doorbells - opened


# -- images qemu made ---------------------------------------------------------------------


def _files(tmp: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()}


SUBFORMATS = [
    "monolithicSparse",
    "streamOptimized",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
]
SIZE = 2 * MiB + 64 * KiB + 1024  # a partial last grain


@needs_qemu
@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_subformats(hosted: Hosted, tmp_path: Path, subformat: str) -> None:
    image = tmp_path / "img.vmdk"
    if subformat == "streamOptimized":
        raw = tmp_path / "src.raw"
        raw.write_bytes(pattern(SIZE, seed=5))
        qemu_img("convert", "-O", "vmdk", "-o", f"subformat={subformat}", raw, image)
        raw.unlink()
    else:
        qemu_img("create", "-f", "vmdk", "-o", f"subformat={subformat}", image, str(SIZE))
        qemu_io(
            image,
            [f"write -P 0xee {SIZE - 1536} 1536", "write -P 0xcd 1M 300k",
             "write -P 0x11 70000 3000", "write -P 0xab 0 64k", "write -z 1100k 64k"],
            "vmdk",
        )  # fmt: skip
    files = _files(tmp_path)
    _ok(compare(hosted, files["img.vmdk"], files, name="img.vmdk"))


@needs_qemu
@pytest.mark.parametrize("options", ["compat6=on", "hwversion=6", "zeroed_grain=on"])
def test_qemu_header_options_over_a_parent(hosted: Hosted, tmp_path: Path, options: str) -> None:
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "1M")
    qemu_io(base, ["write -P 0x55 0 1M"], "vmdk")
    image = tmp_path / "img.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", options, "-b", "base.vmdk", "-F", "vmdk", image)
    qemu_io(image, ["write -P 0x66 64k 64k", "write -z 192k 128k", "write -P 0x77 900k 1k"])
    files = _files(tmp_path)
    _ok(compare(hosted, files["img.vmdk"], files, name="img.vmdk"))


@needs_qemu
def test_qemu_chain(hosted: Hosted, tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "2M")
    qemu_io(base, ["write -P 0xa1 0 2M"], "vmdk")
    mid = tmp_path / "mid.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "-b", "base.vmdk",
             "-F", "vmdk", mid)  # fmt: skip
    qemu_io(mid, ["write -P 0xb2 100k 200k"], "vmdk")
    top = tmp_path / "top.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "mid.vmdk", "-F", "vmdk", top, "3M")
    qemu_io(top, ["write -P 0xc3 1000 5000", "write -P 0xd4 2500k 100k"], "vmdk")
    files = _files(tmp_path)
    got = compare(hosted, files["top.vmdk"], files, name="top.vmdk")
    _ok(got)
    assert got.reads[0][100 * KiB : 101 * KiB] == b"\xb2" * KiB
    # a qcow2 over the vmdk chain: the vmdk layers below a qcow2 layer
    from aiodd.formats.qcow2 import decode as qcow2

    q = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "top.vmdk", "-F", "vmdk", q)
    qemu_io(q, ["write -P 0xe5 0 4k"])
    files = _files(tmp_path)
    res = ChainResolver(files)
    expected = python_outcome(lambda: qcow2.open_disk(MemFile(files["q.qcow2"], "q"), res), plan)
    assert hosted.outcome(files["q.qcow2"], res, plan, name="q") == expected


@needs_qemu
def test_qemu_parent_cid_mismatch(hosted: Hosted, tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, "1M")
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    qemu_io(child, ["write -P 1 0 64k"], "vmdk")
    data = bytearray(child.read_bytes())
    at = data.find(b"parentCID=") + len(b"parentCID=")
    width = data.index(b"\n", at) - at
    data[at : at + width] = b"f" * width
    files = _files(tmp_path)
    got = compare(hosted, bytes(data), files, name="child.vmdk")
    assert got.reads[0][: 64 * KiB] == b"\1" * (64 * KiB) or "parentCID" in str(got.reads[0])
    assert any("does not match the CID" in str(r) for r in got.reads)


# -- the hostile corpus -------------------------------------------------------------------


class TreeResolver(ChainResolver):
    """The hostile tree's files as a policy would serve them: names relative to the
    image's directory, regular files inside it only (everything else refused, the same
    way for both decoders)."""

    def __init__(self, img: Path, depth: int = 0) -> None:
        super().__init__({}, depth)
        self.img = img

    def open_file(self, ref: Reference) -> RandomAccessFile:
        path = Path(ref.name) if os.path.isabs(ref.name) else self.img / ref.name
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise PolicyError(ref.referrer, f"{ref.kind} '{ref.name}' is refused") from None
        if not real.is_relative_to(self.img.resolve()) or not real.is_file():
            raise PolicyError(ref.referrer, f"{ref.kind} '{ref.name}' is refused")
        if real.stat().st_size > 64 * MiB:
            raise PolicyError(ref.referrer, f"{ref.kind} '{ref.name}' is too large here")
        return MemFile(real.read_bytes(), ref.name)

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, ChainResolver]:
        if self.depth + 1 >= 64:
            raise PolicyError(ref.referrer, f"{ref.kind} '{ref.name}' is refused: too deep")
        return self.open_file(ref), TreeResolver(self.img, self.depth + 1)


HOSTILE = [
    c for c in [*hostile.CASES, *hostile.TRUNCATED_CASES] if c.fmt == "vmdk" or "vmdk" in c.id
]


@needs_qemu
@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_cases(hosted: Hosted, tmp_path: Path, case: hostile.Case) -> None:
    tree = hostile.make_tree(tmp_path)
    built = case.build(tree)
    data = built.image.read_bytes()
    fmt = case.fmt or detect(data[:65536], built.image.name)
    assert fmt == "vmdk", f"{case.id} is a {fmt} image"
    compare(hosted, data, name=built.image.name, resolver=TreeResolver(built.image.parent))


@needs_qemu
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["vmdk", "vmdk_stream"]), st.integers(0, 1 << 30), st.integers(1, 12))
def test_hostile_bases_with_flipped_bits(hosted: Hosted, name: str, seed: int, flips: int) -> None:
    b = hostile.base(name)
    compare(hosted, hostile.flip_bits(b, seed, flips), reads=_few)


def _few(vs: int) -> list[tuple[int, int]]:
    return [(0, min(vs, 2 * MiB)), (max(vs - 70000, 0), 70001), (vs // 3, 4097)]


# -- mutations ----------------------------------------------------------------------------


@cache
def _qemu_bases() -> tuple[tuple[str, bytes, dict[str, bytes]], ...]:
    """Small qemu-made images for the mutation test, made once."""
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        raw = d / "src.raw"
        raw.write_bytes(pattern(300 * KiB, seed=9))
        qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, d / "so.vmdk")
        raw.unlink()
        qemu_img("create", "-f", "vmdk", d / "base.vmdk", "512k")
        qemu_io(d / "base.vmdk", ["write -P 0x21 0 512k"], "vmdk")
        for name, opts, cmds in [
            ("ms.vmdk", ("subformat=monolithicSparse",), ["write -P 0x11 0 20k"]),
            ("z.vmdk", ("zeroed_grain=on", "backing_file=base.vmdk", "backing_fmt=vmdk"),
             ["write -P 0x33 70k 4k", "write -z 128k 64k"]),
            ("tf.vmdk", ("subformat=twoGbMaxExtentFlat",), ["write -P 0x44 0 4k"]),
            ("ts.vmdk", ("subformat=twoGbMaxExtentSparse",), ["write -P 0x55 1k 4k"]),
        ]:  # fmt: skip
            qemu_img("create", "-f", "vmdk", "-o", ",".join(opts), d / name, "400k")
            qemu_io(d / name, cmds, "vmdk")
        files = _files(d)
        for name in ("so.vmdk", "ms.vmdk", "z.vmdk", "tf.vmdk", "ts.vmdk"):
            out.append((name, files[name], files))
    return tuple(out)


def _mutate_anywhere(base: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(base)
    for pos, value, width in edits:
        pos %= len(data)
        data[pos : pos + width] = bytes([value]) * width
    return bytes(data[: len(base)])


@needs_qemu
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 4),
    st.lists(
        st.tuples(st.integers(0, 1 << 20), st.integers(0, 255), st.sampled_from([1, 1, 2, 8])),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 1 << 20),
    st.booleans(),
)
def test_mutated_qemu_images(
    hosted: Hosted, which: int, edits: list[tuple[int, int, int]], cut: int, head: bool
) -> None:
    name, data, files = _qemu_bases()[which]
    if head:  # the header, the descriptor and the tables: where the checks are
        edits = [(p % 4096, v, w) for p, v, w in edits]
    mutated = _mutate_anywhere(data, edits)
    if cut % 4 == 0:
        mutated = mutated[: cut % len(mutated)]
    compare(hosted, mutated, files, name=name, reads=_few)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(NAMED))),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
    st.integers(0, 1 << 20),
)
def test_mutated_named_cases(
    hosted: Hosted, which: int, edits: list[tuple[int, int]], cut: int
) -> None:
    _, data, files = NAMED[which]
    mutated = bytearray(data)
    for pos, value in edits:
        mutated[pos % len(mutated)] = value
    if cut % 3 == 0:
        mutated = mutated[: cut % (len(mutated) + 1)]
    compare(hosted, bytes(mutated), files, reads=_few)


_TOKENS = st.sampled_from(
    ["RW", "RDONLY", " ", "  ", "\t", "\n", "\r", '"', "FLAT", "SPARSE", "VMFS", "ZERO",
     "VMFSSPARSE", "SESPARSE", "f.bin", "s.vmdk", "0", "1", "-5", "99999999999999999999999",
     "#", "CID=", "parentCID=", "1a", "0x", "createType=", '"vmfs"', "parentFileNameHint=",
     "\xe9", "'", "\\", "\0"]
)  # fmt: skip


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TOKENS, max_size=40), st.booleans())
def test_descriptors_from_tokens(hosted: Hosted, tokens: list[str], prefix: bool) -> None:
    text = "".join(tokens).encode("latin-1")
    if prefix:
        text = b'CID=1\nparentCID=ffffffff\ncreateType="vmfs"\n' + text
    files = {"f.bin": DATA, "s.vmdk": _sparse(DATA[: 20 * KiB])}
    compare(hosted, text, files, reads=_few)
