"""qcow (version 1) input: the header as qemu 7.2 checks it (pure, with hypothesis),
every kind of cluster, backing files, each refusal's exact message, and the bytes qemu
reads from the same hand-built images (docs/formats.md#qcow-version-1)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats.qcow import decode as decoder
from aiodd.formats.qcow import layout
from aiodd.formats.registry import detect
from tests.conftest import needs_qemu, qemu_raw_bytes
from tests.qcow_images import (
    Qcow,
    cluster,
    deflate,
    qemu_refuses,
    read_whole,
    reads_or_fails_cleanly,
    refusal,
    windows_match_the_whole,
)
from tests.test_decode_qcow2 import MemFile, MemResolver

NAME = "t.qcow"


def read_all(data: bytes, files: dict[str, bytes] | None = None) -> bytes:
    return read_whole(decoder, data, NAME, files)


def expected(image: Qcow, backing: bytes = b"") -> bytes:
    cs = 1 << image.cluster_bits
    size = image.size // 512 * 512
    out = bytearray(backing[:size].ljust(size, b"\0"))
    for index, data in image.data.items():
        out[index * cs : (index + 1) * cs] = data.ljust(cs, b"\0")
    return bytes(out[:size])


def failure(data: bytes, files: dict[str, bytes] | None = None) -> ImageError:
    return refusal(decoder, data, NAME, files)


GEOMETRIES = [(9, 6), (9, 12), (12, 9), (14, 11), (16, 13), (16, 6)]


def sample(cb: int, l2b: int) -> Qcow:
    cs = 1 << cb
    span = cs << l2b
    size = 2 * span + 3 * cs + 1000  # three L2 tables, the last partial, a size not of 512
    return Qcow(
        size,
        cb,
        l2b,
        data={
            0: cluster(1, cs),
            5: cluster(2, cs),
            (span // cs) + 1: cluster(3, cs),
            2 * (span // cs) + 2: cluster(4, cs),
            7: b"\x33" * cs,
        },
        compressed={7},
    )


@pytest.mark.parametrize(("cb", "l2b"), GEOMETRIES)
def test_reads_every_geometry(cb: int, l2b: int) -> None:
    image = sample(cb, l2b)
    assert read_all(image.build()) == expected(image)


@needs_qemu
@pytest.mark.parametrize(("cb", "l2b"), GEOMETRIES)
def test_qemu_reads_the_same(tmp_path: Path, cb: int, l2b: int) -> None:
    path = tmp_path / NAME
    path.write_bytes(sample(cb, l2b).build())
    assert qemu_raw_bytes(path, tmp_path, "qcow") == read_all(path.read_bytes())


def test_windows_match_the_whole() -> None:
    windows_match_the_whole(decoder, sample(9, 6).build(), NAME, seed=5, longest=5000)


def test_backing_file_under_unallocated_clusters() -> None:
    base = cluster(9, 3000)  # shorter than the disk: zeros past its end
    image = Qcow(8192, 9, 6, data={1: b"\x44" * 512}, backing=b"base.raw")
    resolver = MemResolver({"base.raw": base})
    disk = decoder.open_disk(MemFile(image.build(), NAME), resolver)
    buf = bytearray(8192)
    disk.read_into(0, memoryview(buf))
    assert bytes(buf) == expected(image, base)
    assert [(r.kind, r.name, r.referrer, r.format) for r in resolver.refs] == [
        ("backing", "base.raw", NAME, None)  # no backing format in qcow: probed
    ]
    assert detect(base) == "raw"


def test_backing_name_stops_at_nul_and_empty_is_none() -> None:
    image = Qcow(4096, backing=b"b.raw\0junk")
    assert read_all(image.build(), {"b.raw": b"\x01" * 4096}) == b"\x01" * 4096
    data = bytearray(Qcow(4096, backing=b"\0\0\0").build())
    assert read_all(bytes(data)) == bytes(4096)


def test_backing_loop_is_refused_by_the_resolver() -> None:
    image = Qcow(4096, backing=NAME.encode()).build()
    with pytest.raises(RecursionError):  # the in-memory resolver has no policy
        read_all(image, {NAME: image})


def test_compressed_cluster_stream_longer_than_a_cluster_is_cut() -> None:
    """qemu inflates only one cluster's worth: the rest of the stream is not looked at."""
    cs = 512
    packed = deflate(b"\x12" * cs + b"\x34" * 100)
    entry = layout.OFLAG_COMPRESSED | len(packed) << (63 - 9)
    image = Qcow(1024, 9, 6, entries={0: 0})
    data = bytearray(image.build())
    at = len(data)
    data += packed
    l1_at = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_at)[0]
    struct.pack_into(">Q", data, l2, entry | at)
    assert read_all(bytes(data))[:cs] == b"\x12" * cs


def header_only(size: int, cb: int, l2b: int) -> bytes:
    return layout.build_header(size=size, cluster_bits=cb, l2_bits=l2b, l1_table_offset=48)


def with_entry(image: Qcow, index: int, entry: int) -> bytes:
    image.entries[index] = entry
    return image.build()


ERRORS: list[tuple[str, bytes, str, type[ImageError]]] = [
    ("truncated", Qcow(4096).build()[:40], "qcow header is truncated (the file has 40 bytes)",
     ImageError),
    ("magic", b"QFI\xfa" + Qcow(4096).build()[4:],
     "image is not in qcow format (no QFI\\xfb magic)", ImageError),
    ("version-2", Qcow(4096).build()[:4] + struct.pack(">I", 2) + Qcow(4096).build()[8:],
     "qcow version 2 is not supported (only 1): this is a qcow2 image", UnsupportedImageError),
    ("version-7", Qcow(4096).build()[:4] + struct.pack(">I", 7) + Qcow(4096).build()[8:],
     "qcow version 7 is not supported (only 1)", UnsupportedImageError),
    ("size-1", Qcow(1).build(), "qcow image size 1 is too small (at least 2 bytes)", ImageError),
    ("cluster-bits-8", Qcow(4096, 8, 9).build(), "qcow cluster_bits 8 is out of range (9 to 16)",
     ImageError),
    ("cluster-bits-17", Qcow(4096, 17, 9).build(),
     "qcow cluster_bits 17 is out of range (9 to 16)", ImageError),
    ("l2-bits-5", Qcow(4096, 12, 5).build(), "qcow l2_bits 5 is out of range (6 to 13)",
     ImageError),
    ("l2-bits-14", Qcow(4096, 12, 14).build(), "qcow l2_bits 14 is out of range (6 to 13)",
     ImageError),
    ("aes", Qcow(4096, crypt_method=1).build(),
     "qcow encryption (crypt_method 1) is not supported", UnsupportedImageError),
    ("crypt-2", Qcow(4096, crypt_method=2).build(), "qcow encryption method 2 is invalid",
     ImageError),
    ("size-wraps", header_only((1 << 64) - 100, 12, 9),
     f"qcow virtual size {(1 << 64) - 100} is too big", ImageError),
    ("l1-too-large", header_only(1 << 62, 9, 6),
     f"qcow virtual size {1 << 62} is too big", ImageError),
    ("l1-past-end", header_only(1 << 40, 9, 6) + bytes(4000),
     "qcow L1 table at 0x30 extends past the end of the file", ImageError),
    ("name-too-long", Qcow(4096, backing=b"x" * 1024).build(),
     "qcow backing file name is too long (1024 bytes)", ImageError),
    ("l2-past-end", Qcow(4096, l1_entries={0: 1 << 40}).build(),
     "qcow L2 table at 0x10000000000 lies past the end of the file", ImageError),
    ("data-unaligned", with_entry(Qcow(4096), 0, 0x1000 + 7),
     "qcow data cluster offset 0x1007 is not sector aligned (L2 table at 0x1000, index 0)",
     ImageError),
    ("data-past-end", with_entry(Qcow(4096), 0, 1 << 40),
     "qcow data cluster at 0x10000000000 lies past the end of the file", ImageError),
    ("compressed-past-end",
     with_entry(Qcow(4096), 0, layout.OFLAG_COMPRESSED | 100 << 51 | 1 << 40),
     "qcow compressed cluster at 0x10000000000 lies past the end of the file", ImageError),
    ("compressed-garbage", with_entry(Qcow(4096), 0, layout.OFLAG_COMPRESSED | 100 << 51 | 0),
     "qcow compressed cluster at 0x0 fails to inflate", ImageError),
    ("compressed-empty", with_entry(Qcow(4096), 0, layout.OFLAG_COMPRESSED | 0x30),
     "qcow compressed cluster at 0x30 inflates to 0 bytes, less than one cluster", ImageError),
]  # fmt: skip


@pytest.mark.parametrize(("case", "data", "message", "kind"), ERRORS, ids=[e[0] for e in ERRORS])
def test_refusals(case: str, data: bytes, message: str, kind: type[ImageError]) -> None:
    error = failure(data)
    assert type(error) is kind
    assert str(error) == f"{NAME}: {message}"
    assert error.fmt == "qcow"


# The refusals qemu makes too, when it opens the image or reads it (not aiodd's extra
# bounds on truncated files, nor its earlier errors where qemu reads zeros).
QEMU_FAILS = {"magic", "version-2", "version-7", "size-1", "cluster-bits-8", "cluster-bits-17",
              "l2-bits-5", "l2-bits-14", "aes", "crypt-2", "size-wraps", "l1-too-large",
              "name-too-long", "data-unaligned", "compressed-garbage", "compressed-empty",
              "compressed-past-end"}  # fmt: skip


@needs_qemu
@pytest.mark.parametrize("case", sorted(QEMU_FAILS))
def test_qemu_refuses_them_too(tmp_path: Path, case: str) -> None:
    qemu_refuses(tmp_path, next(e[1] for e in ERRORS if e[0] == case), NAME, "qcow")


def test_errors_name_the_structure_not_python() -> None:
    for _, data, _, _ in ERRORS:
        assert "\n" not in str(failure(data))


@given(st.binary(min_size=48, max_size=48))
def test_parse_header_raises_only_image_errors(head: bytes) -> None:
    try:
        header = layout.parse_header(head, 1 << 20, NAME)
    except ImageError:
        return
    assert header.virtual_size % 512 == 0
    assert header.l1_table_offset + header.l1_size * 8 <= 1 << 20


@given(st.integers(0, 47), st.integers(0, 255), st.sampled_from([(9, 6), (12, 9), (16, 13)]))
def test_a_mutated_header_reads_or_fails_cleanly(
    at: int, value: int, geometry: tuple[int, int]
) -> None:
    data = bytearray(sample(*geometry).build())
    data[at] = value
    reads_or_fails_cleanly(decoder, bytes(data), NAME)
