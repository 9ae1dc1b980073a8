"""Detecting qed: qemu's probe, which detection imports without the rest of the
format (docs/performance.md, "Start-up")."""

from __future__ import annotations

MAGIC = b"QED\x00"
HEADER_SIZE = 64


def probe(head: bytes) -> int:
    """qemu's ``bdrv_qed_probe``: the magic in a whole 64-byte header; nothing else."""
    return 100 if len(head) >= HEADER_SIZE and head[:4] == MAGIC else 0
