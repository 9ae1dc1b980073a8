"""QED on-disk layout: the header and table entries, parsed from bytes with no I/O.

The checks and their order follow ``bdrv_qed_do_open`` and the offset checks of
``qed.h`` in QEMU 7.2.  Every function raises :class:`~aiodd.errors.ImageError` (or its
subclass :class:`~aiodd.errors.UnsupportedImageError`) on bad input and nothing else.
"""

from __future__ import annotations

import struct

from aiodd._typing_names import NamedTuple
from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats.common import SECTOR

# Detection imports the probe's module alone (docs/performance.md, "Start-up").
from aiodd.formats.qed.probe import HEADER_SIZE as HEADER_SIZE
from aiodd.formats.qed.probe import MAGIC as MAGIC
from aiodd.formats.qed.probe import probe as probe

NAME = "qed"

F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02  # not closed cleanly: qemu checks it only when it opens it writable
F_BACKING_FORMAT_NO_PROBE = 0x04  # the backing file is raw, not probed
FEATURE_MASK = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE

MIN_CLUSTER_SIZE = 4 * 1024
MAX_CLUSTER_SIZE = 64 * 1024 * 1024
MIN_TABLE_SIZE, MAX_TABLE_SIZE = 1, 16  # in clusters
# qemu keeps the name in a PATH_MAX buffer with its NUL.
MAX_BACKING_NAME = 4095
UINT32_MAX = (1 << 32) - 1
UINT64_MASK = (1 << 64) - 1

UNALLOCATED, ZERO_CLUSTER = 0, 1  # the table entries that are not offsets

_HEADER = struct.Struct("<4sIIIQQQQQII")


class Header(NamedTuple):
    """The parts of a QED header the decoder needs, validated."""

    cluster_size: int
    table_size: int  # in clusters
    header_size: int  # in clusters
    features: int
    l1_table_offset: int
    image_size: int
    file_size: int  # the file's size rounded down to a cluster, as qemu uses it
    backing_filename_offset: int
    backing_filename_size: int

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def table_entries(self) -> int:
        return self.table_size * self.cluster_size // 8

    @property
    def l1_shift(self) -> int:
        """log2 of the virtual bytes one L2 table maps."""
        return self.cluster_bits + self.table_entries.bit_length() - 1

    @property
    def l1_entries(self) -> int:
        """How many L1 entries the image size reaches (the rest are never read)."""
        return -(-self.image_size >> self.l1_shift)

    @property
    def has_backing_file(self) -> bool:
        return bool(self.features & F_BACKING_FILE)

    @property
    def backing_format(self) -> str | None:
        return "raw" if self.features & F_BACKING_FORMAT_NO_PROBE else None

    def cluster_offset_valid(self, offset: int) -> bool:
        """qemu's ``qed_check_cluster_offset``: aligned, past the header, before the
        file's last whole cluster ends."""
        if offset & (self.cluster_size - 1):
            return False
        return self.header_size * self.cluster_size <= offset < self.file_size

    def table_offset_valid(self, offset: int) -> bool:
        """qemu's ``qed_check_table_offset``: the table's first and last clusters valid.
        The last's offset must exceed the first's, so a one-cluster table never is."""
        end = (offset + (self.table_size - 1) * self.cluster_size) & UINT64_MASK
        if end <= offset:
            return False
        return self.cluster_offset_valid(offset) and self.cluster_offset_valid(end)


def _err(name: str, message: str) -> ImageError:
    return ImageError(name, message, NAME)


def _power_of_two_in(value: int, low: int, high: int) -> bool:
    return low <= value <= high and not value & (value - 1)


def max_image_size(cluster_size: int, table_size: int) -> int:
    """qemu's ``qed_max_image_size``, computed as qemu computes it, in 64 bits: for the
    largest clusters the product wraps, to zero."""
    entries = table_size * cluster_size // 8
    return entries * cluster_size * entries & UINT64_MASK


def parse_header(head: bytes, file_size: int, name: str) -> Header:
    """Parse and validate the header in the file's first 64 bytes, whose offsets are
    checked against ``file_size``."""
    if len(head) < HEADER_SIZE:
        raise _err(name, f"qed header is truncated (the file has {len(head)} bytes)")
    (
        magic,
        cluster_size,
        table_size,
        header_size,
        features,
        _compat_features,  # no compatible feature is defined: ignored, as by qemu
        _autoclear_features,  # qemu clears unknown bits only when it writes
        l1_table_offset,
        image_size,
        backing_filename_offset,
        backing_filename_size,
    ) = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise _err(name, "image is not in qed format (no QED\\0 magic)")
    if features & ~FEATURE_MASK:
        raise UnsupportedImageError(
            name, f"qed image uses unsupported features {features & ~FEATURE_MASK:#x}", NAME
        )
    if not _power_of_two_in(cluster_size, MIN_CLUSTER_SIZE, MAX_CLUSTER_SIZE):
        raise _err(
            name,
            f"qed cluster size {cluster_size} is invalid (a power of two from 4 KiB to 64 MiB)",
        )
    if not _power_of_two_in(table_size, MIN_TABLE_SIZE, MAX_TABLE_SIZE):
        raise _err(
            name,
            f"qed table size {table_size} is invalid (a power of two from 1 to 16 clusters)",
        )
    if image_size % SECTOR:
        raise _err(name, f"qed image size {image_size} is not a multiple of 512")
    if image_size > max_image_size(cluster_size, table_size):
        raise _err(
            name, f"qed image size {image_size} is too large for its cluster and table sizes"
        )
    header = Header(
        cluster_size=cluster_size,
        table_size=table_size,
        header_size=header_size,
        features=features,
        l1_table_offset=l1_table_offset,
        image_size=image_size,
        file_size=file_size - file_size % cluster_size,
        backing_filename_offset=backing_filename_offset,
        backing_filename_size=backing_filename_size,
    )
    if not header.table_offset_valid(l1_table_offset):
        raise _err(name, f"qed L1 table offset {l1_table_offset:#x} is invalid")
    if header_size > UINT32_MAX // cluster_size:
        raise _err(name, f"qed header size {header_size} is too large")
    if features & F_BACKING_FILE:
        if backing_filename_offset + backing_filename_size > cluster_size * header_size:
            raise _err(
                name, f"qed backing file name offset {backing_filename_offset:#x} is invalid"
            )
        if backing_filename_size > MAX_BACKING_NAME:
            raise _err(name, f"qed backing file name is too long ({backing_filename_size} bytes)")
    return header


def backing_name(raw: bytes) -> str | None:
    """The backing file name as qemu keeps it: up to the first NUL; none when empty."""
    text = raw.split(b"\0", 1)[0]
    return text.decode("utf-8", "surrogateescape") or None


def build_header(
    *,
    cluster_size: int,
    table_size: int,
    header_size: int,
    features: int,
    l1_table_offset: int,
    image_size: int,
    backing_filename_offset: int = 0,
    backing_filename_size: int = 0,
    compat_features: int = 0,
    autoclear_features: int = 0,
) -> bytes:
    """A header with these fields, for the tests and the fuzzers' bases."""
    return _HEADER.pack(
        MAGIC, cluster_size, table_size, header_size, features, compat_features,
        autoclear_features, l1_table_offset, image_size, backing_filename_offset,
        backing_filename_size,
    )  # fmt: skip


def le64_table(data: bytes) -> list[int]:
    """A table of little-endian 64-bit entries."""
    return list(struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 8 * 8]))
