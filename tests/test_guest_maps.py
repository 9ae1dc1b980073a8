"""Maps for the Python decoders (aiodd/guest/maps.py): the reads a sandboxed guest leaves
to the host, and the rule every decoder keeps so that it may (docs/kvm.md, "Reads the
host finishes").

The rule: bytes a ``readinto`` puts into a disk's output are final.  Each decoder is held
to it here as tests/fuzz/hosted.c holds the C decoders: every read left to the host is
filled with a pattern at once, and must still hold it when the read ends (nothing wrote
over it); the host's reads, made then in order, must give the bytes the plain read
gives (nothing read it back, which would have read the pattern).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from aiodd import chain
from aiodd.errors import ImageError
from aiodd.formats import registry
from aiodd.formats.base import VirtualDisk
from aiodd.guest import maps
from aiodd.guest.maps import MappableFile, read_map
from aiodd.guest.protocol import MAP_EXTENTS, MAP_FACTOR
from aiodd.io import LocalFile
from aiodd.policy import Policy
from tests.conftest import needs_qemu
from tests.differential import plan
from tests.formats_corpus import BUILDERS, Corpus

MiB = 1 << 20
REFUSED = {"chain-vmdk-over-raw"}  # refused by both tools: nothing to read
POISON = bytes(range(251, 0, -1))  # no run of a single byte, no image's pattern


def _poisoned(length: int) -> bytes:
    return (POISON * (length // len(POISON) + 1))[:length]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("corpus"))


class Layers:
    """A chain opened here as the guest opens it: each file the host would hold open
    (the image, then each file the image names, numbered in turn) a MappableFile."""

    def __init__(self, path: Path, fmt: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files: list[MappableFile] = []
        monkeypatch.setattr(chain, "_local", lambda fd, name: self._file(fd, name))
        policy = Policy([str(path.parent)])
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        top = policy.top(str(path), fd)
        self.disk: VirtualDisk = registry.open_disk(
            self._file(fd, str(path)), chain.LocalResolver(policy, top), fmt
        )

    def _file(self, fd: int, name: str) -> MappableFile:
        self.files.append(MappableFile(fd, name, len(self.files)))
        return self.files[-1]


def _finish(out: bytearray, extents: tuple[int, ...], files: Sequence[LocalFile]) -> None:
    """What the host does with a map (aiodd.guest.disk.GuestDisk._place): each read left,
    made in order from the file of its layer, zeros past the file's end."""
    for i in range(0, len(extents), 4):
        layer, offset, length, at = extents[i : i + 4]
        data = files[layer].pread(offset, length)
        out[at : at + length] = data + bytes(length - len(data))


@pytest.fixture
def poisoned_leaves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes]]:
    """Every read left from now on is filled with the pattern at once, and listed, in
    order: (its start in the output, the pattern written)."""
    left: list[tuple[int, bytes]] = []
    leave = maps._Map.leave

    def poisoning(
        self: maps._Map, file: LocalFile, layer: int, offset: int, buf: memoryview, n: int
    ) -> bool:
        if not leave(self, file, layer, offset, buf, n):
            return False
        pattern = _poisoned(n)[::-1] if len(left) % 2 else _poisoned(n)
        buf[:n] = pattern
        left.append((self.extents[-1], pattern))
        return True

    monkeypatch.setattr(maps._Map, "leave", poisoning)
    return left


@needs_qemu
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_decoder_leaves_its_reads_final(
    corpus: Corpus,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    poisoned_leaves: list[tuple[int, bytes]],
) -> None:
    source = corpus.get(name)
    if name in REFUSED:
        with pytest.raises(ImageError):
            Layers(source.path, source.fmt, monkeypatch)
        return
    layers = Layers(source.path, source.fmt, monkeypatch)
    disk = layers.disk
    size = disk.virtual_size
    whole = [
        (start, min(4 * MiB, size - start)) for start in range(0, min(size, 32 * MiB), 4 * MiB)
    ]
    mapped = 0
    try:
        for offset, length in [*plan(size), *whole]:
            expected = bytearray(length)
            disk.read_into(offset, memoryview(expected))  # no map: every read made here
            out = bytearray(_poisoned(length))
            poisoned_leaves.clear()
            extents = read_map(disk, offset, memoryview(out))
            # What the left bytes held when the read ended, had nothing touched them.
            untouched = bytearray(out)
            for at, pattern in poisoned_leaves:
                untouched[at : at + len(pattern)] = pattern
            for at, pattern in poisoned_leaves:
                end = at + len(pattern)
                assert out[at:end] == untouched[at:end], f"{name}: a read left at {at} written"
            _finish(out, extents, layers.files)
            assert out == expected, f"{name}: read ({offset}, {length})"
            mapped += sum(extents[2::4])
    finally:
        disk.close()
    compressed = name in ("qcow2-zlib", "qcow2-zstd", "qcow-compressed", "vmdk-stream")
    assert compressed or mapped, "no read was left to the host"


# -- the map's bounds --------------------------------------------------------------------


class Pieces:
    """A disk whose read is ``pieces``: reads of ``file``, (output start, file offset,
    length) each, in order."""

    format_name = "raw"

    def __init__(self, file: LocalFile, pieces: list[tuple[int, int, int]]) -> None:
        self.file = file
        self.pieces = pieces
        self.virtual_size = 1 << 30

    def read_into(self, offset: int, buf: memoryview) -> None:
        for start, source, length in self.pieces:
            n = self.file.readinto(source, buf[start : start + length])
            buf[start + n : start + length] = bytes(length - n)

    def close(self) -> None:
        self.file.close()


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[MappableFile, bytes]]:
    data = os.urandom(1 << 16)
    path = tmp_path / "data"
    path.write_bytes(data)
    file = MappableFile(os.open(path, os.O_RDONLY), str(path), 3)
    yield file, data
    file.close()


def _mapped(disk: Pieces, length: int) -> tuple[tuple[int, ...], bytearray]:
    out = bytearray(_poisoned(length))
    extents = read_map(disk, 0, memoryview(out))
    finished = bytearray(out)
    assert set(extents[0::4]) <= {3}
    _finish(finished, extents, [disk.file] * 4)
    return extents, finished


def test_reads_into_the_output_are_left_in_order(data_file: tuple[MappableFile, bytes]) -> None:
    file, data = data_file
    pieces = [(0, 100, 1000), (1000, 5000, 24), (500, 9000, 100)]  # the last over the first
    extents, out = _mapped(Pieces(file, pieces), 1024)
    assert extents == (3, 100, 1000, 0, 3, 5000, 24, 1000, 3, 9000, 100, 500)
    assert out == data[100:600] + data[9000:9100] + data[700:1100] + data[5000:5024]


def test_a_read_past_the_files_end_leaves_what_the_file_holds(
    data_file: tuple[MappableFile, bytes],
) -> None:
    file, data = data_file
    extents, out = _mapped(Pieces(file, [(0, len(data) - 10, 50), (50, len(data), 14)]), 64)
    assert extents == (3, len(data) - 10, 10, 0)
    assert out == data[-10:] + bytes(54)  # the decoder zeroed the rest, as without a map


def test_reads_elsewhere_are_made_here(data_file: tuple[MappableFile, bytes]) -> None:
    file, data = data_file
    scratch = bytearray(100)

    class Elsewhere(Pieces):
        def read_into(self, offset: int, buf: memoryview) -> None:
            self.file.readinto(0, memoryview(scratch))  # a table, a compressed cluster
            done = threading.Event()

            def other() -> None:  # another thread's read is not this read's
                self.file.readinto(200, buf[:100])
                done.set()

            threading.Thread(target=other).start()
            done.wait()
            plain = LocalFile(os.dup(self.file.fd), "plain")  # a file the host does not hold
            plain.readinto(300, buf[100:200])
            plain.close()

    extents, out = _mapped(Elsewhere(file, []), 200)
    assert extents == ()
    assert bytes(scratch) == data[:100]
    assert out == data[200:300] + data[300:400]
    assert file.readinto(0, memoryview(bytearray(10))) == 10  # and outside a read, made


@pytest.mark.parametrize(
    "pieces",
    [
        [(0, 0, 1000)] * MAP_FACTOR + [(0, 2000, 1)],  # more than MAP_FACTOR times the output
        [(i, i * 7, 1) for i in range(MAP_EXTENTS + 1)],  # more than MAP_EXTENTS reads
    ],
)
def test_past_its_bounds_the_map_is_empty_and_every_read_made(
    data_file: tuple[MappableFile, bytes], pieces: list[tuple[int, int, int]]
) -> None:
    file, data = data_file
    expected = bytearray(_poisoned(1000))
    for start, source, length in pieces:
        expected[start : start + length] = data[source : source + length]
    extents, out = _mapped(Pieces(file, pieces), 1000)
    assert extents == ()
    assert out == expected
    # One read fewer, and the map holds them all.
    extents, out = _mapped(Pieces(file, pieces[:-1]), 1000)
    assert len(extents) == 4 * len(pieces[:-1])
