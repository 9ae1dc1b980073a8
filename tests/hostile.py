"""The hostile corpus: images built to make a disk-image tool leak, hang or crash.

Each :class:`Case` builds one hostile input inside a fresh :class:`Tree`:

    ROOT/host-private.bin   the secret: a host file outside the image's tree, filled
                            with a recognisable marker
    ROOT/outside/           more host files outside the tree (images whose data is the
                            secret), for references that must resolve to a real image
    ROOT/img/               the image's own directory: the input and whatever sits
                            beside it (symlinks, FIFOs, extents, layers)
    ROOT/out/               where the output goes

Both tools run in ``img/``, as a user who works beside the image would: qemu-img
resolves a relative qcow2 data file name against its working directory, not against
the image's directory, so this is where the two read the same names.

Images are made with ``qemu-img create/convert/amend`` and ``qemu-io`` where qemu can
make them, and by editing header bytes with :mod:`struct` where it cannot (qemu 7.2
writes no differencing VHD or VHDX, and no out-of-range field).

A case knows what a correct refusal says (``expect``: substrings of the error line) and
what ``qemu-img dd`` 7.2 does with it (``qemu``: ``"leaks"`` when it copies the secret
into its output, ``"safe"`` when it does not, ``"hangs"`` when it blocks forever).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiodd.formats.crc32c import crc32c
from aiodd.formats.vhdx import layout as vhdx_layout
from bench.vhdx_edit import VhdxImage as VhdxImage
from bench.vhdx_edit import crc_reseal as crc_reseal
from bench.vhdx_edit import vhdx_differencing as vhdx_differencing
from bench.vhdx_edit import vhdx_locator_item as vhdx_locator_item
from tests.conftest import qemu_img, qemu_io

KiB = 1 << 10
MiB = 1 << 20

SECRET_NAME = "host-private.bin"
SECRET_SIZE = 1 * MiB
ENV_VAR = "AIODD_HOSTILE_ENV_SECRET"
"""The runs get the marker in their environment too, so /proc/self/environ is a secret."""

ALLOW = "--allow-backing"
NO_OPTION = "no option allows this"

QemuBehaviour = Literal["leaks", "safe", "hangs"]


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Tree:
    root: Path
    img: Path
    out: Path
    outside: Path
    secret: Path
    marker: bytes

    @property
    def env_marker(self) -> str:
        return self.marker.decode() + "-ENV"

    def host_image(self, fmt: str) -> Path:
        """An image in ``outside/`` whose virtual disk is the secret (made once)."""
        suffix = {"vpc": "vhd"}.get(fmt, fmt)
        path = self.outside / f"parent.{suffix}"
        if not path.exists():
            qemu_img("convert", "-f", "raw", "-O", fmt, self.secret, path)
        return path


def make_tree(root: Path) -> Tree:
    marker = b"AIODD-HOSTILE-SECRET-" + os.urandom(8).hex().encode()
    line = marker + b"-" * (64 - len(marker) - 1) + b"\n"
    assert len(line) == 64
    tree = Tree(
        root=root,
        img=root / "img",
        out=root / "out",
        outside=root / "outside",
        secret=root / SECRET_NAME,
        marker=marker,
    )
    for directory in (tree.img, tree.out, tree.outside):
        directory.mkdir()
    tree.secret.write_bytes(line * (SECRET_SIZE // len(line)))
    return tree


def quoted(name: str | Path) -> str:
    """A reference as aiodd's messages quote it."""
    return f"'{name}'"


# --------------------------------------------------------------------------- bytes


def patch(path: Path, offset: int, fmt: str, *values: int | bytes) -> None:
    data = bytearray(path.read_bytes())
    end = offset + struct.calcsize(fmt)
    if len(data) < end:
        data += bytes(end - len(data))
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(bytes(data))


def unpack(path: Path, offset: int, fmt: str) -> tuple[int, ...]:
    with path.open("rb") as f:
        f.seek(offset)
        values: tuple[int, ...] = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
    return values


def append_aligned(path: Path, payload: bytes, align: int = 512) -> int:
    """Append ``payload`` at the next ``align`` boundary; returns its offset."""
    data = bytearray(path.read_bytes())
    at = -(-len(data) // align) * align
    data += bytes(at - len(data)) + payload
    data += bytes(-len(data) % align)
    path.write_bytes(bytes(data))
    return at


# --------------------------------------------------------------------------- qcow2

QCOW2 = {
    "magic": (0, ">4s"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
QCOW2_COPIED = 1 << 63
QCOW2_COMPRESSED = 1 << 62
QCOW2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
EXT_DATA_FILE = 0x44415441


def qcow2_get(path: Path, name: str) -> int:
    offset, fmt = QCOW2[name]
    return unpack(path, offset, fmt)[0]


def qcow2_set(path: Path, **fields: int) -> None:
    for name, value in fields.items():
        offset, fmt = QCOW2[name]
        patch(path, offset, fmt, value)


def qcow2(
    path: Path,
    size: str = "1M",
    opts: str = "",
    writes: tuple[str, ...] = (),
    *,
    backing: str | None = None,
    backing_fmt: str = "qcow2",
) -> Path:
    """``qemu-img create`` (a backing file is recorded as given, never opened: ``-u``)."""
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", backing_fmt]
    qemu_img(*args, path, size)
    if writes:
        qemu_io(path, list(writes), "qcow2")
    return path


def qcow2_with_data(path: Path, opts: str = "cluster_size=4096") -> Path:
    """A small qcow2 with a few allocated clusters, a zero cluster and holes."""
    return qcow2(
        path,
        "1M",
        opts,
        ("write -P 0x11 0 8k", "write -z 64k 4k", "write -P 0x22 900k 4k"),
    )


def qcow2_l1(path: Path, index: int = 0) -> tuple[int, int]:
    """(file offset of L1[index], its value)."""
    at = qcow2_get(path, "l1_table_offset") + 8 * index
    return at, unpack(path, at, ">Q")[0]


def qcow2_l2(path: Path, index: int = 0) -> tuple[int, int]:
    """(file offset of the first L2 table's entry ``index``, its value)."""
    _, l1 = qcow2_l1(path)
    at = (l1 & QCOW2_OFFSET_MASK) + 8 * index
    return at, unpack(path, at, ">Q")[0]


def qcow2_set_l2(path: Path, index: int, value: int) -> None:
    at, _ = qcow2_l2(path, index)
    patch(path, at, ">Q", value)


def qcow2_compressed_entry(offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster of ``length`` bytes at ``offset``."""
    shift = 62 - (cluster_bits - 8)
    sectors = -(-(length + (offset & 511)) // 512)
    assert sectors - 1 < 1 << (cluster_bits - 8), "compressed payload too long for the entry"
    return QCOW2_COMPRESSED | ((sectors - 1) << shift) | offset


def qcow2_replace_compressed(path: Path, payload: bytes) -> None:
    """Point the first (compressed) cluster at ``payload``, appended to the file."""
    bits = qcow2_get(path, "cluster_bits")
    _, entry = qcow2_l2(path, 0)
    assert entry & QCOW2_COMPRESSED, "the first cluster is not compressed"
    at = append_aligned(path, payload)
    qcow2_set_l2(path, 0, qcow2_compressed_entry(at, len(payload), bits))


def qcow2_extensions(path: Path) -> Iterator[tuple[int, int, int]]:
    """(offset, magic, length) of each header extension."""
    at = qcow2_get(path, "header_length")
    data = path.read_bytes()
    while at + 8 <= len(data):
        magic, length = struct.unpack_from(">II", data, at)
        yield at, magic, length
        if magic == 0:
            return
        at += 8 + (length + 7) // 8 * 8


def qcow2_set_data_file_name(path: Path, name: str) -> None:
    """Rewrite the external data file extension's name (it is the last real extension
    qemu writes, so the ones after it are moved behind the new name)."""
    raw = name.encode()
    data = bytearray(path.read_bytes())
    for at, magic, length in qcow2_extensions(path):
        if magic == EXT_DATA_FILE:
            rest_at = at + 8 + (length + 7) // 8 * 8
            end = next(a for a, m, _ in qcow2_extensions(path) if m == 0) + 8
            rest = bytes(data[rest_at:end])
            new = struct.pack(">II", EXT_DATA_FILE, len(raw)) + raw.ljust(-(-len(raw) // 8) * 8)
            data[at : at + len(new) + len(rest)] = new + rest
            path.write_bytes(bytes(data))
            return
    raise AssertionError("no data file extension")


def qcow2_chain(directory: Path, layers: int) -> Path:
    """``layers`` qcow2 files, l000 (the top) -> l001 -> ... -> the last, 512-byte clusters
    (a few KiB each).  One is made by qemu-img; the others are its bytes with the backing
    name patched (every name has the same length)."""
    names = [f"l{i:03d}.qcow2" for i in range(layers)]
    template = directory / "template.qcow2"
    qcow2(template, "64k", "cluster_size=512", backing=names[1])
    data = template.read_bytes()
    template.unlink()
    offset = qcow2_get_bytes(data, "backing_file_offset")
    size = qcow2_get_bytes(data, "backing_file_size")
    assert size == len(names[1])
    for i, name in enumerate(names):
        layer = bytearray(data)
        if i + 1 < layers:
            layer[offset : offset + size] = names[i + 1].encode()
        else:  # the bottom has no backing file
            struct.pack_into(">QI", layer, 8, 0, 0)
            layer[offset : offset + size] = bytes(size)
        (directory / name).write_bytes(bytes(layer))
    return directory / names[0]


def qcow2_get_bytes(data: bytes, name: str) -> int:
    offset, fmt = QCOW2[name]
    value: int = struct.unpack_from(fmt, data, offset)[0]
    return value


# --------------------------------------------------------------------------- vmdk

VMDK = {
    "version": (4, "<I"),
    "flags": (8, "<I"),
    "capacity": (12, "<Q"),
    "granularity": (20, "<Q"),
    "desc_offset": (28, "<Q"),
    "desc_size": (36, "<Q"),
    "num_gtes_per_gt": (44, "<I"),
    "rgd_offset": (48, "<Q"),
    "gd_offset": (56, "<Q"),
    "grain_offset": (64, "<Q"),
    "compress": (77, "<H"),
}
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF


def vmdk_set(path: Path, at: int = 0, **fields: int) -> None:
    """Patch header fields of the sparse header at ``at`` (0, or a footer)."""
    for name, value in fields.items():
        offset, fmt = VMDK[name]
        patch(path, at + offset, fmt, value)


def vmdk_get(path: Path, name: str, at: int = 0) -> int:
    offset, fmt = VMDK[name]
    return unpack(path, at + offset, fmt)[0]


def vmdk_sparse(path: Path, size: str = "1M", writes: tuple[str, ...] = ()) -> Path:
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", path, size)
    if writes:
        qemu_io(path, list(writes), "vmdk")
    return path


def vmdk_gd_entry(path: Path, index: int = 0) -> tuple[int, int]:
    """(file offset of GD[index], its value: the grain table's sector)."""
    gd = vmdk_get(path, "gd_offset") * 512
    at = gd + 4 * index
    return at, unpack(path, at, "<I")[0]


def vmdk_gt_entry(path: Path, index: int = 0) -> tuple[int, int]:
    """(file offset of the first grain table's entry ``index``, its value)."""
    _, gt = vmdk_gd_entry(path)
    at = gt * 512 + 4 * index
    return at, unpack(path, at, "<I")[0]


def descriptor(create_type: str, extents: list[str], extra: str = "") -> str:
    lines = "\n".join(extents)
    return (
        "# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\n"
        f'{extra}createType="{create_type}"\n\n# Extent description\n{lines}\n\n'
        '# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = "4"\n'
    )


def marker_sector(value: int, kind: int) -> bytes:
    return struct.pack("<QII", value, 0, kind).ljust(512, b"\0")


def sparse_header(*, gd: int, capacity: int, grain_sectors: int, grain_offset: int) -> bytes:
    """A streamOptimized (version 3, compressed, markers) hosted sparse header."""
    head = b"KDMV" + struct.pack(
        "<IIQQQQIQQQ",
        3,
        0x30001,  # valid newline test, compressed grains, markers
        capacity,
        grain_sectors,
        1,  # descriptor at sector 1
        2,
        512,
        0,
        gd,
        grain_offset,
    )
    return (head + b"\0\n \r\n" + struct.pack("<H", 1)).ljust(512, b"\0")


def stream_optimized(
    data: bytes, grain: int = 64 * KiB, payloads: dict[int, bytes] | None = None
) -> bytes:
    """A VMware-style streamOptimized file (qemu never writes this form): grains behind
    markers, then the GT and GD behind markers, and the real header in a footer
    (the header at offset 0 says gdOffset = GD_AT_END).  ``payloads`` replaces the
    compressed bytes of the grains it names."""
    capacity = -(-len(data) // 512)
    gs = grain // 512
    desc = descriptor("streamOptimized", [f'RW {capacity} SPARSE "so.vmdk"']).encode()
    out = bytearray(512) + desc.ljust(1024, b"\0")
    grain_offset = len(out) // 512
    ngrains = -(-capacity // gs)
    assert ngrains <= 512
    gt = [0] * 512
    for g in range(ngrains):
        chunk = data[g * grain : (g + 1) * grain]
        z = (payloads or {}).get(g) or zlib.compress(chunk)
        if not chunk.strip(b"\0") and g not in (payloads or {}):
            continue
        gt[g] = len(out) // 512
        record = struct.pack("<QI", g * gs, len(z)) + z
        out += record.ljust(-(-len(record) // 512) * 512, b"\0")
    out += marker_sector(4, 1)  # a grain table marker: 4 sectors follow
    gt_sector = len(out) // 512
    out += struct.pack("<512I", *gt)
    out += marker_sector(1, 2)  # the grain directory marker
    gd_sector = len(out) // 512
    out += struct.pack("<I", gt_sector).ljust(512, b"\0")
    common = {"capacity": capacity, "grain_sectors": gs, "grain_offset": grain_offset}
    out[:512] = sparse_header(gd=GD_AT_END, **common)
    out += marker_sector(1, 3)  # footer marker
    out += sparse_header(gd=gd_sector, **common)
    out += bytes(512)  # end of stream
    return bytes(out)


def pattern(size: int, seed: int = 7) -> bytes:
    """Data with allocated, zero and compressible stretches (deterministic)."""
    out = bytearray()
    i = 0
    while len(out) < size:
        kind = (i * 5 + seed) % 4
        if kind == 0:
            out += bytes(64 * KiB)
        elif kind == 1:
            out += bytes([i & 0xFF]) * (64 * KiB)
        else:
            block = bytearray(64 * KiB)
            for j in range(0, len(block), 4):
                struct.pack_into("<I", block, j, (j * 2654435761 + i) & 0xFFFFFFFF)
            out += block
        i += 1
    return bytes(out[:size])


# --------------------------------------------------------------------------- vpc

VPC_TYPE_DIFFERENCING = 4


def vpc_checksum(data: bytes | bytearray) -> int:
    return ~sum(data) & 0xFFFFFFFF


def vpc_reseal_footer(footer: bytearray) -> bytearray:
    footer[64:68] = bytes(4)
    footer[64:68] = struct.pack(">I", vpc_checksum(footer))
    return footer


def vpc_reseal_header(header: bytearray) -> bytearray:
    header[36:40] = bytes(4)
    header[36:40] = struct.pack(">I", vpc_checksum(header))
    return header


def vpc_dynamic(path: Path, size: str = "1M", writes: tuple[str, ...] = ()) -> Path:
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", path, size)
    if writes:
        qemu_io(path, list(writes), "vpc")
    return path


def vpc_edit(
    path: Path,
    footer: Callable[[bytearray], None] | None = None,
    header: Callable[[bytearray], None] | None = None,
) -> None:
    """Edit the footer (both copies) and/or the dynamic header, resealing checksums."""
    data = bytearray(path.read_bytes())
    foot = bytearray(data[:512])
    if footer is not None:
        footer(foot)
        foot = vpc_reseal_footer(foot)
        data[:512] = foot
        if data[-512:-504] == b"conectix":
            data[-512:] = foot
    if header is not None:
        at = struct.unpack_from(">Q", foot, 16)[0]
        dyn = bytearray(data[at : at + 1024])
        header(dyn)
        data[at : at + 1024] = vpc_reseal_header(dyn)
    path.write_bytes(bytes(data))


def vpc_differencing(path: Path, locators: list[tuple[bytes, bytes]]) -> Path:
    """Make a qemu dynamic VHD differencing, with parent locators (platform, data)
    stored before the trailing footer (qemu 7.2 cannot create one)."""
    data = bytearray(path.read_bytes())
    footer = bytearray(data[-512:])
    del data[-512:]
    header_at = struct.unpack_from(">Q", data, 16)[0]
    dyn = bytearray(data[header_at : header_at + 1024])
    dyn[40:56] = uuid.uuid4().bytes  # the parent's UUID
    name = "parent.vhd".encode("utf-16-be")
    dyn[64 : 64 + len(name)] = name
    for i, (platform, payload) in enumerate(locators):
        at = len(data)
        space = -(-len(payload) // 512)
        data += payload + bytes(space * 512 - len(payload))
        struct.pack_into(">4sIIIQ", dyn, 576 + 24 * i, platform, space * 512, len(payload), 0, at)
    data[header_at : header_at + 1024] = vpc_reseal_header(dyn)
    footer[60:64] = struct.pack(">I", VPC_TYPE_DIFFERENCING)
    footer = vpc_reseal_footer(footer)
    data[:512] = footer
    data += footer
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------- parallels


def parallels(path: Path, size: str = "4M", writes: tuple[str, ...] = ()) -> Path:
    """A qemu-made parallels image of 4 KiB clusters: a BAT of 1024 entries ends at
    4160, so its data starts at 8 KiB."""
    qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=4K", path, size)
    if writes:
        qemu_io(path, list(writes), "parallels")
    return path


# --------------------------------------------------------------------------- vhdx


def vhdx(path: Path, size: str = "8M", opts: str = "", writes: tuple[str, ...] = ()) -> Path:
    args: list[str | Path] = ["create", "-q", "-f", "vhdx"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, path, size)
    if writes:
        qemu_io(path, list(writes), "vhdx")
    return path


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Built:
    image: Path
    expect: tuple[str, ...]  # substrings the error line must hold
    hidden: tuple[str, ...] = ()  # substrings it must not hold (where a symlink points)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Tree], Built]
    fmt: str | None = None  # -f FMT
    qemu: QemuBehaviour | None = None  # qemu-img dd 7.2, observed; None: not compared
    bug: str | None = None  # a known aiodd bug this case shows (the test is xfail, strict)
    bug_in: tuple[str, ...] = ("sandbox", "inline")  # the isolation modes that show it
    # A tighter bound than the default, in CPU, as a multiple of python_work_unit(): the
    # decoders' work is pure Python, which a slower or busier machine stretches alike.
    cpu_units: float | None = None

    def __repr__(self) -> str:
        return self.id


CASES: list[Case] = []


def case(
    fmt: str | None = None,
    qemu: QemuBehaviour | None = None,
    bug: str | None = None,
    cpu_units: float | None = None,
    bug_in: tuple[str, ...] = ("sandbox", "inline"),
) -> Callable[[Callable[[Tree], Built]], Callable[[Tree], Built]]:
    def register(build: Callable[[Tree], Built]) -> Callable[[Tree], Built]:
        name = build.__name__.removeprefix("build_")
        CASES.append(Case(name, build, fmt, qemu, bug, bug_in, cpu_units))
        return build

    return register


def python_work_unit() -> float:
    """CPU seconds this machine takes, now, for aiodd's pure-Python CRC-32C of 1 MiB (the
    median of five 256 KiB runs, times four): the unit of the cases' CPU bounds.  On one
    machine, as its speed moved by half between runs, the vhdx log cases' linear work
    took 27-37 units while their CPU seconds went from 3.7 to 7.2."""
    data = bytes(range(256)) * 1024
    runs = []
    for _ in range(5):
        started = time.process_time()
        crc32c(data)
        runs.append(time.process_time() - started)
    return 4 * sorted(runs)[2]


def outside_rule(ref: str) -> tuple[str, ...]:
    return (quoted(ref), "outside the allowed directories", ALLOW)


def link_rule(ref: str) -> tuple[str, ...]:
    return (quoted(ref), "symlink", ALLOW)


# -- qcow2 backing files


def backing(tree: Tree, name: str, fmt: str = "raw") -> Path:
    return qcow2(tree.img / "top.qcow2", "1M", backing=name, backing_fmt=fmt)


@case(qemu="leaks")
def build_backing_absolute(tree: Tree) -> Built:
    return Built(backing(tree, str(tree.secret)), outside_rule(str(tree.secret)))


@case(qemu="leaks")
def build_backing_relative_traversal(tree: Tree) -> Built:
    ref = f"../{SECRET_NAME}"
    return Built(backing(tree, ref), outside_rule(ref))


@case(qemu="leaks")
def build_backing_traversal_through_subdirectory(tree: Tree) -> Built:
    (tree.img / "sub").mkdir()
    ref = f"sub/../../{SECRET_NAME}"
    return Built(backing(tree, ref), outside_rule(ref))


@case(qemu="leaks")
def build_backing_symlink_absolute(tree: Tree) -> Built:
    (tree.img / "base.raw").symlink_to(tree.secret)
    return Built(backing(tree, "base.raw"), link_rule("base.raw"), (SECRET_NAME,))


@case(qemu="leaks")
def build_backing_symlink_relative(tree: Tree) -> Built:
    (tree.img / "base.raw").symlink_to(f"../{SECRET_NAME}")
    return Built(backing(tree, "base.raw"), link_rule("base.raw"), (SECRET_NAME,))


@case(qemu="leaks")
def build_backing_symlinked_directory(tree: Tree) -> Built:
    (tree.img / "up").symlink_to("..")
    ref = f"up/{SECRET_NAME}"
    return Built(backing(tree, ref), link_rule(ref))


@case(qemu="leaks")
def build_backing_symlink_chain(tree: Tree) -> Built:
    # two hops inside the tree, then out
    (tree.img / "hop2").symlink_to(tree.secret)
    (tree.img / "hop1").symlink_to("hop2")
    return Built(backing(tree, "hop1"), link_rule("hop1"), (SECRET_NAME,))


@case(qemu="safe")
def build_backing_symlink_loop(tree: Tree) -> Built:
    (tree.img / "loop1").symlink_to("loop2")
    (tree.img / "loop2").symlink_to("loop1")
    return Built(backing(tree, "loop1"), (quoted("loop1"), "symbolic links"))


@case(qemu="safe")
def build_backing_dev_zero(tree: Tree) -> Built:
    return Built(backing(tree, "/dev/zero"), outside_rule("/dev/zero"))


@case(qemu="safe")
def build_backing_symlink_to_dev_zero(tree: Tree) -> Built:
    (tree.img / "zero").symlink_to("/dev/zero")
    return Built(backing(tree, "zero"), link_rule("zero"), ("/dev",))


@case(qemu="safe")
def build_backing_proc_self_environ(tree: Tree) -> Built:
    ref = "/proc/self/environ"
    return Built(backing(tree, ref), (quoted(ref), "/proc", NO_OPTION))


@case(qemu="safe")
def build_backing_symlink_to_proc(tree: Tree) -> Built:
    (tree.img / "env").symlink_to("/proc/self/environ")
    return Built(backing(tree, "env"), (quoted("env"), "/proc", NO_OPTION), ("environ",))


@case(qemu="hangs")
def build_backing_fifo(tree: Tree) -> Built:
    os.mkfifo(tree.img / "fifo")
    return Built(backing(tree, "fifo"), (quoted("fifo"), "FIFO", NO_OPTION))


@case(qemu="safe")
def build_backing_socket(tree: Tree) -> Built:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    try:  # a relative bind keeps the path under the 108-byte limit
        os.chdir(tree.img)
        sock.bind("sock")
    finally:
        os.chdir(cwd)
        sock.close()
    return Built(backing(tree, "sock"), (quoted("sock"), "socket", NO_OPTION))


@case(qemu="safe")
def build_backing_character_device_in_the_tree(tree: Tree) -> Built:
    # /dev/zero's numbers (1, 5) on a node inside the tree: needs CAP_MKNOD; without it
    # a symlink to /dev/zero stands in (refused by another rule)
    try:
        os.mknod(tree.img / "zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        (tree.img / "zero").symlink_to("/dev/zero")
        return Built(backing(tree, "zero"), (quoted("zero"),))
    return Built(backing(tree, "zero"), (quoted("zero"), "character device", NO_OPTION))


@case(qemu="safe")
def build_backing_directory(tree: Tree) -> Built:
    (tree.img / "dir").mkdir()
    return Built(backing(tree, "dir"), (quoted("dir"), "directory"))


@case(qemu="leaks")
def build_backing_json(tree: Tree) -> Built:
    spec = {"driver": "raw", "file": {"driver": "file", "filename": str(tree.secret)}}
    ref = "json:" + json.dumps(spec)
    return Built(backing(tree, ref), ("json:", NO_OPTION))


@case(qemu="leaks")
def build_backing_file_protocol(tree: Tree) -> Built:
    ref = f"file:{tree.secret}"
    return Built(backing(tree, ref), ("protocol prefix 'file:'", NO_OPTION))


@case(qemu="safe")
def build_backing_nbd(tree: Tree) -> Built:
    # port 9 (discard) is closed on any sane test host: qemu fails at once
    return Built(backing(tree, "nbd:127.0.0.1:9"), ("protocol prefix 'nbd:'", NO_OPTION))


@case(qemu="safe")
def build_backing_http(tree: Tree) -> Built:
    ref = "http://127.0.0.1:9/disk.raw"
    return Built(backing(tree, ref), ("protocol prefix 'http:'", NO_OPTION))


@case(qemu="hangs")
def build_backing_loop(tree: Tree) -> Built:
    qcow2(tree.img / "a.qcow2", "1M", backing="b.qcow2")
    qcow2(tree.img / "b.qcow2", "1M", backing="a.qcow2")
    return Built(tree.img / "a.qcow2", (quoted("a.qcow2"), "loops", NO_OPTION))


@case(qemu="hangs")
def build_backing_self(tree: Tree) -> Built:
    image = qcow2(tree.img / "self.qcow2", "1M", backing="self.qcow2")
    return Built(image, (quoted("self.qcow2"), "loops"))


@case(qemu="hangs")
def build_backing_loop_through_symlink(tree: Tree) -> Built:
    # a -> other name of a: a loop by inode, not by spelling
    (tree.img / "alias.qcow2").symlink_to("a.qcow2")
    image = qcow2(tree.img / "a.qcow2", "1M", backing="alias.qcow2")
    return Built(image, (quoted("alias.qcow2"), "loops"))


@case(qemu="safe")
def build_chain_of_100_layers(tree: Tree) -> Built:
    top = qcow2_chain(tree.img, 100)
    return Built(top, ("64 layers", NO_OPTION))


# -- qcow2 external data file


def data_file(tree: Tree, name: str) -> Path:
    image = qcow2(
        tree.img / "df.qcow2",
        "1M",
        f"data_file={tree.img / 'df.raw'},data_file_raw=on",
        ("write -P 0 0 1M",),
    )
    qemu_img("amend", "-f", "qcow2", "-o", f"data_file={name}", image)
    (tree.img / "df.raw").unlink()
    return image


@case(qemu="leaks")
def build_data_file_relative_traversal(tree: Tree) -> Built:
    ref = f"../{SECRET_NAME}"
    return Built(data_file(tree, ref), outside_rule(ref))


@case(qemu="leaks")
def build_data_file_absolute(tree: Tree) -> Built:
    return Built(data_file(tree, str(tree.secret)), outside_rule(str(tree.secret)))


@case(qemu="leaks")
def build_data_file_symlink(tree: Tree) -> Built:
    (tree.img / "data.raw").symlink_to(tree.secret)
    return Built(data_file(tree, "data.raw"), link_rule("data.raw"), (SECRET_NAME,))


@case(qemu="leaks")
def build_data_file_edited_header(tree: Tree) -> Built:
    # the header extension rewritten by hand (a longer name than qemu wrote)
    image = data_file(tree, "d.raw")
    ref = f"./././../{SECRET_NAME}"
    qcow2_set_data_file_name(image, ref)
    return Built(image, outside_rule(ref))


# -- vmdk descriptors and parents


def vmdk_descriptor(tree: Tree, text: str, name: str = "desc.vmdk") -> Path:
    path = tree.img / name
    path.write_text(text)
    return path


@case(qemu="leaks")
def build_vmdk_flat_extent_absolute(tree: Tree) -> Built:
    ref = str(tree.secret)
    text = descriptor("monolithicFlat", [f'RW 2048 FLAT "{ref}" 0'])
    return Built(vmdk_descriptor(tree, text), outside_rule(ref))


@case(qemu="leaks")
def build_vmdk_flat_extent_relative(tree: Tree) -> Built:
    ref = f"../{SECRET_NAME}"
    text = descriptor("monolithicFlat", [f'RW 2048 FLAT "{ref}" 0'])
    return Built(vmdk_descriptor(tree, text), outside_rule(ref))


@case(qemu="leaks")
def build_vmdk_flat_extent_after_a_good_one(tree: Tree) -> Built:
    (tree.img / "good.raw").write_bytes(bytes(64 * KiB))
    ref = f"../{SECRET_NAME}"
    extents = ['RW 128 FLAT "good.raw" 0', f'RW 2048 FLAT "{ref}" 0']
    text = descriptor("twoGbMaxExtentFlat", extents)
    return Built(vmdk_descriptor(tree, text), outside_rule(ref))


@case(qemu="leaks")
def build_vmdk_flat_extent_symlink(tree: Tree) -> Built:
    (tree.img / "flat.raw").symlink_to(tree.secret)
    text = descriptor("monolithicFlat", ['RW 2048 FLAT "flat.raw" 0'])
    return Built(vmdk_descriptor(tree, text), link_rule("flat.raw"), (SECRET_NAME,))


@case(qemu="safe")
def build_vmdk_flat_extent_proc(tree: Tree) -> Built:
    ref = "/proc/self/environ"
    text = descriptor("monolithicFlat", [f'RW 2048 FLAT "{ref}" 0'])
    return Built(vmdk_descriptor(tree, text), (quoted(ref), "/proc", NO_OPTION))


@case(qemu="hangs")
def build_vmdk_flat_extent_fifo(tree: Tree) -> Built:
    os.mkfifo(tree.img / "fifo")
    text = descriptor("monolithicFlat", ['RW 2048 FLAT "fifo" 0'])
    return Built(vmdk_descriptor(tree, text), (quoted("fifo"), "FIFO"))


@case(qemu="leaks")
def build_vmdk_sparse_extent_absolute(tree: Tree) -> Built:
    ref = str(tree.host_image("vmdk"))
    text = descriptor("twoGbMaxExtentSparse", [f'RW 2048 SPARSE "{ref}"'])
    return Built(vmdk_descriptor(tree, text), outside_rule(ref))


@case(qemu="leaks")
def build_vmdk_sparse_extent_relative(tree: Tree) -> Built:
    tree.host_image("vmdk")
    ref = "../outside/parent.vmdk"
    text = descriptor("twoGbMaxExtentSparse", [f'RW 2048 SPARSE "{ref}"'])
    return Built(vmdk_descriptor(tree, text), outside_rule(ref))


@case(qemu="safe")
def build_vmdk_sparse_extent_is_the_secret(tree: Tree) -> Built:
    ref = f"../{SECRET_NAME}"
    text = descriptor("twoGbMaxExtentSparse", [f'RW 2048 SPARSE "{ref}"'])
    return Built(vmdk_descriptor(tree, text), outside_rule(ref))


def vmdk_child(tree: Tree, parent: str) -> Path:
    """A monolithicSparse child of ``parent`` (qemu resolves a relative name against the
    child's directory, reads the parent's CID and writes parentFileNameHint)."""
    child = tree.img / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", parent, "-F", "vmdk", child)
    return child


def vmdk_set_parent_hint(path: Path, name: str) -> None:
    """Rewrite parentFileNameHint in a sparse file's embedded descriptor."""
    data = bytearray(path.read_bytes())
    start = vmdk_get(path, "desc_offset") * 512
    end = start + vmdk_get(path, "desc_size") * 512
    text = bytes(data[start:end]).rstrip(b"\0")
    key = b'parentFileNameHint="'
    at = text.index(key) + len(key)
    text = text[:at] + name.encode() + text[text.index(b'"', at) :]
    assert len(text) < end - start
    data[start:end] = text.ljust(end - start, b"\0")
    path.write_bytes(bytes(data))


@case(qemu="leaks")
def build_vmdk_parent_hint_absolute(tree: Tree) -> Built:
    ref = str(tree.host_image("vmdk"))
    return Built(vmdk_child(tree, ref), outside_rule(ref))


@case(qemu="leaks")
def build_vmdk_parent_hint_relative(tree: Tree) -> Built:
    tree.host_image("vmdk")
    ref = "../outside/parent.vmdk"
    return Built(vmdk_child(tree, ref), outside_rule(ref))


@case(qemu="leaks")
def build_vmdk_parent_hint_json(tree: Tree) -> Built:
    parent = str(tree.host_image("vmdk"))
    child = vmdk_child(tree, parent)
    spec = {"driver": "vmdk", "file": {"driver": "file", "filename": parent}}
    vmdk_set_parent_hint(child, "json:" + json.dumps(spec).replace('"', "'"))
    return Built(child, ("json:", NO_OPTION))


@case(qemu="leaks")
def build_vmdk_parent_hint_edited_to_traverse(tree: Tree) -> Built:
    tree.host_image("vmdk")
    child = vmdk_child(tree, "../outside/parent.vmdk")
    (tree.img / "sub").mkdir()
    ref = "./sub/../../outside/./parent.vmdk"
    vmdk_set_parent_hint(child, ref)
    return Built(child, outside_rule(ref))


@case()
def build_vmdk_extent_flood(tree: Tree) -> Built:
    # more extents than aiodd opens for one image, each naming a file in the tree
    (tree.img / "x.raw").write_bytes(bytes(512))
    text = descriptor("twoGbMaxExtentFlat", ['RW 1 FLAT "x.raw" 0'] * 5000)
    return Built(vmdk_descriptor(tree, text), ("4096",))


# -- VHD and VHDX parents


def vhd_child(tree: Tree, locators: list[tuple[bytes, bytes]]) -> Path:
    tree.host_image("vpc")
    child = vpc_dynamic(tree.img / "child.vhd", "1M")
    return vpc_differencing(child, locators)


def utf16(text: str) -> bytes:
    return text.encode("utf-16-le")


@case(qemu="safe")
def build_vhd_parent_relative_traversal(tree: Tree) -> Built:
    image = vhd_child(tree, [(b"W2ru", utf16("..\\outside\\parent.vhd"))])
    return Built(image, outside_rule("../outside/parent.vhd"))


@case(qemu="safe")
def build_vhd_parent_absolute(tree: Tree) -> Built:
    ref = str(tree.outside / "parent.vhd")
    image = vhd_child(tree, [(b"W2ku", utf16(ref))])
    return Built(image, outside_rule(ref))


@case(qemu="safe")
def build_vhd_parent_mac_url(tree: Tree) -> Built:
    ref = str(tree.outside / "parent.vhd")
    image = vhd_child(tree, [(b"MacX", f"file://{ref}".encode())])
    return Built(image, outside_rule(ref))


@case(qemu="safe")
def build_vhd_parent_secret_by_url(tree: Tree) -> Built:
    image = vhd_child(tree, [(b"MacX", f"file://{tree.secret}".encode())])
    return Built(image, outside_rule(str(tree.secret)))


@case(qemu="safe")
def build_vhd_parent_proc(tree: Tree) -> Built:
    image = vhd_child(tree, [(b"MacX", b"file:///proc/self/environ")])
    return Built(image, (quoted("/proc/self/environ"), "/proc"))


def vhdx_child(tree: Tree, pairs: list[tuple[str, str]]) -> Path:
    tree.host_image("vhdx")
    child = vhdx(tree.img / "child.vhdx", "8M", "block_size=1M,block_state_zero=off")
    return vhdx_differencing(child, pairs)


@case(qemu="safe")
def build_vhdx_parent_relative_traversal(tree: Tree) -> Built:
    image = vhdx_child(tree, [("relative_path", "..\\outside\\parent.vhdx")])
    return Built(image, outside_rule("../outside/parent.vhdx"))


@case(qemu="safe")
def build_vhdx_parent_absolute(tree: Tree) -> Built:
    ref = str(tree.outside / "parent.vhdx")
    image = vhdx_child(tree, [("absolute_win32_path", ref)])
    return Built(image, outside_rule(ref))


@case(qemu="safe")
def build_vhdx_parent_windows_drive(tree: Tree) -> Built:
    image = vhdx_child(tree, [("absolute_win32_path", "C:\\images\\parent.vhdx")])
    return Built(image, ("C:", NO_OPTION))


@case(qemu="safe")
def build_vhdx_parent_is_the_secret(tree: Tree) -> Built:
    image = vhdx_child(tree, [("relative_path", f"..\\{SECRET_NAME}")])
    return Built(image, outside_rule(f"../{SECRET_NAME}"))


@case(qemu="safe")
def build_vhd_parent_is_itself(tree: Tree) -> Built:
    image = vhd_child(tree, [(b"W2ru", utf16(".\\child.vhd"))])
    return Built(image, (quoted("child.vhd"), "loops"))


@case(qemu="safe")
def build_vhdx_parent_is_itself(tree: Tree) -> Built:
    image = vhdx_child(tree, [("relative_path", ".\\child.vhdx")])
    return Built(image, (quoted("child.vhdx"), "loops"))


@case(qemu="hangs")
def build_vmdk_parent_is_itself(tree: Tree) -> Built:
    parent = vmdk_sparse(tree.img / "p.vmdk")
    child = vmdk_child(tree, "p.vmdk")
    parent.unlink()
    vmdk_set_parent_hint(child, "child.vmdk")
    return Built(child, (quoted("child.vmdk"), "loops"))


@case()
def build_vmdk_extents_more_than_open_files(tree: Tree) -> Built:
    # under aiodd's extent limit, over the usual 1024 open files: a refusal must still
    # be one clean line (whichever limit it meets first)
    (tree.img / "x.raw").write_bytes(bytes(512))
    text = descriptor("twoGbMaxExtentFlat", ['RW 1 FLAT "x.raw" 0'] * 4000 + ['RW 1 FLAT "y" 0'])
    return Built(vmdk_descriptor(tree, text), (quoted("y"),))


# -- qcow (version 1) and QED backing files


def qcow(path: Path, size: str = "1M", writes: tuple[str, ...] = (), *, backing: str = "") -> Path:
    """``qemu-img create -f qcow`` (a backing file recorded as given, never opened)."""
    args: list[str | Path] = ["create", "-q", "-f", "qcow"]
    if backing:
        args += ["-u", "-b", backing, "-F", "raw"]
    qemu_img(*args, path, size)
    if writes:
        qemu_io(path, list(writes), "qcow")
    return path


def qed(
    path: Path, size: str = "1M", writes: tuple[str, ...] = (), *, backing: str = "",
    backing_fmt: str = "raw", opts: str = "cluster_size=4096",
) -> Path:  # fmt: skip
    """``qemu-img create -f qed``; ``backing_fmt=raw`` sets the no-probe feature."""
    args: list[str | Path] = ["create", "-q", "-f", "qed", "-o", opts]
    if backing:
        args += ["-u", "-b", backing, "-F", backing_fmt]
    qemu_img(*args, path, size)
    if writes:
        qemu_io(path, list(writes), "qed")
    return path


@case(qemu="leaks")
def build_qcow_backing_absolute(tree: Tree) -> Built:
    image = qcow(tree.img / "top.qcow", backing=str(tree.secret))
    return Built(image, outside_rule(str(tree.secret)))


@case(qemu="leaks")
def build_qcow_backing_symlink(tree: Tree) -> Built:
    (tree.img / "base.raw").symlink_to(tree.secret)
    return Built(qcow(tree.img / "top.qcow", backing="base.raw"), link_rule("base.raw"))


@case(qemu="safe")
def build_qcow_backing_dev_zero(tree: Tree) -> Built:
    return Built(qcow(tree.img / "top.qcow", backing="/dev/zero"), outside_rule("/dev/zero"))


@case(qemu="hangs")
def build_qcow_backing_loop(tree: Tree) -> Built:
    qcow(tree.img / "a.qcow", backing="b.qcow")
    qcow(tree.img / "b.qcow", backing="a.qcow")
    return Built(tree.img / "a.qcow", (quoted("a.qcow"), "loops", NO_OPTION))


@case(qemu="leaks")
def build_qed_backing_relative_traversal(tree: Tree) -> Built:
    ref = f"../{SECRET_NAME}"
    return Built(qed(tree.img / "top.qed", backing=ref), outside_rule(ref))


@case(qemu="leaks")
def build_qed_backing_symlink(tree: Tree) -> Built:
    (tree.img / "base.raw").symlink_to(tree.secret)
    return Built(qed(tree.img / "top.qed", backing="base.raw"), link_rule("base.raw"))


@case(qemu="safe")
def build_qed_backing_proc(tree: Tree) -> Built:
    ref = "/proc/self/environ"
    return Built(qed(tree.img / "top.qed", backing=ref), (quoted(ref), "/proc", NO_OPTION))


@case(qemu="hangs")
def build_qed_backing_loop_through_qcow2(tree: Tree) -> Built:
    """qed -> qcow2 -> qed: a loop across formats (the qed's backing is probed)."""
    qed(tree.img / "a.qed", backing="b.qcow2", backing_fmt="qcow2")
    qcow2(tree.img / "b.qcow2", "1M", backing="a.qed", backing_fmt="qed")
    return Built(tree.img / "a.qed", (quoted("a.qed"), "loops", NO_OPTION))


REFERENCE_CASES = list(CASES)
"""The cases whose hostility is a reference to a host file (qemu-img dd is compared)."""


# -- corrupt qcow2: size claims and fields out of range


def qcow2_case(
    fields: dict[str, int], expect: tuple[str, ...], opts: str = "cluster_size=4096"
) -> Callable[[Tree], Built]:
    def build(tree: Tree) -> Built:
        image = qcow2_with_data(tree.img / "bad.qcow2", opts)
        qcow2_set(image, **fields)
        return Built(image, ("qcow2", *expect))

    return build


_QCOW2_FIELD_CASES: dict[str, tuple[dict[str, int], tuple[str, ...]]] = {
    "l1_size_huge": ({"l1_size": 0x7FFF_FFFF}, ("L1 table", "too large")),
    "l1_size_max": ({"l1_size": 0xFFFF_FFFF}, ("L1 table",)),
    "l1_table_past_end": ({"l1_table_offset": 1 << 40}, ("L1 table", "past the end")),
    "l1_table_unaligned": ({"l1_table_offset": 0x3001}, ("L1 table",)),
    "l1_too_small_for_size": ({"size": 1 << 40}, ("L1 table", "too small")),
    "virtual_size_max": ({"size": (1 << 64) - 1, "l1_size": 0x7FFF_FFFF}, ("L1 table",)),
    "virtual_size_huge_l1_claimed": ({"size": 1 << 50, "l1_size": 1 << 25}, ("L1 table",)),
    "refcount_table_huge": ({"refcount_table_clusters": 0xFFFF_FFFF}, ("refcount table",)),
    "refcount_table_past_end": ({"refcount_table_offset": 1 << 44}, ("refcount table",)),
    "refcount_table_none": ({"refcount_table_clusters": 0}, ("refcount table",)),
    "refcount_order_huge": ({"refcount_order": 0xFFFF}, ("refcount_order",)),
    "snapshots_huge": ({"nb_snapshots": 0xFFFF_FFFF, "snapshots_offset": 4096}, ("snapshot",)),
    "snapshots_past_end": ({"nb_snapshots": 3, "snapshots_offset": 1 << 40}, ("snapshot",)),
    "cluster_bits_0": ({"cluster_bits": 0}, ("cluster_bits",)),
    "cluster_bits_8": ({"cluster_bits": 8}, ("cluster_bits",)),
    "cluster_bits_22": ({"cluster_bits": 22}, ("cluster_bits",)),
    "cluster_bits_63": ({"cluster_bits": 63}, ("cluster_bits",)),
    "cluster_bits_max": ({"cluster_bits": 0xFFFF_FFFF}, ("cluster_bits",)),
    "header_length_huge": ({"header_length": 0xFFFF_FFFF}, ("header_length",)),
    "header_length_short": ({"header_length": 8}, ("header_length",)),
    "backing_name_offset_outside": ({"backing_file_offset": 1 << 40}, ("backing file",)),
    "backing_name_size_huge": (
        {"backing_file_offset": 4000, "backing_file_size": 0xFFFF_FFFF},
        ("backing file",),
    ),
    "version_4": ({"version": 4}, ("version",)),
    "version_max": ({"version": 0xFFFF_FFFF}, ("version",)),
    "encrypted": ({"crypt_method": 2}, ("encryption",)),
    "unknown_incompatible_feature": ({"incompatible_features": 1 << 40}, ("feature",)),
    "compression_type_unknown": ({"compression_type": 7}, ("compression type",)),
}
for _name, (_fields, _expect) in _QCOW2_FIELD_CASES.items():
    CASES.append(Case(f"qcow2_{_name}", qcow2_case(_fields, _expect)))


@case()
def build_qcow2_header_extension_huge(tree: Tree) -> Built:
    image = qcow2_with_data(tree.img / "bad.qcow2")
    at = qcow2_get(image, "header_length")
    patch(image, at, ">II", 0x12345678, 0xFFFF_FFF0)
    return Built(image, ("qcow2", "header extension"))


@case()  # found while copying: the temporary output must go
def build_qcow2_l2_table_past_end(tree: Tree) -> Built:
    image = qcow2_with_data(tree.img / "bad.qcow2")
    at, _ = qcow2_l1(image)
    patch(image, at, ">Q", QCOW2_COPIED | (1 << 40))
    return Built(image, ("qcow2", "L2 table", "past the end"))


@case()  # found while copying: the temporary output must go
def build_qcow2_l2_table_unaligned(tree: Tree) -> Built:
    image = qcow2_with_data(tree.img / "bad.qcow2")
    at, value = qcow2_l1(image)
    patch(image, at, ">Q", value + 512)
    return Built(image, ("qcow2", "L2 table", "aligned"))


@case()  # found while copying: the temporary output must go
def build_qcow2_data_cluster_past_end(tree: Tree) -> Built:
    image = qcow2_with_data(tree.img / "bad.qcow2")
    qcow2_set_l2(image, 1, QCOW2_COPIED | (1 << 45))
    return Built(image, ("qcow2", "data cluster", "past the end"))


@case()  # found while copying: the temporary output must go
def build_qcow2_data_cluster_at_max_offset(tree: Tree) -> Built:
    image = qcow2_with_data(tree.img / "bad.qcow2")
    qcow2_set_l2(image, 1, QCOW2_COPIED | QCOW2_OFFSET_MASK & ~0xFFF)
    return Built(image, ("qcow2", "data cluster", "past the end"))


@case()  # found while copying: the temporary output must go
def build_qcow2_data_cluster_unaligned(tree: Tree) -> Built:
    image = qcow2_with_data(tree.img / "bad.qcow2")
    _, value = qcow2_l2(image, 0)
    qcow2_set_l2(image, 0, value + 512)
    return Built(image, ("qcow2", "data cluster", "aligned"))


@case()  # found while copying: the temporary output must go
def build_qcow2_zero_flag_in_version_2(tree: Tree) -> Built:
    image = qcow2_with_data(tree.img / "bad.qcow2", "cluster_size=4096,compat=0.10")
    qcow2_set_l2(image, 5, 1)
    return Built(image, ("qcow2", "zero cluster", "version 2"))


def qcow2_compressed(tree: Tree, opts: str = "cluster_size=65536") -> Path:
    return qcow2(tree.img / "bomb.qcow2", "1M", opts, ("write -c -P 0x5a 0 64k",))


def deflate(data: bytes, wbits: int = -12) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


@case()  # found while copying: the temporary output must go
def build_qcow2_deflate_bomb(tree: Tree) -> Built:
    # 64 KiB clusters; ~64 KiB of deflate that inflates to 64 MiB
    image = qcow2_compressed(tree)
    qcow2_replace_compressed(image, deflate(bytes(64 * MiB)))
    return Built(image, ("qcow2", "compressed cluster", "beyond one cluster"))


@case()  # found while copying: the temporary output must go
def build_qcow2_deflate_endless(tree: Tree) -> Built:
    # a stream with no final block: it never ends, and inflates far past the cluster
    image = qcow2_compressed(tree)
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    stream = c.compress(bytes(32 * MiB)) + c.flush(zlib.Z_SYNC_FLUSH)
    qcow2_replace_compressed(image, stream)
    return Built(image, ("qcow2", "compressed cluster", "beyond one cluster"))


@case()  # found while copying: the temporary output must go
def build_qcow2_deflate_garbage(tree: Tree) -> Built:
    image = qcow2_compressed(tree)
    qcow2_replace_compressed(image, bytes(range(256)) * 16)
    return Built(image, ("qcow2", "compressed cluster"))


@case()  # found while copying: the temporary output must go
def build_qcow2_deflate_short(tree: Tree) -> Built:
    image = qcow2_compressed(tree)
    qcow2_replace_compressed(image, deflate(b"x" * 1000))
    return Built(image, ("qcow2", "compressed cluster", "less than one cluster"))


@case()  # found while copying: the temporary output must go
def build_qcow2_compressed_cluster_past_end(tree: Tree) -> Built:
    image = qcow2_compressed(tree)
    qcow2_set_l2(image, 0, qcow2_compressed_entry(1 << 40, 4096, 16))
    return Built(image, ("qcow2", "compressed cluster", "past the end"))


def zstd_compress(data: bytes, **kw: object) -> bytes:
    import zstandard

    out: bytes = zstandard.ZstdCompressor(level=19, **kw).compress(data)  # type: ignore[arg-type]
    return out


@case()  # found while copying: the temporary output must go
def build_qcow2_zstd_bomb(tree: Tree) -> Built:
    image = qcow2_compressed(tree, "cluster_size=65536,compression_type=zstd")
    qcow2_replace_compressed(image, zstd_compress(bytes(64 * MiB)))
    return Built(image, ("qcow2", "compressed cluster", "beyond one cluster"))


@case()  # found while copying: the temporary output must go
def build_qcow2_zstd_bomb_without_content_size(tree: Tree) -> Built:
    import zstandard

    image = qcow2_compressed(tree, "cluster_size=65536,compression_type=zstd")
    c = zstandard.ZstdCompressor(level=19, write_content_size=False).compressobj()
    payload = c.compress(bytes(64 * MiB)) + c.flush()
    qcow2_replace_compressed(image, payload)
    return Built(image, ("qcow2", "compressed cluster"))


def zstd_frame(window_log: int, block: bytes) -> bytes:
    """A zstd frame by hand: no content size, the given window, one raw last block."""
    descriptor = 0x00  # no checksum, no dictionary, no content size, not single-segment
    window = (window_log - 10) << 3
    block_header = (1 | (0 << 1) | (len(block) << 3)).to_bytes(3, "little")
    return b"\x28\xb5\x2f\xfd" + bytes([descriptor, window]) + block_header + block


@case()  # found while copying: the temporary output must go
def build_qcow2_zstd_huge_window(tree: Tree) -> Built:
    # a frame asking for a 2 GiB window: a decoder that honours it allocates 2 GiB
    image = qcow2_compressed(tree, "cluster_size=65536,compression_type=zstd")
    qcow2_replace_compressed(image, zstd_frame(31, b"x" * 1000))
    return Built(image, ("qcow2", "compressed cluster"))


@case()  # found while copying: the temporary output must go
def build_qcow2_zstd_garbage(tree: Tree) -> Built:
    image = qcow2_compressed(tree, "cluster_size=65536,compression_type=zstd")
    qcow2_replace_compressed(image, b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 8)
    return Built(image, ("qcow2", "compressed cluster"))


# -- corrupt vmdk


def vmdk_case(fields: dict[str, int], expect: tuple[str, ...]) -> Callable[[Tree], Built]:
    def build(tree: Tree) -> Built:
        image = vmdk_sparse(tree.img / "bad.vmdk", "1M", ("write -P 0x33 0 64k",))
        vmdk_set(image, **fields)
        return Built(image, ("vmdk", *expect))

    return build


_VMDK_FIELD_CASES: dict[str, tuple[dict[str, int], tuple[str, ...]]] = {
    "grain_directory_huge": ({"capacity": 1 << 40, "granularity": 1}, ("grain directory",)),
    "capacity_max": ({"capacity": (1 << 64) - 1}, ("grain directory",)),
    "grain_table_size_huge": ({"num_gtes_per_gt": 0xFFFF_FFFF}, ("grain table",)),
    "grain_table_size_zero": ({"num_gtes_per_gt": 0}, ("grain table",)),
    "granularity_zero": ({"granularity": 0}, ("grain",)),
    "granularity_huge": ({"granularity": 1 << 40}, ("grain",)),
    "grain_directory_past_end": ({"gd_offset": 1 << 40}, ("grain directory", "past the end")),
    "grain_offset_past_end": ({"grain_offset": 1 << 40}, ("truncated",)),
    "version_4": ({"version": 4}, ("version",)),
    "embedded_descriptor_past_end": ({"capacity": 0, "desc_offset": 1 << 40}, ("descriptor",)),
    "embedded_descriptor_offset_max": (
        {"capacity": 0, "desc_offset": (1 << 64) - 1},
        ("descriptor",),
    ),
}
_VMDK_BUGS: dict[str, str] = {}
for _name, (_vfields, _vexpect) in _VMDK_FIELD_CASES.items():
    CASES.append(Case(f"vmdk_{_name}", vmdk_case(_vfields, _vexpect), bug=_VMDK_BUGS.get(_name)))


@case()  # found while copying: the temporary output must go
def build_vmdk_grain_table_past_end(tree: Tree) -> Built:
    image = vmdk_sparse(tree.img / "bad.vmdk", "1M", ("write -P 0x33 0 64k",))
    at, _ = vmdk_gd_entry(image)
    patch(image, at, "<I", 0xFFFF_FFF0)
    return Built(image, ("vmdk", "grain table", "past the end"))


@case()  # found while copying: the temporary output must go
def build_vmdk_grain_past_end(tree: Tree) -> Built:
    image = vmdk_sparse(tree.img / "bad.vmdk", "1M", ("write -P 0x33 0 64k",))
    at, _ = vmdk_gt_entry(image, 0)
    patch(image, at, "<I", 0xFFFF_FF00)
    return Built(image, ("vmdk", "grain", "past the end"))


def stream_optimized_file(tree: Tree) -> Path:
    path = tree.img / "so.vmdk"
    path.write_bytes(stream_optimized(pattern(1 * MiB)))
    return path


def so_first_grain(path: Path) -> int:
    """File offset of the first allocated grain's marker in our streamOptimized file."""
    data = path.read_bytes()
    footer = len(data) - 1024
    gd_sector = struct.unpack_from("<Q", data, footer + 56)[0]
    gt_sector = struct.unpack_from("<I", data, gd_sector * 512)[0]
    entries: tuple[int, ...] = struct.unpack_from("<512I", data, gt_sector * 512)
    return next(e for e in entries if e) * 512


@case()  # found while copying: the temporary output must go
def build_vmdk_stream_grain_marker_huge(tree: Tree) -> Built:
    image = stream_optimized_file(tree)
    patch(image, so_first_grain(image) + 8, "<I", 0xFFFF_FFFF)
    return Built(image, ("vmdk", "grain marker"))


@case()  # found while copying: the temporary output must go
def build_vmdk_stream_deflate_bomb(tree: Tree) -> Built:
    # ~64 KiB of zlib (inside the marker's two-grain limit) that inflates to 64 MiB
    image = tree.img / "so.vmdk"
    bomb = zlib.compress(bytes(64 * MiB), 9)
    image.write_bytes(stream_optimized(pattern(1 * MiB), payloads={1: bomb}))
    return Built(image, ("vmdk", "compressed grain", "more than one grain"))


@case()
def build_vmdk_stream_footer_garbage(tree: Tree) -> Built:
    image = stream_optimized_file(tree)
    size = image.stat().st_size
    patch(image, size - 1024, "<4s", b"XXXX")
    return Built(image, ("vmdk", "footer"))


@case()
def build_vmdk_descriptor_extent_size_huge(tree: Tree) -> Built:
    (tree.img / "x.raw").write_bytes(bytes(64 * KiB))
    text = descriptor("monolithicFlat", ['RW 9223372036854775807 FLAT "x.raw" 0'])
    return Built(vmdk_descriptor(tree, text), ("vmdk", quoted("x.raw")))


@case()
def build_vmdk_descriptor_extent_offset_huge(tree: Tree) -> Built:
    (tree.img / "x.raw").write_bytes(bytes(64 * KiB))
    text = descriptor("monolithicFlat", ['RW 128 FLAT "x.raw" 9223372036854775807'])
    return Built(vmdk_descriptor(tree, text), ("vmdk", quoted("x.raw")))


# -- corrupt vpc


Edit = Callable[[bytearray], None]


def vpc_base(tree: Tree) -> Path:
    return vpc_dynamic(tree.img / "bad.vhd", "4M", ("write -P 0x44 0 64k", "write -P 5 3M 4k"))


def vpc_case(
    expect: tuple[str, ...], footer: Edit | None = None, header: Edit | None = None
) -> Callable[[Tree], Built]:
    def build(tree: Tree) -> Built:
        image = vpc_base(tree)
        vpc_edit(image, footer, header)
        return Built(image, ("vpc", *expect))

    return build


def _set(offset: int, fmt: str, value: int) -> Callable[[bytearray], None]:
    def edit(raw: bytearray) -> None:
        struct.pack_into(fmt, raw, offset, value)

    return edit


def _creator_and_size(size: int) -> Callable[[bytearray], None]:
    def edit(raw: bytearray) -> None:
        raw[28:32] = b"qem2"  # sized by current_size, not CHS
        struct.pack_into(">Q", raw, 48, size)

    return edit


_VPC_CASES: dict[str, tuple[tuple[str, ...], Edit | None, Edit | None]] = {
    "bat_entries_huge": (("BAT",), None, _set(28, ">I", 0xFFFF_FFFF)),
    "bat_past_end": (("BAT", "past the end"), None, _set(16, ">Q", 1 << 50)),
    "block_size_zero": (("block size",), None, _set(32, ">I", 0)),
    "block_size_odd": (("block size",), None, _set(32, ">I", 3 * MiB)),
    "block_size_huge": (("block size",), None, _set(32, ">I", 1 << 31)),
    "dynamic_header_past_end": (("dynamic header",), _set(16, ">Q", 1 << 50), None),
    "dynamic_header_offset_max": (("dynamic header",), _set(16, ">Q", (1 << 64) - 1), None),
    "virtual_size_huge": (("2040 GiB",), _creator_and_size(1 << 62), None),
    "bat_too_small": (("BAT",), None, _set(28, ">I", 1)),
}
for _name, (_pexpect, _footer, _header) in _VPC_CASES.items():
    CASES.append(Case(f"vpc_{_name}", vpc_case(_pexpect, _footer, _header)))


@case()
def build_vpc_bat_entry_past_end(tree: Tree) -> Built:
    image = vpc_base(tree)
    header_at = unpack(image, 16, ">Q")[0]
    table = unpack(image, header_at + 16, ">Q")[0]
    patch(image, table, ">I", 0xFFFF_FF00)
    return Built(image, ("vpc", "BAT entry 0", "past the end"))


@case()
def build_vpc_bad_checksum(tree: Tree) -> Built:
    image = vpc_base(tree)
    patch(image, 64, ">I", 0x12345678)
    return Built(image, ("vpc", "checksum"))


# -- corrupt vdi

# The header fields a case edits: (offset, struct format), little-endian.
VDI = {
    "signature": (64, "<I"),
    "version": (68, "<I"),
    "image_type": (76, "<I"),
    "offset_bmap": (340, "<I"),
    "offset_data": (344, "<I"),
    "sector_size": (360, "<I"),
    "disk_size": (368, "<Q"),
    "block_size": (376, "<I"),
    "blocks_in_image": (384, "<I"),
    "blocks_allocated": (388, "<I"),
    "uuid_link": (424, "16s"),
    "uuid_parent": (440, "16s"),
}
VDI_MAX_BLOCKS = ((1 << 31) - 512) // 4  # qemu's VDI_BLOCKS_IN_IMAGE_MAX


def vdi_set(path: Path, **fields: int | bytes) -> None:
    for name, value in fields.items():
        at, fmt = VDI[name]
        patch(path, at, fmt, value)


def vdi_get(path: Path, name: str) -> int:
    at, fmt = VDI[name]
    return unpack(path, at, fmt)[0]


def vdi_image(path: Path, size: str = "4M", writes: tuple[str, ...] = (), opts: str = "") -> Path:
    qemu_img("create", "-q", "-f", "vdi", *(["-o", opts] if opts else []), path, size)
    if writes:
        qemu_io(path, list(writes), "vdi")
    return path


def vdi_base(tree: Tree) -> Path:
    return vdi_image(tree.img / "bad.vdi", "4M", ("write -P 0x44 0 64k", "write -P 5 3M 4k"))


def vdi_case(expect: tuple[str, ...], **fields: int | bytes) -> Callable[[Tree], Built]:
    def build(tree: Tree) -> Built:
        image = vdi_base(tree)
        vdi_set(image, **fields)
        return Built(image, ("vdi", *expect))

    return build


# -- corrupt parallels: the header's sizes and the BAT's entries (little-endian)


def parallels_base(tree: Tree) -> Path:
    return parallels(tree.img / "bad.prl", "4M", ("write -P 0x44 0 64k", "write -P 5 3M 4k"))


_PARALLELS_CASES: dict[str, tuple[tuple[str, ...], int, str, int]] = {
    "cluster_size_zero": (("cluster size is zero",), 28, "<I", 0),
    "cluster_size_huge": (("cluster of 4294967295 sectors", "too large"), 28, "<I", 0xFFFF_FFFF),
    "bat_entries_huge": (("BAT of 4294967295 entries", "too large"), 32, "<I", 0xFFFF_FFFF),
    "bat_past_end": (("BAT (16777216 entries)", "past the end"), 32, "<I", 1 << 24),
    "virtual_size_huge": (("virtual size", "too large"), 36, "<Q", 1 << 63),
    "data_off_past_end": (("data area at 0x1fffffffe00", "past the end"), 48, "<I", 0xFFFF_FFFF),
    "data_off_in_bat": (("data area at 0x200", "overlaps the header or BAT"), 48, "<I", 1),
    "bat_entry_past_end": (("BAT entry 0", "past the end"), 64, "<I", 0xFFFF_FF00),
    "bat_entry_in_bat": (("BAT entry 0 (cluster at 0x1000)", "overlaps"), 64, "<I", 1),
    "bat_entry_768_past_end": (("BAT entry 768", "past the end"), 64 + 4 * 768, "<I", 1 << 20),
}


def parallels_case(
    expect: tuple[str, ...], at: int, fmt: str, value: int
) -> Callable[[Tree], Built]:
    def build(tree: Tree) -> Built:
        image = parallels_base(tree)
        patch(image, at, fmt, value)
        return Built(image, ("parallels", *expect))

    return build


_VDI_CASES: dict[str, tuple[tuple[str, ...], dict[str, int | bytes]]] = {
    "disk_size_huge": (("disk size", "larger than"), {"disk_size": 1 << 62}),
    "version_1_0": (("version 1.0",), {"version": 0x00010000}),
    "bmap_unaligned": (("block map offset 0x201",), {"offset_bmap": 0x201}),
    "data_unaligned": (("data offset 0x401",), {"offset_data": 0x401}),
    "sector_size_4096": (("sector size 4096",), {"sector_size": 4096}),
    "block_size_zero": (("block size 0",), {"block_size": 0}),
    "block_size_2m": (("block size 2097152",), {"block_size": 2 * MiB}),
    "block_size_huge": (("block size 2147483648",), {"block_size": 1 << 31}),
    "bmap_too_small": (("block map of 1 entries", "too small"), {"blocks_in_image": 1}),
    "bmap_entries_huge": (("larger than",), {"blocks_in_image": 0xFFFF_FFFF}),
    "link_uuid": (("differencing", "link"), {"uuid_link": b"\x01" * 16}),
    "parent_uuid": (("differencing", "parent"), {"uuid_parent": b"\x02" * 16}),
    "bmap_overlaps_header": (("overlaps the header",), {"offset_bmap": 0}),
    "data_overlaps_bmap": (("overlaps the block map",), {"offset_data": 0x200}),
    "bmap_past_end": (
        ("block map at 0x40000000", "past the end"),
        {"offset_bmap": 1 << 30, "offset_data": (1 << 30) + 512},
    ),
    # The largest disk qemu opens: a 2 GiB block map, which the file does not hold.
    "disk_size_max": (
        ("block map at 0x200 (536870784 entries)", "past the end"),
        {
            "disk_size": VDI_MAX_BLOCKS * MiB,
            "blocks_in_image": VDI_MAX_BLOCKS,
            "offset_data": 512 + 4 * VDI_MAX_BLOCKS,
        },
    ),
}
for _name, (_dexpect, _dfields) in _VDI_CASES.items():
    CASES.append(Case(f"vdi_{_name}", vdi_case(_dexpect, **_dfields)))
# Without its signature the file probes as raw: read as a VDI only when forced.
CASES.append(
    Case("vdi_bad_signature", vdi_case(("bad signature 0xdeadbeef",), signature=0xDEADBEEF), "vdi")
)


@case()
def build_vdi_bmap_entry_past_end(tree: Tree) -> Built:
    image = vdi_base(tree)
    patch(image, vdi_get(image, "offset_bmap"), "<I", 0xFFFF_FF00)
    return Built(image, ("vdi", "block map entry 0 (block at 0xffffff0000400)", "past the end"))


@case()
def build_vdi_bmap_entry_beyond_blocks(tree: Tree) -> Built:
    # an entry past blocks_in_image (qemu-img check calls it corrupt) whose block is not
    # in the file
    image = vdi_base(tree)
    patch(image, vdi_get(image, "offset_bmap") + 4 * 3, "<I", 7)
    return Built(image, ("vdi", "block map entry 3", "past the end"))


for _name, (_qexpect, _at, _fmt, _value) in _PARALLELS_CASES.items():
    CASES.append(Case(f"parallels_{_name}", parallels_case(_qexpect, _at, _fmt, _value)))


# -- corrupt vhdx


def vhdx_base(tree: Tree) -> VhdxImage:
    path = vhdx(tree.img / "bad.vhdx", "8M", "block_size=1M", ("write -P 0x55 0 1M",))
    return VhdxImage(path)


def vhdx_metadata_case(
    guid: bytes, fmt: str, value: int, expect: tuple[str, ...]
) -> Callable[[Tree], Built]:
    def build(tree: Tree) -> Built:
        img = vhdx_base(tree)
        struct.pack_into(fmt, img.data, img.item_at(guid), value)
        img.save()
        return Built(img.path, ("vhdx", *expect))

    return build


_L = vhdx_layout
_VHDX_METADATA_CASES = {
    "block_size_zero": (_L.FILE_PARAMETERS_GUID, "<I", 0, ("block size",)),
    "block_size_odd": (_L.FILE_PARAMETERS_GUID, "<I", 3 * MiB, ("block size",)),
    "block_size_huge": (_L.FILE_PARAMETERS_GUID, "<I", 1 << 31, ("block size",)),
    "virtual_size_huge": (_L.VIRTUAL_DISK_SIZE_GUID, "<Q", 1 << 62, ("virtual size",)),
    "virtual_size_64t": (_L.VIRTUAL_DISK_SIZE_GUID, "<Q", 64 << 40, ("BAT",)),
    "virtual_size_unaligned": (_L.VIRTUAL_DISK_SIZE_GUID, "<Q", 8 * MiB + 1, ("virtual size",)),
    "logical_sector_size_1": (_L.LOGICAL_SECTOR_GUID, "<I", 1, ("logical sector size",)),
    "physical_sector_size_huge": (_L.PHYSICAL_SECTOR_GUID, "<I", 1 << 31, ("physical sector",)),
}
for _name, (_guid, _fmt, _value, _xexpect) in _VHDX_METADATA_CASES.items():
    CASES.append(Case(f"vhdx_{_name}", vhdx_metadata_case(_guid, _fmt, _value, _xexpect)))


@case()
def build_vhdx_metadata_item_huge(tree: Tree) -> Built:
    img = vhdx_base(tree)
    meta = img.regions.metadata.offset
    struct.pack_into("<I", img.data, meta + 32 + 8, 0xFFFF_FFF0)  # first item's length
    img.save()
    return Built(img.path, ("vhdx", "metadata"))


@case()
def build_vhdx_metadata_count_huge(tree: Tree) -> Built:
    img = vhdx_base(tree)
    struct.pack_into("<H", img.data, img.regions.metadata.offset + 10, 0xFFFF)
    img.save()
    return Built(img.path, ("vhdx", "metadata"))


@case()
def build_vhdx_bat_region_past_end(tree: Tree) -> Built:
    img = vhdx_base(tree)
    entry = img.region_entry(_L.BAT_GUID)
    img.edit_region_tables(lambda t: struct.pack_into("<Q", t, entry + 16, 1 << 46))
    img.save()
    return Built(img.path, ("vhdx", "BAT", "past the end"))


@case()
def build_vhdx_bat_region_too_small(tree: Tree) -> Built:
    img = vhdx_base(tree)
    entry = img.region_entry(_L.BAT_GUID)
    img.edit_region_tables(lambda t: struct.pack_into("<I", t, entry + 24, 8))
    img.save()
    return Built(img.path, ("vhdx", "BAT region", "too small"))


@case()
def build_vhdx_region_count_huge(tree: Tree) -> Built:
    img = vhdx_base(tree)
    img.edit_region_tables(lambda t: struct.pack_into("<I", t, 8, 0xFFFF_FFFF))
    img.save()
    return Built(img.path, ("vhdx", "region table"))


@case()
def build_vhdx_log_huge(tree: Tree) -> Built:
    img = vhdx_base(tree)

    def edit(header: bytearray) -> None:
        header[48:64] = uuid.uuid4().bytes_le  # a log GUID: the log must be replayed
        struct.pack_into("<IQ", header, 68, 0xFFF0_0000, 1 * MiB)

    img.edit_headers(edit)
    img.save()
    return Built(img.path, ("vhdx", "log"))


@case()
def build_vhdx_bat_entry_past_end(tree: Tree) -> Built:
    img = vhdx_base(tree)
    img.set_bat(0, (1 << 45) | _L.PAYLOAD_FULLY_PRESENT)
    img.save()
    return Built(img.path, ("vhdx", "BAT entry 0", "past the end"))


@case()
def build_vhdx_bat_entry_over_headers(tree: Tree) -> Built:
    img = vhdx_base(tree)
    img.set_bat(1, 0 | _L.PAYLOAD_FULLY_PRESENT)
    img.save()
    return Built(img.path, ("vhdx", "BAT entry 1", "overlaps"))


@case()
def build_vhdx_no_valid_header(tree: Tree) -> Built:
    img = vhdx_base(tree)
    for at in _L.HEADER_OFFSETS:
        img.data[at + 100] ^= 0xFF
    img.save()
    return Built(img.path, ("vhdx", "header"))


# -- corrupt qcow (version 1) and QED

QCOW = {
    "magic": (0, ">4s"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "size": (24, ">Q"),
    "cluster_bits": (32, ">B"),
    "l2_bits": (33, ">B"),
    "crypt_method": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
}
QED = {
    "magic": (0, "<4s"),
    "cluster_size": (4, "<I"),
    "table_size": (8, "<I"),
    "header_size": (12, "<I"),
    "features": (16, "<Q"),
    "compat_features": (24, "<Q"),
    "autoclear_features": (32, "<Q"),
    "l1_table_offset": (40, "<Q"),
    "image_size": (48, "<Q"),
    "backing_filename_offset": (56, "<I"),
    "backing_filename_size": (60, "<I"),
}
QCOW_WRITES = ("write -P 0x11 0 8k", "write -P 0x22 900k 4k")


def set_fields(path: Path, layout: dict[str, tuple[int, str]], **fields: int) -> None:
    for name, value in fields.items():
        offset, fmt = layout[name]
        patch(path, offset, fmt, value)


def get_field(path: Path, layout: dict[str, tuple[int, str]], name: str) -> int:
    offset, fmt = layout[name]
    return unpack(path, offset, fmt)[0]


def qcow_first_l2(path: Path) -> tuple[int, int]:
    """(where the first L2 table is, where its first entry is)."""
    l1_at = get_field(path, QCOW, "l1_table_offset")
    return l1_at, unpack(path, l1_at, ">Q")[0]


def qed_first_l2(path: Path) -> tuple[int, int]:
    l1_at = get_field(path, QED, "l1_table_offset")
    return l1_at, unpack(path, l1_at, "<Q")[0]


def header_case(
    maker: Callable[[Path], Path], layout: dict[str, tuple[int, str]], fmt: str,
    fields: dict[str, int], expect: tuple[str, ...],
) -> Callable[[Tree], Built]:  # fmt: skip
    def build(tree: Tree) -> Built:
        image = maker(tree.img / f"bad.{fmt}")
        set_fields(image, layout, **fields)
        return Built(image, (fmt, *expect))

    return build


_QCOW_FIELD_CASES: dict[str, tuple[dict[str, int], tuple[str, ...]]] = {
    "size_max": ({"size": (1 << 64) - 1}, ("virtual size", "too big")),
    "size_huge": ({"size": 1 << 45}, ("L1 table", "past the end")),
    "size_1": ({"size": 1}, ("too small",)),
    "l1_table_past_end": ({"l1_table_offset": 1 << 40}, ("L1 table", "past the end")),
    "cluster_bits_255": ({"cluster_bits": 255}, ("cluster_bits",)),
    "l2_bits_0": ({"l2_bits": 0}, ("l2_bits",)),
    "encrypted": ({"crypt_method": 1}, ("encryption", "not supported")),
    "crypt_method_max": ({"crypt_method": 0xFFFF_FFFF}, ("encryption method",)),
    "version_2": ({"version": 2}, ("version 2", "qcow2")),
    "backing_name_size_huge": (
        {"backing_file_offset": 48, "backing_file_size": 0xFFFF_FFFF},
        ("backing file name", "too long"),
    ),
}
for _name, (_fields, _expect) in _QCOW_FIELD_CASES.items():
    CASES.append(
        Case(
            f"qcow_{_name}",
            header_case(lambda p: qcow(p, "1M", QCOW_WRITES), QCOW, "qcow", _fields, _expect),
            fmt="qcow" if _name == "version_2" else None,
        )
    )

_QED_FIELD_CASES: dict[str, tuple[dict[str, int], tuple[str, ...]]] = {
    "cluster_size_max": ({"cluster_size": 0x8000_0000}, ("cluster size",)),
    "cluster_size_0": ({"cluster_size": 0}, ("cluster size",)),
    "table_size_max": ({"table_size": 0xFFFF_FFFF}, ("table size",)),
    "table_size_1": ({"table_size": 1}, ("L1 table offset",)),
    "image_size_huge": ({"image_size": 1 << 62}, ("image size", "too large")),
    "image_size_odd": ({"image_size": 1000}, ("image size", "512")),
    "l1_table_past_end": ({"l1_table_offset": 1 << 40}, ("L1 table offset", "invalid")),
    "l1_table_wraps": ({"l1_table_offset": (1 << 64) - 4096}, ("L1 table offset", "invalid")),
    "l1_table_in_header": ({"header_size": 1 << 16}, ("L1 table offset", "invalid")),
    "unknown_feature": ({"features": 1 << 40}, ("unsupported features",)),
    "backing_name_outside_header": (
        {"features": 1, "backing_filename_offset": 0xFFFF_FF00, "backing_filename_size": 0xFF},
        ("backing file name offset",),
    ),
}
for _name, (_fields, _expect) in _QED_FIELD_CASES.items():
    CASES.append(
        Case(
            f"qed_{_name}",
            header_case(lambda p: qed(p, "1M", QCOW_WRITES), QED, "qed", _fields, _expect),
        )
    )


def entry_case(
    fmt: str, table: str, entry: Callable[[Path, int], int], expect: tuple[str, ...]
) -> Callable[[Tree], Built]:
    """A qcow or qed image with the first entry of its L1 table, or of the first L2
    table, set to ``entry(image, the entry's value)``."""
    makers = {"qcow": (qcow, qcow_first_l2, ">Q"), "qed": (qed, qed_first_l2, "<Q")}
    maker, first_l2, form = makers[fmt]

    def build(tree: Tree) -> Built:
        image = maker(tree.img / f"bad.{fmt}", "1M", QCOW_WRITES)
        at = first_l2(image)[0 if table == "L1" else 1]
        patch(image, at, form, entry(image, unpack(image, at, form)[0]))
        return Built(image, (fmt, *expect))

    return build


def _packed(payload: bytes) -> Callable[[Path, int], int]:
    """A compressed cluster entry for ``payload``, appended to the image."""
    return lambda image, _: 1 << 63 | len(payload) << 51 | append_aligned(image, payload)


_ENTRY_CASES: dict[str, tuple[str, Callable[[Path, int], int], tuple[str, ...]]] = {
    "qcow_l2_table_past_end": ("L1", lambda _, __: 1 << 40, ("L2 table", "past the end")),
    "qcow_data_cluster_past_end": ("L2", lambda _, __: 1 << 44, ("data cluster", "past the end")),
    "qcow_data_cluster_unaligned": ("L2", lambda _, old: old + 3, ("not sector aligned",)),
    "qcow_compressed_cluster_past_end": (
        "L2", lambda _, __: 1 << 63 | 100 << 51 | 1 << 40, ("compressed cluster", "past the end"),
    ),
    "qcow_deflate_garbage": ("L2", _packed(os.urandom(2000)), ("compressed cluster", "inflate")),
    "qcow_deflate_short": ("L2", _packed(deflate(b"\x5a" * 100)), ("less than one cluster",)),
    "qed_l2_table_past_end": ("L1", lambda _, __: 1 << 40, ("L2 table offset", "invalid")),
    "qed_data_cluster_past_end": ("L2", lambda _, __: 1 << 44, ("data cluster offset", "invalid")),
    "qed_data_cluster_unaligned": (
        "L2", lambda _, old: old + 512, ("data cluster offset", "invalid"),
    ),
}  # fmt: skip
for _name, (_table, _entry, _expect) in _ENTRY_CASES.items():
    CASES.append(Case(_name, entry_case(_name.partition("_")[0], _table, _entry, _expect)))


# --------------------------------------------------------------------------- bases
#
# Small valid images of each format, for truncation and bit flips (here and in
# test_fuzz.py).  Each knows its ``floor`` -- a cut at or below it leaves some structure
# the disk refers to wholly outside the file, so the image must be refused -- the
# ``regions`` worth corrupting (headers and tables, not data) and the integer
# ``fields`` in them (so a fuzzer can set a field to a chosen value).

Field = tuple[int, int, bool]  # (offset, width in bytes, big-endian)


@dataclass(frozen=True)
class Base:
    name: str
    fmt: str
    data: bytes
    floor: int
    regions: tuple[tuple[int, int], ...]  # (offset, length)
    fields: tuple[Field, ...] = ()


_WIDTH = {"B": 1, "H": 2, "I": 4, "Q": 8}


def header_fields(layout: dict[str, tuple[int, str]], at: int = 0) -> list[Field]:
    """The integer fields of a header layout (``QCOW2``, ``VMDK``) placed at ``at``."""
    return [
        (at + offset, _WIDTH[fmt[-1]], fmt[0] == ">")
        for offset, fmt in layout.values()
        if fmt[-1] in _WIDTH
    ]


def table_fields(at: int, width: int, count: int, big: bool) -> list[Field]:
    return [(at + width * i, width, big) for i in range(count)]


def _qcow2_base(work: Path, name: str, opts: str, writes: tuple[str, ...]) -> Base:
    path = qcow2(work / "base.qcow2", "1M", opts, writes)
    bits = qcow2_get(path, "cluster_bits")
    cluster = 1 << bits
    l1_at = qcow2_get(path, "l1_table_offset")
    l1_size = qcow2_get(path, "l1_size")
    rt_at = qcow2_get(path, "refcount_table_offset")
    _, l1 = qcow2_l1(path)
    l2_at = l1 & QCOW2_OFFSET_MASK
    entries = struct.unpack(f">{cluster // 8}Q", path.read_bytes()[l2_at : l2_at + cluster])
    shift = 62 - (bits - 8)
    hosts = [
        e & ((1 << shift) - 1) if e & QCOW2_COMPRESSED else e & QCOW2_OFFSET_MASK for e in entries
    ]
    regions = ((0, cluster), (l1_at, 8 * l1_size), (l2_at, cluster), (rt_at, cluster))
    fields = (
        header_fields(QCOW2) + table_fields(l1_at, 8, 2, True) + table_fields(l2_at, 8, 16, True)
    )
    fields += table_fields(rt_at, 8, 2, True)
    fields += [(at + 4, 4, True) for at, magic, _ in qcow2_extensions(path) if magic]
    return Base(name, "qcow2", path.read_bytes(), max(hosts), regions, tuple(fields))


def _vmdk_base(work: Path) -> Base:
    path = vmdk_sparse(work / "base.vmdk", "1M", ("write -P 0x33 0 64k", "write -P 7 640k 4k"))
    gd = vmdk_get(path, "gd_offset") * 512
    rgd = vmdk_get(path, "rgd_offset") * 512
    _, gt = vmdk_gd_entry(path)
    entries = struct.unpack("<512I", path.read_bytes()[gt * 512 : gt * 512 + 2048])
    regions = ((0, 512), (512, 1024), (gd, 512), (rgd, 512), (gt * 512, 2048))
    fields = header_fields(VMDK) + table_fields(gd, 4, 2, False) + table_fields(rgd, 4, 2, False)
    fields += table_fields(gt * 512, 4, 4, False) + table_fields(gt * 512 + 4 * 80, 4, 2, False)
    data = path.read_bytes()
    return Base("vmdk", "vmdk", data, max(entries) * 512, regions, tuple(fields))


def _vmdk_stream_base(work: Path) -> Base:
    data = stream_optimized(pattern(1 * MiB))
    path = work / "so.vmdk"
    path.write_bytes(data)
    footer = len(data) - 1024
    gd_sector = struct.unpack_from("<Q", data, footer + 56)[0]
    gt_sector = struct.unpack_from("<I", data, gd_sector * 512)[0]
    first_grain = so_first_grain(path)
    regions = (
        (0, 512),
        (first_grain, 64),
        (gt_sector * 512 - 512, 2560),
        (gd_sector * 512 - 512, 1024),
        (len(data) - 1536, 1536),
    )
    fields = header_fields(VMDK) + header_fields(VMDK, footer) + [(first_grain, 8, False)]
    fields += [(first_grain + 8, 4, False), (footer - 512, 8, False), (footer - 500, 4, False)]
    fields += table_fields(gt_sector * 512, 4, 4, False) + table_fields(
        gd_sector * 512, 4, 2, False
    )
    # any cut before the end-of-stream marker breaks the footer (a shorter cut inside
    # that last sector reads as zeros, as qemu rounds the file up to whole sectors)
    return Base("vmdk_stream", "vmdk", data, len(data) - 512, regions, tuple(fields))


def _vpc_base(work: Path) -> Base:
    path = vpc_dynamic(work / "base.vhd", "4M", ("write -P 0x44 0 64k", "write -P 5 3M 4k"))
    data = path.read_bytes()
    header_at = struct.unpack_from(">Q", data, 16)[0]
    table, entries = struct.unpack_from(">QxxxxI", data, header_at + 16)
    bat = struct.unpack_from(f">{entries}I", data, table)
    floor = max(e for e in bat if e != 0xFFFF_FFFF) * 512
    regions = ((0, 512), (header_at, 1024), (table, 4 * entries), (len(data) - 512, 512))
    footer = [(16, 8), (28, 4), (40, 8), (48, 8), (56, 2), (58, 1), (59, 1), (60, 4)]
    dynamic = [(8, 8), (16, 8), (24, 4), (28, 4), (32, 4)]
    dynamic += [(576 + 24 * i + k, w) for i in range(2) for k, w in ((0, 4), (8, 4), (16, 8))]
    fields = [(at, w, True) for at, w in footer]
    fields += [(header_at + at, w, True) for at, w in dynamic] + table_fields(table, 4, 3, True)
    return Base("vpc", "vpc", data, floor, regions, tuple(fields))


def _vdi_base(work: Path) -> Base:
    path = vdi_image(work / "base.vdi", "4M", ("write -P 0x44 0 64k", "write -P 5 3M 4k"))
    data = path.read_bytes()
    bmap_at, data_at = struct.unpack_from("<II", data, 340)
    entries = struct.unpack_from("<I", data, 384)[0]
    bmap = struct.unpack_from(f"<{entries}I", data, bmap_at)
    floor = data_at + max(e for e in bmap if e < 0xFFFF_FFFE) * MiB
    regions = ((0, 512), (bmap_at, 4 * entries))
    fields = [(at, 8 if fmt == "<Q" else 4, False) for at, fmt in VDI.values() if fmt[-1] in "IQ"]
    fields += table_fields(bmap_at, 4, entries, False)
    return Base("vdi", "vdi", data, floor, regions, tuple(fields))


def _vhdx_base(work: Path) -> Base:
    path = vhdx(
        work / "base.vhdx", "3M", "block_size=1M", ("write -P 0x55 0 1M", "write -P 6 2M 4k")
    )
    img = VhdxImage(path)
    L = vhdx_layout
    entries = [img.bat(i) for i in range(3)]
    floor = max(e & L.OFFSET_MASK for e in entries if e & L.STATE_MASK == L.PAYLOAD_FULLY_PRESENT)
    meta = img.regions.metadata.offset
    regions = (
        (0, 8),
        (L.HEADER_OFFSETS[0], 4096),
        (L.HEADER_OFFSETS[1], 4096),
        (L.REGION_TABLE_OFFSET, 512),
        (L.REGION_TABLE_OFFSET + 64 * KiB, 512),
        (meta, 512),
        (meta + 64 * KiB, 4096),
        (img.regions.bat.offset, 8 * 8),
    )
    fields: list[Field] = []
    for at in L.HEADER_OFFSETS:
        fields += [(at + 8, 8, False), (at + 48, 8, False), (at + 64, 2, False)]
        fields += [(at + 66, 2, False), (at + 68, 4, False), (at + 72, 8, False)]
    for rt in (L.REGION_TABLE_OFFSET, L.REGION_TABLE_OFFSET + 64 * KiB):
        fields.append((rt + 8, 4, False))
        for i in range(2):
            entry = rt + 16 + 32 * i
            fields += [(entry + 16, 8, False), (entry + 24, 4, False), (entry + 28, 4, False)]
    fields.append((meta + 10, 2, False))
    for i in range(6):
        entry = meta + 32 + 32 * i
        fields += [(entry + 16, 4, False), (entry + 20, 4, False), (entry + 24, 4, False)]
    for guid, width in (
        (L.FILE_PARAMETERS_GUID, 4),
        (L.VIRTUAL_DISK_SIZE_GUID, 8),
        (L.LOGICAL_SECTOR_GUID, 4),
        (L.PHYSICAL_SECTOR_GUID, 4),
    ):
        fields.append((img.item_at(guid), width, False))
    fields.append((img.item_at(L.FILE_PARAMETERS_GUID) + 4, 4, False))
    fields += table_fields(img.regions.bat.offset, 8, 8, False)
    return Base("vhdx", "vhdx", bytes(img.data), floor, regions, tuple(fields))


def _parallels_base(work: Path) -> Base:
    path = parallels(work / "base.prl", "4M", ("write -P 0x44 0 64k", "write -P 5 3M 4k"))
    data = path.read_bytes()
    entries = struct.unpack_from("<I", data, 32)[0]
    bat = struct.unpack_from(f"<{entries}I", data, 64)
    floor = max(bat) * 4096  # the last cluster's start: a cut there leaves it outside
    regions = ((0, 64), (64, 4 * entries))
    header = [(16, 4), (28, 4), (32, 4), (36, 8), (44, 4), (48, 4), (56, 8)]
    fields = [(at, w, False) for at, w in header] + table_fields(64, 4, 3, False)
    fields.append((64 + 4 * 768, 4, False))
    return Base("parallels", "parallels", data, floor, regions, tuple(fields))


def _qcow_base(work: Path) -> Base:
    writes = ("write -P 0x11 0 8k", "write -c -P 0x5a 16k 4k", "write -P 0x22 900k 4k")
    path = qcow(work / "base.qcow", "1M", writes)
    l1_at, l2_at = qcow_first_l2(path)
    entries = struct.unpack(">512Q", path.read_bytes()[l2_at : l2_at + 4096])
    hosts = [e & ((1 << 51) - 1) if e >> 63 else e for e in entries]
    regions = ((0, 48), (l1_at, 8), (l2_at, 4096))
    fields = header_fields(QCOW) + table_fields(l1_at, 8, 1, True)
    fields += table_fields(l2_at, 8, 8, True)
    return Base("qcow", "qcow", path.read_bytes(), max(hosts), regions, tuple(fields))


def _qed_base(work: Path) -> Base:
    path = qed(work / "base.qed", "1M", ("write -P 0x11 0 8k", "write -z 64k 4k",
                                         "write -P 0x22 900k 4k"))  # fmt: skip
    l1_at, l2_at = qed_first_l2(path)
    entries = struct.unpack("<1024Q", path.read_bytes()[l2_at : l2_at + 8192])
    regions = ((0, 64), (l1_at, 8192), (l2_at, 8192))
    fields = header_fields(QED) + table_fields(l1_at, 8, 2, False)
    fields += table_fields(l2_at, 8, 8, False)
    return Base("qed", "qed", path.read_bytes(), max(entries), regions, tuple(fields))


BASE_BUILDERS: dict[str, Callable[[Path], Base]] = {
    "qcow2": lambda w: _qcow2_base(
        w,
        "qcow2",
        "cluster_size=4096",
        ("write -P 0x11 0 8k", "write -z 64k 4k", "write -P 0x22 900k 4k"),
    ),
    "qcow2_v2": lambda w: _qcow2_base(
        w,
        "qcow2_v2",
        "cluster_size=4096,compat=0.10",
        ("write -P 0x11 0 8k", "write -P 0x22 900k 4k"),
    ),
    "qcow2_extended_l2": lambda w: _qcow2_base(
        w,
        "qcow2_extended_l2",
        "cluster_size=16384,extended_l2=on",
        ("write -P 0x11 0 4k", "write -z 16k 1k", "write -P 0x22 900k 2k"),
    ),
    "qcow2_compressed": lambda w: _qcow2_base(
        w,
        "qcow2_compressed",
        "cluster_size=4096",
        ("write -c -P 0x5a 0 4k", "write -c -P 0x5b 8k 4k", "write -P 0x5c 12k 4k"),
    ),
    "qcow2_zstd": lambda w: _qcow2_base(
        w,
        "qcow2_zstd",
        "cluster_size=4096,compression_type=zstd",
        ("write -c -P 0x5a 0 4k", "write -c -P 0x5b 8k 4k"),
    ),
    "qcow": _qcow_base,
    "qed": _qed_base,
    "vmdk": _vmdk_base,
    "vmdk_stream": _vmdk_stream_base,
    "vpc": _vpc_base,
    "vhdx": _vhdx_base,
    "vdi": _vdi_base,
    "parallels": _parallels_base,
}

_BASES: dict[str, Base] = {}


def base(name: str) -> Base:
    """The base image ``name`` (made once per process, in a temporary directory)."""
    if name not in _BASES:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="aiodd-base-") as work:
            _BASES[name] = BASE_BUILDERS[name](Path(work))
    return _BASES[name]


# -- truncation: cut each base at fixed offsets and at fractions of its floor

CUTS: tuple[int | float, ...] = (0, 7, 24, 100, 511, 0.25, 0.5, 0.9, 1.0)
TRUNCATED_BASES = (
    "qcow2", "qcow2_compressed", "qcow", "qed", "vmdk", "vmdk_stream", "vpc", "vhdx", "vdi",
    "parallels",
)  # fmt: skip


def cut_offset(b: Base, cut: int | float) -> int:
    return min(cut, b.floor) if isinstance(cut, int) else int(b.floor * cut)


def truncated_case(name: str, cut: int | float) -> Case:
    def build(tree: Tree) -> Built:
        b = base(name)
        image = tree.img / "cut.img"
        image.write_bytes(b.data[: cut_offset(b, cut)])
        return Built(image, (b.fmt,))

    label = f"{cut}" if isinstance(cut, int) else f"{int(cut * 100)}pct_of_floor"
    return Case(f"truncated_{name}_at_{label}", build, fmt=base_fmt(name))


def base_fmt(name: str) -> str:
    return name.split("_", 1)[0]


TRUNCATED_CASES = [truncated_case(n, c) for n in TRUNCATED_BASES for c in CUTS]


def flip_bits(b: Base, seed: int, flips: int) -> bytes:
    """``flips`` random bit flips inside ``b``'s header and table regions."""
    import random

    rng = random.Random(seed)
    data = bytearray(b.data)
    for _ in range(flips):
        start, length = rng.choice(b.regions)
        at = start + rng.randrange(length)
        if at < len(data):
            data[at] ^= 1 << rng.randrange(8)
    return bytes(data)


# --------------------------------------------------------------------------- vhdx logs


def vhdx_log_entry(
    seq: int, guid: bytes, flushed: int, last: int, writes: Sequence[tuple[int, int]] = ()
) -> bytes:
    """A valid VHDX log entry (MS-VHDX 2.3.1) with zero descriptors only:
    ``writes`` are (file offset, length) ranges to zero."""
    count = len(writes)
    desc_sectors = -(-(count + 2) // 128)
    descs = b"".join(
        struct.pack("<4s4sQQQ", b"zero", bytes(4), length, offset, seq) for offset, length in writes
    )
    length = desc_sectors * 4096
    head = struct.pack("<4sIIIQII16sQQ", b"loge", 0, length, 0, seq, count, 0, guid, flushed, last)
    return bytes(crc_reseal(bytearray((head + descs).ljust(length, b"\0"))))


def vhdx_with_log(path: Path, log_size: str, entries: Callable[[bytes, int], bytes]) -> Path:
    """A vhdx whose headers name a log (a fresh GUID) filled by ``entries(guid, size)``."""
    vhdx(path, "8M", f"block_size=1M,log_size={log_size}", ("write -P 0x55 0 1M",))
    img = VhdxImage(path)
    guid = uuid.uuid4().bytes_le
    img.edit_headers(lambda h: h.__setitem__(slice(48, 64), guid))
    log = entries(guid, len(img.data))
    at, length = img.header.log_offset, img.header.log_length
    assert len(log) <= length
    img.data[at : at + len(log)] = log
    img.save()
    return path


def vhdx_dirty(path: Path) -> Path:
    """Give the vhdx at ``path`` a dirty log (a fresh GUID) of one entry that writes
    nothing: replayed, the image reads as it did."""
    img = VhdxImage(path)
    guid = uuid.uuid4().bytes_le
    img.edit_headers(lambda h: h.__setitem__(slice(48, 64), guid))
    entry = vhdx_log_entry(1, guid, len(img.data), len(img.data))
    img.data[img.header.log_offset : img.header.log_offset + len(entry)] = entry
    img.save()
    return path


_LOG_BYTES: dict[int, bytes] = {}


def _log_of_consecutive_entries(count: int) -> Callable[[bytes, int], bytes]:
    def entries(guid: bytes, size: int) -> bytes:
        return b"".join(vhdx_log_entry(i + 1, guid, size, size) for i in range(count))

    return entries


@case(cpu_units=60)
def build_vhdx_log_of_many_chained_entries(tree: Tree) -> Built:
    count = 8192
    if count not in _LOG_BYTES:  # ~2 s of CRC-32C in Python: made once
        path = vhdx_with_log(tree.img / "log.vhdx", "32M", _log_of_consecutive_entries(count))
        _LOG_BYTES[count] = path.read_bytes()
    image = tree.img / "log.vhdx"
    image.write_bytes(_LOG_BYTES[count])
    # the replayed log leaves the image valid: make it invalid after the search, so a
    # correct aiodd answers exit 1 quickly (the metadata region is not in the log)
    img = VhdxImage(image)
    struct.pack_into("<I", img.data, img.item_at(vhdx_layout.FILE_PARAMETERS_GUID), 3 * MiB)
    img.save()
    return Built(image, ("vhdx", "block size"))


@case(cpu_units=60)
def build_vhdx_log_entry_of_many_descriptors(tree: Tree) -> Built:
    count = 400_000
    if -count not in _LOG_BYTES:
        # zero writes far past the structures (the entry says the file grows to 1 TiB)
        writes = [((1 << 30) + 8192 * i, 4096) for i in range(count)]
        path = vhdx_with_log(
            tree.img / "log.vhdx",
            "13M",
            lambda guid, size: vhdx_log_entry(1, guid, size, 1 << 40, writes),
        )
        _LOG_BYTES[-count] = path.read_bytes()
    image = tree.img / "log.vhdx"
    image.write_bytes(_LOG_BYTES[-count])
    img = VhdxImage(image)  # invalid once replayed, so a correct aiodd exits 1 at once
    struct.pack_into("<I", img.data, img.item_at(vhdx_layout.FILE_PARAMETERS_GUID), 3 * MiB)
    img.save()
    return Built(image, ("vhdx", "block size"))


@case()
def build_vhdx_log_extends_the_file_under_a_huge_bat(tree: Tree) -> Built:
    L = vhdx_layout
    path = vhdx_with_log(
        tree.img / "bad.vhdx", "1M", lambda guid, size: vhdx_log_entry(1, guid, size, 1 << 48)
    )
    img = VhdxImage(path)
    struct.pack_into("<Q", img.data, img.item_at(L.VIRTUAL_DISK_SIZE_GUID), 64 << 40)
    entry = img.region_entry(L.BAT_GUID)
    img.edit_region_tables(lambda t: struct.pack_into("<QI", t, entry + 16, 1 << 40, 0xFFF00000))
    img.save()
    return Built(path, ("vhdx", "BAT"))


@case()
def build_vhdx_log_claims_a_longer_file(tree: Tree) -> Built:
    # the log was written for a file longer than this one: it was truncated
    path = vhdx_with_log(
        tree.img / "bad.vhdx", "1M", lambda guid, size: vhdx_log_entry(1, guid, 1 << 40, 1 << 40)
    )
    return Built(path, ("vhdx", "log", "truncated"))


@case()
def build_vhdx_log_writes_past_the_end(tree: Tree) -> Built:
    path = vhdx_with_log(
        tree.img / "bad.vhdx",
        "1M",
        lambda guid, size: vhdx_log_entry(1, guid, size, size, [(1 << 47, 1 << 40)]),
    )
    return Built(path, ("vhdx", "log", "past the end"))


# -- text from the image in the error line: it must stay one printable line (a newline
#    makes a second line; an escape sequence rewrites the user's terminal)

EVIL = "evil\nsecond line\x1b[2J\x1b]0;pwned\x07"
EVIL_BYTES = EVIL.encode()


@case()
def build_message_qcow2_feature_name(tree: Tree) -> Built:
    # an unknown incompatible feature, named by the image's own feature name table
    image = qcow2_with_data(tree.img / "bad.qcow2")
    end = next(at for at, magic, _ in qcow2_extensions(image) if magic == 0)
    entry = bytes([0, 40]) + EVIL_BYTES.ljust(46, b"\0")[:46]
    patch(image, end, ">II48s8s", 0x6803F857, 48, entry, bytes(8))
    qcow2_set(image, incompatible_features=1 << 40)
    return Built(image, ("qcow2", "feature", "bit 40"))


@case()
def build_message_vmdk_create_type(tree: Tree) -> Built:
    text = descriptor(EVIL, ['RW 1 FLAT "x.raw" 0'])
    return Built(vmdk_descriptor(tree, text), ("vmdk", "type"))


@case()
def build_message_qcow2_backing_format(tree: Tree) -> Built:
    # the backing format extension names a format aiodd does not read
    (tree.img / EVIL).write_bytes(bytes(512))
    image = backing(tree, EVIL, "raw")
    at = next(a for a, magic, _ in qcow2_extensions(image) if magic == 0xE2792ACA)
    patch(image, at + 8, ">3s", b"dmg")
    return Built(image, ("qcow2", "backing file", "dmg"))


@case()
def build_message_name_of_a_layer(tree: Tree) -> Built:
    # a corrupt layer inside the tree whose file name is the escape sequence
    layer = qcow2_with_data(tree.img / "layer.qcow2")
    qcow2_set(layer, l1_table_offset=1 << 40)
    layer.rename(tree.img / EVIL)
    image = backing(tree, EVIL, "qcow2")
    return Built(image, ("qcow2", "L1 table"))
