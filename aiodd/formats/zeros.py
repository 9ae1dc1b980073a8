"""Zeroing a buffer in place: what every decoder does to holes, and the guest process
too, which imports this module and not :mod:`aiodd.formats.common` (its ``typing`` and
``threading`` would cost the guest's start-up; docs/performance.md, "Start-up")."""

from __future__ import annotations

_ZEROS = memoryview(bytes(1 << 20))


def zero_fill(buf: memoryview) -> None:
    """Zero ``buf`` in place, without allocating a buffer of its size."""
    pos, n = 0, len(buf)
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        buf[pos : pos + k] = _ZEROS[:k]
        pos += k
