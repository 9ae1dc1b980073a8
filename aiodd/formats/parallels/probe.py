"""Detecting parallels: qemu's probe, which detection imports without the rest of the
format (docs/performance.md, "Start-up")."""

from __future__ import annotations

HEADER_SIZE = 64
MAGIC = b"WithoutFreeSpace"  # BAT entries in sectors
MAGIC_EXT = b"WithouFreSpacExt"  # BAT entries in clusters
MAGICS = (MAGIC, MAGIC_EXT)
VERSION = 2


def probe(head: bytes) -> int:
    """qemu's ``parallels_probe``: either magic and version 2 in a 64-byte header."""
    ours = len(head) >= HEADER_SIZE and head[:16] in MAGICS
    return 100 if ours and int.from_bytes(head[16:20], "little") == VERSION else 0
