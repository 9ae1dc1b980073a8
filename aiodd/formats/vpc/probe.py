"""Detecting vpc: qemu's probe, which detection imports without the rest of the
format (docs/performance.md, "Start-up")."""

from __future__ import annotations

FOOTER_COOKIE = b"conectix"


def probe(head: bytes) -> int:
    """qemu's ``vpc_probe``: the footer copy's cookie at offset 0."""
    return 100 if head[:8] == FOOTER_COOKIE else 0
