"""The process transport: a guest reader in a child process, seen from the host.

:class:`ProcessChannel` implements :class:`~aiodd.guest.channel.Channel` over a
``SOCK_SEQPACKET`` socket pair: descriptors travel with ``SCM_RIGHTS``, a thread per
guest receives its messages, and request ids match answers to the threads waiting.

The watchdog: every request has a deadline; a guest that misses it is killed and the
request raises :class:`~aiodd.errors.IsolationError`.  While starting and opening, the
guest is killed only if it makes no progress (sends nothing) for ``open_timeout``
seconds.  The guest's ``RLIMIT_CPU`` is raised by the CPU time each request may use, so
a guest spinning on the CPU dies of it even if the host stopped watching.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import threading
from collections.abc import Sequence
from typing import Any

from aiodd.errors import IsolationError
from aiodd.guest import protocol
from aiodd.guest.channel import FileResolver
from aiodd.guest.protocol import Done, Failed, Init, Opened, Ready, Request, Resolve
from aiodd.guest.spawn import Spawned


class _Pending:
    """One request's answer, or its error, once ``event`` is set."""

    __slots__ = ("answer", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.answer: Any = None


class ProcessChannel:
    """A :class:`~aiodd.guest.channel.Channel` to a guest in a child process."""

    def __init__(self, name: str, process: Spawned, open_timeout: float) -> None:
        self._name = name
        self._process = process
        self._sock = socket.socket(fileno=process.sock.detach())
        self._open_timeout = open_timeout
        self._resolve: FileResolver | None = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._ready = _Pending()
        self._opened = _Pending()
        self._progress = 0
        self._dead: IsolationError | None = None
        self._killed_for: str | None = None
        self._cpu_budget = 0.0
        self._closed = False
        self._pump = threading.Thread(target=self._receive, name="aiodd-guest", daemon=True)

    @property
    def pid(self) -> int:
        return self._process.proc.pid

    # -- start ---------------------------------------------------------------------

    def start(self, init: Init, fds: Sequence[int], resolve: FileResolver) -> Ready:
        self._resolve = resolve
        self._cpu_budget = float(init.cpu)
        try:
            socket.send_fds(self._sock, [protocol.to_bytes(init)], list(fds))
        except OSError as exc:
            self._kill("could not be handed the image")
            raise IsolationError(
                f"{self._name}: cannot hand the image to the guest reader: {exc.strerror}"
            ) from None
        self._pump.start()
        self._wait_progress(self._ready, "starting")
        ready: Ready = self._ready.answer
        return ready

    def opened(self) -> Opened | Failed:
        self._wait_progress(self._opened, "opening the image")
        answer: Opened | Failed = self._opened.answer
        return answer

    def _wait_progress(self, pending: _Pending, doing: str) -> None:
        """Wait for ``pending``; kill the guest if it makes no progress for too long."""
        timeout = self._open_timeout
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

    # -- requests ------------------------------------------------------------------

    def call(self, request: Request, timeout: float, *, cpu: float, late: str) -> Done:
        with self._lock:
            if self._dead is not None:
                raise self._dead
            if self._closed:
                raise IsolationError(f"{self._name}: the guest reader is closed")
            self._next_id += 1
            rid = self._next_id
            pending = _Pending()
            self._pending[rid] = pending
            self._cpu_budget += cpu
            budget = int(self._cpu_budget) + 1
        with contextlib.suppress(OSError):  # the CPU limit grows with the work asked
            resource.prlimit(
                self._process.proc.pid, resource.RLIMIT_CPU, (budget, resource.RLIM_INFINITY)
            )
        self._send(request.replace(id=rid))
        if not pending.event.wait(timeout):
            self._kill(late)
            pending.event.wait(5)
        if pending.error is not None:
            raise pending.error
        if not pending.event.is_set():  # pragma: no cover
            raise IsolationError(f"{self._name}: the guest reader stopped answering")
        done: Done = pending.answer
        return done

    def _send(self, message: protocol.HostMessage, fds: list[int] | None = None) -> None:
        data = protocol.to_bytes(message)
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
                    self._handle(protocol.from_guest(data))
                except (ValueError, KeyError, TypeError):
                    self._kill("broke the protocol")
                    break
        finally:
            self._on_exit()

    def _handle(self, message: protocol.GuestMessage) -> None:
        if isinstance(message, Done):
            with self._lock:
                pending = self._pending.pop(message.id, None)
            if pending is None:
                raise ValueError("unknown request id")
            pending.answer = message
            pending.event.set()
        elif isinstance(message, Resolve):
            self._answer(message)
        elif isinstance(message, Ready):
            self._ready.answer = message
            self._ready.event.set()
        else:  # Opened or Failed
            self._opened.answer = message
            self._opened.event.set()

    def _answer(self, request: Resolve) -> None:
        assert self._resolve is not None
        resolved, fd = self._resolve(request)
        if fd is None:
            self._send(resolved)
            return
        try:
            self._send(resolved, [fd])
        finally:
            os.close(fd)

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
        except TimeoutError:
            proc.kill()
            rc = proc.wait()
        why = death_reason(rc, self._killed_for, self._closed)
        error = IsolationError(f"{self._name}: the guest reader {why}")
        with self._lock:
            self._dead = error
            pending = list(self._pending.values())
            self._pending.clear()
        for p in [*pending, self._ready, self._opened]:
            if not p.event.is_set():
                p.error = error
                p.event.set()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._send(protocol.Close())
        try:
            self._process.proc.wait(2)
        except TimeoutError:
            self._process.proc.kill()
        if self._pump.is_alive():
            self._pump.join(5)
        elif self._pump.ident is None:
            self._process.proc.kill()
            self._process.proc.wait()
        self._sock.close()


def death_reason(rc: int, killed_for: str | None = None, closed: bool = False) -> str:
    """Why a guest that exited with status ``rc`` is gone, for an error message."""
    if killed_for is not None:
        return f"{killed_for} and was killed"
    if closed and rc == 0:
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
