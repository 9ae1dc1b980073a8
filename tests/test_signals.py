"""Every way a copy can end: SIGINT, SIGTERM and SIGHUP at each stage, SIGKILL, a full disk.

The promises checked are docs/usage.md's "What aiodd guarantees about your files": one
line on stderr, exit status 128+signal, no file left in of='s directory (not even a
hidden one), an existing of= untouched, and no guest reader left running.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import aiodd
from aiodd import chain
from aiodd.cli import main
from aiodd.stages import sink
from aiodd.stages.sink import OutputFile
from tests.conftest import needs_kvm
from tests.harness import terminal_signals

MiB = 1024 * 1024
ROOT = str(Path(aiodd.__file__).resolve().parents[1])
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.fixture(autouse=True)
def _signals_as_from_a_terminal() -> Iterator[None]:
    """Every case here signals the command it starts (tests/harness.py says why)."""
    with terminal_signals():
        yield


PRECIOUS = b"precious, and not to be touched\n" * 100


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _guests() -> set[int]:
    """Guest readers started from this checkout (other checkouts may be running theirs)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"aiodd.guest.child" in arg for arg in cmdline) and any(
            ROOT.encode() in arg for arg in cmdline
        ):
            found.add(int(entry.name))
    return found


def _expected_line(signum: int) -> str:
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    return f"aiodd: interrupted{by}; no output was written\n"


def _catches(pid: int, signum: int) -> bool:
    """Whether ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signum - 1) & 1)


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A big sparse input, and an output directory holding an existing of=."""
    src = tmp_path / "in" / "big.raw"
    src.parent.mkdir()
    with src.open("wb") as f:
        f.truncate(64 << 30)  # reads fast and never finishes before the signal
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.raw"
    out.write_bytes(PRECIOUS)
    return src, out_dir, out


def _start(
    args: list[str], preexec_fn: Callable[[], object] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aiodd", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def _check_clean_end(
    proc: subprocess.Popen[str], signum: int, out_dir: Path, out: Path, before: set[int]
) -> list[str]:
    """Wait for ``proc``; check what it left; return its stderr lines."""
    assert proc.stderr is not None
    with proc.stderr:
        stderr = proc.stderr.read()
    status = proc.wait(timeout=60)
    lines = stderr.splitlines(keepends=True)
    assert status == 128 + signum, stderr
    assert lines[-1] == _expected_line(signum), stderr
    assert _names(out_dir) == {"o.raw"}
    assert out.read_bytes() == PRECIOUS
    assert _guests() <= before  # the guest reader was stopped and reaped
    return lines


@pytest.mark.parametrize("isolation", ["sandbox", "inline", pytest.param("kvm", marks=needs_kvm)])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_mid_data_removes_everything(
    work: tuple[Path, Path, Path], signum: int, isolation: str
) -> None:
    src, out_dir, out = work
    before = _guests()
    proc = _start([f"--isolation={isolation}", "--progress=json", f"if={src}", f"of={out}"])
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        assert line, "aiodd ended before copying anything"
        if line.startswith("{") and json.loads(line)["bytes_done"] > 0:
            break
    # The data is being written, to a file that has no name yet.
    fds = Path(f"/proc/{proc.pid}/fd")
    targets = [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]
    assert any(t.startswith(f"{out_dir}/#") and t.endswith(" (deleted)") for t in targets)
    assert _names(out_dir) == {"o.raw"}
    proc.send_signal(signum)
    lines = _check_clean_end(proc, signum, out_dir, out, before)
    assert all(line.startswith("{") for line in lines[:-1])  # progress, then one line


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_during_start_up_and_opening(
    work: tuple[Path, Path, Path], signum: int, delay: float
) -> None:
    """From the moment the handlers are in place: start-up, the guest's start, the
    open, the first data (the delays spread the signal over them)."""
    src, out_dir, out = work
    before = _guests()
    proc = _start([f"if={src}", f"of={out}"])
    deadline = time.monotonic() + 30
    while not _catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signum)
    lines = _check_clean_end(proc, signum, out_dir, out, before)
    assert len(lines) == 1


def test_sigkill_mid_copy_leaves_no_file(work: tuple[Path, Path, Path]) -> None:
    src, out_dir, out = work
    proc = _start(["--isolation=inline", "--progress=json", f"if={src}", f"of={out}"])
    assert proc.stderr is not None
    while json.loads(proc.stderr.readline())["bytes_done"] == 0:
        pass
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()
    assert _names(out_dir) == {"o.raw"}  # the unnamed file died with the process
    assert out.read_bytes() == PRECIOUS


def test_nohup_keeps_sighup_ignored(tmp_path: Path) -> None:
    """An ignored SIGHUP (nohup, a shell's background job) stays ignored."""
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(MiB))
    out = tmp_path / "o.raw"
    proc = _start(
        [f"if={src}", f"of={out}"],
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    deadline = time.monotonic() + 30
    while not _catches(proc.pid, signal.SIGTERM) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert not _catches(proc.pid, signal.SIGHUP) or proc.poll() is not None
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGHUP)
    assert proc.stderr is not None
    with proc.stderr:
        assert (proc.wait(timeout=60), proc.stderr.read()) == (0, "")
    assert out.read_bytes() == src.read_bytes()


# -- the final flush and the commit, in this process ---------------------------------


def _main(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(args)
    return status, err.getvalue()


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Path, Path, bytes]:
    data = os.urandom(9 * MiB + 512)  # three buffers of the copy threads, and a bit
    src = tmp_path / "in.raw"
    src.write_bytes(data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.raw"
    out.write_bytes(PRECIOUS)
    return src, out_dir, out, data


# The whole input through the copy threads (aiodd.pipeline.threads), which have no event
# loop; three MiB of it, one buffer, in the calling thread alone; the whole input with
# holes asked for, through the pipeline on its event loop.
WINDOWS = {"threads": [], "one buffer": ["bs=1M", "count=3"], "pipeline": ["--sparse"]}


def _signal_self(signum: int) -> None:
    """Send ``signum`` to this process and give its handler time to run."""
    os.kill(os.getpid(), signum)
    time.sleep(0.2)


def _wrap(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, before: Callable[[], None]
) -> None:
    real = getattr(owner, name)

    def wrapped(*args: object, **kwargs: object) -> object:
        before()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("isolation", ["sandbox", "inline"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_during_the_final_flush_undoes_the_copy(
    small: tuple[Path, Path, Path, bytes],
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    isolation: str,
    window: str,
) -> None:
    """The flush under way finishes (the kernel does not stop it); nothing is put in place."""
    src, out_dir, out, _data = small
    real_fsync = os.fsync
    calls: list[int] = []

    def fsync(fd: int) -> None:
        if not calls:
            _signal_self(signum)  # the signal comes while the data is being flushed
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    before = _guests()
    status, stderr = _main([f"--isolation={isolation}", f"if={src}", f"of={out}", *WINDOWS[window]])
    assert (status, stderr) == (128 + signum, _expected_line(signum))
    assert len(calls) == 1  # the file's flush, and no directory sync after it
    assert _names(out_dir) == {"o.raw"}
    assert out.read_bytes() == PRECIOUS
    assert _guests() <= before


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("stage", ["mid-data", "final flush"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_without_o_tmpfile_the_hidden_file_is_removed(
    small: tuple[Path, Path, Path, bytes],
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    stage: str,
    window: str,
) -> None:
    """The named fallback: the hidden file exists while the copy runs, and goes."""
    src, out_dir, out, _data = small
    monkeypatch.setattr(sink, "_open_unnamed", lambda directory: None)
    seen: list[set[str]] = []

    def signal_now() -> None:
        if not seen:
            seen.append(_names(out_dir))
            _signal_self(signum)

    if stage == "mid-data":
        _wrap(monkeypatch, OutputFile, "write", signal_now)
    else:
        _wrap(monkeypatch, os, "fsync", signal_now)
    status, stderr = _main(["--isolation=inline", f"if={src}", f"of={out}", *WINDOWS[window]])
    assert (status, stderr) == (128 + signum, _expected_line(signum))
    (hidden,) = seen[0] - {"o.raw"}
    assert hidden.startswith(".o.raw.") and hidden.endswith(".aiodd-tmp")
    assert _names(out_dir) == {"o.raw"}
    assert out.read_bytes() == PRECIOUS


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("when", ["while linking", "after linking"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_once_the_output_is_being_put_in_place_lets_it_finish(
    small: tuple[Path, Path, Path, bytes],
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    when: str,
    window: str,
) -> None:
    src, out_dir, out, data = small
    real_publish = OutputFile.publish

    def publish(self: OutputFile) -> None:
        if when == "while linking":
            _signal_self(signum)
        real_publish(self)
        if when == "after linking":
            _signal_self(signum)

    monkeypatch.setattr(OutputFile, "publish", publish)
    status, stderr = _main(["--isolation=inline", f"if={src}", f"of={out}", *WINDOWS[window]])
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    assert (status, stderr) == (
        128 + signum,
        f"aiodd: interrupted{by} after the copy had finished; {out} is complete\n",
    )
    assert _names(out_dir) == {"o.raw"}
    assert out.read_bytes() == (data[: 3 * MiB] if window == "one buffer" else data)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_guest_opens_the_input_closes_it(
    small: tuple[Path, Path, Path, bytes],
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    window: str,
) -> None:
    src, out_dir, out, _data = small
    guests: list[int] = []
    real_open = chain.open_input

    def open_input(*args: object, **kwargs: object) -> object:
        _signal_self(signum)
        disk = real_open(*args, **kwargs)  # type: ignore[arg-type]
        guests.append(disk.pid)  # type: ignore[attr-defined]
        return disk

    monkeypatch.setattr(chain, "open_input", open_input)
    status, stderr = _main(["--isolation=sandbox", f"if={src}", f"of={out}", *WINDOWS[window]])
    assert (status, stderr) == (128 + signum, _expected_line(signum))
    assert not Path(f"/proc/{guests[0]}").exists()
    assert _names(out_dir) == {"o.raw"}
    assert out.read_bytes() == PRECIOUS


def test_handlers_are_restored_after_main(small: tuple[Path, Path, Path, bytes]) -> None:
    src, _out_dir, out, _data = small
    before = {s: signal.getsignal(s) for s in SIGNALS}
    assert _main(["--isolation=inline", f"if={src}", f"of={out}"]) == (0, "")
    assert {s: signal.getsignal(s) for s in SIGNALS} == before


def test_main_outside_the_main_thread_still_copies(
    small: tuple[Path, Path, Path, bytes],
) -> None:
    """signal.signal() works only in the main thread: main() then leaves signals alone."""
    src, _out_dir, out, data = small
    results: list[tuple[int, str]] = []
    thread = threading.Thread(
        target=lambda: results.append(_main(["--isolation=inline", f"if={src}", f"of={out}"]))
    )
    thread.start()
    thread.join(60)
    assert results == [(0, "")]
    assert out.read_bytes() == data


# -- a full disk -------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount an 8 MiB tmpfs (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("isolation", ["sandbox", "inline"])
def test_a_full_disk_is_one_line_naming_of_as_typed(
    small_tmpfs: Path, tmp_path: Path, isolation: str
) -> None:
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(12 * MiB))
    existing = small_tmpfs / "old.raw"
    existing.write_bytes(os.urandom(MiB))
    digest = _digest(existing)
    for of in ("out.raw", "old.raw"):
        proc = subprocess.run(
            [sys.executable, "-m", "aiodd", f"--isolation={isolation}", f"if={src}", f"of={of}"],
            cwd=small_tmpfs,
            capture_output=True,
            text=True,
        )
        assert (proc.returncode, proc.stderr) == (
            1,
            f"aiodd: {of}: write failed: No space left on device\n",
        )
        assert _names(small_tmpfs) == {"old.raw"}
        assert _digest(existing) == digest
    assert shutil.disk_usage(small_tmpfs).used <= 2 * MiB  # the partial output was freed


# -- an unprivileged user ---------------------------------------------------------------

NOBODY = 65534


@dataclass
class Nobody:
    """How to run this checkout as uid 65534, in a directory it may write."""

    directory: Path
    python: str
    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        return [*_as_nobody(), self.python, "-m", "aiodd", *args]


def _as_nobody() -> list[str]:
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all",
    ]


@pytest.fixture
def nobody() -> Iterator[Nobody]:
    """The test interpreter may live where uid 65534 cannot reach it (a pyenv under
    /root): then a system interpreter of the same version runs this checkout, with
    its packages on PYTHONPATH.  The guest reader is started with sys.executable, so
    the probe starts one too."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run aiodd as another user")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([ROOT, sysconfig.get_paths()["purelib"]]),
        "AIODD_NO_UVLOOP": os.environ.get("AIODD_NO_UVLOOP", ""),
    }
    probe_code = (
        "import subprocess, sys, anyio, aiodd.cli;"
        " subprocess.run([sys.executable, '-c', ''], check=True)"
    )
    directory = Path(tempfile.mkdtemp(prefix="aiodd-nobody-"))
    try:
        os.chmod(directory, 0o777)
        reasons = []
        for python in dict.fromkeys(candidates):
            if not os.path.exists(python):
                continue
            probe = subprocess.run(
                [*_as_nobody(), python, "-c", probe_code],
                capture_output=True,
                text=True,
                cwd=directory,
                env=env,
            )
            if probe.returncode == 0:
                break
            reasons.append(f"{python}: {probe.stderr.strip().splitlines()[-1:]}")
        else:
            pytest.skip(f"uid {NOBODY} cannot run this checkout: {'; '.join(reasons)}")
        yield Nobody(directory, python, env)
    finally:
        shutil.rmtree(directory)


@pytest.mark.parametrize("isolation", ["sandbox", "inline"])
def test_an_unprivileged_user_gets_the_same_behaviour(nobody: Nobody, isolation: str) -> None:
    nobody_dir = nobody.directory
    src = nobody_dir / "in.raw"
    data = os.urandom(2 * MiB)
    src.write_bytes(data)
    src.chmod(0o644)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            nobody.command(f"--isolation={isolation}", *args),
            capture_output=True,
            text=True,
            cwd=nobody_dir,
            env=nobody.env,
        )

    def errors(stderr: str) -> list[str]:
        # Running as nobody, the sandbox may miss layers: one warning line each, today.
        # Warnings about the output itself are kept: they are part of the behaviour.
        return [
            line
            for line in stderr.splitlines()
            if not line.startswith("{")  # progress records
            and (line.startswith("aiodd: warning: of=") or not line.startswith("aiodd: warning:"))
        ]

    # A copy.
    copied = run("if=in.raw", "of=new.raw")
    assert copied.returncode == 0, copied.stderr
    assert errors(copied.stderr) == []
    assert (nobody_dir / "new.raw").read_bytes() == data
    assert (nobody_dir / "new.raw").stat().st_uid == NOBODY

    # Overwriting root's file that nobody may write: the owner cannot be kept.
    theirs = nobody_dir / "theirs.raw"
    theirs.write_bytes(PRECIOUS)
    theirs.chmod(0o666)
    overwrite = run("if=in.raw", "of=theirs.raw")
    assert overwrite.returncode == 0, overwrite.stderr
    assert errors(overwrite.stderr) == [
        "aiodd: warning: of=theirs.raw: could not keep the owner (uid 0, gid 0): Operation not"
        f" permitted; the new file belongs to uid {NOBODY}, gid {NOBODY}"
    ]
    st = theirs.stat()
    assert (st.st_uid, st.st_mode & 0o7777, theirs.read_bytes()) == (NOBODY, 0o666, data)

    # A file it may not write is refused, as qemu-img refuses it.
    locked = nobody_dir / "locked.raw"
    locked.write_bytes(PRECIOUS)
    locked.chmod(0o644)
    refused = run("if=in.raw", "of=locked.raw")
    assert (refused.returncode, errors(refused.stderr)) == (
        1,
        ["aiodd: locked.raw: cannot create output: Permission denied"],
    )
    assert locked.read_bytes() == PRECIOUS

    # SIGTERM mid-copy.
    big = nobody_dir / "big.raw"
    with big.open("wb") as f:
        f.truncate(64 << 30)
    big.chmod(0o644)
    before = _guests()
    proc = subprocess.Popen(
        nobody.command(f"--isolation={isolation}", "--progress=json", "if=big.raw", "of=new.raw"),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=nobody_dir,
        env=nobody.env,
    )
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        assert line, "aiodd ended before copying anything"
        if line.startswith("{") and json.loads(line)["bytes_done"] > 0:
            break
    names = _names(nobody_dir)
    proc.send_signal(signal.SIGTERM)
    with proc.stderr:
        rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert errors(rest) == [_expected_line(signal.SIGTERM).rstrip("\n")]
    assert _names(nobody_dir) == names
    assert (nobody_dir / "new.raw").read_bytes() == data
    assert _guests() <= before
