"""Detecting vmdk: qemu's probe, which detection imports without the rest of the
format (docs/performance.md, "Start-up")."""

from __future__ import annotations

MAGIC_KDMV = b"KDMV"
MAGIC_COWD = b"COWD"


def probe(head: bytes) -> int:
    """qemu's ``vmdk_probe``: a sparse magic, or text whose first line that is neither a
    comment nor blank (blank meaning spaces only) is exactly ``version=1|2|3``."""
    if len(head) < 4:
        return 0
    if head[:4] in (MAGIC_KDMV, MAGIC_COWD):
        return 100
    p, end = 0, len(head)
    while p < end:
        c = head[p]
        if c == 0x23:  # '#': skip the comment line
            nl = head.find(b"\n", p)
            p = end + 1 if nl < 0 else nl + 1
            continue
        if c == 0x20:  # ' ': only a line of spaces (and a CR) may precede version=
            while p < end and head[p] == 0x20:
                p += 1
            if p < end and head[p] == 0x0D:
                p += 1
            if p == end or head[p] != 0x0A:
                return 0
            p += 1
            continue
        rest = head[p : p + 11]
        for version in (b"1", b"2", b"3"):
            if rest.startswith(b"version=" + version + b"\n"):
                return 100
            if rest.startswith(b"version=" + version + b"\r\n"):
                return 100
        return 0
    return 0
