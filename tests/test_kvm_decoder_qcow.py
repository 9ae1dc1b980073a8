"""The KVM guest's C qcow (version 1) decoder against its Python twin (docs/kvm.md,
"Testing the decoders").

Every image is read by both decoders (tests/fuzz/hosted.c serves the files from memory):
the same bytes, or the same error -- class and text -- for the open and each read.  The
images: every case of tests/test_decode_qcow.py, qemu-made ones (plain, compressed by
``qemu-img convert -c``, over a raw file, under a qcow2), the qcow cases of
tests/hostile.py with truncations and bit flips, and random mutations (hypothesis).
"""

from __future__ import annotations

import random
import subprocess
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
from tests.qcow_images import Qcow
from tests.test_decode_qcow import ERRORS, GEOMETRIES, sample

MiB = 1 << 20
NAME = "t.qcow"


compare = Differential("qcow", NAME)


# -- the decoder tests' images -------------------------------------------------------------


@pytest.mark.parametrize(("cb", "l2b"), GEOMETRIES)
def test_every_geometry(hosted: Hosted, cb: int, l2b: int) -> None:
    got = compare(hosted, sample(cb, l2b).build())
    assert got.error is None


@pytest.mark.parametrize(("case", "data"), [e[:2] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_refusals(hosted: Hosted, case: str, data: bytes) -> None:
    got = compare(hosted, data)
    assert got.error is not None or any(isinstance(r, tuple) for r in got.reads)


def test_backing_files(hosted: Hosted) -> None:
    base = random.Random(9).randbytes(3000)
    image = Qcow(8192, 9, 6, data={1: b"\x44" * 512}, backing=b"base.raw").build()
    got = compare(hosted, image, {"base.raw": base})
    assert got.error is None and got.reads[0][:512] == base[:512]
    for name in (b"b.raw\0junk", b"\0\0"):
        compare(hosted, Qcow(4096, backing=name).build(), {"b.raw": b"\x01" * 4096})
    missing = compare(hosted, Qcow(4096, backing=b"nowhere.raw").build())
    assert missing.error is not None and missing.error[0] == "PolicyError"


def test_a_compressed_stream_longer_than_a_cluster(hosted: Hosted) -> None:
    image = Qcow(4 * 512, 9, 6, data={0: b"\x12" * 512, 2: bytes(512)}, compressed={0, 2})
    data = bytearray(image.build())
    got = compare(hosted, bytes(data))
    assert got.error is None and got.reads[0][:512] == b"\x12" * 512


# -- qemu-made images -------------------------------------------------------------------------


@needs_qemu
def test_qemu_images(hosted: Hosted, tmp_path: Path) -> None:
    plain = tmp_path / "p.qcow"
    qemu_img("create", "-q", "-f", "qcow", plain, "5M")
    qemu_io(plain, ["write -P 0xab 0 100k", "write -z 512k 192k", "write -P 0x22 1000k 1M",
                    "write -c -P 0x33 3M 4k", "write -P 0x66 5241344 1024"], "qcow")  # fmt: skip
    assert compare(hosted, plain.read_bytes()).error is None
    source = tmp_path / "s.raw"
    source.write_bytes(random.Random(3).randbytes(MiB) + bytes(MiB) + b"ab" * (MiB // 2))
    packed = tmp_path / "c.qcow"
    # qemu 7.2 ends with an empty compressed write that qcow refuses: the image is whole
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow", source, packed], check=False)
    got = compare(hosted, packed.read_bytes())
    assert got.error is None and got.reads[0] == source.read_bytes()[:MiB]
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "3M")
    qemu_io(base, ["write -P 0x44 0 1M", "write -c -P 0x45 2M 64k"], "qcow2")
    top = tmp_path / "top.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.qcow2", "-F", "qcow2", top, "4M")
    qemu_io(top, ["write -P 0x46 1000 5000", "write -P 0x47 2M 300k"], "qcow")
    got = compare(hosted, top.read_bytes(), {"base.qcow2": base.read_bytes()})
    assert got.error is None and got.reads[0][:1000] == b"\x44" * 1000


@needs_qemu
def test_a_qcow2_over_a_qcow(hosted: Hosted, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow"
    qemu_img("create", "-q", "-f", "qcow", base, "2M")
    qemu_io(base, ["write -P 0x51 0 2M"], "qcow")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow", "-F", "qcow", top, "3M")
    qemu_io(top, ["write -P 0x52 64k 64k"], "qcow2")
    got = compare(hosted, top.read_bytes(), {"base.qcow": base.read_bytes()}, fmt="qcow2",
                  name="t.qcow2")  # fmt: skip
    assert got.error is None and got.reads[0][:64] == b"\x51" * 64


# -- the qcow cases of tests/hostile.py ----------------------------------------------------


@needs_qemu
def test_hostile_qcow_cases(hosted: Hosted, tmp_path: Path) -> None:
    cases = damaged("qcow", flips=30) + field_cases("qcow", hostile._QCOW_FIELD_CASES, tmp_path)
    compare_each(compare, hosted, cases)


# -- mutations ----------------------------------------------------------------------------

_BASES: list[bytes] = []


def _bases() -> list[bytes]:
    if not _BASES:
        _BASES.append(sample(9, 6).build())
        _BASES.append(sample(12, 9).build())
        if QEMU_IMG is not None and QEMU_IO is not None:
            _BASES.append(hostile.base("qcow").data)
    return _BASES


@searching
@given(which=st.integers(0, 2), edits=edit_lists(), cut=st.integers(0, 1 << 20))
def test_mutated_images(
    hosted: Hosted, which: int, edits: list[tuple[int, int, int]], cut: int
) -> None:
    bases = _bases()
    compare(hosted, cut_short(mutated(bases[which % len(bases)], edits, _aim), cut))


def _aim(where: int, pos: int) -> int:
    """The header and the first tables as often as anywhere."""
    return pos % 48 if where < 6 else (pos % 4096 if where < 12 else pos)
