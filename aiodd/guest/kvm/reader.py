"""The KVM guest reader, as the guest child uses it: images decoded inside a micro-VM.

:class:`KvmReader` is one VM (:class:`~aiodd.guest.kvm.vmm.GuestVM`), created before the
child seals itself and used after; :meth:`KvmReader.open_disk` decodes an image in it
and returns a :class:`~aiodd.formats.base.VirtualDisk` whose reads run in the guest.
Formats are detected here, in Python, exactly as :func:`aiodd.formats.registry.open_disk`
detects them, for the user's image and for every backing file the guest asks for; the
files themselves are opened by the caller's :class:`~aiodd.formats.base.Resolver`, under
its policy.  Errors come out as the Python decoders raise them (docs/kvm.md, "The
reader").
"""

from __future__ import annotations

import _thread
import mmap
import os

from aiodd.errors import IsolationError
from aiodd.formats import INPUT_FORMATS, check_input_format, foreign
from aiodd.formats.reference import Reference
from aiodd.formats.zeros import zero_fill
from aiodd.guest.kvm import layout as L
from aiodd.guest.kvm import vmm
from aiodd.guest.kvm.vmm import (
    MAX_OFFSET,
    AbiViolation,
    GuestVM,
    ThreadWatchdog,
)

# Annotations only: the guest's process imports neither typing nor collections
# (docs/performance.md, "Start-up").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Final

    from aiodd.formats.base import RandomAccessFile, ReferenceKind, Resolver

__all__ = (
    "GUEST_FORMATS",
    "KvmDisk",
    "KvmReader",
    "guest_format",
)

_CODES: Final = {
    "raw": L.FMT_RAW,
    "qcow2": L.FMT_QCOW2,
    "vmdk": L.FMT_VMDK,
    "vpc": L.FMT_VPC,
    "vhdx": L.FMT_VHDX,
    "vdi": L.FMT_VDI,
    "parallels": L.FMT_PARALLELS,
    "qcow": L.FMT_QCOW,
    "qed": L.FMT_QED,
}

GUEST_FORMATS: frozenset[str] = frozenset(_CODES)
"""The formats the guest decodes: every input format (a test holds them equal), so no
image is left to the Python decoders."""

OPEN_TIMEOUT: Final = 30.0
"""Seconds the guest has to open an image (its whole chain): GuestOptions' default."""
WATCHDOG_FLOOR: Final = 15.0
WATCHDOG_RATE: Final = 16 << 20
"""A read of ``n`` bytes has ``WATCHDOG_FLOOR + n / WATCHDOG_RATE`` seconds, as in the
process guest (GuestOptions' defaults)."""

MAX_FILES: Final = 4096 + 128
"""The most files one chain gives the guest: more than the host lets one image name
(aiodd/guest/disk.py's MAX_FILES: a vmdk descriptor may name 4096 extents), so the
host's own refusal comes first."""


def guest_format(file: RandomAccessFile, fmt: str | None) -> str:
    """The format the guest decodes ``file`` as: ``fmt`` when one is named (as
    :func:`aiodd.formats.registry.open_disk` honours it), else the detected one; a
    format aiodd does not read is refused as the registry refuses it."""
    if fmt is None:
        from aiodd.formats import registry

        fmt = registry.detect(file.pread(0, foreign.PROBE_SIZE), file.name)
        if fmt not in INPUT_FORMATS:
            raise foreign.refusal(file.name, fmt)
    else:
        check_input_format(fmt)
    return fmt


class KvmReader:
    """Micro-VMs, created in the guest child before it seals itself, used after.

    ``memories`` are the shared buffers reads should land in: memory ``i`` becomes slot
    ``i`` of the guest, which then writes straight into it.  Raises
    :class:`IsolationError` (with the reason) when KVM cannot run.  Every call must come
    from the main thread, but reads: with ``vms`` above one, each further VM (made when
    it can be: at least one is) serves the reads of the thread :meth:`bind` gives it, so
    two reads decode at once.  Every VM opens the same image, the files of its chain
    opened once for all.  The keyword knobs are the watchdog's (the product's defaults;
    the tests shorten them).
    """

    def __init__(
        self,
        name: str,
        memories: Sequence[mmap.mmap] = (),
        *,
        guest: str | os.PathLike[str] | None = None,
        open_timeout: float = OPEN_TIMEOUT,
        watchdog_floor: float = WATCHDOG_FLOOR,
        watchdog_rate: float = WATCHDOG_RATE,
        vms: int = 1,
        host_layers: Mapping[int, int] | None = None,
        map_extents: int = 0,
        map_factor: int = 0,
    ) -> None:
        self.name = name
        # The host's layer number of each file it holds open, by descriptor (the child's
        # HostLink.layers): a read's map may leave up to map_extents reads of those to
        # it, map_factor times the read's length in all.
        self._host_layers: Mapping[int, int] = {} if host_layers is None else host_layers
        self._map_extents = map_extents
        self._map_factor = map_factor
        self._open_timeout = open_timeout
        self._watchdog_floor = watchdog_floor
        self._watchdog_rate = watchdog_rate
        # The chain's files, the top layer first, each opened once for every VM; the
        # resolver of each one's references (None: a data file names nothing), by id.
        self._files: list[RandomAccessFile] = []
        self._resolvers: dict[int, Resolver | None] = {}
        # What each (referrer's file, kind, name, format) opened, in order: another VM
        # asking the same gets the same files.
        self._opened: dict[tuple[int, int, str, str | None], list[tuple[RandomAccessFile, int]]]
        self._opened = {}
        self._asked: dict[int, dict[tuple[int, int, str, str | None], int]] = {}  # by VM
        self._lock = _thread.allocate_lock()  # opens from two VMs' threads
        self._disk: KvmDisk | None = None
        self._open_vms: set[int] = set()  # the VMs that opened the disk, by id
        self._vm = self._make_vm(name, guest, memories, open_timeout)
        self._vms = [self._vm]
        self._threads: dict[int, GuestVM] = {}  # the bound threads' VMs, by thread
        self._handler: vmm.SignalHandler = None
        self._kept = False
        for _ in range(vms - 1):
            try:
                self._vms.append(self._make_vm(name, guest, memories, open_timeout))
            except IsolationError:
                break  # fewer VMs: reads wait for each other, as with one
        if len(self._vms) > 1:
            # A bound thread's watchdog tick may come at any time: SIGPROF must never
            # have its default action (the end of the process).
            self._handler, self._kept = vmm.keep_handler(), True

    def _make_vm(
        self,
        name: str,
        guest: str | os.PathLike[str] | None,
        memories: Sequence[mmap.mmap],
        timeout: float,
    ) -> GuestVM:
        vm: GuestVM | None = None

        def opener(referrer: int, kind: int, ref: str, fmt: str | None) -> tuple[int, int, int]:
            assert vm is not None
            return self._open_reference(vm, referrer, kind, ref, fmt)

        vm = GuestVM(name=name, guest=guest, memories=memories, opener=opener, timeout=timeout)
        return vm

    @property
    def vms(self) -> int:
        """How many VMs read (two reads at once when more than one)."""
        return len(self._vms)

    def bind(self, watchdog: ThreadWatchdog) -> None:
        """Give the calling thread (``watchdog``'s) a VM of its own to read with: one
        no thread has yet (ValueError when none is left).  Before sealing."""
        free = [vm for vm in self._vms[1:] if vm not in self._threads.values()]
        if not free:
            raise ValueError("no VM is left to bind")
        free[0].bind(watchdog)
        self._threads[watchdog.thread] = free[0]

    def drop_unbound(self) -> None:
        """Close the further VMs no thread was bound to (their threads failed)."""
        bound = set(map(id, self._threads.values()))
        for vm in self._vms[1:]:
            if id(vm) not in bound:
                vm.close()
        self._vms = [self._vm, *(vm for vm in self._vms[1:] if id(vm) in bound)]

    @property
    def ioctl_fds(self) -> tuple[int, ...]:
        """Each VM's and each vCPU's descriptors, which reads use after sealing."""
        return tuple(fd for vm in self._vms for fd in vm.ioctl_fds)

    @property
    def ioctl_requests(self) -> tuple[int, ...]:
        """The ioctl requests reads make after sealing (``KVM_RUN``)."""
        return self._vm.ioctl_requests

    @property
    def start_time(self) -> float:
        """Seconds from opening ``/dev/kvm`` to the guest's first doorbell."""
        return self._vm.start_time

    def open_disk(self, file: RandomAccessFile, resolver: Resolver, fmt: str | None) -> KvmDisk:
        """Decode ``file`` (the chain's top layer) in the guest.

        The returned disk owns ``file`` and every file the chain opened (its ``close``
        closes them); on an error the caller still owns ``file`` and the rest are
        closed.  One disk at a time: the previous one must be closed first.
        """
        if self._disk is not None and not self._disk.closed:
            raise RuntimeError("the KVM guest reader already has an open disk")
        name = guest_format(file, fmt)
        self._files = [file]
        self._resolvers = {id(file): resolver}
        self._vm.set_files([(file, _CODES[name])])
        self._open_vms = {id(self._vm)}
        try:
            virtual_size = self._vm.open(_CODES[name], timeout=self._open_timeout)
        except BaseException:
            self._forget(keep=1)
            raise
        self._disk = KvmDisk(self, name, virtual_size)
        return self._disk

    def _open_in(self, vm: GuestVM, disk: KvmDisk) -> None:
        """Open the disk in a further VM, on its thread, at its first read: off the way
        to the first byte, which the first VM decodes meanwhile.  The chain's files are
        the ones the first VM's open opened."""
        code = _CODES[disk.format_name]
        vm.set_files([(self._files[0], code)])
        size = vm.open(code, timeout=self._open_timeout)
        if size != disk.virtual_size:
            vm.close()
            raise IsolationError(
                f"{self.name}: the guest readers disagree on the virtual size"
                f" ({disk.virtual_size} and {size} bytes)"
            )
        self._open_vms.add(id(vm))

    def _open_reference(
        self, vm: GuestVM, referrer: int, kind: int, name: str, fmt: str | None
    ) -> tuple[int, int, int]:
        """``vm``'s guest asks for a file its layer ``referrer`` names (an ``Opener``):
        the file another VM got for the same request, else one the resolver opens."""
        if len(vm.files) >= MAX_FILES:
            raise AbiViolation(f"open of more than {MAX_FILES} files")
        with self._lock:
            referring = vm.files[referrer]
            key = (id(referring), kind, name, fmt)
            asked = self._asked.setdefault(id(vm), {})
            count = asked.get(key, 0)
            opened = self._opened.setdefault(key, [])
            if count < len(opened):
                file, code = opened[count]
            else:
                file, code = self._open_new(referrer, referring, kind, name, fmt)
                opened.append((file, code))
            asked[key] = count + 1
            return vm.add_file(file, code), file.size, code

    def _open_new(
        self, referrer: int, referring: RandomAccessFile, kind: int, name: str, fmt: str | None
    ) -> tuple[RandomAccessFile, int]:
        resolver = self._resolvers[id(referring)]
        if resolver is None:
            raise AbiViolation(f"open named by handle {referrer}, which is not an image")
        image = referring.name
        file: RandomAccessFile
        layer: Resolver | None
        if kind in (L.REF_DATA_FILE, L.REF_EXTENT):
            # Plain files, opened as the Python decoders open them (open_file).
            plain: ReferenceKind = "data_file" if kind == L.REF_DATA_FILE else "extent"
            file = resolver.open_file(Reference(plain, name, image))
            layer, code = None, L.FMT_NONE
        else:
            layered: ReferenceKind = "backing" if kind == L.REF_BACKING else "parent"
            file, layer = resolver.open_layer(Reference(layered, name, image, fmt))
            try:
                code = _CODES[guest_format(file, fmt)]
            except BaseException:
                file.close()
                raise
        self._resolvers[id(file)] = layer
        self._files.append(file)
        return file, code

    def _forget(self, keep: int) -> None:
        """Close the files given to the guests but the first ``keep``; the guests lose
        them all."""
        files = self._files[keep:]
        for vm in self._vms:
            vm.set_files([])
        self._open_vms = set()
        self._files, self._resolvers, self._opened, self._asked = [], {}, {}, {}
        for file in reversed(files):
            file.close()

    def _read(
        self, disk: KvmDisk, offset: int, buf: memoryview, *, leave: bool = False
    ) -> list[int]:
        vm = self._threads.get(_thread.get_ident(), self._vm)
        if disk is not self._disk or disk.closed:
            raise IsolationError(f"{self.name}: the disk is closed")
        if id(vm) not in self._open_vms:
            self._open_in(vm, disk)
        length = buf.nbytes
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        # Past the virtual disk every format reads zeros: the guest is not asked.
        inside = min(length, max(0, disk.virtual_size - offset))
        if inside < length:
            zero_fill(buf[inside:])
        if inside == 0:
            return []
        assert offset <= MAX_OFFSET - inside  # the virtual size is at most MAX_OFFSET
        view = buf[:inside] if inside < length else buf
        address = vm.locate(view)
        if address is not None:
            if not leave:
                vm.read(offset, inside, address, timeout=self._deadline(inside))
                return []
            files = vm.files
            left = vm.read(
                offset,
                inside,
                address,
                timeout=self._deadline(inside),
                leave=lambda handle: self._host_layer(files[handle]) >= 0,
                leave_max=self._map_extents,
                leave_bytes=self._map_factor * inside,
            )
            return [n for handle, *rest in left for n in (self._host_layer(files[handle]), *rest)]
        done = 0
        while done < inside:
            n = min(L.OUT_SIZE, inside - done)
            vm.read(offset + done, n, L.OUT_BASE, timeout=self._deadline(n))
            vm.copy_output(view[done : done + n])
            done += n
        return []

    def _host_layer(self, file: RandomAccessFile) -> int:
        """The host's number for ``file`` when the host holds it open, else -1."""
        fd = getattr(file, "fd", None)
        return -1 if fd is None else self._host_layers.get(fd, -1)

    def _deadline(self, length: int) -> float:
        return self._watchdog_floor + length / self._watchdog_rate

    def _close_disk(self, disk: KvmDisk) -> None:
        if disk is self._disk:
            self._forget(keep=0)
            self._disk = None

    def close(self) -> None:
        """Destroy the VMs; idempotent.  An open disk's files stay the disk's to close."""
        for vm in self._vms:
            vm.close()
        if self._kept:
            self._kept = False
            vmm.restore_handler(self._handler)


class KvmDisk:
    """A :class:`~aiodd.formats.base.VirtualDisk` decoded by the guest of a
    :class:`KvmReader`.  ``read_into`` must be called from the main thread; it writes
    straight into a buffer inside one of the reader's memories, and through OUT and one
    copy into any other."""

    def __init__(self, reader: KvmReader, fmt: str, virtual_size: int) -> None:
        self._reader = reader
        self._format = fmt
        self._virtual_size = virtual_size
        self.closed = False

    @property
    def format_name(self) -> str:
        return self._format

    @property
    def virtual_size(self) -> int:
        return self._virtual_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._reader._read(self, offset, buf)

    def read_map(self, offset: int, buf: memoryview) -> tuple[int, ...]:
        """:meth:`read_into`, but the reads of files the host holds (a
        :class:`~aiodd.guest.protocol.Done`'s ``map``) may be left to the caller: four
        numbers each (the host's layer, the file offset, the length, the offset in
        ``buf``), to be made in order over what was written."""
        return tuple(self._reader._read(self, offset, buf, leave=True))

    def close(self) -> None:
        """Close every file of the chain (the top layer included); idempotent."""
        if not self.closed:
            self.closed = True
            self._reader._close_disk(self)
