"""VHDX structures (MS-VHDX), parsed from bytes and built into bytes with no I/O.

The first megabyte holds the file identifier ("vhdxfile"), two headers (at 64 KiB and
128 KiB, the valid one with the higher sequence number wins) and two region tables (at
192 KiB and 256 KiB).  The region table locates the BAT and the metadata region; the
metadata gives the block size, the virtual size, the sector sizes and, for a
differencing disk, the parent locator.  The log, when the header names one, holds
metadata writes that were not yet applied: :func:`find_active_sequence` and
:func:`replay` turn it into an in-memory list of writes.

Everything is little-endian; GUIDs are in Microsoft's mixed-endian form; every
checksum is CRC-32C over the structure with its checksum field zeroed.
"""

from __future__ import annotations

import heapq
import struct
from bisect import bisect_right

from aiodd._typing_names import NamedTuple
from aiodd.formats.common import KiB, div_round_up
from aiodd.formats.common import LayoutError as LayoutError  # what the parsers raise
from aiodd.formats.common import MiB as MiB  # the unit of every region's alignment
from aiodd.formats.crc32c import crc32c

# Detection imports the probe's module alone (docs/performance.md, "Start-up").
from aiodd.formats.vhdx.probe import SIGNATURE as SIGNATURE
from aiodd.formats.vhdx.probe import probe as probe

NAME = "vhdx"
HEADER_1 = 64 * KiB
HEADER_2 = 128 * KiB
HEADER_OFFSETS = (HEADER_1, HEADER_2)
HEADER_SIZE = 4 * KiB
REGION_TABLE_1 = 192 * KiB
REGION_TABLE_2 = 256 * KiB
REGION_TABLE_OFFSET = REGION_TABLE_1  # the one read; the second copy is for repairs
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ITEM = 1024 * KiB
LOG_SECTOR = 4 * KiB
MAX_SECTORS_PER_BLOCK = 1 << 23
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
SECTOR_BITMAP_BLOCK = 1 * MiB
MAX_VIRTUAL_SIZE = 64 * 1024**4  # 64 TiB, the specification's limit
MAX_LOG_SIZE = 256 * MiB
# The largest file offset a log entry may extend the file to (the maximum virtual size
# plus room for metadata).
MAX_FILE_OFFSET = 1 << 48


def _guid(text: str) -> bytes:
    """A GUID as VHDX stores it (uuid.UUID(text).bytes_le, without importing uuid,
    which costs a start-up its platform probing)."""
    raw = bytes.fromhex(text.replace("-", ""))
    return raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
PARENT_LOCATOR_TYPE_VHDX = _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
ZERO_GUID = bytes(16)

# Payload and sector bitmap BAT entry states.
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_V095 = 5
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_BLOCK_PRESENT = 6
STATE_MASK = 7
OFFSET_MASK = ~((1 << 20) - 1) & 0xFFFFFFFFFFFFFFFF
# A sector bitmap holds sector 0 in its first byte's least significant bit.
BITMAP_MSB_FIRST = False
# Region table entry and metadata item flags.
REGION_REQUIRED = 1
ITEM_USER = 1
ITEM_VIRTUAL_DISK = 2
ITEM_REQUIRED = 4
# File parameters flags.
LEAVE_BLOCKS_ALLOCATED = 1
HAS_PARENT = 2


def _crc_ok(raw: bytes, at: int = 4) -> bool:
    stored = int.from_bytes(raw[at : at + 4], "little")
    return crc32c(raw[:at] + bytes(4) + raw[at + 4 :]) == stored


def checksummed(raw: bytes, at: int = 4) -> bytes:
    """``raw`` with its CRC-32C (computed with the field zero) stored at ``at``."""
    return raw[:at] + crc32c(raw).to_bytes(4, "little") + raw[at + 4 :]


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks per sector bitmap block."""
    return MAX_SECTORS_PER_BLOCK * logical_sector_size // block_size


def _checked(fmt: struct.Struct, raw: bytes, offset: int = 0) -> tuple[object, ...]:
    if len(raw) < offset + fmt.size:
        raise LayoutError("vhdx structure is truncated")
    return fmt.unpack_from(raw, offset)


# --- headers -------------------------------------------------------------------------

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


class Header(NamedTuple):
    sequence: int
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int
    raw: bytes


def parse_header(raw: bytes) -> Header | None:
    """A header if ``raw`` (4 KiB) is a valid one, else None (as qemu, which only
    tells that neither copy is valid)."""
    if len(raw) < HEADER_SIZE or not _crc_ok(raw[:HEADER_SIZE]):
        return None
    sig, _crc, seq, _fw, _dw, log_guid, log_version, version, log_length, log_offset = (
        _HEADER.unpack_from(raw)
    )
    if sig != b"head" or version != 1:
        return None
    return Header(seq, log_guid, log_version, version, log_length, log_offset, raw[: _HEADER.size])


def build_header(
    sequence: int, file_write: bytes, data_write: bytes, log_length: int, log_offset: int
) -> bytes:
    """A header (4 KiB) whose log is empty (log GUID zero: nothing to replay)."""
    raw = _HEADER.pack(
        b"head", 0, sequence, file_write, data_write, ZERO_GUID, 0, 1, log_length, log_offset
    )
    return checksummed(raw.ljust(HEADER_SIZE, b"\0"))


def choose_header(first: Header | None, second: Header | None) -> Header:
    if first is None and second is None:
        raise LayoutError("vhdx has no valid header (both header checksums mismatch)")
    if first is None or second is None:
        chosen = first or second
        assert chosen is not None
        return chosen
    if first.sequence > second.sequence:
        return first
    if second.sequence > first.sequence:
        return second
    if first.raw == second.raw:  # Disk2VHD writes two identical headers
        return first
    raise LayoutError("vhdx headers differ but have the same sequence number")


# --- region table --------------------------------------------------------------------

_REGION_HEADER = struct.Struct("<4sII4x")
_REGION_ENTRY = struct.Struct("<16sQII")


class Region(NamedTuple):
    offset: int
    length: int


class Regions(NamedTuple):
    bat: Region
    metadata: Region


def parse_region_table(raw: bytes) -> Regions:
    if len(raw) < REGION_TABLE_SIZE:
        raise LayoutError("vhdx region table is truncated")
    raw = raw[:REGION_TABLE_SIZE]
    if not _crc_ok(raw):
        raise LayoutError("vhdx region table checksum mismatch")
    sig, _crc, count = _checked(_REGION_HEADER, raw)
    if sig != b"regi":
        raise LayoutError("vhdx region table signature is not 'regi'")
    assert isinstance(count, int)
    if count > 2047:
        raise LayoutError(f"vhdx region table has too many entries ({count})")
    found: dict[bytes, Region] = {}
    seen: list[Region] = []
    for i in range(count):
        guid, offset, length, bits = _checked(_REGION_ENTRY, raw, 16 + 32 * i)
        assert isinstance(guid, bytes)
        assert isinstance(offset, int) and isinstance(length, int) and isinstance(bits, int)
        region = Region(offset, length)
        if offset < MiB:
            raise LayoutError(f"vhdx region {i} at {offset:#x} overlaps the file header")
        for other in seen:
            if offset < other.offset + other.length and other.offset < offset + length:
                raise LayoutError(f"vhdx region {i} at {offset:#x} overlaps another region")
        seen.append(region)
        if guid in (BAT_GUID, METADATA_GUID):
            if guid in found:
                raise LayoutError("vhdx region table lists the same region twice")
            found[guid] = region
        elif bits & 1:
            raise LayoutError(f"vhdx region table entry {i} is required but unknown")
    if BAT_GUID not in found:
        raise LayoutError("vhdx region table has no BAT region")
    if METADATA_GUID not in found:
        raise LayoutError("vhdx region table has no metadata region")
    return Regions(found[BAT_GUID], found[METADATA_GUID])


def build_region_table(regions: Regions) -> bytes:
    """A region table (64 KiB) listing the BAT and the metadata region, both required."""
    entries = ((BAT_GUID, regions.bat), (METADATA_GUID, regions.metadata))
    raw = _REGION_HEADER.pack(b"regi", 0, len(entries)) + b"".join(
        _REGION_ENTRY.pack(guid, r.offset, r.length, REGION_REQUIRED) for guid, r in entries
    )
    return checksummed(raw.ljust(REGION_TABLE_SIZE, b"\0"))


# --- metadata ------------------------------------------------------------------------

_METADATA_HEADER = struct.Struct("<8s2xH20x")
_METADATA_ENTRY = struct.Struct("<16sIII4x")

_KNOWN_ITEMS = {
    FILE_PARAMETERS_GUID: "file parameters",
    VIRTUAL_DISK_SIZE_GUID: "virtual disk size",
    PAGE83_GUID: "page 83 data",
    LOGICAL_SECTOR_GUID: "logical sector size",
    PHYSICAL_SECTOR_GUID: "physical sector size",
    PARENT_LOCATOR_GUID: "parent locator",
}
_REQUIRED_ITEMS = (
    FILE_PARAMETERS_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    PAGE83_GUID,
    LOGICAL_SECTOR_GUID,
    PHYSICAL_SECTOR_GUID,
)


def parse_metadata_table(raw: bytes, region_length: int) -> dict[bytes, Region]:
    """The known metadata items' places, relative to the metadata region's start."""
    if len(raw) < METADATA_TABLE_SIZE:
        raise LayoutError("vhdx metadata table is truncated")
    sig, count = _checked(_METADATA_HEADER, raw)
    if sig != b"metadata":
        raise LayoutError("vhdx metadata table signature is not 'metadata'")
    assert isinstance(count, int)
    if count > 2047:
        raise LayoutError(f"vhdx metadata table has too many entries ({count})")
    items: dict[bytes, Region] = {}
    for i in range(count):
        guid, offset, length, bits = _checked(_METADATA_ENTRY, raw, 32 + 32 * i)
        assert isinstance(guid, bytes)
        assert isinstance(offset, int) and isinstance(length, int) and isinstance(bits, int)
        name = _KNOWN_ITEMS.get(guid)
        if name is None:
            if bits & 4:
                raise LayoutError(f"vhdx metadata item {i} is required but unknown")
            continue
        if guid in items:
            raise LayoutError(f"vhdx metadata lists the {name} item twice")
        if length > MAX_METADATA_ITEM:
            raise LayoutError(f"vhdx metadata {name} item is larger than 1 MiB")
        if length and (offset < METADATA_TABLE_SIZE or offset + length > region_length):
            raise LayoutError(f"vhdx metadata {name} item lies outside the metadata region")
        items[guid] = Region(offset, length)
    for guid in _REQUIRED_ITEMS:
        if guid not in items:
            raise LayoutError(f"vhdx metadata has no {_KNOWN_ITEMS[guid]} item")
    return items


def build_metadata_table(items: list[tuple[bytes, int, int, int]]) -> bytes:
    """A metadata table (64 KiB) of ``(guid, offset, length, flags)`` items, offsets
    relative to the metadata region."""
    raw = _METADATA_HEADER.pack(b"metadata", len(items)) + b"".join(
        _METADATA_ENTRY.pack(*item) for item in items
    )
    return raw.ljust(METADATA_TABLE_SIZE, b"\0")


class Parameters(NamedTuple):
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int

    @property
    def chunk_ratio(self) -> int:
        return chunk_ratio(self.block_size, self.logical_sector_size)

    @property
    def data_blocks(self) -> int:
        return div_round_up(self.virtual_size, self.block_size)

    @property
    def bat_entries(self) -> int:
        """BAT entries the disk needs, sector bitmap entries included (as qemu)."""
        blocks = self.data_blocks
        if blocks == 0:
            return 0
        if self.has_parent:
            return div_round_up(blocks, self.chunk_ratio) * (self.chunk_ratio + 1)
        return blocks + (blocks - 1) // self.chunk_ratio


def _item(items: dict[bytes, bytes], guid: bytes, size: int) -> bytes:
    value = items[guid]
    if len(value) < size:
        raise LayoutError(f"vhdx metadata {_KNOWN_ITEMS[guid]} item is too short")
    return value[:size]


def parse_parameters(items: dict[bytes, bytes]) -> Parameters:
    """The disk's parameters from the metadata items' bytes."""
    block_size, bits = struct.unpack("<II", _item(items, FILE_PARAMETERS_GUID, 8))
    (virtual_size,) = struct.unpack("<Q", _item(items, VIRTUAL_DISK_SIZE_GUID, 8))
    (logical,) = struct.unpack("<I", _item(items, LOGICAL_SECTOR_GUID, 4))
    (physical,) = struct.unpack("<I", _item(items, PHYSICAL_SECTOR_GUID, 4))
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise LayoutError(f"vhdx block size {block_size} is not a power of two in 1M..256M")
    if logical not in (512, 4096):
        raise LayoutError(f"vhdx logical sector size {logical} is neither 512 nor 4096")
    if physical not in (512, 4096):
        raise LayoutError(f"vhdx physical sector size {physical} is neither 512 nor 4096")
    if virtual_size > MAX_VIRTUAL_SIZE:
        raise LayoutError(f"vhdx virtual size {virtual_size} is larger than 64 TiB")
    if virtual_size % logical:
        raise LayoutError(
            f"vhdx virtual size {virtual_size} is not a multiple of the sector size {logical}"
        )
    has_parent = bool(bits & HAS_PARENT)
    if has_parent and PARENT_LOCATOR_GUID not in items:
        raise LayoutError("vhdx differencing disk has no parent locator item")
    return Parameters(
        block_size, bool(bits & LEAVE_BLOCKS_ALLOCATED), has_parent, virtual_size, logical, physical
    )


_LOCATOR_HEADER = struct.Struct("<16s2xH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")
PARENT_PATH_KEYS = ("relative_path", "volume_path", "absolute_win32_path")
# A parent's name longer than a POSIX path can be is refused here, not passed on: no
# file has it, and the KVM guest's open request has room for this much.
MAX_PARENT_PATH = 4095


def parse_parent_locator(raw: bytes) -> dict[str, str]:
    """The parent locator's key/value pairs (UTF-16LE strings)."""
    guid, count = _checked(_LOCATOR_HEADER, raw)
    if guid != PARENT_LOCATOR_TYPE_VHDX:
        raise LayoutError("vhdx parent locator is not of the VHDX type")
    assert isinstance(count, int)
    entries: dict[str, str] = {}
    for i in range(count):
        k_off, v_off, k_len, v_len = _checked(_LOCATOR_ENTRY, raw, 20 + 12 * i)
        assert isinstance(k_off, int) and isinstance(v_off, int)
        assert isinstance(k_len, int) and isinstance(v_len, int)
        if k_off + k_len > len(raw) or v_off + v_len > len(raw):
            raise LayoutError(f"vhdx parent locator entry {i} lies outside the item")
        try:
            key = raw[k_off : k_off + k_len].decode("utf-16-le")
            value = raw[v_off : v_off + v_len].decode("utf-16-le")
        except UnicodeDecodeError:
            raise LayoutError(f"vhdx parent locator entry {i} is not valid UTF-16") from None
        entries[key] = value
    return entries


def parent_path(entries: dict[str, str]) -> str:
    """The parent's name to open: ``relative_path`` first, then ``absolute_win32_path``
    (which a POSIX resolver refuses unless it names an allowed file), with Windows
    separators turned to ``/`` and a leading ``.\\`` dropped."""
    for key in ("relative_path", "absolute_win32_path"):
        value = entries.get(key)
        if value:
            text = value.replace("\\", "/")
            while text.startswith("./"):
                text = text[2:]
            size = len(text.encode("utf-8"))
            if size > MAX_PARENT_PATH:
                raise LayoutError(f"vhdx parent path is too long ({size} bytes)")
            if text:
                return text
    raise LayoutError("vhdx parent locator has no relative_path or absolute_win32_path")


# --- log -----------------------------------------------------------------------------

_LOG_HEADER = struct.Struct("<4sIIIQII16sQQ")
_DESCRIPTOR = struct.Struct("<4s4s8sQQ")


class Write(NamedTuple):
    """A log write to the file: ``data`` at ``offset``, or ``length`` zeros."""

    offset: int
    length: int
    data: bytes | None


class LogEntry(NamedTuple):
    position: int
    sequence: int
    length: int
    flushed_file_offset: int
    last_file_offset: int
    writes: list[Write]  # filled as the entry is read


def _circular(log: bytes, start: int, length: int) -> bytes:
    end = start + length
    if end <= len(log):
        return log[start:end]
    return log[start:] + log[: end - len(log)]


def parse_log_entry(log: bytes, position: int, log_guid: bytes) -> LogEntry | None:
    """The entry at ``position`` in the circular log, or None if it is not valid."""
    size = len(log)
    head = _circular(log, position, 64)
    sig, _crc, length, _tail, seq, count, _res, guid, flushed, last = _LOG_HEADER.unpack(head)
    if sig != b"loge" or guid != log_guid or seq == 0:
        return None
    if length == 0 or length % LOG_SECTOR or length > size:
        return None
    desc_sectors = div_round_up(count + 2, 128)
    if desc_sectors * LOG_SECTOR > length:
        return None
    raw = _circular(log, position, length)
    if not _crc_ok(raw):
        return None
    entry = LogEntry(position, seq, length, flushed, last, [])
    data_at = desc_sectors * LOG_SECTOR
    for i in range(count):
        sig, a, b, file_offset, dseq = _DESCRIPTOR.unpack_from(raw, 64 + 32 * i)
        if dseq != seq or file_offset % LOG_SECTOR:
            return None
        if sig == b"zero":
            zero_length = int.from_bytes(b, "little")
            if zero_length % LOG_SECTOR:
                return None
            entry.writes.append(Write(file_offset, zero_length, None))
        elif sig == b"desc":
            if data_at + LOG_SECTOR > length:
                return None
            sector = raw[data_at : data_at + LOG_SECTOR]
            data_at += LOG_SECTOR
            high = int.from_bytes(sector[4:8], "little")
            low = int.from_bytes(sector[4092:4096], "little")
            if sector[:4] != b"data" or (high << 32 | low) != seq:
                return None
            entry.writes.append(Write(file_offset, LOG_SECTOR, b + sector[8:4092] + a))
        else:
            return None
    return entry


def find_active_sequence(log: bytes, log_guid: bytes) -> list[LogEntry]:
    """The entries to replay, oldest first: the longest run of valid entries with
    consecutive sequence numbers that ends at the highest sequence number (qemu's
    search; the head's tail field is not relied on, as qemu's own entries do not
    keep it)."""
    size = len(log)
    valid: dict[int, LogEntry] = {}
    for position in range(0, size, LOG_SECTOR):
        if log[position : position + 4] == b"loge":
            entry = parse_log_entry(log, position, log_guid)
            if entry is not None:
                valid[position] = entry
    # Each entry has at most one successor (the entry right after it, one sequence number
    # up), and sequence numbers only grow along a chain: chains are paths, and the end
    # and length of the chain from each entry follow from its successor's, in one pass
    # from the highest sequence number down.
    successor: dict[int, int] = {}
    for position, entry in valid.items():
        following = valid.get((position + entry.length) % size)
        if following is not None and following.sequence == entry.sequence + 1:
            successor[position] = following.position
    reach: dict[int, tuple[int, int]] = {}  # position -> (last sequence, length)
    for entry in sorted(valid.values(), key=lambda e: e.sequence, reverse=True):
        nxt = successor.get(entry.position)
        if nxt is None:
            reach[entry.position] = (entry.sequence, 1)
        else:
            last, length = reach[nxt]
            reach[entry.position] = (last, length + 1)
    best_start, best_key = None, (0, 0)
    for position in valid:  # ties go to the first in the log, as a scan finds them
        if reach[position] > best_key:
            best_start, best_key = position, reach[position]
    chain: list[LogEntry] = []
    while best_start is not None:
        chain.append(valid[best_start])
        best_start = successor.get(best_start)
    return chain


class Overlay:
    """The file as the log's writes leave it, as disjoint segments over the file.

    Built by painting the writes newest first, so a later write hides an earlier one.
    """

    def __init__(self, writes: list[Write]) -> None:
        # A sweep over the writes' edges, keeping the newest write that covers each
        # stretch (a heap of the covering writes' ages): O(n log n) in the writes.
        events: list[tuple[int, int, int]] = []  # (offset, 0 = ends / 1 = starts, age)
        for age, write in enumerate(writes):
            if write.length > 0:
                events.append((write.offset, 1, age))
                events.append((write.offset + write.length, 0, age))
        events.sort()
        starts: list[int] = []
        ends: list[int] = []
        pieces: dict[int, tuple[int, bytes | None, int]] = {}  # start -> (end, data, skip)
        covering: list[int] = []  # a max-heap of ages, by negation; stale ages linger
        active = [False] * len(writes)
        i = 0
        while i < len(events):
            at = events[i][0]
            while i < len(events) and events[i][0] == at:
                _, starting, age = events[i]
                active[age] = bool(starting)
                if starting:
                    heapq.heappush(covering, -age)
                i += 1
            while covering and not active[-covering[0]]:
                heapq.heappop(covering)
            if not covering or i == len(events):
                continue
            newest = -covering[0]
            stop = events[i][0]
            write = writes[newest]
            if (
                ends
                and ends[-1] == at
                and pieces[starts[-1]][1] is write.data
                and (pieces[starts[-1]][2] + (at - starts[-1]) == at - write.offset)
            ):
                ends[-1] = stop  # the same write goes on: one piece
                pieces[starts[-1]] = (stop, write.data, pieces[starts[-1]][2])
                continue
            starts.append(at)
            ends.append(stop)
            pieces[at] = (stop, write.data, at - write.offset)
        self._starts = starts
        self._ends = ends
        self._pieces = pieces

    def __bool__(self) -> bool:
        return bool(self._starts)

    def apply(self, offset: int, buf: memoryview) -> None:
        """Patch ``buf`` (the file's bytes at ``offset``) with the overlay."""
        end = offset + len(buf)
        i = bisect_right(self._ends, offset)
        while i < len(self._starts) and self._starts[i] < end:
            start = self._starts[i]
            piece_end, data, skip = self._pieces[start]
            lo = max(start, offset)
            hi = min(piece_end, end)
            if data is None:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                at = skip + lo - start
                buf[lo - offset : hi - offset] = data[at : at + hi - lo]
            i += 1

    @property
    def end(self) -> int:
        return self._ends[-1] if self._ends else 0
