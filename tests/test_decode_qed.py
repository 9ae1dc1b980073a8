"""QED input: the header as qemu 7.2 checks it (pure, with hypothesis), data, zero and
unallocated clusters, backing files (probed, or raw by the no-probe feature), each
refusal's exact message, and the bytes qemu reads from the same hand-built images
(docs/formats.md#qed)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats.qed import decode as decoder
from aiodd.formats.qed import layout
from tests.conftest import needs_qemu, qemu_raw_bytes
from tests.qcow_images import (
    Qed,
    cluster,
    qemu_refuses,
    read_whole,
    reads_or_fails_cleanly,
    refusal,
    windows_match_the_whole,
)
from tests.test_decode_qcow2 import MemFile, MemResolver

NAME = "t.qed"


def read_all(data: bytes, files: dict[str, bytes] | None = None) -> bytes:
    return read_whole(decoder, data, NAME, files)


def expected(image: Qed, backing: bytes = b"") -> bytes:
    cs = image.cluster_size
    out = bytearray(backing[: image.size].ljust(image.size, b"\0"))
    for index in image.zero:
        out[index * cs : (index + 1) * cs] = bytes(cs)
    for index, data in image.data.items():
        out[index * cs : (index + 1) * cs] = data.ljust(cs, b"\0")
    return bytes(out[: image.size])


def failure(data: bytes, files: dict[str, bytes] | None = None) -> ImageError:
    return refusal(decoder, data, NAME, files)


GEOMETRIES = [(4096, 2), (4096, 16), (16384, 4), (65536, 2)]


def sample(cs: int, ts: int, **kwargs: object) -> Qed:
    n = ts * cs // 8
    size = (n + 3) * cs - 1536  # two L2 tables, the second partial
    return Qed(
        size,
        cs,
        ts,
        data={0: cluster(1, cs), 5: cluster(2, cs), 6: cluster(3, cs), n + 1: cluster(4, cs)},
        zero={2, n + 2},
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
def test_reads_every_geometry(cs: int, ts: int) -> None:
    image = sample(cs, ts)
    assert read_all(image.build()) == expected(image)


@needs_qemu
@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
def test_qemu_reads_the_same(tmp_path: Path, cs: int, ts: int) -> None:
    path = tmp_path / NAME
    path.write_bytes(sample(cs, ts).build())
    assert qemu_raw_bytes(path, tmp_path, "qed") == read_all(path.read_bytes())


def test_windows_match_the_whole() -> None:
    data = sample(4096, 2).build()
    windows_match_the_whole(decoder, data, NAME, seed=6, longest=20000, past_end=100)


@pytest.mark.parametrize("raw", [False, True], ids=["probed", "no-probe"])
def test_backing_file_under_unallocated_clusters(raw: bool) -> None:
    base = cluster(9, 30000)  # shorter than the disk; zero clusters hide it
    image = sample(4096, 2, backing=b"base.img", raw_backing=raw)
    resolver = MemResolver({"base.img": base})
    disk = decoder.open_disk(MemFile(image.build(), NAME), resolver)
    buf = bytearray(disk.virtual_size)
    disk.read_into(0, memoryview(buf))
    assert bytes(buf) == expected(image, base)
    assert [(r.kind, r.name, r.format) for r in resolver.refs] == [
        ("backing", "base.img", "raw" if raw else None)
    ]


def test_no_probe_without_a_backing_file_is_ignored() -> None:
    image = sample(4096, 2, features=layout.F_BACKING_FORMAT_NO_PROBE)
    assert read_all(image.build()) == expected(image)


def test_need_check_compat_and_autoclear_bits_are_read_as_qemu_reads_read_only() -> None:
    image = sample(
        4096, 2, features=layout.F_NEED_CHECK, compat_features=0xFF, autoclear_features=1 << 63
    )
    assert read_all(image.build()) == expected(image)


def test_max_image_size_wraps_as_in_qemu() -> None:
    assert layout.max_image_size(1 << 23, 1) == 1 << 63
    assert layout.max_image_size(1 << 24, 1) == 0  # 2**66 in 64 bits
    assert layout.max_image_size(65536, 4) == (1 << 15) ** 2 * 65536


def header_only(**fields: int) -> bytes:
    values = {
        "cluster_size": 4096, "table_size": 2, "header_size": 1, "features": 0,
        "l1_table_offset": 4096, "image_size": 1 << 20,
    }  # fmt: skip
    values.update(fields)
    return layout.build_header(**values).ljust(4 * 4096, b"\0")


def with_entry(image: Qed, index: int, entry: int) -> bytes:
    image.entries[index] = entry
    return image.build()


ERRORS: list[tuple[str, bytes, str, type[ImageError]]] = [
    ("truncated", header_only()[:63], "qed header is truncated (the file has 63 bytes)",
     ImageError),
    ("magic", b"QEE\0" + header_only()[4:], "image is not in qed format (no QED\\0 magic)",
     ImageError),
    ("feature-8", header_only(features=8), "qed image uses unsupported features 0x8",
     UnsupportedImageError),
    ("cluster-2k", header_only(cluster_size=2048),
     "qed cluster size 2048 is invalid (a power of two from 4 KiB to 64 MiB)", ImageError),
    ("cluster-128m", header_only(cluster_size=1 << 27),
     f"qed cluster size {1 << 27} is invalid (a power of two from 4 KiB to 64 MiB)", ImageError),
    ("cluster-6000", header_only(cluster_size=6000),
     "qed cluster size 6000 is invalid (a power of two from 4 KiB to 64 MiB)", ImageError),
    ("table-0", header_only(table_size=0),
     "qed table size 0 is invalid (a power of two from 1 to 16 clusters)", ImageError),
    ("table-3", header_only(table_size=3),
     "qed table size 3 is invalid (a power of two from 1 to 16 clusters)", ImageError),
    ("table-32", header_only(table_size=32),
     "qed table size 32 is invalid (a power of two from 1 to 16 clusters)", ImageError),
    ("size-odd", header_only(image_size=1000), "qed image size 1000 is not a multiple of 512",
     ImageError),
    ("size-huge", header_only(image_size=1 << 40),
     f"qed image size {1 << 40} is too large for its cluster and table sizes", ImageError),
    ("size-wrapped-max", header_only(cluster_size=1 << 26, table_size=1, image_size=512),
     "qed image size 512 is too large for its cluster and table sizes", ImageError),
    ("table-size-1", header_only(table_size=1), "qed L1 table offset 0x1000 is invalid",
     ImageError),
    ("l1-in-header", header_only(l1_table_offset=0), "qed L1 table offset 0x0 is invalid",
     ImageError),
    ("l1-unaligned", header_only(l1_table_offset=4100), "qed L1 table offset 0x1004 is invalid",
     ImageError),
    ("l1-past-end", header_only(l1_table_offset=3 * 4096),
     "qed L1 table offset 0x3000 is invalid", ImageError),
    ("l1-wraps", header_only(l1_table_offset=(1 << 64) - 4096),
     f"qed L1 table offset {(1 << 64) - 4096:#x} is invalid", ImageError),
    ("header-size-huge", header_only(header_size=1 << 20, l1_table_offset=4096),
     "qed L1 table offset 0x1000 is invalid", ImageError),
    ("backing-outside-header", header_only(features=1, backing_filename_offset=4000,
                                            backing_filename_size=100),
     "qed backing file name offset 0xfa0 is invalid", ImageError),
    ("backing-name-too-long", header_only(features=1, header_size=2, l1_table_offset=8192,
                                           backing_filename_offset=64,
                                           backing_filename_size=4096).ljust(5 * 4096, b"\0"),
     "qed backing file name is too long (4096 bytes)", ImageError),
    ("l2-invalid", Qed(1 << 20, l1_entries={0: 4096 * 7}).build(),
     "qed L2 table offset 0x7000 is invalid (L1 index 0)", ImageError),
    ("l2-in-header", Qed(1 << 20, l1_entries={0: 2}).build(),
     "qed L2 table offset 0x2 is invalid (L1 index 0)", ImageError),
    ("data-unaligned", with_entry(Qed(1 << 20, data={1: b"x"}), 0, 4096 + 512),
     "qed data cluster offset 0x1200 is invalid (L2 table at 0x4000, index 0)", ImageError),
    ("data-past-end", with_entry(Qed(1 << 20, data={1: b"x"}), 0, 1 << 40),
     "qed data cluster offset 0x10000000000 is invalid (L2 table at 0x4000, index 0)",
     ImageError),
]  # fmt: skip


@pytest.mark.parametrize(("case", "data", "message", "kind"), ERRORS, ids=[e[0] for e in ERRORS])
def test_refusals(case: str, data: bytes, message: str, kind: type[ImageError]) -> None:
    error = failure(data)
    assert type(error) is kind
    assert str(error) == f"{NAME}: {message}"
    assert error.fmt == "qed"


def test_data_cluster_in_the_header_is_invalid() -> None:
    image = Qed(1 << 20, header_size=2, data={1: b"x"})
    image.entries[0] = 4096
    error = failure(image.build())
    assert str(error).startswith(f"{NAME}: qed data cluster offset 0x1000 is invalid (L2 table at")


# aiodd's one extra bound: a header shorter than 64 bytes (qemu reads zeros past the end).
QEMU_FAILS = sorted({e[0] for e in ERRORS} - {"truncated"})


@needs_qemu
@pytest.mark.parametrize("case", QEMU_FAILS)
def test_qemu_refuses_them_too(tmp_path: Path, case: str) -> None:
    qemu_refuses(tmp_path, next(e[1] for e in ERRORS if e[0] == case), NAME, "qed")


@given(st.binary(min_size=64, max_size=64), st.integers(0, 1 << 32))
def test_parse_header_raises_only_image_errors(head: bytes, file_size: int) -> None:
    try:
        header = layout.parse_header(head, file_size, NAME)
    except ImageError:
        return
    assert header.table_offset_valid(header.l1_table_offset)
    assert header.l1_table_offset + header.table_size * header.cluster_size <= file_size
    assert header.l1_entries <= header.table_entries
    assert header.image_size % 512 == 0


@given(st.integers(0, 63), st.integers(0, 255), st.sampled_from(GEOMETRIES[:2]))
def test_a_mutated_header_reads_or_fails_cleanly(
    at: int, value: int, geometry: tuple[int, int]
) -> None:
    data = bytearray(sample(*geometry).build())
    data[at] = value
    reads_or_fails_cleanly(decoder, bytes(data), NAME)


def test_a_table_entry_is_little_endian() -> None:
    assert layout.le64_table(struct.pack("<2Q", 1, 1 << 40)) == [1, 1 << 40]
