"""The host's side of the guest reader: start it, feed it, answer it, watch it.

:func:`open_guest` hands the user's already-opened image to a fresh guest process and
returns a :class:`GuestDisk`, a :class:`~aiodd.formats.base.VirtualDisk` whose reads are
done by the guest straight into shared memory.  A thread per guest receives its messages:
answers to reads, and requests for the files the image names, which are resolved here
under the :class:`~aiodd.policy.Policy` and sent back as descriptors.

The watchdog: every request has a deadline (a floor plus time proportional to the bytes
asked); a guest that misses it is killed and the read raises :class:`IsolationError`.
The guest's ``RLIMIT_CPU`` is raised by the same amount as work is asked, so a guest
spinning on the CPU dies of it even if the host stopped watching.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from aiodd.errors import AioddError, ImageError, IsolationError, PolicyError, UsageError
from aiodd.formats.base import Reference
from aiodd.guest import protocol, sandbox
from aiodd.guest.protocol import Message
from aiodd.policy import Layer, Policy

MAX_FILES = 4096
"""References one image may resolve (vmdk extents included) before the guest is stopped."""

STAGE = 4 << 20
"""Size of each staging slot used when the caller's buffer is not shared memory."""


class IsolationWarning(UserWarning):
    """A sandbox layer could not be set up; the guest runs with the others."""


@dataclass(frozen=True)
class GuestOptions:
    """Knobs of the guest reader (the defaults are the product's)."""

    layers: tuple[str, ...] = sandbox.LAYERS
    memory_limit: int = 1 << 30  # bytes the guest may allocate beyond its start-up size
    watchdog_floor: float = 15.0  # seconds every request may take
    watchdog_rate: float = 16 << 20  # bytes per second a request must at least progress
    open_timeout: float = 30.0  # seconds without progress while opening
    start_cpu: int = 35  # CPU seconds for start-up and opening; each request adds its deadline
    require_isolation: bool = False


_BOOT = (
    "import sys,json;sys.path[:]=json.loads(sys.argv[2]);"
    "from aiodd.guest.child import main;main(int(sys.argv[1]))"
)


class _Process:
    """A started guest, possibly not yet given any work."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        paths = [p for p in sys.path if p and os.path.isabs(p)]
        env = {k: v for k, v in os.environ.items() if k in ("LD_LIBRARY_PATH",)}
        stderr = None if os.environ.get("AIODD_GUEST_STDERR") == "1" else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, str(child.fileno()), json.dumps(paths)],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                cwd="/",
            )
        except OSError as exc:
            parent.close()
            raise IsolationError(f"cannot start the guest reader: {exc.strerror}") from None
        finally:
            child.close()
        self.sock = parent


_spare: _Process | None = None
_spare_lock = threading.Lock()


def prestart() -> None:
    """Start a guest now so that the next :func:`open_guest` finds it ready.

    Meant for the CLI to call first thing: the guest's interpreter start-up and imports
    then overlap with the host's own.
    """
    global _spare
    with _spare_lock:
        if _spare is None:
            _spare = _Process()


def discard_prestarted() -> None:
    """Stop the guest :func:`prestart` started if no copy took it (one stopped first)."""
    global _spare
    with _spare_lock:
        proc, _spare = _spare, None
    if proc is not None:
        proc.sock.close()
        with contextlib.suppress(OSError):
            proc.proc.kill()
        proc.proc.wait()


def _take() -> _Process:
    global _spare
    with _spare_lock:
        proc, _spare = _spare, None
    if proc is not None and proc.proc.poll() is None:
        return proc
    return _Process()


@dataclass
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    result: str | None = None


class GuestDisk:
    """A virtual disk decoded by the guest reader."""

    def __init__(
        self,
        name: str,
        process: _Process,
        policy: Policy,
        top: Layer,
        options: GuestOptions,
    ) -> None:
        self._name = name
        self._process = process
        self._sock = process.sock
        self._policy = policy
        self._layers: list[Layer] = [top]
        self._options = options
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._ready = _Pending()
        self._opened = _Pending()
        self._progress = 0
        self._dead: IsolationError | None = None
        self._killed_for: str | None = None
        self._policy_error: ImageError | None = None
        self._files = 0
        self._cpu_budget = 0.0
        self._closed = False
        self.isolation: dict[str, str] = {}
        self.format_name = ""
        self.virtual_size = 0
        self._mems: list[tuple[int, int, int]] = []  # (mem id, base address, size)
        self._stage: mmap.mmap | None = None
        self._stage_slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._pump = threading.Thread(target=self._receive, name="aiodd-guest", daemon=True)

    # -- start ---------------------------------------------------------------------

    def start(
        self, input_fd: int, fmt: str | None, memory: mmap.mmap | None, *, probe: bool = False
    ) -> None:
        fds = [] if probe else [input_fd]
        sizes: list[int] = []
        shared_fd = getattr(memory, "memfd", None)
        if memory is not None and isinstance(shared_fd, int) and len(memory) > 0:
            fds.append(shared_fd)
            sizes.append(len(memory))
            self._mems.append((0, _address(memory), len(memory)))
        if not probe:
            stage = shared_buffer(2 * STAGE)
            self._stage = stage
            fds.append(stage.memfd)
            sizes.append(len(stage))
            self._stage_slots.put(0)
            self._stage_slots.put(STAGE)
        init = {
            "op": "init",
            "name": self._name,
            "fmt": fmt,
            "mems": sizes,
            "layers": list(self._options.layers),
            "require": self._options.require_isolation,
            "memory_limit": self._options.memory_limit,
            "cpu": self._options.start_cpu,
            "test": os.environ.get("AIODD_GUEST_TEST") == "1",
            "probe": probe,
        }
        self._cpu_budget = float(init["cpu"])  # type: ignore[arg-type]
        try:
            socket.send_fds(self._sock, [protocol.encode(init)], fds)
        except OSError as exc:
            self._kill("could not be handed the image")
            raise IsolationError(
                f"{self._name}: cannot hand the image to the guest reader: {exc.strerror}"
            ) from None
        self._pump.start()
        self._wait_progress(self._ready, "starting")
        missing = {k: v for k, v in self.isolation.items() if v.startswith("missing")}
        if missing and self._options.require_isolation:
            self.close()
            lines = "; ".join(f"{k} {v}" for k, v in missing.items())
            raise IsolationError(
                f"{self._name}: isolation required but a sandbox layer is missing ({lines})"
            )
        for layer, line in missing.items():
            warnings.warn(
                IsolationWarning(f"guest reader runs without {layer} ({line})"), stacklevel=4
            )
        if probe:
            return
        self._wait_progress(self._opened, "opening the image")

    def _wait_progress(self, pending: _Pending, doing: str) -> None:
        """Wait for ``pending``; kill the guest if it makes no progress for too long."""
        timeout = self._options.open_timeout
        while True:
            seen = self._progress
            if pending.event.wait(timeout):
                break
            if self._progress == seen:
                self._kill(f"did not answer within {timeout:g} s while {doing}")
                pending.event.wait(5)
                break
        if pending.error is not None:
            raise pending.error
        if not pending.event.is_set():  # pragma: no cover - the kill wakes everyone
            raise IsolationError(f"{self._name}: the guest reader stopped answering")

    # -- reading -------------------------------------------------------------------

    def read_into(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        if length == 0:
            return
        where = self._locate(buf)
        if where is not None:
            self._request(offset, where[0], where[1], length)
            return
        assert self._stage is not None
        slot = self._stage_slots.get()
        try:
            done = 0
            while done < length:
                n = min(STAGE, length - done)
                self._request(offset + done, len(self._mems), slot, n)
                buf[done : done + n] = self._stage[slot : slot + n]
                done += n
        finally:
            self._stage_slots.put(slot)

    def _locate(self, buf: memoryview) -> tuple[int, int] | None:
        if not self._mems or buf.readonly:
            return None
        try:
            address = _address(buf)
        except (TypeError, ValueError):
            return None
        for mem_id, base, size in self._mems:
            if base <= address and address + len(buf) <= base + size:
                return mem_id, address - base
        return None

    def _request(self, offset: int, mem: int, moff: int, length: int) -> None:
        deadline = self._options.watchdog_floor + length / self._options.watchdog_rate
        pending = self._call(
            {"op": "read", "offset": offset, "mem": mem, "moff": moff, "len": length}, deadline
        )
        if not pending.event.wait(deadline):
            self._kill(
                f"did not finish reading {length} bytes at offset {offset} within"
                f" {deadline:.1f} s (watchdog)"
            )
            pending.event.wait(5)
        if pending.error is not None:
            raise pending.error
        if not pending.event.is_set():  # pragma: no cover
            raise IsolationError(f"{self._name}: the guest reader stopped answering")

    def attempt(self, what: str, arg: object = None, timeout: float = 10.0) -> str:
        """Test-only: ask the guest to try a forbidden thing (see :mod:`.attempts`)."""
        pending = self._call({"op": "attempt", "what": what, "arg": arg}, 0.0)
        if not pending.event.wait(timeout):
            self._kill(f"did not answer within {timeout:g} s (watchdog)")
            pending.event.wait(5)
        if pending.error is not None:
            raise pending.error
        return pending.result or ""

    def _call(self, message: Message, seconds: float) -> _Pending:
        with self._lock:
            if self._dead is not None:
                raise self._dead
            if self._closed:
                raise IsolationError(f"{self._name}: the guest reader is closed")
            self._next_id += 1
            rid = self._next_id
            pending = _Pending()
            self._pending[rid] = pending
            self._cpu_budget += seconds
            budget = int(self._cpu_budget) + 1
        with contextlib.suppress(OSError):  # the CPU limit grows with the work asked
            resource.prlimit(
                self._process.proc.pid, resource.RLIMIT_CPU, (budget, resource.RLIM_INFINITY)
            )
        self._send({**message, "id": rid})
        return pending

    def _send(self, message: Message, fds: list[int] | None = None) -> None:
        data = protocol.encode(message)
        try:
            with self._send_lock:
                if fds:
                    socket.send_fds(self._sock, [data], fds)
                else:
                    self._sock.send(data)
        except OSError:
            pass  # the receiving thread sees the guest's death and reports it

    # -- the receiving thread ------------------------------------------------------

    def _receive(self) -> None:
        try:
            while True:
                try:
                    data = self._sock.recv(protocol.MAX_MESSAGE)
                except OSError:
                    data = b""
                if not data:
                    break
                self._progress += 1
                try:
                    self._handle(protocol.decode(data))
                except (ValueError, KeyError, TypeError):
                    self._kill("broke the protocol")
                    break
        finally:
            self._on_exit()

    def _handle(self, message: Message) -> None:
        op = message["op"]
        if op == "done":
            rid = protocol.int_field(message, "id")
            with self._lock:
                pending = self._pending.pop(rid, None)
            if pending is None:
                raise ValueError("unknown request id")
            if "error" in message:
                pending.error = self._error(message["error"])
            result = message.get("result")
            pending.result = protocol.clean(result) if result is not None else None
            pending.event.set()
        elif op == "resolve":
            self._resolve(message)
        elif op == "ready":
            layers = message.get("layers")
            if not isinstance(layers, dict):
                raise ValueError("bad layers")
            self.isolation = {protocol.clean(k): protocol.clean(v) for k, v in layers.items()}
            self._ready.event.set()
        elif op == "opened":
            self.format_name = protocol.clean(protocol.str_field(message, "format"), 16)
            self.virtual_size = protocol.int_field(message, "virtual_size")
            self._opened.event.set()
        elif op == "failed":
            error = message.get("error")
            self._opened.error = self._policy_error or self._error(error)
            self._opened.event.set()
        else:
            raise ValueError("unknown message")

    def _resolve(self, message: Message) -> None:
        rid = protocol.int_field(message, "rid")
        layer_id = protocol.int_field(message, "layer", 0, len(self._layers) - 1)
        kind = protocol.str_field(message, "kind")
        name = protocol.str_field(message, "name")
        fmt = protocol.str_field(message, "format", optional=True)
        disk = message.get("disk") is True
        if kind not in ("backing", "data_file", "extent", "parent"):
            raise ValueError("bad reference kind")
        assert name is not None
        layer = self._layers[layer_id]
        ref = Reference(kind, name, layer.name, fmt)  # type: ignore[arg-type]
        self._files += 1
        try:
            if self._files > MAX_FILES:
                raise PolicyError(layer.name, f"the image names more than {MAX_FILES} files")
            fd, new = self._policy.open_reference(layer, ref, disk=disk)
        except ImageError as exc:
            if isinstance(exc, PolicyError) and self._policy_error is None:
                self._policy_error = exc
            self._send({"op": "resolved", "rid": rid, "error": protocol.error_to_wire(exc)})
            return
        try:
            with self._lock:
                self._layers.append(new)
                new_id = len(self._layers) - 1
            self._send({"op": "resolved", "rid": rid, "layer": new_id}, [fd])
        finally:
            os.close(fd)

    def _error(self, wire: Any) -> AioddError:
        if not isinstance(wire, dict):
            return IsolationError(f"{self._name}: the guest reader sent a malformed error")
        cls = wire.get("class")
        message = protocol.clean(wire.get("message", ""))
        if cls in protocol.ERROR_CLASSES:
            if cls == "PolicyError" and self._policy_error is not None:
                return self._policy_error
            fmt = wire.get("fmt")
            return protocol.ERROR_CLASSES[cls](
                protocol.clean(wire.get("file", self._name)),
                message,
                protocol.clean(fmt, 16) if isinstance(fmt, str) else None,
            )
        if cls == "UsageError":
            return UsageError(message)
        if cls == "MemoryError":
            limit = self._options.memory_limit >> 20
            return IsolationError(
                f"{self._name}: the guest reader ran out of memory (its limit is {limit} MiB)"
            )
        kind = protocol.clean(wire.get("type", "error"), 40)
        return ImageError(self._name, f"the decoder failed on this image ({kind}: {message})")

    # -- death and the end ---------------------------------------------------------

    def _kill(self, why: str) -> None:
        with self._lock:
            if self._killed_for is None:
                self._killed_for = why
        with contextlib.suppress(OSError):
            self._process.proc.kill()

    def _on_exit(self) -> None:
        proc = self._process.proc
        try:
            rc = proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        why = self._death_reason(rc)
        error = IsolationError(f"{self._name}: the guest reader {why}")
        with self._lock:
            self._dead = error
            pending = list(self._pending.values())
            self._pending.clear()
        for p in [*pending, self._ready, self._opened]:
            if not p.event.is_set():
                p.error = error
                p.event.set()

    def _death_reason(self, rc: int) -> str:
        if self._killed_for is not None:
            return f"{self._killed_for} and was killed"
        if self._closed and rc == 0:
            return "is closed"
        if rc == -signal.SIGSYS:
            return "was killed by its seccomp filter (it made a forbidden system call)"
        if rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
            return "ran out of CPU time and was killed"
        if rc == 3:
            return "refused to run without every sandbox layer (--require-isolation)"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            return f"died ({name})"
        return f"exited unexpectedly (status {rc})"

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._send({"op": "close"})
        try:
            self._process.proc.wait(2)
        except subprocess.TimeoutExpired:
            self._process.proc.kill()
        if self._pump.is_alive():
            self._pump.join(5)
        elif self._pump.ident is None:
            self._process.proc.kill()
            self._process.proc.wait()
        self._sock.close()
        if self._stage is not None:
            self._stage.close()

    @property
    def pid(self) -> int:
        return self._process.proc.pid


def _address(buffer: Any) -> int:
    """The address of a writable buffer's first byte."""
    holder = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


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


def open_guest(
    name: str,
    input_fd: int,
    fmt: str | None,
    policy: Policy,
    top: Layer,
    *,
    memory: mmap.mmap | None = None,
    options: GuestOptions | None = None,
) -> GuestDisk:
    """Start a guest reader on the opened image ``input_fd`` (the caller keeps it)."""
    disk = GuestDisk(name, _take(), policy, top, options or GuestOptions())
    try:
        disk.start(input_fd, fmt, memory)
    except BaseException:
        disk.close()
        raise
    return disk


def isolation_report(options: GuestOptions | None = None) -> list[str]:
    """One line per sandbox layer, as a guest started on this host sets it up."""
    started = time.perf_counter()
    disk = GuestDisk("report", _Process(), Policy(), Layer("report", "/", 0, frozenset()),
                     options or GuestOptions())  # fmt: skip
    try:
        disk.start(-1, None, None, probe=True)
        elapsed = (time.perf_counter() - started) * 1000
    except IsolationError as exc:
        return [f"guest reader: unavailable ({exc})"]
    finally:
        disk.close()
    lines = [f"{layer}: {line}" for layer, line in disk.isolation.items()]
    lines.append(f"guest start-up: {elapsed:.0f} ms")
    return lines
