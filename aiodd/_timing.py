"""``AIODD_TIMING=1``: where a run's start-up goes, one line per phase on stderr.

Each :func:`mark` ends a phase; :func:`report` prints them all at exit, with the
interpreter's own start-up first (the CPU time spent before this module was imported:
the interpreter is busy on one core until then).  docs/performance.md, "Start-up",
says how to read it.  Off, a mark costs one attribute test.
"""

from __future__ import annotations

import os
import sys
import time

ENABLED = bool(os.environ.get("AIODD_TIMING"))
_phases: list[tuple[str, float]] = []
_started = time.perf_counter()
_interpreter = time.process_time() if ENABLED else 0.0


def mark(phase: str) -> None:
    """The phase ``phase`` ends now."""
    if ENABLED:
        _phases.append((phase, time.perf_counter()))


def report(who: str = "aiodd") -> None:
    if not ENABLED:
        return
    lines = [f"{who}: timing: {'interpreter (CPU)':<26} {_interpreter * 1000:7.1f} ms"]
    last = _started
    for phase, at in _phases:
        lines.append(f"{who}: timing: {phase:<26} {(at - last) * 1000:7.1f} ms")
        last = at
    lines.append(
        f"{who}: timing: {'total after interpreter':<26} {(last - _started) * 1000:7.1f} ms"
    )
    try:
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
