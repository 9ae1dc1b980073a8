"""qcow2 on-disk layout: the header, its extensions, table entries and compressed
clusters, parsed from bytes and built into bytes with no I/O (see QEMU's
docs/interop/qcow2.txt).

Every function here raises :class:`~aiodd.errors.ImageError` (or its subclass
:class:`~aiodd.errors.UnsupportedImageError`) on bad input and nothing else; the checks
and their order follow ``qcow2_do_open`` in QEMU, with the extra rule that a table the
image claims must lie inside the file before anything is allocated for it.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array

from aiodd._typing_names import NamedTuple
from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats.common import SECTOR

# Detection imports the probe's module alone (docs/performance.md, "Start-up").
from aiodd.formats.qcow2.probe import MAGIC as MAGIC
from aiodd.formats.qcow2.probe import probe as probe

NAME = "qcow2"

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # the compression type byte sits at 104 when header_length allows
MAX_BACKING_NAME = 1023
# A data file name longer than a path (PATH_MAX - 1) is one qemu cannot open; refusing
# it here also bounds the name the KVM guest passes to the host (docs/kvm.md).
MAX_DATA_FILE_NAME = 4095
BACKING_FORMAT_BUF = 16  # qemu's bs->backing_format[16]: the name must be shorter
MAX_L1_BYTES = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
SNAPSHOT_HEADER_SIZE = 40  # the fixed part of one snapshot table entry
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441

# Incompatible feature bits 0 to 4, in the order FEATURE_NAMES names them.
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = (
    1 << bit for bit in range(5)
)
INCOMPAT_KNOWN = 0x1F
# The feature name table qemu 7.2 writes (type, bit, name), types: 0 incompatible,
# 1 compatible, 2 autoclear.  Informational: a reader finds an unknown bit's name in it.
FEATURE_NAMES = (
    (0, 0, b"dirty bit"),
    (0, 1, b"corrupt bit"),
    (0, 2, b"external data file"),
    (0, 3, b"compression type"),
    (0, 4, b"extended L2 entries"),
    (1, 0, b"lazy refcounts"),
    (2, 0, b"bitmaps"),
    (2, 1, b"raw external data"),
)
# Autoclear feature bits.
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

# Table entries.
L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
SUBCLUSTERS = 32
ALL_ALLOC = 0xFFFF_FFFF

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")


class Header(NamedTuple):
    """The parts of a qcow2 header the decoder needs, validated."""

    version: int
    cluster_bits: int
    size: int  # header.size as stored (the disk reads as size rounded down to 512)
    l1_size: int
    l1_table_offset: int
    l1_entries: int  # how many L1 entries cover ``size`` (qemu's l1_vm_state_index)
    incompatible: int
    compatible: int
    autoclear: int
    compression_type: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_bits(self) -> int:
        """log2 of the number of entries in one L2 table."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def virtual_size(self) -> int:
        return self.size // SECTOR * SECTOR

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear & AUTOCLEAR_DATA_FILE_RAW)


def _err(name: str, message: str) -> ImageError:
    return ImageError(name, message, NAME)


def _unsupported(name: str, message: str) -> UnsupportedImageError:
    return UnsupportedImageError(name, message, NAME)


def header_cluster_bits(head: bytes, name: str) -> int:
    """Check the magic, version and cluster size from the header's first 24 bytes.

    The decoder calls this first to learn how much of the file (one cluster) it must
    read for :func:`parse_header`.
    """
    if len(head) < 24:
        raise _err(name, f"qcow2 header is truncated (the file has {len(head)} bytes)")
    if head[:4] != MAGIC:
        raise _err(name, "image is not in qcow2 format (no QFI\\xfb magic)")
    version = int.from_bytes(head[4:8], "big")
    if version not in (2, 3):
        raise _unsupported(name, f"qcow2 version {version} is not supported (only 2 and 3)")
    cluster_bits = int.from_bytes(head[20:24], "big")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _err(
            name,
            f"qcow2 cluster_bits {cluster_bits} is out of range"
            f" ({MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS})",
        )
    return cluster_bits


def _c_string(raw: bytes) -> str:
    """A name stored in the header, read as qemu reads it (up to the first NUL)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _check_table(
    name: str,
    what: str,
    offset: int,
    entries: int,
    entry_len: int,
    max_bytes: int,
    cluster_size: int,
) -> None:
    """qemu's ``qcow2_validate_table``: a fixed size limit, no overflow, aligned."""
    if entries > max_bytes // entry_len:
        raise _err(name, f"qcow2 {what} is too large ({entries} entries)")
    if INT64_MAX - entries * entry_len < offset or offset & (cluster_size - 1):
        raise _err(name, f"qcow2 {what} offset {offset:#x} is invalid")


def _check_in_file(name: str, what: str, offset: int, length: int, file_size: int) -> None:
    if length and offset + length > file_size:
        where = "lies" if offset >= file_size else "extends"
        raise _err(name, f"qcow2 {what} at {offset:#x} {where} past the end of the file")


class Extensions(NamedTuple):
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: tuple[tuple[int, int, str], ...] = ()  # (type, bit, name)


def parse_extensions(cluster: bytes, start: int, end: int, name: str) -> Extensions:
    """The header extensions in ``cluster[start:end]`` (qemu's ``qcow2_read_extensions``).

    ``cluster`` is the image's first cluster, zero-padded where the file is shorter.
    """
    backing_format: str | None = None
    data_file: str | None = None
    features: list[tuple[int, int, str]] = []
    offset = start
    while offset < end:
        if offset + _EXT.size > len(cluster):
            raise _err(name, f"qcow2 header extension at {offset:#x} is too large")
        magic, length = _EXT.unpack_from(cluster, offset)
        offset += _EXT.size
        if offset > end or length > end - offset:
            raise _err(
                name, f"qcow2 header extension {magic:#010x} at {offset - 8:#x} is too large"
            )
        data = cluster[offset : offset + length]
        if magic == EXT_END:
            break
        if magic == EXT_BACKING_FORMAT:
            if length >= BACKING_FORMAT_BUF:
                raise _err(name, f"qcow2 backing format name is too long ({length} bytes)")
            backing_format = _c_string(data)
        elif magic == EXT_FEATURE_TABLE:
            for pos in range(0, length - 47, 48):
                kind, bit = data[pos], data[pos + 1]
                features.append((kind, bit, _c_string(data[pos + 2 : pos + 48])))
        elif magic == EXT_DATA_FILE:
            data_file = _c_string(data)
        offset += (length + 7) & ~7
    return Extensions(backing_format, data_file, tuple(features))


def _unsupported_features(mask: int, table: tuple[tuple[int, int, str], ...]) -> str:
    parts = []
    for bit in range(64):
        if mask >> bit & 1:
            label = next((n for k, b, n in table if k == 0 and b == bit and n), None)
            parts.append(f"bit {bit} ({label})" if label else f"bit {bit}")
    noun = "feature" if len(parts) == 1 else "features"
    return f"qcow2 image uses unsupported incompatible {noun}: {', '.join(parts)}"


def parse_header(cluster: bytes, file_size: int, name: str) -> Header:
    """Parse and validate the header held in the image's first cluster.

    ``cluster`` holds the file's first ``min(cluster_size, file_size)`` bytes (more is
    allowed: it is cut to one cluster).  Tables the header claims are checked against
    ``file_size``.
    """
    cluster_bits = header_cluster_bits(cluster, name)
    cluster_size = 1 << cluster_bits
    cluster = cluster[:cluster_size]
    if len(cluster) < _HEADER_V2.size:
        raise _err(name, f"qcow2 header is truncated (the file has {len(cluster)} bytes)")
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        _cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _HEADER_V2.unpack_from(cluster)

    if version == 2:
        incompatible = compatible = autoclear = 0
        refcount_order = 4
        header_length = V2_HEADER_LENGTH
    else:
        if len(cluster) < V3_HEADER_LENGTH:
            raise _err(
                name, f"qcow2 version 3 header is truncated (the file has {len(cluster)} bytes)"
            )
        incompatible, compatible, autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(
            cluster, _HEADER_V2.size
        )
        if header_length < V3_HEADER_LENGTH:
            raise _err(
                name,
                f"qcow2 header_length {header_length} is too short"
                f" (version 3 needs at least {V3_HEADER_LENGTH})",
            )
    if header_length > cluster_size:
        raise _err(name, f"qcow2 header_length {header_length} exceeds the cluster size")
    if header_length > len(cluster):
        raise _err(
            name,
            f"qcow2 header is truncated (header_length {header_length},"
            f" the file has {len(cluster)} bytes)",
        )
    if backing_file_offset > cluster_size:
        raise _err(
            name, f"qcow2 backing file name offset {backing_file_offset:#x} is outside the header"
        )
    ext_end = backing_file_offset if backing_file_offset else cluster_size
    # The extension area may run past a short file: qemu reads zeros there.
    padded = cluster + bytes(cluster_size - len(cluster))

    compression_type = cluster[V3_HEADER_LENGTH] if header_length > V3_HEADER_LENGTH else 0
    if compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise _unsupported(name, f"qcow2 compression type {compression_type} is unknown")
    if compression_type == COMPRESSION_ZLIB and incompatible & INCOMPAT_COMPRESSION:
        raise _err(name, "qcow2 compression type bit is set but the compression type is zlib")
    if compression_type != COMPRESSION_ZLIB and not incompatible & INCOMPAT_COMPRESSION:
        raise _err(name, "qcow2 compression type is not zlib but the compression type bit is clear")

    if incompatible & ~INCOMPAT_KNOWN:
        try:
            table = parse_extensions(padded, header_length, ext_end, name).feature_names
        except ImageError:
            table = ()
        raise _unsupported(name, _unsupported_features(incompatible & ~INCOMPAT_KNOWN, table))
    # The corrupt bit only stops qemu from opening the image read/write; the dirty bit
    # (lazy refcounts) only means the refcounts need a repair.  Reads are unaffected.

    extended_l2 = bool(incompatible & INCOMPAT_EXTL2)
    if extended_l2 and cluster_size // SUBCLUSTERS < SECTOR:
        raise _err(
            name,
            f"qcow2 extended L2 entries need clusters of at least 16 KiB"
            f" (the cluster size is {cluster_size})",
        )
    if refcount_order > 6:
        raise _err(name, f"qcow2 refcount_order {refcount_order} is too large (at most 6)")
    if crypt_method:
        raise _unsupported(name, f"qcow2 encryption (crypt_method {crypt_method}) is not supported")

    if refcount_table_clusters == 0:
        raise _err(name, "qcow2 image has no refcount table")
    _check_table(
        name,
        "refcount table",
        refcount_table_offset,
        refcount_table_clusters,
        cluster_size,
        MAX_REFTABLE_BYTES,
        cluster_size,
    )
    _check_in_file(
        name,
        "refcount table",
        refcount_table_offset,
        refcount_table_clusters * cluster_size,
        file_size,
    )
    _check_table(
        name,
        "snapshot table",
        snapshots_offset,
        nb_snapshots,
        SNAPSHOT_HEADER_SIZE,
        SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
        cluster_size,
    )
    _check_in_file(
        name, "snapshot table", snapshots_offset, nb_snapshots * SNAPSHOT_HEADER_SIZE, file_size
    )
    _check_table(name, "L1 table", l1_table_offset, l1_size, 8, MAX_L1_BYTES, cluster_size)

    l2_bits = cluster_bits - (4 if extended_l2 else 3)
    shift = cluster_bits + l2_bits
    l1_entries = (size + (1 << shift) - 1) >> shift
    if l1_entries > INT_MAX:
        raise _err(name, f"qcow2 virtual size {size} is too big")
    if l1_size < l1_entries:
        raise _err(
            name,
            f"qcow2 L1 table is too small ({l1_size} entries, the virtual size needs {l1_entries})",
        )
    _check_in_file(name, "L1 table", l1_table_offset, l1_entries * 8, file_size)

    ext = parse_extensions(padded, header_length, ext_end, name)
    data_file: str | None = None
    if incompatible & INCOMPAT_DATA_FILE:
        if not ext.data_file:
            raise _err(name, "qcow2 external data file bit is set but the image names no data file")
        length = len(ext.data_file.encode("utf-8", "surrogateescape"))
        if length > MAX_DATA_FILE_NAME:
            raise _err(name, f"qcow2 external data file name is too long ({length} bytes)")
        data_file = ext.data_file
    elif autoclear & AUTOCLEAR_DATA_FILE_RAW:
        raise _err(name, "qcow2 raw external data bit is set without an external data file")

    backing_file: str | None = None
    if backing_file_offset:
        if backing_file_size > min(MAX_BACKING_NAME, cluster_size - backing_file_offset):
            raise _err(name, f"qcow2 backing file name is too long ({backing_file_size} bytes)")
        raw = padded[backing_file_offset : backing_file_offset + backing_file_size]
        backing_file = _c_string(raw) or None

    return Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        l1_entries=l1_entries,
        incompatible=incompatible,
        compatible=compatible,
        autoclear=autoclear,
        compression_type=compression_type,
        backing_file=backing_file,
        backing_format=ext.backing_format or None,
        data_file=data_file,
    )


def build_header(
    *,
    cluster_bits: int,
    size: int,
    l1_size: int,
    l1_table_offset: int,
    refcount_table_offset: int,
    refcount_table_clusters: int,
    refcount_order: int,
    header_length: int,
) -> bytes:
    """A version 3 header with no backing file, snapshots or features, followed by the
    feature name table extension and the end of the extensions.  The bytes between the
    fields and ``header_length`` (the zlib compression type, padding) are zeros."""
    # Version 3; no backing file name, no encryption, no snapshots; no feature bits.
    fields = _HEADER_V2.pack(
        MAGIC, 3, 0, 0, cluster_bits, size, 0, l1_size, l1_table_offset,
        refcount_table_offset, refcount_table_clusters, 0, 0,
    ) + _HEADER_V3.pack(0, 0, 0, refcount_order, header_length)  # fmt: skip
    table = b"".join(struct.pack(">BB46s", kind, bit, name) for kind, bit, name in FEATURE_NAMES)
    extension = _EXT.pack(EXT_FEATURE_TABLE, len(table)) + table + _EXT.pack(EXT_END, 0)
    return fields.ljust(header_length, b"\0") + extension


def be64_table(data: bytes) -> array[int]:
    """A table of big-endian 64-bit entries as an ``array('Q')`` in host order.

    A trailing partial entry is dropped (the caller pads tables to whole entries).
    """
    table = array("Q")
    table.frombytes(data[: len(data) // 8 * 8])
    if sys.byteorder == "little":
        table.byteswap()
    return table


def compressed_location(entry: int, cluster_bits: int) -> tuple[int, int]:
    """``(host_offset, length)`` of a compressed cluster's data from its L2 entry.

    The length is the whole sectors the entry counts, as qemu reads them; the stream
    itself may end earlier.
    """
    csize_shift = 62 - (cluster_bits - 8)
    csize_mask = (1 << (cluster_bits - 8)) - 1
    offset = entry & ((1 << csize_shift) - 1)
    sectors = ((entry >> csize_shift) & csize_mask) + 1
    return offset, sectors * SECTOR - (offset & (SECTOR - 1))


def decompress_cluster(
    data: bytes, cluster_size: int, compression_type: int, name: str, where: int
) -> bytes:
    """Inflate one compressed cluster; the output must be exactly one cluster.

    Bounded: never produces more than ``cluster_size + 1`` bytes whatever the input
    claims.  Bytes after the end of the compressed stream (sector padding) are ignored,
    as qemu ignores them.
    """
    try:
        if compression_type == COMPRESSION_ZSTD:
            out = _zstd_decompress(data, cluster_size + 1)
        else:
            out = zlib.decompressobj(-12).decompress(data, cluster_size + 1)
    except (zlib.error, ValueError, MemoryError) as exc:
        raise _err(name, f"qcow2 compressed cluster at {where:#x} fails to inflate") from exc
    except Exception as exc:  # zstandard.ZstdError, whose module may not be importable
        if type(exc).__name__ != "ZstdError":
            raise
        raise _err(name, f"qcow2 compressed cluster at {where:#x} fails to inflate") from exc
    if len(out) > cluster_size:
        raise _err(name, f"qcow2 compressed cluster at {where:#x} inflates beyond one cluster")
    if len(out) < cluster_size:
        raise _err(
            name,
            f"qcow2 compressed cluster at {where:#x} inflates to {len(out)} bytes,"
            f" less than one cluster",
        )
    return out


_ZSTD_MAX_WINDOW = 1 << 23  # a 2 MiB cluster needs a 2 MiB window at most


def _zstd_decompress(data: bytes, limit: int) -> bytes:
    import zstandard

    reader = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(
        data, read_size=max(len(data), 1), read_across_frames=False
    )
    out: bytes = reader.read(limit)
    return out
