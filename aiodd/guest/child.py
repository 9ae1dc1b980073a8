"""The guest reader's side: runs in a fresh process started by :mod:`aiodd.guest.host`.

It imports everything decoding needs, receives its descriptors (the input image and the
shared memory), puts itself in the sandbox (:mod:`aiodd.guest.sandbox`) and only then
reads image bytes.  From then on it can read the descriptors it holds, use memory and
talk on its control socket; each further file the image names is asked of the host, which
decides under the backing-file policy and answers with a descriptor or a refusal.
"""

from __future__ import annotations

import codecs
import mmap
import os
import queue
import socket
import sys
import threading
import time

# Everything decoding may need is imported here, before the sandbox forbids open().
import zlib  # noqa: F401
from collections.abc import Callable
from typing import Any

import zstandard  # noqa: F401  # the qcow2 decoder's zstd clusters

from aiodd.errors import ImageError
from aiodd.formats import decoders
from aiodd.formats.base import RandomAccessFile, Reference, VirtualDisk
from aiodd.guest import protocol, sandbox, seccomp
from aiodd.guest.protocol import Message
from aiodd.io import LocalFile

# Codecs are imported on first use: look up every one a decoder may use, now.
for _codec in ("utf-8", "utf-16-le", "utf-16-be", "utf-16", "latin-1", "ascii"):
    codecs.lookup(_codec)

WORKERS = 2
M_TRIM_THRESHOLD = -1
M_ARENA_MAX = -8
THREAD_STACK = 1 << 20  # worker threads need little stack; keeps RLIMIT_AS meaningful
# A vmdk descriptor may name up to 4096 extents (vmdk_layout.MAX_EXTENTS), each an open
# file, plus a chain of 64 layers: the guest must be able to hold them all.
MAX_FDS = 4096 + 256


class Channel:
    """The control socket, shared by the receiving thread and the workers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._waiters: dict[int, list[Any]] = {}
        self._lock = threading.Lock()
        self._next = 0

    def send(self, message: Message) -> None:
        data = protocol.encode(message)
        with self._send_lock:
            try:
                self.sock.send(data)
            except OSError:
                os._exit(1)

    def ask(self, message: Message) -> tuple[Message, list[int]]:
        """Send a request to the host and wait for its answer."""
        event = threading.Event()
        with self._lock:
            self._next += 1
            rid = self._next
            slot: list[Any] = [event, None, []]
            self._waiters[rid] = slot
        self.send({**message, "rid": rid})
        event.wait()
        answer: Message = slot[1]
        fds: list[int] = slot[2]
        return answer, fds

    def answered(self, message: Message, fds: list[int]) -> None:
        with self._lock:
            slot = self._waiters.pop(message.get("rid", -1), None)
        if slot is None:
            for fd in fds:
                os.close(fd)
            return
        slot[1], slot[2] = message, fds
        slot[0].set()


class GuestResolver:
    """Resolver whose every answer comes from the host's policy."""

    def __init__(self, channel: Channel, layer: int) -> None:
        self._channel = channel
        self._layer = layer

    def _ask(self, ref: Reference, disk: bool) -> tuple[LocalFile, int]:
        answer, fds = self._channel.ask(
            {
                "op": "resolve",
                "layer": self._layer,
                "kind": ref.kind,
                "name": ref.name,
                "referrer": ref.referrer,
                "format": ref.format,
                "disk": disk,
            }
        )
        error = answer.get("error")
        if error is not None or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            cls = protocol.ERROR_CLASSES.get(str(error and error.get("class")), ImageError)
            err = error or {}
            raise cls(str(err.get("file", ref.referrer)), str(err.get("message", "refused")))
        return LocalFile(fds[0], ref.name), int(answer["layer"])

    def open_file(self, ref: Reference) -> RandomAccessFile:
        return self._ask(ref, disk=False)[0]

    def open_disk(self, ref: Reference) -> VirtualDisk:
        file, layer = self._ask(ref, disk=True)
        try:
            return decoders.open_disk(file, GuestResolver(self._channel, layer), ref.format)
        except BaseException:
            file.close()
            raise


class Guest:
    def __init__(self, channel: Channel, init: Message, fds: list[int]) -> None:
        self.channel = channel
        self.init = init
        self.input_fd = fds[0] if fds else -1
        self.mems: list[mmap.mmap] = []
        for fd, size in zip(fds[1:], init.get("mems", []), strict=False):
            self.mems.append(mmap.mmap(fd, size))
            os.close(fd)
        self.disk: VirtualDisk | None = None
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.test = bool(init.get("test"))

    # -- sandbox -------------------------------------------------------------------

    def enter_sandbox(self) -> dict[str, str]:
        wanted = set(self.init.get("layers", sandbox.LAYERS))
        status: dict[str, str] = {}
        base_vm = sandbox.vm_size()

        def attempt(name: str, fn: Callable[[], str]) -> None:
            if name not in wanted:
                status[name] = "disabled: not requested"
                return
            try:
                status[name] = "active: " + fn()
            except OSError as exc:
                status[name] = f"missing: {exc.strerror or exc}"

        # glibc reads /proc/sys/vm/overcommit_memory the first time it shrinks a thread's
        # heap: an open() the seccomp filter would kill.  Never shrinking avoids it.
        sandbox.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        # Each thread arena reserves 64-128 MiB of address space up front, which would eat
        # the RLIMIT_AS budget; one arena for all threads keeps the limit about real memory.
        sandbox.mallopt(M_ARENA_MAX, 1)
        # glibc loads libgcc_s on demand (thread exit and unwinding after a failed
        # allocation): an open() the seccomp filter would kill.  Load it while we may.
        sandbox.preload_unwinder()
        time.localtime()  # loads the time zone (a file) now rather than later
        attempt("namespaces", sandbox.namespaces)
        attempt("no_new_privs", sandbox.no_new_privs)
        attempt("landlock", sandbox.landlock)
        nofile = int(self.init.get("nofile", MAX_FDS))
        cpu = int(self.init.get("cpu", 60))
        attempt("rlimits", lambda: sandbox.rlimits(nofile, cpu))
        threading.stack_size(THREAD_STACK)
        for _ in range(WORKERS):
            threading.Thread(target=self.worker, daemon=True).start()
        if "rlimits" in wanted and status["rlimits"].startswith("active"):
            budget = int(self.init.get("memory_limit", 1 << 30))
            limit = base_vm + budget + (WORKERS + 2) * 2 * THREAD_STACK
            try:
                sandbox.limit_address_space(limit)
                status["rlimits"] += f", AS={limit >> 20} MiB"
            except OSError as exc:
                status["rlimits"] = f"missing: RLIMIT_AS: {exc.strerror}"
        if "no_new_privs" not in wanted or not status["no_new_privs"].startswith("active"):
            if "seccomp" in wanted:
                status["seccomp"] = "missing: needs no_new_privs"
            else:
                status["seccomp"] = "disabled: not requested"
        else:

            def install_seccomp() -> str:
                seccomp.install(self.channel.sock.fileno())
                return "allow-list; open/exec/socket/ptrace/... kill the guest"

            attempt("seccomp", install_seccomp)
        return status

    # -- work ----------------------------------------------------------------------

    def worker(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()

    def open(self) -> None:
        try:
            file = LocalFile(self.input_fd, str(self.init.get("name", "")))
            resolver = GuestResolver(self.channel, 0)
            fmt = self.init.get("fmt")
            self.disk = decoders.open_disk(file, resolver, fmt if isinstance(fmt, str) else None)
            self.channel.send(
                {
                    "op": "opened",
                    "format": self.disk.format_name,
                    "virtual_size": self.disk.virtual_size,
                }
            )
        except BaseException as exc:
            self.channel.send({"op": "failed", "error": protocol.error_to_wire(exc)})

    def read(self, message: Message) -> None:
        rid = message.get("id")
        try:
            disk = self.disk
            if disk is None:
                raise ImageError(str(self.init.get("name")), "read before the image was opened")
            mem = self.mems[protocol.int_field(message, "mem", 0, len(self.mems) - 1)]
            moff = protocol.int_field(message, "moff", 0, len(mem))
            length = protocol.int_field(message, "len", 0, len(mem) - moff)
            offset = protocol.int_field(message, "offset")
            with memoryview(mem) as view:
                disk.read_into(offset, view[moff : moff + length])
            self.channel.send({"op": "done", "id": rid})
        except BaseException as exc:
            self.channel.send({"op": "done", "id": rid, "error": protocol.error_to_wire(exc)})

    def attempt(self, message: Message) -> None:
        """Test-only: try a forbidden thing and say what happened."""
        from aiodd.guest import attempts

        rid = message.get("id")
        try:
            result = attempts.run(self, message)
        except MemoryError as exc:
            self.channel.send({"op": "done", "id": rid, "error": protocol.error_to_wire(exc)})
            return
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        self.channel.send({"op": "done", "id": rid, "result": result})

    def serve(self) -> None:
        sock = self.channel.sock
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, protocol.MAX_MESSAGE, 16)
            except OSError:
                os._exit(1)
            if not data:
                os._exit(0)
            message = protocol.decode(data)
            op = message["op"]
            if op == "read":
                self.jobs.put(lambda m=message: self.read(m))  # type: ignore[misc]
            elif op == "resolved":
                self.channel.answered(message, fds)
            elif op == "attempt" and self.test:
                self.jobs.put(lambda m=message: self.attempt(m))  # type: ignore[misc]
            elif op == "close":
                os._exit(0)
            else:
                os._exit(2)


def main(control_fd: int) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=control_fd)
    channel = Channel(sock)
    data, fds, _flags, _addr = socket.recv_fds(sock, protocol.MAX_MESSAGE, 16)
    if not data:
        os._exit(0)
    init = protocol.decode(data)
    if init.get("test"):
        from aiodd.guest import attempts  # noqa: F401 - imported while imports still work
    guest = Guest(channel, init, fds)
    status = guest.enter_sandbox()
    missing = [name for name, line in status.items() if line.startswith("missing")]
    channel.send({"op": "ready", "layers": status})
    if missing and init.get("require"):
        os._exit(3)
    if init.get("probe"):
        os._exit(0)
    guest.jobs.put(guest.open)
    guest.serve()
    sys.exit(0)  # pragma: no cover - serve() never returns
