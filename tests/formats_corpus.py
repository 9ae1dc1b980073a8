"""Input images for the end-to-end format parity tests (tests/test_parity_formats.py).

Every image is made by the real tools: ``qemu-img create/convert`` with the relevant
``-o`` options and ``qemu-io`` (``write -P`` patterns, ``write -z``, ``discard``), so its
tables are partly allocated and partly not.  Each lives in a directory of its own (backing
files, data files and extents beside it) and is built once, on first use.

A :class:`Source` is an image plus the ``-f`` both tools are given (None: probed).
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def run(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in args], capture_output=True, check=True, cwd=cwd)


def create(path: Path, fmt: str, size: int | str | None, *opts: str, unsafe: bool = False) -> Path:
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", fmt, *(["-u"] if unsafe else [])]
    if opts:
        args += ["-o", ",".join(opts)]
    args.append(path.name)
    if size is not None:
        args.append(str(size))
    run(*args, cwd=path.parent)
    return path


def io(path: Path, fmt: str, commands: list[str], *, check: bool = True) -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    args.append(path.name)
    subprocess.run([str(a) for a in args], capture_output=True, check=check, cwd=path.parent)


def virtual_size(path: Path, fmt: str | None = None) -> int:
    args = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    done = subprocess.run(args, capture_output=True, check=True)
    size: int = json.loads(done.stdout)["virtual-size"]
    return size


def pattern(size: int, seed: int) -> bytes:
    """Random bytes with zero runs and short repeats: compressible, not trivially."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for start in range(0, size, 3 * 65536 + 4096):
        data[start : start + 50000] = bytes(len(data[start : start + 50000]))
    for start in range(100000, size, 5 * 65536 + 512):
        data[start : start + 30000] = bytes([rng.randrange(256)]) * len(data[start : start + 30000])
    return bytes(data)


def scatter(size: int) -> list[str]:
    """qemu-io commands for a ``size``-byte disk (size >= 4 MiB): data, zeros and
    discards starting and ending inside clusters and across 64 KiB, 1 MiB and 2 MiB."""
    return [
        "write -P 0xab 0 100k",
        "write -P 0x11 300k 7k",
        "write -z 512k 192k",
        "write -P 0x22 1000k 1M",
        "discard 1024k 512k",
        "write -P 0x44 2040k 20k",  # across the 2 MiB block of vpc and 2M clusters
        "write -P 0x45 3071k 3k",
        "write -P 0x55 4444k 1k",
        f"write -P 0x66 {size - 1536} 1536",  # the last sectors
    ]


# --- builders: each gets an empty directory, returns (image, -f for both tools) ----------

Built = tuple[Path, str | None]


def scattered(path: Path, fmt: str, *opts: str, size: int = 5 * MiB) -> Path:
    """A ``fmt`` image of ``size`` bytes made by qemu-img with ``opts``, written as
    :func:`scatter` writes."""
    create(path, fmt, size, *opts)
    io(path, fmt, scatter(size))
    return path


def raw_odd(d: Path) -> Built:
    path = d / "odd.raw"
    path.write_bytes(pattern(3000, 1))
    return path, None


def raw_text(d: Path) -> Built:
    path = d / "notes.txt"  # a text file is a raw disk
    path.write_bytes(b"".join(b"line %04d of a text file\n" % i for i in range(200)))
    return path, None


def raw_mib(d: Path) -> Built:
    path = d / "big.raw"
    path.write_bytes(pattern(5 * MiB + 1, 2))  # rounded up to 512 by both
    return path, None


def _qcow2(
    d: Path, size: int, *opts: str, compressed: bool = True, cluster: int = 64 * KiB
) -> Path:
    path = create(d / "img.qcow2", "qcow2", size, *opts)
    commands = []
    if compressed:  # a whole unallocated cluster (or more), written compressed, first
        start = -(-3 * MiB // cluster) * cluster
        commands.append(f"write -c -P 0x33 {start} {max(128 * KiB, cluster)}")
    io(path, "qcow2", commands + scatter(size))
    return path


def qcow2_v2(d: Path) -> Built:
    return _qcow2(d, 5 * MiB, "compat=0.10"), None


def qcow2_v2_512(d: Path) -> Built:
    return _qcow2(d, 5 * MiB, "compat=0.10", "cluster_size=512", cluster=512), None


def qcow2_v3(d: Path) -> Built:
    path = _qcow2(d, 5 * MiB)
    # v3 zero clusters: one keeps its host cluster (preallocated zero), one is unmapped
    io(path, "qcow2", ["write -P 0x77 3200k 256k", "write -z 3264k 64k", "write -z -u 3392k 64k"])
    return path, None


def qcow2_512(d: Path) -> Built:
    return _qcow2(d, 5 * MiB, "cluster_size=512", cluster=512), None


def qcow2_2m(d: Path) -> Built:
    return _qcow2(d, 7 * MiB, "cluster_size=2M", cluster=2 * MiB), None


def qcow2_extl2(d: Path) -> Built:
    """Extended L2 (32 subclusters of 2 KiB) over a backing file: subclusters that are
    unallocated read from it, zero ones hide it."""
    base = create(d / "base.qcow2", "qcow2", 5 * MiB, "cluster_size=4k")
    io(base, "qcow2", ["write -P 0x5a 0 5M"])
    top = create(
        d / "top.qcow2", "qcow2", 5 * MiB, "extended_l2=on", "backing_file=base.qcow2",
        "backing_fmt=qcow2",
    )  # fmt: skip
    io(top, "qcow2", [
        "write -P 0x01 2k 2k", "write -P 0x02 10k 5k", "write -z 20k 2k", "write -z 128k 64k",
        "discard 256k 64k", "write -P 0x03 1M 64k", "write -z 1M 4k", "write -c -P 0x04 2M 64k",
        "write -P 0x05 2047k 3k", f"write -P 0x06 {5 * MiB - 1536} 1536",
    ])  # fmt: skip
    return top, None


def _compressed(d: Path, *opts: str) -> Path:
    raw = d / "src.raw"
    raw.write_bytes(pattern(5 * MiB, 3))
    path = d / "img.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", *opts, raw, path)
    raw.unlink()
    io(path, "qcow2", ["write -P 0x12 70000 3000", "write -z 1M 64k", "discard 2M 128k"])
    return path


def qcow2_zlib(d: Path) -> Built:
    return _compressed(d), None


def qcow2_zstd(d: Path) -> Built:
    return _compressed(d, "-o", "compression_type=zstd"), None


def qcow2_snapshots(d: Path) -> Built:
    path = _qcow2(d, 5 * MiB)
    run("qemu-img", "snapshot", "-c", "one", path)
    io(path, "qcow2", ["write -P 0x72 512k 1M", "discard 0 64k"])
    run("qemu-img", "snapshot", "-c", "two", path)
    io(path, "qcow2", ["write -z 1M 64k"])
    return path, None


def qcow2_dirty(d: Path) -> Built:
    """Lazy refcounts and the dirty bit, as a crashed VM leaves them."""
    path = create(d / "img.qcow2", "qcow2", 4 * MiB, "lazy_refcounts=on")
    io(path, "qcow2", ["write -P 0x5a 64k 1M", "abort"], check=False)
    assert path.read_bytes()[72:80] == (1).to_bytes(8, "big")
    return path, None


def qcow2_data_file(d: Path) -> Built:
    path = create(d / "img.qcow2", "qcow2", 4 * MiB, "data_file=img.data")
    io(path, "qcow2", ["write -P 0x61 0 1M", "write -z 64k 64k", "discard 256k 64k",
                       "write -P 0x62 2M 512", "write -P 0x63 3M 1000"])  # fmt: skip
    return path, None


def chain_qcow2_vmdk_vmdk(d: Path) -> Built:
    """Three layers, two formats: a 4 MiB qcow2 over a 3 MiB vmdk over a 2 MiB vmdk
    (each backing file shorter than its overlay)."""
    base = create(d / "base.vmdk", "vmdk", 2 * MiB)
    io(base, "vmdk", ["write -P 0xa1 0 2M"])
    mid = create(d / "mid.vmdk", "vmdk", 3 * MiB, "backing_file=base.vmdk", "backing_fmt=vmdk")
    io(mid, "vmdk", ["write -P 0xb2 100k 200k", "write -P 0xb3 2040k 100k"])
    top = create(d / "top.qcow2", "qcow2", 4 * MiB, "backing_file=mid.vmdk", "backing_fmt=vmdk")
    io(top, "qcow2", ["write -P 0xc3 1000 5000", "write -z 150k 20k", "write -P 0xd4 2500k 100k",
                      "write -z 64k 64k"])  # fmt: skip
    return top, None


def chain_qcow2_qcow2_raw(d: Path) -> Built:
    """A 2 MiB qcow2 (4k clusters) over a longer 3 MiB v2 qcow2 over a shorter, odd-sized
    raw file (1000001 bytes)."""
    base = d / "base.raw"
    base.write_bytes(pattern(1_000_001, 4))
    mid = create(
        d / "mid.qcow2", "qcow2", 3 * MiB, "compat=0.10", "backing_file=base.raw",
        "backing_fmt=raw",
    )  # fmt: skip
    io(mid, "qcow2", ["write -P 0x31 64k 64k", "write -z 900k 200k", "write -c -P 0x32 2M 64k"])
    top = create(
        d / "top.qcow2", "qcow2", 2 * MiB, "cluster_size=4k", "backing_file=mid.qcow2",
        "backing_fmt=qcow2",
    )  # fmt: skip
    io(top, "qcow2", ["write -P 0x41 60k 8k", "discard 1M 64k", "write -z 990k 20k",
                      "write -P 0x42 2040k 4k"])  # fmt: skip
    return top, None


def chain_qcow2_qcow2_vhdx(d: Path) -> Built:
    """qcow2 over qcow2 over a dynamic vhdx with 1 MiB blocks."""
    base = create(d / "base.vhdx", "vhdx", 3 * MiB, "block_size=1M")
    io(base, "vhdx", ["write -P 0x91 0 1500k", "write -P 0x92 2M 1M"])
    mid = create(d / "mid.qcow2", "qcow2", 4 * MiB, "backing_file=base.vhdx", "backing_fmt=vhdx")
    io(mid, "qcow2", ["write -P 0x93 1000k 100k", "write -z 2100k 100k"])
    top = create(
        d / "top.qcow2", "qcow2", 4 * MiB, "compat=0.10", "backing_file=mid.qcow2",
        "backing_fmt=qcow2",
    )  # fmt: skip
    io(top, "qcow2", ["write -P 0x94 1040k 30k", "write -P 0x95 3500k 1k"])
    return top, None


def chain_qcow2_vpc(d: Path) -> Built:
    """qcow2 over a dynamic VHD whose CHS size is not a whole number of qcow2 clusters."""
    base = create(d / "base.vhd", "vpc", 3 * MiB)
    io(base, "vpc", ["write -P 0x81 0 3M"])
    top = create(d / "top.qcow2", "qcow2", 4 * MiB, "backing_file=base.vhd", "backing_fmt=vpc")
    io(top, "qcow2", ["write -P 0x82 2M 64k", "write -z 1M 64k"])
    return top, None


def chain_vmdk_over_raw(d: Path) -> Built:
    """A qcow2 over a vmdk whose parentFileNameHint names a raw file.  qemu opens a vmdk
    parent as vmdk, so the chain is refused: both tools must exit 1."""
    base = d / "base.raw"
    base.write_bytes(pattern(MiB, 5))
    mid = create(d / "mid.vmdk", "vmdk", 2 * MiB)
    io(mid, "vmdk", ["write -P 0xb2 100k 200k"])
    data = bytearray(mid.read_bytes())
    at = data.find(b"parentCID=ffffffff")
    end = data.find(b"\0", at)
    text = bytes(data[at:end]).replace(b"parentCID=ffffffff", b"parentCID=12345678")
    text = text.replace(
        b"# The Disk Data Base", b'parentFileNameHint="base.raw"\n# The Disk Data Base'
    )
    data[at : at + len(text)] = text
    mid.write_bytes(bytes(data))
    top = create(
        d / "top.qcow2", "qcow2", 2 * MiB, "backing_file=mid.vmdk", "backing_fmt=vmdk",
        unsafe=True,  # qemu-img create -u: it would not open the chain either
    )  # fmt: skip
    io(top, "qcow2", ["write -P 0xe1 0 64k"], check=False)
    return top, None


def chain_probed(d: Path) -> Built:
    """A qcow2 whose header names its backing file but not its format (no backing format
    extension, as older qemu-img wrote): both tools probe the vmdk under it."""
    base = create(d / "base.vmdk", "vmdk", 3 * MiB)
    io(base, "vmdk", ["write -P 0x3c 0 3M"])
    top = create(d / "top.qcow2", "qcow2", 3 * MiB, "backing_file=base.vmdk", "backing_fmt=vmdk")
    io(top, "qcow2", ["write -P 0x3d 1M 64k", "write -z 2M 4k"])
    data = bytearray(top.read_bytes())
    at = data.find(struct.pack(">I", 0xE2792ACA), 72, 65536)  # the backing format extension
    assert at > 0
    data[at : at + 4] = struct.pack(">I", 0x0BADF00D)  # now an unknown extension: skipped
    top.write_bytes(bytes(data))
    return top, None


def chain_backing_fmt_raw(d: Path) -> Built:
    """backing_fmt=raw over a file that is a qcow2: the format named in the header wins,
    so the base's container bytes are the backing data."""
    base = create(d / "base.qcow2", "qcow2", 3 * MiB)
    io(base, "qcow2", ["write -P 0x4e 0 1M"])
    top = create(
        d / "top.qcow2", "qcow2", 3 * MiB, "backing_file=base.qcow2", "backing_fmt=raw",
        unsafe=True,
    )  # fmt: skip
    io(top, "qcow2", ["write -P 0x4f 128k 64k"])
    return top, None


def qcow_4k(d: Path) -> Built:
    """qcow as qemu-img creates it without a backing file: 4 KiB clusters, 4 KiB L2s."""
    return scattered(d / "img.qcow", "qcow"), None


def qcow_compressed(d: Path) -> Built:
    """Every cluster compressed by ``qemu-img convert -c -O qcow``.  qemu 7.2 ends the
    copy with an empty compressed write, which qcow refuses: the command fails after the
    image is complete, so its status is not looked at, its image is."""
    source = d / "source.raw"
    source.write_bytes(pattern(3 * MiB + 7 * 512, 6))
    path = d / "img.qcow"
    subprocess.run(
        ["qemu-img", "convert", "-c", "-O", "qcow", source.name, path.name],
        capture_output=True, cwd=d,
    )  # fmt: skip
    source.unlink()
    assert virtual_size(path, "qcow") == 3 * MiB + 7 * 512
    return path, None


def chain_qcow_raw(d: Path) -> Built:
    """qcow over a shorter raw file: with a backing file qemu-img makes 512-byte
    clusters and 32 KiB L2 tables."""
    base = d / "base.raw"
    base.write_bytes(pattern(1_500_001, 7))
    top = create(d / "top.qcow", "qcow", 3 * MiB, "backing_file=base.raw", "backing_fmt=raw")
    io(top, "qcow", ["write -P 0x71 1000 5000", "write -z 600k 20k", "write -P 0x72 2M 300k"])
    return top, None


def _qed(d: Path, *opts: str) -> Path:
    return scattered(d / "img.qed", "qed", *opts)


def qed_64k(d: Path) -> Built:
    return _qed(d), None


def qed_4k_t16(d: Path) -> Built:
    return _qed(d, "cluster_size=4k", "table_size=16"), None


def qed_1m_t2(d: Path) -> Built:
    return _qed(d, "cluster_size=1M", "table_size=2"), None


def chain_qed_raw(d: Path) -> Built:
    """qed over raw: backing_fmt=raw sets the no-probe feature, so the base is raw."""
    base = d / "base.raw"
    base.write_bytes(pattern(2_000_000, 8))
    top = create(d / "top.qed", "qed", 3 * MiB, "backing_file=base.raw", "backing_fmt=raw")
    io(top, "qed", ["write -P 0x81 70k 100k", "write -z 1M 64k", "write -P 0x82 2500k 4k"])
    return top, None


def chain_qed_qcow2(d: Path) -> Built:
    """qed over qcow2: qed records no other backing format, so both tools probe."""
    base = create(d / "base.qcow2", "qcow2", 4 * MiB)
    io(base, "qcow2", ["write -P 0x91 0 3M", "write -c -P 0x92 3M 128k"])
    top = create(d / "top.qed", "qed", 4 * MiB, "backing_file=base.qcow2", "backing_fmt=qcow2")
    io(top, "qed", ["write -P 0x93 1000k 100k", "write -z 2M 64k"])
    return top, None


def chain_qcow2_qed_qcow(d: Path) -> Built:
    """qcow2 over qed over qcow: three formats, two of them read-only to aiodd."""
    base = create(d / "base.qcow", "qcow", 2 * MiB)
    io(base, "qcow", ["write -P 0xa1 0 2M"])
    mid = create(d / "mid.qed", "qed", 3 * MiB, "backing_file=base.qcow", "backing_fmt=qcow")
    io(mid, "qed", ["write -P 0xa2 100k 200k", "write -z 1M 128k"])
    top = create(d / "top.qcow2", "qcow2", 4 * MiB, "backing_file=mid.qed", "backing_fmt=qed")
    io(top, "qcow2", ["write -P 0xa3 1000 5000", "write -P 0xa4 2500k 100k"])
    return top, None


def _vmdk(d: Path, subformat: str, size: int, *opts: str) -> Path:
    path = create(d / "img.vmdk", "vmdk", size, f"subformat={subformat}", *opts)
    return path


def vmdk_sparse(d: Path) -> Built:
    path = _vmdk(d, "monolithicSparse", 5 * MiB)
    # descending, so grains lie in the file out of virtual order
    io(path, "vmdk", list(reversed(scatter(5 * MiB))))
    return path, None


def vmdk_zeroed(d: Path) -> Built:
    """Version 2 header with zeroed-grain GTEs, over a parent."""
    base = create(d / "base.vmdk", "vmdk", 4 * MiB)
    io(base, "vmdk", ["write -P 0x55 0 4M"])
    top = create(
        d / "img.vmdk", "vmdk", None, "zeroed_grain=on", "backing_file=base.vmdk",
        "backing_fmt=vmdk",
    )  # fmt: skip
    io(top, "vmdk", ["write -P 0x66 64k 64k", "write -z 192k 128k", "write -P 0x77 900k 1k",
                     "write -z 2000k 100k"])  # fmt: skip
    return top, None


def vmdk_stream(d: Path) -> Built:
    raw = d / "src.raw"
    raw.write_bytes(pattern(5 * MiB + 64 * KiB + 1024, 6))  # a partial last grain
    path = d / "img.vmdk"
    run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, path)
    raw.unlink()
    return path, None


def vmdk_flat(d: Path) -> Built:
    path = _vmdk(d, "monolithicFlat", 5 * MiB)
    io(path, "vmdk", scatter(5 * MiB))
    return path, None


def _two_gb(d: Path, subformat: str) -> Path:
    """4200 MiB: three extents (2 GiB, 2 GiB, 104 MiB), written across both joins.
    Flat extents are sparse files: cheap."""
    path = _vmdk(d, subformat, 4200 * MiB)
    io(path, "vmdk", [
        "write -P 0x71 0 100k", "write -P 0x72 2047M 2M", "write -P 0x73 4095M 1536k",
        "write -z 2048M 4k", f"write -P 0x74 {4200 * MiB - 1536} 1536",
    ])  # fmt: skip
    return path


def vmdk_2gb_sparse(d: Path) -> Built:
    return _two_gb(d, "twoGbMaxExtentSparse"), None


def vmdk_2gb_flat(d: Path) -> Built:
    return _two_gb(d, "twoGbMaxExtentFlat"), None


def _vpc(d: Path, *opts: str, name: str = "img.vhd") -> Path:
    path = create(d / name, "vpc", 5 * MiB, *opts)
    io(path, "vpc", scatter(virtual_size(path, "vpc")))
    return path


def vpc_200g(d: Path) -> Built:
    """Past the CHS ceiling (about 127.5 GiB): the exact size, not the CHS product."""
    path = create(d / "img.vhd", "vpc", 200 * GiB)
    size = virtual_size(path, "vpc")
    io(path, "vpc", [f"write -P 0x3a {size - 3 * MiB} 1M", f"write -P 0x3b {size - 1536} 1536",
                     f"write -P 0x3c {size - 2 * MiB - 1000} 3000"])  # fmt: skip
    return path, None


def vpc_dynamic(d: Path) -> Built:
    return _vpc(d), None


def vpc_fixed(d: Path) -> Built:
    return _vpc(d, "subformat=fixed"), None  # no magic at 0: raw to the probe


def vpc_fixed_forced(d: Path) -> Built:
    return _vpc(d, "subformat=fixed"), "vpc"


def vpc_force_size(d: Path) -> Built:
    return _vpc(d, "force_size=on"), None  # the exact size, not the CHS product


def _vdi(d: Path, *opts: str) -> Path:
    return scattered(d / "img.vdi", "vdi", *opts)


def vdi_dynamic(d: Path) -> Built:
    return _vdi(d), None


def vdi_static(d: Path) -> Built:
    return _vdi(d, "static=on"), None


def vdi_virtualbox(d: Path) -> Built:
    """As VirtualBox writes one: its header text and size, the block map and the data on
    1 MiB boundaries, blocks stored out of order, a discarded block, and an odd disk size
    (VBoxManage convertfromraw) that qemu rounds up to a sector."""
    from tests.test_decode_vdi import image

    data = pattern(6 * MiB, 41)
    blocks = {0: data[:MiB], 2: data[2 * MiB : 3 * MiB], 4: data[4 * MiB : 4 * MiB + 3000]}
    path = d / "vbox.vdi"
    path.write_bytes(
        image(4 * MiB + 3000, blocks, order=[2, 4, 0], discarded=(1,), virtualbox=True)
    )
    return path, None


def chain_qcow2_vdi(d: Path) -> Built:
    """A qcow2 over a VDI, its backing format declared."""
    base = create(d / "base.vdi", "vdi", 3 * MiB)
    io(base, "vdi", ["write -P 0x91 0 3M"])
    top = create(d / "top.qcow2", "qcow2", 4 * MiB, "backing_file=base.vdi", "backing_fmt=vdi")
    io(top, "qcow2", ["write -P 0x92 1M 64k"])
    return top, None


def _parallels(d: Path, *opts: str, size: int = 5 * MiB) -> Path:
    return scattered(d / "img.prl", "parallels", *opts, size=size)


def parallels_1m(d: Path) -> Built:
    return _parallels(d), None  # qemu-img's default cluster, 1 MiB


def parallels_64k(d: Path) -> Built:
    return _parallels(d, "cluster_size=64K"), None


def parallels_4k(d: Path) -> Built:
    return _parallels(d, "cluster_size=4K", size=5 * MiB + 3 * KiB), None


def to_old_magic(path: Path) -> None:
    """Rewrite a qemu-made image under the first magic, whose BAT counts sectors, not
    clusters (qemu 7.2 reads both; qemu-img writes only the second)."""
    data = bytearray(path.read_bytes())
    assert data[:16] == b"WithouFreSpacExt"
    tracks, entries = struct.unpack_from("<II", data, 28)
    data[:16] = b"WithoutFreeSpace"
    for i in range(entries):
        (entry,) = struct.unpack_from("<I", data, 64 + 4 * i)
        struct.pack_into("<I", data, 64 + 4 * i, entry * tracks)
    path.write_bytes(bytes(data))


def parallels_old_magic(d: Path) -> Built:
    path = _parallels(d, "cluster_size=64K")
    to_old_magic(path)
    return path, None


def chain_qcow2_parallels(d: Path) -> Built:
    """A qcow2 over a parallels backing file, probed (qemu-img checks the format given)."""
    base = create(d / "base.prl", "parallels", 3 * MiB, "cluster_size=64K")
    io(base, "parallels", ["write -P 0x91 0 3M", "write -P 0x92 1M 64k"])
    top = create(d / "top.qcow2", "qcow2", 4 * MiB, "backing_file=base.prl",
                 "backing_fmt=parallels")  # fmt: skip
    io(top, "qcow2", ["write -P 0x93 1536k 100k"])
    return top, None


def _vhdx(d: Path, *opts: str) -> Path:
    return scattered(d / "img.vhdx", "vhdx", *opts)


def vhdx_dynamic(d: Path) -> Built:
    return _vhdx(d), None


def vhdx_dynamic_1m(d: Path) -> Built:
    return _vhdx(d, "block_size=1M"), None


def vhdx_256m_blocks(d: Path) -> Built:
    path = create(d / "img.vhdx", "vhdx", GiB, "block_size=256M")
    io(path, "vhdx", ["write -P 0x35 255M 2M", "write -z 600M 1M", "write -P 0x36 1023M 1M"])
    return path, None


def vhdx_fixed_1m(d: Path) -> Built:
    return _vhdx(d, "subformat=fixed", "block_size=1M"), None


# VHDX metadata: region table at 192 KiB, the metadata region's GUID, the logical sector
# size item's GUID (both as stored, little-endian first three fields).
_REGION_TABLE = 192 * KiB
_METADATA_REGION = bytes.fromhex("06A27C8B90479A4BB8FE575F050F886E")
_LOGICAL_SECTOR = bytes.fromhex("1DBF41816FA90947BA47F233A8FAAB5F")


def set_vhdx_logical_sector_size(path: Path, size: int) -> None:
    """Patch the Logical Sector Size metadata item (metadata items carry no checksum).
    qemu-img cannot create such an image; 7.2 refuses to open one."""
    data = bytearray(path.read_bytes())
    assert data[_REGION_TABLE : _REGION_TABLE + 4] == b"regi"
    count = struct.unpack_from("<I", data, _REGION_TABLE + 8)[0]
    for i in range(count):
        at = _REGION_TABLE + 16 + 32 * i
        if data[at : at + 16] == _METADATA_REGION:
            metadata = struct.unpack_from("<Q", data, at + 16)[0]
            break
    else:
        raise AssertionError("no metadata region")
    assert data[metadata : metadata + 8] == b"metadata"
    entries = struct.unpack_from("<H", data, metadata + 10)[0]
    for i in range(entries):
        at = metadata + 32 + 32 * i
        if data[at : at + 16] == _LOGICAL_SECTOR:
            offset = struct.unpack_from("<I", data, at + 16)[0]
            struct.pack_into("<I", data, metadata + offset, size)
            path.write_bytes(bytes(data))
            return
    raise AssertionError("no logical sector size item")


def _vhdx_4k(d: Path, *opts: str) -> Built:
    path = _vhdx(d, *opts)
    twin = d / "twin512.vhdx"  # the same image with 512-byte sectors, which qemu reads
    twin.write_bytes(path.read_bytes())
    set_vhdx_logical_sector_size(path, 4096)
    return path, None


def vhdx_dynamic_4k(d: Path) -> Built:
    return _vhdx_4k(d, "block_size=1M")


def vhdx_fixed_4k(d: Path) -> Built:
    return _vhdx_4k(d, "subformat=fixed", "block_size=1M")


BUILDERS: dict[str, Callable[[Path], Built]] = {
    "raw-3000": raw_odd,
    "raw-text": raw_text,
    "raw-5M+1": raw_mib,
    "qcow2-v2": qcow2_v2,
    "qcow2-v2-512": qcow2_v2_512,
    "qcow2-v3": qcow2_v3,
    "qcow2-512": qcow2_512,
    "qcow2-2M": qcow2_2m,
    "qcow2-extl2": qcow2_extl2,
    "qcow2-zlib": qcow2_zlib,
    "qcow2-zstd": qcow2_zstd,
    "qcow2-snapshots": qcow2_snapshots,
    "qcow2-dirty": qcow2_dirty,
    "qcow2-datafile": qcow2_data_file,
    "chain-qcow2-vmdk-vmdk": chain_qcow2_vmdk_vmdk,
    "chain-qcow2-qcow2-raw": chain_qcow2_qcow2_raw,
    "chain-qcow2-qcow2-vhdx": chain_qcow2_qcow2_vhdx,
    "chain-qcow2-vpc": chain_qcow2_vpc,
    "chain-qcow2-vdi": chain_qcow2_vdi,
    "chain-vmdk-over-raw": chain_vmdk_over_raw,
    "chain-probed": chain_probed,
    "chain-backing-fmt-raw": chain_backing_fmt_raw,
    "qcow-4k": qcow_4k,
    "qcow-compressed": qcow_compressed,
    "chain-qcow-raw": chain_qcow_raw,
    "qed-64k": qed_64k,
    "qed-4k-t16": qed_4k_t16,
    "qed-1M-t2": qed_1m_t2,
    "chain-qed-raw": chain_qed_raw,
    "chain-qed-qcow2": chain_qed_qcow2,
    "chain-qcow2-qed-qcow": chain_qcow2_qed_qcow,
    "vmdk-sparse": vmdk_sparse,
    "vmdk-zeroed": vmdk_zeroed,
    "vmdk-stream": vmdk_stream,
    "vmdk-flat": vmdk_flat,
    "vmdk-2gb-sparse": vmdk_2gb_sparse,
    "vmdk-2gb-flat": vmdk_2gb_flat,
    "vpc-dynamic": vpc_dynamic,
    "vpc-200G": vpc_200g,
    "vpc-fixed": vpc_fixed,
    "vpc-fixed-f": vpc_fixed_forced,
    "vpc-force-size": vpc_force_size,
    "vdi-dynamic": vdi_dynamic,
    "vdi-static": vdi_static,
    "vdi-virtualbox": vdi_virtualbox,
    "vhdx-dynamic": vhdx_dynamic,
    "parallels-1M": parallels_1m,
    "parallels-64k": parallels_64k,
    "parallels-4k": parallels_4k,
    "parallels-old-magic": parallels_old_magic,
    "chain-qcow2-parallels": chain_qcow2_parallels,
    "vhdx-dynamic-1M": vhdx_dynamic_1m,
    "vhdx-fixed-1M": vhdx_fixed_1m,
    "vhdx-256M-blocks": vhdx_256m_blocks,
    "vhdx-dynamic-1M-4k": vhdx_dynamic_4k,
    "vhdx-fixed-1M-4k": vhdx_fixed_4k,
}

# qemu 7.2 refuses 4096-byte logical sectors; these are compared with their 512 twin.
TWINS = {"vhdx-dynamic-1M-4k": "twin512.vhdx", "vhdx-fixed-1M-4k": "twin512.vhdx"}


@dataclass(frozen=True)
class Source:
    name: str
    path: Path
    fmt: str | None  # -f given to both tools; None: probed
    size: int  # the virtual size as qemu sees it (0 when qemu cannot open it)
    twin: Path | None = None  # what qemu-img reads instead (an intended difference)


class Corpus:
    """Builds each image once, on first use, in ``root``/``name``/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Source] = {}

    def get(self, name: str, fmt: str | None = None, *, forced: bool = False) -> Source:
        """The image ``name``; with ``forced``, read as ``-f fmt`` instead of its own."""
        if name not in self._built:
            directory = self.root / name
            directory.mkdir()
            path, own = BUILDERS[name](directory)
            twin = directory / TWINS[name] if name in TWINS else None
            try:
                size = virtual_size(twin or path, own)
            except subprocess.CalledProcessError:
                size = 0
            self._built[name] = Source(name, path, own, size, twin)
        source = self._built[name]
        if not forced:
            return source
        try:
            size = virtual_size(source.twin or source.path, fmt)
        except subprocess.CalledProcessError:
            size = 0
        return Source(f"{name}@{fmt}", source.path, fmt, size, source.twin)
