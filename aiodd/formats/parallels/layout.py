"""Parallels image structures, parsed from bytes with no I/O.

A 64-byte little-endian header at offset 0 is followed by the BAT, one 32-bit entry per
cluster of the virtual disk.  An entry of 0 is an absent cluster (it reads as zeros);
any other gives where the cluster's data starts in the file: in sectors under the old
magic ``WithoutFreeSpace``, in clusters under ``WithouFreSpacExt`` (qemu 7.2's
``off_multiplier``; qemu-img writes the second).  The cluster size is the header's
``tracks`` in sectors.  Under the old magic the sector count is 32 bits wide, its high
half being padding then.

qemu 7.2 reads an image marked in use (``inuse``) read-only, as aiodd does; the format
extension (``ext_off``: dirty bitmaps) changes no byte of the disk and is not read
(docs/formats.md#parallels).
"""

from __future__ import annotations

import struct
from array import array
from sys import byteorder

from aiodd._typing_names import NamedTuple
from aiodd.formats.common import SECTOR, LayoutError

# Detection imports the probe's module alone (docs/performance.md, "Start-up").
from aiodd.formats.parallels.probe import HEADER_SIZE as HEADER_SIZE
from aiodd.formats.parallels.probe import MAGIC as MAGIC
from aiodd.formats.parallels.probe import MAGIC_EXT as MAGIC_EXT
from aiodd.formats.parallels.probe import MAGICS as MAGICS
from aiodd.formats.parallels.probe import VERSION as VERSION
from aiodd.formats.parallels.probe import probe as probe

NAME = "parallels"
INUSE_MAGIC = 0x746F6E59
UNALLOCATED = 0
# qemu 7.2's bounds: a cluster of at most INT32_MAX / 513 sectors, a BAT of at most
# INT_MAX / 4 entries.
MAX_TRACKS = 0x7FFFFFFF // 513
MAX_BAT_ENTRIES = 0x7FFFFFFF // 4
# A virtual disk that fits in a signed 64-bit byte offset.
MAX_SECTORS = ((1 << 63) - SECTOR) // SECTOR

_HEADER = struct.Struct("<16sIIIIIQIIIQ")


class Header(NamedTuple):
    magic: bytes
    tracks: int  # sectors per cluster
    bat_entries: int
    nb_sectors: int  # the virtual size in sectors, as qemu reads it for the magic
    inuse: int
    data_off: int  # sectors; 0: right after the BAT
    ext_off: int

    @property
    def cluster_size(self) -> int:
        return self.tracks * SECTOR

    @property
    def virtual_size(self) -> int:
        return self.nb_sectors * SECTOR

    @property
    def entry_unit(self) -> int:
        """Bytes per unit of a BAT entry."""
        return SECTOR if self.magic == MAGIC else self.cluster_size

    @property
    def bat_end(self) -> int:
        return HEADER_SIZE + 4 * self.bat_entries

    @property
    def used_entries(self) -> int:
        """The entries the virtual disk reaches; qemu never reads the others, nor does
        aiodd."""
        return min(self.bat_entries, -(-self.nb_sectors // self.tracks))


def parse_header(raw: bytes) -> Header:
    """The header, checked in qemu 7.2's order, then bounded."""
    if len(raw) < HEADER_SIZE:
        raise LayoutError(f"parallels header is truncated ({len(raw)} bytes of {HEADER_SIZE})")
    magic, version, _heads, _cyl, tracks, bat, nb, inuse, data_off, _flags, ext_off = (
        _HEADER.unpack_from(raw)
    )
    if version != VERSION or magic not in MAGICS:
        raise LayoutError(
            "not in parallels format: no 'WithoutFreeSpace' or 'WithouFreSpacExt' magic"
            " with version 2"
        )
    if magic == MAGIC:
        nb &= 0xFFFFFFFF
    if tracks == 0:
        raise LayoutError("parallels cluster size is zero")
    if tracks > MAX_TRACKS:
        raise LayoutError(
            f"parallels cluster of {tracks} sectors is too large (at most {MAX_TRACKS})"
        )
    if bat > MAX_BAT_ENTRIES:
        raise LayoutError(
            f"parallels BAT of {bat} entries is too large (at most {MAX_BAT_ENTRIES})"
        )
    if nb > MAX_SECTORS:
        raise LayoutError(f"parallels virtual size of {nb} sectors is too large")
    return Header(magic, tracks, bat, nb, inuse, data_off, ext_off)


def check_extents(header: Header, file_size: int) -> None:
    """The BAT and the data area the header names lie inside the file."""
    if header.bat_end > file_size:
        raise LayoutError(
            f"parallels BAT ({header.bat_entries} entries) lies past the end of the file"
        )
    if header.data_off:
        at = header.data_off * SECTOR
        if at < header.bat_end:
            raise LayoutError(f"parallels data area at {at:#x} overlaps the header or BAT")
        if at > file_size:
            raise LayoutError(f"parallels data area at {at:#x} lies past the end of the file")


def parse_bat(raw: bytes, entries: int) -> array[int]:
    bat = array("I", raw[: 4 * entries])
    if byteorder == "big":
        bat.byteswap()
    return bat


def cluster_at(index: int, entry: int, header: Header, file_size: int) -> int:
    """Where BAT entry ``index`` (``entry``, not 0) puts its cluster: it must start
    inside the file, after the BAT.  Checked as a read reaches the cluster, as qcow2's
    clusters are.  A cluster that starts inside the file and ends past it reads as
    zeros there, as in qemu."""
    at = entry * header.entry_unit
    if at >= file_size:
        raise LayoutError(
            f"parallels BAT entry {index} (cluster at {at:#x}) lies past the end of the file"
        )
    if at < header.bat_end:
        raise LayoutError(
            f"parallels BAT entry {index} (cluster at {at:#x}) overlaps the header or BAT"
        )
    return at


def build_header(
    *,
    tracks: int,
    bat_entries: int,
    nb_sectors: int,
    magic: bytes = MAGIC_EXT,
    version: int = VERSION,
    inuse: int = 0,
    data_off: int = 0,
    flags: int = 0,
    ext_off: int = 0,
) -> bytes:
    """A header as qemu-img writes one (its heads and cylinders are not read)."""
    cylinders = nb_sectors // 16 // 32 & 0xFFFFFFFF
    return _HEADER.pack(
        magic, version, 16, cylinders, tracks, bat_entries, nb_sectors, inuse, data_off,
        flags, ext_off,
    )  # fmt: skip
