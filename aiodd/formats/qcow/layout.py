"""qcow (version 1) on-disk layout: the header and compressed clusters, parsed from
bytes with no I/O.

The checks and their order follow ``qcow_open`` in QEMU 7.2, with the extra rule that
the L1 table must lie inside the file before anything is allocated for it.  Every
function raises :class:`~aiodd.errors.ImageError` (or its subclass
:class:`~aiodd.errors.UnsupportedImageError`) on bad input and nothing else.
"""

from __future__ import annotations

import struct
import zlib

from aiodd._typing_names import NamedTuple
from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats.common import SECTOR

# Detection imports the probe's module alone (docs/performance.md, "Start-up").
from aiodd.formats.qcow.probe import HEADER_SIZE as HEADER_SIZE
from aiodd.formats.qcow.probe import MAGIC as MAGIC
from aiodd.formats.qcow.probe import VERSION as VERSION
from aiodd.formats.qcow.probe import probe as probe

NAME = "qcow"
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 16
# l2_bits counts 8-byte entries: tables of 512 bytes to 64 KiB.
MIN_L2_BITS, MAX_L2_BITS = 6, 13
MAX_BACKING_NAME = 1023
INT_MAX = (1 << 31) - 1
UINT64_MAX = (1 << 64) - 1
CRYPT_NONE, CRYPT_AES = 0, 1
OFLAG_COMPRESSED = 1 << 63

_HEADER = struct.Struct(">4sIQIIQBBHIQ")


class Header(NamedTuple):
    """The parts of a qcow header the decoder needs, validated."""

    size: int  # as stored; the disk reads as size rounded down to 512
    cluster_bits: int
    l2_bits: int
    l1_table_offset: int
    l1_size: int  # entries
    backing_file_offset: int  # 0: no backing file
    backing_file_size: int

    @property
    def virtual_size(self) -> int:
        return self.size // SECTOR * SECTOR


def _err(name: str, message: str) -> ImageError:
    return ImageError(name, message, NAME)


def parse_header(head: bytes, file_size: int, name: str) -> Header:
    """Parse and validate the header in the file's first 48 bytes; the L1 table it
    claims is checked against ``file_size``."""
    if len(head) < HEADER_SIZE:
        raise _err(name, f"qcow header is truncated (the file has {len(head)} bytes)")
    (
        magic,
        version,
        backing_file_offset,
        backing_file_size,
        _mtime,
        size,
        cluster_bits,
        l2_bits,
        _padding,
        crypt_method,
        l1_table_offset,
    ) = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise _err(name, "image is not in qcow format (no QFI\\xfb magic)")
    if version != VERSION:
        hint = ": this is a qcow2 image" if version in (2, 3) else ""
        raise UnsupportedImageError(
            name, f"qcow version {version} is not supported (only 1){hint}", NAME
        )
    if size <= 1:
        raise _err(name, f"qcow image size {size} is too small (at least 2 bytes)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _err(
            name,
            f"qcow cluster_bits {cluster_bits} is out of range"
            f" ({MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS})",
        )
    if not MIN_L2_BITS <= l2_bits <= MAX_L2_BITS:
        raise _err(name, f"qcow l2_bits {l2_bits} is out of range ({MIN_L2_BITS} to {MAX_L2_BITS})")
    if crypt_method > CRYPT_AES:
        raise _err(name, f"qcow encryption method {crypt_method} is invalid")
    if crypt_method:
        raise UnsupportedImageError(
            name, f"qcow encryption (crypt_method {crypt_method}) is not supported", NAME
        )
    shift = cluster_bits + l2_bits
    if size > UINT64_MAX - (1 << shift):
        raise _err(name, f"qcow virtual size {size} is too big")
    l1_size = (size + (1 << shift) - 1) >> shift
    if l1_size > INT_MAX // 8:
        raise _err(name, f"qcow virtual size {size} is too big")
    end = l1_table_offset + l1_size * 8
    if end > file_size:
        where = "lies" if l1_table_offset >= file_size else "extends"
        raise _err(name, f"qcow L1 table at {l1_table_offset:#x} {where} past the end of the file")
    if backing_file_offset and backing_file_size > MAX_BACKING_NAME:
        raise _err(name, f"qcow backing file name is too long ({backing_file_size} bytes)")
    return Header(
        size=size,
        cluster_bits=cluster_bits,
        l2_bits=l2_bits,
        l1_table_offset=l1_table_offset,
        l1_size=l1_size,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size if backing_file_offset else 0,
    )


def backing_name(raw: bytes) -> str | None:
    """The backing file name as qemu keeps it: up to the first NUL; none when empty."""
    text = raw.split(b"\0", 1)[0]
    return text.decode("utf-8", "surrogateescape") or None


def build_header(
    *,
    size: int,
    cluster_bits: int,
    l2_bits: int,
    l1_table_offset: int,
    backing_file_offset: int = 0,
    backing_file_size: int = 0,
    crypt_method: int = 0,
) -> bytes:
    """A header with these fields (mtime 0), for the tests and the fuzzers' bases."""
    return _HEADER.pack(
        MAGIC, VERSION, backing_file_offset, backing_file_size, 0, size, cluster_bits,
        l2_bits, 0, crypt_method, l1_table_offset,
    )  # fmt: skip


def compressed_location(entry: int, cluster_bits: int) -> tuple[int, int]:
    """``(host_offset, length)`` of a compressed cluster from its L2 entry: the length
    (less than a cluster) sits above the offset's ``63 - cluster_bits`` bits."""
    shift = 63 - cluster_bits
    return entry & ((1 << shift) - 1), (entry >> shift) & ((1 << cluster_bits) - 1)


def decompress_cluster(data: bytes, cluster_size: int, name: str, where: int) -> bytes:
    """Inflate one compressed cluster (raw deflate, a 4 KiB window) as qemu does: the
    stream must give at least one cluster; what it would give past that is not asked
    for, so it never costs more than one cluster."""
    try:
        out = zlib.decompressobj(-12).decompress(data, cluster_size)
    except (zlib.error, ValueError, MemoryError) as exc:
        raise _err(name, f"qcow compressed cluster at {where:#x} fails to inflate") from exc
    if len(out) < cluster_size:
        raise _err(
            name,
            f"qcow compressed cluster at {where:#x} inflates to {len(out)} bytes,"
            f" less than one cluster",
        )
    return out
