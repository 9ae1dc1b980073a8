"""Detecting qcow2: qemu's probe, which detection imports without the rest of the
format (docs/performance.md, "Start-up")."""

from __future__ import annotations

MAGIC = b"QFI\xfb"


def probe(head: bytes) -> int:
    """qemu's ``qcow2_probe``: the magic and a version of at least 2."""
    if len(head) >= 8 and head[:4] == MAGIC and int.from_bytes(head[4:8], "big") >= 2:
        return 100
    return 0
