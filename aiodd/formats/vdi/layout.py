"""VDI (VirtualBox Disk Image) structures, parsed from bytes and built into bytes with no
I/O.

A VDI starts with a 512-byte header (little-endian): 64 bytes of free text, the
signature, the version, then the version 1.1 fields.  The block map (``offset_bmap``)
holds one 32-bit entry per block of the virtual disk: the block's number among the
blocks stored from ``offset_data`` on, or one of two markers that both read as zeros
(never written, discarded).  Dynamic and static images differ only in how their
writers fill the map; a reader reads both through it.

The checks are qemu 7.2's ``vdi_open``, in its order (docs/formats.md#vdi), and then
the ones that keep a hostile image's reads inside its file.
"""

from __future__ import annotations

import struct
from array import array
from collections import namedtuple
from sys import byteorder

from aiodd._typing_names import NamedTuple
from aiodd.formats.common import SECTOR, MiB, div_round_up, round_up
from aiodd.formats.common import LayoutError as LayoutError  # what the parsers raise

# Detection imports the probe's module alone (docs/performance.md, "Start-up").
from aiodd.formats.vdi.probe import HEADER_SIZE as HEADER_SIZE
from aiodd.formats.vdi.probe import SIGNATURE as SIGNATURE
from aiodd.formats.vdi.probe import SIGNATURE_AT as SIGNATURE_AT
from aiodd.formats.vdi.probe import probe as probe

NAME = "vdi"
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
# The only block size qemu 7.2 reads or writes (VirtualBox's default).
BLOCK_SIZE = MiB
# Block map entries that are not block numbers: never written, and discarded; both
# read as zeros.
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
# qemu reads the block map in one request of at most INT_MAX bytes, rounded to sectors.
MAX_BLOCKS = ((1 << 31) - SECTOR) // 4
MAX_DISK_SIZE = MAX_BLOCKS * BLOCK_SIZE
# What qemu-img writes in the header's text and size fields.
QEMU_TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
QEMU_HEADER_SIZE = 0x180

_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s56s")
_HeaderFields = namedtuple(
    "_HeaderFields",
    "text signature version header_size image_type image_flags description offset_bmap"
    " offset_data cylinders heads sectors sector_size unused1 disk_size block_size"
    " block_extra blocks_in_image blocks_allocated uuid_image uuid_last_snap uuid_link"
    " uuid_parent unused2",
)
assert _HEADER.size == HEADER_SIZE


class UnsupportedLayout(LayoutError):
    """A valid structure that uses what aiodd (and qemu) does not read: the decoder
    raises it as an :class:`~aiodd.errors.UnsupportedImageError`."""


def _u32(raw: bytes, at: int) -> int:
    return int.from_bytes(raw[at : at + 4], "little")


class Header(NamedTuple):
    image_type: int
    offset_bmap: int
    offset_data: int
    disk_size: int  # rounded up to a sector, as qemu reads it
    blocks_in_image: int
    blocks_allocated: int

    @property
    def virtual_size(self) -> int:
        return self.disk_size

    @property
    def entries(self) -> int:
        """The block map entries the virtual disk reads: those of its blocks."""
        return div_round_up(self.disk_size, BLOCK_SIZE)


def parse_header(raw: bytes) -> Header:
    """The header, checked as qemu 7.2's ``vdi_open`` checks it, in its order (the disk
    size's limit comes first, before the signature), then the placement of the block
    map and the data after the header."""
    if len(raw) < HEADER_SIZE:
        raise LayoutError("vdi header is truncated")
    h = _HeaderFields._make(_HEADER.unpack_from(raw))
    if h.disk_size > MAX_DISK_SIZE:
        raise UnsupportedLayout(f"vdi disk size {h.disk_size} is larger than {MAX_DISK_SIZE} bytes")
    # VBoxManage convertfromraw writes disks of any byte size; qemu rounds them up.
    disk_size = round_up(h.disk_size, SECTOR)
    if h.signature != SIGNATURE:
        raise LayoutError(f"not in vdi format: bad signature 0x{h.signature:08x}")
    if h.version != VERSION_1_1:
        raise UnsupportedLayout(
            f"vdi version {h.version >> 16}.{h.version & 0xFFFF} is not supported (qemu reads 1.1)"
        )
    if h.offset_bmap % SECTOR:
        raise UnsupportedLayout(f"vdi block map offset {h.offset_bmap:#x} is not a multiple of 512")
    if h.offset_data % SECTOR:
        raise UnsupportedLayout(f"vdi data offset {h.offset_data:#x} is not a multiple of 512")
    if h.sector_size != SECTOR:
        raise UnsupportedLayout(f"vdi sector size {h.sector_size} is not 512")
    if h.block_size != BLOCK_SIZE:
        raise UnsupportedLayout(
            f"vdi block size {h.block_size} is not supported (qemu reads 1 MiB blocks)"
        )
    if disk_size > h.blocks_in_image * BLOCK_SIZE:
        raise LayoutError(
            f"vdi block map of {h.blocks_in_image} entries is too small for the disk size"
            f" {disk_size}"
        )
    if h.uuid_link != bytes(16):
        raise UnsupportedLayout("vdi differencing images are not supported (link UUID set)")
    if h.uuid_parent != bytes(16):
        raise UnsupportedLayout("vdi differencing images are not supported (parent UUID set)")
    if h.blocks_in_image > MAX_BLOCKS:
        raise UnsupportedLayout(
            f"vdi block map of {h.blocks_in_image} entries is larger than {MAX_BLOCKS}"
        )
    header = Header(
        h.image_type,
        h.offset_bmap,
        h.offset_data,
        disk_size,
        h.blocks_in_image,
        h.blocks_allocated,
    )
    entries = header.entries
    if entries and h.offset_bmap < HEADER_SIZE:
        raise LayoutError(f"vdi block map at {h.offset_bmap:#x} overlaps the header")
    if entries and h.offset_data < h.offset_bmap + 4 * entries:
        raise LayoutError(f"vdi data at {h.offset_data:#x} overlaps the block map")
    return header


def parse_bmap(raw: bytes, entries: int) -> array[int]:
    """The block map's first ``entries`` entries, as host-order 32-bit integers."""
    if len(raw) < 4 * entries:
        raise LayoutError("vdi block map is truncated")
    bmap = array("I")
    bmap.frombytes(raw[: 4 * entries])
    if byteorder != "little":  # pragma: no cover - no supported platform
        bmap.byteswap()
    return bmap


def is_allocated(entry: int) -> bool:
    return entry < DISCARDED


def uuid_on_disk(uuid: bytes) -> bytes:
    """An RFC 4122 UUID as VDI stores it: its first three fields little-endian."""
    return uuid[3::-1] + uuid[5:3:-1] + uuid[7:5:-1] + uuid[8:]


def build_header(
    *,
    image_type: int,
    offset_bmap: int,
    offset_data: int,
    disk_size: int,
    blocks: int,
    allocated: int,
    uuid_image: bytes,
    uuid_last_snap: bytes,
) -> bytes:
    """A header as qemu-img writes one: its text and header size, no geometry, no
    description, and the two UUIDs (RFC 4122 byte order; stored swapped)."""
    fields = _HeaderFields(
        text=QEMU_TEXT,
        signature=SIGNATURE,
        version=VERSION_1_1,
        header_size=QEMU_HEADER_SIZE,
        image_type=image_type,
        image_flags=0,
        description=b"",
        offset_bmap=offset_bmap,
        offset_data=offset_data,
        cylinders=0,
        heads=0,
        sectors=0,
        sector_size=SECTOR,
        unused1=0,
        disk_size=disk_size,
        block_size=BLOCK_SIZE,
        block_extra=0,
        blocks_in_image=blocks,
        blocks_allocated=allocated,
        uuid_image=uuid_on_disk(uuid_image),
        uuid_last_snap=uuid_on_disk(uuid_last_snap),
        uuid_link=bytes(16),
        uuid_parent=bytes(16),
        unused2=b"",
    )
    return _HEADER.pack(*fields)


def bmap_bytes(blocks: int) -> int:
    """The block map's size in a qemu-made image: its entries, to a whole sector."""
    return round_up(4 * blocks, SECTOR)
