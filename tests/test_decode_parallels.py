"""The parallels decoder: pure parsing, hand-built images, parity with qemu-img 7.2,
the refusals (docs/formats.md#parallels)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiodd.chain import open_input
from aiodd.errors import ImageError
from aiodd.formats import registry
from aiodd.formats.base import VirtualDisk
from aiodd.formats.common import LayoutError
from aiodd.formats.parallels import layout as L
from aiodd.options import Isolation
from tests.conftest import needs_qemu, qemu_img, qemu_io, qemu_raw_bytes, with_kvm
from tests.fuzz.hosted import ChainResolver, MemFile
from tests.harness import aiodd_run, qemu_dd

KiB, MiB = 1 << 10, 1 << 20
NAME = "t.prl"


# --- helpers -------------------------------------------------------------------------


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF or seed for i in range(n))


def image(
    virtual: int,
    cluster: int,
    clusters: dict[int, bytes],
    *,
    magic: bytes = L.MAGIC_EXT,
    entries: int | None = None,
    data_off: int | None = None,
    **fields: int,
) -> bytes:
    """A parallels image of ``virtual`` bytes: ``clusters`` maps a BAT index to its data,
    laid out in index order after the BAT (rounded up to a cluster, as qemu-img does)."""
    tracks = cluster // 512
    entries = -(-virtual // cluster) if entries is None else entries
    start = -(-(64 + 4 * entries) // cluster) * cluster
    bat = [0] * entries
    body = bytearray()
    for index, data in sorted(clusters.items()):
        at = start + len(body)
        bat[index] = at // (512 if magic == L.MAGIC else cluster)
        body += data.ljust(cluster, b"\0")[:cluster]
    header = L.build_header(
        tracks=tracks, bat_entries=entries, nb_sectors=fields.pop("nb_sectors", virtual // 512),
        magic=magic,
        data_off=start // 512 if data_off is None else data_off, **fields,
    )  # fmt: skip
    table = struct.pack(f"<{entries}I", *bat)
    return (header + table).ljust(start, b"\0") + bytes(body)


def open_mem(data: bytes, name: str = NAME) -> VirtualDisk:
    return registry.open_disk(MemFile(data, name), ChainResolver({}), "parallels")


def read(data: bytes, offset: int = 0, length: int | None = None) -> bytes:
    disk = open_mem(data)
    n = disk.virtual_size - offset if length is None else length
    buf = bytearray(n)
    disk.read_into(offset, memoryview(buf))
    return bytes(buf)


def refused(data: bytes) -> str:
    """The error opening ``data``, or reading its whole disk."""
    with pytest.raises(ImageError) as info:
        read(data)
    return str(info.value)


def read_all(path: Path, fmt: str | None = "parallels", isolation: Isolation = "inline") -> bytes:
    disk = open_input(str(path), fmt, isolation=isolation)
    try:
        buf = bytearray(disk.virtual_size)
        chunk = 3 * MiB + 512  # odd chunks cross clusters at unaligned places
        for at in range(0, len(buf), chunk):
            disk.read_into(at, memoryview(buf)[at : at + chunk])
        return bytes(buf)
    finally:
        disk.close()


# --- pure parsing --------------------------------------------------------------------


def test_probe_is_qemus() -> None:
    head = L.build_header(tracks=8, bat_entries=1, nb_sectors=8)
    assert L.probe(head) == 100
    assert L.probe(L.build_header(tracks=8, bat_entries=1, nb_sectors=8, magic=L.MAGIC)) == 100
    assert L.probe(L.build_header(tracks=8, bat_entries=1, nb_sectors=8, version=1)) == 0
    assert L.probe(head[:63]) == 0
    assert registry.detect(head) == "parallels"


def test_old_magic_counts_sectors_and_32_bit_sizes() -> None:
    old = L.parse_header(L.build_header(tracks=8, bat_entries=1, nb_sectors=(1 << 32) | 8,
                                        magic=L.MAGIC))  # fmt: skip
    new = L.parse_header(L.build_header(tracks=8, bat_entries=1, nb_sectors=(1 << 32) | 8))
    assert (old.nb_sectors, old.entry_unit) == (8, 512)
    assert (new.nb_sectors, new.entry_unit) == ((1 << 32) | 8, 8 * 512)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"version": 1}, "not in parallels format: no 'WithoutFreeSpace' or 'WithouFreSpacExt'"
                         " magic with version 2"),
        ({"magic": b"WithoutFreeSpacE"}, "not in parallels format"),
        ({"tracks": 0}, "parallels cluster size is zero"),
        ({"tracks": L.MAX_TRACKS + 1},
         f"parallels cluster of {L.MAX_TRACKS + 1} sectors is too large (at most 4186127)"),
        ({"bat_entries": 1 << 29},
         "parallels BAT of 536870912 entries is too large (at most 536870911)"),
        ({"nb_sectors": 1 << 54}, f"parallels virtual size of {1 << 54} sectors is too large"),
    ],
)  # fmt: skip
def test_header_refusals(fields: dict[str, int], message: str) -> None:
    args = {"tracks": 8, "bat_entries": 1, "nb_sectors": 8, **fields}
    with pytest.raises(LayoutError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        L.parse_header(L.build_header(**args))  # type: ignore[arg-type]


def test_the_largest_values_qemu_takes() -> None:
    h = L.parse_header(
        L.build_header(tracks=L.MAX_TRACKS, bat_entries=L.MAX_BAT_ENTRIES, nb_sectors=L.MAX_SECTORS)
    )
    assert h.cluster_size == 4186127 * 512 and h.virtual_size == (1 << 63) - 512
    assert h.used_entries == L.MAX_BAT_ENTRIES


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.integers(0, 1 << 40))
def test_parsers_raise_only_layout_errors(raw: bytes, file_size: int) -> None:
    head = (L.MAGIC_EXT if raw[:1] != b"\0" else L.MAGIC) + struct.pack("<I", 2) + raw
    for candidate in (raw, head):
        try:
            h = L.parse_header(candidate)
        except LayoutError as exc:
            assert "\n" not in str(exc)
            continue
        assert 0 < h.tracks <= L.MAX_TRACKS and h.used_entries <= h.bat_entries
        bat = L.parse_bat(candidate[64:], min(h.used_entries, len(candidate[64:]) // 4))
        try:
            L.check_extents(h, file_size)
        except LayoutError as exc:
            assert str(exc).startswith("parallels ")
        for index, entry in enumerate(bat):
            try:
                at = L.cluster_at(index, entry or 1, h, file_size)
            except LayoutError as exc:
                assert str(exc).startswith(f"parallels BAT entry {index} ")
            else:
                assert h.bat_end <= at < file_size


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 64).map(lambda n: n * 512),
    st.integers(0, 40),
    st.sets(st.integers(0, 39), max_size=10),
    st.booleans(),
    st.data(),
)
def test_hand_built_images_read_back(
    cluster: int, sectors: int, present: set[int], old: bool, data: st.DataObject
) -> None:
    virtual = sectors * 512
    n = -(-virtual // cluster)
    clusters = {i: pattern(cluster, i + 1) for i in present if i < n}
    img = image(virtual, cluster, clusters, magic=L.MAGIC if old else L.MAGIC_EXT)
    want = b"".join(clusters.get(i, bytes(cluster)) for i in range(n))[:virtual]
    assert read(img) == want
    if virtual:
        start = data.draw(st.integers(0, virtual - 1))
        length = data.draw(st.integers(0, virtual - start))
        assert read(img, start, length) == want[start : start + length]


# --- hand-built images ---------------------------------------------------------------


def test_absent_clusters_and_clusters_past_the_bat_read_as_zeros() -> None:
    # a BAT of two entries for a disk of four clusters
    img = image(4 * 4096, 4096, {1: b"\x11" * 4096}, entries=2)
    assert read(img) == bytes(4096) + b"\x11" * 4096 + bytes(8192)


def test_shared_clusters_read_the_same_bytes() -> None:
    """Two entries naming one cluster: qemu reads it twice, and so does aiodd."""
    img = bytearray(image(2 * 4096, 4096, {0: b"\x22" * 4096}))
    img[68:72] = img[64:68]
    assert read(bytes(img)) == b"\x22" * 8192


def test_a_cluster_ending_past_the_file_reads_zeros_there() -> None:
    img = image(2 * 4096, 4096, {0: b"\x33" * 4096})[:-1000]
    assert read(img) == b"\x33" * 3096 + bytes(1000 + 4096)


def test_inuse_and_format_extension_are_read_through() -> None:
    img = image(4096, 4096, {0: b"\x44" * 4096}, inuse=L.INUSE_MAGIC, ext_off=1)
    assert read(img) == b"\x44" * 4096


def test_entries_past_the_virtual_disk_are_not_looked_at() -> None:
    img = bytearray(image(4096, 4096, {0: b"\x55" * 4096}, entries=3))
    struct.pack_into("<I", img, 68, 0xFFFFFFFF)
    assert read(bytes(img)) == b"\x55" * 4096


def test_a_bad_entry_fails_the_reads_that_reach_it() -> None:
    """As qcow2's clusters: checked when a read reaches them, so a window beside a bad
    entry reads, and one over it fails naming it."""
    img = set32(image(3 * 4096, 4096, {0: b"\x56" * 4096, 2: b"\x57" * 4096}), 72, 1 << 20)
    assert read(img, 0, 8192) == b"\x56" * 4096 + bytes(4096)
    with pytest.raises(ImageError, match=r"^t.prl: parallels BAT entry 2 \(cluster at"):
        read(img, 4096, 4097)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d[:40], "t.prl: parallels header is truncated (40 bytes of 64)"),
        (lambda d: d[:70], "t.prl: parallels BAT (2 entries) lies past the end of the file"),
        (lambda d: d[:4096], "t.prl: parallels BAT entry 0 (cluster at 0x1000) lies past the"
                             " end of the file"),
        (lambda d: set32(d, 48, 1 << 20), "t.prl: parallels data area at 0x20000000 lies past the"
                                          " end of the file"),
        (lambda d: set32(d, 48, 0), None),
    ],
)  # fmt: skip
def test_refusals(edit: object, message: str | None) -> None:
    img = image(2 * 4096, 4096, {0: b"\x66" * 4096, 1: b"\x67" * 4096})
    edited = edit(img)  # type: ignore[operator]
    if message is None:
        assert read(edited) == b"\x66" * 4096 + b"\x67" * 4096
    else:
        assert refused(edited) == message


def set32(data: bytes | bytearray, at: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<I", out, at, value)
    return bytes(out)


def test_a_cluster_inside_the_bat() -> None:
    """512-byte clusters and a BAT of 200 entries (bytes 64 to 864): cluster 1 is in it."""
    img = set32(image(200 * 512, 512, {0: b"\x68" * 512}), 64 + 4 * 5, 1)
    assert (
        refused(img) == "t.prl: parallels BAT entry 5 (cluster at 0x200) overlaps the header or BAT"
    )


def test_data_area_inside_the_bat() -> None:
    img = set32(image(4096, 4096, {}), 48, 0)
    img = bytes(img[:32]) + struct.pack("<I", 200) + img[36:]  # 200 entries: 864 bytes
    img = set32(img.ljust(4096, b"\0"), 48, 1)
    assert refused(img) == "t.prl: parallels data area at 0x200 overlaps the header or BAT"


# --- qemu-made images ----------------------------------------------------------------


def make(tmp_path: Path, name: str, size: str, *opts: str) -> Path:
    path = tmp_path / name
    args = ["create", "-q", "-f", "parallels"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, path, size)
    return path


WRITES = ["write -P 0x11 0 5k", "write -P 0x22 70k 130k", "write -z 300k 64k",
          "write -P 0x33 1M 1M", "write -P 0x44 3070k 2k"]  # fmt: skip


@needs_qemu
@pytest.mark.parametrize("cluster", ["512", "4K", "64K", "1M", "2M"])
def test_parity_with_qemu(tmp_path: Path, cluster: str) -> None:
    path = make(tmp_path, "t.prl", "3M", f"cluster_size={cluster}")
    qemu_io(path, WRITES, "parallels")
    assert read_all(path) == qemu_raw_bytes(path, tmp_path, "parallels")
    assert read_all(path, None) == qemu_raw_bytes(path, tmp_path)


@needs_qemu
def test_converted_image_under_both_magics(tmp_path: Path) -> None:
    from tests.formats_corpus import to_old_magic

    raw = tmp_path / "src.raw"
    raw.write_bytes(pattern(3 * MiB - 512, 9))
    path = tmp_path / "c.prl"
    qemu_img("convert", "-O", "parallels", "-o", "cluster_size=64K", raw, path)
    assert read_all(path) == raw.read_bytes()
    to_old_magic(path)
    assert read_all(path) == qemu_raw_bytes(path, tmp_path) == raw.read_bytes()


@needs_qemu
@pytest.mark.parametrize(
    "window",
    [["bs=1", "skip=70000", "count=70100"], ["bs=3000", "skip=20", "count=400"],
     ["bs=64K", "skip=1"], ["bs=1M", "count=2"], ["bs=512", "skip=6100"]],
)  # fmt: skip
def test_windows_as_qemu_dd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = make(tmp_path, "w.prl", "3M", "cluster_size=4K")
    qemu_io(path, WRITES, "parallels")
    ours = aiodd_run(["if=w.prl", "of=a.raw", *window], tmp_path / "a.raw")
    theirs = qemu_dd(["if=w.prl", "of=q.raw", *window], tmp_path / "q.raw")
    assert (ours.status, ours.stderr, theirs.status) == (0, "", 0)
    assert ours.output == theirs.output


@needs_qemu
def test_an_image_in_use_reads_as_qemu_reads_it(tmp_path: Path) -> None:
    path = make(tmp_path, "u.prl", "1M", "cluster_size=4K")
    qemu_io(path, ["write -P 0x77 4k 8k"], "parallels")
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 44, L.INUSE_MAGIC)
    path.write_bytes(bytes(data))
    assert read_all(path) == qemu_raw_bytes(path, tmp_path, "parallels")


# --- the larger matrix (-m full_matrix) ----------------------------------------------

FULL_CLUSTERS = ["512", "1K", "1536", "4K", "16K", "64K", "256K", "1M", "2M", "4M"]
FULL_WINDOWS = [
    [],
    ["bs=1", "skip=4095", "count=4100"],
    ["bs=512", "skip=1", "count=3"],
    ["bs=3000", "skip=349", "count=700"],
    ["bs=64K", "skip=15", "count=17"],
    ["bs=1M", "skip=1", "count=2"],
    ["bs=7000", "skip=440", "count=7E"],
    ["bs=1M", "skip=4"],
]


@needs_qemu
@pytest.mark.full_matrix
@pytest.mark.parametrize("old", [False, True], ids=["ext-magic", "old-magic"])
@pytest.mark.parametrize("cluster", FULL_CLUSTERS)
def test_parity_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster: str, old: bool
) -> None:
    """Every cluster size under both magics, each window against qemu-img dd."""
    from tests.formats_corpus import to_old_magic

    monkeypatch.chdir(tmp_path)
    path = make(tmp_path, "m.prl", "3M", f"cluster_size={cluster}")
    qemu_io(path, WRITES, "parallels")
    if old:
        to_old_magic(path)
    for window in FULL_WINDOWS:
        for isolation in with_kvm(("inline", "sandbox"), {"parallels"}):
            ours = aiodd_run(
                [f"--isolation={isolation}", "if=m.prl", "of=a.raw", *window], tmp_path / "a.raw"
            )
            theirs = qemu_dd(["if=m.prl", "of=q.raw", *window], tmp_path / "q.raw")
            assert (ours.status, theirs.status) == (0, 0), (window, isolation, ours.stderr)
            assert ours.output == theirs.output, (window, isolation)
