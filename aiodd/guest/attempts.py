"""Test-only requests: the guest tries something its sandbox forbids and says what happened.

The host sends ``attempt`` messages only when ``AIODD_GUEST_TEST=1`` is set in its own
environment (the test-suite sets it); the guest ignores them otherwise.  Each attempt
returns a short result string, e.g. ``"ok: ..."`` or ``"PermissionError: ..."``; an
attempt stopped by seccomp never returns, because the filter kills the guest.
"""

from __future__ import annotations

import ctypes
import os
import socket
from typing import TYPE_CHECKING

from aiodd.guest import sandbox
from aiodd.guest.protocol import Message

if TYPE_CHECKING:
    from aiodd.guest.child import Guest

PTRACE_ATTACH = 16


def run(guest: Guest, message: Message) -> str:
    what = message.get("what")
    arg = message.get("arg")
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
    if what == "ids":
        return f"uid={os.getuid()} nnp={sandbox.get_no_new_privs()}"
    if what == "setrlimit":
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY,) * 2)
        return "ok"
    return f"unknown attempt {what!r}"
