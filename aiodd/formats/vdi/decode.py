"""vdi: VirtualBox Disk Image, dynamic and static.

Detection is qemu's: the signature at offset 64 of a whole header.  The header is
checked as qemu 7.2 checks it (version 1.1, 512-byte sectors, 1 MiB blocks, no parent:
differencing images and snapshots are refused), then the block map is read: a block
whose entry is a block number reads from ``offset_data`` plus that many blocks, one
never written or discarded reads as zeros.  Unlike qemu, which reads what lies past
the file's end as zeros, a block map, or a block's part inside the disk, that does not
lie inside the file is refused as corrupt (docs/formats.md#vdi).
"""

from __future__ import annotations

from array import array

from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats.common import LayoutError, block_pieces, zero_fill
from aiodd.formats.vdi import layout as L

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk

NAME = L.NAME
probe = L.probe


class VdiDisk:
    format_name = NAME

    def __init__(self, file: RandomAccessFile, header: L.Header, bmap: array[int]) -> None:
        self._file = file
        self._virtual_size = header.virtual_size
        self._data = header.offset_data
        self._bmap = bmap

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        bs = L.BLOCK_SIZE
        for index, within, _, view in block_pieces(offset, buf, bs):
            entry = self._bmap[index] if index < len(self._bmap) else L.UNALLOCATED
            if L.is_allocated(entry):
                at = self._data + entry * bs + within
                if self._file.readinto(at, view) < len(view):
                    raise ImageError(
                        self._file.name, f"vdi block data at {at:#x} is truncated", NAME
                    )
            else:
                zero_fill(view)

    def close(self) -> None:
        self._file.close()


def _header(name: str, raw: bytes) -> L.Header:
    try:
        return L.parse_header(raw)
    except L.UnsupportedLayout as exc:
        raise UnsupportedImageError(name, exc.detail, NAME) from None
    except LayoutError as exc:
        raise ImageError(name, exc.detail, NAME) from None


def _check_blocks(name: str, header: L.Header, bmap: array[int], file_size: int) -> None:
    """Refuse the first entry (by index) whose block, as far as the disk reads it, does
    not lie inside the file: the last block of a disk not a whole number of blocks long
    needs only its part inside the disk."""
    bs = L.BLOCK_SIZE
    size = header.virtual_size
    room = file_size - header.offset_data
    highest = max((e for e in bmap if L.is_allocated(e)), default=-1)
    if highest < 0 or (highest + 1) * bs <= room:
        return  # every block lies whole inside the file: the common case, checked at once
    for index, entry in enumerate(bmap):
        at = header.offset_data + entry * bs
        if L.is_allocated(entry) and at + min(bs, size - index * bs) > file_size:
            raise ImageError(
                name,
                f"vdi block map entry {index} (block at {at:#x}) lies past the end of the file",
                NAME,
            )


def open_disk(file: RandomAccessFile, resolver: Resolver) -> VirtualDisk:
    name = file.name
    header = _header(name, file.pread(0, L.HEADER_SIZE))
    entries = header.entries
    if header.offset_bmap + 4 * entries > file.size:
        raise ImageError(
            name,
            f"vdi block map at {header.offset_bmap:#x} ({entries} entries) lies past the end"
            " of the file",
            NAME,
        )
    try:
        bmap = L.parse_bmap(file.pread(header.offset_bmap, 4 * entries), entries)
    except LayoutError as exc:
        raise ImageError(name, exc.detail, NAME) from None
    _check_blocks(name, header, bmap, file.size)
    return VdiDisk(file, header, bmap)
