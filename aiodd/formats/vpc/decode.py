"""vpc: Microsoft VHD, fixed, dynamic and differencing.

Detection is qemu's: ``conectix`` at offset 0.  A fixed VHD has its footer only at the
end, so it probes as raw; opened with ``-f vpc`` its footer is read from the last 512
bytes.  Dynamic disks read allocated blocks from the file and absent blocks as zeros;
like qemu, their sector bitmaps are not consulted.  Differencing disks (which qemu 7.2
reads as if they were dynamic) read a sector from the file when its bitmap bit is set
and from the parent otherwise; the parent is found through the parent locators.
"""

from __future__ import annotations

from array import array
from functools import partial

from aiodd.errors import ImageError
from aiodd.formats.common import (
    SECTOR,
    bit_runs,
    block_pieces,
    naming,
    read_by_bitmap,
    read_parent,
)
from aiodd.formats.reference import Reference
from aiodd.formats.vpc import layout as L

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk

NAME = L.NAME
probe = L.probe
# This format's sector bitmap, split in runs of equal bits (its bit order, tested).
_runs = partial(bit_runs, msb_first=L.BITMAP_MSB_FIRST)


class FixedVpcDisk:
    format_name = NAME

    def __init__(self, file: RandomAccessFile, virtual_size: int) -> None:
        self._file = file
        self._virtual_size = virtual_size

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = self._file.readinto(offset, buf)
        if n < len(buf):
            raise ImageError(self._file.name, "vpc fixed disk data is truncated", NAME)

    def close(self) -> None:
        self._file.close()


class DynamicVpcDisk:
    format_name = NAME

    def __init__(
        self,
        file: RandomAccessFile,
        virtual_size: int,
        header: L.DynamicHeader,
        bat: array[int],
        parent: VirtualDisk | None,
        differencing: bool,
    ) -> None:
        self._file = file
        self._virtual_size = virtual_size
        self._block_size = header.block_size
        self._bitmap_size = header.bitmap_size
        self._bat = bat
        self._parent = parent
        self._differencing = differencing

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    def _read_file(self, offset: int, view: memoryview) -> None:
        n = self._file.readinto(offset, view)
        if n < len(view):
            raise ImageError(self._file.name, f"vpc block data at {offset:#x} is truncated", NAME)

    def read_into(self, offset: int, buf: memoryview) -> None:
        for index, within, pos, view in block_pieces(offset, buf, self._block_size):
            entry = self._bat[index] if index < len(self._bat) else L.UNALLOCATED
            if entry == L.UNALLOCATED:
                read_parent(self._parent, offset + pos, view)
            else:
                start = entry * SECTOR
                data = start + self._bitmap_size
                if self._differencing:
                    self._read_differencing(start, data, within, offset + pos, view)
                else:
                    self._read_file(data + within, view)

    def _read_differencing(
        self, bitmap_at: int, data: int, within: int, voffset: int, view: memoryview
    ) -> None:
        read_by_bitmap(
            view,
            within,
            bitmap=self._file,
            bitmap_at=bitmap_at,
            origin=0,
            sector=SECTOR,
            msb_first=L.BITMAP_MSB_FIRST,
            read_here=lambda lo, part: self._read_file(data + within + lo, part),
            parent=self._parent,
            voffset=voffset,
            truncated=f"vpc sector bitmap at {bitmap_at:#x} is truncated",
            fmt=NAME,
        )

    def close(self) -> None:
        if self._parent is not None:
            self._parent.close()
        self._file.close()


def _open_parent(
    file: RandomAccessFile, resolver: Resolver, header: L.DynamicHeader
) -> VirtualDisk:
    locator = L.choose_locator(header.locators)
    if locator is None:
        raise ImageError(file.name, "vpc differencing disk has no usable parent locator", NAME)
    if locator.data_length > L.MAX_LOCATOR_LENGTH:
        raise ImageError(
            file.name, f"vpc parent locator is too long ({locator.data_length} bytes)", NAME
        )
    if locator.data_offset + locator.data_length > file.size:
        raise ImageError(
            file.name,
            f"vpc parent locator data at {locator.data_offset:#x} lies past the end of the file",
            NAME,
        )
    data = file.pread(locator.data_offset, locator.data_length)
    with naming(file.name, NAME):
        name = L.decode_locator(locator.platform, data)
    return resolver.open_disk(Reference("parent", name, referrer=file.name))


def open_disk(file: RandomAccessFile, resolver: Resolver) -> VirtualDisk:
    name = file.name
    head = file.pread(0, L.FOOTER_SIZE)
    at_start = head[:8] == L.FOOTER_COOKIE
    if not at_start:
        if file.size < L.FOOTER_SIZE:
            raise ImageError(name, "vpc file is too small for a VHD footer", NAME)
        head = file.pread(file.size - L.FOOTER_SIZE, L.FOOTER_SIZE)
        if head[:8] != L.FOOTER_COOKIE:
            raise ImageError(name, "not in vpc format: no 'conectix' footer", NAME)
    with naming(name, NAME):
        footer = L.parse_footer(head)
    size = footer.virtual_size

    if not at_start:
        # qemu reads a disk whose footer is only at the end as fixed.
        if footer.disk_type != L.TYPE_FIXED:
            raise ImageError(
                name, f"vpc disk of type {footer.disk_type} has no footer copy at offset 0", NAME
            )
        if size > file.size - L.FOOTER_SIZE:
            raise ImageError(
                name,
                f"vpc fixed disk data ({file.size - L.FOOTER_SIZE} bytes) is shorter than its"
                f" virtual size ({size} bytes)",
                NAME,
            )
        return FixedVpcDisk(file, size)

    if footer.data_offset > file.size - L.DYN_HEADER_SIZE:
        raise ImageError(
            name,
            f"vpc dynamic header at {footer.data_offset:#x} lies past the end of the file",
            NAME,
        )
    with naming(name, NAME):
        header = L.parse_dynamic_header(file.pread(footer.data_offset, L.DYN_HEADER_SIZE), size)
    bat_bytes = 4 * header.max_table_entries
    if header.table_offset + bat_bytes > file.size:
        raise ImageError(
            name,
            f"vpc BAT at {header.table_offset:#x} ({header.max_table_entries} entries) lies past"
            " the end of the file",
            NAME,
        )
    with naming(name, NAME):
        bat = L.parse_bat(file.pread(header.table_offset, bat_bytes), header.max_table_entries)
    span = header.bitmap_size + header.block_size
    highest = max((e for e in bat if e != L.UNALLOCATED), default=None)
    if highest is not None and highest * SECTOR + span > file.size:
        limit = (file.size - span) // SECTOR
        index = next(i for i, e in enumerate(bat) if e != L.UNALLOCATED and e > limit)
        raise ImageError(
            name,
            f"vpc BAT entry {index} (block at {bat[index] * SECTOR:#x}) lies past the end of"
            " the file",
            NAME,
        )
    differencing = footer.disk_type == L.TYPE_DIFFERENCING
    parent = _open_parent(file, resolver, header) if differencing else None
    return DynamicVpcDisk(file, size, header, bat, parent, differencing)
