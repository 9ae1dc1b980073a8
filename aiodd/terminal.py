"""Progress rendered for people (``-p``, ``--progress=bar``) and for programs
(``--progress=json``).

Progress is a side show: a progress stream that breaks (a pipe whose reader went away,
a terminal that vanished, a file closed under us) silences the renderer and the copy
goes on to its normal end and exit status.  The formatting functions are pure; the
renderers only decide when to write what.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
from collections.abc import Callable

from aiodd.progress import Progress

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: int | float) -> str:
    """``n`` bytes in IEC units with one decimal (``1.5 MiB``); below 1 KiB, whole bytes."""
    if round(n) < 1024:
        return f"{max(0, round(n))} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        # Pick the unit only if the rounded figure stays below 1024 ("1024.0 KiB" is
        # "1.0 MiB"); the last unit takes whatever is left.
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float) -> str:
    return format_size(bytes_per_second) + "/s"


def format_clock(seconds: float) -> str:
    """``H:MM:SS``, rounded to the second; hours grow past 99 rather than wrap."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_elapsed(seconds: float) -> str:
    """A short copy in seconds with hundredths (``0.87 s``), a long one as a clock."""
    return f"{seconds:.2f} s" if seconds < 60 else format_clock(seconds)


def eta(progress: Progress) -> float | None:
    """Seconds left at the average rate so far; ``None`` while there is no rate yet."""
    if progress.finished:
        return 0.0
    rate = progress.rate
    if rate <= 0:
        return None
    return (progress.total_bytes - progress.bytes_done) / rate


def format_percent(progress: Progress) -> str:
    """One decimal, rounded down: ``100.0%`` only once every byte is written."""
    if progress.finished:
        return "100.0%"
    return f"{math.floor(progress.percent * 10) / 10:.1f}%"


def bar_line(progress: Progress) -> str:
    """``  512.0 MiB / 1.0 GiB   50.0%    1.2 GiB/s  elapsed 0:00:01  ETA 0:00:01``."""
    left = eta(progress)
    return (
        f"{format_size(progress.bytes_done):>10} / {format_size(progress.total_bytes)}"
        f"  {format_percent(progress):>6}"
        f"  {format_rate(progress.rate):>12}"
        f"  elapsed {format_clock(progress.elapsed)}"
        f"  ETA {'-:--:--' if left is None else format_clock(math.ceil(left))}"
    )


def final_line(bytes_done: int, elapsed: float) -> str:
    """The summary once the output is in place, like dd's last line."""
    rate = bytes_done / elapsed if elapsed > 0 else 0.0
    return (
        f"{format_size(bytes_done)} ({bytes_done} bytes) copied"
        f" in {format_elapsed(elapsed)}, {format_rate(rate)}"
    )


def _silence(stream: TextIO) -> None:
    """Point the stream's descriptor at /dev/null.

    Its buffer still holds what could not be written; without this, the interpreter's
    final flush fails again and prints "Exception ignored ... BrokenPipeError" (the
    recipe of the Python docs' "Note on SIGPIPE").  Later lines on the same stream (an
    error or a warning on stderr) are lost either way; this makes them harmless.
    """
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return  # not a real file (a StringIO): nothing is flushed at exit
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


class QuietStream:
    """Writes to ``stream`` until the first failure, then nothing, silently."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            # OSError: EPIPE, EIO from a hung-up terminal, ENOSPC...; ValueError: the
            # file was closed.  None of them is a reason to fail the copy.
            self.broken = True
            _silence(self._stream)

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False


def write_quietly(stream: TextIO, text: str) -> None:
    """One write that may not fail (the CLI's lines after a successful copy)."""
    QuietStream(stream).write(text)


def write_or_raise(stream: TextIO | None, text: str) -> None:
    """One write whose failure the caller reports (the checksum line): raises OSError,
    after pointing the stream at /dev/null so the interpreter's exit stays quiet.  A
    stream Python could not open (``sys.stdout`` is None when descriptor 1 was closed)
    is a bad descriptor."""
    if stream is None:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError) as exc:
        _silence(stream)
        if isinstance(exc, OSError):
            raise
        raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None


class PercentRenderer:
    """qemu-img convert's ``-p`` line: ``    (xx.xx/100%)``, redrawn with ``\\r``.

    Like qemu, it writes the same bytes whether or not the stream is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._out = QuietStream(stream)
        self._last = ""
        self._closed = False

    def __call__(self, progress: Progress) -> None:
        text = f"    ({progress.percent:.2f}/100%)"
        if text != self._last:
            self._last = text
            self._out.write(text + "\r")

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        if self._last and not self._closed:
            self._out.write("\n")
        self._closed = True


class BarRenderer:
    """``--progress=bar``: sizes, percent, rate, elapsed and ETA for people.

    On a terminal the line is redrawn in place (``\\r``, then padding over what the
    previous line left); elsewhere (a log file, a pipe) one full line at most every
    ``interval`` seconds, as ``dd status=progress`` does.  :meth:`finish` writes the
    summary once the output is in place.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = QuietStream(stream)
        self._tty = self._out.isatty() if tty is None else tty
        self._interval = interval
        self._clock = clock
        self._started: float | None = None  # on the clock, when the copy started
        self._last: Progress | None = None
        self._drawn = ""  # the terminal line as it stands
        self._printed_at = 0.0  # elapsed time of the last full line (not a terminal)
        self._closed = False

    def __call__(self, progress: Progress) -> None:
        if self._started is None:
            self._started = self._clock() - progress.elapsed
        self._last = progress
        if self._tty:
            self._redraw(bar_line(progress))
        elif not progress.finished and progress.elapsed - self._printed_at >= self._interval:
            # The finished event is left to finish(), whose line has the true totals.
            self._printed_at = progress.elapsed
            self._out.write(bar_line(progress) + "\n")

    def _redraw(self, text: str) -> None:
        if text == self._drawn:
            return
        padding = " " * max(0, len(self._drawn) - len(text))
        self._out.write("\r" + text + padding)
        self._drawn = text

    def finish(self) -> None:
        """The copy succeeded: the totals and the average rate, on a line of their own."""
        if self._closed or self._last is None or self._started is None:
            self.close()
            return
        text = final_line(self._last.bytes_done, self._clock() - self._started)
        if self._tty:
            self._redraw(text)
            self._out.write("\n")
        else:
            self._out.write(text + "\n")
        self._closed = True

    def close(self) -> None:
        """The copy ended (either way): leave the cursor at the start of a fresh line."""
        if self._tty and self._drawn and not self._closed:
            self._out.write("\n")
        self._closed = True


class JsonRenderer:
    """One JSON object per line, for programs that drive aiodd.

    Every record has ``"done": false`` except the last one of a successful copy, written
    once the output is in place, which has ``"done": true`` and the final totals (and the
    checksum, when one was asked for).  The first record and the last say where the
    input is decoded and why (``isolation``, ``isolation_reason``).
    """

    def __init__(self, stream: TextIO, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = QuietStream(stream)
        self._clock = clock
        self._started: float | None = None
        self._last: Progress | None = None
        self._closed = False

    @staticmethod
    def record(
        progress: Progress, done: bool = False, isolation: bool = False, checksum: str | None = None
    ) -> str:
        fields: dict[str, object] = {
            "bytes_done": progress.bytes_done,
            "total_bytes": progress.total_bytes,
            "percent": round(progress.percent, 2),
            "rate": round(progress.rate),
            "elapsed": round(progress.elapsed, 3),
            "done": done,
        }
        if isolation:
            fields["isolation"] = progress.isolation
            fields["isolation_reason"] = progress.isolation_reason
        if checksum is not None:
            fields["checksum"] = checksum
        import json  # here: a copy without JSON progress (most) never needs it

        return json.dumps(fields)

    def __call__(self, progress: Progress) -> None:
        first = self._started is None
        if self._started is None:
            self._started = self._clock() - progress.elapsed
        self._last = progress
        self._out.write(self.record(progress, isolation=first) + "\n")

    def finish(self, checksum: str | None = None) -> None:
        """The done record; with ``--checksum``, it has ``"checksum": "ALGO:HEX"``."""
        if not self._closed and self._last is not None and self._started is not None:
            last = self._last
            final = Progress(
                last.bytes_done,
                last.total_bytes,
                self._clock() - self._started,
                last.isolation,
                last.isolation_reason,
            )
            self._out.write(self.record(final, done=True, isolation=True, checksum=checksum) + "\n")
        self._closed = True

    def close(self) -> None:
        self._closed = True


Renderer = PercentRenderer | BarRenderer | JsonRenderer
