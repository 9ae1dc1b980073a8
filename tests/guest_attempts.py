"""Test-only requests: the guest tries something its sandbox forbids and says what happened.

Not shipped: the tests start their guests with the entry point :data:`ENTRY`
(tests/guest_entry.py), which registers :func:`run` for the ``attempt`` request and then
runs the real guest.  :func:`attempt` asks it from the host.  Each attempt returns a short
result string, e.g. ``"ok: ..."`` or ``"PermissionError: ..."``; an attempt stopped by
seccomp never returns, because the filter kills the guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import resource
import socket
import sys
import time

from aiodd.guest import sandbox
from aiodd.guest.protocol import Call

# The guest imports this module too: not typing (tests/test_startup.py asks the guest
# what it imported), nor the modules below.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import VirtualDisk
    from aiodd.guest.child import Guest
    from aiodd.guest.disk import GuestDisk

ENTRY = "tests.guest_entry"
"""The module the guests of these tests run (:attr:`GuestOptions.entry`)."""

PTRACE_ATTACH = 16
KVM_GET_REGS = 0x8090AE81  # a vCPU ioctl the KVM guest reader's monitor has no use for


def attempt(disk: GuestDisk, what: str, arg: object = None, timeout: float = 10.0) -> str:
    """Ask the guest of ``disk`` to try ``what``; its result, or the error it died of."""
    done = disk.channel.call(
        Call("attempt", {"what": what, "arg": arg}),
        timeout,
        cpu=0.0,
        late=f"did not answer within {timeout:g} s (watchdog)",
    )
    if done.error is not None:
        raise disk.error_of(done.error)
    return done.result or ""


def run(guest: Guest, request: Call) -> str:
    """The guest's side (runs inside the sandbox); a failure is a result, except running
    out of memory, which the host reports as it would for a read."""
    try:
        return _run(guest, request.args.get("what"), request.args.get("arg"))
    except MemoryError:
        raise
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"


def _run(guest: Guest, what: object, arg: object) -> str:
    if what == "open":
        fd = os.open(str(arg), os.O_RDONLY)
        try:
            return "ok: " + os.read(fd, 64).hex()
        finally:
            os.close(fd)
    if what == "stat":
        os.stat(str(arg))
        return "ok"
    if what == "listdir":
        return "ok: " + ",".join(sorted(os.listdir(str(arg))))
    if what == "fds":  # what each open descriptor names
        names = []
        for entry in sorted(os.listdir("/proc/self/fd"), key=int):
            with contextlib.suppress(OSError):
                names.append(os.readlink(f"/proc/self/fd/{entry}"))
        return "ok: " + "\n".join(names)
    if what == "exec":
        os.execv(str(arg), [str(arg)])
    if what == "connect":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect(("127.0.0.1", int(str(arg))))
            return "ok: connected"
        finally:
            sock.close()
    if what == "ptrace":
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.ptrace(PTRACE_ATTACH, int(str(arg)), None, None)
        return "ok" if rc == 0 else "errno: " + os.strerror(ctypes.get_errno())
    if what == "write_memfd":
        # A descriptor the guest holds and may write through mmap, but not extend.
        fd = os.memfd_create("probe") if arg == "new" else guest.input_fd
        os.write(fd, b"x")
        return "ok: wrote"
    if what == "dup":
        count = 0
        held = []
        try:
            while count < 100_000:
                held.append(os.dup(0 if guest.input_fd < 0 else guest.input_fd))
                count += 1
        except OSError as exc:
            return f"stopped after {count}: {exc.strerror}"
        finally:
            for fd in held:
                os.close(fd)
        return f"ok: {count}"
    if what == "alloc":
        block = bytearray(int(str(arg)))
        return f"ok: {len(block)}"
    if what == "spin":
        while True:
            pass
    if what == "spin_reads":  # every further read spins, on whichever thread serves it
        guest.disk = _SpinningDisk()
        return "ok"
    if what == "slow_reads":  # every further read waits half a second first
        guest.disk = _SlowDisk(guest.disk)
        return "ok"
    if what == "lane_noise":  # an answer on every read lane, to no read the host sent
        for lane in guest.lanes:
            lane.send(b'{"op": "done", "id": 424242}')
        return f"ok: {len(guest.lanes)}"
    if what == "expected_mode":  # what the host told the guest to expect
        from aiodd.guest import child

        return child.expected_mode()
    if what == "expected_format":
        from aiodd.guest import child

        return child.expected_format()
    if what == "deep_nesting":  # a message nested past the host's recursion limit
        guest.link.sock.send(b'{"op": "resolve", "rid": ' + b"[" * 30000)
        return "ok"
    if what == "kvm_ioctl":
        # An ioctl the KVM rule does not allow: on a descriptor that is not the VM's
        # (stdin, /dev/null: the kernel would say ENOTTY), or a request the monitor does
        # not make (the kernel would answer it).
        reader = guest.reader
        if reader is None:
            return "no VM"
        calls: list[tuple[int, int, int | bytearray]] = []
        if arg == "other-fd":
            calls += [(0, request, 0) for request in reader.ioctl_requests]
        else:
            assert KVM_GET_REGS not in reader.ioctl_requests
            calls += [(fd, KVM_GET_REGS, bytearray(144)) for fd in reader.ioctl_fds]
        results = []
        for fd, request, buf in calls:
            try:
                fcntl.ioctl(fd, request, buf)
                results.append("ok")
            except OSError as exc:
                results.append(str(exc.strerror))
        return ", ".join(results)
    if what == "kvm_vms":
        # how many VMs read, and how many have opened the image (the second opens it
        # at its first read)
        reader = guest.reader
        if reader is None:
            return "no VM"
        return f"{reader.vms} VMs, {len(reader._open_vms)} opened"
    if what == "modules":  # which of these modules (or ".suffix"es) the guest imported
        names = [str(name) for name in arg] if isinstance(arg, list) else []
        suffixes = tuple(name for name in names if name.startswith("."))
        return "ok: " + ",".join(
            sorted(m for m in sys.modules if m in names or m.endswith(suffixes))
        )
    if what == "ids":
        return f"uid={os.getuid()} nnp={sandbox.get_no_new_privs()}"
    if what == "setrlimit":
        resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY,) * 2)
        return "ok"
    return f"unknown attempt {what!r}"


class _SpinningDisk:
    format_name = "raw"
    virtual_size = 1 << 30

    def read_into(self, offset: int, buf: memoryview) -> None:
        while True:
            pass

    def close(self) -> None:
        pass


class _SlowDisk:
    def __init__(self, disk: VirtualDisk | None) -> None:
        assert disk is not None
        self._disk = disk
        self.format_name = disk.format_name
        self.virtual_size = disk.virtual_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        time.sleep(0.5)
        self._disk.read_into(offset, buf)

    def close(self) -> None:
        self._disk.close()
