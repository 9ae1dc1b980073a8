"""Running aiodd and qemu-img dd side by side."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from aiodd import chain
from aiodd.cli import main
from aiodd.formats.base import VirtualDisk


@dataclass
class Outcome:
    status: int
    stderr: str
    output: bytes | None  # None: no output file


def run_as_guest(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` in an interpreter started as the guest's is (``python -I -S``: no
    ``site``, whose imports would hide a module the guest does not import itself), on
    this interpreter's module search path."""
    paths = [p for p in sys.path if os.path.isabs(p)]
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; sys.path[:0] = sys.argv[1:]\n" + script,
         *paths],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def aiodd_run(args: list[str], output: Path) -> Outcome:
    """The CLI's main(), in this process (the same code path as the command)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(args)
    return Outcome(status, err.getvalue(), _read(output))


def aiodd_subprocess(args: list[str], output: Path) -> Outcome:
    proc = subprocess.run(
        [sys.executable, "-m", "aiodd", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    return Outcome(proc.returncode, proc.stderr, _read(output))


def qemu_dd(args: list[str], output: Path) -> Outcome:
    proc = subprocess.run(["qemu-img", "dd", *args], capture_output=True, text=True)
    return Outcome(proc.returncode, proc.stderr, _read(output))


def leftovers(directory: Path) -> list[str]:
    """Temporary files aiodd may have left behind."""
    return sorted(p.name for p in directory.iterdir() if "aiodd-tmp" in p.name)


def virtual_disk(path: Path, fmt: str) -> bytes:
    """The whole virtual disk of image ``path``, decoded inline."""
    return whole_disk(chain.open_input(str(path), fmt, isolation="inline"))


def whole_disk(disk: VirtualDisk) -> bytes:
    """Every byte of ``disk``, which is closed after."""
    try:
        data = bytearray(disk.virtual_size)
        disk.read_into(0, memoryview(data))
        return bytes(data)
    finally:
        disk.close()


@contextlib.contextmanager
def terminal_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP at their defaults, whatever this test run inherited,
    for the commands a test starts and signals: aiodd keeps an ignored signal ignored
    (nohup; tests/test_signals.py, test_nohup_keeps_sighup_ignored), so under ``nohup
    pytest``, or ``pytest &`` in a script (SIGINT ignored), a test's SIGINT would
    otherwise go unheard and the copy run on."""
    defaults: dict[int, Callable[[int, FrameType | None], object] | int] = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: signal.SIG_DFL,
        signal.SIGHUP: signal.SIG_DFL,
    }
    previous = {signum: signal.signal(signum, handler) for signum, handler in defaults.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
