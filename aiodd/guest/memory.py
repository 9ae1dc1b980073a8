"""Shared memory between the host and the guest reader: memfd-backed mappings.

The guest decodes straight into pages the host maps too, so a read costs no copy across
the boundary.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class SharedBuffer(mmap.mmap):
    """An mmap over a memfd, so the guest reader can map the same pages."""

    memfd: int

    def close(self) -> None:
        fd = getattr(self, "memfd", -1)
        if fd >= 0:
            os.close(fd)
            self.memfd = -1
        # A view may outlive the copy (a traceback of a cancelled read holds one): the
        # pages are then unmapped when the last view goes, not now.
        with contextlib.suppress(BufferError):
            super().close()


def shared_buffer(size: int) -> SharedBuffer:
    """A ``size``-byte memfd-backed shared mapping the guest reader can write into."""
    fd = os.memfd_create("aiodd-buffers", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        buf = SharedBuffer(fd, size)
    except BaseException:
        os.close(fd)
        raise
    buf.memfd = fd
    return buf


def address(buffer: Any) -> int:
    """The address of a writable buffer's first byte."""
    holder = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder
