"""qcow2 input: header parsing (pure), hostile input, and parity with qemu's own view."""

from __future__ import annotations

import contextlib
import random
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodd.chain import open_input
from aiodd.errors import ImageError, PolicyError, UnsupportedImageError
from aiodd.formats.base import RandomAccessFile, Reference, VirtualDisk
from aiodd.formats.qcow2 import decode as decoder
from aiodd.formats.qcow2 import layout
from aiodd.formats.registry import detect
from tests.conftest import needs_qemu, qemu_img, qemu_io, qemu_raw_bytes, run_qemu

# -- an in-memory image builder ------------------------------------------------------

CB = 16
CS = 1 << CB
NAME = "t.qcow2"


class MemFile:
    def __init__(self, data: bytes, name: str = NAME) -> None:
        self._data = bytes(data)
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
    """Serves named in-memory files; refuses everything else as the policy would."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files = files or {}
        self.refs: list[Reference] = []

    def open_file(self, ref: Reference) -> RandomAccessFile:
        self.refs.append(ref)
        if ref.name not in self.files:
            raise PolicyError(ref.referrer, f"{ref.kind} '{ref.name}' is refused")
        return MemFile(self.files[ref.name], ref.name)

    def open_disk(self, ref: Reference) -> VirtualDisk:
        from aiodd.formats.registry import open_disk

        file, resolver = self.open_layer(ref)
        return open_disk(file, resolver, ref.format)

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, MemResolver]:
        return self.open_file(ref), MemResolver(self.files)


def header(
    *,
    version: int = 3,
    cluster_bits: int = CB,
    size: int = 4 * CS,
    l1_size: int | None = None,
    l1_offset: int = 2 * CS,
    refcount_offset: int = CS,
    refcount_clusters: int = 1,
    nb_snapshots: int = 0,
    snapshots_offset: int = 0,
    crypt: int = 0,
    incompatible: int = 0,
    compatible: int = 0,
    autoclear: int = 0,
    refcount_order: int = 4,
    header_length: int | None = None,
    compression_type: int | None = None,
    extensions: Sequence[tuple[int, bytes]] = (),
    backing: bytes | None = None,
    backing_offset: int | None = None,
    backing_size: int | None = None,
) -> bytes:
    """The first cluster of an image, fields overridable one by one."""
    cs = 1 << cluster_bits
    l2_bits = cluster_bits - (4 if incompatible & layout.INCOMPAT_EXTL2 else 3)
    if l1_size is None:
        l1_size = -(-size // (1 << (cluster_bits + l2_bits)))
    if header_length is None:
        header_length = 72 if version == 2 else (112 if compression_type is not None else 104)
    out = bytearray(cs)
    struct.pack_into(
        ">4sIQIIQIIQQIIQ",
        out,
        0,
        b"QFI\xfb",
        version,
        0,
        0,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_offset,
        refcount_offset,
        refcount_clusters,
        nb_snapshots,
        snapshots_offset,
    )
    if version >= 3:
        struct.pack_into(
            ">QQQII", out, 72, incompatible, compatible, autoclear, refcount_order, header_length
        )
        if compression_type is not None:
            out[104] = compression_type
    pos = (header_length + 7) & ~7
    for kind, data in extensions:
        struct.pack_into(">II", out, pos, kind, len(data))
        out[pos + 8 : pos + 8 + len(data)] = data
        pos += 8 + ((len(data) + 7) & ~7)
    pos += 8  # end of extensions
    if backing is not None:
        offset = pos if backing_offset is None else backing_offset
        out[offset : offset + len(backing)] = backing
        struct.pack_into(
            ">QI", out, 8, offset, len(backing) if backing_size is None else backing_size
        )
    return bytes(out)


def image(
    l2: dict[int, int] | None = None,
    data: Sequence[bytes] = (),
    *,
    l1_entry: int | None = None,
    **fields: object,
) -> bytes:
    """A whole 64 KiB-cluster image: header, refcount table, L1, one L2 table, data.

    ``l2`` maps guest cluster index to an L2 entry (for extended L2: to a tuple packed
    as two entries by the caller); ``data`` are the clusters from offset 4 * CS on.
    """
    first = header(**fields)  # type: ignore[arg-type]
    ext = bool(int(fields.get("incompatible", 0)) & layout.INCOMPAT_EXTL2)  # type: ignore[call-overload]
    l1 = bytearray(CS)
    struct.pack_into(">Q", l1, 0, (3 * CS) | (1 << 63) if l1_entry is None else l1_entry)
    table = bytearray(CS)
    for index, entry in (l2 or {}).items():
        if ext:
            struct.pack_into(">QQ", table, 16 * index, entry >> 64, entry & ((1 << 64) - 1))
        else:
            struct.pack_into(">Q", table, 8 * index, entry)
    body = b"".join(d + bytes(-len(d) % CS) for d in data)
    return first + bytes(CS) + bytes(l1) + bytes(table) + body


def read_all(disk: VirtualDisk) -> bytes:
    buf = bytearray(disk.virtual_size)
    disk.read_into(0, memoryview(buf))
    return bytes(buf)


def open_mem(data: bytes, files: dict[str, bytes] | None = None) -> decoder.Qcow2Disk:
    return decoder.open_disk(MemFile(data), MemResolver(files))


def parse(data: bytes, file_size: int = 1 << 30) -> layout.Header:
    return layout.parse_header(data, file_size, NAME)


def message(exc: pytest.ExceptionInfo[ImageError]) -> str:
    return exc.value.detail


# -- probe -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "score"),
    [
        (b"QFI\xfb\0\0\0\x02", 100),
        (b"QFI\xfb\0\0\0\x03", 100),
        (b"QFI\xfb\0\0\0\x04", 100),  # qemu probes any version >= 2, then refuses it
        (b"QFI\xfb\0\0\0\x01", 0),  # qcow version 1: another driver
        (b"QFI\xfb", 0),
        (b"QFI\xfa\0\0\0\x03", 0),
        (b"", 0),
    ],
)
def test_probe(head: bytes, score: int) -> None:
    assert decoder.probe(head) == score


def test_detect_picks_qcow2() -> None:
    assert detect(header()[:2048]) == "qcow2"


# -- header parsing ------------------------------------------------------------------


def test_parse_v3_defaults() -> None:
    h = parse(header(size=10 * CS + 100))
    assert (h.version, h.cluster_size, h.virtual_size) == (3, CS, 10 * CS)  # rounded down
    assert (h.backing_file, h.backing_format, h.data_file, h.compression_type) == (
        None,
        None,
        None,
        0,
    )


def test_parse_v2() -> None:
    h = parse(header(version=2, backing=b"base.raw"))
    assert h.version == 2 and h.backing_file == "base.raw" and h.incompatible == 0


def test_parse_extensions() -> None:
    table = bytes([0, 0]) + b"dirty bit".ljust(46, b"\0")
    h = parse(
        header(
            backing=b"base.qcow2\0junk",
            extensions=[
                (layout.EXT_BACKING_FORMAT, b"qcow2"),
                (layout.EXT_FEATURE_TABLE, table),
                (0x12345678, b"unknown extensions are skipped"),
                (layout.EXT_DATA_FILE, b"img.data"),
            ],
            incompatible=layout.INCOMPAT_DATA_FILE,
        )
    )
    assert (h.backing_file, h.backing_format, h.data_file) == ("base.qcow2", "qcow2", "img.data")


def test_parse_compression_type_zstd() -> None:
    h = parse(header(compression_type=1, incompatible=layout.INCOMPAT_COMPRESSION))
    assert h.compression_type == layout.COMPRESSION_ZSTD
    # header_length 104 has no room for the field: zlib, whatever byte 104 holds.
    data = bytearray(header(compression_type=None))
    data[104] = 1
    assert parse(bytes(data)).compression_type == 0


def test_corrupt_dirty_and_lazy_bits_are_read_anyway() -> None:
    h = parse(header(incompatible=layout.INCOMPAT_CORRUPT | layout.INCOMPAT_DIRTY, compatible=1))
    assert h.incompatible == 3


BAD_HEADERS: list[tuple[str, bytes, str]] = [
    ("short", b"QFI\xfb\0\0\0\x03", "qcow2 header is truncated (the file has 8 bytes)"),
    ("magic", b"QFI\xfc" + header()[4:], "image is not in qcow2 format (no QFI\\xfb magic)"),
    ("cluster_bits 8", header(cluster_bits=8), "qcow2 cluster_bits 8 is out of range (9 to 21)"),
    (
        "cluster_bits 22",
        header()[:20] + struct.pack(">I", 22) + header()[24:],
        "qcow2 cluster_bits 22 is out of range (9 to 21)",
    ),
    (
        "cluster_bits huge",
        header()[:20] + b"\xff\xff\xff\xff" + header()[24:],
        "qcow2 cluster_bits 4294967295 is out of range (9 to 21)",
    ),
    (
        "v3 truncated",
        header()[:100],
        "qcow2 version 3 header is truncated (the file has 100 bytes)",
    ),
    (
        "header_length",
        header(header_length=100),
        "qcow2 header_length 100 is too short (version 3 needs at least 104)",
    ),
    (
        "header_length > cluster",
        header(cluster_bits=9, header_length=1024),
        "qcow2 header_length 1024 exceeds the cluster size",
    ),
    (
        "backing offset",
        header(backing=b"x", backing_offset=CS + 8),
        "qcow2 backing file name offset 0x10008 is outside the header",
    ),
    (
        "backing name",
        header(backing=b"x", backing_size=1024),
        "qcow2 backing file name is too long (1024 bytes)",
    ),
    (
        "compression type",
        header(compression_type=2, incompatible=layout.INCOMPAT_COMPRESSION),
        "qcow2 compression type 2 is unknown",
    ),
    (
        "zlib with bit",
        header(compression_type=0, incompatible=layout.INCOMPAT_COMPRESSION),
        "qcow2 compression type bit is set but the compression type is zlib",
    ),
    (
        "zstd without bit",
        header(compression_type=1),
        "qcow2 compression type is not zlib but the compression type bit is clear",
    ),
    (
        "unknown bit",
        header(incompatible=1 << 5),
        "qcow2 image uses unsupported incompatible feature: bit 5",
    ),
    (
        "unknown bits named",
        header(
            incompatible=(1 << 5) | (1 << 63),
            extensions=[
                (layout.EXT_FEATURE_TABLE, bytes([0, 5]) + b"frobnication".ljust(46, b"\0"))
            ],
        ),
        "qcow2 image uses unsupported incompatible features: bit 5 (frobnication), bit 63",
    ),
    (
        "subclusters",
        header(cluster_bits=13, incompatible=layout.INCOMPAT_EXTL2),
        "qcow2 extended L2 entries need clusters of at least 16 KiB (the cluster size is 8192)",
    ),
    ("refcount order", header(refcount_order=7), "qcow2 refcount_order 7 is too large (at most 6)"),
    ("encryption", header(crypt=2), "qcow2 encryption (crypt_method 2) is not supported"),
    ("no refcount table", header(refcount_clusters=0), "qcow2 image has no refcount table"),
    (
        "refcount table size",
        header(refcount_clusters=129),
        "qcow2 refcount table is too large (129 entries)",
    ),
    (
        "refcount table offset",
        header(refcount_offset=CS + 512),
        "qcow2 refcount table offset 0x10200 is invalid",
    ),
    (
        "refcount table past end",
        header(refcount_offset=1 << 40),
        "qcow2 refcount table at 0x10000000000 lies past the end of the file",
    ),
    (
        "too many snapshots",
        header(nb_snapshots=65537, snapshots_offset=CS),
        "qcow2 snapshot table is too large (65537 entries)",
    ),
    ("snapshot offset", header(snapshots_offset=1), "qcow2 snapshot table offset 0x1 is invalid"),
    (
        "snapshots past end",
        header(nb_snapshots=3, snapshots_offset=1 << 40),
        "qcow2 snapshot table at 0x10000000000 lies past the end of the file",
    ),
    (
        "huge l1_size",
        header(l1_size=0xFFFFFFFF),
        "qcow2 L1 table is too large (4294967295 entries)",
    ),
    ("l1 offset", header(l1_offset=2 * CS + 8), "qcow2 L1 table offset 0x20008 is invalid"),
    (
        "l1 offset overflow",
        header(l1_offset=(1 << 63) - CS, l1_size=CS),
        "qcow2 L1 table offset 0x7fffffffffff0000 is invalid",
    ),
    (
        "l1 too small",
        header(size=1 << 40, l1_size=1),
        "qcow2 L1 table is too small (1 entries, the virtual size needs 2048)",
    ),
    (
        "too big",
        header(size=(1 << 64) - 1, cluster_bits=9, l1_size=1),
        "qcow2 virtual size 18446744073709551615 is too big",
    ),
    (
        "l1 past end",
        header(l1_offset=1 << 40),
        "qcow2 L1 table at 0x10000000000 lies past the end of the file",
    ),
    (
        "extension too large",
        header(extensions=[(layout.EXT_BACKING_FORMAT, b"raw")])[:104]
        + struct.pack(">II", layout.EXT_BACKING_FORMAT, CS)
        + bytes(CS - 112),
        "qcow2 header extension 0xe2792aca at 0x68 is too large",
    ),
    (
        "backing format",
        header(extensions=[(layout.EXT_BACKING_FORMAT, b"x" * 16)]),
        "qcow2 backing format name is too long (16 bytes)",
    ),
    (
        "data file bit",
        header(incompatible=layout.INCOMPAT_DATA_FILE),
        "qcow2 external data file bit is set but the image names no data file",
    ),
    (
        "data file name",
        header(
            incompatible=layout.INCOMPAT_DATA_FILE,
            extensions=[(layout.EXT_DATA_FILE, b"d/" * 2048)],
        ),
        "qcow2 external data file name is too long (4096 bytes)",
    ),
    (
        "raw data bit",
        header(autoclear=layout.AUTOCLEAR_DATA_FILE_RAW),
        "qcow2 raw external data bit is set without an external data file",
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in BAD_HEADERS], ids=[c[0] for c in BAD_HEADERS]
)
def test_bad_header(data: bytes, expected: str) -> None:
    with pytest.raises(ImageError) as exc:
        parse(data, file_size=16 * CS)
    assert message(exc) == expected
    assert exc.value.fmt == "qcow2" and exc.value.file == NAME


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
def test_unsupported_version(version: int) -> None:
    data = header()[:4] + struct.pack(">I", version) + header()[8:]
    with pytest.raises(UnsupportedImageError) as exc:
        parse(data)
    assert message(exc) == f"qcow2 version {version} is not supported (only 2 and 3)"


def test_unsupported_feature_is_unsupported_error() -> None:
    with pytest.raises(UnsupportedImageError):
        parse(header(incompatible=1 << 9))


def _mutate(base: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(base)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_image_error(data: bytes) -> None:
    with contextlib.suppress(ImageError):
        parse(data, file_size=len(data))


HEADER_FOR_FUZZ = header(
    version=3,
    cluster_bits=12,
    size=1 << 20,
    compression_type=1,
    incompatible=layout.INCOMPAT_COMPRESSION,
    l1_offset=8192,
    refcount_offset=4096,
    backing=b"base.img",
    extensions=[(layout.EXT_BACKING_FORMAT, b"raw"), (layout.EXT_DATA_FILE, b"d")],
)[:4096]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), max_size=8),
    st.integers(0, 4096),
)
def test_mutated_header_only_raises_image_error(edits: list[tuple[int, int]], cut: int) -> None:
    with contextlib.suppress(ImageError):
        parse(_mutate(HEADER_FOR_FUZZ, edits, cut), file_size=1 << 20)


def _fuzz_image() -> bytes:
    deflated = zlib.compressobj(9, zlib.DEFLATED, -12)
    comp = deflated.compress(bytes(range(256)) * 256) + deflated.flush()
    sectors = -(-len(comp) // 512) - 1
    return image(
        {
            0: (4 * CS) | (1 << 63),
            1: 1,  # zero
            2: (1 << 62) | (sectors << 54) | (5 * CS),
            3: (6 * CS),
        },
        [b"\xaa" * CS, comp, b"\xbb" * 100],
        size=8 * CS,
    )


FUZZ_IMAGE = _fuzz_image()
EXT_FUZZ_IMAGE = image(
    {
        0: ((4 * CS) << 64) | 0x0000_00F0_0000_000F,  # data, zero and backing subclusters
        1: 0x0000_0F00_0000_0000,  # unallocated, some zero subclusters
        2: ((4 * CS) << 64) | layout.ALL_ALLOC,
    },
    [b"\xaa" * CS],
    size=8 * CS,
    incompatible=layout.INCOMPAT_EXTL2,
    backing=b"b.img",
    extensions=[(layout.EXT_BACKING_FORMAT, b"raw")],
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([FUZZ_IMAGE, EXT_FUZZ_IMAGE]),
    st.lists(st.tuples(st.integers(0, 7 * CS), st.integers(0, 255)), max_size=6),
)
def test_mutated_image_only_raises_image_error(base: bytes, edits: list[tuple[int, int]]) -> None:
    # Mutate the header's table fields, the L1 and L2 tables and the data.
    data = bytearray(base)
    for pos, value in edits:
        where = pos % 5
        target = [pos % 112, 2 * CS + pos % 16, 3 * CS + pos % 64, 5 * CS + pos % 2048, pos]
        data[target[where] % len(data)] = value
    try:
        disk = open_mem(bytes(data), {"b.img": b"\x42" * 3 * CS})
        read_all(disk)
        buf = memoryview(bytearray(3 * CS))
        disk.read_into(CS // 2 + 1, buf)
    except ImageError:
        pass


def test_ext_fuzz_image_reads() -> None:
    got = read_all(open_mem(EXT_FUZZ_IMAGE, {"b.img": b"\x42" * 3 * CS}))
    sc = CS // 32
    assert got[: 4 * sc] == b"\xaa" * 4 * sc
    assert got[4 * sc : 8 * sc] == bytes(4 * sc)
    assert got[8 * sc : CS] == b"\x42" * (CS - 8 * sc)
    assert got[CS : CS + 8 * sc] == b"\x42" * 8 * sc
    assert got[CS + 8 * sc : CS + 12 * sc] == bytes(4 * sc)
    assert got[2 * CS : 3 * CS] == b"\xaa" * CS
    assert got[3 * CS :] == bytes(5 * CS)  # the backing disk ends at 3 * CS


# -- the read path, on hand-built images ---------------------------------------------


def test_read_kinds() -> None:
    disk = open_mem(FUZZ_IMAGE)
    got = read_all(disk)
    assert disk.virtual_size == 8 * CS
    assert got[:CS] == b"\xaa" * CS
    assert got[CS : 2 * CS] == bytes(CS)
    assert got[2 * CS : 3 * CS] == bytes(range(256)) * 256
    # cluster 3 starts inside the file and ends past it: qemu reads zeros there.
    assert got[3 * CS : 4 * CS] == b"\xbb" * 100 + bytes(CS - 100)
    assert got[4 * CS :] == bytes(4 * CS)
    for start, length in [(CS - 3, 7), (2 * CS - 1, 2), (2 * CS + 5, CS), (0, 8 * CS), (7, 1)]:
        buf = bytearray(length)
        disk.read_into(start, memoryview(buf))
        assert bytes(buf) == got[start : start + length], (start, length)


def test_read_past_virtual_size_reads_zeros() -> None:
    disk = open_mem(FUZZ_IMAGE)
    buf = bytearray(b"\x01" * 100)
    disk.read_into(8 * CS - 50, memoryview(buf))
    assert bytes(buf) == bytes(100)


def test_l2_table_past_end() -> None:
    data = image({}, l1_entry=(0x50000 * 16) | (1 << 63))
    disk = open_mem(data)
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert message(exc) == "qcow2 L2 table at 0x500000 lies past the end of the file"


def test_l2_table_unaligned() -> None:
    disk = open_mem(image({}, l1_entry=3 * CS + 512))
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert message(exc) == "qcow2 L2 table offset 0x30200 is not cluster aligned (L1 index 0)"


def test_data_cluster_past_end() -> None:
    disk = open_mem(image({1: 0x90000 | (1 << 63)}))
    buf = bytearray(CS)
    disk.read_into(0, memoryview(buf))  # cluster 0 is unallocated: fine
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert message(exc) == "qcow2 data cluster at 0x90000 lies past the end of the file"


def test_data_cluster_unaligned() -> None:
    disk = open_mem(image({0: 4 * CS + 512}, [bytes(CS)]))
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert message(exc) == (
        "qcow2 data cluster offset 0x40200 is not cluster aligned (L2 table at 0x30000, index 0)"
    )


def test_zero_flag_in_v2_image() -> None:
    disk = open_mem(image({2: 1}, version=2))
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert (
        message(exc)
        == "qcow2 zero cluster flag in a version 2 image (L2 table at 0x30000, index 2)"
    )


def test_zero_flag_with_preallocated_offset() -> None:
    disk = open_mem(image({0: (4 * CS) | 1 | (1 << 63)}, [b"\xcc" * CS]))
    assert read_all(disk) == bytes(4 * CS)


def _compressed_entry(host: int, length: int) -> int:
    sectors = -(-(length + (host & 511)) // 512) - 1
    return (1 << 62) | (sectors << 54) | host


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\xff" * 600, "qcow2 compressed cluster at 0x40000 fails to inflate"),
        (None, "qcow2 compressed cluster at 0x40000 inflates to 32768 bytes, less than one"),
        (None, "qcow2 compressed cluster at 0x40000 inflates beyond one cluster"),
    ],
    ids=["garbage", "short", "too long"],
)
def test_bad_compressed_cluster(payload: bytes | None, expected: str) -> None:
    if payload is None:
        c = zlib.compressobj(9, zlib.DEFLATED, -12)
        payload = c.compress(bytes(CS // 2 if "less" in expected else CS + 1)) + c.flush()
    disk = open_mem(image({0: _compressed_entry(4 * CS, len(payload))}, [payload]))
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert message(exc).startswith(expected)


def test_compressed_cluster_past_end() -> None:
    disk = open_mem(image({0: _compressed_entry(0x900000, 100)}))
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert message(exc) == "qcow2 compressed cluster at 0x900000 lies past the end of the file"


def test_zstd_cluster_and_bounds() -> None:
    content = bytes(range(256)) * 256
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(content)
    # A zstd bomb: a frame claiming far more than one cluster.
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * CS))
    disk = open_mem(
        image(
            {0: _compressed_entry(4 * CS, len(frame)), 1: _compressed_entry(5 * CS, len(bomb))},
            [frame + b"\x55" * 40, bomb],  # padding after the frame is ignored
            compression_type=1,
            incompatible=layout.INCOMPAT_COMPRESSION,
        )
    )
    buf = bytearray(CS)
    disk.read_into(0, memoryview(buf))
    assert bytes(buf) == content
    with pytest.raises(ImageError) as exc:
        disk.read_into(CS, memoryview(buf))
    assert message(exc) == "qcow2 compressed cluster at 0x50000 inflates beyond one cluster"


def _ext(entry: int, alloc: int, zero: int) -> int:
    return (entry << 64) | (zero << 32) | alloc


def test_extended_l2_subclusters() -> None:
    sc = CS // 32
    data = bytes((i // sc) & 0xFF or 1 for i in range(CS))
    base = bytes([7]) * (4 * CS)
    disk = open_mem(
        image(
            {
                0: _ext(4 * CS | (1 << 63), 0b0101, 0b1000),  # 0 data, 1 backing, 2 data, 3 zero
                1: _ext(0, 0, 0b10),  # unallocated: subcluster 1 zero, the rest backing
                2: _ext(4 * CS | (1 << 63), layout.ALL_ALLOC, 0),
            },
            [data],
            incompatible=layout.INCOMPAT_EXTL2,
            backing=b"base.raw",
            extensions=[(layout.EXT_BACKING_FORMAT, b"raw")],
        ),
        {"base.raw": base},
    )
    got = read_all(disk)
    expected = bytearray(base)
    expected[0:sc] = data[0:sc]
    expected[2 * sc : 3 * sc] = data[2 * sc : 3 * sc]
    expected[3 * sc : 4 * sc] = bytes(sc)
    expected[CS + sc : CS + 2 * sc] = bytes(sc)
    expected[2 * CS : 3 * CS] = data
    assert got == bytes(expected)


@pytest.mark.parametrize(
    "entry", [_ext(4 * CS, 1, 1), _ext(0, 1, 0)], ids=["alloc and zero", "alloc without cluster"]
)
def test_extended_l2_invalid_bitmap(entry: int) -> None:
    disk = open_mem(image({0: entry}, [bytes(CS)], incompatible=layout.INCOMPAT_EXTL2))
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert message(exc).startswith("qcow2 extended L2 entry has an invalid subcluster bitmap")


def test_external_data_file() -> None:
    ext = [(layout.EXT_DATA_FILE, b"t.data")]
    data = b"\x01" * CS + b"\x02" * CS
    disk = open_mem(
        image(
            {0: 1 << 63, 1: CS | (1 << 63), 2: 0},  # offset 0 is valid with the copied bit
            incompatible=layout.INCOMPAT_DATA_FILE,
            extensions=ext,
        ),
        {"t.data": data},
    )
    assert read_all(disk) == data + bytes(2 * CS)
    disk = open_mem(
        image({1: 0 | (1 << 63)}, incompatible=layout.INCOMPAT_DATA_FILE, extensions=ext),
        {"t.data": data},
    )
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert message(exc) == (
        "qcow2 data cluster at 0x0 in the external data file does not match"
        " its guest offset 0x10000"
    )


def test_external_data_file_refused_by_policy() -> None:
    data = image(
        {},
        incompatible=layout.INCOMPAT_DATA_FILE,
        extensions=[(layout.EXT_DATA_FILE, b"/etc/passwd")],
    )
    resolver = MemResolver()
    with pytest.raises(PolicyError):
        decoder.open_disk(MemFile(data), resolver)
    assert resolver.refs == [Reference("data_file", "/etc/passwd", NAME)]


def test_backing_reference_and_unknown_format() -> None:
    data = image({}, backing=b"b.img", extensions=[(layout.EXT_BACKING_FORMAT, b"vvfat")])
    with pytest.raises(UnsupportedImageError) as exc:
        open_mem(data, {"b.img": b""})
    assert message(exc) == (
        "qcow2 backing file 'b.img' has format 'vvfat', which aiodd does not read"
    )
    resolver = MemResolver({"b.img": b"x" * 1000})
    disk = decoder.open_disk(MemFile(image({}, backing=b"b.img")), resolver)
    assert resolver.refs == [Reference("backing", "b.img", NAME, None)]
    got = read_all(disk)  # the raw backing disk is 1024 bytes: zeros after it
    assert got[:1000] == b"x" * 1000 and got[1000:] == bytes(len(got) - 1000)


def test_concurrent_reads_with_a_tiny_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoder, "L2_CACHE_BYTES", 1)
    cb = 9
    cs = 1 << cb
    n = 4096  # clusters; 64 entries per L2 table -> 64 L2 tables
    l2_tables = n // 64
    body = bytearray()
    first = header(cluster_bits=cb, size=n * cs, l1_offset=2 * cs, refcount_offset=cs)[:cs]
    l1 = bytearray(l2_tables * 8)
    l1_clusters = -(-len(l1) // cs)
    l2_start = 2 * cs + l1_clusters * cs
    data_start = l2_start + l2_tables * cs
    for t in range(l2_tables):
        struct.pack_into(">Q", l1, 8 * t, l2_start + t * cs)
        for i in range(64):
            guest = t * 64 + i
            # Map clusters backwards so runs are not contiguous half the time.
            host = data_start + (guest if guest % 3 else n - 1 - guest) * cs
            body += struct.pack(">Q", host | (1 << 63))
    data = bytearray(n * cs)
    for guest in range(n):
        host = guest if guest % 3 else n - 1 - guest
        data[host * cs : (host + 1) * cs] = struct.pack(">I", guest) * (cs // 4)
    blob = first + bytes(cs) + bytes(l1) + bytes(-len(l1) % cs) + bytes(body) + bytes(data)
    disk = open_mem(blob)
    expected = b"".join(struct.pack(">I", g) * (cs // 4) for g in range(n))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                start = rng.randrange(n * cs)
                length = rng.randrange(1, 3 * 4096)
                length = min(length, n * cs - start)
                buf = bytearray(length)
                disk.read_into(start, memoryview(buf))
                assert bytes(buf) == expected[start : start + length]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert read_all(disk) == expected
    assert len(disk._cache) <= 1


# -- parity with qemu ----------------------------------------------------------------


def assert_parity(path: Path, tmp_path: Path, seed: int = 0) -> None:
    """Our view of ``path`` equals qemu's, whole and over odd cross-cluster ranges."""
    expected = qemu_raw_bytes(path, tmp_path)
    disk = open_input(str(path), None)
    try:
        assert disk.format_name == "qcow2"
        assert disk.virtual_size == len(expected)
        got = bytearray(len(expected))
        view = memoryview(got)
        step = 4 << 20
        for start in range(0, len(expected), step):
            disk.read_into(start, view[start : start + step])
        assert got == expected
        rng = random.Random(seed)
        size = len(expected)
        for _ in range(40):
            start = rng.randrange(size)
            length = min(size - start, rng.choice([1, 511, 4097, 65537, 300000, 3 << 20]))
            buf = bytearray(length)
            disk.read_into(start, memoryview(buf))
            assert buf == expected[start : start + length], (start, length)
    finally:
        disk.close()


def writes(cluster: str = "64k", compressed: bool = True) -> list[str]:
    """A mix of data, zeros, discards and compressed clusters for a 5 MiB image.

    Compressed writes must cover whole clusters and cannot go to preallocated ones.
    """
    units = {"k": 1 << 10, "M": 1 << 20}
    size = int(cluster[:-1]) * units[cluster[-1]] if cluster[-1] in units else int(cluster)
    length = max(128 << 10, size)
    out = [
        "write -P 0xab 0 100k",
        "write -P 0x11 300k 7k",
        "write -z 512k 192k",
        "write -P 0x22 1000k 1M",
        "discard 1024k 512k",
        "write -P 0x44 4444k 1k",
    ]
    if compressed:
        out.insert(5, f"write -c -P 0x33 2M {length}")
    return out


def make(tmp_path: Path, name: str, size: str, *opts: str, fmt: str = "qcow2") -> Path:
    path = tmp_path / name
    args: list[str | Path] = ["create", "-f", fmt]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, size)
    return path


CLUSTER_CASES = [
    pytest.param("512", "1.1", id="512-v3"),
    pytest.param("4k", "0.10", id="4k-v2"),
    pytest.param("64k", "1.1", id="64k-v3"),
    pytest.param("64k", "0.10", id="64k-v2"),
    pytest.param("2M", "1.1", id="2M-v3"),
    pytest.param("512", "0.10", id="512-v2", marks=pytest.mark.full_matrix),
    pytest.param("1k", "1.1", id="1k-v3", marks=pytest.mark.full_matrix),
    pytest.param("16k", "0.10", id="16k-v2", marks=pytest.mark.full_matrix),
    pytest.param("128k", "1.1", id="128k-v3", marks=pytest.mark.full_matrix),
    pytest.param("1M", "0.10", id="1M-v2", marks=pytest.mark.full_matrix),
    pytest.param("2M", "0.10", id="2M-v2", marks=pytest.mark.full_matrix),
]


@needs_qemu
@pytest.mark.parametrize(("cluster", "compat"), CLUSTER_CASES)
def test_parity_cluster_sizes(tmp_path: Path, cluster: str, compat: str) -> None:
    path = make(tmp_path, "a.qcow2", "5M", f"cluster_size={cluster}", f"compat={compat}")
    qemu_io(path, writes(cluster))
    assert_parity(path, tmp_path)


@needs_qemu
@pytest.mark.parametrize(
    "opts",
    [
        pytest.param(("extended_l2=on",), id="extl2-64k"),
        pytest.param(("extended_l2=on", "cluster_size=16k"), id="extl2-16k"),
        pytest.param(
            ("extended_l2=on", "cluster_size=2M"), id="extl2-2M", marks=pytest.mark.full_matrix
        ),
        pytest.param(("compression_type=zstd",), id="zstd"),
        pytest.param(("compression_type=zlib", "cluster_size=4k"), id="zlib-4k"),
        pytest.param(
            ("compression_type=zstd", "cluster_size=2M"),
            id="zstd-2M",
            marks=pytest.mark.full_matrix,
        ),
        pytest.param(("preallocation=metadata",), id="prealloc-metadata"),
        pytest.param(("preallocation=full", "cluster_size=4k"), id="prealloc-full"),
        pytest.param(
            ("preallocation=falloc", "extended_l2=on"),
            id="prealloc-falloc-extl2",
            marks=pytest.mark.full_matrix,
        ),
        pytest.param(("lazy_refcounts=on",), id="lazy-refcounts"),
        pytest.param(("refcount_bits=1",), id="refcount-1", marks=pytest.mark.full_matrix),
    ],
)
def test_parity_options(tmp_path: Path, opts: tuple[str, ...]) -> None:
    path = make(tmp_path, "a.qcow2", "5M", *opts)
    cluster = next((o.split("=")[1] for o in opts if o.startswith("cluster_size=")), "64k")
    prealloc = any(o.startswith("preallocation=") for o in opts)
    extra = ["write -P 0x55 4100k 3k", "write -z 4200k 2k", "discard 4300k 64k"]
    qemu_io(path, writes(cluster, compressed=not prealloc) + extra)
    assert_parity(path, tmp_path)


@needs_qemu
def test_parity_extended_l2_subclusters_over_backing(tmp_path: Path) -> None:
    base = make(tmp_path, "base.qcow2", "3M", "cluster_size=4k")
    qemu_io(base, ["write -P 0x66 0 3M"])
    top = make(
        tmp_path,
        "top.qcow2",
        "3M",
        "extended_l2=on",
        "cluster_size=64k",
        "backing_file=base.qcow2",
        "backing_fmt=qcow2",
    )
    qemu_io(
        top,
        [
            "write -P 0x01 2k 2k",  # subcluster 1 of cluster 0
            "write -P 0x02 10k 5k",  # subclusters 5..7
            "write -z 20k 2k",  # a zero subcluster
            "write -z 128k 64k",  # a whole zero cluster
            "discard 256k 64k",
            "write -P 0x03 1M 64k",
            "write -z 1M 4k",
            "write -c -P 0x04 2M 64k",
        ],
    )
    assert_parity(top, tmp_path)


@needs_qemu
def test_parity_dirty_lazy_refcounts(tmp_path: Path) -> None:
    path = make(tmp_path, "a.qcow2", "4M", "lazy_refcounts=on")
    # qemu-io's abort leaves the image with the dirty bit set, as a crashed VM does.
    result = run_qemu("qemu-io", "-c", "write -P 0x5a 64k 1M", "-c", "abort", path, check=False)
    assert result.returncode != 0
    assert path.read_bytes()[72:80] == (1).to_bytes(8, "big")
    assert_parity(path, tmp_path)


@needs_qemu
def test_parity_corrupt_bit(tmp_path: Path) -> None:
    path = make(tmp_path, "a.qcow2", "2M")
    qemu_io(path, ["write -P 0x77 0 300k"])
    data = bytearray(path.read_bytes())
    data[72:80] = (layout.INCOMPAT_CORRUPT).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    assert_parity(path, tmp_path)


@needs_qemu
@pytest.mark.parametrize("zstd", [False, True], ids=["zlib", "zstd"])
def test_parity_convert_compressed(tmp_path: Path, zstd: bool) -> None:
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
    assert_parity(path, tmp_path)


@needs_qemu
@pytest.mark.parametrize(
    "base_size",
    [2 << 20, 3 << 20, 5 << 20, 2049 << 10, 1_000_001],
    ids=["shorter", "same", "longer", "shorter-by-less-than-a-cluster", "odd"],
)
@pytest.mark.parametrize("backing_fmt", [True, False], ids=["-F", "probed"])
def test_parity_backing_chain(tmp_path: Path, base_size: int, backing_fmt: bool) -> None:
    raw = tmp_path / "base.raw"
    raw.write_bytes(bytes([0x21]) * base_size)
    mid = make(tmp_path, "mid.qcow2", "3M", "backing_file=base.raw", "backing_fmt=raw")
    if not backing_fmt:  # qemu-img create insists on -F now: drop it from the header
        data = bytearray(mid.read_bytes())
        pos = data.find(struct.pack(">I", layout.EXT_BACKING_FORMAT))
        if pos > 0:
            data[pos : pos + 4] = struct.pack(">I", 0x0BADF00D)  # an unknown extension
            mid.write_bytes(bytes(data))
    qemu_io(mid, ["write -P 0x31 64k 64k", "write -z 1M 64k", "write -c -P 0x32 2M 64k"])
    top = make(
        tmp_path,
        "top.qcow2",
        "4M",
        "backing_file=mid.qcow2",
        "backing_fmt=qcow2",
        "cluster_size=4k",
    )
    qemu_io(top, ["write -P 0x41 60k 8k", "discard 1M 64k", "write -P 0x42 3M 4k"])
    assert_parity(top, tmp_path)
    assert_parity(mid, tmp_path)


@needs_qemu
@pytest.mark.parametrize("raw_bit", [False, True], ids=["data-file", "data-file-raw"])
def test_parity_data_file(tmp_path: Path, raw_bit: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # qemu 7.2 opens a relative data file name from its working directory, aiodd from
    # the image's directory: run qemu where the image is so both find the same file.
    monkeypatch.chdir(tmp_path)
    opts = ["data_file=a.data"] + (["data_file_raw=on"] if raw_bit else [])
    path = make(tmp_path, "a.qcow2", "3M", *opts)
    qemu_io(
        path, ["write -P 0x61 0 1M", "write -z 64k 64k", "discard 256k 64k", "write -P 0x62 2M 512"]
    )
    assert_parity(path, tmp_path)


@needs_qemu
def test_parity_snapshots(tmp_path: Path) -> None:
    path = make(tmp_path, "a.qcow2", "3M")
    qemu_io(path, ["write -P 0x71 0 1M"])
    qemu_img("snapshot", "-c", "one", path)
    qemu_io(path, ["write -P 0x72 512k 1M", "discard 0 64k"])
    qemu_img("snapshot", "-c", "two", path)
    qemu_io(path, ["write -z 1M 64k"])
    assert_parity(path, tmp_path)


# -- corruption of real images ----------------------------------------------------------


def _fresh(tmp_path: Path) -> Path:
    path = make(tmp_path, "a.qcow2", "2M")
    qemu_io(path, ["write -P 0x12 0 192k"])  # L2 table at 0x30000, data at 0x40000..
    return path


@needs_qemu
@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        (50, "qcow2 header is truncated (the file has 50 bytes)"),
        (100, "qcow2 version 3 header is truncated (the file has 100 bytes)"),
        (0x18000, "qcow2 refcount table at 0x10000 extends past the end of the file"),
        (0x30000, "qcow2 L1 table at 0x30000 lies past the end of the file"),
        (0x40000, "qcow2 L2 table at 0x40000 lies past the end of the file"),
        (0x60000, "qcow2 data cluster at 0x60000 lies past the end of the file"),
    ],
)
def test_truncated_image(tmp_path: Path, keep: int, expected: str) -> None:
    path = _fresh(tmp_path)
    info = qemu_img("info", "--output=json", path).stdout
    assert b'"cluster-size": 65536' in info
    data = path.read_bytes()
    # The layout qemu 7.2 writes: header, refcount table, refcount block, L1, L2, data.
    assert int.from_bytes(data[40:48], "big") == 0x30000
    path.write_bytes(data[:keep])
    with pytest.raises(ImageError) as exc:
        disk = open_input(str(path), None)
        read_all(disk)
    assert message(exc) == expected


@needs_qemu
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            40,
            (1 << 40).to_bytes(8, "big"),
            "qcow2 L1 table at 0x10000000000 lies past the end of the file",
        ),
        (36, (0xFFFFFFFF).to_bytes(4, "big"), "qcow2 L1 table is too large (4294967295 entries)"),
        (20, (30).to_bytes(4, "big"), "qcow2 cluster_bits 30 is out of range (9 to 21)"),
    ],
    ids=["l1-past-eof", "huge-l1-size", "cluster-bits"],
)
def test_corrupted_header_fields(tmp_path: Path, field: int, value: bytes, expected: str) -> None:
    path = _fresh(tmp_path)
    data = bytearray(path.read_bytes())
    data[field : field + len(value)] = value
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as exc:
        open_input(str(path), None)
    assert message(exc) == expected
    assert exc.value.file == str(path)


@needs_qemu
def test_l1_entry_past_eof(tmp_path: Path) -> None:
    path = _fresh(tmp_path)
    data = bytearray(path.read_bytes())
    l1_offset = int.from_bytes(data[40:48], "big")
    data[l1_offset : l1_offset + 8] = ((1 << 63) | 0x5000000).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    disk = open_input(str(path), None)
    with pytest.raises(ImageError) as exc:
        read_all(disk)
    assert message(exc) == "qcow2 L2 table at 0x5000000 lies past the end of the file"
