"""The KVM guest reader's Python face: one micro-VM that decodes the layers it can.

A stand-in with the final interface (docs/kvm.md): it decodes raw images only, through
:class:`~aiodd.guest.kvm.vmm.GuestVM`'s raw command and one copy out of its OUT window.
The decoder in the guest that reads qcow2 too replaces it whole.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence
from pathlib import Path

from aiodd.errors import UnsupportedImageError
from aiodd.formats import INPUT_FORMATS, foreign
from aiodd.formats import registry as decoders
from aiodd.formats.base import RandomAccessFile, Resolver, VirtualDisk
from aiodd.formats.common import zero_fill
from aiodd.formats.foreign import PROBE_SIZE
from aiodd.formats.raw import layout as raw_layout
from aiodd.guest.kvm import layout as L
from aiodd.guest.kvm.vmm import KVM_RUN, GuestVM

GUEST_FORMATS: frozenset[str] = frozenset({"raw"})

OPEN_TIMEOUT = 30.0
WATCHDOG_FLOOR = 15.0
WATCHDOG_RATE = 16 << 20


class GuestFormatError(UnsupportedImageError):
    """A layer of the chain is in a format the KVM guest does not decode (yet)."""


class KvmReader:
    """One micro-VM, created before the guest process seals itself, used after."""

    def __init__(
        self, name: str, memories: Sequence[mmap.mmap] = (), *, guest: Path | None = None
    ) -> None:
        self._vm = GuestVM(name=name, guest=guest, timeout=OPEN_TIMEOUT)

    @property
    def ioctl_fds(self) -> tuple[int, ...]:
        return (self._vm._vcpu,)

    @property
    def ioctl_requests(self) -> tuple[int, ...]:
        return (KVM_RUN,)

    def open_disk(self, file: RandomAccessFile, resolver: Resolver, fmt: str | None) -> VirtualDisk:
        if fmt is None:
            fmt = decoders.detect(file.pread(0, PROBE_SIZE), file.name)
            if fmt not in INPUT_FORMATS:
                raise foreign.refusal(file.name, fmt)
        if fmt not in GUEST_FORMATS:
            what = f"this is a {fmt} image, which the KVM guest reader does not decode yet"
            raise GuestFormatError(file.name, what, fmt)
        fileno = getattr(file, "fd", None)
        if not isinstance(fileno, int):  # the stand-in reads descriptors, not files
            raise TypeError("the KVM guest reader reads local files only")
        self._vm.files = (fileno,)
        self._vm.name = file.name
        return _RawDisk(self._vm, file)

    def close(self) -> None:
        self._vm.close()


class _RawDisk:
    format_name = "raw"

    def __init__(self, vm: GuestVM, file: RandomAccessFile) -> None:
        self._vm = vm
        self._file = file
        self.virtual_size = raw_layout.virtual_size(file.size)

    def read_into(self, offset: int, buf: memoryview) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the KVM guest reader reads in the main thread only")
        done = 0
        while done < len(buf):
            n = min(L.OUT_SIZE, len(buf) - done)
            self._vm.timeout = WATCHDOG_FLOOR + n / WATCHDOG_RATE
            data = self._vm.raw(0, offset + done, n)
            buf[done : done + len(data)] = data
            if len(data) < n:
                zero_fill(buf[done + len(data) :])
                return
            done += n

    def close(self) -> None:
        self._file.close()
