"""Write the fuzzers' seed corpora (README.md): small images qemu-img makes, of every
cluster size, subformat and feature the decoders read, and the hand-built images of
tests/test_kvm_decoder.py and tests/test_kvm_decoder_vmdk.py, chains, data files and
extents bundled with the files they name, in the order the decoder opens them; and
compact vhdx images (qemu's are 9 MiB at least; these 1.4 to 2.7 MiB, every structure
packed just past the first MiB), fixed, dynamic, differencing and dirty.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
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
    # qcow (version 1) and qed, alone and over raw (qed's no-probe feature)
    for fmt, opts in (("qcow", ()), ("qed", ("-o", "cluster_size=4k,table_size=2"))):
        image = tmp / f"o.{fmt}"
        _qemu("qemu-img", "create", "-f", fmt, *opts, image, "128k")
        _qemu("qemu-io", "-f", fmt, "-c", "write -P 0x71 1k 5k", "-c", "write -z 64k 4k", image)
        yield fmt, image.read_bytes()
        over = tmp / f"over.{fmt}"
        _qemu("qemu-img", "create", "-f", fmt, *opts, "-b", "base.raw", "-F", "raw", over,
              "96k", cwd=tmp)  # fmt: skip
        _qemu("qemu-io", "-f", fmt, "-c", "write -P 0x72 8k 4k", over)
        yield f"{fmt}-over-raw", bundle([over.read_bytes(), base.read_bytes()])


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

    def open_layer(self, ref: Reference) -> tuple[MemFile, _Recorder]:
        return self.open_file(ref), self


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


MiB = 1 << 20
KiB = 1 << 10
LOG_GUID = bytes(range(1, 17))


def compact_vhdx(
    virtual_size: int,
    blocks: dict[int, tuple[int, int]],
    *,
    at: int = MiB,
    parent: str | None = None,
    bitmap_at: int = 0,
    log: tuple[bytes, int] | None = None,
    logical: int = 512,
    fill: int = 0x5A,
) -> bytes:
    """A vhdx whose BAT has ``blocks`` (index -> (state, file offset)); the metadata
    and the BAT follow ``at``; a parent locator naming ``parent`` makes it
    differencing, its sector bitmap block at ``bitmap_at``; ``log`` (its entries,
    made with LOG_GUID, and the log's offset) makes it dirty."""
    from aiodd.formats.vhdx import layout as L
    from tests.hostile import vhdx_locator_item

    meta_at = at
    items = [
        (L.FILE_PARAMETERS_GUID, struct.pack("<II", MiB, 2 if parent else 0), 4),
        (L.VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", virtual_size), 6),
        (L.PAGE83_GUID, bytes(range(16)), 6),
        (L.LOGICAL_SECTOR_GUID, struct.pack("<I", logical), 6),
        (L.PHYSICAL_SECTOR_GUID, struct.pack("<I", 4096), 6),
    ]
    if parent is not None:
        pairs = [("parent_linkage", "{0}"), ("relative_path", f".\\{parent}")]
        items.append((L.PARENT_LOCATOR_GUID, vhdx_locator_item(pairs), 4))
    table, values, offset = [], b"", 64 * KiB
    for guid, value, flags in items:
        table.append((guid, offset, len(value), flags))
        values += value.ljust(-(-len(value) // 64) * 64, b"\0")
        offset = 64 * KiB + len(values)
    meta = L.build_metadata_table(table) + values
    meta_length = -(-len(meta) // (64 * KiB)) * 64 * KiB
    bat_at = meta_at + meta_length
    ratio = (1 << 23) * logical // MiB
    entries = max(blocks, default=0) + 1
    if parent is not None:
        entries = max(entries, ratio + 1)
    bat = bytearray(8 * entries)
    for index, (state, where) in blocks.items():
        struct.pack_into("<Q", bat, 8 * index, where | state)
    if parent is not None:
        struct.pack_into("<Q", bat, 8 * ratio, bitmap_at | 6)
    regions = L.Regions(L.Region(bat_at, 64 * KiB), L.Region(meta_at, meta_length))
    data = bytearray(bat_at + max(len(bat), 64 * KiB))
    data[0:8] = L.SIGNATURE
    guid = bytes(16)
    log_length = log_offset = 0
    if log is not None:
        guid = LOG_GUID
        log_length, log_offset = MiB, log[1]
    for seq, where in ((1, L.HEADER_1), (2, L.HEADER_2)):
        header = bytearray(L.build_header(seq, bytes(16), bytes(16), log_length, log_offset))
        header[48:64] = guid
        header[4:8] = bytes(4)
        data[where : where + 4096] = L.checksummed(bytes(header))
    for where in (L.REGION_TABLE_1, L.REGION_TABLE_2):
        data[where : where + 64 * KiB] = L.build_region_table(regions)
    data[meta_at : meta_at + len(meta)] = meta
    data[bat_at : bat_at + len(bat)] = bat
    for index, (state, where) in blocks.items():
        if state in (6, 7):
            length = min(MiB, virtual_size - index * MiB)
            data[len(data) :] = bytes(max(0, where + length - len(data)))
            data[where : where + length] = bytes([fill + index]) * length
    if parent is not None:
        data[len(data) :] = bytes(max(0, bitmap_at + MiB - len(data)))
        data[bitmap_at : bitmap_at + 64] = bytes([0x0F, 0xF0, 0xFF, 0, 0x81] * 12 + [1] * 4)
    if log is not None:
        data[log_offset : log_offset + len(log[0])] = log[0]
    return bytes(data)


def vhdx_seeds() -> Iterator[tuple[str, bytes]]:
    """Compact vhdx images: every structure the decoder reads in under 2.5 MiB."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_decode_vhdx import log_entry

    small = compact_vhdx(256 * KiB, {0: (6, MiB)}, at=MiB + 256 * KiB)
    yield "vhdx-dynamic", small
    yield (
        "vhdx-4k-sectors",
        compact_vhdx(256 * KiB, {0: (6, MiB)}, at=MiB + 256 * KiB, logical=4096),
    )
    yield (
        "vhdx-states",
        compact_vhdx(3 * MiB, {0: (2, 0), 1: (0, 0), 2: (6, MiB), 3: (3, 0)}, at=2 * MiB),
    )
    yield "vhdx-reserved-state", compact_vhdx(2 * MiB, {0: (4, 0), 1: (1, 0)}, at=MiB)
    diff = compact_vhdx(
        512 * KiB, {0: (7, 2 * MiB)}, at=2 * MiB + 512 * KiB, parent="p", bitmap_at=MiB
    )
    yield "vhdx-differencing-raw", bundle([diff, bytes([0x21]) * 300_000])
    yield "vhdx-differencing-vhdx", bundle([diff, small])
    page = bytes(range(256)) * 16
    guid = LOG_GUID
    first = log_entry(5, guid, [(2 * MiB + 4096, page), (2 * MiB + 16384, 8192)], 0, 0)
    second = log_entry(6, guid, [(2 * MiB, page[::-1])], 0, 0)
    dirty = compact_vhdx(
        256 * KiB, {0: (6, 2 * MiB)}, at=2 * MiB + 256 * KiB, log=(first + second, MiB)
    )
    yield "vhdx-dirty-log", dirty


def write_seeds(
    directory: Path,
    hand: Iterable[tuple[str, bytes]],
    qemu: Callable[[Path], Iterable[tuple[str, bytes]]],
) -> int:
    """The seeds ``hand`` and, where qemu is, ``qemu(a temporary folder)`` gives, each
    written under its name and digest; how many."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds = list(hand)
    if shutil.which("qemu-img") and shutil.which("qemu-io"):
        with tempfile.TemporaryDirectory() as tmp:
            seeds += list(qemu(Path(tmp)))
    for name, data in seeds:
        digest = hashlib.sha1(data).hexdigest()[:12]
        (directory / f"{name}-{digest}").write_bytes(data)
    return len(seeds)


def write_corpus(directory: Path, fmt: str = "qcow2") -> int:
    if fmt == "vmdk":
        return write_seeds(directory, vmdk_hand_built(), vmdk_qemu_made)
    return write_seeds(directory, chain(hand_built(), vhdx_seeds()), qemu_made)


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
    return write_seeds(directory, vpc_hand_built(), vpc_qemu_made)


# The seeds' VDIs are of one block and cut where their disk ends (a last block needs only
# its part inside the disk), so that whole images fit in the fuzzer's -max_len
# (VirtualBox's 1 MiB alignment does not).
VDI_DISK = 64 * 1024


def vdi_cut(data: bytes, disk: int = VDI_DISK) -> bytes:
    return data[: int.from_bytes(data[344:348], "little") + disk]


def vdi_hand_built() -> Iterator[tuple[str, bytes]]:
    """Hand-built VDIs, and a few header fields broken."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_decode_vdi import image

    cut, small = vdi_cut, VDI_DISK
    yield "vdi-one-block", cut(image(small, {0: b"\x11" * 4096}), small)
    yield (
        "vdi-virtualbox-text",
        cut(image(small, {0: b"\x12" * 512}, fields={"header_size": 0x190}), small),
    )
    yield "vdi-unallocated", cut(image(small, {}), small)
    yield "vdi-discarded", cut(image(small, {}, discarded=(0,)), small)
    yield "vdi-odd-size", cut(image(3000, {0: b"\x13" * 3000}), 3072)
    yield "vdi-empty", image(0, {})
    for field in ("version", "block_size", "blocks_in_image", "offset_data", "uuid_parent"):
        raw = bytearray(cut(image(small, {0: b"\x14"}), small))
        raw[{"version": 68, "block_size": 376, "blocks_in_image": 384, "offset_data": 344,
             "uuid_parent": 440}[field]] ^= 0x40  # fmt: skip
        yield f"vdi-{field}", bytes(raw)


def vdi_qemu_made(tmp: Path) -> Iterator[tuple[str, bytes]]:
    """qemu-made dynamic and static VDIs."""
    for opts in ("static=off", "static=on"):
        path = tmp / f"{opts}.vdi"
        _qemu("qemu-img", "create", "-f", "vdi", "-o", opts, path, "64k")
        _qemu("qemu-io", "-f", "vdi", "-c", "write -P 0x15 4k 8k", path)
        yield f"vdi-{opts}", vdi_cut(path.read_bytes())


def write_vdi_corpus(directory: Path) -> int:
    """The seeds of fuzz_vdi.c."""
    return write_seeds(directory, vdi_hand_built(), vdi_qemu_made)


def parallels_qemu_made(tmp: Path) -> Iterator[tuple[str, bytes]]:
    """Images qemu-img makes, of several cluster sizes, and one under the old magic."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.formats_corpus import to_old_magic

    writes = ("-c", "write -P 0x11 0 64k", "-c", "write -P 0x12 2100k 4k")
    for cluster in ("512", "4K", "64K", "1M"):
        path = tmp / f"p{cluster}.prl"
        _qemu("qemu-img", "create", "-f", "parallels", "-o", f"cluster_size={cluster}", path, "3M")
        _qemu("qemu-io", "-f", "parallels", *writes, path)
        if len(path.read_bytes()) <= 1 << 20:
            yield f"parallels-{cluster}", path.read_bytes()
    path = tmp / "p4K.prl"
    to_old_magic(path)
    yield "parallels-old-magic", path.read_bytes()


def parallels_hand_built() -> Iterator[tuple[str, bytes]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_kvm_decoder_parallels import NAMED as PARALLELS_NAMED

    for name, data in PARALLELS_NAMED:
        if len(data) <= 1 << 20:  # the fuzzer's -max_len
            yield "parallels-" + name.replace(" ", "-"), data


def write_parallels_corpus(directory: Path) -> int:
    """The seeds of fuzz_parallels.c."""
    return write_seeds(directory, parallels_hand_built(), parallels_qemu_made)


# By hand: make_corpus.py vpc DIR, make_corpus.py vdi DIR, make_corpus.py parallels DIR,
# or make_corpus.py DIR [qcow2|vmdk]
if __name__ == "__main__":  # pragma: no cover - by hand
    if sys.argv[1] == "vpc":
        print(write_vpc_corpus(Path(sys.argv[2])), "seeds")
    elif sys.argv[1] == "vdi":
        print(write_vdi_corpus(Path(sys.argv[2])), "seeds")
    elif sys.argv[1] == "parallels":
        print(write_parallels_corpus(Path(sys.argv[2])), "seeds")
    else:
        print(write_corpus(Path(sys.argv[1]), *sys.argv[2:3]), "seeds")
