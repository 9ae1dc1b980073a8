"""Local file reads: the hole-aware read gives the same bytes as a plain one."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiodd.formats.common import zero_fill
from aiodd.io import SMALL_HOLE, LocalFile

BLOCK = 4096  # ext4 and tmpfs make holes in whole blocks


@settings(max_examples=60, deadline=None)
@given(
    layout=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=8),
    tail=st.integers(0, BLOCK - 1),
    windows=st.lists(
        st.tuples(st.integers(0, 400 * BLOCK), st.integers(0, 200 * BLOCK)), min_size=1, max_size=6
    ),
)
def test_sparse_read_matches_plain_read(
    layout: list[tuple[bool, int]], tail: int, windows: list[tuple[int, int]]
) -> None:
    """Several reads of one file, in any order: what one read learns of the holes is
    remembered, and must not mislead the next."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sparse.raw")
        expected = bytearray()
        with open(path, "wb") as f:
            for is_data, blocks in layout:
                if is_data:
                    chunk = os.urandom(blocks * BLOCK)
                    f.seek(len(expected))
                    f.write(chunk)
                    expected += chunk
                else:
                    expected += bytes(blocks * BLOCK)
            expected += os.urandom(tail)
            f.seek(len(expected) - tail)
            f.write(expected[len(expected) - tail :])
            f.truncate(len(expected))
        file = LocalFile.open(path)
        try:
            for offset, length in windows:
                got = bytearray(b"\xaa" * length)
                n = file.readinto_sparse(offset, memoryview(got))
                want = bytes(expected[offset : offset + length])
                assert n == len(want)
                assert got[:n] == want
                assert got[n:] == b"\xaa" * (length - n)  # past the end: untouched
        finally:
            file.close()


def test_sparse_reads_ask_the_kernel_once_per_hole_and_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a file in pieces asks ``SEEK_DATA``/``SEEK_HOLE`` once for each hole
    and each data span, not at every piece: ``SEEK_HOLE`` searches to the next hole,
    which on a preallocated file in the page cache costs a walk of its pages."""
    path = tmp_path / "pieces.raw"
    data = os.urandom(16 * BLOCK)
    with path.open("wb") as f:
        f.seek(8 * BLOCK)  # a hole of 8 blocks, 16 of data, a hole of 8 to the end
        f.write(data)
        f.truncate(32 * BLOCK)
    asked: list[int] = []
    real_lseek = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            asked.append(how)
        return real_lseek(fd, pos, how)

    file = LocalFile.open(str(path))
    try:
        monkeypatch.setattr(os, "lseek", lseek)
        got = bytearray()
        for offset in range(0, 32 * BLOCK, BLOCK // 2):
            piece = bytearray(b"\xaa" * (BLOCK // 2))
            assert file.readinto_sparse(offset, memoryview(piece)) == len(piece)
            got += piece
    finally:
        file.close()
    assert got == bytes(8 * BLOCK) + data + bytes(8 * BLOCK)
    # The first hole, the data, the last hole (a SEEK_DATA from inside it).
    assert asked == [os.SEEK_DATA, os.SEEK_HOLE, os.SEEK_DATA]


def test_a_file_system_without_seek_data_is_read_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``SEEK_DATA`` is refused (``EINVAL``), the read is a plain one: the same
    bytes, its holes read as the kernel's zeros and none reported."""
    path = tmp_path / "plain.raw"
    data = os.urandom(BLOCK)
    with path.open("wb") as f:
        f.seek(4 * BLOCK)
        f.write(data)
    real_lseek = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "not here")
        return real_lseek(fd, pos, how)

    file = LocalFile.open(str(path))
    try:
        monkeypatch.setattr(os, "lseek", lseek)
        holes: list[tuple[int, int]] = []
        buf = bytearray(b"\xaa" * 6 * BLOCK)
        assert file.readinto_sparse(0, memoryview(buf), holes) == 5 * BLOCK
    finally:
        file.close()
    assert bytes(buf[: 5 * BLOCK]) == bytes(4 * BLOCK) + data
    assert bytes(buf[5 * BLOCK :]) == b"\xaa" * BLOCK  # past the end: untouched
    assert holes == []


def test_small_holes_after_data_are_read_not_looked_up(tmp_path: Path) -> None:
    """From the first hole of less than ``SMALL_HOLE`` after data, the read is a plain
    one: none of its holes is reported, and the bytes are the same.  A small hole the
    read starts in is zeroed and reported as before (it may have begun long before)."""
    path = tmp_path / "small.raw"
    small = SMALL_HOLE - BLOCK
    pieces = [os.urandom(BLOCK), bytes(small), os.urandom(BLOCK), bytes(SMALL_HOLE * 4)]
    pieces.append(os.urandom(BLOCK))
    with path.open("wb") as f:
        pos = 0
        for piece in pieces:
            if any(piece):
                f.seek(pos)
                f.write(piece)
            pos += len(piece)
    expected = b"".join(pieces)
    file = LocalFile.open(str(path))
    try:
        holes: list[tuple[int, int]] = []
        buf = bytearray(b"\xaa" * len(expected))
        assert file.readinto_sparse(0, memoryview(buf), holes) == len(expected)
        assert bytes(buf) == expected
        assert holes == []  # the large hole after the small one was read too
        holes = []
        buf = bytearray(b"\xaa" * (len(expected) - 2 * BLOCK))
        assert file.readinto_sparse(2 * BLOCK, memoryview(buf), holes) == len(buf)
        assert bytes(buf) == expected[2 * BLOCK :]
        # The hole the read starts in (its last block or two), and the large hole.
        assert holes == [(0, small - BLOCK), (small, SMALL_HOLE * 4)]
    finally:
        file.close()


def test_zero_fill_large_and_small() -> None:
    buf = bytearray(b"\x01" * (3 * 1024 * 1024 + 5))
    zero_fill(memoryview(buf)[7:])
    assert buf[:7] == b"\x01" * 7 and not any(buf[7:])
    zero_fill(memoryview(buf)[:0])


def test_the_holes_reported_are_the_files_holes_and_the_end(tmp_path: Path) -> None:
    """``--sparse`` trusts these ranges to be zeros without looking (docs/usage.md)."""
    from aiodd.formats.raw.decode import RawDisk

    path = tmp_path / "holes.raw"
    with path.open("wb") as f:
        f.seek(3 * BLOCK)
        f.write(b"\x01" * BLOCK)
        f.seek(10 * BLOCK)
        f.write(b"\x02" * 100)  # the file ends mid-block: the disk is 512-rounded
    file = LocalFile.open(str(path))
    try:
        holes: list[tuple[int, int]] = []
        buf = bytearray(b"\xaa" * 12 * BLOCK)
        n = file.readinto_sparse(BLOCK, memoryview(buf), holes)
        assert n == 9 * BLOCK + 100
        assert holes == [(0, 2 * BLOCK), (3 * BLOCK, 6 * BLOCK)]
        disk = RawDisk(file)
        view = memoryview(bytearray(b"\xaa" * (disk.virtual_size - 2 * BLOCK)))
        assert disk.read_into_holes(2 * BLOCK, view) == [
            (0, BLOCK),
            (2 * BLOCK, 6 * BLOCK),
            (8 * BLOCK + 100, 412),  # past the file's end, up to the 512-byte rounding
        ]
        assert bytes(view) == path.read_bytes()[2 * BLOCK :] + bytes(412)
    finally:
        file.close()


class _PlainFile:
    """A file that cannot report its holes (no ``readinto_sparse``), as a guest's
    resolver or a test's in-memory file."""

    name = "plain.raw"

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)
        self.reads = 0

    def pread(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def readinto(self, offset: int, buf: memoryview) -> int:
        self.reads += 1
        chunk = self._data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        pass


def test_a_raw_disk_reads_a_file_without_holes_through_readinto() -> None:
    """Without ``readinto_sparse`` every byte is read, and the one hole reported is the
    tail past the file's end (what a hole-reporting file adds is tested above)."""
    from aiodd.formats.raw.decode import RawDisk

    data = bytes(range(256)) * 4 + b"\x07" * 100  # ends mid-sector
    file = _PlainFile(data)
    disk = RawDisk(file)
    assert disk.virtual_size == 1536
    view = memoryview(bytearray(b"\xaa" * 1536))
    assert disk.read_into_holes(0, view) == [(1124, 412)]
    assert bytes(view) == data + bytes(412)
    view = memoryview(bytearray(b"\xaa" * 600))
    disk.read_into(1000, view)
    assert bytes(view) == data[1000:] + bytes(600 - 124)
    assert file.reads == 2
