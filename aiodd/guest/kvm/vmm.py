"""The virtual machine monitor of the KVM guest reader, in pure Python (docs/kvm.md).

``fcntl.ioctl`` and ``mmap`` over ``/dev/kvm``: one VM, one vCPU, guest RAM of a fixed
size (:mod:`aiodd.guest.kvm.layout` maps it), the guest's ELF loaded W^X, and the guest
entered straight in 64-bit mode at CPL3.  The guest talks to the host only through the
mailbox and the doorbell port; every other way it can stop (a fault, a port the TSS
does not open, a spin past the watchdog) ends the VM with one :class:`IsolationError`.

The vCPU runs in the calling thread, which must be the process's main thread: the
watchdog is a repeating ``ITIMER_PROF`` whose ``SIGPROF`` interrupts ``KVM_RUN`` there.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Final, TypeVar

from aiodd.errors import ImageError, IsolationError
from aiodd.guest.kvm import elf
from aiodd.guest.kvm import layout as L

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
    for addr in range(L.STACK_BASE, L.STACK_TOP, L.PAGE):
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


class _Template:
    """What every VM's RAM starts with, but the canary: built once per guest binary."""

    def __init__(self, path: Path) -> None:
        image = elf.parse(path.read_bytes())
        self.entry = image.entry
        self.pieces: list[tuple[int, bytes]] = [(L.GDT, _gdt()), (L.TSS, _tss())]
        self.pieces += _page_tables(image).items()
        self.pieces += [(seg.vaddr, seg.data) for seg in image.segments]


_templates: dict[tuple[str, int, int], _Template] = {}
_cpuid: bytearray | None = None


def _template(path: Path) -> _Template:
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
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


_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


def _stop_watchdog(previous: _Handler) -> None:
    _Watchdog.deadline = None  # first: from here on the handler never raises
    signal.setitimer(signal.ITIMER_PROF, 0, 0)
    # None: the previous handler was not set from Python; the default is all we can give
    signal.signal(signal.SIGPROF, previous if previous is not None else signal.SIG_DFL)


# -- the VM ----------------------------------------------------------------------------


class GuestVM:
    """One guest reader in a KVM micro-VM, booted and waiting for its first command.

    ``files`` are the descriptors the guest may read, by handle (their index);
    ``name`` is the image, for messages.  Every method raises :class:`IsolationError`
    when the guest misbehaves or the watchdog stops it; the VM is then closed.
    """

    def __init__(
        self,
        files: Sequence[int] = (),
        *,
        name: str = "image",
        guest: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        from aiodd.guest.kvm import GUEST, KVM_DEVICE

        if threading.current_thread() is not threading.main_thread():
            raise IsolationError(f"{name}: the KVM guest reader must run in the main thread")
        self.name = name
        self.files = tuple(files)
        self.timeout = timeout
        self._fds: list[int] = []
        self._ram: mmap.mmap | None = None
        self._run: mmap.mmap | None = None
        self._vcpu = -1
        started = time.perf_counter()
        try:
            template = _template(guest if guest is not None else GUEST)
            kvm = self._open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
            if fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0) != API_VERSION:
                raise OSError("KVM API version is not 12")
            vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
            self._fds.append(vm)
            self._ram = ram = mmap.mmap(-1, L.RAM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for addr, data in template.pieces:
                ram[addr : addr + len(data)] = data
            canary = bytearray(os.urandom(8))
            canary[0] = 0  # a string overflow cannot forge it (as glibc does)
            ram[L.FS_PAGE + L.CANARY_OFFSET : L.FS_PAGE + L.CANARY_OFFSET + 8] = canary
            host = ctypes.addressof(ctypes.c_char.from_buffer(ram))
            region = struct.pack("<IIQQQ", 0, 0, 0, L.RAM_SIZE, host)
            fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
            with contextlib.suppress(OSError):  # Intel VMX wants it; PVM may not know it
                fcntl.ioctl(vm, KVM_SET_TSS_ADDR, L.VMX_TSS)
            self._vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
            self._fds.append(self._vcpu)
            size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
            self._run = mmap.mmap(self._vcpu, size, mmap.MAP_SHARED)
            cpuid = _supported_cpuid(kvm)
            fcntl.ioctl(self._vcpu, KVM_SET_CPUID2, cpuid, True)
            self._set_registers(template.entry)
        except OSError as exc:
            self.close()
            raise IsolationError(f"{name}: the KVM guest reader could not start: {exc}") from None
        except ValueError as exc:  # the guest binary failed the ELF checks
            self.close()
            raise IsolationError(f"{name}: the KVM guest binary is invalid: {exc}") from None
        status, _ = self._guarded(self._wait_ready)
        if status != L.OK:
            raise self._fail(f"broke the ABI (status {status} at start)")
        self.start_time = time.perf_counter() - started

    def _open(self, path: str, flags: int) -> int:
        fd = os.open(path, flags)
        self._fds.append(fd)
        return fd

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

    # -- running -----------------------------------------------------------------------

    def _fail(self, what: str) -> IsolationError:
        self.close()
        return IsolationError(f"{self.name}: the guest reader {what}")

    def _guarded(self, body: Callable[[], T]) -> T:
        """Run ``body`` under the watchdog; any failure closes the VM."""
        if self._run is None:
            raise IsolationError(f"{self.name}: the guest reader is closed")
        try:
            previous = signal.signal(signal.SIGPROF, _on_tick)
        except ValueError:  # not the main thread
            raise self._fail("must run in the main thread") from None
        try:
            try:
                _Watchdog.deadline = time.monotonic() + self.timeout
                signal.setitimer(signal.ITIMER_PROF, _TICK, _TICK)
                return body()
            finally:
                _stop_watchdog(previous)
        except _Expired:
            # The handler fires once; if that was inside the first stop, finish it here.
            _stop_watchdog(previous)
            raise self._fail(
                f"did not finish within {self.timeout:g} s (watchdog) and was stopped"
            ) from None
        except BaseException:
            self.close()
            raise

    def _exit(self) -> tuple[int, int]:
        """Run the vCPU to its next doorbell: (port, value) of the ``out``.  Any other
        exit ends the VM with an IsolationError."""
        assert self._run is not None
        run = self._run
        while True:
            try:
                fcntl.ioctl(self._vcpu, KVM_RUN, 0)
            except InterruptedError:
                continue  # a watchdog tick: its handler has run (and raised if late)
            except OSError as exc:
                raise self._fail(f"could not be run ({exc.strerror})") from None
            reason = _U32.unpack_from(run, _RUN_EXIT_REASON)[0]
            if reason == EXIT_INTR:
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

    def _request(self) -> tuple[int, int, int, int, int]:
        """The guest's descriptor, copied out of shared memory once."""
        assert self._ram is not None
        op, handle, offset, length, status = L.DESC.unpack_from(self._ram, L.MAILBOX)
        return op, handle, offset, length, status

    def _answer(self, op: int, handle: int, offset: int, length: int, status: int) -> None:
        assert self._ram is not None
        L.DESC.pack_into(self._ram, L.MAILBOX, op, handle, offset, length, status)

    def _wait_ready(self) -> tuple[int, int]:
        """Serve the guest's reads until it says the command is done: (status, length)."""
        while True:
            self._exit()
            op, handle, offset, length, status = self._request()
            if op == L.OP_READY:
                return status, length
            if op != L.OP_READ:
                raise self._fail(f"broke the ABI (unknown request {op:#x})")
            self._serve_read(handle, offset, length)

    def _serve_read(self, handle: int, offset: int, length: int) -> None:
        if handle >= len(self.files):
            raise self._fail(f"broke the ABI (read from handle {handle}, which does not exist)")
        if length > L.IN_SIZE or offset > MAX_OFFSET - length:
            raise self._fail(
                f"broke the ABI (read of {length} bytes at offset {offset} is out of range)"
            )
        assert self._ram is not None
        done = 0
        status = L.OK
        with memoryview(self._ram) as ram:
            window = ram[L.IN_BASE : L.IN_BASE + length]
            try:
                while done < length:
                    got = os.preadv(self.files[handle], [window[done:]], offset + done)
                    if got == 0:
                        break
                    done += got
            except OSError:
                status = L.E_IO
            finally:
                window.release()
        self._answer(L.OP_READ, handle, offset, done, status)

    # -- commands ----------------------------------------------------------------------

    def command(self, op: int, handle: int = 0, offset: int = 0, length: int = 0) -> int:
        """Run one command (``CMD_*``); returns the byte count it left in OUT.

        Raises :class:`ImageError` when the data does not decode, IsolationError for
        anything the guest does wrong.
        """

        def run() -> tuple[int, int]:
            self._answer(op, handle, offset, length, 0)
            return self._wait_ready()

        status, produced = self._guarded(run)
        if status == L.OK:
            if produced > L.OUT_SIZE:
                raise self._fail(f"broke the ABI (reported {produced} bytes of output)")
            return produced
        if status == L.E_CORRUPT:
            raise ImageError(self.name, "compressed data does not decode")
        if status == L.E_TOOBIG:
            raise ImageError(self.name, f"compressed data decodes to more than {L.OUT_SIZE} bytes")
        if status == L.E_NOMEM:
            raise self._fail(f"ran out of memory (its limit is {L.HEAP_SIZE >> 20} MiB)")
        if status == L.E_IO:
            raise ImageError(self.name, "the image could not be read")
        if status == L.E_REQUEST:
            raise self._fail(f"refused the request {op:#x}")
        raise self._fail(f"broke the ABI (status {status})")

    def output(self, length: int) -> bytes:
        """The first ``length`` bytes of OUT (``length`` as a command returned it)."""
        if self._ram is None:
            raise IsolationError(f"{self.name}: the guest reader is closed")
        if not 0 <= length <= L.OUT_SIZE:
            raise ValueError("length out of range")
        return self._ram[L.OUT_BASE : L.OUT_BASE + length]

    def _input(self, data: bytes) -> int:
        if self._ram is None:
            raise IsolationError(f"{self.name}: the guest reader is closed")
        if len(data) > L.IN_SIZE:
            raise ValueError(f"input larger than the window ({L.IN_SIZE} bytes)")
        self._ram[L.IN_BASE : L.IN_BASE + len(data)] = data
        return len(data)

    def raw(self, handle: int, offset: int, length: int) -> bytes:
        """``length`` bytes of file ``handle`` at ``offset``; short at its end, as pread."""
        if not 0 <= length <= L.OUT_SIZE or not 0 <= offset <= MAX_OFFSET - length:
            raise ValueError("read out of range")
        return self.output(self.command(L.CMD_RAW, handle, offset, length))

    def zlib(self, data: bytes) -> bytes:
        """Inflate the zlib stream ``data``, inside the guest."""
        return self.output(self.command(L.CMD_ZLIB, length=self._input(data)))

    def zstd(self, data: bytes) -> bytes:
        """Decompress the zstd frames ``data``, inside the guest."""
        return self.output(self.command(L.CMD_ZSTD, length=self._input(data)))

    def close(self) -> None:
        """Destroy the VM; idempotent.  The caller's files stay open."""
        for area in (self._run, self._ram):
            if area is not None:
                area.close()
        self._run = self._ram = None
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
