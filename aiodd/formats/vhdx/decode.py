"""vhdx: Hyper-V's VHDX, fixed, dynamic and differencing.

Detection is qemu's: ``vhdxfile`` at offset 0.  A log left dirty is replayed into an
in-memory overlay of the file (never written back); qemu instead refuses to open such
an image read-only.  Differencing disks, which qemu 7.2 refuses, are read through their
parent locator's ``relative_path``: sectors whose bitmap bit is clear and blocks that
are not present come from the parent.
"""

from __future__ import annotations

from array import array
from functools import partial
from sys import byteorder

from aiodd.errors import ImageError
from aiodd.formats.common import MiB, bit_runs, naming, read_by_bitmap, read_parent, zero_fill
from aiodd.formats.reference import Reference
from aiodd.formats.vhdx import layout as L

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk

NAME = L.NAME
probe = L.probe
# This format's sector bitmap, split in runs of equal bits (its bit order, tested).
_runs = partial(bit_runs, msb_first=L.BITMAP_MSB_FIRST)
_ZERO_STATES = frozenset(
    {L.PAYLOAD_UNDEFINED, L.PAYLOAD_ZERO, L.PAYLOAD_UNMAPPED, L.PAYLOAD_UNMAPPED_V095}
)


class LoggedFile:
    """A file seen through the replayed log: the overlay's writes win, and the file
    reads as zeros between its real end and the end the log gives it."""

    def __init__(self, file: RandomAccessFile, overlay: L.Overlay, size: int) -> None:
        self._file = file
        self._overlay = overlay
        self._size = size

    @property
    def name(self) -> str:
        return self._file.name

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self._size - offset)))
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> int:
        want = max(0, min(len(buf), self._size - offset))
        view = buf[:want]
        # Read into the caller's buffer, the file's bytes would be final there
        # (base.RandomAccessFile.readinto), and the overlay changes them: read apart.
        data = self._file.pread(offset, want) if offset < self._file.size else b""
        view[: len(data)] = data
        if len(data) < want:
            zero_fill(view[len(data) :])
        self._overlay.apply(offset, view)
        return want

    def close(self) -> None:
        self._file.close()


def _fail(file: RandomAccessFile, message: str) -> ImageError:
    return ImageError(file.name, message, NAME)


def _read_exact(file: RandomAccessFile, offset: int, length: int, what: str) -> bytes:
    if offset + length > file.size:
        raise _fail(file, f"vhdx {what} at {offset:#x} lies past the end of the file")
    return file.pread(offset, length)


def _replay_log(file: RandomAccessFile, header: L.Header) -> RandomAccessFile:
    if header.log_guid == L.ZERO_GUID or header.log_length == 0:
        return file
    if header.log_version != 0:
        raise _fail(file, f"vhdx log version {header.log_version} is not supported")
    if header.log_offset < MiB or header.log_offset % MiB or header.log_length % MiB:
        raise _fail(file, f"vhdx log at {header.log_offset:#x} is misaligned")
    if header.log_length > L.MAX_LOG_SIZE:
        raise _fail(file, f"vhdx log of {header.log_length} bytes is larger than 256 MiB")
    log = _read_exact(file, header.log_offset, header.log_length, "log")
    entries = L.find_active_sequence(log, header.log_guid)
    if not entries:
        return file
    size = file.size
    writes: list[L.Write] = []
    for entry in entries:
        if entry.flushed_file_offset > file.size:
            raise _fail(
                file,
                f"vhdx log entry {entry.sequence} expects a file of {entry.flushed_file_offset}"
                f" bytes, the file has {file.size}: it was truncated",
            )
        if entry.last_file_offset > L.MAX_FILE_OFFSET:
            raise _fail(file, f"vhdx log entry {entry.sequence} has an absurd file size")
        limit = max(file.size, entry.last_file_offset)
        for write in entry.writes:
            if write.offset + write.length > limit:
                raise _fail(
                    file,
                    f"vhdx log entry {entry.sequence} writes at {write.offset:#x} past the end"
                    " of the file",
                )
        writes.extend(entry.writes)
    overlay = L.Overlay(writes)
    # An entry may say the file grew (last_file_offset), but only bytes the file or the
    # log holds exist: a table claimed in the growth would be read from nothing, so the
    # file ends where its last real byte does.
    size = max(size, overlay.end)
    return LoggedFile(file, overlay, size)


class VhdxDisk:
    format_name = NAME

    def __init__(
        self,
        file: RandomAccessFile,
        base: RandomAccessFile,
        params: L.Parameters,
        bat: array[int],
        parent: VirtualDisk | None,
    ) -> None:
        self._file = file  # the file through the log overlay, when there is one
        self._base = base
        self._params = params
        self._bat = bat
        self._parent = parent
        self._block_size = params.block_size
        self._chunk_ratio = params.chunk_ratio
        self._sector = params.logical_sector_size

    @property
    def virtual_size(self) -> int:
        return self._params.virtual_size

    @property
    def logical_sector_size(self) -> int:
        return self._sector

    def _entry(self, block: int) -> int:
        return int(self._bat[block + block // self._chunk_ratio])

    def _read_file(self, offset: int, view: memoryview) -> None:
        n = self._file.readinto(offset, view)
        if n < len(view):
            raise _fail(self._file, f"vhdx payload at {offset:#x} is truncated")

    def read_into(self, offset: int, buf: memoryview) -> None:
        bs = self._block_size
        total = len(buf)
        pos = 0
        # A pending run of fully present blocks contiguous in the file.
        run_pos = run_file = run_len = 0
        while pos < total:
            block, within = divmod(offset + pos, bs)
            n = min(bs - within, total - pos)
            entry = self._entry(block)
            state = entry & L.STATE_MASK
            if state == L.PAYLOAD_FULLY_PRESENT:
                at = (entry & L.OFFSET_MASK) + within
                if run_len and run_file + run_len == at:
                    run_len += n
                else:
                    if run_len:
                        self._read_file(run_file, buf[run_pos : run_pos + run_len])
                    run_pos, run_file, run_len = pos, at, n
                pos += n
                continue
            if run_len:
                self._read_file(run_file, buf[run_pos : run_pos + run_len])
                run_len = 0
            view = buf[pos : pos + n]
            if state == L.PAYLOAD_NOT_PRESENT:
                read_parent(self._parent, offset + pos, view)
            elif state in _ZERO_STATES:
                zero_fill(view[:n])
            elif state == L.PAYLOAD_PARTIALLY_PRESENT and self._parent is not None:
                self._read_partial(block, entry, within, offset + pos, view)
            else:
                raise _fail(self._file, f"vhdx BAT entry for block {block} has state {state}")
            pos += n
        if run_len:
            self._read_file(run_file, buf[run_pos : run_pos + run_len])

    def _read_partial(
        self, block: int, entry: int, within: int, voffset: int, view: memoryview
    ) -> None:
        chunk = block // self._chunk_ratio
        bitmap_entry = int(self._bat[chunk * (self._chunk_ratio + 1) + self._chunk_ratio])
        if bitmap_entry & L.STATE_MASK != L.SB_BLOCK_PRESENT:
            raise _fail(
                self._file, f"vhdx block {block} is partially present but has no sector bitmap"
            )
        data = (entry & L.OFFSET_MASK) - block * self._block_size
        read_by_bitmap(
            view,
            voffset,  # sectors are numbered on the virtual disk
            bitmap=self._file,
            bitmap_at=bitmap_entry & L.OFFSET_MASK,
            origin=chunk * L.MAX_SECTORS_PER_BLOCK,  # the chunk's first sector
            sector=self._sector,
            msb_first=L.BITMAP_MSB_FIRST,
            read_here=lambda lo, part: self._read_file(data + voffset + lo, part),
            parent=self._parent,
            voffset=voffset,
            truncated=f"vhdx sector bitmap of block {block} is truncated",
            fmt=NAME,
        )

    def close(self) -> None:
        if self._parent is not None:
            self._parent.close()
        self._base.close()


def _check_bat(
    file: RandomAccessFile,
    params: L.Parameters,
    bat: array[int],
    regions: list[tuple[str, int, int]],
) -> None:
    """Every allocated block lies inside the file and outside the metadata structures."""
    bs = params.block_size
    ratio = params.chunk_ratio
    size = file.size
    for index, entry in enumerate(bat):
        state = entry & L.STATE_MASK
        if state not in (L.PAYLOAD_FULLY_PRESENT, L.PAYLOAD_PARTIALLY_PRESENT):
            continue
        offset = entry & L.OFFSET_MASK
        if (index + 1) % (ratio + 1) == 0:  # sector bitmap entry
            what = f"vhdx BAT entry {index} (sector bitmap at {offset:#x})"
            length = L.SECTOR_BITMAP_BLOCK
            if state != L.SB_BLOCK_PRESENT or not params.has_parent:
                raise _fail(file, f"{what} has state {state} in a disk without a parent")
        else:
            block = index - index // (ratio + 1)
            what = f"vhdx BAT entry {index} (block at {offset:#x})"
            length = min(bs, params.virtual_size - block * bs)
            if length <= 0:
                continue
            if state == L.PAYLOAD_PARTIALLY_PRESENT and not params.has_parent:
                raise _fail(file, f"{what} is partially present in a disk without a parent")
        if offset + length > size:
            raise _fail(file, f"{what} lies past the end of the file")
        for name, start, rlen in regions:
            if offset < start + rlen and start < offset + length:
                raise _fail(file, f"{what} overlaps the {name}")


def open_disk(file: RandomAccessFile, resolver: Resolver) -> VirtualDisk:
    if file.pread(0, 8) != L.SIGNATURE:
        raise _fail(file, "not in vhdx format: no 'vhdxfile' signature")
    with naming(file.name, NAME):
        first, second = (L.parse_header(file.pread(at, L.HEADER_SIZE)) for at in L.HEADER_OFFSETS)
        header = L.choose_header(first, second)
    view = _replay_log(file, header)
    with naming(file.name, NAME):
        regions = L.parse_region_table(
            _read_exact(view, L.REGION_TABLE_OFFSET, L.REGION_TABLE_SIZE, "region table")
        )
        meta = regions.metadata
        table = _read_exact(view, meta.offset, L.METADATA_TABLE_SIZE, "metadata table")
        items = L.parse_metadata_table(table, meta.length)
        values = {
            guid: _read_exact(view, meta.offset + place.offset, place.length, "metadata item")
            for guid, place in items.items()
        }
        params = L.parse_parameters(values)
        parent_name = None
        if params.has_parent:
            locator = L.parse_parent_locator(values[L.PARENT_LOCATOR_GUID])
            parent_name = L.parent_path(locator)

    entries = params.bat_entries
    if entries * 8 > regions.bat.length:
        raise _fail(
            file,
            f"vhdx BAT region ({regions.bat.length} bytes) is too small for {entries} entries",
        )
    bat = array("Q")
    bat.frombytes(_read_exact(view, regions.bat.offset, entries * 8, "BAT"))
    if byteorder == "big":
        bat.byteswap()
    structures = [
        ("file header", 0, MiB),
        ("BAT region", regions.bat.offset, regions.bat.length),
        ("metadata region", meta.offset, meta.length),
    ]
    if header.log_length:
        structures.append(("log", header.log_offset, header.log_length))
    _check_bat(view, params, bat, structures)

    parent = None
    if parent_name is not None:
        parent = resolver.open_disk(Reference("parent", parent_name, referrer=file.name))
    return VhdxDisk(view, file, params, bat, parent)
