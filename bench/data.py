"""The input files, made once per run in the work directory and shared by the sections."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.measure import Log, human

CHUNK = 64 * 1024  # one qcow2 cluster: every chunk is compressed on its own
_ROOT = Path(__file__).resolve().parent.parent  # where ``bench`` is importable from
_MAKE_DIFFERENCING = (
    "import sys; from pathlib import Path; from bench.vhdx_edit import vhdx_differencing; "
    "vhdx_differencing(Path(sys.argv[1]), [('relative_path', sys.argv[2])])"
)


@dataclass(frozen=True)
class ImageKind:
    key: str  # file-name stem
    fmt: str  # qemu format name, for -f
    label: str  # for the tables
    options: tuple[str, ...]  # extra qemu-img convert arguments
    compressed: bool
    source: str = "mixed"  # the raw it is made from: Data.source()


IMAGE_KINDS = (
    ImageKind("qcow2", "qcow2", "qcow2", (), False),
    ImageKind(
        "qcow2-zlib",
        "qcow2",
        "qcow2 compressed (zlib)",
        ("-c", "-o", "compression_type=zlib"),
        True,
    ),
    ImageKind(
        "vmdk-stream", "vmdk", "vmdk streamOptimized", ("-o", "subformat=streamOptimized"), True
    ),
    ImageKind("vhdx", "vhdx", "vhdx (dynamic)", (), False),
    ImageKind("vdi", "vdi", "vdi (dynamic)", (), False),
    ImageKind("parallels", "parallels", "parallels (1 MiB clusters)", (), False),
    # Read-only formats (aiodd does not write them); qcow uncompressed: qemu-img 7.2's
    # convert -c -O qcow ends with an error after writing the image.
    ImageKind("qcow", "qcow", "qcow (version 1)", (), False),
    ImageKind("qed", "qed", "qed", (), False),
    # What qemu-img convert -O raw makes of a used disk: a hole for every 4 KiB of zeros.
    ImageKind("raw-holes", "raw", "raw with 4 KiB holes", (), False, source="holed"),
)


class Data:
    """Makes each input on first use; ``describe()`` lists what was made."""

    def __init__(self, workdir: Path, log: Log) -> None:
        self._dir = workdir / "in"
        self._dir.mkdir(exist_ok=True)
        self._log = log
        self._made: dict[Path, str] = {}

    def random_raw(self, size: int) -> Path:
        """Incompressible data: a raw copy moves every byte, nothing to skip."""
        path = self._dir / f"random-{size}.raw"
        if path not in self._made:
            self._log(f"making {path.name} ({human(size)} from os.urandom)")
            with path.open("wb") as f:
                done = 0
                while done < size:
                    n = min(8 << 20, size - done)
                    f.write(os.urandom(n))
                    done += n
            self._made[path] = f"random, {human(size)}"
        return path

    def mixed_raw(self, size: int) -> Path:
        """Data that compresses like a used disk: neither trivially nor not at all.

        Each 64 KiB chunk is, at random (fixed seed): 30% random bytes, 40% text-like
        lines from a 2000-word vocabulary, 20% fixed-size records with counters (a
        table-like layout), 10% zeros.  zlib shrinks it to roughly half.
        """
        path = self._dir / f"mixed-{size}.raw"
        if path in self._made:
            return path
        self._log(f"making {path.name} ({human(size)} of mixed compressible data)")
        rng = random.Random(20240613)
        letters = "abcdefghijklmnopqrstuvwxyz"
        words = ["".join(rng.choices(letters, k=rng.randint(2, 11))) for _ in range(2000)]
        texts = [_text_chunk(rng, words) for _ in range(64)]
        zeros = bytes(CHUNK)
        with path.open("wb") as f:
            for index in range(size // CHUNK):
                kind = rng.random()
                if kind < 0.30:
                    f.write(rng.randbytes(CHUNK))
                elif kind < 0.70:
                    f.write(texts[rng.randrange(len(texts))])
                elif kind < 0.90:
                    f.write(_records(index, rng.getrandbits(32)))
                else:
                    f.write(zeros)
            f.write(bytes(size % CHUNK))
        self._made[path] = f"mixed compressible, {human(size)}"
        return path

    def holed_raw(self, size: int) -> Path:
        """``mixed_raw(size)`` with a quarter of its 4 KiB blocks zeroed at random (fixed
        seed), written dense: ``qemu-img convert -O raw`` of it has a hole for each."""
        path = self._dir / f"holed-{size}.raw"
        if path in self._made:
            return path
        mixed = self.mixed_raw(size)
        self._log(f"making {path.name} ({human(size)}, a quarter of its 4 KiB blocks zero)")
        rng = random.Random(20261201)
        block = 4096
        with mixed.open("rb") as src, path.open("wb") as f:
            while piece := bytearray(src.read(CHUNK)):
                for start in range(0, len(piece), block):
                    if rng.random() < 0.25:
                        end = min(start + block, len(piece))
                        piece[start:end] = bytes(end - start)
                f.write(piece)
        self._made[path] = f"{mixed.name}, a quarter of its 4 KiB blocks zero"
        return path

    def source(self, kind: ImageKind, size: int) -> Path:
        """The raw file ``kind`` is made from, which a copy of it back to raw must equal."""
        return self.holed_raw(size) if kind.source == "holed" else self.mixed_raw(size)

    def image(self, kind: ImageKind, size: int) -> Path:
        """``source(kind, size)`` converted by ``qemu-img convert`` to ``kind``."""
        path = self._dir / f"{kind.key}-{size}.{kind.fmt}"
        if path not in self._made:
            raw = self.source(kind, size)
            self._log(f"making {path.name} (qemu-img convert {' '.join(kind.options)})")
            argv = ["qemu-img", "convert", "-f", "raw", "-O", kind.fmt, *kind.options]
            subprocess.run([*argv, str(raw), str(path)], check=True)
            self._made[path] = f"{kind.label} of {raw.name}"
        return path

    def qcow2_chain(self, size: int) -> tuple[Path, Path]:
        """A 3-layer qcow2 chain over ``image(qcow2)``: two overlays, each with 64 writes of
        1 MiB spread over the disk (qemu-io), and the chain converted to raw by qemu-img
        (the expected output).  Returns (top, raw)."""
        base = self.image(ImageKind("qcow2", "qcow2", "qcow2", (), False), size)
        top = self._dir / f"chain-top-{size}.qcow2"
        expected = self._dir / f"chain-{size}.raw"
        if top in self._made:
            return top, expected
        below = base
        for level, name in enumerate(("mid", "top")):
            path = self._dir / f"chain-{name}-{size}.qcow2"
            self._log(f"making {path.name} (an overlay of {below.name}, 64 MiB written)")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", below.name, "-F", "qcow2",
                 str(path)],
                check=True,
            )  # fmt: skip
            _qemu_io(path, "qcow2", _overlay_writes(size, level))
            self._made[path] = f"qcow2 overlay of {below.name}, 64 MiB written"
            below = path
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(expected)], check=True
        )
        self._made[expected] = f"{top.name} converted to raw (the expected output)"
        return top, expected

    def vhdx_differencing(self, size: int) -> tuple[Path, Path]:
        """A vhdx differencing child (1 MiB blocks, 64 MiB written by qemu-io) over the
        dynamic ``image(vhdx)``, and the raw bytes it reads as: the parent's with the
        child's writes on top (qemu-img reads no vhdx differencing disk, so the bench
        makes them).  Returns (child, raw)."""
        parent = self.image(ImageKind("vhdx", "vhdx", "vhdx (dynamic)", (), False), size)
        child = self._dir / f"vhdx-child-{size}.vhdx"
        expected = self._dir / f"vhdx-child-{size}.raw"
        if child in self._made:
            return child, expected
        self._log(f"making {child.name} (a differencing child of {parent.name}, 64 MiB written)")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "vhdx", "-o",
             "block_size=1M,block_state_zero=off", str(child), str(size)],
            check=True,
        )  # fmt: skip
        writes = _overlay_writes(size, 0)
        _qemu_io(child, "vhdx", writes)
        # In a child process: the edit holds the whole file in memory, and the bench's own
        # peak RSS would show in every later run's (a spawned child starts with it).
        subprocess.run(
            [sys.executable, "-c", _MAKE_DIFFERENCING, str(child), f".\\{parent.name}"],
            cwd=_ROOT,
            check=True,
        )
        self._made[child] = f"vhdx differencing child of {parent.name}, 64 MiB written"
        shutil.copyfile(self.mixed_raw(size), expected)
        with expected.open("r+b") as f:
            for at, pattern in writes:
                f.seek(at)
                f.write(bytes([pattern]) * _OVERLAY_WRITE)
        self._made[expected] = f"what {child.name} reads as (the expected output)"
        return child, expected

    def sparse(self, size: int) -> Path:
        """A raw file of ``size`` bytes with no data blocks (``truncate``)."""
        path = self._dir / f"sparse-{size}.raw"
        if path not in self._made:
            with path.open("wb") as f:
                f.truncate(size)
            self._made[path] = f"sparse (truncate), {human(size)}"
        return path

    def mostly_empty_qcow2(self, size: int) -> Path:
        """A qcow2 of ``size`` bytes with 4 MiB of data in four places (start, a third,
        two thirds, the last MiB), written by qemu-io: the rest is unallocated."""
        path = self._dir / f"mostly-empty-{size}.qcow2"
        if path not in self._made:
            self._log(f"making {path.name} (qemu-img create, qemu-io writes 4 MiB)")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True
            )
            mib = 1 << 20
            commands: list[str] = []
            for n, at in enumerate((0, size // 3, 2 * size // 3, size - mib)):
                commands += ["-c", f"write -P {0x11 + n} {at // mib * mib} {mib}"]
            subprocess.run(
                ["qemu-io", "-f", "qcow2", *commands, str(path)], check=True, capture_output=True
            )
            self._made[path] = f"qcow2, {human(size)}, 4 MiB of data (qemu-io)"
        return path

    def describe(self) -> list[tuple[str, str, int, int]]:
        """(file, what, apparent size, allocated bytes) for each input made so far."""
        rows = []
        for path, what in self._made.items():
            st = path.stat()
            rows.append((path.name, what, st.st_size, st.st_blocks * 512))
        return rows


_OVERLAY_WRITE = 1 << 20


def _overlay_writes(size: int, level: int) -> list[tuple[int, int]]:
    """(offset, byte) of an overlay's 64 writes of 1 MiB, spread over the disk and apart
    from those of the other levels; in order (in a small disk they overlap)."""
    mib = _OVERLAY_WRITE
    return [
        ((n * (size // 64) + (level + 1) * 3 * mib) // mib * mib % (size - mib),
         0x40 + 16 * level + n % 16)
        for n in range(64)
    ]  # fmt: skip


def _qemu_io(path: Path, fmt: str, writes: list[tuple[int, int]]) -> None:
    """Each write of ``writes`` as one qemu-io ``write -P BYTE OFFSET 1M``."""
    commands: list[str] = []
    for at, pattern in writes:
        commands += ["-c", f"write -P {pattern} {at} {_OVERLAY_WRITE}"]
    subprocess.run(["qemu-io", "-f", fmt, *commands, str(path)], check=True, capture_output=True)


def _text_chunk(rng: random.Random, words: list[str]) -> bytes:
    out = bytearray()
    while len(out) < CHUNK:
        line = " ".join(rng.choices(words, k=rng.randint(4, 14)))
        out += line.encode() + b"\n"
    return bytes(out[:CHUNK])


_RECORD = struct.Struct("<QQI4x16s16s")  # 56 bytes, padded to 64 below


def _records(index: int, salt: int) -> bytes:
    name = f"file{index:08d}".encode()
    tag = f"owner{salt % 97:03d}".encode()
    rec = bytearray()
    for i in range(CHUNK // 64):
        rec += _RECORD.pack(index * 1024 + i, salt + i * 4096, i & 0xFFFF, name, tag) + bytes(8)
    return bytes(rec)
