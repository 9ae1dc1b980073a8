"""qemu's probes for the formats it detects and aiodd does not read.

qemu-img detects luks, bochs and cloop from the
first 2048 bytes of a file, and dmg from the file's *name*.  aiodd runs the same tests,
with the same scores, so that such an image is refused by name rather than copied as a
raw disk (docs/formats.md).  Pure functions over bytes and names: no I/O.

Every probe takes ``(head, filename)`` as qemu's do: ``head`` is the probe buffer,
exactly :data:`PROBE_SIZE` bytes (qemu reads a shorter file's tail as zeros), and
``filename`` the name the image was opened by.
"""

from __future__ import annotations

from aiodd.errors import UnsupportedImageError
from aiodd.formats import READS

TYPE_CHECKING = False  # collections.abc, not imported: the guest imports this module
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    Probe: TypeAlias = Callable[[bytes, str], int]

# qemu's BLOCK_PROBE_BUF_SIZE.
PROBE_SIZE = 2048

LUKS_MAGIC = b"LUKS\xba\xbe"
BOCHS_MAGIC = b"Bochs Virtual HD Image"
CLOOP_MAGIC = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)


def _u32le(head: bytes, at: int) -> int:
    return int.from_bytes(head[at : at + 4], "little")


def _c_string_is(head: bytes, at: int, text: bytes) -> bool:
    """``strcmp(head + at, text) == 0``: the text, then a NUL."""
    return head[at : at + len(text) + 1] == text + b"\x00"


def luks(head: bytes, filename: str) -> int:
    """LUKS version 1 only: a LUKS2 header is not qemu's, and reads as raw."""
    if len(head) >= 8 and head[:6] == LUKS_MAGIC and int.from_bytes(head[6:8], "big") == 1:
        return 100
    return 0


def bochs(head: bytes, filename: str) -> int:
    """A growing redolog: three NUL-terminated strings and version 1 or 2 (as 0x00010000
    or 0x00020000), in a 512-byte header."""
    if (
        len(head) >= 512
        and _c_string_is(head, 0, BOCHS_MAGIC)
        and _c_string_is(head, 32, b"Redolog")
        and _c_string_is(head, 48, b"Growing")
        and _u32le(head, 64) in (0x00010000, 0x00020000)
    ):
        return 100
    return 0


def cloop(head: bytes, filename: str) -> int:
    """The version 2.0 shell header, or as much of it as the buffer holds; a weak score."""
    return 2 if head[: len(CLOOP_MAGIC)] == CLOOP_MAGIC[: len(head)] else 0


def dmg(head: bytes, filename: str) -> int:
    """By name alone, as qemu decides it: longer than four characters and ending in
    ``.dmg`` (case matters).  The content is never looked at."""
    return 2 if len(filename) > 4 and filename.endswith(".dmg") else 0


PROBES: dict[str, Probe] = {
    "luks": luks,
    "bochs": bochs,
    "cloop": cloop,
    "dmg": dmg,
}

TITLES = {
    "luks": "a LUKS encrypted image",
    "bochs": "a Bochs image",
    "cloop": "a cloop image",
    "dmg": "a DMG image (qemu-img goes by the .dmg name)",
}


def refusal(name: str, fmt: str) -> UnsupportedImageError:
    """The error for an image that qemu would read as ``fmt``, a format aiodd does not read."""
    return UnsupportedImageError(name, f"this is {TITLES[fmt]}; aiodd reads {READS}", fmt)
