"""Editing a vhdx that qemu-img made into what qemu-img cannot make: a differencing
disk (a parent locator, and a sector bitmap block), or a header, region table or BAT
entry of one's own choosing.  The bench builds its differencing pair with it, and the
tests their hostile and differential inputs."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiodd.formats.crc32c import crc32c
from aiodd.formats.vhdx import layout as vhdx_layout

KiB = 1 << 10
MiB = 1 << 20


def crc_reseal(raw: bytearray, at: int = 4) -> bytearray:
    raw[at : at + 4] = bytes(4)
    raw[at : at + 4] = struct.pack("<I", crc32c(bytes(raw)))
    return raw


@dataclass
class VhdxImage:
    """A vhdx file's bytes with its structures located."""

    path: Path
    data: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.data = bytearray(self.path.read_bytes())
        L = vhdx_layout
        headers = [L.parse_header(bytes(self.data[a : a + 4096])) for a in L.HEADER_OFFSETS]
        self.header = L.choose_header(*headers)
        rt = L.REGION_TABLE_OFFSET
        self.regions = L.parse_region_table(bytes(self.data[rt : rt + L.REGION_TABLE_SIZE]))
        meta = self.regions.metadata.offset
        self.items = L.parse_metadata_table(
            bytes(self.data[meta : meta + L.METADATA_TABLE_SIZE]), self.regions.metadata.length
        )

    def item_at(self, guid: bytes) -> int:
        return self.regions.metadata.offset + self.items[guid].offset

    def set_bat(self, index: int, value: int) -> None:
        struct.pack_into("<Q", self.data, self.regions.bat.offset + 8 * index, value)

    def bat(self, index: int) -> int:
        value: int = struct.unpack_from("<Q", self.data, self.regions.bat.offset + 8 * index)[0]
        return value

    def edit_headers(self, edit: Callable[[bytearray], None]) -> None:
        for at in vhdx_layout.HEADER_OFFSETS:
            header = bytearray(self.data[at : at + 4096])
            edit(header)
            self.data[at : at + 4096] = crc_reseal(header)

    def edit_region_tables(self, edit: Callable[[bytearray], None]) -> None:
        for at in (vhdx_layout.REGION_TABLE_OFFSET, vhdx_layout.REGION_TABLE_OFFSET + 64 * KiB):
            table = bytearray(self.data[at : at + 64 * KiB])
            edit(table)
            self.data[at : at + 64 * KiB] = crc_reseal(table)

    def region_entry(self, guid: bytes) -> int:
        """Offset of the region table entry for ``guid`` inside a region table."""
        rt = vhdx_layout.REGION_TABLE_OFFSET
        count = struct.unpack_from("<I", self.data, rt + 8)[0]
        for i in range(count):
            if self.data[rt + 16 + 32 * i : rt + 32 + 32 * i] == guid:
                return 16 + 32 * i
        raise AssertionError("no such region")

    def save(self) -> None:
        self.path.write_bytes(bytes(self.data))


def vhdx_locator_item(pairs: list[tuple[str, str]]) -> bytes:
    raw = bytearray(vhdx_layout.PARENT_LOCATOR_TYPE_VHDX + struct.pack("<2xH", len(pairs)))
    table_end = len(raw) + 12 * len(pairs)
    blob = b""
    for key, value in pairs:
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        raw += struct.pack(
            "<IIHH", table_end + len(blob), table_end + len(blob) + len(k), len(k), len(v)
        )
        blob += k + v
    return bytes(raw + blob)


def vhdx_differencing(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """Make a qemu dynamic vhdx (1 MiB blocks) differencing, with a parent locator of
    ``pairs`` and a sector bitmap block (qemu 7.2 cannot create one)."""
    L = vhdx_layout
    img = VhdxImage(path)
    params_at = img.item_at(L.FILE_PARAMETERS_GUID)
    bits = struct.unpack_from("<I", img.data, params_at + 4)[0]
    struct.pack_into("<I", img.data, params_at + 4, bits | 2)
    meta = img.regions.metadata.offset
    count = struct.unpack_from("<H", img.data, meta + 10)[0]
    item = vhdx_locator_item([("parent_linkage", "{0}"), *pairs])
    item_offset = 256 * KiB
    img.data[meta + item_offset : meta + item_offset + len(item)] = item
    struct.pack_into(
        "<16sIII4x", img.data, meta + 32 + 32 * count, L.PARENT_LOCATOR_GUID, item_offset,
        len(item), 4,
    )  # fmt: skip
    struct.pack_into("<H", img.data, meta + 10, count + 1)
    bitmap_at = -(-len(img.data) // MiB) * MiB
    img.data += bytes(bitmap_at + MiB - len(img.data))
    img.set_bat(4096, bitmap_at | L.SB_BLOCK_PRESENT)  # chunk ratio 4096 at 1 MiB blocks
    img.save()
    return path
