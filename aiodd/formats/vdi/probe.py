"""Detecting vdi: qemu's probe, which detection imports without the rest of the
format (docs/performance.md, "Start-up")."""

from __future__ import annotations

HEADER_SIZE = 512
SIGNATURE = 0xBEDA107F
SIGNATURE_AT = 64


def probe(head: bytes) -> int:
    """qemu's ``vdi_probe``: the signature, in a buffer that holds a whole header."""
    if (
        len(head) >= HEADER_SIZE
        and int.from_bytes(head[SIGNATURE_AT : SIGNATURE_AT + 4], "little") == SIGNATURE
    ):
        return 100
    return 0
