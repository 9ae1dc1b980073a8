"""Write the fuzzers' seed corpora (README.md): small images qemu-img makes, of every
cluster size, subformat and feature the decoders read, and the hand-built images of
tests/test_kvm_decoder.py and tests/test_kvm_decoder_vmdk.py, chains, data files and
extents bundled with the files they name, in the order the decoder opens them.

    python tests/fuzz/make_corpus.py DIR [qcow2|vmdk]

Without qemu-img only the hand-built images are written.  Nothing is committed: the
corpus is made again each run.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from aiodd.errors import ImageError
from aiodd.formats import registry
from aiodd.formats.base import Reference, VirtualDisk
from aiodd.formats.vmdk import decode as vmdk
from tests.fuzz.hosted import MemFile

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


VMDK_IMAGES: list[tuple[str, tuple[str, ...], list[str]]] = [
    ("sparse", ("subformat=monolithicSparse",), ["write -P 0x11 0 70k", "write -z 128k 64k"]),
    ("zeroed", ("zeroed_grain=on",), ["write -P 0x12 4k 4k", "write -z 64k 64k"]),
    ("compat6", ("compat6=on",), ["write -P 0x13 0 4k"]),
    ("flat", ("subformat=monolithicFlat",), ["write -P 0x14 1k 3k"]),
    ("split-sparse", ("subformat=twoGbMaxExtentSparse",), ["write -P 0x15 0 8k"]),
    ("split-flat", ("subformat=twoGbMaxExtentFlat",), ["write -P 0x16 0 8k"]),
]


class _Recorder:
    """A resolver for the Python decoder that notes the files it opens, in order."""

    def __init__(self, files: dict[str, bytes], opened: list[str]) -> None:
        self.files = files
        self.opened = opened

    def open_file(self, ref: Reference) -> MemFile:
        if len(self.opened) >= 16:  # a looping chain: the fuzzer's bundle holds 16 files
            raise ImageError(ref.referrer, "too many files")
        self.opened.append(ref.name)
        return MemFile(self.files[ref.name], ref.name)

    def open_disk(self, ref: Reference) -> VirtualDisk:
        return registry.open_disk(self.open_file(ref), self, ref.format)


def bundle_in_order(data: bytes, files: dict[str, bytes], name: str = "t.vmdk") -> bytes:
    """``data`` and the files the vmdk decoder opens for it, each where it asks."""
    opened: list[str] = []
    with contextlib.suppress(ImageError, KeyError):
        vmdk.open_disk(MemFile(data, name), _Recorder(files, opened))
    named = [files[n] for n in opened if n in files]
    return bundle([data, *named]) if named else data


def vmdk_qemu_made(tmp: Path) -> Iterator[tuple[str, bytes]]:
    for name, opts, commands in VMDK_IMAGES:
        path = tmp / f"{name}.vmdk"
        _qemu("qemu-img", "create", "-f", "vmdk", "-o", ",".join(opts), path, "256k")
        _qemu("qemu-io", "-f", "vmdk", *[arg for c in commands for arg in ("-c", c)], path)
    raw = tmp / "src.raw"
    raw.write_bytes(bytes(range(256)) * 512 + bytes(64 * 1024) + bytes([7]) * 100_000)
    _qemu("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw,
          tmp / "stream.vmdk")  # fmt: skip
    raw.unlink()
    _qemu("qemu-img", "create", "-f", "vmdk", "-b", "sparse.vmdk", "-F", "vmdk",
          tmp / "child.vmdk", cwd=tmp)  # fmt: skip
    _qemu("qemu-io", "-f", "vmdk", "-c", "write -P 0x17 8k 4k", tmp / "child.vmdk")
    files = {p.name: p.read_bytes() for p in tmp.iterdir()}
    for name in [*(n for n, _, _ in VMDK_IMAGES), "stream", "child"]:
        yield f"vmdk-{name}", bundle_in_order(files[f"{name}.vmdk"], files, f"{name}.vmdk")


def vmdk_hand_built() -> Iterator[tuple[str, bytes]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_kvm_decoder_vmdk import NAMED as VMDK_NAMED

    for name, data, files in VMDK_NAMED:
        if len(data) + sum(map(len, files.values())) < (1 << 20):  # the fuzzer's -max_len
            yield "vmdk-" + name.replace(" ", "-"), bundle_in_order(data, files)


def write_corpus(directory: Path, fmt: str = "qcow2") -> int:
    directory.mkdir(parents=True, exist_ok=True)
    qemu = shutil.which("qemu-img") and shutil.which("qemu-io")
    if fmt == "vmdk":
        seeds = list(vmdk_hand_built())
        if qemu:
            with tempfile.TemporaryDirectory() as tmp:
                seeds += list(vmdk_qemu_made(Path(tmp)))
    else:
        seeds = list(hand_built())
        if qemu:
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


# By hand: make_corpus.py vpc DIR, or make_corpus.py DIR [qcow2|vmdk]
if __name__ == "__main__":  # pragma: no cover - by hand
    if sys.argv[1] == "vpc":
        print(write_vpc_corpus(Path(sys.argv[2])), "seeds")
    else:
        print(write_corpus(Path(sys.argv[1]), *sys.argv[2:3]), "seeds")
