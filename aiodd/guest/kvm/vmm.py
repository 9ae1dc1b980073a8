"""The virtual machine monitor of the KVM guest reader, in pure Python (docs/kvm.md).

``fcntl.ioctl`` and ``mmap`` over ``/dev/kvm``: one VM, one vCPU, guest RAM of a fixed
size (:mod:`aiodd.guest.kvm.layout` maps it), the caller's shared buffers as further
memory slots, the guest's ELF loaded W^X, and the guest entered straight in 64-bit mode
at CPL3.  The guest talks to the host only through the mailbox, REQ and the doorbell
port; every other way it can stop (a fault, a port the TSS does not open, a spin past
the watchdog), and every request that breaks the ABI, ends the VM with one
:class:`IsolationError`.

The host reads files for the guest only through ``RandomAccessFile.readinto`` into a
view of the guest's memory: no copy, and in-memory files work too.

The vCPU runs in the calling thread: the process's main thread, where the watchdog is a
repeating ``ITIMER_PROF`` whose ``SIGPROF`` interrupts ``KVM_RUN``, or a thread the VM is
bound to (:meth:`GuestVM.bind`), whose own :class:`ThreadWatchdog` interrupts it there.
"""

from __future__ import annotations

import _signal
import _thread
import ctypes
import fcntl
import mmap
import os
import struct
import time

from aiodd.errors import ImageError, IsolationError, UnsupportedImageError
from aiodd.formats.zeros import zero_fill
from aiodd.guest.kvm import elf
from aiodd.guest.kvm import layout as L
from aiodd.io import read_through_holes

# The guest's process imports this module: it takes the C cores of signal and threading,
# and neither typing nor collections, which bring enum, re and functools, milliseconds of
# its start-up (docs/performance.md, "Start-up").
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable, Sequence
    from types import FrameType
    from typing import Final, TypeAlias, TypeVar

    from aiodd.formats.base import RandomAccessFile

    T = TypeVar("T")

# ioctl numbers (linux/kvm.h; measured in docs/kvm.md).
KVM_GET_API_VERSION: Final = 0xAE00
KVM_CREATE_VM: Final = 0xAE01
KVM_GET_VCPU_MMAP_SIZE: Final = 0xAE04
KVM_GET_SUPPORTED_CPUID: Final = 0xC008AE05
KVM_CREATE_VCPU: Final = 0xAE41
KVM_SET_USER_MEMORY_REGION: Final = 0x4020AE46
KVM_SET_TSS_ADDR: Final = 0xAE47
KVM_RUN: Final = 0xAE80
KVM_SET_REGS: Final = 0x4090AE82
KVM_GET_SREGS: Final = 0x8138AE83
KVM_SET_SREGS: Final = 0x4138AE84
KVM_SET_CPUID2: Final = 0x4008AE90

API_VERSION: Final = 12

EXIT_IO: Final = 2
EXIT_HLT: Final = 5
EXIT_MMIO: Final = 6
EXIT_SHUTDOWN: Final = 8
EXIT_FAIL_ENTRY: Final = 9
EXIT_INTR: Final = 10
EXIT_INTERNAL_ERROR: Final = 17
IO_OUT: Final = 1

# kvm_run: exit_reason at 8, the exit's union at 32.
_RUN_EXIT_REASON: Final = 8
_RUN_UNION: Final = 32
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

_SEGMENT = struct.Struct("<QIHBBBBBBBBBB")  # kvm_segment
_DTABLE = struct.Struct("<QH6x")
_SREGS_CR: Final = 8 * _SEGMENT.size + 2 * _DTABLE.size  # cr0 cr2 cr3 cr4 cr8 efer apic_base
_CPUID_ENTRY: Final = 40

# Page-table entry bits.
_P, _RW, _US, _PS = 1, 2, 4, 0x80
_NX: Final = 1 << 63

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA, EFER_NXE = 0x100, 0x400, 0x800

# The TSS: 104 bytes, then the I/O bitmap of ports 0-255 and its closing 0xff byte.  Ports
# past the TSS limit are refused by the CPU, so this short bitmap refuses every other port.
_TSS_SIZE: Final = 104
_IOMAP_PORTS: Final = 256
_TSS_LIMIT: Final = _TSS_SIZE + _IOMAP_PORTS // 8 + 1 - 1

DEFAULT_TIMEOUT: Final = 10.0
MAX_OFFSET: Final = (1 << 63) - 1  # off_t: the end of any read the host serves
_TICK: Final = 0.005  # the watchdog's repeat: a lost SIGPROF costs at most this much


def _fault_reason(code: int) -> str:
    return {
        L.FAULT_STACK: "its stack protector tripped",
        L.FAULT_ABI: "it refused the host's answer",
        L.FAULT_RETURN: "its program returned",
    }.get(code, f"fault code {code}")


# -- the guest's memory, built once per process ----------------------------------------


def _gdt() -> bytes:
    def segment(type_: int, dpl: int, long: bool, big: bool) -> int:
        flags = (1 if long else 0) << 1 | (1 if big else 0) << 2 | 1 << 3  # L, D/B, G
        access = type_ | 1 << 4 | dpl << 5 | 1 << 7  # S, DPL, P
        return 0xFFFF | access << 40 | 0xF << 48 | flags << 52

    code = segment(0xB, 3, long=True, big=False)  # execute/read, accessed
    data = segment(0x3, 3, long=False, big=True)  # read/write, accessed
    # A busy 64-bit TSS: the guest never runs LTR, the host sets TR directly.
    tss_low = (
        (_TSS_LIMIT & 0xFFFF)
        | (L.TSS & 0xFFFFFF) << 16
        | 0xB << 40
        | 1 << 47
        | ((_TSS_LIMIT >> 16) & 0xF) << 48
        | ((L.TSS >> 24) & 0xFF) << 56
    )
    tss_high = L.TSS >> 32
    return struct.pack("<7Q", 0, 0, 0, code, data, tss_low, tss_high)


def _tss() -> bytes:
    tss = bytearray(_TSS_SIZE + _IOMAP_PORTS // 8 + 1)
    struct.pack_into("<H", tss, 102, _TSS_SIZE)  # the I/O map base
    bitmap = bytearray(b"\xff" * (_IOMAP_PORTS // 8 + 1))
    for port in (L.PORT_DOORBELL, L.PORT_FAULT):
        bitmap[port // 8] &= ~(1 << (port % 8)) & 0xFF
    tss[_TSS_SIZE:] = bitmap
    return bytes(tss)


def _page_tables(image: elf.Image) -> dict[int, bytes]:
    """The identity-mapped page tables, by physical address; not mapped for the guest."""
    user = _P | _US
    table = _P | _RW | _US  # the leaves decide the rights
    low = bytearray(L.PAGE)
    for addr, bits in (
        (L.GDT, _P | _RW | _NX),
        (L.TSS, _P | _RW | _NX),
        (L.FS_PAGE, user | _NX),
        (L.MAILBOX, user | _RW | _NX),
    ):
        _U64.pack_into(low, (addr // L.PAGE) * 8, addr | bits)
    for base, size in ((L.REQ_BASE, L.REQ_SIZE), (L.STACK_BASE, L.STACK_TOP - L.STACK_BASE)):
        for addr in range(base, base + size, L.PAGE):
            _U64.pack_into(low, (addr // L.PAGE) * 8, addr | user | _RW | _NX)
    text = bytearray(L.PAGE)
    for seg in image.segments:
        bits = user | (_RW if seg.writable else 0) | (0 if seg.executable else _NX)
        for addr in range(seg.vaddr, seg.vaddr + seg.memsz, L.PAGE):
            _U64.pack_into(text, ((addr - L.IMAGE_BASE) // L.PAGE) * 8, addr | bits)
    pd = bytearray(L.PAGE)
    _U64.pack_into(pd, 0, L.PT_LOW | table)
    _U64.pack_into(pd, 8, L.PT_IMAGE | table)
    for base, size, bits in (
        (L.HEAP_BASE, L.HEAP_SIZE, user | _RW | _NX),
        (L.IN_BASE, L.IN_SIZE, user | _NX),
        (L.OUT_BASE, L.OUT_SIZE, user | _RW | _NX),
    ):
        for addr in range(base, base + size, L.LARGE_PAGE):
            _U64.pack_into(pd, (addr // L.LARGE_PAGE) * 8, addr | bits | _PS)
    return {
        L.PML4: _U64.pack(L.PDPT | table),
        L.PDPT: _U64.pack(L.PD | table),
        L.PD: bytes(pd),
        L.PT_LOW: bytes(low),
        L.PT_IMAGE: bytes(text),
    }


def slot_address(index: int) -> int:
    """Where slot ``index`` starts in the guest."""
    return L.SLOT_BASE + index * L.SLOT_STRIDE


def _slot_tables(index: int, size: int) -> list[tuple[int, bytes]]:
    """The page tables that map slot ``index`` over ``size`` bytes (a multiple of 4 KiB,
    at most one stride): 2 MiB pages, then 4 KiB pages for a tail, nothing past it."""
    base = slot_address(index)
    pd_addr = L.SLOT_TABLES + 2 * index * L.PAGE
    pt_addr = pd_addr + L.PAGE
    leaf = _P | _RW | _US | _NX
    pd = bytearray(L.PAGE)
    large = size // L.LARGE_PAGE
    for i in range(large):
        _U64.pack_into(pd, i * 8, (base + i * L.LARGE_PAGE) | leaf | _PS)
    pieces = [(L.PDPT + (base >> 30) * 8, _U64.pack(pd_addr | _P | _RW | _US))]
    tail = size - large * L.LARGE_PAGE
    if tail:
        _U64.pack_into(pd, large * 8, pt_addr | _P | _RW | _US)
        pt = bytearray(L.PAGE)
        start = base + large * L.LARGE_PAGE
        for i in range(tail // L.PAGE):
            _U64.pack_into(pt, i * 8, (start + i * L.PAGE) | leaf)
        pieces.append((pt_addr, bytes(pt)))
    pieces.append((pd_addr, bytes(pd)))
    return pieces


def _address(buffer: object) -> int:
    """The address of a writable buffer's first byte (TypeError for a read-only one)."""
    holder = ctypes.c_char.from_buffer(buffer)  # type: ignore[arg-type]
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


class _Template:
    """What every VM's RAM starts with, but the canary: built once per guest binary."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as file:
            image = elf.parse(file.read())
        self.entry = image.entry
        self.pieces: list[tuple[int, bytes]] = [(L.GDT, _gdt()), (L.TSS, _tss())]
        self.pieces += _page_tables(image).items()
        self.pieces += [(seg.vaddr, seg.data) for seg in image.segments]


_templates: dict[tuple[str, int, int], _Template] = {}
_cpuid: bytearray | None = None


def _template(path: str) -> _Template:
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _templates:
        _templates[key] = _Template(path)
    return _templates[key]


def _supported_cpuid(kvm: int) -> bytearray:
    global _cpuid
    if _cpuid is None:
        nent = 64
        while True:
            buf = bytearray(8 + nent * _CPUID_ENTRY)
            _U32.pack_into(buf, 0, nent)
            try:
                fcntl.ioctl(kvm, KVM_GET_SUPPORTED_CPUID, buf, True)
            except OSError as exc:
                if exc.errno == 7 and nent < 4096:  # E2BIG
                    nent *= 2
                    continue
                raise
            count = _U32.unpack_from(buf, 0)[0]
            _cpuid = buf[: 8 + count * _CPUID_ENTRY]
            break
    return bytearray(_cpuid)


# -- the watchdog ----------------------------------------------------------------------


class _Expired(BaseException):
    """Raised by the watchdog's signal handler, once; never escapes this module."""


class _Watchdog:
    deadline: float | None = None


def _on_tick(signum: int, frame: FrameType | None) -> None:
    deadline = _Watchdog.deadline
    if deadline is not None and time.monotonic() >= deadline:
        _Watchdog.deadline = None  # fire once: the cleanup must not be interrupted again
        raise _Expired


if TYPE_CHECKING:
    SignalHandler: TypeAlias = (
        Callable[[int, FrameType | None], object] | int | signal.Handlers | None
    )


def _stop_watchdog(previous: SignalHandler) -> None:
    _Watchdog.deadline = None  # first: from here on the handler never raises
    _signal.setitimer(_signal.ITIMER_PROF, 0, 0)
    # None: the previous handler was not set from Python; the default is all we can give
    _signal.signal(_signal.SIGPROF, previous if previous is not None else _signal.SIG_DFL)


# A VM run from another thread than the main one has a watchdog of its own: a kernel
# timer on that thread's CPU clock whose SIGPROF goes to that thread only (SIGEV_THREAD_ID),
# so it interrupts that thread's KVM_RUN wherever the other threads are.  Python runs
# signal handlers in the main thread only: the run loop checks the deadline itself after
# each interruption.  The timer is created on the thread before the process seals itself
# (timer_create is not in the filter); arming it later is timer_settime.

_SYS_TIMER: Final = {
    "x86_64": {"timer_create": 222, "timer_settime": 223, "timer_delete": 226},
    "aarch64": {"timer_create": 107, "timer_settime": 110, "timer_delete": 111},
}
_CLOCK_THREAD_CPUTIME_ID: Final = 3
_SIGEV_THREAD_ID: Final = 4
_SIGEVENT = struct.Struct("<Qiii44x")  # sigev_value, sigev_signo, sigev_notify, _tid
_ITIMERSPEC = struct.Struct("<4q")  # it_interval, it_value: (seconds, nanoseconds) each


class ThreadWatchdog:
    """The watchdog of the VMs run by the thread that creates it (docs/kvm.md, "The
    watchdog"): a repeating CPU-time tick sent to this thread alone.  ``SIGPROF`` must
    have a handler (:func:`keep_handler`), else the tick ends the process."""

    def __init__(self) -> None:
        machine = os.uname().machine  # not platform: its import is a guest's 1.3 ms
        numbers = _SYS_TIMER.get(machine)
        if numbers is None:
            raise OSError(f"no timer system calls known for {machine}")
        self._numbers = numbers
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self.thread = _thread.get_ident()
        event = ctypes.create_string_buffer(
            _SIGEVENT.pack(0, _signal.SIGPROF, _SIGEV_THREAD_ID, _thread.get_native_id()),
            _SIGEVENT.size,
        )
        timer = ctypes.c_int(-1)
        self._syscall(
            "timer_create",
            ctypes.c_long(_CLOCK_THREAD_CPUTIME_ID), event, ctypes.byref(timer),
        )  # fmt: skip
        self._timer: int | None = timer.value

    def _syscall(self, name: str, *args: object) -> None:
        if self._libc.syscall(ctypes.c_long(self._numbers[name]), *args) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")

    def _set(self, tick: float) -> None:
        if self._timer is None:
            raise OSError("the watchdog's timer is deleted")
        ns = int(tick * 1e9)
        spec = ctypes.create_string_buffer(
            _ITIMERSPEC.pack(ns // 10**9, ns % 10**9, ns // 10**9, ns % 10**9), _ITIMERSPEC.size
        )
        self._syscall("timer_settime", ctypes.c_long(self._timer), ctypes.c_long(0), spec, None)

    def arm(self) -> None:
        self._set(_TICK)

    def disarm(self) -> None:
        self._set(0)

    def close(self) -> None:
        if self._timer is not None:
            try:  # noqa: SIM105  (not contextlib: the guest's start-up)
                self._syscall("timer_delete", ctypes.c_long(self._timer))
            except OSError:
                pass
            self._timer = None


def keep_handler() -> SignalHandler:
    """Give ``SIGPROF`` the watchdog's handler for good (main thread): a thread's
    watchdog tick may come at any time.  The previous handler, for :func:`restore_handler`."""
    handler: SignalHandler = _signal.signal(_signal.SIGPROF, _on_tick)
    return handler


def restore_handler(previous: SignalHandler) -> None:
    _signal.signal(_signal.SIGPROF, previous if previous is not None else _signal.SIG_DFL)


# -- the VM ----------------------------------------------------------------------------


FORMAT_NAMES: Final = {
    L.FMT_RAW: "raw",
    L.FMT_QCOW2: "qcow2",
    L.FMT_VMDK: "vmdk",
    L.FMT_VPC: "vpc",
    L.FMT_VHDX: "vhdx",
    L.FMT_VDI: "vdi",
    L.FMT_PARALLELS: "parallels",
}
"""The formats the host names to the guest (``FMT_*``), by their registry names."""

if TYPE_CHECKING:
    Opener: TypeAlias = Callable[[int, int, str, str | None], tuple[int, int, int]]
"""Opens a file the guest's layer ``referrer`` names: ``(referrer, kind, name, format or
None) -> (handle, size, format code)``, the file added with :meth:`GuestVM.add_file`.
Any :class:`Exception` refuses it (raised once the command ends); :class:`AbiViolation`
ends the VM instead."""


class GuestOutOfMemory(IsolationError):
    """The guest's heap could not hold what a command needed (``E_NOMEM``): an
    IsolationError, the VM closed."""


class AbiViolation(Exception):
    """Raised by an :data:`Opener` when the request itself breaks the ABI (the reason)."""


PUT_OFF_MAX: Final = 4096
"""Reads into a command's output put off at most (each one a few words of the host's
memory): past it, those are made at once, as they may be at any time."""


def _inside(address: int, length: int, base: int, size: int) -> bool:
    """``[address, address + length)`` lies in ``[base, base + size)``; cannot overflow."""
    return base <= address and length <= size and address - base <= size - length


class GuestVM:
    """One guest reader in a KVM micro-VM, booted and waiting for its first command.

    ``files`` are what the guest may read, by handle (their index; more are added with
    :meth:`add_file`); ``memories`` are the caller's shared buffers, mapped as slots
    (memory ``i`` at :func:`slot_address` ``(i)``); ``opener`` answers the guest's
    requests to open a file a layer names; ``name`` is the image, for messages.  Every
    method raises :class:`IsolationError` when the guest misbehaves or the watchdog stops
    it; the VM is then closed.
    """

    def __init__(
        self,
        files: Sequence[RandomAccessFile] = (),
        *,
        name: str = "image",
        guest: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        memories: Sequence[mmap.mmap] = (),
        opener: Opener | None = None,
    ) -> None:
        from aiodd.guest.kvm import GUEST_PATH, KVM_DEVICE

        if _thread.get_native_id() != os.getpid():  # Linux: the main thread's id is the pid
            raise IsolationError(f"{name}: the KVM guest reader must run in the main thread")
        if len(memories) > L.MAX_SLOTS:
            raise ValueError(f"at most {L.MAX_SLOTS} memories, not {len(memories)}")
        slots: list[tuple[mmap.mmap, int, int]] = []  # (memory, host address, mapped size)
        for index, memory in enumerate(memories):
            try:
                host_address = _address(memory)
            except (TypeError, ValueError):
                raise ValueError(f"memory {index} is not a writable mapping") from None
            size = min(-(-len(memory) // L.PAGE) * L.PAGE, L.SLOT_STRIDE)
            slots.append((memory, host_address, size))
        self.name = name
        self.files: list[RandomAccessFile] = list(files)
        self.formats: list[int] = [L.FMT_NONE] * len(self.files)
        self.timeout = timeout
        self._opener = opener
        self._slots = slots
        self._output: tuple[int, int] | None = None  # the running command's output range
        # The reads into the output put off to the command's end, in the order asked:
        # [handle, offset, length, guest address] (docs/kvm.md, "Reads the host finishes").
        self._put_off: list[list[int]] = []
        # Which put-off reads may be left to the caller (None: none; then every one is
        # made here at the end), how many at most, and how many bytes they may still add.
        self._leave: Callable[[int], bool] | None = None
        self._leave_max = 0
        self._leave_bytes = 0
        self._failure: Exception | None = None  # the host's own failure in this command
        self._fds: list[int] = []
        self._ram: mmap.mmap | None = None
        self._run: mmap.mmap | None = None
        self._vm = self._vcpu = -1
        self._watchdog: ThreadWatchdog | None = None  # another thread's, when bound
        self._deadline: float | None = None  # that thread's run loop checks it
        started = time.perf_counter()
        try:
            template = _template(os.fspath(guest) if guest is not None else GUEST_PATH)
            kvm = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
            try:
                self._create(kvm, template)
            finally:
                os.close(kvm)  # the VM holds what it needs of it
        except OSError as exc:
            self.close()
            raise IsolationError(f"{name}: the KVM guest reader could not start: {exc}") from None
        except ValueError as exc:  # the guest binary failed the ELF checks
            self.close()
            raise IsolationError(f"{name}: the KVM guest binary is invalid: {exc}") from None
        status, _ = self._guarded(self._wait_ready, self.timeout)
        if status != L.OK:
            raise self._broke(f"status {status} at start")
        self.start_time = time.perf_counter() - started

    def _create(self, kvm: int, template: _Template) -> None:
        if fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0) != API_VERSION:
            raise OSError("KVM API version is not 12")
        self._vm = vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        self._fds.append(vm)
        self._ram = ram = mmap.mmap(-1, L.RAM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for addr, data in template.pieces:
            ram[addr : addr + len(data)] = data
        canary = bytearray(os.urandom(8))
        canary[0] = 0  # a string overflow cannot forge it (as glibc does)
        ram[L.FS_PAGE + L.CANARY_OFFSET : L.FS_PAGE + L.CANARY_OFFSET + 8] = canary
        regions = [(0, L.RAM_SIZE, _address(ram))]
        for index, (_, host_address, size) in enumerate(self._slots):
            for addr, data in _slot_tables(index, size):
                ram[addr : addr + len(data)] = data
            regions.append((slot_address(index), size, host_address))
        for slot, (guest_address, size, host_address) in enumerate(regions):
            region = struct.pack("<IIQQQ", slot, 0, guest_address, size, host_address)
            fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        try:  # noqa: SIM105  (not contextlib: the guest's start-up)
            fcntl.ioctl(vm, KVM_SET_TSS_ADDR, L.VMX_TSS)
        except OSError:  # Intel VMX wants it; PVM may not know it
            pass
        self._vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        self._fds.append(self._vcpu)
        size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        self._run = mmap.mmap(self._vcpu, size, mmap.MAP_SHARED)
        cpuid = _supported_cpuid(kvm)
        fcntl.ioctl(self._vcpu, KVM_SET_CPUID2, cpuid, True)
        self._set_registers(template.entry)

    @property
    def ioctl_fds(self) -> tuple[int, ...]:
        """The VM's and the vCPU's descriptors (-1 once closed)."""
        return (self._vm, self._vcpu)

    @property
    def ioctl_requests(self) -> tuple[int, ...]:
        """The ioctl requests the VM makes once it has started."""
        return (KVM_RUN,)

    def bind(self, watchdog: ThreadWatchdog) -> None:
        """Let the thread of ``watchdog`` run the VM too, under that watchdog (the main
        thread still may, under its own)."""
        self._watchdog = watchdog

    def add_file(self, file: RandomAccessFile, fmt: int = L.FMT_NONE) -> int:
        """Give the guest ``file`` (of format ``fmt``, an ``FMT_*``): its handle."""
        self.files.append(file)
        self.formats.append(fmt)
        return len(self.files) - 1

    def set_files(self, files: Sequence[tuple[RandomAccessFile, int]]) -> None:
        """Replace every handle by ``files`` (file, format): the guest loses the others."""
        self.files = [file for file, _ in files]
        self.formats = [fmt for _, fmt in files]

    def _set_registers(self, entry: int) -> None:
        sregs = bytearray(0x138)
        fcntl.ioctl(self._vcpu, KVM_GET_SREGS, sregs, True)

        def seg(index: int, selector: int, type_: int, s: int, dpl: int, long: int,
                db: int, g: int, base: int = 0, limit: int = 0xFFFFFFFF) -> None:  # fmt: skip
            _SEGMENT.pack_into(
                sregs, index * _SEGMENT.size,
                base, limit, selector, type_, 1, dpl, db, s, long, g, 0, 0, 0,
            )  # fmt: skip

        # cs ds es fs gs ss tr ldt
        seg(0, L.USER_CODE, 0xB, 1, 3, 1, 0, 1)
        for index in (1, 2, 4, 5):
            seg(index, L.USER_DATA, 0x3, 1, 3, 0, 1, 1)
        seg(3, L.USER_DATA, 0x3, 1, 3, 0, 1, 1, base=L.FS_PAGE)
        seg(6, L.TSS_SELECTOR, 0xB, 0, 0, 0, 0, 0, base=L.TSS, limit=_TSS_LIMIT)
        _SEGMENT.pack_into(sregs, 7 * _SEGMENT.size, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0)
        _DTABLE.pack_into(sregs, 8 * _SEGMENT.size, L.GDT, 7 * 8 - 1)
        # IDT limit 0: any exception in the guest becomes a triple fault.
        _DTABLE.pack_into(sregs, 8 * _SEGMENT.size + _DTABLE.size, 0, 0)
        cr0 = CR0_PG | CR0_WP | CR0_NE | CR0_ET | CR0_MP | CR0_PE
        cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        apic_base = struct.unpack_from("<Q", sregs, _SREGS_CR + 6 * 8)[0]
        struct.pack_into(
            "<7Q", sregs, _SREGS_CR,
            cr0, 0, L.PML4, cr4, 0, EFER_LME | EFER_LMA | EFER_NXE, apic_base,
        )  # fmt: skip
        fcntl.ioctl(self._vcpu, KVM_SET_SREGS, sregs)
        regs = [0] * 18
        regs[6] = L.STACK_TOP - 8  # rsp: as after a call, so the ABI's alignment holds
        regs[16] = entry  # rip
        regs[17] = 0x2  # rflags: IF clear
        fcntl.ioctl(self._vcpu, KVM_SET_REGS, struct.pack("<18Q", *regs))

    # -- the guest's memory, as the host sees it ---------------------------------------

    def locate(self, buf: memoryview) -> int | None:
        """The guest address of ``buf`` when it lies inside one of the slots, else None."""
        if not self._slots or buf.readonly or not buf.contiguous:
            return None
        try:
            start = _address(buf)
        except (TypeError, ValueError):
            return None
        length = buf.nbytes
        for index, (memory, host_address, size) in enumerate(self._slots):
            if _inside(start, length, host_address, min(size, len(memory))):
                return slot_address(index) + (start - host_address)
        return None

    def _view(self, address: int, length: int) -> memoryview:
        """The host's view of guest memory ``[address, address + length)``, which the
        caller has checked lies in RAM or in one slot.  Release it after use."""
        assert self._ram is not None
        if _inside(address, length, 0, L.RAM_SIZE):
            with memoryview(self._ram) as ram:
                return ram[address : address + length]
        index = (address - L.SLOT_BASE) // L.SLOT_STRIDE
        memory, _, size = self._slots[index]
        offset = address - slot_address(index)
        assert _inside(offset, length, 0, min(size, len(memory)))
        with memoryview(memory) as whole:
            return whole[offset : offset + length]

    def _writable(self, address: int, length: int) -> bool:
        """Whether the host may hand ``[address, address + length)`` to a command as its
        output: inside OUT, or inside one slot's buffer."""
        if _inside(address, length, L.OUT_BASE, L.OUT_SIZE):
            return True
        return any(
            _inside(address, length, slot_address(index), min(size, len(memory)))
            for index, (memory, _, size) in enumerate(self._slots)
        )

    # -- running -----------------------------------------------------------------------

    def _fail(self, what: str) -> IsolationError:
        self.close()
        return IsolationError(f"{self.name}: the guest reader {what}")

    def _broke(self, why: str) -> IsolationError:
        return self._fail(f"broke the ABI ({why})")

    def _guarded(self, body: Callable[[], T], timeout: float) -> T:
        """Run ``body`` under the watchdog; any failure closes the VM."""
        if self._run is None:
            raise IsolationError(f"{self.name}: the guest reader is closed")
        watchdog = self._watchdog
        if watchdog is not None and watchdog.thread == _thread.get_ident():
            return self._guarded_on_thread(body, timeout, watchdog)
        try:
            previous: SignalHandler = _signal.signal(_signal.SIGPROF, _on_tick)
        except ValueError:  # not the main thread
            raise self._fail("must run in the main thread") from None
        try:
            try:
                _Watchdog.deadline = time.monotonic() + timeout
                _signal.setitimer(_signal.ITIMER_PROF, _TICK, _TICK)
                return body()
            finally:
                _stop_watchdog(previous)
        except _Expired:
            # The handler fires once; if that was inside the first stop, finish it here.
            _stop_watchdog(previous)
            raise self._stopped_by_watchdog(timeout) from None
        except BaseException:
            self.close()
            raise

    def _stopped_by_watchdog(self, timeout: float) -> IsolationError:
        return self._fail(f"did not finish within {timeout:g} s (watchdog) and was stopped")

    def _guarded_on_thread(
        self, body: Callable[[], T], timeout: float, watchdog: ThreadWatchdog
    ) -> T:
        """:meth:`_guarded` on a bound thread: its own timer, the deadline checked by
        the run loop."""
        try:
            try:
                self._deadline = time.monotonic() + timeout
                watchdog.arm()
                return body()
            finally:
                self._deadline = None
                watchdog.disarm()
        except _Expired:
            raise self._stopped_by_watchdog(timeout) from None
        except BaseException:
            self.close()
            raise

    def _interrupted(self) -> None:
        """KVM_RUN was interrupted: on a bound thread, stop once the deadline has passed
        (in the main thread the signal's handler has done it)."""
        deadline = self._deadline
        if deadline is not None and time.monotonic() >= deadline:
            raise _Expired

    def _exit(self) -> tuple[int, int]:
        """Run the vCPU to its next doorbell: (port, value) of the ``out``.  Any other
        exit ends the VM with an IsolationError."""
        assert self._run is not None
        run = self._run
        while True:
            try:
                fcntl.ioctl(self._vcpu, KVM_RUN, 0)
            except InterruptedError:
                # a watchdog tick: in the main thread its handler has run (and raised
                # if late)
                self._interrupted()
                continue
            except OSError as exc:
                raise self._fail(f"could not be run ({exc.strerror})") from None
            reason = _U32.unpack_from(run, _RUN_EXIT_REASON)[0]
            if reason == EXIT_INTR:
                self._interrupted()
                continue
            if reason == EXIT_IO:
                direction, size, port, count, data_offset = _IO.unpack_from(run, _RUN_UNION)
                if direction == IO_OUT and size == 1 and count == 1 and data_offset < len(run):
                    value = run[data_offset]
                    if port == L.PORT_DOORBELL:
                        return port, value
                    if port == L.PORT_FAULT:
                        raise self._fail(f"faulted ({_fault_reason(value)})")
                raise self._fail(f"used I/O port {port:#x} (refused)")
            raise self._fail(self._describe_exit(reason))

    def _describe_exit(self, reason: int) -> str:
        assert self._run is not None
        if reason == EXIT_SHUTDOWN:
            return "faulted (triple fault)"
        if reason == EXIT_HLT:
            return "halted"
        if reason == EXIT_MMIO:
            addr = _MMIO.unpack_from(self._run, _RUN_UNION)[0]
            return f"touched memory that does not exist at {addr:#x}"
        if reason == EXIT_FAIL_ENTRY:
            code = _U64.unpack_from(self._run, _RUN_UNION)[0]
            return f"could not be entered (hardware entry failure {code:#x})"
        if reason == EXIT_INTERNAL_ERROR:
            sub = _U32.unpack_from(self._run, _RUN_UNION)[0]
            return f"stopped on an internal KVM error (suberror {sub})"
        return f"stopped unexpectedly (KVM exit reason {reason})"

    def _request(self) -> tuple[int, int, int, int, int, int]:
        """The guest's descriptor, copied out of shared memory once."""
        assert self._ram is not None
        op, handle, offset, length, address, status = L.DESC.unpack_from(self._ram, L.MAILBOX)
        return op, handle, offset, length, address, status

    def _answer(
        self, op: int, handle: int = 0, offset: int = 0, length: int = 0, address: int = 0,
        status: int = L.OK,
    ) -> None:  # fmt: skip
        assert self._ram is not None
        L.DESC.pack_into(self._ram, L.MAILBOX, op, handle, offset, length, address, status)

    def _req(self) -> bytes:
        """REQ, copied out of shared memory once: the request is checked on the copy."""
        assert self._ram is not None
        return self._ram[L.REQ_BASE : L.REQ_BASE + L.REQ_SIZE]

    def _wait_ready(self) -> tuple[int, int]:
        """Serve the guest's requests until it says the command is done: (status, length)."""
        while True:
            self._exit()
            op, _, _, length, _, status = self._request()
            if op == L.OP_READY:
                return status, length
            if op == L.OP_READV:
                self._serve_readv(length)
            elif op == L.OP_OPEN:
                self._serve_open()
            else:
                raise self._broke(f"unknown request {op:#x}")

    def _serve_readv(self, count: int) -> None:
        if count > L.MAX_SEGMENTS:
            raise self._broke(f"readv of {count} segments, more than {L.MAX_SEGMENTS}")
        assert self._ram is not None
        req = self._req()
        segments = [L.SEGMENT.unpack_from(req, i * L.SEGMENT.size) for i in range(count)]
        for i, (handle, reserved, offset, length, dest, _) in enumerate(segments):
            if handle >= len(self.files):
                raise self._broke(f"readv segment {i} reads handle {handle}, which does not exist")
            if reserved:
                raise self._broke(f"readv segment {i} has reserved bits {reserved:#x}")
            if length > MAX_OFFSET or offset > MAX_OFFSET - length:
                raise self._broke(
                    f"readv segment {i} reads {length} bytes at offset {offset}, past 2^63-1"
                )
            output = self._output
            if not _inside(dest, length, L.IN_BASE, L.IN_SIZE) and (
                output is None or not _inside(dest, length, *output)
            ):
                raise self._broke(
                    f"readv segment {i} writes {length} bytes at {dest:#x}, outside IN and"
                    " the command's output"
                )
        status = L.OK
        for i, (handle, _, offset, length, dest, _) in enumerate(segments):
            got = 0
            if status == L.OK and length:
                file = self.files[handle]
                try:
                    if output is not None and not _inside(dest, length, L.IN_BASE, L.IN_SIZE):
                        # Into the output: put off (the guest keeps off those bytes until
                        # it ends the command), up to where the file ends.
                        got = max(0, min(length, file.size - offset))
                        if got:
                            self._put_off_read(handle, offset, got, dest)
                    else:
                        got = self._read_now(file, offset, length, dest)
                except OSError as exc:  # here, or in reads put off and made now
                    self._failure = self._failure or exc
                    status = L.E_IO
                    got = 0
            _U64.pack_into(self._ram, L.REQ_BASE + i * L.SEGMENT.size + L.SEGMENT_GOT, got)
        self._answer(L.OP_READV, length=count, status=status)

    def _read_now(self, file: RandomAccessFile, offset: int, length: int, dest: int) -> int:
        """Read ``length`` bytes of ``file`` into guest memory at ``dest``: how many."""
        with self._view(dest, length) as view:
            got = read_through_holes(file, offset, view)
        if not 0 <= got <= length:
            raise IsolationError(f"{file.name}: readinto returned {got} for {length} bytes")
        return got

    def _put_off_read(self, handle: int, offset: int, length: int, dest: int) -> None:
        leave = self._leave
        if leave is not None:
            self._leave_bytes -= length
            if self._leave_bytes < 0:
                self._leave = leave = None  # from here on every one is made here
        put_off = self._put_off
        if put_off:
            last = put_off[-1]
            if last[0] == handle and last[1] + last[2] == offset and last[3] + last[2] == dest:
                last[2] += length  # the next bytes of the file, to the next of the output
                return
        if leave is not None and (len(put_off) >= self._leave_max or not leave(handle)):
            self._leave = leave = None
        if leave is None and len(put_off) >= PUT_OFF_MAX:
            self._make_put_off()
        self._put_off.append([handle, offset, length, dest])

    def _make_put_off(self) -> None:
        """Make the reads put off, in order, into guest memory."""
        put_off, self._put_off = self._put_off, []
        for handle, offset, length, dest in put_off:
            got = self._read_now(self.files[handle], offset, length, dest)
            if got < length:  # the file shrank since it was opened: zeros, as past its end
                with self._view(dest + got, length - got) as rest:
                    zero_fill(rest)

    def _serve_open(self) -> None:
        req = self._req()
        referrer, kind, name_length, format_length = L.OPEN_REQ.unpack_from(req)
        if referrer >= len(self.files):
            raise self._broke(f"open named by handle {referrer}, which does not exist")
        if kind not in (L.REF_BACKING, L.REF_DATA_FILE, L.REF_EXTENT, L.REF_PARENT):
            raise self._broke(f"open of unknown kind {kind}")
        room = L.REQ_SIZE - L.OPEN_REQ.size
        if name_length > room or format_length > room - name_length:
            raise self._broke(
                f"open request of {name_length} + {format_length} bytes does not fit in REQ"
            )
        if self._opener is None:
            raise self._broke("open asked of a VM that opens no file")
        start = L.OPEN_REQ.size
        name = req[start : start + name_length].decode("utf-8", "surrogateescape")
        start += name_length
        fmt = req[start : start + format_length].decode("utf-8", "surrogateescape")
        try:
            handle, size, code = self._opener(referrer, kind, name, fmt or None)
        except AbiViolation as exc:
            raise self._broke(str(exc)) from None
        except Exception as exc:
            self._failure = self._failure or exc
            self._answer(L.OP_OPEN, status=L.E_REFUSED)
            return
        self._answer(L.OP_OPEN, handle, size, code)

    def _image_error(self, status: int) -> ImageError:
        """The error a command's error record (in REQ) stands for."""
        req = self._req()
        layer, length = L.ERROR.unpack_from(req)
        if layer >= len(self.files):
            raise self._broke(f"error about handle {layer}, which does not exist")
        if length > L.REQ_SIZE - L.ERROR.size:
            raise self._broke(
                f"error message of {length} bytes, more than {L.REQ_SIZE - L.ERROR.size}"
            )
        message = req[L.ERROR.size : L.ERROR.size + length].decode("utf-8", "surrogateescape")
        kind = ImageError if status == L.E_IMAGE else UnsupportedImageError
        return kind(self.files[layer].name, message, FORMAT_NAMES.get(self.formats[layer]))

    # -- commands ----------------------------------------------------------------------

    def command(
        self,
        op: int,
        handle: int = 0,
        offset: int = 0,
        length: int = 0,
        address: int = 0,
        *,
        output: tuple[int, int] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Run one command (``CMD_*``): its result, READY's length.

        ``output`` is the range ``(address, length)`` the guest may read files into
        besides IN (inside OUT or one slot); those reads are made once the guest has
        ended the command (docs/kvm.md, "Reads the host finishes").  The host's own
        failure while serving the command (a file that could not be read, a refused
        open) is raised as it was raised; the guest's errors become :class:`ImageError`
        and its subclasses; anything it does wrong is an IsolationError.
        """
        if output is not None and not self._writable(*output):
            raise ValueError("output range outside OUT and the slots")

        def run() -> tuple[int, int]:
            self._output = output
            self._failure = None
            self._put_off = []
            self._answer(op, handle, offset, length, address)
            try:
                return self._wait_ready()
            finally:
                self._output = None

        status, result = self._guarded(run, self.timeout if timeout is None else timeout)
        failure, self._failure = self._failure, None
        if failure is not None:
            # The host's failure decides, whatever the guest made of it: the Python
            # decoders would have stopped at it.
            raise failure
        if status == L.OK and self._leave is None:
            self._make_put_off()
        if status == L.OK:
            if op == L.CMD_OPEN and result > MAX_OFFSET:
                raise self._broke(f"reported a virtual size of {result} bytes")
            if op == L.CMD_READ and result != length:
                raise self._broke(f"reported {result} bytes of output for a read of {length}")
            if op not in (L.CMD_OPEN, L.CMD_READ) and result > L.OUT_SIZE:
                raise self._broke(f"reported {result} bytes of output")
            return result
        if status in (L.E_IMAGE, L.E_UNSUPPORTED):
            raise self._image_error(status)
        if status == L.E_CORRUPT:
            raise ImageError(self.name, "compressed data does not decode")
        if status == L.E_TOOBIG:
            raise ImageError(self.name, f"compressed data decodes to more than {L.OUT_SIZE} bytes")
        if status == L.E_NOMEM:
            self.close()
            raise GuestOutOfMemory(
                f"{self.name}: the guest reader ran out of memory"
                f" (its limit is {L.HEAP_SIZE >> 20} MiB)"
            )
        if status == L.E_REQUEST:
            raise self._fail(f"refused the request {op:#x}")
        if status in (L.E_IO, L.E_REFUSED):
            raise self._broke(f"status {status} when the host failed nothing")
        raise self._broke(f"status {status}")

    def open(self, fmt: int, *, timeout: float | None = None) -> int:
        """Open the image in handle 0 as ``fmt`` (``FMT_*``): its virtual size."""
        if not self.files:
            raise ValueError("no image to open")
        return self.command(L.CMD_OPEN, 0, fmt, self.files[0].size, timeout=timeout)

    def read(
        self,
        offset: int,
        length: int,
        address: int,
        *,
        timeout: float | None = None,
        leave: Callable[[int], bool] | None = None,
        leave_max: int = 0,
        leave_bytes: int = 0,
    ) -> list[list[int]]:
        """Decode the open image's ``[offset, offset + length)`` into guest memory at
        ``address`` (inside OUT or one slot).

        With ``leave``, up to ``leave_max`` reads of files whose handle it accepts,
        ``leave_bytes`` in all, are left to the caller, who must make them, in order,
        over the guest's output: returned as ``[handle, offset, length, offset in the
        output]`` (a file's end within them reads as zeros).  Without, or once a read
        cannot be left, none is.
        """
        if not 0 <= offset <= MAX_OFFSET - length or length < 0:
            raise ValueError("read out of range")
        self._leave, self._leave_max, self._leave_bytes = leave, leave_max, leave_bytes
        try:
            self.command(
                L.CMD_READ, 0, offset, length, address, output=(address, length), timeout=timeout
            )
            left = self._put_off  # none unless they may be left
            for extent in left:
                extent[3] -= address
            return left
        finally:
            self._put_off, self._leave = [], None

    def output(self, length: int) -> bytes:
        """The first ``length`` bytes of OUT (``length`` as a command returned it)."""
        if self._ram is None:
            raise IsolationError(f"{self.name}: the guest reader is closed")
        if not 0 <= length <= L.OUT_SIZE:
            raise ValueError("length out of range")
        return self._ram[L.OUT_BASE : L.OUT_BASE + length]

    def copy_output(self, buf: memoryview) -> None:
        """Fill ``buf`` from the start of OUT."""
        if self._ram is None:
            raise IsolationError(f"{self.name}: the guest reader is closed")
        if len(buf) > L.OUT_SIZE:
            raise ValueError("length out of range")
        with self._view(L.OUT_BASE, len(buf)) as out:
            buf[:] = out

    def input(self, data: bytes) -> int:
        """Put ``data`` at the start of IN: its length."""
        if self._ram is None:
            raise IsolationError(f"{self.name}: the guest reader is closed")
        if len(data) > L.IN_SIZE:
            raise ValueError(f"input larger than the window ({L.IN_SIZE} bytes)")
        self._ram[L.IN_BASE : L.IN_BASE + len(data)] = data
        return len(data)

    def zlib(self, data: bytes) -> bytes:
        """Inflate the zlib stream ``data``, inside the guest."""
        return self.output(self.command(L.CMD_ZLIB, length=self.input(data)))

    def zstd(self, data: bytes) -> bytes:
        """Decompress the zstd frames ``data``, inside the guest."""
        return self.output(self.command(L.CMD_ZSTD, length=self.input(data)))

    @property
    def closed(self) -> bool:
        return self._run is None

    def close(self) -> None:
        """Destroy the VM; idempotent.  The files and memories stay the caller's."""
        for area in (self._run, self._ram):
            # A view may outlive the VM (a traceback of a stopped read holds one): the
            # pages then go with the last view.
            if area is not None:
                try:  # noqa: SIM105  (not contextlib: the guest's start-up)
                    area.close()
                except BufferError:
                    pass
        self._run = self._ram = None
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()
        self._vm = self._vcpu = -1

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
