"""VMDK structures, parsed from bytes and built into bytes with no I/O (the decoder
does the reading).

Facts follow QEMU's ``block/vmdk.c`` (the reference for what ``qemu-img dd`` reads) and
VMware's *Virtual Disk Format 5.0* specification:

- A *hosted sparse extent* starts with ``KDMV`` and a little-endian header (versions
  1-3); its grain directory (GD) lists grain tables (GTs) by sector, each GT lists
  grains by sector.  GTE 0 is unallocated (read from the parent, or zeros); GTE 1 is a
  zeroed grain when the header's zeroed-grain flag is set.  ``streamOptimized`` extents
  hold deflate-compressed grains behind 12-byte grain markers and may keep their real
  header in a footer 1024 bytes before the end (``gdOffset == GD_AT_END``).
- A *COWD* extent (ESX ``vmfsSparse``) has a 32-bit header and 4096-entry GTs.
- A *descriptor* is text: ``createType``, ``CID``/``parentCID``, ``parentFileNameHint``
  and extent lines ``RW <sectors> FLAT|SPARSE|VMFS|VMFSSPARSE "<file>" [offset]``.
  QEMU scans it with ``strstr``/``sscanf``; the scanners here reproduce that behaviour
  (first occurrence wins, extent lines other than ``RW`` are skipped, ``ZERO`` extents
  are ignored) so both tools see the same disk.

Every function raises :class:`~aiodd.errors.ImageError` (or its subclass
:class:`~aiodd.errors.UnsupportedImageError`) on bad input and nothing else.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array

from aiodd._typing_names import NamedTuple
from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats.common import SECTOR, div_round_up

# Detection imports the probe's module alone (docs/performance.md, "Start-up").
from aiodd.formats.vmdk.probe import MAGIC_COWD as MAGIC_COWD
from aiodd.formats.vmdk.probe import MAGIC_KDMV as MAGIC_KDMV
from aiodd.formats.vmdk.probe import probe as probe

NAME = "vmdk"


# Header flags (hosted sparse extents).
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GTE_ZEROED = 1

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3
MARKER_SIZE = 12  # lba (u64) + size (u32) before a compressed grain's data

# qemu reads at most this much of a descriptor (vmdk_read_desc).
DESC_READ_MAX = (1 << 20) - 1
# qemu looks for CID / parentCID / parentFileNameHint in this many bytes (DESC_SIZE).
DESC_AREA = 20 * SECTOR
# Where qemu looks for the CID of a file that starts with a magic.
EMBEDDED_DESC_OFFSET = 0x200

# Bounds, as qemu's vmdk_add_extent and vmdk_open_vmdk4 check them.
MAX_GRAIN_SECTORS = 0x200000  # 1 GiB grains
MAX_GD_ENTRIES = 32 * 1024 * 1024
MAX_GTES_PER_GT = 512
# Grain table entries are 32-bit sector numbers (qemu's VMDK_EXTENT_MAX_SECTORS).
MAX_SECTOR = 1 << 32
COWD_GTES_PER_GT = 4096
# Our own bounds.
MAX_EXTENTS = 4096
MAX_COMPRESSED_GRAIN = 16 << 20  # inflate allocates one grain
MAX_PARENT_NAME = 4095  # qemu's PATH_MAX-sized backing_file buffer
MAX_VIRTUAL_SIZE = (1 << 63) - SECTOR

# magic, the SparseHeader fields up to grain_offset (overHead), uncleanShutdown, the
# new-line detection characters, then compressAlgorithm at offset 77.
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
NEWLINE_DETECT = b"\n \r\n"
_COWD = struct.Struct("<IIIIIIIIII")  # at offset 4
_MARKER = struct.Struct("<QII")

_SPACE = b" \t\n\v\f\r"


def _err(name: str, message: str) -> ImageError:
    return ImageError(name, f"vmdk {message}", NAME)


def _unsupported(name: str, message: str) -> UnsupportedImageError:
    return UnsupportedImageError(name, f"vmdk {message}", NAME)


def _pad(data: bytes, size: int) -> bytes:
    """``data`` cut or zero-padded to ``size`` bytes (qemu reads zeros past the end)."""
    if len(data) >= size:
        return data[:size]
    return data + bytes(size - len(data))


# --------------------------------------------------------------------------- headers


class SparseHeader(NamedTuple):
    """The hosted sparse extent header (``KDMV``), fields as stored."""

    version: int
    flags: int
    capacity: int  # sectors
    granularity: int  # sectors per grain
    desc_offset: int  # sectors
    desc_size: int  # sectors
    num_gtes_per_gt: int
    rgd_offset: int  # sectors
    gd_offset: int  # sectors
    grain_offset: int  # sectors
    compress_algorithm: int


def parse_sparse_header(block: bytes) -> SparseHeader:
    """The header in ``block``, the extent's first bytes (zero-padded if short)."""
    fields = _HEADER.unpack_from(_pad(block, SECTOR))
    # The struct's fields after the magic are SparseHeader's, in order, up to overHead.
    return SparseHeader(*[*fields[1:11], fields[13]])


def build_sparse_header(header: SparseHeader) -> bytes:
    """``header`` as a ``KDMV`` extent's first sector (a clean shutdown)."""
    h = header
    raw = _HEADER.pack(
        MAGIC_KDMV, h.version, h.flags, h.capacity, h.granularity, h.desc_offset,
        h.desc_size, h.num_gtes_per_gt, h.rgd_offset, h.gd_offset, h.grain_offset,
        0, NEWLINE_DETECT, h.compress_algorithm,
    )  # fmt: skip
    return _pad(raw, SECTOR)


def parse_footer(tail: bytes, name: str) -> SparseHeader:
    """The header kept in a streamOptimized footer.

    ``tail`` is the file's last 1536 bytes, as qemu reads them: the footer marker
    sector, the footer (a header with its magic), the end-of-stream marker sector.
    """
    tail = _pad(tail, 3 * SECTOR)
    _, fsize, ftype = _MARKER.unpack_from(tail, 0)
    eval_, esize, etype = _MARKER.unpack_from(tail, 2 * SECTOR)
    footer = tail[SECTOR : 2 * SECTOR]
    if (
        footer[:4] != MAGIC_KDMV
        or fsize != 0
        or ftype != MARKER_FOOTER
        or eval_ != 0
        or esize != 0
        or etype != MARKER_EOS
    ):
        raise _err(name, "footer (1024 bytes before the end of the file) is invalid")
    return parse_sparse_header(footer)


class SparseLayout(NamedTuple):
    """A sparse extent's validated geometry (all offsets in bytes)."""

    capacity: int  # sectors of virtual disk this extent holds
    grain_size: int  # bytes
    gtes_per_gt: int
    gd_offset: int
    gd_entries: int
    compressed: bool
    markers: bool
    zero_grain: bool
    cowd: bool = False

    @property
    def gt_bytes(self) -> int:
        return self.gtes_per_gt * 4

    @property
    def gd_bytes(self) -> int:
        return self.gd_entries * 4


def sparse_layout(header: SparseHeader, file_size: int, name: str) -> SparseLayout:
    """Check a (footer-resolved) hosted sparse header as qemu's ``vmdk_open_vmdk4`` does,
    and against the file's size and our own bounds."""
    compressed = header.compress_algorithm == COMPRESSION_DEFLATE
    if header.version > 3:
        raise _unsupported(name, f"version {header.version} is not supported")
    if header.num_gtes_per_gt > MAX_GTES_PER_GT:
        raise _err(name, f"grain table size {header.num_gtes_per_gt} is too big (max 512)")
    gt_coverage = (header.num_gtes_per_gt * header.granularity) & 0xFFFFFFFF
    if gt_coverage == 0:
        raise _err(
            name,
            f"grain table coverage is invalid ({header.num_gtes_per_gt} entries"
            f" of {header.granularity} sectors)",
        )
    if header.granularity > MAX_GRAIN_SECTORS:
        raise _err(name, f"grain size of {header.granularity} sectors is invalid")
    if compressed and header.granularity * SECTOR > MAX_COMPRESSED_GRAIN:
        raise _unsupported(
            name,
            f"compressed grains of {header.granularity} sectors are not supported"
            f" (max {MAX_COMPRESSED_GRAIN // SECTOR})",
        )
    gd_entries = div_round_up(header.capacity, gt_coverage)
    if gd_entries > MAX_GD_ENTRIES:
        raise _err(name, f"grain directory of {gd_entries} entries is too big")
    sectors = div_round_up(file_size, SECTOR)
    if sectors < header.grain_offset:
        raise _err(
            name,
            f"file is truncated: the header expects at least"
            f" {header.grain_offset * SECTOR} bytes, the file has {file_size}",
        )
    layout = SparseLayout(
        capacity=header.capacity,
        grain_size=header.granularity * SECTOR,
        gtes_per_gt=header.num_gtes_per_gt,
        gd_offset=header.gd_offset * SECTOR,
        gd_entries=gd_entries,
        compressed=compressed,
        markers=bool(header.flags & FLAG_MARKER),
        zero_grain=bool(header.flags & FLAG_ZERO_GRAIN),
    )
    check_table(layout.gd_offset, layout.gd_bytes, file_size, name, "grain directory")
    return layout


def cowd_layout(block: bytes, file_size: int, name: str) -> SparseLayout:
    """A COWD (ESX ``vmfsSparse``) extent, as qemu's ``vmdk_open_vmfs_sparse`` reads it."""
    block = _pad(block, SECTOR)
    (_, _, disk_sectors, granularity, gd_sector, gd_entries, *_) = _COWD.unpack_from(block, 4)
    if granularity == 0:
        raise _err(name, "COWD grain size of 0 sectors is invalid")
    if granularity > MAX_GRAIN_SECTORS:
        raise _err(name, f"COWD grain size of {granularity} sectors is invalid")
    if gd_entries > MAX_GD_ENTRIES:
        raise _err(name, f"COWD grain directory of {gd_entries} entries is too big")
    layout = SparseLayout(
        capacity=disk_sectors,
        grain_size=granularity * SECTOR,
        gtes_per_gt=COWD_GTES_PER_GT,
        gd_offset=gd_sector * SECTOR,
        gd_entries=gd_entries,
        compressed=False,
        markers=False,
        zero_grain=False,
        cowd=True,
    )
    check_table(layout.gd_offset, layout.gd_bytes, file_size, name, "COWD grain directory")
    return layout


def check_table(offset: int, length: int, file_size: int, name: str, what: str) -> None:
    """A table must lie wholly inside its file (qemu would read zeros past the end)."""
    if length == 0:
        return
    if offset >= file_size:
        raise _err(name, f"{what} at {offset:#x} lies past the end of the file")
    if offset + length > file_size:
        raise _err(
            name,
            f"{what} at {offset:#x} ({length} bytes) is cut short by the end of the file"
            f" ({file_size} bytes)",
        )


def u32_table(data: bytes) -> array[int]:
    """Little-endian 32-bit entries (GD or GT) as an array of ints."""
    table = array("I")
    table.frombytes(data[: len(data) - len(data) % 4])
    if sys.byteorder == "big":  # pragma: no cover - little-endian hosts only in CI
        table.byteswap()
    return table


def grain_marker(head: bytes) -> tuple[int, int]:
    """``(lba, size)`` of the grain marker at the start of ``head`` (zero-padded)."""
    lba, size = struct.unpack_from("<QI", _pad(head, MARKER_SIZE))
    return lba, size


def inflate_grain(data: bytes, grain_size: int, name: str, offset: int) -> bytes:
    """One compressed grain, inflated as qemu's ``uncompress`` into one grain's buffer:
    the zlib stream must end and produce at most ``grain_size`` bytes."""
    where = f"compressed grain at {offset:#x}"
    try:
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, grain_size)
        tail = inflater.unconsumed_tail
        if not inflater.eof and tail and inflater.decompress(tail, 1):
            raise _err(name, f"{where} inflates to more than one grain ({grain_size} bytes)")
    except zlib.error as exc:
        raise _err(name, f"{where} is corrupt ({exc})") from None
    if not inflater.eof:
        raise _err(name, f"{where} is truncated")
    return out


# --------------------------------------------------------------------------- descriptor


def c_string(data: bytes) -> bytes:
    """``data`` up to its first NUL, as the C code sees a buffer."""
    end = data.find(b"\0")
    return data if end < 0 else data[:end]


def decode_name(raw: bytes) -> str:
    """A file name from a descriptor, keeping undecodable bytes (as ``os.fsdecode``)."""
    return raw.decode("utf-8", "surrogateescape")


def create_type(text: bytes, name: str) -> str:
    """The descriptor's ``createType`` (qemu's ``vmdk_parse_description``)."""
    pos = text.find(b"createType")
    if pos < 0:
        raise _err(name, "descriptor is invalid: it has no createType")
    start = pos + len(b"createType") + 2  # skip '="'
    if start >= len(text):
        raise _err(name, "descriptor is invalid: createType has no value")
    end = text.find(b'"', start)
    if end < 0 or end - start + 1 > 128:
        raise _err(name, "descriptor is invalid: createType is not a quoted value")
    return text[start:end].decode("latin-1")


SUPPORTED_CREATE_TYPES = frozenset(
    {
        "monolithicFlat",
        "vmfs",
        "vmfsSparse",
        "seSparse",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    }
)


class ExtentLine(NamedTuple):
    """One extent line qemu keeps: ``RW <sectors> <kind> "<file>" [offset]``."""

    sectors: int
    kind: str  # FLAT, SPARSE, VMFS, VMFSSPARSE, SESPARSE
    file: str
    offset: int  # sectors into the file (flat extents)
    line: int  # 1-based line number, for messages


_INT64_MAX = (1 << 63) - 1
_KINDS = frozenset({"FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"})


class _Scan:
    """Enough of C ``sscanf`` for qemu's extent-line format, over ``text[pos:]``."""

    def __init__(self, text: bytes, pos: int) -> None:
        self.text = text
        self.pos = pos

    def space(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _SPACE:
            pos += 1
        self.pos = pos

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def word(self, width: int) -> bytes | None:  # %<width>s
        self.space()
        start = self.pos
        text, pos = self.text, start
        while pos < len(text) and pos - start < width and text[pos] not in _SPACE:
            pos += 1
        self.pos = pos
        return text[start:pos] if pos > start else None

    def int64(self) -> int | None:  # %lld
        self.space()
        text, pos = self.text, self.pos
        sign = 1
        if pos < len(text) and text[pos] in b"+-":
            sign = -1 if text[pos] == 0x2D else 1
            pos += 1
        start = pos
        while pos < len(text) and 0x30 <= text[pos] <= 0x39:
            pos += 1
        if pos == start:
            return None
        self.pos = pos
        digits = text[start:pos].lstrip(b"0")
        # strtoll saturates; and int() would refuse thousands of digits anyway
        value = sign * (int(digits or b"0") if len(digits) <= 19 else _INT64_MAX + 1)
        return max(-_INT64_MAX - 1, min(_INT64_MAX, value))

    def literal(self, char: int) -> bool:
        if self.pos < len(self.text) and self.text[self.pos] == char:
            self.pos += 1
            return True
        return False

    def name(self, width: int) -> bytes | None:  # %<width>[^\n\r"]
        text, start = self.text, self.pos
        pos = start
        while pos < len(text) and pos - start < width and text[pos] not in b'\n\r"':
            pos += 1
        self.pos = pos
        return text[start:pos] if pos > start else None


def _scan_extent(text: bytes, pos: int) -> tuple[int, bytes, int, bytes, bytes, int]:
    """``sscanf(p, "%10s %lld %10s \\"%511[^\\n\\r\\"]\\" %lld")``: the match count and
    the fields (``sectors`` 0 and ``offset`` -1 where not matched)."""
    scan = _Scan(text, pos)
    access = scan.word(10)
    if access is None:
        return 0, b"", 0, b"", b"", -1
    sectors = scan.int64()
    if sectors is None:
        return 1, access, 0, b"", b"", -1
    kind = scan.word(10)
    if kind is None:
        return 2, access, sectors, b"", b"", -1
    scan.space()
    if not scan.literal(0x22):
        return 3, access, sectors, kind, b"", -1
    fname = scan.name(511)
    if fname is None:
        return 3, access, sectors, kind, b"", -1
    if not scan.literal(0x22):
        return 4, access, sectors, kind, fname, -1
    offset = scan.int64()
    if offset is None:
        return 4, access, sectors, kind, fname, -1
    return 5, access, sectors, kind, fname, offset


def parse_extents(text: bytes, name: str) -> list[ExtentLine]:
    """The extents qemu's ``vmdk_parse_extents`` keeps, in order.

    Lines that do not scan, or whose access is not ``RW`` (``RDONLY``, ``NOACCESS``),
    or whose kind is unknown (``ZERO``), or with a size of 0 sectors or less are
    skipped, as qemu skips them; a malformed FLAT/VMFS/sparse line is an error.
    """
    extents: list[ExtentLine] = []
    pos, line = 0, 0
    # sscanf skips white space across line ends, so blank lines all scan from the same
    # place: remember it, or a descriptor of blank lines would take quadratic time.
    run_start, run_end = -1, -1
    scanned: tuple[int, bytes, int, bytes, bytes, int] = (0, b"", 0, b"", b"", -1)
    while pos < len(text):
        line += 1
        nl = text.find(b"\n", pos)
        next_pos = len(text) if nl < 0 else nl + 1
        if not run_start <= pos <= run_end:
            scan = _Scan(text, pos)
            scan.space()
            if scan.pos != run_end:
                scanned = _scan_extent(text, scan.pos)
            run_end = scan.pos
        run_start = pos
        matches, access, sectors, kind_b, fname, offset = scanned
        here, pos = pos, next_pos
        if matches < 4 or access != b"RW":
            continue
        kind = kind_b.decode("latin-1")
        if kind == "FLAT":
            valid = matches == 5 and offset >= 0
        elif kind == "VMFS":
            valid = matches == 4
            offset = 0
        else:
            valid = matches == 4
        if not valid:
            shown = text[here:next_pos].rstrip(b"\n").decode("latin-1")
            if len(shown) > 200:
                shown = shown[:200] + "..."
            raise _err(name, f"descriptor line {line} is an invalid extent line: {shown!r}")
        if sectors <= 0 or kind not in _KINDS:
            continue
        if len(extents) >= MAX_EXTENTS:
            raise _err(name, f"descriptor names more than {MAX_EXTENTS} extents")
        extents.append(ExtentLine(sectors, kind, decode_name(fname), max(offset, 0), line))
    return extents


def _scan_hex(text: bytes, pos: int) -> int | None:
    """``sscanf(p, "%x")`` into a ``uint32_t``."""
    scan = _Scan(text, pos)
    scan.space()
    p = scan.pos
    negative = False
    if p < len(text) and text[p] in b"+-":
        negative = text[p] == 0x2D
        p += 1
    if text[p : p + 2] in (b"0x", b"0X"):
        q = p + 2
        if q < len(text) and chr(text[q]) in "0123456789abcdefABCDEF":
            p = q
        else:
            return 0
    start = p
    while p < len(text) and chr(text[p]) in "0123456789abcdefABCDEF":
        p += 1
    if p == start:
        return None
    value = min(int(text[start:p], 16), (1 << 64) - 1)
    if negative:
        value = -value % (1 << 64)
    return value & 0xFFFFFFFF


def read_cid(area: bytes, parent: bool) -> int | None:
    """``CID`` (or ``parentCID``) from the descriptor area, as qemu's ``vmdk_read_cid``:
    the first occurrence of the key anywhere, skipping one character (the ``=``)."""
    text = c_string(area[: DESC_AREA - 1])
    key = b"parentCID" if parent else b"CID"
    pos = text.find(key)
    if pos < 0:
        return None
    start = pos + len(key) + 1
    if start > len(text):
        return None
    return _scan_hex(text, start)


def parent_hint(area: bytes, name: str) -> str | None:
    """``parentFileNameHint`` from the descriptor area, as qemu's ``vmdk_parent_open``;
    None when absent or empty."""
    text = c_string(area[:DESC_AREA])
    pos = text.find(b"parentFileNameHint")
    if pos < 0:
        return None
    start = pos + len(b"parentFileNameHint") + 2  # skip '="'
    end = text.find(b'"', start) if start <= len(text) else -1
    if end < 0:
        raise _err(name, "parentFileNameHint is not a quoted value")
    if end - start > MAX_PARENT_NAME:
        raise _err(name, f"parentFileNameHint is longer than {MAX_PARENT_NAME} bytes")
    if end == start:
        return None
    return decode_name(text[start:end])
