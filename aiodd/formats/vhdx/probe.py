"""Detecting vhdx: qemu's probe, which detection imports without the rest of the
format (docs/performance.md, "Start-up")."""

from __future__ import annotations

SIGNATURE = b"vhdxfile"


def probe(head: bytes) -> int:
    """qemu's ``vhdx_probe``: the file identifier's signature at offset 0."""
    return 100 if head[:8] == SIGNATURE else 0
