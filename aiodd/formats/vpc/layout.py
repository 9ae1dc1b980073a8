"""VHD (qemu's "vpc") structures, parsed from bytes and built into bytes with no I/O.

The footer (512 bytes, big-endian) sits at the end of every VHD and, for dynamic and
differencing disks, also at offset 0.  A dynamic disk's footer points at the dynamic
header ("cxsparse", 1024 bytes), which gives the block allocation table (BAT) and,
for a differencing disk, the parent locators.

The virtual size follows qemu 7.2's ``vpc_open``: the CHS geometry's product, except
for creator applications known to size the disk by the footer's current size
(``win ``, ``qem2``, ``d2v ``, ``CTXS``, ``tap\\0``) and for images whose geometry is
the maximum CHS (65535/16/255), which use the current size.
"""

from __future__ import annotations

import struct
from array import array
from collections import namedtuple
from sys import byteorder

from aiodd._typing_names import NamedTuple
from aiodd.formats.common import SECTOR, round_up
from aiodd.formats.common import LayoutError as LayoutError  # what the parsers raise

# Detection imports the probe's module alone (docs/performance.md, "Start-up").
from aiodd.formats.vpc.probe import FOOTER_COOKIE as FOOTER_COOKIE
from aiodd.formats.vpc.probe import probe as probe

NAME = "vpc"
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024

DYN_COOKIE = b"cxsparse"

TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFFERENCING = 4
VERSION = 0x00010000  # of the footer's file format and of the dynamic header
FEATURES = 2  # the footer's reserved feature bit, always set
# Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00:00 UTC.
VHD_EPOCH = 946684800

# qemu 7.2 block/vpc.c: VHD_MAX_SECTORS (2040 GiB) and VHD_MAX_GEOMETRY.
MAX_SECTORS = 0xFF000000
MAX_GEOMETRY = 65535 * 16 * 255
# The block sizes a BAT may describe: qemu takes any power of two >= 512; the
# specification's default is 2 MiB.  Above 256 MiB a single bitmap read grows past 64
# KiB and no known writer goes there, so larger blocks are refused as hostile.
MAX_BLOCK_SIZE = 256 << 20
UNALLOCATED = 0xFFFFFFFF
# A sector bitmap holds sector 0 in its first byte's most significant bit.
BITMAP_MSB_FIRST = True

# Creator applications that qemu 7.2 sizes by the footer's current_size.
CURRENT_SIZE_CREATORS = frozenset({b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"})

# Parent locator platform codes, in the order they are tried.
PLATFORM_W2RU = b"W2ru"  # relative Windows path, UTF-16LE
PLATFORM_W2KU = b"W2ku"  # absolute Windows path, UTF-16LE
PLATFORM_MACX = b"MacX"  # file URL, UTF-8
LOCATOR_PREFERENCE = (PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX)
MAX_LOCATOR_LENGTH = 64 * 1024
# A path longer than PATH_MAX - 1 bytes is one no host can open; refusing it also bounds
# the name (and the message quoting it) the KVM guest passes to the host (docs/kvm.md).
MAX_PARENT_PATH = 4095

# Each structure's fields, named once for both parsing and building.
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_FooterFields = namedtuple(
    "_FooterFields",
    "cookie features version data_offset timestamp creator_app creator_version creator_os"
    " original_size current_size cylinders heads spt disk_type checksum uuid saved_state"
    " reserved",
)
_DYN = struct.Struct(">8sQQIIII16sII512s192s256s")
_DynFields = namedtuple(
    "_DynFields",
    "cookie data_offset table_offset version entries block_size checksum parent_uuid"
    " parent_timestamp reserved parent_name locators reserved_end",
)
_LOCATOR = struct.Struct(">4sIIIQ")


def checksum(data: bytes | bytearray) -> int:
    """VHD's checksum: the one's complement of the byte sum."""
    return ~sum(data) & 0xFFFFFFFF


def _checksummed(layout: struct.Struct, fields: _FooterFields | _DynFields) -> bytes:
    """``fields`` packed, with the checksum of the packing (its own field zero)."""
    fields = fields._replace(checksum=0)
    return layout.pack(*fields._replace(checksum=checksum(layout.pack(*fields))))


class Footer(NamedTuple):
    data_offset: int
    creator_app: bytes
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    uuid: bytes

    @property
    def virtual_size(self) -> int:
        """The disk's size in bytes as qemu 7.2 computes it."""
        sectors = self.cylinders * self.heads * self.sectors_per_track
        use_chs = self.creator_app not in CURRENT_SIZE_CREATORS
        if not use_chs or sectors == MAX_GEOMETRY:
            sectors = self.current_size // SECTOR
        return sectors * SECTOR


def parse_footer(raw: bytes) -> Footer:
    if len(raw) < FOOTER_SIZE:
        raise LayoutError("vpc footer is truncated")
    f = _FooterFields._make(_FOOTER.unpack_from(raw))
    if f.cookie != FOOTER_COOKIE:
        raise LayoutError("vpc footer has no 'conectix' cookie")
    zeroed = bytearray(raw[:FOOTER_SIZE])
    zeroed[64:68] = bytes(4)
    if checksum(zeroed) != f.checksum:
        raise LayoutError("vpc footer checksum is incorrect")
    footer = Footer(
        f.data_offset,
        f.creator_app,
        f.current_size,
        f.cylinders,
        f.heads,
        f.spt,
        f.disk_type,
        f.uuid,
    )
    if footer.virtual_size > MAX_SECTORS * SECTOR:
        raise LayoutError(f"vpc virtual size {footer.virtual_size} is larger than 2040 GiB")
    return footer


class Locator(NamedTuple):
    platform: bytes
    data_length: int
    data_offset: int


class DynamicHeader(NamedTuple):
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_uuid: bytes
    parent_name: str
    locators: tuple[Locator, ...]

    @property
    def bitmap_size(self) -> int:
        """Bytes of sector bitmap before each block, rounded up to a sector."""
        return round_up(self.block_size // (8 * SECTOR), SECTOR)


def parse_dynamic_header(raw: bytes, virtual_size: int) -> DynamicHeader:
    if len(raw) < DYN_HEADER_SIZE:
        raise LayoutError("vpc dynamic header is truncated")
    d = _DynFields._make(_DYN.unpack_from(raw))
    entries, block_size = d.entries, d.block_size
    if d.cookie != DYN_COOKIE:
        raise LayoutError("vpc dynamic header has no 'cxsparse' cookie")
    if block_size < SECTOR or block_size & (block_size - 1):
        raise LayoutError(f"vpc block size {block_size} is not a power of two >= 512")
    if block_size > MAX_BLOCK_SIZE:
        raise LayoutError(f"vpc block size {block_size} is larger than 256 MiB")
    if entries * block_size < virtual_size:
        raise LayoutError(
            f"vpc BAT of {entries} entries is too small for the virtual size {virtual_size}"
        )
    locators = []
    for i in range(8):
        platform, _space, length, _res, offset = _LOCATOR.unpack_from(raw, 576 + 24 * i)
        if platform != bytes(4):
            locators.append(Locator(platform, length, offset))
    parent_name = d.parent_name.decode("utf-16-be", "replace").split("\0", 1)[0]
    return DynamicHeader(
        d.table_offset, entries, block_size, d.parent_uuid, parent_name, tuple(locators)
    )


def parse_bat(raw: bytes, entries: int) -> array[int]:
    """The BAT as host-order 32-bit sector numbers."""
    if len(raw) < 4 * entries:
        raise LayoutError("vpc BAT is truncated")
    bat = array("I")
    bat.frombytes(raw[: 4 * entries])
    if byteorder == "little":
        bat.byteswap()
    return bat


def choose_locator(locators: tuple[Locator, ...]) -> Locator | None:
    """The parent locator to follow: relative Windows path first, then absolute, then
    a Mac OS X URL (the Mac alias form cannot be resolved and is ignored)."""
    for platform in LOCATOR_PREFERENCE:
        for locator in locators:
            if locator.platform == platform and locator.data_length > 0:
                return locator
    return None


def decode_locator(platform: bytes, data: bytes) -> str:
    """The parent's path from a locator's data, as a relative POSIX-style name when the
    locator holds a Windows path (``.\\base.vhd`` becomes ``base.vhd``)."""
    try:
        if platform in (PLATFORM_W2RU, PLATFORM_W2KU):
            text = data.decode("utf-16-le")
        else:
            text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LayoutError(
            f"vpc parent locator '{platform.decode('latin-1')}' is not valid text"
        ) from None
    text = text.split("\0", 1)[0]
    label = platform.decode("latin-1")
    length = len(text.encode("utf-8"))
    if length > MAX_PARENT_PATH:
        raise LayoutError(
            f"vpc parent locator '{label}' names a path of {length} bytes"
            f" (at most {MAX_PARENT_PATH})"
        )
    if platform == PLATFORM_MACX:
        path = file_url_path(text)
        if path is None:
            raise LayoutError(f"vpc parent locator 'MacX' is not a file URL: {text!r}")
        return unquote(path)
    text = text.replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    if not text:
        raise LayoutError(f"vpc parent locator '{label}' is empty")
    return text


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def unquote(text: str) -> str:
    """``urllib.parse.unquote``, without the import (the guest imports this module before
    it seals itself, and urllib.parse costs it milliseconds: docs/performance.md,
    "Start-up"): each ``%XX`` a byte, the bytes read as UTF-8 with invalid sequences
    replaced, and a ``%`` not followed by two hex digits kept as it is."""
    if "%" not in text:
        return text
    first, *rest = text.split("%")
    out = bytearray(first.encode("utf-8"))
    for piece in rest:
        if len(piece) >= 2 and piece[0] in _HEX_DIGITS and piece[1] in _HEX_DIGITS:
            out.append(int(piece[:2], 16))
            out += piece[2:].encode("utf-8")
        else:
            out += b"%" + piece.encode("utf-8")
    return out.decode("utf-8", "replace")


def file_url_path(url: str) -> str | None:
    """The path of a ``file:`` URL (still percent-encoded), None for any other URL.

    urlsplit's reading of the ASCII forms a locator holds, spelled out so that the KVM
    guest's twin can follow it exactly: the scheme before the first colon (any case),
    an authority after ``//`` dropped up to the next ``/``, ``?`` or ``#``, and the path
    up to the first ``?`` or ``#``.  Unlike urlsplit, no whitespace is stripped and no
    authority is judged (urlsplit raises ValueError on some)."""
    scheme, colon, rest = url.partition(":")
    if not colon or not scheme.isascii() or scheme.lower() != "file":
        return None
    if rest.startswith("//"):
        rest = rest[2:]
        ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
        rest = rest[min(ends) :] if ends else ""
    cut = [i for i in (rest.find(c) for c in "?#") if i >= 0]
    return rest[: min(cut)] if cut else rest


def build_footer(
    *,
    data_offset: int,
    timestamp: int,
    creator: tuple[bytes, int, bytes],
    size: int,
    geometry: tuple[int, int, int],
    disk_type: int,
    uuid: bytes,
) -> bytes:
    """A footer: ``creator`` is (application, version, host OS), ``geometry`` (cylinders,
    heads, sectors per track); the original and current sizes are both ``size``."""
    app, version, host = creator
    cylinders, heads, spt = geometry
    fields = _FooterFields(
        cookie=FOOTER_COOKIE,
        features=FEATURES,
        version=VERSION,
        data_offset=data_offset,
        timestamp=timestamp,
        creator_app=app,
        creator_version=version,
        creator_os=host,
        original_size=size,
        current_size=size,
        cylinders=cylinders,
        heads=heads,
        spt=spt,
        disk_type=disk_type,
        checksum=0,
        uuid=uuid,
        saved_state=0,
        reserved=b"",
    )
    return _checksummed(_FOOTER, fields)


def build_dynamic_header(*, table_offset: int, entries: int, block_size: int) -> bytes:
    """The dynamic header of a disk with no parent (no locators, no parent name)."""
    fields = _DynFields(
        cookie=DYN_COOKIE,
        data_offset=0xFFFFFFFFFFFFFFFF,  # unused
        table_offset=table_offset,
        version=VERSION,
        entries=entries,
        block_size=block_size,
        checksum=0,
        parent_uuid=bytes(16),
        parent_timestamp=0,
        reserved=0,
        parent_name=b"",
        locators=b"",
        reserved_end=b"",
    )
    return _checksummed(_DYN, fields)
