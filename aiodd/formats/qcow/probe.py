"""Detecting qcow: qemu's probe, which detection imports without the rest of the
format (docs/performance.md, "Start-up")."""

from __future__ import annotations

MAGIC = b"QFI\xfb"
VERSION = 1
HEADER_SIZE = 48


def probe(head: bytes) -> int:
    """qemu's ``qcow_probe``: the magic and exactly version 1 in a 48-byte header."""
    if len(head) >= HEADER_SIZE and head[:4] == MAGIC and int.from_bytes(head[4:8], "big") == 1:
        return 100
    return 0
