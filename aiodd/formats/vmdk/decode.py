"""vmdk: VMware virtual disks, read as QEMU's ``vmdk`` driver reads them.

Supported: hosted sparse extents (``monolithicSparse``, versions 1-3, zeroed grains),
``streamOptimized`` (deflate grains behind grain markers, with or without a footer),
COWD extents (ESX ``vmfsSparse``), and descriptor files naming FLAT, VMFS, SPARSE and
VMFSSPARSE extents (``monolithicFlat``, ``twoGbMaxExtentSparse``/``Flat``, ``vmfs``…),
plus parent chains (``parentFileNameHint``, checked by CID as qemu does).  seSparse
extents are refused.  The structures are parsed in :mod:`aiodd.formats.vmdk.layout`.
"""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable

from aiodd.errors import ImageError, UnsupportedImageError
from aiodd.formats.common import SECTOR, read_parent, round_up, zero_fill
from aiodd.formats.reference import Reference
from aiodd.formats.vmdk import layout as L

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk

NAME = L.NAME
probe = L.probe

# Grain tables kept in memory per disk (a hosted GT is 2 KiB, a COWD GT 16 KiB).
TABLE_CACHE_ENTRIES = 1024

# Kinds of runs in a sparse read.
_DATA, _ZERO, _UNALLOC = 0, 1, 2


def _err(name: str, message: str) -> ImageError:
    return ImageError(name, f"vmdk {message}", NAME)


class _TableCache:
    """A bounded LRU of grain tables, shared by the threads reading one disk.

    Tables are read outside the lock; two threads missing the same table both read
    it, which is harmless.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._tables: OrderedDict[tuple[int, int], array[int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int], load: Callable[[int], array[int]], arg: int) -> array[int]:
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                return table
        table = load(arg)
        with self._lock:
            self._tables[key] = table
            self._tables.move_to_end(key)
            while len(self._tables) > self._capacity:
                self._tables.popitem(last=False)
        return table


class _FlatExtent:
    """A FLAT or VMFS extent: ``sectors`` sectors at ``start`` in a plain file."""

    def __init__(self, file: RandomAccessFile, sectors: int, start: int) -> None:
        self.file = file
        self.sectors = sectors
        self.start = start

    def read(self, disk: VmdkDisk, eoff: int, voff: int, mv: memoryview) -> None:
        got = self.file.readinto(self.start + eoff, mv)
        if got < len(mv):
            zero_fill(mv[got:])


class _SparseExtent:
    """A hosted sparse (``KDMV``) or COWD extent: GD → GT → grains."""

    def __init__(self, index: int, file: RandomAccessFile, layout: L.SparseLayout) -> None:
        self.index = index
        self.file = file
        self.layout = layout
        self.sectors = layout.capacity
        self.gd = L.u32_table(file.pread(layout.gd_offset, layout.gd_bytes))
        if len(self.gd) != layout.gd_entries:
            raise _err(file.name, f"grain directory at {layout.gd_offset:#x} could not be read")

    def _load_table(self, sector: int) -> array[int]:
        layout, file = self.layout, self.file
        offset = sector * SECTOR
        what = "COWD grain table" if layout.cowd else "grain table"
        L.check_table(offset, layout.gt_bytes, file.size, file.name, what)
        table = L.u32_table(file.pread(offset, layout.gt_bytes))
        if len(table) != layout.gtes_per_gt:
            raise _err(file.name, f"{what} at {offset:#x} could not be read")
        return table

    def read(self, disk: VmdkDisk, eoff: int, voff: int, mv: memoryview) -> None:
        layout, file = self.layout, self.file
        grain = layout.grain_size
        cover = grain * layout.gtes_per_gt
        gd = self.gd
        zero_grain, compressed = layout.zero_grain, layout.compressed
        file_size = file.size
        tables = disk.tables
        index = self.index
        n = len(mv)
        pos = 0
        # The pending run: kind, where it starts in mv, its length, its file offset.
        r_kind, r_pos, r_len, r_foff = -1, 0, 0, 0
        while pos < n:
            off = eoff + pos
            gd_i, in_cover = divmod(off, cover)
            if gd_i >= len(gd):
                raise _err(
                    file.name,
                    f"grain directory ({len(gd)} entries) does not cover offset {off:#x}",
                )
            gt_sector = gd[gd_i]
            foff = 0
            if gt_sector == 0:
                kind = _UNALLOC
                take = min(n - pos, cover - in_cover)
            else:
                gt = tables.get((index, gt_sector), self._load_table, gt_sector)
                gt_i, in_grain = divmod(in_cover, grain)
                gte = gt[gt_i]
                take = min(n - pos, grain - in_grain)
                if gte == 0:
                    kind = _UNALLOC
                elif gte == L.GTE_ZEROED and zero_grain:
                    kind = _ZERO
                else:
                    foff = gte * SECTOR
                    if foff >= file_size:
                        what = "compressed grain" if compressed else "grain"
                        raise _err(file.name, f"{what} at {foff:#x} lies past the end of the file")
                    if compressed:
                        if r_len:
                            disk.flush(
                                file, r_kind, voff + r_pos, r_foff, mv[r_pos : r_pos + r_len]
                            )
                            r_kind, r_len = -1, 0
                        self._read_compressed(foff, in_grain, mv[pos : pos + take])
                        pos += take
                        continue
                    foff += in_grain
                    kind = _DATA
            if kind == r_kind and (kind != _DATA or foff == r_foff + r_len):
                r_len += take
            else:
                if r_len:
                    disk.flush(file, r_kind, voff + r_pos, r_foff, mv[r_pos : r_pos + r_len])
                r_kind, r_pos, r_len, r_foff = kind, pos, take, foff
            pos += take
        if r_len:
            disk.flush(file, r_kind, voff + r_pos, r_foff, mv[r_pos : r_pos + r_len])

    def _read_compressed(self, foff: int, in_grain: int, out: memoryview) -> None:
        layout, file = self.layout, self.file
        grain = layout.grain_size
        if layout.markers:
            head = file.pread(foff, L.MARKER_SIZE + grain + 4096)
            _, size = L.grain_marker(head)
            if size == 0 or size > 2 * grain:
                raise _err(file.name, f"grain marker at {foff:#x} has an invalid size ({size})")
            data = head[L.MARKER_SIZE : L.MARKER_SIZE + size]
            if len(data) < size and len(head) == L.MARKER_SIZE + grain + 4096:
                data += file.pread(foff + len(head), size - len(data))
        else:
            data = file.pread(foff, grain)
        plain = L.inflate_grain(data, grain, file.name, foff)
        if in_grain + len(out) > len(plain):
            raise _err(
                file.name,
                f"compressed grain at {foff:#x} inflates to {len(plain)} bytes,"
                f" short of the {in_grain + len(out)} needed",
            )
        out[:] = memoryview(plain)[in_grain : in_grain + len(out)]


_Extent = _FlatExtent | _SparseExtent


class VmdkDisk:
    """A decoded VMDK: its extents end to end, over an optional parent."""

    format_name = NAME

    def __init__(
        self,
        name: str,
        create_type: str,
        extents: list[_Extent],
        files: list[RandomAccessFile],
        cid: int,
        parent_cid: int,
    ) -> None:
        self.name = name
        self.create_type = create_type
        self.cid = cid
        self.parent_cid = parent_cid
        self.parent: VirtualDisk | None = None
        self.parent_name: str | None = None
        self.tables = _TableCache(TABLE_CACHE_ENTRIES)
        self._extents = extents
        self._files = files
        self._starts: list[int] = []
        self._ends: list[int] = []
        end = 0
        for extent in extents:
            self._starts.append(end)
            end += extent.sectors * SECTOR
            self._ends.append(end)
            if end > L.MAX_VIRTUAL_SIZE:
                raise _err(name, "virtual size is too large")
        self._virtual_size = end

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        total = len(buf)
        pos = 0
        i = max(0, bisect_right(self._starts, offset) - 1)
        ends, starts, extents = self._ends, self._starts, self._extents
        while pos < total:
            voff = offset + pos
            while i < len(ends) and voff >= ends[i]:
                i += 1
            if i >= len(ends):
                zero_fill(buf[pos:])
                return
            n = min(total - pos, ends[i] - voff)
            extents[i].read(self, voff - starts[i], voff, buf[pos : pos + n])
            pos += n

    def flush(
        self, file: RandomAccessFile, kind: int, voff: int, foff: int, out: memoryview
    ) -> None:
        """Fill ``out`` (virtual offset ``voff``) for one run of a sparse extent's read."""
        if kind == _DATA:
            got = file.readinto(foff, out)
            if got < len(out):  # a grain cut short by the end of the file: zeros, as qemu
                zero_fill(out[got:])
        elif kind == _ZERO or self.parent is None:
            zero_fill(out)
        else:
            self._read_parent(voff, out)

    def _read_parent(self, voff: int, out: memoryview) -> None:
        parent = self.parent
        assert parent is not None
        parent_cid = getattr(parent, "cid", None) if isinstance(parent, VmdkDisk) else None
        if parent_cid != self.parent_cid:
            shown = "none" if parent_cid is None else f"{parent_cid:08x}"
            raise _err(
                self.name,
                f"parentCID {self.parent_cid:08x} does not match the CID ({shown}) of"
                f" parent '{self.parent_name}'",
            )
        read_parent(parent, voff, out)

    def close(self) -> None:
        parent, self.parent = self.parent, None
        if parent is not None:
            parent.close()
        seen: set[int] = set()
        for file in self._files:
            if id(file) in seen:
                continue
            seen.add(id(file))
            file.close()
        self._files = []


def _close_all(files: list[RandomAccessFile]) -> None:
    for file in files:
        file.close()


def _open_sparse(
    index: int, file: RandomAccessFile, nested: bool
) -> _SparseExtent | L.SparseHeader:
    """A sparse extent; or, for a top-level ``KDMV`` file whose capacity is 0 with a
    descriptor offset, that header (qemu then reads the embedded descriptor)."""
    name = file.name
    if file.size < 4:
        raise _err(name, "file is too small to be an image")
    block = file.pread(0, SECTOR)
    magic = block[:4]
    if magic == L.MAGIC_COWD:
        return _SparseExtent(index, file, L.cowd_layout(block, file.size, name))
    if magic != L.MAGIC_KDMV:
        raise _err(name, "extent is not in VMDK format")
    header = L.parse_sparse_header(block)
    if header.capacity == 0 and header.desc_offset:
        if nested:
            raise UnsupportedImageError(
                name, "vmdk extent holds a descriptor of its own (nested descriptors)", NAME
            )
        return header
    if header.gd_offset == L.GD_AT_END:
        end = round_up(file.size, SECTOR)
        if end < 3 * SECTOR:
            raise _err(name, "file is too small to hold a footer")
        header = L.parse_footer(file.pread(end - 3 * SECTOR, 3 * SECTOR), name)
    return _SparseExtent(index, file, L.sparse_layout(header, file.size, name))


def _open_descriptor(
    text: bytes, file: RandomAccessFile, resolver: Resolver, files: list[RandomAccessFile]
) -> tuple[str, list[_Extent]]:
    name = file.name
    create_type = L.create_type(text, name)
    if create_type not in L.SUPPORTED_CREATE_TYPES:
        raise UnsupportedImageError(
            name, f"vmdk image type '{create_type}' is not supported in a descriptor", NAME
        )
    extents: list[_Extent] = []
    for line in L.parse_extents(text, name):
        if line.kind == "SESPARSE":
            raise UnsupportedImageError(name, "vmdk SESPARSE extents are not supported", NAME)
        extent_file = resolver.open_file(Reference("extent", line.file, referrer=name))
        files.append(extent_file)
        if line.kind in ("FLAT", "VMFS"):
            start = line.offset * SECTOR
            need = start + line.sectors * SECTOR
            if need > extent_file.size:
                raise _err(
                    name,
                    f"{line.kind} extent '{line.file}' (descriptor line {line.line}) needs"
                    f" {need} bytes, the file has {extent_file.size}",
                )
            extents.append(_FlatExtent(extent_file, line.sectors, start))
        else:
            sparse = _open_sparse(len(extents), extent_file, nested=True)
            assert isinstance(sparse, _SparseExtent)
            extents.append(sparse)
    return create_type, extents


def open_disk(file: RandomAccessFile, resolver: Resolver) -> VmdkDisk:
    name = file.name
    if file.size < 4:
        raise _err(name, "file is too small to be an image")
    files: list[RandomAccessFile] = []  # extent files we opened (not ``file``)
    try:
        magic = file.pread(0, 4)
        if magic in (L.MAGIC_KDMV, L.MAGIC_COWD):
            area_offset = L.EMBEDDED_DESC_OFFSET
            opened = _open_sparse(0, file, nested=False)
            if isinstance(opened, _SparseExtent):
                extents: list[_Extent] = [opened]
                create_type = (
                    "streamOptimized"
                    if opened.layout.compressed
                    else ("vmfsSparse" if opened.layout.cowd else "monolithicSparse")
                )
            else:
                desc_at = opened.desc_offset * SECTOR
                text = L.c_string(file.pread(desc_at, min(file.size, L.DESC_READ_MAX)))
                create_type, extents = _open_descriptor(text, file, resolver, files)
        else:
            area_offset = 0
            text = L.c_string(file.pread(0, min(file.size, L.DESC_READ_MAX)))
            create_type, extents = _open_descriptor(text, file, resolver, files)

        area = file.pread(area_offset, L.DESC_AREA)
        hint = L.parent_hint(area, name)
        cid = L.read_cid(area, parent=False)
        if cid is None:
            raise _err(name, "descriptor has no readable CID")
        parent_cid = L.read_cid(area, parent=True)
        if parent_cid is None:
            raise _err(name, "descriptor has no readable parentCID")
        disk = VmdkDisk(name, create_type, extents, [file, *files], cid, parent_cid)
        if hint is not None:
            disk.parent_name = hint
            disk.parent = resolver.open_disk(Reference("parent", hint, referrer=name, format=NAME))
        return disk
    except BaseException:
        _close_all(files)
        raise
