"""Progress: the pure formatting, the renderers, and the rule that a broken progress
stream never fails the copy (docs/usage.md, "Progress")."""

from __future__ import annotations

import errno
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

import aiodd
from aiodd.errors import StageError
from aiodd.progress import Progress
from aiodd.terminal import (
    BarRenderer,
    JsonRenderer,
    PercentRenderer,
    QuietStream,
    bar_line,
    eta,
    final_line,
    format_clock,
    format_elapsed,
    format_percent,
    format_size,
    write_quietly,
)

MiB, GiB = 1 << 20, 1 << 30
_FACTORS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_FACTORS |= {"TiB": 1 << 40, "PiB": 1 << 50, "EiB": 1 << 60}


# --- sizes, durations, ETA: pure functions -----------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024 * 1023 + 900, "1023.9 KiB"),
        (1024 * 1024 - 1, "1.0 MiB"),  # not "1024.0 KiB"
        (512 * MiB, "512.0 MiB"),
        (GiB, "1.0 GiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (1 << 60, "1.0 EiB"),
        (1 << 70, "1024.0 EiB"),  # the last unit takes what is left
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def _parse_size(text: str) -> tuple[float, str]:
    number, unit = text.split(" ")
    return float(number), unit


@given(st.integers(min_value=0, max_value=2**63))
def test_format_size_is_close_and_below_1024_of_its_unit(n: int) -> None:
    number, unit = _parse_size(format_size(n))
    factor = _FACTORS[unit]
    if unit == "B":
        assert number == n
    else:
        assert 1.0 <= number < 1024
        assert abs(number * factor - n) <= 0.05 * factor * (1 + 1e-9)  # half a tenth


@given(st.integers(min_value=0, max_value=2**62), st.integers(min_value=0, max_value=2**62))
def test_format_size_is_monotonic(a: int, b: int) -> None:
    low, high = sorted((a, b))
    (x, xu), (y, yu) = _parse_size(format_size(low)), _parse_size(format_size(high))
    assert x * _FACTORS[xu] <= y * _FACTORS[yu]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0:00:00"),
        (0.4, "0:00:00"),
        (59.4, "0:00:59"),
        (59.6, "0:01:00"),
        (61, "0:01:01"),
        (3600, "1:00:00"),
        (360_000, "100:00:00"),
    ],
)
def test_format_clock(seconds: float, text: str) -> None:
    assert format_clock(seconds) == text


@given(st.floats(min_value=0, max_value=1e9))
def test_format_clock_reads_back(seconds: float) -> None:
    hours, minutes, secs = (int(part) for part in format_clock(seconds).split(":"))
    assert minutes < 60 and secs < 60
    assert hours * 3600 + minutes * 60 + secs == round(seconds)


def test_format_elapsed() -> None:
    assert format_elapsed(0.866) == "0.87 s"
    assert format_elapsed(59.99) == "59.99 s"
    assert format_elapsed(3725.2) == "1:02:05"


def test_eta() -> None:
    assert eta(Progress(0, 100, 0.0)) is None  # no rate yet
    assert eta(Progress(0, 100, 5.0)) is None  # nothing copied: the rate is 0
    assert eta(Progress(50, 100, 1.0)) == 1.0
    assert eta(Progress(100, 100, 3.0)) == 0.0
    assert eta(Progress(0, 0, 0.0)) == 0.0  # an empty window is finished at once


@given(
    st.integers(min_value=1, max_value=2**50),
    st.integers(min_value=1, max_value=2**50),
    st.floats(min_value=1e-3, max_value=1e6),
)
def test_eta_finishes_the_rest_at_the_average_rate(done: int, total: int, elapsed: float) -> None:
    progress = Progress(min(done, total), total, elapsed)
    left = eta(progress)
    assert left is not None and left >= 0
    assert progress.bytes_done + left * progress.rate == pytest.approx(total, rel=1e-9)


@given(st.integers(min_value=0, max_value=2**50), st.integers(min_value=1, max_value=2**50))
def test_percent_says_100_only_when_finished(done: int, total: int) -> None:
    done = min(done, total)
    text = format_percent(Progress(done, total, 1.0))
    assert (text == "100.0%") == (done == total)
    assert float(text[:-1]) <= 100 * done / total


def test_bar_line() -> None:
    line = bar_line(Progress(512 * MiB, GiB, 0.4))
    assert line == " 512.0 MiB / 1.0 GiB   50.0%     1.2 GiB/s  elapsed 0:00:00  ETA 0:00:01"
    start = bar_line(Progress(0, GiB, 0.0))
    assert start == "       0 B / 1.0 GiB    0.0%         0 B/s  elapsed 0:00:00  ETA -:--:--"


def test_final_line() -> None:
    assert final_line(GiB, 0.87) == "1.0 GiB (1073741824 bytes) copied in 0.87 s, 1.1 GiB/s"
    assert final_line(0, 0.0) == "0 B (0 bytes) copied in 0.00 s, 0 B/s"


# --- the renderers, with a fake clock ----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _events(total: int, times: list[float]) -> Iterator[Progress]:
    """Evenly spread progress at the given elapsed times, the last one finished."""
    for i, t in enumerate(times):
        yield Progress(total * i // (len(times) - 1), total, t)


def test_bar_on_a_terminal_redraws_in_place() -> None:
    out, clock = io.StringIO(), Clock()
    bar = BarRenderer(out, tty=True, clock=clock)
    first = Progress(0, GiB, 0.0)
    bar(first)
    bar(first)  # the same text is not drawn twice
    second = Progress(GiB // 2, GiB, 0.5)
    bar(second)
    clock.now += 0.75
    bar.finish()
    bar.close()  # after finish: nothing more
    a, b = bar_line(first), bar_line(second)
    summary = final_line(GiB // 2, 0.75)
    assert len(a) == len(b) > len(summary)
    assert out.getvalue() == "\r" + a + "\r" + b + "\r" + summary.ljust(len(b)) + "\n"


def test_bar_on_a_terminal_pads_over_a_longer_line() -> None:
    out = io.StringIO()
    bar = BarRenderer(out, tty=True, clock=Clock())
    bar(Progress(1023 * MiB, 2 * GiB, 1.0))
    bar(Progress(2 * GiB, 2 * GiB, 100_000.0))  # a shorter rate, a longer clock
    long, short = (
        bar_line(Progress(1023 * MiB, 2 * GiB, 1.0)),
        bar_line(Progress(2 * GiB, 2 * GiB, 100_000.0)),
    )
    lines = out.getvalue().split("\r")[1:]
    assert lines[0] == long
    assert lines[1] == short.ljust(len(long))


def test_bar_elsewhere_prints_a_line_a_second_and_a_summary() -> None:
    out, clock = io.StringIO(), Clock()
    bar = BarRenderer(out, tty=False, clock=clock)
    events = list(_events(10 * MiB, [0.0, 0.3, 0.9, 1.0, 1.5, 1.99, 2.2, 3.0, 3.1]))
    for event in events:
        bar(event)
    clock.now += 3.25
    bar.finish()
    # 1.0 and 2.2; not 3.0 (0.8 s after 2.2), nor 3.1 (the end: the summary says it)
    expected = [bar_line(events[i]) for i in (3, 6)]
    expected.append(final_line(10 * MiB, 3.25))
    assert out.getvalue() == "".join(line + "\n" for line in expected)
    assert "\r" not in out.getvalue()


def test_bar_after_a_failure_ends_the_terminal_line_only() -> None:
    tty_out, log_out = io.StringIO(), io.StringIO()
    for out, tty in ((tty_out, True), (log_out, False)):
        bar = BarRenderer(out, tty=tty, clock=Clock())
        bar(Progress(0, GiB, 0.0))
        bar.close()
        bar.finish()  # too late: close() decided
    assert tty_out.getvalue() == "\r" + bar_line(Progress(0, GiB, 0.0)) + "\n"
    assert log_out.getvalue() == ""


def test_percent_renderer_is_qemus_line() -> None:
    out = io.StringIO()
    percent = PercentRenderer(out)
    for event in _events(3 * MiB, [0.0, 0.1, 0.2, 0.3]):
        percent(event)
    percent(Progress(3 * MiB, 3 * MiB, 0.4))  # same text: not repeated
    percent.finish()
    percent.close()
    assert out.getvalue() == (
        "    (0.00/100%)\r    (33.33/100%)\r    (66.67/100%)\r    (100.00/100%)\r\n"
    )


def test_json_renderer_ends_with_a_done_record() -> None:
    out, clock = io.StringIO(), Clock()
    renderer = JsonRenderer(out, clock=clock)
    mode = ("kvm", "auto: /dev/kvm available")
    for event in _events(4 * MiB, [0.0, 0.5, 1.0]):
        renderer(event._replace(isolation=mode[0], isolation_reason=mode[1]))
    clock.now += 1.25  # the commit (fsync, rename) took a quarter second more
    renderer.finish()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["done"] for r in records] == [False, False, False, True]
    assert records[-1] == {
        "bytes_done": 4 * MiB,
        "total_bytes": 4 * MiB,
        "percent": 100.0,
        "rate": round(4 * MiB / 1.25),
        "elapsed": 1.25,
        "done": True,
        "isolation": "kvm",
        "isolation_reason": "auto: /dev/kvm available",
    }
    # where the input is decoded is said once at the start and once at the end
    assert [(r.get("isolation"), r.get("isolation_reason")) for r in records] == [
        mode, (None, None), (None, None), mode,
    ]  # fmt: skip


def test_json_renderer_after_a_failure_has_no_done_record() -> None:
    out = io.StringIO()
    renderer = JsonRenderer(out, clock=Clock())
    renderer(Progress(0, MiB, 0.0))
    renderer.close()
    renderer.finish()
    assert [json.loads(line)["done"] for line in out.getvalue().splitlines()] == [False]


# --- broken streams -----------------------------------------------------------------


def test_a_closed_file_silences_the_renderers() -> None:
    for make in (PercentRenderer, BarRenderer, JsonRenderer):
        out = io.StringIO()
        out.close()  # write() now raises ValueError
        renderer = make(out)
        renderer(Progress(0, MiB, 0.0))
        renderer(Progress(MiB, MiB, 1.0))
        renderer.finish()
        renderer.close()
    write_quietly(out, "aiodd: a warning\n")


def test_a_broken_pipe_points_the_descriptor_at_dev_null() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as stream:
        quiet = QuietStream(stream)
        quiet.write("    (0.00/100%)\r")  # EPIPE (Python ignores SIGPIPE)
        assert quiet.broken
        assert os.readlink(f"/proc/self/fd/{write_end}") == os.devnull
        quiet.write("more")  # not even attempted
        stream.write("what the interpreter flushes at exit")
        stream.flush()  # no BrokenPipeError: it goes to /dev/null


def test_a_terminal_is_detected() -> None:
    primary, secondary = pty.openpty()
    read_end, write_end = os.pipe()
    try:
        with open(secondary, "w", closefd=False) as tty, open(write_end, "w") as pipe:
            assert QuietStream(tty).isatty()
            assert not QuietStream(pipe).isatty()
    finally:
        for fd in (primary, secondary, read_end):
            os.close(fd)


# --- the command line, as a subprocess ----------------------------------------------


@pytest.fixture
def big(tmp_path: Path) -> Path:
    """256 MiB that reads fast: a sparse file with some data at both ends."""
    path = tmp_path / "big.raw"
    with path.open("wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(256 * MiB - MiB)
        f.seek(0, os.SEEK_END)
        f.write(os.urandom(MiB))
    return path


def _aiodd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "aiodd", *(str(a) for a in args)]


def _same(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


@pytest.mark.parametrize("when", ["before", "after-first-update"])
def test_p_into_a_closed_pipe_finishes_the_copy(big: Path, tmp_path: Path, when: str) -> None:
    out = tmp_path / "o.raw"
    with subprocess.Popen(
        _aiodd("-p", f"if={big}", f"of={out}", "bs=1M"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        if when == "after-first-update":
            assert proc.stdout.read(16) == b"    (0.00/100%)\r"  # like `| head -c 16`
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert (proc.wait(timeout=120), stderr) == (0, b"")  # no "Broken pipe", no traceback
    assert _same(big, out)


@pytest.mark.parametrize("mode", ["json", "bar"])
@pytest.mark.parametrize("when", ["before", "after-first-update"])
def test_progress_into_a_closed_stderr_finishes_the_copy(
    big: Path, tmp_path: Path, mode: str, when: str
) -> None:
    out = tmp_path / "o.raw"
    with subprocess.Popen(
        _aiodd(f"--progress={mode}", f"if={big}", f"of={out}", "bs=1M"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        if when == "after-first-update" and mode == "json":
            assert json.loads(proc.stderr.readline())["bytes_done"] == 0
        proc.stderr.close()
        assert proc.stdout.read() == b""
        assert proc.wait(timeout=120) == 0
    assert _same(big, out)


def test_a_warning_into_a_closed_stderr_keeps_exit_status_0(tmp_path: Path) -> None:
    src = tmp_path / "small.raw"
    src.write_bytes(os.urandom(3000))
    out = tmp_path / "o.raw"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            _aiodd("--progress=json", f"if={src}", f"of={out}", "skip=7"),
            stderr=write_end,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0
    assert out.read_bytes() == b""  # skip past the end: an empty output, and a warning


def _read_all(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    """Everything the child writes to its terminal, until it exits."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            raise AssertionError("no output from aiodd for 60 s")
        try:
            chunk = os.read(fd, 65536)
        except OSError as exc:  # EIO: every copy of the terminal's other end is closed
            assert exc.errno == errno.EIO
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=60)
    return b"".join(chunks)


def test_bar_on_a_terminal_and_on_a_pipe(big: Path, tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    out = tmp_path / "tty.raw"
    proc = subprocess.Popen(
        _aiodd("--progress=bar", f"if={big}", f"of={out}", "bs=1M"),
        stderr=secondary,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    os.close(secondary)
    try:
        shown = _read_all(primary, proc).decode()
    finally:
        os.close(primary)
    assert proc.returncode == 0
    # The terminal turns "\n" into "\r\n".  Every update starts with "\r" on the same
    # line; one line in all, the summary.
    assert shown.startswith("\r" + bar_line(Progress(0, 256 * MiB, 0.0)))
    assert shown.count("\n") == 1 and shown.endswith("\r\n")
    last = shown[:-2].split("\r")[-1].rstrip(" ")
    assert re.fullmatch(
        r"256\.0 MiB \(268435456 bytes\) copied in \d+\.\d\d s, [\d.]+ [KMG]iB/s", last
    ), last

    out = tmp_path / "pipe.raw"
    piped = subprocess.run(
        _aiodd("--progress=bar", f"if={big}", f"of={out}", "bs=1M"),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert piped.returncode == 0 and piped.stdout == ""
    assert "\r" not in piped.stderr
    lines = piped.stderr.splitlines()
    assert re.fullmatch(
        r"256\.0 MiB \(268435456 bytes\) copied in \d+\.\d\d s, [\d.]+ [KMG]iB/s", lines[-1]
    )
    for line in lines[:-1]:  # an update a second, if the copy took that long
        assert re.fullmatch(r" *[\d.]+ [KMG]?i?B / 256\.0 MiB .* ETA \d+:\d\d:\d\d", line)


def test_a_vanished_terminal_does_not_fail_the_copy(big: Path, tmp_path: Path) -> None:
    """The terminal closes under a running copy: writes fail with EIO from then on."""
    primary, secondary = pty.openpty()
    out = tmp_path / "o.raw"
    proc = subprocess.Popen(
        _aiodd("--progress=bar", f"if={big}", f"of={out}", "bs=1M"),
        stderr=secondary,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # no SIGHUP to us or to it when the terminal goes
    )
    os.close(secondary)
    ready, _, _ = select.select([primary], [], [], 60)
    assert ready and os.read(primary, 1) == b"\r"  # the first update is out
    os.close(primary)
    assert proc.wait(timeout=120) == 0
    assert _same(big, out)


def test_json_ends_with_done_after_the_rename(big: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.raw"
    proc = subprocess.run(
        _aiodd("--progress=json", f"if={big}", f"of={out}", "bs=1M", "skip=1", "count=101"),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [r["done"] for r in records] == [False] * (len(records) - 1) + [True]
    last = records[-1]
    assert last["bytes_done"] == last["total_bytes"] == 100 * MiB
    assert last["percent"] == 100.0
    assert last["elapsed"] >= records[-2]["elapsed"]
    assert set(last) == {"bytes_done", "total_bytes", "percent", "rate", "elapsed", "done",
                         "isolation", "isolation_reason"}  # fmt: skip
    assert last["isolation"] == records[0]["isolation"] in ("kvm", "sandbox")
    assert last["isolation_reason"].startswith("auto: ")


def test_a_failed_copy_has_no_done_record_nor_summary(tmp_path: Path) -> None:
    src = tmp_path / "in.raw"
    src.write_bytes(b"\0" * 4096)
    for mode in ("json", "bar"):
        proc = subprocess.run(
            _aiodd(f"--progress={mode}", f"if={src}", f"of={tmp_path / 'no' / 'o.raw'}"),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        assert proc.returncode == 1
        assert 'done": true' not in proc.stderr and "copied" not in proc.stderr
        assert proc.stderr.splitlines()[-1].startswith("aiodd: ")


# --- a user's callback that raises -------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("isolation", ["sandbox", "inline"])
@pytest.mark.parametrize("on_event", [0, 2])
def test_a_raising_callback_fails_the_copy_the_same_way(
    tmp_path: Path, on_event: int, isolation: aiodd.Isolation
) -> None:
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(16 * MiB))
    dst = tmp_path / "o.raw"
    seen: list[Progress] = []

    def report(progress: Progress) -> None:
        seen.append(progress)
        if len(seen) > on_event:
            raise Boom("my callback failed")

    async def main() -> None:
        await aiodd.dd(
            src,
            dst,
            bs="1M",
            on_progress=report,
            progress_interval=0,
            io_size=MiB,
            isolation=isolation,
        )

    with pytest.raises(StageError) as info:
        anyio.run(main)
    assert info.value.stage == "progress"
    assert isinstance(info.value.cause, Boom)
    assert str(info.value) == "progress stage failed: my callback failed"
    assert len(seen) == on_event + 1
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if "aiodd-tmp" in p.name] == []
