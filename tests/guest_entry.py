"""The guest reader as the tests run it: the real guest, plus the test-only ``attempt``
request (tests/guest_attempts.py).  Started by the host as ``GuestOptions.entry``."""

from __future__ import annotations

from aiodd.guest import child
from tests import guest_attempts


def main(control_fd: int) -> None:
    child.main(control_fd, {"attempt": guest_attempts.run})
