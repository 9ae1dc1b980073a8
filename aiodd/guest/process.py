"""The process transport: a guest reader in a child process, seen from the host.

:class:`ProcessChannel` implements :class:`~aiodd.guest.channel.Channel` over a
``SOCK_SEQPACKET`` socket pair: descriptors travel with ``SCM_RIGHTS``, a thread per
guest receives its messages, and request ids match answers to the threads waiting.

Reads take a shorter way, the *read lanes*: one more socket pair each, given to the
guest with its work (:attr:`~aiodd.guest.protocol.Init.lanes`).  A lane carries one
:class:`~aiodd.guest.protocol.Read` at a time: the host's reading thread sends it and
receives its :class:`~aiodd.guest.protocol.Done` itself, and in the guest one thread
receives, decodes and answers, a VM's own thread under ``kvm``.  Through the control
socket a read passes two more threads, one on each side, and each hand-off waits for
a core: on a copy that keeps both cores busy, that made a read of 8 MiB take twice as
long (docs/performance.md, "Read lanes").

The watchdog: every request has a deadline; a guest that misses it is killed and the
request raises :class:`~aiodd.errors.IsolationError`.  While starting and opening, the
guest is killed only if it makes no progress (sends nothing) for ``open_timeout``
seconds.  The guest's ``RLIMIT_CPU`` is raised by the CPU time each request may use, so
a guest spinning on the CPU dies of it even if the host stopped watching.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import signal
import socket
import threading
from collections.abc import Sequence

from aiodd.errors import IsolationError
from aiodd.guest import protocol
from aiodd.guest.channel import FileResolver
from aiodd.guest.protocol import Done, Failed, Init, Opened, Read, Ready, Request, Resolve
from aiodd.guest.spawn import Spawned

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


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
        self._gone = threading.Event()  # set once the guest is reaped and _dead says why
        self._lanes: list[socket.socket] = []
        self._free_lanes: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        # lane -> the requests whose answers are still to come and nobody waits for
        self._owed: dict[socket.socket, set[int]] = {}
        self._pump = threading.Thread(target=self._receive, name="aiodd-guest", daemon=True)

    @property
    def pid(self) -> int:
        return self._process.proc.pid

    # -- start ---------------------------------------------------------------------

    def start(self, init: Init, fds: Sequence[int], resolve: FileResolver) -> Ready:
        """As :meth:`Channel.start`; the guest is also given ``init.lanes`` read lanes,
        after ``fds``."""
        self._resolve = resolve
        self._cpu_budget = float(init.cpu)
        theirs: list[socket.socket] = []
        try:
            for _ in range(init.lanes):
                ours, their = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                self._lanes.append(ours)
                theirs.append(their)
                self._free_lanes.put(ours)
            message = protocol.to_bytes(init)
            socket.send_fds(self._sock, [message], [*fds, *(t.fileno() for t in theirs)])
        except OSError as exc:
            self._kill("could not be handed the image")
            raise IsolationError(
                f"{self._name}: cannot hand the image to the guest reader: {exc.strerror}"
            ) from None
        finally:
            for their in theirs:
                their.close()
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
        if isinstance(request, Read):  # reads go on the lanes only
            return self._read(request, timeout, cpu=cpu, late=late)
        with self._lock:
            self._check_open()
            self._next_id += 1
            rid = self._next_id
            pending = _Pending()
            self._pending[rid] = pending
            budget = self._grant(cpu)
        self._raise_cpu_limit(budget)
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

    def _check_open(self) -> None:
        """Raise if no request may be sent (called holding ``_lock``)."""
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise IsolationError(f"{self._name}: the guest reader is closed")

    def _grant(self, cpu: float) -> int:
        """Add ``cpu`` seconds to the guest's CPU budget: the new limit (holding ``_lock``)."""
        self._cpu_budget += cpu
        return int(self._cpu_budget) + 1

    def _raise_cpu_limit(self, budget: int) -> None:
        with contextlib.suppress(OSError):  # the CPU limit grows with the work asked
            resource.prlimit(
                self._process.proc.pid, resource.RLIMIT_CPU, (budget, resource.RLIM_INFINITY)
            )

    def _read(self, request: Read, timeout: float, *, cpu: float, late: str) -> Done:
        """``request`` over a free lane (waiting for one if all are busy), answered on it."""
        if not self._lanes:  # a guest started to probe only: it reads nothing
            raise IsolationError(f"{self._name}: the guest reader was given no read lanes")
        lane = self._free_lanes.get()
        rid, answered = 0, False
        try:
            with self._lock:
                self._check_open()
                self._next_id += 1
                rid = self._next_id
                budget = self._grant(cpu)
            self._raise_cpu_limit(budget)
            # A read stopped while it waited (an exception in this thread) left its
            # answer on the lane: it is skipped, once.
            owed = self._owed.setdefault(lane, set())
            try:
                lane.settimeout(timeout)
                lane.send(protocol.to_bytes(request.replace(id=rid)))
                while True:
                    answer = self._lane_answer(lane.recv(protocol.MAX_MESSAGE))
                    if answer.id == rid:
                        answered = True
                        return answer
                    if answer.id not in owed:
                        self._kill("broke the protocol")
                        raise self._death()
                    owed.discard(answer.id)
            except TimeoutError:
                self._kill(late)
                raise self._death() from None
            except OSError:  # the guest is gone, or the channel closed
                raise self._death() from None
        finally:
            if rid and not answered:
                self._owed.setdefault(lane, set()).add(rid)
            self._free_lanes.put(lane)

    def _lane_answer(self, data: bytes) -> Done:
        if not data:
            raise self._death()
        try:
            answer = protocol.from_guest(data)
        except (ValueError, KeyError, TypeError):
            answer = None
        if not isinstance(answer, Done):
            self._kill("broke the protocol")
            raise self._death()
        return answer

    def _death(self) -> IsolationError:
        """Why the guest is gone, once the receiving thread has reaped it."""
        if not self._gone.wait(10):  # pragma: no cover - the guest was killed or closed
            return IsolationError(f"{self._name}: the guest reader stopped answering")
        assert self._dead is not None
        return self._dead

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
        self._gone.set()
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
        for lane in self._lanes:
            lane.close()


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
