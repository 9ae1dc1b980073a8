"""Hand-built qcow (version 1) and QED images for the decoder tests and the hostile
corpus: every field can be set, so that each of qemu's checks can be met or missed.
And the checks the two formats' decoder tests make alike: a refusal, windows read as
the whole disk reads, a mutated image reads or fails with a one-line error, qemu
refuses what the decoder refuses."""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aiodd.errors import ImageError
from aiodd.formats.base import Decoder
from aiodd.formats.qcow import layout as qcow
from aiodd.formats.qed import layout as qed


def cluster(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def read_whole(decoder: Decoder, data: bytes, name: str, files: dict[str, bytes] | None) -> bytes:
    """The whole virtual disk of ``data`` (named ``name``), decoded in memory."""
    from tests.harness import whole_disk
    from tests.test_decode_qcow2 import MemFile, MemResolver

    return whole_disk(decoder.open_disk(MemFile(data, name), MemResolver(files)))


def refusal(
    decoder: Decoder, data: bytes, name: str, files: dict[str, bytes] | None = None
) -> ImageError:
    """The ImageError that reading the whole of ``data`` raises."""
    with pytest.raises(ImageError) as info:
        read_whole(decoder, data, name, files)
    return info.value


def windows_match_the_whole(
    decoder: Decoder, data: bytes, name: str, *, seed: int, longest: int, past_end: int = 0
) -> None:
    """200 reads of up to ``longest`` bytes at random places (up to ``past_end`` bytes
    past the disk's end, read as zeros) give the bytes of the whole disk's read."""
    from tests.test_decode_qcow2 import MemFile, MemResolver

    whole = read_whole(decoder, data, name, None)
    disk = decoder.open_disk(MemFile(data, name), MemResolver())
    rng = random.Random(seed)
    for _ in range(200):
        start = rng.randrange(len(whole) + past_end)
        buf = bytearray(rng.randrange(1, longest))
        disk.read_into(start, memoryview(buf))
        assert bytes(buf) == whole[start : start + len(buf)].ljust(len(buf), b"\0")


def reads_or_fails_cleanly(decoder: Decoder, data: bytes, name: str) -> None:
    """``data`` opens and reads its first MiB, or fails with a one-line ImageError."""
    from tests.test_decode_qcow2 import MemFile, MemResolver

    try:
        disk = decoder.open_disk(MemFile(data, name), MemResolver())
        buf = bytearray(min(disk.virtual_size, 1 << 20))
        disk.read_into(0, memoryview(buf))
    except ImageError as error:
        assert "\n" not in str(error)


def qemu_refuses(tmp_path: Path, data: bytes, name: str, fmt: str) -> None:
    """``qemu-img convert -f fmt`` of ``data`` fails."""
    from tests.conftest import qemu_img

    path = tmp_path / name
    path.write_bytes(data)
    done = qemu_img("convert", "-f", fmt, "-O", "raw", path, tmp_path / "o.raw", check=False)
    assert done.returncode == 1, done.stderr


def deflate(data: bytes) -> bytes:
    """Raw deflate with the 4 KiB window qemu's qcow writes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


@dataclass
class Qcow:
    """A qcow image: ``data`` maps guest cluster indices to their bytes (a whole
    cluster), written plain or, for those in ``compressed``, deflated."""

    size: int
    cluster_bits: int = 12
    l2_bits: int = 9
    data: dict[int, bytes] = field(default_factory=dict)
    compressed: set[int] = field(default_factory=set)
    backing: bytes | None = None
    crypt_method: int = 0
    # Overrides, after the layout is made: {guest cluster index: raw L2 entry}.
    entries: dict[int, int] = field(default_factory=dict)
    l1_entries: dict[int, int] = field(default_factory=dict)

    def build(self) -> bytes:
        cs = 1 << self.cluster_bits
        span = cs << self.l2_bits
        l1_size = -(-self.size // span)
        name = self.backing or b""
        l1_offset = (qcow.HEADER_SIZE + len(name) + 7) & ~7
        out = bytearray(l1_offset + l1_size * 8)
        out += bytes(-len(out) % cs)
        l1 = [0] * l1_size
        l2: dict[int, list[int]] = {}
        for index in sorted({*self.data, *self.entries}):
            table = l2.setdefault(index >> self.l2_bits, [0] * (1 << self.l2_bits))
            if index in self.data:
                if index in self.compressed:
                    packed = deflate(self.data[index])
                    assert len(packed) < cs
                    entry = qcow.OFLAG_COMPRESSED | len(packed) << (63 - self.cluster_bits)
                    entry |= len(out)
                    out += packed
                else:
                    out += bytes(-len(out) % cs)
                    entry = len(out)
                    out += self.data[index].ljust(cs, b"\0")
                table[index & ((1 << self.l2_bits) - 1)] = entry
        for l1_index, table in sorted(l2.items()):
            out += bytes(-len(out) % 512)
            l1[l1_index] = len(out)
            for index, entry in self.entries.items():
                if index >> self.l2_bits == l1_index:
                    table[index & ((1 << self.l2_bits) - 1)] = entry
            out += struct.pack(f">{len(table)}Q", *table)
        for l1_index, entry in self.l1_entries.items():
            l1[l1_index] = entry
        out[:48] = qcow.build_header(
            size=self.size,
            cluster_bits=self.cluster_bits,
            l2_bits=self.l2_bits,
            l1_table_offset=l1_offset,
            backing_file_offset=qcow.HEADER_SIZE if self.backing else 0,
            backing_file_size=len(name),
            crypt_method=self.crypt_method,
        )
        out[48 : 48 + len(name)] = name
        struct.pack_into(f">{l1_size}Q", out, l1_offset, *l1)
        return bytes(out)


@dataclass
class Qed:
    """A QED image: ``data`` maps guest cluster indices to their bytes; ``zero`` holds
    the indices of zero clusters."""

    size: int
    cluster_size: int = 4096
    table_size: int = 2
    header_size: int = 1
    data: dict[int, bytes] = field(default_factory=dict)
    zero: set[int] = field(default_factory=set)
    backing: bytes | None = None
    raw_backing: bool = False
    features: int = 0
    compat_features: int = 0
    autoclear_features: int = 0
    entries: dict[int, int] = field(default_factory=dict)
    l1_entries: dict[int, int] = field(default_factory=dict)

    @property
    def table_entries(self) -> int:
        return self.table_size * self.cluster_size // 8

    def build(self) -> bytes:
        cs = self.cluster_size
        n = self.table_entries
        out = bytearray(self.header_size * cs)
        l1_offset = len(out)
        out += bytes(self.table_size * cs)
        l1 = [0] * n
        l2: dict[int, list[int]] = {}
        for index in sorted({*self.data, *self.zero, *self.entries}):
            table = l2.setdefault(index // n, [0] * n)
            if index in self.data:
                table[index % n] = len(out)
                out += self.data[index].ljust(cs, b"\0")
            elif index in self.zero:
                table[index % n] = qed.ZERO_CLUSTER
        for l1_index, table in sorted(l2.items()):
            l1[l1_index] = len(out)
            for index, entry in self.entries.items():
                if index // n == l1_index:
                    table[index % n] = entry
            out += struct.pack(f"<{n}Q", *table)
        for l1_index, entry in self.l1_entries.items():
            l1[l1_index] = entry
        struct.pack_into(f"<{n}Q", out, l1_offset, *l1)
        features = self.features
        name = self.backing or b""
        if self.backing is not None:
            features |= qed.F_BACKING_FILE
            if self.raw_backing:
                features |= qed.F_BACKING_FORMAT_NO_PROBE
        out[:64] = qed.build_header(
            cluster_size=cs,
            table_size=self.table_size,
            header_size=self.header_size,
            features=features,
            l1_table_offset=l1_offset,
            image_size=self.size,
            backing_filename_offset=qed.HEADER_SIZE if self.backing is not None else 0,
            backing_filename_size=len(name),
            compat_features=self.compat_features,
            autoclear_features=self.autoclear_features,
        )
        out[64 : 64 + len(name)] = name
        return bytes(out)
