"""Progress events, for embedders (``on_progress``) and the terminal renderers.

A callback that raises fails the copy: the output is removed as for any other error,
and ``dd`` raises :class:`~aiodd.errors.StageError` with ``stage == "progress"`` and the
callback's exception as ``cause``, whether it raised on the first event or on a later
one.  The callback is the caller's code, so its failure is the
caller's to see; the CLI's renderers never raise (a broken progress stream only
silences them, see aiodd/terminal.py).  Cancellation (a ``BaseException``) passes
through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiodd._typing_names import NamedTuple
from aiodd.errors import StageError


class Progress(NamedTuple):
    """A snapshot of a running copy.  ``total_bytes`` is the output's data length
    (the window plus the zero tail up to the output's virtual size).  ``isolation`` and
    ``isolation_reason`` say where the input is decoded and why, as
    :class:`~aiodd.api.DdResult` does."""

    bytes_done: int
    total_bytes: int
    elapsed: float  # seconds since the copy started
    isolation: str = ""
    isolation_reason: str = ""

    @property
    def percent(self) -> float:
        return 100.0 if self.total_bytes == 0 else 100.0 * self.bytes_done / self.total_bytes

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.bytes_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def finished(self) -> bool:
        return self.bytes_done >= self.total_bytes


ProgressCallback = Callable[[Progress], object]


class ProgressMeter:
    """Counts bytes written and reports to a callback, at most every ``interval`` seconds
    (and always at the start and the end), so a fast copy does not drown its observer."""

    def __init__(
        self,
        total: int,
        callback: ProgressCallback | None,
        interval: float = 0.1,
        isolation: tuple[str, str] = ("", ""),
    ) -> None:
        self.total = total
        self.done = 0
        self._callback = callback
        self._interval = interval
        self._isolation = isolation
        self._start = time.monotonic()
        self._last = float("-inf")
        self._started = False

    def start(self) -> None:
        """The first event; once only, as a copy may hand its rest to a second pass."""
        if self._started:
            return
        self._started = True
        self._start = time.monotonic()
        self._emit(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._emit(force=self.done >= self.total)

    def snapshot(self) -> Progress:
        return Progress(self.done, self.total, time.monotonic() - self._start, *self._isolation)

    def _emit(self, force: bool) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        if force or now - self._last >= self._interval:
            self._last = now
            try:
                self._callback(Progress(self.done, self.total, now - self._start, *self._isolation))
            except Exception as exc:
                # Wrapped here, not by the sink stage, so that the first event (sent
                # before the stages start) fails the same way as the later ones.
                raise StageError("progress", exc) from exc
