"""The KVM guest's C QED decoder against its Python twin (docs/kvm.md, "Testing the
decoders").

Every image is read by both decoders (tests/fuzz/hosted.c serves the files from memory):
the same bytes, or the same error -- class and text -- for the open and each read.  The
images: every case of tests/test_decode_qed.py, qemu-made ones (several cluster and
table sizes, over raw with the no-probe feature, over a qcow2, under a qcow2), the qed
cases of tests/hostile.py with truncations and bit flips, and random mutations
(hypothesis).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import hostile
from tests.conftest import QEMU_IMG, QEMU_IO, needs_qemu, qemu_img, qemu_io
from tests.differential import (
    Differential,
    compare_each,
    cut_short,
    damaged,
    edit_lists,
    field_cases,
    mutated,
    searching,
)
from tests.fuzz.hosted import Hosted
from tests.test_decode_qed import ERRORS, GEOMETRIES, sample

MiB = 1 << 20
NAME = "t.qed"

compare = Differential("qed", NAME)


@pytest.mark.parametrize(("cs", "ts"), GEOMETRIES)
def test_every_geometry(hosted: Hosted, cs: int, ts: int) -> None:
    got = compare(hosted, sample(cs, ts).build())
    assert got.error is None


@pytest.mark.parametrize(("case", "data"), [e[:2] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_refusals(hosted: Hosted, case: str, data: bytes) -> None:
    got = compare(hosted, data)
    assert got.error is not None or any(isinstance(r, tuple) for r in got.reads)


@pytest.mark.parametrize("raw", [False, True], ids=["probed", "no-probe"])
def test_backing_files(hosted: Hosted, raw: bool) -> None:
    base = random.Random(9).randbytes(30000)
    image = sample(4096, 2, backing=b"base.img", raw_backing=raw).build()
    got = compare(hosted, image, {"base.img": base})
    assert got.error is None and got.reads[0][4096:8192] == base[4096:8192]


def test_need_check_and_unknown_compat_bits(hosted: Hosted) -> None:
    from aiodd.formats.qed import layout

    image = sample(4096, 2, features=layout.F_NEED_CHECK, compat_features=0xFF).build()
    assert compare(hosted, image).error is None


@needs_qemu
@pytest.mark.parametrize(
    "opts", [(), ("cluster_size=4k", "table_size=16"), ("cluster_size=1M", "table_size=2")]
)
def test_qemu_images(hosted: Hosted, tmp_path: Path, opts: tuple[str, ...]) -> None:
    image = tmp_path / "q.qed"
    qemu_img("create", "-q", "-f", "qed", *(["-o", ",".join(opts)] if opts else []), image, "5M")
    qemu_io(image, ["write -P 0xab 0 100k", "write -z 512k 192k", "write -P 0x22 1000k 1M",
                    "discard 1024k 512k", "write -P 0x66 5241344 1024"], "qed")  # fmt: skip
    got = compare(hosted, image.read_bytes())
    assert got.error is None and got.reads[0][:100] == b"\xab" * 100


@needs_qemu
def test_qemu_chains(hosted: Hosted, tmp_path: Path) -> None:
    raw = random.Random(4).randbytes(2 * MiB + 5)
    (tmp_path / "base.raw").write_bytes(raw)
    over_raw = tmp_path / "r.qed"
    qemu_img("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", over_raw, "3M")
    qemu_io(over_raw, ["write -P 0x81 70k 100k", "write -z 1M 64k"], "qed")
    got = compare(hosted, over_raw.read_bytes(), {"base.raw": raw})
    assert got.error is None and got.reads[0][:1000] == raw[:1000]

    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "3M")
    qemu_io(base, ["write -P 0x44 0 1M", "write -c -P 0x45 2M 64k"], "qcow2")
    over_qcow2 = tmp_path / "q.qed"
    qemu_img("create", "-q", "-f", "qed", "-b", "base.qcow2", "-F", "qcow2", over_qcow2, "4M")
    qemu_io(over_qcow2, ["write -P 0x93 1000k 100k"], "qed")
    files = {"base.qcow2": base.read_bytes()}
    got = compare(hosted, over_qcow2.read_bytes(), files)
    assert got.error is None and got.reads[2][:64] == b"\x45" * 64

    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "q.qed", "-F", "qed", top, "5M")
    qemu_io(top, ["write -P 0x52 64k 64k"], "qcow2")
    files["q.qed"] = over_qcow2.read_bytes()
    got = compare(hosted, top.read_bytes(), files, fmt="qcow2", name="t.qcow2")
    assert got.error is None and got.reads[0][:64] == b"\x44" * 64


@needs_qemu
def test_hostile_qed_cases(hosted: Hosted, tmp_path: Path) -> None:
    cases = damaged("qed", flips=30) + field_cases("qed", hostile._QED_FIELD_CASES, tmp_path)
    compare_each(compare, hosted, cases)


_BASES: list[bytes] = []


def _bases() -> list[bytes]:
    if not _BASES:
        _BASES.append(sample(4096, 2).build())
        _BASES.append(sample(4096, 16).build())
        if QEMU_IMG is not None and QEMU_IO is not None:
            _BASES.append(hostile.base("qed").data)
    return _BASES


@searching
@given(which=st.integers(0, 2), edits=edit_lists(), cut=st.integers(0, 1 << 20))
def test_mutated_images(
    hosted: Hosted, which: int, edits: list[tuple[int, int, int]], cut: int
) -> None:
    bases = _bases()
    compare(hosted, cut_short(mutated(bases[which % len(bases)], edits, _aim), cut))


def _aim(where: int, pos: int) -> int:
    """The header, the L1 (at the first cluster) and the first L2 as often as anywhere."""
    return pos % 64 if where < 6 else (4096 + pos % 16384 if where < 12 else pos)


def test_a_parents_error_comes_before_a_later_table_error(hosted: Hosted) -> None:
    """Python inflates the parent's compressed cluster when it reads the parent run, so
    its failure comes before the next span's bad L2 table; the guest queues the inflating
    and must run it before it reports the table."""
    from aiodd.formats.qcow import layout as qcow_layout
    from tests.qcow_images import Qcow, Qed

    span = 1024 * 4096  # cluster 4 KiB, tables of 2 clusters
    garbage = qcow_layout.OFLAG_COMPRESSED | 100 << 51  # at offset 0: the header's bytes
    base = Qcow(2 * span, 12, 9, entries={1022: garbage}).build()
    top = Qed(2 * span, data={1023: b"\x5a" * 4096}, backing=b"base.qcow")
    top.l1_entries[1] = 7 * 4096
    got = compare(hosted, top.build(), {"base.qcow": base},
                  reads=lambda size: [(span - 8192, 16384)])  # fmt: skip
    assert got.reads[0] == (
        "ImageError",
        "base.qcow: qcow compressed cluster at 0x0 fails to inflate",
    )
