"""The KVM guest's C parallels decoder against its Python twin (docs/kvm.md, "Testing
the decoders").

Every image is read by both decoders (tests/fuzz/hosted.c serves the files from
memory): the same bytes, or the same error -- class and text -- for the open and for
each read.  The images: hand-built ones of every cluster size and both magics (the
decoder tests' builder), the qemu-made ones, a qcow2 over a parallels backing file, the
corrupt-parallels and truncation cases of tests/hostile.py, and random mutations of all
of them (hypothesis).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiodd.formats.parallels import layout as L
from tests import hostile
from tests.conftest import QEMU_IMG, QEMU_IO, needs_qemu, qemu_img, qemu_io
from tests.differential import (
    COMMANDS,
    Differential,
    command_doorbells,
    compare_each,
    cut_short,
    damaged,
    edit_lists,
    edited,
    mutated,
    searching,
)
from tests.formats_corpus import to_old_magic
from tests.fuzz.hosted import Hosted
from tests.test_decode_parallels import image, pattern, set32

MiB = 1 << 20
NAME = "t.prl"


compare = Differential("parallels", NAME)


# -- hand-built images --------------------------------------------------------------------


def _named() -> list[tuple[str, bytes]]:
    four = {0: pattern(4096, 1), 2: pattern(4096, 2), 3: pattern(4096, 3), 9: b"\x09" * 9}
    big = image(3 * MiB, MiB, {1: pattern(MiB, 5)})
    cases = [
        ("empty file", b""),
        ("short header", L.build_header(tracks=8, bat_entries=0, nb_sectors=0)[:63]),
        ("empty disk", image(0, 4096, {})),
        ("no BAT, some size", image(8192, 4096, {}, entries=0)),
        ("512 clusters", image(40 * 512, 512, {1: b"\x01" * 512, 2: b"\x02" * 512, 39: b"z"})),
        ("4k clusters", image(10 * 4096, 4096, four)),
        ("4k old magic", image(10 * 4096, 4096, four, magic=L.MAGIC)),
        ("odd cluster 3 sectors", image(20 * 1536 + 512, 1536, {0: b"a" * 1536, 20: b"b"})),
        ("1M clusters", big),
        ("partial last cluster", image(2 * 4096, 4096, {1: pattern(4096, 7)})[:-1000]),
        ("BAT shorter than disk", image(10 * 4096, 4096, {1: b"\x11" * 4096}, entries=3)),
        ("BAT longer than disk", image(2 * 4096, 4096, {0: b"\x12"}, entries=40)),
        ("in use", image(4096, 4096, {0: b"\x13"}, inuse=L.INUSE_MAGIC)),
        ("format extension", image(4096, 4096, {0: b"\x14"}, ext_off=3)),
        ("data_off zero", image(4096, 4096, {0: b"\x15"}, data_off=0)),
        ("data_off at end", image(4096, 4096, {}, data_off=8)),
        ("data_off past end", image(4096, 4096, {}, data_off=9)),
        ("data_off in BAT", image(200 * 512, 512, {0: b"\x16"}, data_off=1)),
        ("version 1", image(4096, 4096, {}, version=1)),
        ("cluster zero", set32(image(4096, 4096, {}), 28, 0)),
        ("cluster too large", set32(image(4096, 4096, {}), 28, L.MAX_TRACKS + 1)),
        ("cluster largest", set32(image(4096, 4096, {}), 28, L.MAX_TRACKS)),
        ("BAT too large", set32(image(4096, 4096, {}), 32, L.MAX_BAT_ENTRIES + 1)),
        ("BAT past end", set32(image(4096, 4096, {}), 32, 5000)),
        ("size too large", image(4096, 4096, {}, nb_sectors=1 << 54)),
        ("size largest", image(4096, 4096, {}, nb_sectors=(1 << 54) - 1)),
        ("old magic 32-bit size", image(4096, 4096, {0: b"\x17"}, magic=L.MAGIC,
                                        nb_sectors=(1 << 40) | 8)),
        ("entry past end", set32(image(2 * 4096, 4096, {0: b"\x18"}), 68, 0xFFFFFFFF)),
        ("entry at the end", set32(image(2 * 4096, 4096, {0: b"\x19"}), 68, 2)),
        ("cluster right after the BAT", image(112 * 512, 512, {0: b"\x1f", 111: b"\x20"})),
        ("entry in BAT", set32(image(200 * 512, 512, {0: b"\x1a"}), 64 + 4 * 7, 1)),
        ("entry in BAT old magic", set32(image(2 * 4096, 4096, {}, magic=L.MAGIC), 68, 0)),
        ("shared clusters", set32(image(3 * 4096, 4096, {0: b"\x1b", 1: b"\x1c"}), 72, 1)),
        ("backwards clusters", set32(set32(image(2 * 4096, 4096, {0: b"\x1d", 1: b"\x1e"}),
                                           64, 2), 68, 1)),
    ]  # fmt: skip
    return cases


NAMED = _named()


@pytest.mark.parametrize("data", [c[1] for c in NAMED], ids=[c[0] for c in NAMED])
def test_named_cases(hosted: Hosted, data: bytes) -> None:
    compare(hosted, data)


def test_the_cases_reach_what_they_are_named_for(hosted: Hosted) -> None:
    """A few, checked for what they show, so that the comparisons above are not between
    two decoders that both refuse everything."""
    by_name = dict(NAMED)
    got = compare(hosted, by_name["4k old magic"])
    assert got.error is None and got.reads[0][:8192] == pattern(4096, 1) + bytes(4096)
    got = compare(hosted, by_name["backwards clusters"])
    assert got.error is None and got.reads[0][:2] == b"\x1e\x00"
    got = compare(hosted, by_name["entry in BAT"])
    assert got.error is None and got.reads[0] == (
        "ImageError",
        "t.prl: parallels BAT entry 7 (cluster at 0x200) overlaps the header or BAT",
    )
    got = compare(hosted, by_name["cluster too large"])
    assert got.error == (
        "ImageError",
        "t.prl: parallels cluster of 4186128 sectors is too large (at most 4186127)",
    )
    assert compare(hosted, by_name["size largest"]).virtual_size == (1 << 63) - 512
    got = compare(hosted, by_name["cluster right after the BAT"])  # the BAT ends at 512
    assert got.error is None and got.reads[0][:1] == b"\x1f"


def test_a_bat_read_in_pieces(hosted: Hosted) -> None:
    """A BAT of 2 MiB (over the budget of tables held whole when built tiny, and read
    through the cache then) with clusters far apart."""
    n = 1 << 19
    clusters = {0: b"\x21" * 512, n // 2: b"\x22" * 512, n - 1: b"\x23" * 512}
    data = image(n * 512, 512, clusters)
    reads = [(0, 512), ((n // 2) * 512 - 100, 700), ((n - 1) * 512, 512), (1000, 300000)]
    got = compare(hosted, data, reads=lambda vs: reads)
    assert got.reads[1][100:612] == b"\x22" * 512 and got.reads[2] == b"\x23" * 512


def test_a_qcow2_over_a_parallels_image(hosted: Hosted) -> None:
    from tests.test_decode_qcow2 import image as qcow2_image

    base = image(5 * 65536, 65536, {0: pattern(65536, 8), 4: b"\x05" * 9})
    top = qcow2_image({1: (4 * 65536) | (1 << 63)}, [b"\x41" * 65536], backing=b"b.prl",
                      size=6 * 65536)  # fmt: skip
    got = compare(hosted, top, {"b.prl": base}, fmt="qcow2", name="t.qcow2")
    assert got.error is None and got.reads[0][:65536] == pattern(65536, 8)


# -- qemu-made images ---------------------------------------------------------------------


def _make(tmp: Path, name: str, size: str, cluster: str) -> Path:
    path = tmp / name
    qemu_img("create", "-q", "-f", "parallels", "-o", f"cluster_size={cluster}", path, size)
    return path


@needs_qemu
@pytest.mark.parametrize("cluster", ["512", "4K", "64K", "1M"])
@pytest.mark.parametrize("old", [False, True], ids=["ext-magic", "old-magic"])
def test_qemu_images(hosted: Hosted, tmp_path: Path, cluster: str, old: bool) -> None:
    path = _make(tmp_path, "q.prl", "5M", cluster)
    qemu_io(path, ["write -P 0x31 0 100k", "write -P 0x32 1000k 1M", "write -z 3M 64k",
                   "write -P 0x33 4093k 3k"], "parallels")  # fmt: skip
    if old:
        to_old_magic(path)
    got = compare(hosted, path.read_bytes())
    assert got.error is None and got.reads[0][:2] == b"\x31\x31"


# -- the corrupt-parallels cases of tests/hostile.py -------------------------------------


def _hostile_parallels() -> list[tuple[str, bytes]]:
    fields = {k: [(at, fmt, value)] for k, (_, at, fmt, value) in hostile._PARALLELS_CASES.items()}
    return edited("parallels", fields) + damaged("parallels", flips=20)


@needs_qemu
def test_hostile_parallels_cases(hosted: Hosted) -> None:
    outcomes = compare_each(compare, hosted, _hostile_parallels())
    for name, (parts, *_) in hostile._PARALLELS_CASES.items():
        got = outcomes[name]
        # refused at open, or by the first read that reaches the bad entry
        errors = [got.error, *(r for r in got.reads if isinstance(r, tuple))]
        error = next(e for e in errors if e is not None)
        for part in parts:
            assert part in error[1], (name, got.error)


# -- mutations ----------------------------------------------------------------------------

_BASES: list[bytes] = []


def _bases() -> list[bytes]:
    """Small images to mutate: hand-built ones always, a qemu-made one where qemu is."""
    if not _BASES:
        _BASES.append(image(10 * 4096, 4096, {0: pattern(4096, 1), 3: pattern(4096, 3)}))
        _BASES.append(image(40 * 512, 512, {1: b"\x01" * 512, 39: b"z"}, magic=L.MAGIC))
        _BASES.append(image(20 * 1536, 1536, {0: b"a" * 1536, 19: b"b"}))
        if QEMU_IMG is not None and QEMU_IO is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = _make(Path(tmp), "m.prl", "1M", "4K")
                qemu_io(path, ["write -P 0x55 0 12k", "write -P 0x66 900k 4k"], "parallels")
                _BASES.append(path.read_bytes())
    return _BASES


def _aim(where: int, pos: int) -> int:
    """The header and the BAT as often as anywhere."""
    return (pos % 64) if where < 4 else (64 + pos % 256) if where < 8 else pos


@searching
@given(which=st.integers(0, 3), edits=edit_lists(12), cut=st.integers(0, 1 << 20))
def test_mutated_images(
    hosted: Hosted, which: int, edits: list[tuple[int, int, int]], cut: int
) -> None:
    bases = _bases()
    compare(hosted, cut_short(mutated(bases[which % len(bases)], edits, _aim), cut))


# -- batching -----------------------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize(("cluster", "per_command"), [("4K", 1), ("1M", 1)])
def test_doorbells_per_command(
    hosted: Hosted, tmp_path: Path, cluster: str, per_command: int
) -> None:
    """A 4 MiB command is one batch of reads (the clusters qemu-img lays out in order are
    one read each run), never a doorbell per cluster."""
    if hosted.tiny_tables:
        pytest.skip("a one-slot cache reloads the BAT's pieces by design")
    path = _make(tmp_path, "b.prl", "16M", cluster)
    qemu_io(path, ["write -P 0x11 0 16M"], "parallels")
    rung = command_doorbells(hosted, path.read_bytes(), b"\x11")
    assert rung <= per_command * len(COMMANDS) + 2, rung
