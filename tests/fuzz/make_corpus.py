"""Write the fuzzer's seed corpus (README.md): small images qemu-img makes, of every
cluster size and feature the decoder reads, and the hand-built images of
tests/test_decode_qcow2.py, chains and data files bundled with the files they name.

    python tests/fuzz/make_corpus.py DIR

Without qemu-img only the hand-built images are written.  Nothing is committed: the
corpus is made again each run.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

BUNDLE = b"AIODDFZ1"

# (name, qemu-img create options, qemu-io commands, backing files to bundle)
QEMU_IMAGES: list[tuple[str, tuple[str, ...], list[str]]] = [
    (
        "c512.qcow2",
        ("cluster_size=512",),
        ["write -P 0x11 0 4k", "write -z 8k 1k", "write -c -P 0x22 16k 2k"],
    ),
    (
        "c512v2.qcow2",
        ("cluster_size=512", "compat=0.10"),
        ["write -P 0x11 0 3k", "write -c -P 0x22 8k 1k"],
    ),
    (
        "c4k.qcow2",
        ("cluster_size=4k",),
        ["write -P 0x33 0 12k", "write -z 16k 4k", "discard 4k 4k", "write -c -P 0x44 32k 8k"],
    ),
    (
        "c4kv2.qcow2",
        ("cluster_size=4k", "compat=0.10"),
        ["write -P 0x33 0 8k", "write -c -P 0x44 16k 4k"],
    ),
    (
        "zstd4k.qcow2",
        ("cluster_size=4k", "compression_type=zstd"),
        ["write -c -P 0x55 0 8k", "write -P 0x66 12k 4k"],
    ),
    (
        "extl2.qcow2",
        ("cluster_size=16k", "extended_l2=on"),
        ["write -P 0x77 1k 2k", "write -z 6k 1k", "write -c -P 0x88 32k 16k"],
    ),
    ("c64k.qcow2", (), ["write -P 0x99 0 4k", "write -c -P 0xaa 64k 64k"]),
    ("lazy.qcow2", ("cluster_size=4k", "lazy_refcounts=on"), ["write -P 0x12 0 8k"]),
]


def bundle(files: Sequence[bytes]) -> bytes:
    """Several files in one input: the image, then the files it names in order."""
    return BUNDLE + b"".join(struct.pack("<I", len(f)) + f for f in files)


def _qemu(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, cwd=cwd)


def qemu_made(tmp: Path) -> Iterator[tuple[str, bytes]]:
    for name, opts, commands in QEMU_IMAGES:
        path = tmp / name
        _qemu(
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            *(["-o", ",".join(opts)] if opts else []),
            path,
            "128k",
        )
        _qemu("qemu-io", *[arg for c in commands for arg in ("-c", c)], path)
        yield name, path.read_bytes()
    base = tmp / "base.raw"
    base.write_bytes(bytes([0x21]) * 70_000)
    mid = tmp / "mid.qcow2"
    _qemu(
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid,
        "96k",
    )
    _qemu(
        "qemu-io",
        "-c",
        "write -P 0x31 4k 4k",
        "-c",
        "write -c -P 0x32 40k 4k",
        "-c",
        "write -z 60k 4k",
        mid,
    )
    top = tmp / "top.qcow2"
    _qemu(
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top,
        "128k",
    )
    _qemu("qemu-io", "-c", "write -P 0x41 1k 1k", "-c", "write -P 0x42 70k 512", top)
    yield "chain", bundle([top.read_bytes(), mid.read_bytes(), base.read_bytes()])
    data = tmp / "d.qcow2"
    # qemu resolves a relative data file name from its working directory
    _qemu(
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,data_file=d.data",
        data,
        "64k",
        cwd=tmp,
    )
    _qemu("qemu-io", "-c", "write -P 0x61 0 8k", "-c", "write -z 16k 4k", data, cwd=tmp)
    yield "data-file", bundle([data.read_bytes(), (tmp / "d.data").read_bytes()])


def hand_built() -> Iterator[tuple[str, bytes]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_kvm_decoder import NAMED

    for name, data, files in NAMED:
        named = list(files.values())
        yield name.replace(" ", "-"), bundle([data, *named]) if named else data


def write_corpus(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    seeds = list(hand_built())
    if shutil.which("qemu-img") and shutil.which("qemu-io"):
        with tempfile.TemporaryDirectory() as tmp:
            seeds += list(qemu_made(Path(tmp)))
    for name, data in seeds:
        digest = hashlib.sha1(data).hexdigest()[:12]
        (directory / f"{name}-{digest}").write_bytes(data)
    return len(seeds)


def vpc_qemu_made(tmp: Path) -> Iterator[tuple[str, bytes]]:
    """VHDs qemu-img makes (dynamic, fixed), and a differencing one over a dynamic parent
    (qemu cannot make one: tests/hostile.py turns a dynamic disk into one)."""
    from tests import hostile

    writes = ("-c", "write -P 0x11 0 64k", "-c", "write -P 0x12 2100k 4k")
    for name, sub in (("d.vhd", "dynamic"), ("f.vhd", "fixed")):
        path = tmp / name
        _qemu("qemu-img", "create", "-f", "vpc", "-o", f"subformat={sub}", path, "3M")
        _qemu("qemu-io", "-f", "vpc", *writes, path)
        yield f"vpc-{sub}", path.read_bytes()
    kid = tmp / "child.vhd"
    _qemu("qemu-img", "create", "-f", "vpc", kid, "3M")
    _qemu("qemu-io", "-f", "vpc", "-c", "write -P 0x21 4k 8k", kid)
    hostile.vpc_differencing(kid, [(b"W2ru", "d.vhd".encode("utf-16-le"))])
    yield "vpc-differencing", bundle([kid.read_bytes(), (tmp / "d.vhd").read_bytes()])


def vpc_hand_built() -> Iterator[tuple[str, bytes]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_kvm_decoder_vpc import NAMED as VPC_NAMED

    for name, data, files in VPC_NAMED:
        named = list(files.values())
        seed = bundle([data, *named]) if named else data
        if len(seed) <= 1 << 20:  # the fuzzer's -max_len
            yield "vpc-" + name.replace(" ", "-"), seed


def write_vpc_corpus(directory: Path) -> int:
    """The seeds of fuzz_vpc.c."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds = list(vpc_hand_built())
    if shutil.which("qemu-img") and shutil.which("qemu-io"):
        with tempfile.TemporaryDirectory() as tmp:
            seeds += list(vpc_qemu_made(Path(tmp)))
    for name, data in seeds:
        digest = hashlib.sha1(data).hexdigest()[:12]
        (directory / f"{name}-{digest}").write_bytes(data)
    return len(seeds)


if __name__ == "__main__":  # pragma: no cover - by hand: make_corpus.py [vpc] DIR
    if sys.argv[1] == "vpc":
        print(write_vpc_corpus(Path(sys.argv[2])), "seeds")
    else:
        print(write_corpus(Path(sys.argv[1])), "seeds")
