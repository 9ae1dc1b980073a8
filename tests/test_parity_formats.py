"""End-to-end parity of the ``aiodd`` command with the real ``qemu-img dd`` for every
input format (docs/formats.md#input-formats) and every output format
(docs/formats.md#output-formats).

Both tools run as commands with the same operands: ``python -m aiodd`` (``--isolation=
inline`` in half of the cases, ``--isolation=sandbox`` in the other half; a third of the
cases whose every layer the KVM guest reader decodes get ``--isolation=kvm`` instead) and
``qemu-img dd``.  Judged: the exit status; the ``cannot skip to specified offset`` warning; for raw
output the bytes, exactly; for ``-O qcow2/vmdk/vpc/vhdx/vdi`` the virtual size (``qemu-img
info``), the bytes after ``qemu-img convert -O raw`` and ``qemu-img check`` (qcow2, vmdk,
vhdx, vdi); on failure, no file left by aiodd.  Round trips go back to raw through aiodd; the
independent readers (libvmdk's ``vmdkinfo``/``vmdkmount``, libvhdi's ``vhdiinfo``/
``vhdimount``) read our outputs.

The inputs are built by qemu-img and qemu-io (tests/formats_corpus.py).  The default run
takes a slice of every matrix (each input format and feature, each output format, each
window kind, both isolation modes); ``-m full_matrix`` runs the whole cross product.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import kvm_marks, needs_qemu, with_kvm
from tests.formats_corpus import BUILDERS, Corpus, Source, pattern

pytestmark = needs_qemu

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HUGE = "7E"
OUT_FORMATS = ("qcow2", "vmdk", "vpc", "vhdx", "vdi")
CHECKABLE = {"qcow2", "vmdk", "vhdx", "vdi"}  # qemu-img check does not support vpc
ISOLATIONS = ("inline", "sandbox")
TIMEOUT = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("corpus"))


# --- running both tools -------------------------------------------------------------------


@dataclass
class Run:
    status: int
    stdout: bytes
    stderr: str


def run_all(*commands: list[str], cwd: Path | None = None) -> list[Run]:
    """Run the commands side by side (two cores) and wait for all of them."""
    procs = [
        subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for command in commands
    ]
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        runs.append(Run(proc.returncode, out, err.decode(errors="replace")))
    return runs


def aiodd_command(isolation: str, flags: list[str], operands: list[str]) -> list[str]:
    return [sys.executable, "-m", "aiodd", f"--isolation={isolation}", *flags, *operands]


@dataclass
class Judged:
    sizes: tuple[int, int]  # virtual size (qemu-img info) of ours, theirs
    data: tuple[bytes, bytes]  # qemu-img convert -O raw of ours, theirs
    check: str | None  # qemu-img check's complaint about ours; None: clean or unsupported


def judge(ours: Path, theirs: Path, fmt: str) -> Judged:
    """qemu-img info and convert -O raw of both images, and check of ours, side by side."""
    pairs = [(ours, ours.with_name(ours.name + ".conv")), (theirs, theirs.with_name("t.conv"))]
    commands = [["qemu-img", "info", "-f", fmt, "--output=json", str(p)] for p, _ in pairs]
    commands += [["qemu-img", "convert", "-f", fmt, "-O", "raw", str(p), str(c)] for p, c in pairs]
    if fmt in CHECKABLE:  # qemu-img check does not support vpc
        commands.append(["qemu-img", "check", "-f", fmt, str(ours)])
    runs = run_all(*commands)
    for run, command in zip(runs, commands, strict=True):
        text = run.stdout.decode(errors="replace") + run.stderr
        assert run.status == 0, f"{' '.join(command[:2])} {Path(command[-1]).name}: {text}"
    sizes = (int(json.loads(runs[0].stdout)["virtual-size"]),
             int(json.loads(runs[1].stdout)["virtual-size"]))  # fmt: skip
    data = (pairs[0][1].read_bytes(), pairs[1][1].read_bytes())
    for _, converted in pairs:
        converted.unlink()
    complaint = None
    if fmt in CHECKABLE:
        text = runs[4].stdout.decode() + runs[4].stderr
        if "No errors were found" not in text or "leak" in text:
            complaint = text
    return Judged(sizes, data, complaint)


@dataclass
class Parity:
    ours: Path
    theirs: Path
    status: int
    window: bytes | None  # the output's virtual disk (as qemu reads qemu-img dd's output)


def ext(fmt: str) -> str:
    return {"vpc": "vhd"}.get(fmt, fmt)


def check_parity(
    source: Source, out_fmt: str, operands: list[str], isolation: str, workdir: Path
) -> Parity:
    """Run aiodd and qemu-img dd on the same operands; assert they agree."""
    ours, theirs = workdir / f"ours.{ext(out_fmt)}", workdir / f"theirs.{ext(out_fmt)}"
    flags = (["-f", source.fmt] if source.fmt else []) + (
        ["-O", out_fmt] if out_fmt != "raw" or isolation == "sandbox" else []
    )  # -O raw spelled out in half of the raw cases
    mine, qemu = run_all(
        aiodd_command(isolation, flags, [f"if={source.path}", f"of={ours}", *operands]),
        ["qemu-img", "dd", *flags, f"if={source.twin or source.path}", f"of={theirs}",
         *operands],
        cwd=source.path.parent,  # qemu 7.2 opens a relative data_file from its cwd
    )  # fmt: skip
    context = f"aiodd: {mine.stderr!r}\nqemu-img: {qemu.stderr!r}"
    assert "Traceback" not in mine.stderr, context
    assert mine.status == qemu.status, context
    warning = "cannot skip to specified offset"
    assert (warning in mine.stderr) == (warning in qemu.stderr), context
    stray = {p.name for p in workdir.iterdir()} - {ours.name, theirs.name}
    assert not stray, f"left behind: {stray}"
    if mine.status != 0:
        lines = mine.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("aiodd: "), context
        assert not ours.exists(), "a failed run left its output behind"
        return Parity(ours, theirs, mine.status, None)
    if out_fmt == "raw":
        data = ours.read_bytes()
        assert len(data) == theirs.stat().st_size
        assert data == theirs.read_bytes()
        assert os.stat(ours).st_blocks * 512 >= len(data), "raw output is not dense"
        return Parity(ours, theirs, 0, data)
    judged = judge(ours, theirs, out_fmt)
    assert judged.sizes[0] == judged.sizes[1], "virtual size"
    # The same layout, block for block, gives the same file size (ls -l shows it).
    assert ours.stat().st_size == theirs.stat().st_size, "file size"
    raw_ours, raw_theirs = judged.data
    assert len(raw_ours) == len(raw_theirs) == judged.sizes[1]
    assert raw_ours == raw_theirs, f"bytes differ from {first_difference(raw_ours, raw_theirs)}"
    assert judged.check is None, judged.check
    return Parity(ours, theirs, 0, raw_theirs)


def first_difference(a: bytes, b: bytes) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


# --- windows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    label: str
    operands: Callable[[int], list[str]]  # from the input's virtual size


WINDOWS = [
    Window("whole", lambda v: []),  # not for the large inputs
    # count is where the window ends (in blocks from the start), not its length
    Window("in-clusters", lambda v: ["bs=1000", "skip=65", "count=300"]),
    Window("across-2M", lambda v: ["bs=4096", "skip=511", "count=514"]),
    Window("across-1M-bs3000", lambda v: ["bs=3000", "skip=349", "count=351"]),
    Window("bs1", lambda v: ["bs=1", "skip=65530", "count=65543"]),
    Window("bs1M", lambda v: ["bs=1M", "skip=1", "count=3"]),
    Window(
        "tail-past-end", lambda v: ["bs=7000", f"skip={max(0, v - 20000) // 7000}", f"count={HUGE}"]
    ),
    Window(
        "last-64k-partial", lambda v: ["bs=64K", f"skip={max(0, v - 1) // 65536}", "count=1000"]
    ),
    Window("beyond-end", lambda v: ["bs=1M", f"skip={v // MiB + 1}"]),  # warns, empty
]
SKIP_2G = (2 * GiB - 4000) // 3000
LARGE_WINDOWS = {
    w.label: w
    for w in [
        Window("across-2G", lambda v: ["bs=1M", "skip=2047", "count=2049"]),
        Window("across-2G-odd", lambda v: ["bs=3000", f"skip={SKIP_2G}", f"count={SKIP_2G + 5}"]),
        Window("across-4G", lambda v: ["bs=64K", "skip=65534", "count=65538"]),
        Window("across-256M", lambda v: ["bs=1M", "skip=255", "count=257"]),
        Window("end-3M", lambda v: ["bs=1M", f"skip={v // MiB - 3}"]),
    ]
}
# Inputs too large to copy whole, with the windows of their own they get.
LARGE = {
    "vmdk-2gb-sparse": ("across-2G", "across-2G-odd", "across-4G"),
    "vmdk-2gb-flat": ("across-2G", "across-2G-odd", "across-4G"),
    "vpc-200G": ("end-3M",),
    "vhdx-256M-blocks": ("across-256M",),
}


def windows_for(name: str) -> list[Window]:
    if name not in LARGE:
        return WINDOWS
    return [w for w in WINDOWS if w.label != "whole"] + [LARGE_WINDOWS[x] for x in LARGE[name]]


def find_window(label: str) -> Window:
    return next(w for w in [*WINDOWS, *LARGE_WINDOWS.values()] if w.label == label)


# (corpus image, -f forced on both tools or None)
SOURCES: list[tuple[str, str | None]] = [(name, None) for name in BUILDERS] + [
    ("raw-3000", "qcow2"),  # not in qcow2 format: exit 1
    ("raw-text", "vmdk"),  # exit 1
    ("qcow2-v3", "raw"),  # the container bytes
    ("qcow2-v2", "vmdk"),  # exit 1
    ("vmdk-flat", "raw"),  # the descriptor text
    ("vmdk-sparse", "vmdk"),
    ("vpc-dynamic", "raw"),
    ("vpc-fixed", "raw"),
    ("vhdx-dynamic", "vpc"),  # exit 1
    ("vpc-dynamic", "vdi"),  # exit 1: no VDI signature
    ("vhdx-dynamic-1M", "vhdx"),
    ("qcow2-zstd", "qcow2"),
    ("parallels-64k", "raw"),  # the container bytes
    ("vpc-dynamic", "parallels"),  # exit 1
    ("qcow-4k", "qcow"),
    ("qed-64k", "qed"),
    ("qed-64k", "raw"),  # the container bytes
    ("qcow2-v3", "qed"),  # not in qed format: exit 1
    ("qcow2-v2", "qcow"),  # qcow version 2: exit 1
]


# The formats of a chain's layers (the corpus names only the top's).
CHAIN_FORMATS = {
    "chain-qcow2-vmdk-vmdk": {"qcow2", "vmdk"},
    "chain-qcow2-qcow2-raw": {"qcow2", "raw"},
    "chain-qcow2-qcow2-vhdx": {"qcow2", "vhdx"},
    "chain-qcow2-vpc": {"qcow2", "vpc"},
    "chain-qcow2-vdi": {"qcow2", "vdi"},
    "chain-qcow2-parallels": {"qcow2", "parallels"},
    "chain-vmdk-over-raw": {"vmdk", "raw"},
    "chain-probed": {"qcow2", "vmdk"},
    "chain-backing-fmt-raw": {"qcow2", "raw"},
    "chain-qcow-raw": {"qcow", "raw"},
    "chain-qed-raw": {"qed", "raw"},
    "chain-qed-qcow2": {"qed", "qcow2"},
    "chain-qcow2-qed-qcow": {"qcow2", "qed", "qcow"},
}


def layer_formats(name: str, forced: str | None) -> set[str]:
    """The formats the layers of corpus image ``name`` are decoded as."""
    if forced is not None:
        return {forced}
    if name.startswith("chain-"):
        return CHAIN_FORMATS[name]
    return {name.split("-")[0]}


def isolations(name: str, forced: str | None) -> tuple[str, ...]:
    return with_kvm(ISOLATIONS, layer_formats(name, forced))


def params(cases: Iterable[Case | WindowCase]) -> list[object]:
    return [pytest.param(c, id=str(c), marks=kvm_marks(c.isolation)) for c in cases]


def source_id(name: str, forced: str | None) -> str:
    return name if forced is None else f"{name}@-f{forced}"


def get(corpus: Corpus, name: str, forced: str | None) -> Source:
    return corpus.get(name, forced, forced=forced is not None)


@dataclass(frozen=True)
class Case:
    name: str
    forced: str | None
    window: str
    out: str
    isolation: str

    def __str__(self) -> str:
        return f"{source_id(self.name, self.forced)}-{self.window}-{self.out}-{self.isolation}"


def _all_cases() -> list[Case]:
    cases = []
    for s, (name, forced) in enumerate(SOURCES):
        for w, window in enumerate(windows_for(name)):
            for f, out in enumerate(("raw", *OUT_FORMATS)):
                isolation = ISOLATIONS[(s + w + f) % 2]
                cases.append(Case(name, forced, window.label, out, isolation))
    return cases


ALL_CASES = _all_cases()


def _default_slice() -> list[Case]:
    """Per input: two windows to raw and two more windows to two structured formats (one
    of each for the ``-f`` cases, whole disk), rotating, so that each input meets raw and
    two encoders, and each window kind, output format and isolation mode comes up often."""
    picked: list[Case] = []
    for s, (name, forced) in enumerate(SOURCES):
        mine = [c for c in ALL_CASES if (c.name, c.forced) == (name, forced)]
        labels = [w.label for w in windows_for(name)]
        n = len(labels)
        wanted = {("raw", labels[s % n]), ("raw", labels[(s + 3) % n])}
        k = len(OUT_FORMATS)
        wanted |= {(OUT_FORMATS[s % k], labels[(s + 5) % n])}
        wanted |= {(OUT_FORMATS[(s + 2) % k], labels[(s + 7) % n])}
        if forced is not None:
            wanted = {("raw", labels[0]), (OUT_FORMATS[s % k], labels[0])}
        picked += [c for c in mine if (c.out, c.window) in wanted]
    # half inline, half sandbox, alternating down the list (in thirds with kvm)
    return [
        dataclasses.replace(c, isolation=modes[i % len(modes)])
        for i, c in enumerate(picked)
        for modes in [isolations(c.name, c.forced)]
    ]


DEFAULT_CASES = _default_slice()


def run_case(corpus: Corpus, case: Case, workdir: Path) -> Parity:
    source = get(corpus, case.name, case.forced)
    window = find_window(case.window)
    return check_parity(source, case.out, window.operands(source.size), case.isolation, workdir)


@pytest.mark.parametrize("case", params(DEFAULT_CASES))
def test_input_parity(corpus: Corpus, tmp_path: Path, case: Case) -> None:
    run_case(corpus, case, tmp_path)


@pytest.mark.full_matrix
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_input_parity_full(corpus: Corpus, tmp_path: Path, case: Case) -> None:
    run_case(corpus, case, tmp_path)


# --- what qemu cannot open, checked against its twin --------------------------------------


@pytest.mark.parametrize("name", ["vhdx-dynamic-1M-4k", "vhdx-fixed-1M-4k"])
def test_vhdx_4096_byte_sectors_qemu_refuses(corpus: Corpus, tmp_path: Path, name: str) -> None:
    """qemu 7.2 refuses a VHDX with 4096-byte logical sectors; aiodd reads it (docs/formats.md#vhdx)
    and its bytes equal qemu's view of the same image with 512-byte sectors."""
    source = corpus.get(name)
    assert source.twin is not None
    refused = run_all(["qemu-img", "dd", f"if={source.path}", f"of={tmp_path / 'q.raw'}"])[0]
    assert refused.status == 1
    (tmp_path / "q.raw").unlink(missing_ok=True)
    check_parity(source, "raw", [], "sandbox", tmp_path)


# --- the output window matrix (docs/window.md#output-sizes) -------------------------------

SIZES = [1, 511, 513, 3000, MiB + 1]
BS = ["1", "512", "64K", "1M"]
BS_VALUES = {"1": 1, "512": 512, "64K": 64 * KiB, "1M": MiB}


def _blocks(size: int, bs: int) -> int:
    return -(-size // bs)


def _window(size: int, bs: int, count: str | None, skip: str | None) -> tuple[int, int]:
    disk = -(-size // 512) * 512
    end = disk if count is None else min(disk, (7 << 60 if count == HUGE else int(count)) * bs)
    start = 0 if skip is None else (7 << 60 if skip == HUGE else int(skip)) * bs
    return start, max(0, end - start)


@dataclass(frozen=True)
class WindowCase:
    size: int
    bs: str
    count: str | None
    skip: str | None
    out: str
    isolation: str

    def operands(self) -> list[str]:
        operands = [f"bs={self.bs}"]
        if self.count is not None:
            operands.append(f"count={self.count}")
        if self.skip is not None:
            operands.append(f"skip={self.skip}")
        return operands

    def __str__(self) -> str:
        return f"{self.size}-{'-'.join(self.operands())}-{self.out}-{self.isolation}"


def _window_cases() -> list[WindowCase]:
    cases: list[WindowCase] = []
    seen: set[tuple[object, ...]] = set()
    i = 0
    for size in SIZES:
        for bs_text in BS:
            bs = BS_VALUES[bs_text]
            past = str(_blocks(-(-size // 512) * 512, bs) + 1)  # one block past the end
            for count in [None, "0", "1", HUGE, past]:
                for skip in [None, "0", "1", HUGE, past]:
                    start, length = _window(size, bs, count, skip)
                    if length // bs > 5000:  # qemu-img dd loops once per bs block
                        continue
                    # Operands that give the same window, with or without the warning,
                    # test the same encoder path: keep the first spelling of each.
                    key = (size, bs, start if length else None, length, skip in (HUGE, past))
                    if key in seen:
                        continue
                    seen.add(key)
                    for out in OUT_FORMATS:
                        i += 1
                        modes = with_kvm(ISOLATIONS, ["raw"])
                        isolation = modes[i % len(modes)]
                        cases.append(WindowCase(size, bs_text, count, skip, out, isolation))
    return cases


ALL_WINDOW_CASES = _window_cases()
PICKED_WINDOWS = [
    # empty windows, every format: a size-0 image (vmdk: exit 1, no file)
    *(WindowCase(3000, "512", "0", None, out, "inline") for out in OUT_FORMATS),
    *(WindowCase(513, "1M", None, "1", out, "sandbox") for out in OUT_FORMATS),
    # the odd sizes, whole, every format
    *(
        WindowCase(size, "512", None, None, out, ISOLATIONS[(i + j) % 2])
        for i, size in enumerate(SIZES)
        for j, out in enumerate(OUT_FORMATS)
    ),
    WindowCase(MiB + 1, "64K", HUGE, "1", "vpc", "inline"),
    WindowCase(MiB + 1, "1", "4097", "65535", "vhdx", "sandbox"),
    WindowCase(3000, "1", "5", "2999", "qcow2", "sandbox"),
    WindowCase(3000, "1", None, "3000", "vmdk", "inline"),
]
WINDOW_SLICE = list(
    dict.fromkeys(ALL_WINDOW_CASES[:: max(1, len(ALL_WINDOW_CASES) // 24)] + PICKED_WINDOWS)
)


@pytest.fixture(scope="module")
def raw_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("raw-inputs")
    for size in SIZES:
        (directory / f"in-{size}.raw").write_bytes(pattern(size, size))
    return directory


def run_window_case(raw_inputs: Path, case: WindowCase, tmp_path: Path) -> None:
    path = raw_inputs / f"in-{case.size}.raw"
    source = Source(path.name, path, None, -(-case.size // 512) * 512)
    result = check_parity(source, case.out, case.operands(), case.isolation, tmp_path)
    start, length = _window(case.size, BS_VALUES[case.bs], case.count, case.skip)
    if case.out == "vmdk" and length == 0:
        assert result.status == 1  # monolithicSparse cannot hold zero capacity
        return
    assert result.status == 0 and result.window is not None
    data = path.read_bytes() + bytes(-case.size % 512)
    assert result.window[:length] == data[start : start + length]
    assert not any(result.window[length:])


@pytest.mark.parametrize("case", params(WINDOW_SLICE))
def test_output_windows(raw_inputs: Path, tmp_path: Path, case: WindowCase) -> None:
    run_window_case(raw_inputs, case, tmp_path)


@pytest.mark.full_matrix
@pytest.mark.parametrize("case", ALL_WINDOW_CASES, ids=str)
def test_output_windows_full(raw_inputs: Path, tmp_path: Path, case: WindowCase) -> None:
    run_window_case(raw_inputs, case, tmp_path)


# --- round trips: aiodd -O X, then aiodd back to raw --------------------------------------


def round_trip(corpus: Corpus, tmp_path: Path, name: str, window: str, out: str, n: int) -> None:
    source = corpus.get(name)
    operands = find_window(window).operands(source.size)
    raw_dir, fmt_dir = tmp_path / "raw", tmp_path / "fmt"
    raw_dir.mkdir()
    fmt_dir.mkdir()
    exact = check_parity(source, "raw", operands, ISOLATIONS[n % 2], raw_dir).window
    encoded = check_parity(source, out, operands, ISOLATIONS[(n + 1) % 2], fmt_dir)
    assert exact is not None
    if out == "vmdk" and not exact:
        assert encoded.status == 1  # no empty vmdk: nothing to go back from
        return
    assert encoded.window is not None
    back, forced = tmp_path / "back.raw", tmp_path / "back-f.raw"
    probed, explicit = run_all(
        aiodd_command(ISOLATIONS[n % 2], [], [f"if={encoded.ours}", f"of={back}"]),
        aiodd_command(
            ISOLATIONS[(n + 1) % 2], ["-f", out], [f"if={encoded.ours}", f"of={forced}", "bs=64K"]
        ),
    )
    assert probed.status == 0 and explicit.status == 0, (probed.stderr, explicit.stderr)
    size = len(encoded.window)  # the output's virtual size
    assert back.read_bytes() == forced.read_bytes() == exact + bytes(size - len(exact))


ROUND_TRIPS = [
    ("qcow2-v3", "in-clusters", "qcow2"),
    ("vmdk-stream", "whole", "vmdk"),
    ("vhdx-dynamic-1M", "across-1M-bs3000", "vpc"),
    ("chain-qcow2-vmdk-vmdk", "tail-past-end", "vhdx"),
    ("vpc-dynamic", "across-2M", "qcow2"),
    ("qcow2-2M", "whole", "vhdx"),
    ("raw-3000", "whole", "vmdk"),
    ("qcow2-zstd", "bs1", "vpc"),
    ("vdi-virtualbox", "whole", "vdi"),
    ("qcow2-v3", "across-2M", "vdi"),
]


@pytest.mark.parametrize(("name", "window", "out"), ROUND_TRIPS)
def test_round_trip(corpus: Corpus, tmp_path: Path, name: str, window: str, out: str) -> None:
    round_trip(corpus, tmp_path, name, window, out, ROUND_TRIPS.index((name, window, out)))


ALL_ROUND_TRIPS = [
    (name, w.label, out)
    for name in BUILDERS
    if name not in ("chain-vmdk-over-raw", "vhdx-dynamic-1M-4k", "vhdx-fixed-1M-4k")
    for w in windows_for(name)
    if w.label in ("whole", "in-clusters", "tail-past-end", "across-2G", "end-3M", "across-256M")
    for out in OUT_FORMATS
]


@pytest.mark.full_matrix
@pytest.mark.parametrize(("name", "window", "out"), ALL_ROUND_TRIPS)
def test_round_trip_full(corpus: Corpus, tmp_path: Path, name: str, window: str, out: str) -> None:
    round_trip(corpus, tmp_path, name, window, out, ALL_ROUND_TRIPS.index((name, window, out)))


# --- independent readers: libvmdk and libvhdi ---------------------------------------------

INFO_TOOL = {"vmdk": "vmdkinfo", "vpc": "vhdiinfo", "vhdx": "vhdiinfo"}
# Debian's libvmdk-utils and libvhdi-utils ship no export tool, only info and a FUSE mount
# tool: the mount is how they read a disk's bytes here.
MOUNT_TOOL = {"vmdk": ("vmdkmount", "vmdk1"), "vpc": ("vhdimount", "vhdi1")}
MOUNT_TOOL["vhdx"] = MOUNT_TOOL["vpc"]


def media_size(tool: str, path: Path) -> int:
    """What vmdkinfo / vhdiinfo says the disk's size is; fails if it cannot read it."""
    run = run_all([tool, str(path)])[0]
    text = run.stdout.decode(errors="replace") + run.stderr
    assert run.status == 0, f"{tool} refuses {path.name}:\n{text}"
    match = re.search(r"Media size\s*:?\s*[^(\n]*\((\d+) bytes\)", text)
    assert match, text
    return int(match.group(1))


@contextlib.contextmanager
def mounted(tool: str, image: Path, mountpoint: Path) -> Iterator[Run]:
    """The image mounted by libvmdk/libvhdi's FUSE tool, unmounted on the way out."""
    run = run_all([tool, str(image), str(mountpoint)])[0]
    try:
        yield run
    finally:
        if run.status == 0:
            deadline = time.monotonic() + 10
            while (
                subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
            if os.path.ismount(mountpoint):
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def libyal_read(fmt: str, image: Path, tmp_path: Path) -> tuple[str, bytes | None]:
    """The disk's bytes as libvmdk/libvhdi read them (their FUSE mount tool), or None with
    the tool's complaint."""
    tool, name = MOUNT_TOOL[fmt]
    if shutil.which(tool) is None or not os.path.exists("/dev/fuse"):
        return f"{tool} or /dev/fuse missing", None
    mountpoint = Path(tempfile.mkdtemp(prefix="mnt-", dir=tmp_path))
    with mounted(tool, image, mountpoint) as run:
        text = run.stdout.decode(errors="replace") + run.stderr
        if run.status != 0:
            return text, None
        disk = mountpoint / name
        deadline = time.monotonic() + 10
        while not disk.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return text, disk.read_bytes()


def assert_libyal_reads(fmt: str, ours: Path, theirs: Path, window: bytes, tmp: Path) -> None:
    """libvmdk/libvhdi read ``ours`` as ``window``; skipped where they cannot even mount
    qemu-img's own output (no FUSE here)."""
    text, control = libyal_read(fmt, theirs, tmp)
    if control is None:
        pytest.skip(f"libvmdk/libvhdi cannot mount qemu-img's output here: {text}")
    assert control == window
    text, data = libyal_read(fmt, ours, tmp)
    assert data is not None, f"{MOUNT_TOOL[fmt][0]} refuses {ours.name}:\n{text}"
    assert data == window, f"bytes differ from {first_difference(data, window)}"


READER_CASES = [
    ("qcow2-v3", "in-clusters", "vmdk"),
    ("vpc-dynamic", "whole", "vmdk"),
    ("vmdk-sparse", "whole", "vpc"),
    ("qcow2-extl2", "across-2M", "vpc"),
    ("raw-3000", "whole", "vhdx"),
    ("vhdx-dynamic", "tail-past-end", "vhdx"),
    ("vmdk-2gb-flat", "across-2G", "vpc"),
]


def reader_case(corpus: Corpus, tmp_path: Path, name: str, window: str, out: str) -> None:
    source = corpus.get(name)
    operands = find_window(window).operands(source.size)
    result = check_parity(source, out, operands, "sandbox", tmp_path)
    assert result.window is not None
    tool = INFO_TOOL[out]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    size = len(result.window)
    assert media_size(tool, result.ours) == media_size(tool, result.theirs) == size
    assert_libyal_reads(out, result.ours, result.theirs, result.window, tmp_path)


@pytest.mark.parametrize(("name", "window", "out"), READER_CASES)
def test_independent_readers(
    corpus: Corpus, tmp_path: Path, name: str, window: str, out: str
) -> None:
    reader_case(corpus, tmp_path, name, window, out)


def descriptor(path: Path) -> dict[str, str]:
    """The embedded descriptor of a monolithicSparse vmdk, as key -> value, the extent
    line under 'extent'."""
    data = path.read_bytes()
    offset = int.from_bytes(data[28:36], "little") * 512
    length = int.from_bytes(data[36:44], "little") * 512
    text = data[offset : offset + length].split(b"\0")[0].decode()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith(("RW ", "RDONLY ", "NOACCESS ")):
            fields["extent"] = line
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            fields[key.strip()] = value.strip()
    return fields


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_vmdk_descriptor_matches_qemu(tmp_path: Path, isolation: str) -> None:
    """The embedded descriptor as qemu writes it (docs/formats.md#vmdk-1): every line but
    the CID."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    source_path = tmp_path / "in" / "in.raw"
    source_path.write_bytes(pattern(100_000, 9))
    source = Source("in", source_path, None, 100_352)
    operands = ["bs=1000", "skip=1", "count=50"]
    result = check_parity(source, "vmdk", operands, isolation, tmp_path / "out")
    ours, theirs = descriptor(result.ours), descriptor(result.theirs)
    ours.pop("CID")
    theirs.pop("CID")
    assert ours.pop("extent") == 'RW 96 SPARSE "ours.vmdk"'
    assert theirs.pop("extent") == 'RW 96 SPARSE "theirs.vmdk"'
    assert ours == theirs


@pytest.mark.parametrize(
    ("name", "isolation"),
    [
        ("disk.vmdk", "inline"),
        ("disk with spaces.vmdk", "sandbox"),
        ("\u00e9t\u00e9.vmdk", "inline"),
        ('say "hi".vmdk', "sandbox"),
    ],
)
def test_vmdk_extent_is_named_after_the_output(tmp_path: Path, name: str, isolation: str) -> None:
    """qemu-img dd -O vmdk of=DIR/NAME names the extent NAME in the embedded descriptor;
    VMware and libvmdk open the extent by that name."""
    source = tmp_path / "in.raw"
    source.write_bytes(pattern(70_000, 10))
    ours_dir, theirs_dir = tmp_path / "a", tmp_path / "b"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    ours, theirs = ours_dir / name, theirs_dir / name
    mine, qemu = run_all(
        aiodd_command(isolation, ["-O", "vmdk"], [f"if={source}", f"of={ours}"]),
        ["qemu-img", "dd", "-O", "vmdk", f"if={source}", f"of={theirs}"],
    )
    assert mine.status == qemu.status == 0
    assert descriptor(theirs)["extent"] == f'RW 137 SPARSE "{name}"'
    assert descriptor(ours)["extent"] == f'RW 137 SPARSE "{name}"'
    window = source.read_bytes() + bytes(-70_000 % 512)
    assert_libyal_reads("vmdk", ours, theirs, window, tmp_path)


# --- VHD sizes (docs/window.md's geometry table) and the formats' size limits, end to end ---

VPC_TABLE = [1, 34_816, 34_817, 69_632, 99_999, 1_000_448, MiB, 10 * MiB]


@pytest.fixture(scope="module")
def ten_mib(tmp_path_factory: pytest.TempPathFactory) -> Source:
    path = tmp_path_factory.mktemp("ten-mib") / "in.raw"
    path.write_bytes(pattern(10 * MiB, 11))
    return Source(path.name, path, None, 10 * MiB)


@pytest.mark.parametrize("out", VPC_TABLE)
def test_vpc_chs_sizes(ten_mib: Source, tmp_path: Path, out: int) -> None:
    """-O vpc of an ``out``-byte window: the CHS-rounded virtual size qemu-img gives."""
    isolation = ISOLATIONS[VPC_TABLE.index(out) % 2]
    result = check_parity(ten_mib, "vpc", [f"bs={out}", "count=1"], isolation, tmp_path)
    assert result.window is not None
    assert result.window[:out] == ten_mib.path.read_bytes()[:out]


@pytest.mark.parametrize(
    ("fmt", "size"),
    [("vpc", "2041G"), ("vhdx", "65T")],
    ids=["vpc-over-2040G", "vhdx-over-64T"],
)
def test_window_too_large_for_the_format(tmp_path: Path, fmt: str, size: str) -> None:
    """A window larger than the format can hold: exit 1 at once, like qemu-img (which
    fails creating its output), and no file left."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    image = tmp_path / "in" / "huge.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), size], check=True)
    source = Source(image.name, image, None, 0)
    isolation = "sandbox" if fmt == "vpc" else "inline"
    started = time.monotonic()
    result = check_parity(source, fmt, [], isolation, tmp_path / "out")
    assert result.status == 1
    assert time.monotonic() - started < 60  # refused up front, not after copying
