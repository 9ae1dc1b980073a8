"""Output plans as pure functions: the tiling contract, the structures they describe
(parsed back from the metadata blocks), the VHD geometry rule, limits, laziness and
speed.  No files, no qemu: see test_encode_qemu.py for the oracle."""

from __future__ import annotations

import itertools
import struct
import time
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiodd.errors import UsageError
from aiodd.formats import plans as _common
from aiodd.formats import registry as encoders
from aiodd.formats.base import Extent, OutputPlan
from aiodd.formats.crc32c import crc32c
from aiodd.formats.plans import Identity
from aiodd.formats.qcow2 import encode as qcow2
from aiodd.formats.vdi import encode as vdi
from aiodd.formats.vdi import layout as vdi_layout
from aiodd.formats.vhdx import encode as vhdx
from aiodd.formats.vmdk import encode as vmdk
from aiodd.formats.vpc import encode as vpc

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
FORMATS = ("qcow2", "vmdk", "vpc", "vhdx", "vdi")
WINDOWS = (0, 1, 511, 513, 3000, 65535, 65537, MiB, 2 * MiB - 1, 2 * MiB + 1, 8 * MiB + 1)
FIXED = Identity(seed=b"0123456789abcdef", timestamp=1_700_000_000)


def make_plan(fmt: str, out: int) -> OutputPlan:
    return encoders.plan(fmt, out)


def check_tiling(plan: OutputPlan) -> dict[int, bytes]:
    """Assert the contract; returns the metadata blocks (only call on small plans)."""
    blocks: dict[int, bytes] = {}
    intervals: list[tuple[int, int, str]] = []
    previous = -1
    for offset, data in plan.metadata():
        assert isinstance(data, bytes)
        assert offset > previous, "metadata out of order"
        assert len(data) > 0, "empty metadata block"
        previous = offset
        blocks[offset] = data
        intervals.append((offset, offset + len(data), "meta"))
    for extent in plan.data_extents(0, plan.data_size):
        assert extent.length > 0
        intervals.append((extent.file_offset, extent.file_offset + extent.length, "data"))
    intervals.sort()
    position = 0
    for start, end, _kind in intervals:
        assert start == position, f"gap or overlap at {position:#x} (next piece at {start:#x})"
        position = end
    assert position == plan.file_size
    return blocks


def covered(blocks: dict[int, bytes], offset: int, length: int) -> bytes:
    """Read ``length`` metadata bytes at ``offset`` (they may span blocks)."""
    out = bytearray()
    for start in sorted(blocks):
        data = blocks[start]
        lo, hi = max(start, offset), min(start + len(data), offset + length)
        if lo < hi:
            out += data[lo - start : hi - start]
    assert len(out) == length, "metadata read crosses data or the end of the file"
    return bytes(out)


# --- the contract, every format ------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out", WINDOWS)
def test_tiling_fixed_windows(fmt: str, out: int) -> None:
    if fmt == "vmdk" and out == 0:
        pytest.skip("vmdk refuses the empty window")
    plan = make_plan(fmt, out)
    assert plan.virtual_size >= out
    assert plan.virtual_size % 512 == 0
    check_tiling(plan)


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    out=st.one_of(
        st.integers(0, 64 * MiB),
        st.integers(0, 8 * GiB),
        st.sampled_from([GiB, GiB + 1, 100 * GiB, 100 * GiB + 1, 127 * GiB]),
    ),
)
def test_tiling_property(fmt: str, out: int) -> None:
    if fmt == "vmdk" and out == 0:
        return
    plan = make_plan(fmt, out)
    assert plan.virtual_size >= out
    if fmt == "vpc":
        assert plan.virtual_size - out < 4080 * 512  # at most one CHS cylinder more
    else:
        assert plan.virtual_size == -(-out // 512) * 512
    # Count instead of keeping blocks: some of these plans have thousands.
    pieces = sorted(
        [(o, o + len(d)) for o, d in plan.metadata()]
        + [(e.file_offset, e.file_offset + e.length) for e in plan.data_extents(0, plan.data_size)]
    )
    position = 0
    for start, end in pieces:
        assert start == position
        position = end
    assert position == plan.file_size


@settings(max_examples=80, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    out=st.integers(1, 40 * MiB),
    data=st.data(),
)
def test_data_extents_of_a_subrange_agree_with_the_whole(
    fmt: str, out: int, data: st.DataObject
) -> None:
    plan = make_plan(fmt, out)
    size = plan.data_size
    offset = data.draw(st.integers(0, size))
    length = data.draw(st.integers(0, size - offset))
    extents = plan.data_extents(offset, length)
    assert sum(e.length for e in extents) == length
    # Walk the whole mapping and check each piece of the sub-range lands in it.
    position = offset
    for extent in extents:
        whole = plan.data_extents(position, 1)
        assert whole[0].file_offset == extent.file_offset
        last = plan.data_extents(position + extent.length - 1, 1)
        assert last[0].file_offset == extent.file_offset + extent.length - 1
        position += extent.length
    # Adjacent extents are never contiguous in the file (they would be one extent).
    for a, b in itertools.pairwise(extents):
        assert a.file_offset + a.length != b.file_offset


@pytest.mark.parametrize("fmt", FORMATS)
def test_data_extents_reject_ranges_outside_the_disk(fmt: str) -> None:
    plan = make_plan(fmt, 3000)
    with pytest.raises(ValueError):
        plan.data_extents(0, plan.data_size + 1)
    with pytest.raises(ValueError):
        plan.data_extents(-1, 1)
    assert plan.data_extents(plan.virtual_size, 0) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_data_is_few_extents(fmt: str) -> None:
    plan = make_plan(fmt, 64 * MiB)
    extents = plan.data_extents(0, plan.data_size)
    blocks = -(-plan.data_size // (2 * MiB))  # a VHD's blocks are split by bitmaps
    assert len(extents) == (blocks if fmt == "vpc" else 1)


def test_registry_lists_every_format() -> None:
    assert encoders.output_formats() == ["raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"]
    for name in FORMATS:
        assert name == encoders.encoder(name).NAME


@pytest.mark.parametrize("fmt", FORMATS)
def test_negative_window_is_a_bug(fmt: str) -> None:
    with pytest.raises(ValueError):
        make_plan(fmt, -1)


# --- identity -------------------------------------------------------------------------


@pytest.mark.parametrize("module", [vmdk, vpc, vhdx, vdi])
def test_identity_makes_metadata_reproducible(module: object) -> None:
    plan_fn = module.plan  # type: ignore[attr-defined]
    a = b"".join(d for _, d in plan_fn(3000, identity=FIXED).metadata())
    b = b"".join(d for _, d in plan_fn(3000, identity=FIXED).metadata())
    c = b"".join(d for _, d in plan_fn(3000).metadata())
    assert a == b
    assert a != c  # fresh UUIDs / CID


def test_identity_guids_are_version_4() -> None:
    guid = FIXED.guid("x")
    assert guid[6] >> 4 == 4
    assert guid[8] >> 6 == 2
    assert FIXED.guid("x") != FIXED.guid("y")


def test_qcow2_output_is_deterministic() -> None:
    a = list(qcow2.plan(5 * MiB).metadata())
    assert a == list(qcow2.plan(5 * MiB).metadata())


# --- helpers --------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    first=st.integers(0, 1 << 40),
    count=st.integers(0, 600),
    step=st.sampled_from([1, 128, 512, 65536, 8 * MiB]),
    width=st.sampled_from([4, 8]),
    order=st.sampled_from(["big", "little"]),
)
def test_lanes_is_a_table_of_consecutive_offsets(
    first: int, count: int, step: int, width: int, order: _common.ByteOrder
) -> None:
    if count and first + (count - 1) * step >= 1 << (8 * width):
        with pytest.raises(ValueError):
            _common.lanes(first, count, step, width, order)
        return
    table = _common.lanes(first, count, step, width, order)
    expected = b"".join((first + k * step).to_bytes(width, order) for k in range(count))
    assert table == expected


def test_zeros_are_chunked() -> None:
    pieces = list(_common.zeros(100, 3 * MiB + 5))
    assert [o for o, _ in pieces] == [100, 100 + MiB, 100 + 2 * MiB, 100 + 3 * MiB]
    assert all(set(d) <= {0} for _, d in pieces)
    assert sum(len(d) for _, d in pieces) == 3 * MiB + 5
    assert list(_common.zeros(5, 0)) == []


# --- qcow2 ----------------------------------------------------------------------------


def parse_qcow2(plan: qcow2.Qcow2Plan) -> None:
    """Walk the structures like a reader would and check every invariant."""
    blocks = check_tiling(plan)
    cluster = qcow2.CLUSTER
    head = blocks[0]
    assert head[:8] == b"QFI\xfb\x00\x00\x00\x03"
    (cluster_bits,) = struct.unpack_from(">I", head, 20)
    size, crypt, l1_size, l1_offset, rt_offset, rt_clusters = struct.unpack_from(
        ">QIIQQI", head, 24
    )
    refcount_order, header_length = struct.unpack_from(">II", head, 96)
    assert (cluster_bits, size, crypt) == (16, plan.virtual_size, 0)
    assert (refcount_order, header_length) == (4, 112)
    assert struct.unpack_from(">QQQ", head, 72) == (0, 0, 0)  # feature bits
    assert struct.unpack_from(">I", head, 112)[0] == qcow2.EXT_FEATURE_NAMES
    clusters = plan.file_size // cluster
    assert plan.file_size % cluster == 0
    refcounts = [0] * clusters

    def use(offset: int) -> None:
        assert offset % cluster == 0 and offset < plan.file_size
        refcounts[offset // cluster] += 1

    use(0)
    for c in range(rt_clusters):
        use(rt_offset + c * cluster)
    table = covered(blocks, rt_offset, rt_clusters * cluster)
    rb_offsets = [o for (o,) in struct.iter_unpack(">Q", table) if o]
    for o in rb_offsets:
        use(o)
    l1 = covered(blocks, l1_offset, l1_size * 8) if l1_size else b""
    for c in range(-(-l1_size * 8 // cluster)):
        use(l1_offset + c * cluster)
    data_clusters = -(-plan.virtual_size // cluster)
    expected_data = plan.data_extents(0, plan.virtual_size)
    guest = 0
    for (entry,) in struct.iter_unpack(">Q", l1):
        assert entry >> 63 == 1  # COPIED
        l2_offset = entry & ((1 << 56) - 1)
        use(l2_offset)
        for (l2e,) in struct.iter_unpack(">Q", covered(blocks, l2_offset, cluster)):
            if guest >= data_clusters:
                assert l2e == 0
                continue
            assert l2e >> 63 == 1 and not l2e & (1 << 62)
            host = l2e & ((1 << 56) - 1)
            assert host == expected_data[0].file_offset + guest * cluster
            use(host)
            guest += 1
    assert guest == data_clusters
    # The refcount blocks say exactly what we counted: 1 everywhere, nothing leaked.
    assert refcounts == [1] * clusters
    per_block = cluster // 2
    for i, o in enumerate(rb_offsets):
        values = [v for (v,) in struct.iter_unpack(">H", covered(blocks, o, cluster))]
        for j, v in enumerate(values):
            assert v == (1 if i * per_block + j < clusters else 0)
    assert len(rb_offsets) * per_block >= clusters


@pytest.mark.parametrize("out", [0, 1, 3000, 65536, 65537, 3 * MiB, 512 * MiB + 7])
def test_qcow2_structures(out: int) -> None:
    parse_qcow2(qcow2.plan(out))


def test_qcow2_structures_across_refcount_blocks_and_l2_tables() -> None:
    # 5 GiB: 81920 data clusters, 10 L2 tables, 3 refcount blocks.
    plan = qcow2.plan(5 * GiB - 1)
    assert plan.layout.refcount_blocks == 3
    assert plan.layout.l1_entries == 10
    parse_qcow2(plan)


def test_qcow2_refcount_fixed_point_at_block_boundary() -> None:
    # Push the metadata just across a refcount block's coverage: the fixed point must
    # add the block that counts the blocks.
    for data_clusters in range(32760, 32775):
        lay = qcow2.layout(data_clusters * qcow2.CLUSTER)
        assert lay.refcount_blocks * qcow2.REFCOUNTS_PER_BLOCK >= lay.total_clusters
        assert (lay.refcount_blocks - 1) * qcow2.REFCOUNTS_PER_BLOCK < lay.total_clusters


def test_qcow2_empty_matches_qemu_shape() -> None:
    plan = qcow2.plan(0)
    assert plan.file_size == 3 * qcow2.CLUSTER  # header, refcount table, refcount block
    head = next(plan.metadata())[1]
    assert struct.unpack_from(">IQ", head, 36) == (0, 0)  # l1_size, l1_table_offset


def test_qcow2_too_big_is_a_usage_error() -> None:
    limit = qcow2.MAX_L1_ENTRIES * qcow2.ENTRIES_PER_L2 * qcow2.CLUSTER
    qcow2.plan(limit)
    with pytest.raises(UsageError, match="qcow2"):
        qcow2.plan(limit + 1)


# --- vmdk -----------------------------------------------------------------------------


def test_vmdk_empty_window_is_refused() -> None:
    with pytest.raises(UsageError, match="vmdk cannot hold an empty image"):
        vmdk.plan(0)


def test_vmdk_header_and_descriptor() -> None:
    plan = vmdk.plan(3000, filename="out.vmdk", identity=FIXED)
    blocks = check_tiling(plan)
    head = blocks[0]
    fields = struct.unpack_from("<4sIIQQQQIQQQB4sH", head)
    assert fields == (b"KDMV", 1, 3, 6, 128, 1, 20, 512, 21, 26, 128, 0, b"\n \r\n", 0)
    text = covered(blocks, 512, 20 * 512).rstrip(b"\0").decode()
    cid = FIXED.u32("vmdk CID")
    assert text == (
        "# Disk DescriptorFile\nversion=1\n"
        f"CID={cid:08x}\nparentCID=ffffffff\n"
        'createType="monolithicSparse"\n\n# Extent description\n'
        'RW 6 SPARSE "out.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "0"\n'
        'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\n'
        'ddb.adapterType = "ide"\nddb.toolsVersion = "2147483647"\n'
    )


def test_vmdk_descriptor_sanitizes_the_file_name() -> None:
    raw = vmdk.descriptor(8, 1, 'a"b\nc\td.vmdk')
    assert b'RW 8 SPARSE "a"b_c_d.vmdk"\n' in raw  # quotes kept, as qemu keeps them
    with pytest.raises(UsageError, match="too long"):
        vmdk.descriptor(8, 1, "x" * 20000)


def test_vmdk_cylinders_are_not_capped() -> None:
    # qemu writes capacity / (16 * 63) even past the ATA limit (3 TiB: 6391320).
    assert b'cylinders = "6391320"' in vmdk.descriptor(3 * TiB // 512, 1, "x")


@pytest.mark.parametrize("out", [1, 64 * MiB + 512, 200 * MiB])
def test_vmdk_grain_directories(out: int) -> None:
    plan = vmdk.plan(out)
    blocks = check_tiling(plan)
    lay = plan.layout
    grain0 = plan.data_extents(0, 1)[0].file_offset // 512
    assert grain0 == lay.grain_offset
    for gd_offset in (lay.rgd_offset, lay.gd_offset):
        gd = covered(blocks, gd_offset * 512, lay.gt_count * 4)
        grain = 0
        for (gt,) in struct.iter_unpack("<I", gd):
            for (entry,) in struct.iter_unpack("<I", covered(blocks, gt * 512, 2048)):
                if grain < lay.grains:
                    assert entry == grain0 + grain * 128
                else:
                    assert entry == 0
                grain += 1
        assert grain >= lay.grains


def test_vmdk_refuses_grains_past_2_tib() -> None:
    # The last grain must start below sector 2**32 (qemu's VMDK_EXTENT_MAX_SECTORS).
    plan = vmdk.plan(2 * TiB - 512 * MiB)
    last = plan.layout.grain_offset + (plan.layout.grains - 1) * 128
    assert last < 1 << 32
    with pytest.raises(UsageError, match="2 TiB"):
        vmdk.plan(2 * TiB)


# --- vpc ------------------------------------------------------------------------------

# docs/window.md's table (VHD geometry rounding), observed with qemu-img 7.2:
# out bytes -> (virtual size, C, H, S).
VPC_TABLE = [
    (1, 34816, 1, 4, 17),
    (34816, 34816, 1, 4, 17),
    (34817, 69632, 2, 4, 17),
    (69632, 69632, 2, 4, 17),
    (99999, 104448, 3, 4, 17),
    (1000448, 1009664, 29, 4, 17),
    (1048576, 1079296, 31, 4, 17),
    (10485760, 10514432, 302, 4, 17),
]


@pytest.mark.parametrize(("out", "size", "c", "h", "s"), VPC_TABLE)
def test_vpc_geometry_table(out: int, size: int, c: int, h: int, s: int) -> None:
    plan = vpc.plan(out)
    assert plan.virtual_size == size
    assert (plan.size.cylinders, plan.size.heads, plan.size.spt) == (c, h, s)


@pytest.mark.parametrize(
    ("gib", "size"),
    [(127, 136365219840), (128, 137438953472), (2040, 2190433320960)],
)
def test_vpc_above_the_geometry_ceiling(gib: int, size: int) -> None:
    plan = vpc.plan(gib * GiB)
    assert plan.virtual_size == size
    if gib > 127:
        assert (plan.size.cylinders, plan.size.heads, plan.size.spt) == (65535, 16, 255)


def test_vpc_exact_size_keeps_unaligned_sector_counts() -> None:
    n = vpc.MAX_GEOMETRY + 1
    assert vpc.plan(n * 512 - 100).virtual_size == n * 512


def test_vpc_over_2040_gib_is_a_usage_error() -> None:
    vpc.plan(vpc.MAX_SECTORS * 512)
    with pytest.raises(UsageError, match="2040 GiB"):
        vpc.plan(vpc.MAX_SECTORS * 512 + 1)
    with pytest.raises(UsageError):
        vpc.plan(2041 * GiB)


def reference_geometry(n: int) -> tuple[int, int, int]:
    """docs/window.md's words (VHD geometry rounding), written independently of the module."""
    n = min(n, 65535 * 16 * 255)
    if n >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = n // spt
    else:
        spt, cth = 17, n // 17
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads, cth = 31, 16, n // 31
            if cth >= heads * 1024:
                spt, heads, cth = 63, 16, n // 63
    return cth // heads, heads, spt


# Sector counts on each side of every branch of the rule.
_BRANCHES = [
    17 * 4 * 1024,  # heads leaves 4
    17 * 16 * 1024,  # spt 17 -> 31
    31 * 16 * 1024,  # spt 31 -> 63
    65535 * 16 * 63,  # spt 63 -> 255
    65535 * 16 * 255,  # the ceiling
]


@pytest.mark.parametrize("n", sorted({b + d for b in _BRANCHES for d in range(-3, 4)} | {1, 2, 67}))
def test_vpc_geometry_around_every_branch(n: int) -> None:
    assert vpc.geometry(n) == reference_geometry(n)
    size = vpc.size_for(n)
    assert size.sectors >= n
    if size.sectors != n or n <= vpc.MAX_GEOMETRY:
        assert size.cylinders * size.heads * size.spt in (size.sectors, vpc.MAX_GEOMETRY)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, vpc.MAX_SECTORS))
def test_vpc_size_is_the_first_geometry_that_holds_the_window(n: int) -> None:
    assert vpc.geometry(n) == reference_geometry(n)
    size = vpc.size_for(n)
    product = size.cylinders * size.heads * size.spt
    assert product >= min(n, vpc.MAX_GEOMETRY)
    if product == vpc.MAX_GEOMETRY:
        assert size.sectors == n
    else:
        assert size.sectors == product
        # No smaller search step would have held it: geometry(n + i) for the steps
        # before fell short (checked on the first few to keep it quick).
        for i in range(min(3, product - n)):
            c, h, s = reference_geometry(n + i)
            if c * h * s >= n:
                assert (c, h, s) == (size.cylinders, size.heads, size.spt)
                break


def test_vpc_structures() -> None:
    plan = vpc.plan(5 * MiB, identity=FIXED)
    blocks = check_tiling(plan)
    footer = blocks[0]
    assert footer == blocks[plan.file_size - 512]
    assert footer[:8] == b"conectix"
    assert footer[28:32] == b"qemu"
    assert struct.unpack_from(">I4s", footer, 32) == (0x00050003, b"Wi2k")
    assert struct.unpack_from(">QQHBBI", footer, 40) == (
        plan.virtual_size,
        plan.virtual_size,
        plan.size.cylinders,
        plan.size.heads,
        plan.size.spt,
        3,
    )
    assert struct.unpack_from(">I", footer, 24)[0] == FIXED.timestamp - vpc.VHD_EPOCH
    zeroed = footer[:64] + bytes(4) + footer[68:]
    assert struct.unpack_from(">I", footer, 64)[0] == ~sum(zeroed) & 0xFFFFFFFF
    dyn = blocks[512]
    assert dyn[:8] == b"cxsparse"
    assert struct.unpack_from(">QQIII", dyn, 8) == (2**64 - 1, 1536, 0x10000, 3, 2 * MiB)
    zeroed = dyn[:36] + bytes(4) + dyn[40:]
    assert struct.unpack_from(">I", dyn, 36)[0] == ~sum(zeroed) & 0xFFFFFFFF
    bat = covered(blocks, 1536, 512)
    entries = [e for (e,) in struct.iter_unpack(">I", bat)]
    assert entries[3:] == [0xFFFFFFFF] * 125
    for b, sector in enumerate(entries[:3]):
        assert blocks[sector * 512] == b"\xff" * 512  # the sector bitmap
        assert plan.data_extents(b * 2 * MiB, 1)[0].file_offset == sector * 512 + 512


@pytest.mark.parametrize(
    ("out", "qemu_file_size"),
    # File sizes of `qemu-img dd -O vpc bs=OUT count=1` (qemu 7.2) on a larger input.
    [(3000, 2100224), (2 * MiB, 2100224), (4 * MiB, 4197888), (100 * MiB, 104885760)],
)
def test_vpc_leaves_blocks_of_padding_only_unallocated(out: int, qemu_file_size: int) -> None:
    plan = vpc.plan(out, identity=FIXED)
    assert plan.virtual_size > plan.data_size or out == 3000
    assert plan.file_size == qemu_file_size
    blocks = check_tiling(plan)
    bat = covered(blocks, 1536, plan.bat_bytes)
    entries = [e for (e,) in struct.iter_unpack(">I", bat)]
    allocated = -(-out // (2 * MiB))
    assert all(e != 0xFFFFFFFF for e in entries[:allocated])
    assert entries[allocated:] == [0xFFFFFFFF] * (len(entries) - allocated)
    assert plan.blocks * 2 * MiB >= plan.virtual_size


def test_vpc_empty_matches_qemu_layout() -> None:
    plan = vpc.plan(0)
    assert (plan.virtual_size, plan.file_size) == (0, 2048)
    blocks = check_tiling(plan)
    assert struct.unpack_from(">HBB", blocks[0], 56) == (0, 0, 0)


# --- vhdx -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "block"),
    [
        (0, 8 * MiB),
        (GiB, 8 * MiB),
        (GiB + 512, 16 * MiB),
        (100 * GiB, 16 * MiB),
        (100 * GiB + 512, 32 * MiB),
        (32 * TiB, 32 * MiB),
        (32 * TiB + 512, 64 * MiB),
    ],
)
def test_vhdx_block_size_rule(size: int, block: int) -> None:
    assert vhdx.block_size_for(size) == block


@pytest.mark.parametrize(
    ("out", "qemu_file_size"),
    # File sizes of `qemu-img dd -O vhdx` (qemu 7.2), and of `qemu-img create -f vhdx`
    # (no block written yet) for the large ones, whose BAT region grows.
    [
        (0, 74448896),
        (3000, 16 * MiB),
        (100 * MiB, 112 * MiB),
        (5 * 1024 * GiB, 9 * MiB),
        (16 * 1024 * GiB, 12 * MiB),
        (30 * 1024 * GiB, 15 * MiB),
    ],
)
def test_vhdx_places_blocks_where_qemu_does(out: int, qemu_file_size: int) -> None:
    plan = vhdx.plan(out)
    data = plan.layout.payload_blocks * plan.layout.block_size
    if out > 1024 * GiB:
        assert plan.file_size - data == qemu_file_size
    else:
        assert plan.file_size == qemu_file_size


def test_vhdx_over_64_tib_is_a_usage_error() -> None:
    vhdx.plan(64 * TiB)
    with pytest.raises(UsageError, match="64 TiB"):
        vhdx.plan(64 * TiB + 1)


def parse_vhdx(plan: vhdx.VhdxPlan, blocks: dict[int, bytes]) -> list[int]:
    """Check headers, region tables and metadata; returns the BAT entries."""
    assert blocks[0][:8] == b"vhdxfile"
    headers = []
    for at in (vhdx.HEADER_1, vhdx.HEADER_2):
        raw = covered(blocks, at, 4096)
        assert raw[:4] == b"head"
        assert struct.unpack_from("<I", raw, 4)[0] == crc32c(raw[:4] + bytes(4) + raw[8:])
        headers.append(struct.unpack_from("<4sIQ16s16s16sHHIQ", raw, 0)[2:])
    assert headers[0][0] == 1 and headers[1][0] == 2  # sequence numbers
    for h in headers:
        assert h[3] == bytes(16)  # log GUID
        assert h[4:] == (0, 1, MiB, MiB)
    regions = {}
    for at in (vhdx.REGION_TABLE_1, vhdx.REGION_TABLE_2):
        raw = covered(blocks, at, 64 * KiB)
        assert raw[:4] == b"regi"
        assert struct.unpack_from("<I", raw, 4)[0] == crc32c(raw[:4] + bytes(4) + raw[8:])
        count = struct.unpack_from("<I", raw, 8)[0]
        regions = {
            guid: (offset, length)
            for guid, offset, length, _flags in (
                struct.unpack_from("<16sQII", raw, 16 + 32 * i) for i in range(count)
            )
        }
    bat_offset, bat_length = regions[vhdx.BAT_GUID]
    meta_offset, meta_length = regions[vhdx.METADATA_GUID]
    assert bat_offset == 2 * MiB and meta_offset == bat_offset + bat_length
    meta = covered(blocks, meta_offset, meta_length)
    assert meta[:8] == b"metadata"
    items = {}
    for i in range(struct.unpack_from("<H", meta, 10)[0]):
        guid, offset, length, _flags = struct.unpack_from("<16sIII", meta, 32 + 32 * i)
        items[guid] = meta[offset : offset + length]
    block_size, flags = struct.unpack("<II", items[vhdx.FILE_PARAMETERS_GUID])
    assert (block_size, flags) == (plan.layout.block_size, 0)
    assert struct.unpack("<Q", items[vhdx.VIRTUAL_DISK_SIZE_GUID])[0] == plan.virtual_size
    assert struct.unpack("<I", items[vhdx.LOGICAL_SECTOR_GUID])[0] == 512
    assert struct.unpack("<I", items[vhdx.PHYSICAL_SECTOR_GUID])[0] == 512
    assert len(items[vhdx.PAGE83_GUID]) == 16
    bat = covered(blocks, bat_offset, bat_length)
    return [e for (e,) in struct.iter_unpack("<Q", bat)]


@pytest.mark.parametrize("out", [1, 8 * MiB, 8 * MiB + 1, 50 * MiB])
def test_vhdx_structures(out: int) -> None:
    plan = vhdx.plan(out, identity=FIXED)
    entries = parse_vhdx(plan, check_tiling(plan))
    blocks = plan.layout.payload_blocks
    assert entries[:blocks] == [
        (plan.data_extents(b * 8 * MiB, 1)[0].file_offset) | 6 for b in range(blocks)
    ]
    assert not any(entries[blocks:])


def test_vhdx_sector_bitmap_entries_every_chunk_ratio() -> None:
    # 5 GiB in 16 MiB blocks: 320 payload blocks, chunk ratio 256.
    plan = vhdx.plan(5 * GiB)
    lay = plan.layout
    assert (lay.block_size, lay.chunk_ratio, lay.payload_blocks) == (16 * MiB, 256, 320)
    assert lay.bat_entries == 321
    blocks: dict[int, bytes] = {}
    for offset, data in plan.metadata():
        if offset < lay.payload_offset:
            blocks[offset] = data
    entries = parse_vhdx(plan, blocks)
    payload = [e for i, e in enumerate(entries[: lay.bat_entries]) if i % 257 != 256]
    assert entries[256] == 0  # sector bitmap block: not present
    assert payload == [(lay.payload_offset + b * lay.block_size) | 6 for b in range(320)]
    assert not any(entries[lay.bat_entries :])


def test_vhdx_empty_has_the_bat_qemu_expects() -> None:
    plan = vhdx.plan(0)
    assert plan.layout.bat_length == 64 * MiB
    entries = parse_vhdx(plan, check_tiling(plan))
    assert not any(entries)


# --- laziness and speed ---------------------------------------------------------------


def peak_while_iterating(blocks: Iterator[tuple[int, bytes]]) -> tuple[int, int]:
    tracemalloc.start()
    try:
        total = 0
        for _offset, data in blocks:
            total += len(data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return total, peak


@pytest.mark.parametrize(
    ("fmt", "out"),
    [
        ("qcow2", 2 * TiB),
        ("vmdk", 2 * TiB - GiB),
        ("vhdx", 2 * TiB),
        ("vhdx", 64 * TiB),
        ("vdi", 16 * TiB),
    ],
)
def test_huge_metadata_is_generated_lazily(fmt: str, out: int) -> None:
    plan = make_plan(fmt, out)
    total, peak = peak_while_iterating(plan.metadata())
    assert total >= 4 * MiB
    assert peak < 8 * MiB, f"{peak} bytes held at once for {total} bytes of metadata"


def test_vpc_2040_gib_metadata_is_lazy() -> None:
    # The 4 MiB BAT comes in pieces; a million identical bitmaps follow (not iterated
    # here under tracemalloc: too slow, and each is the same 512-byte object).
    plan = vpc.plan(2040 * GiB)
    blocks = plan.metadata()
    total, peak = peak_while_iterating(itertools.islice(blocks, 100))
    assert total > 4 * MiB
    assert peak < 2 * MiB
    bitmaps = {id(data) for _offset, data in itertools.islice(blocks, 1000)}
    assert len(bitmaps) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_64_gib_metadata_is_fast(fmt: str) -> None:
    start = time.perf_counter()
    plan = make_plan(fmt, 64 * GiB)
    total = sum(len(data) for _offset, data in plan.metadata())
    elapsed = time.perf_counter() - start
    assert total > 0
    assert elapsed < 1.0, f"{fmt}: {elapsed:.2f} s for 64 GiB of metadata"


# --- vdi ------------------------------------------------------------------------------


def test_vdi_structures() -> None:
    """The header and block map `qemu-img dd -O vdi` writes (qemu 7.2, read with xxd):
    its text, header size 0x180, the map at 0x200 padded with zeros, every block
    allocated in order, the UUIDs stored with their first three fields swapped."""
    plan = vdi.plan(3_000_000, identity=FIXED)
    assert (plan.virtual_size, plan.blocks, plan.data_start) == (3_000_320, 3, 0x400)
    assert plan.file_size == 0x400 + 3 * MiB  # as qemu's file
    blocks = check_tiling(plan)
    header = blocks[0]
    assert header[:64] == b"<<< QEMU VM Virtual Disk Image >>>\n".ljust(64, b"\0")
    assert struct.unpack_from("<IIIII", header, 64) == (0xBEDA107F, 0x00010001, 0x180, 1, 0)
    assert struct.unpack_from("<IIIIIII", header, 340) == (0x200, 0x400, 0, 0, 0, 512, 0)
    assert struct.unpack_from("<QIIII", header, 368) == (3_000_320, MiB, 0, 3, 3)
    image = FIXED.guid("vdi image uuid")
    assert header[392:408] == image[3::-1] + image[5:3:-1] + image[7:5:-1] + image[8:]
    assert header[399] >> 4 == 4  # the version nibble, where qemu's swap puts it
    assert header[424:512] == bytes(88)  # no link, no parent
    assert covered(blocks, 0x200, 0x200) == struct.pack("<3I", 0, 1, 2) + bytes(500)
    assert plan.data_extents(0, plan.data_size) == [Extent(0x400, 3_000_320)]
    assert covered(blocks, 0x400 + 3_000_320, 3 * MiB - 3_000_320) == bytes(3 * MiB - 3_000_320)
    assert vdi_layout.parse_header(header).virtual_size == plan.virtual_size


def test_vdi_empty_matches_qemu_layout() -> None:
    plan = vdi.plan(0)
    assert (plan.virtual_size, plan.blocks, plan.file_size) == (0, 0, 512)
    blocks = check_tiling(plan)
    assert struct.unpack_from("<IIQ", blocks[0], 340) == (0x200, 0x200, 0)


def test_vdi_over_qemus_maximum_is_a_usage_error() -> None:
    """qemu refuses more than 0x1fffff80 blocks of 1 MiB: the block map must fit in one
    request of at most INT_MAX bytes."""
    top = vdi_layout.MAX_DISK_SIZE
    assert top == 0x1FFFFF80 * MiB
    assert vdi.plan(top).blocks == 0x1FFFFF80
    with pytest.raises(UsageError, match=r"^vdi cannot hold \d+ bytes"):
        vdi.plan(top + 1)
