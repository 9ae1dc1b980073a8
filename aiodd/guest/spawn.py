"""Starting a guest process: the part of the transport the command runs before anything.

The guest's interpreter start-up and imports take longer than the host's work, so the
``aiodd`` command starts it first thing (:func:`prestart`, from :mod:`aiodd._command`),
and this module imports only what starting a process needs (not ``subprocess``, not
``socket``, not ``signal``, ``threading`` or ``contextlib``, which bring ``enum``,
``collections`` and ``functools``: their C cores will do); the CLI and the transport's
machinery (:mod:`aiodd.guest.process`) load meanwhile.
"""

from __future__ import annotations

import _signal  # signal's C core: signal itself imports enum, 6 ms before the guest starts
import _socket
import _thread
import os
import select
import sys
import time

from aiodd.errors import IsolationError

ENTRY = "aiodd.guest.child"
"""The module whose ``main(control_fd)`` the guest runs (tests name their own)."""

CONTROL_FD = 3
"""The guest's end of the control socket, as the guest sees it."""

# argv: the control socket, the entry module, the isolation mode the host expects to ask
# for and the input format the user named ("" for none: aiodd.guest.child.expected_mode,
# expected_format), then sys.path, one entry per argument.  First the
# guest drops every descriptor it did not get on purpose: posix_spawn, unlike subprocess,
# leaves a caller's inheritable ones (a shell's 3<file) open.
_BOOT = (
    "import os,sys;os.closerange(int(sys.argv[1])+1,1<<20);os.chdir('/');"
    "sys.path[:]=sys.argv[5:];"
    "__import__(sys.argv[2],fromlist=('main',)).main(int(sys.argv[1]))"
)


class GuestProcess:
    """The guest's process: what the host needs of :class:`subprocess.Popen`, without
    importing it (about 2 ms of a short copy's start-up).

    Waiting polls a pidfd, so it wakes the moment the guest exits (``Popen.wait``
    with a timeout sleeps in doubling steps) and any thread may wait.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._lock = _thread.allocate_lock()

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except TimeoutError:
            return None

    def wait(self, timeout: float | None = None) -> int:
        """The exit status, as :attr:`subprocess.Popen.returncode` gives it; raises
        :class:`TimeoutError` if the guest still runs after ``timeout`` seconds."""
        if self.returncode is None and not self._exited(timeout):
            raise TimeoutError(f"the guest reader (pid {self.pid}) still runs")
        with self._lock:
            if self.returncode is None:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def __del__(self) -> None:
        # Not closed at the reaping: another thread may still be polling it.
        fd = getattr(self, "_pidfd", -1)  # absent if pidfd_open failed
        if fd >= 0:
            os.close(fd)

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None:  # the pidfd cannot name a reused pid
                _signal.pidfd_send_signal(self._pidfd, _signal.SIGKILL)

    def _exited(self, timeout: float | None) -> bool:
        with self._lock:
            if self.returncode is not None:
                return True
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
        ms = None if timeout is None else max(0, round(timeout * 1000))
        return bool(poller.poll(ms))  # PEP 475: a signal's EINTR is retried by Python


class Spawned:
    """A started guest process, possibly not yet given any work.

    ``isolation`` is the mode the guest will most likely be asked for, and
    ``input_format`` the format the user named for the input (``""``: none): it prepares
    for them while it waits for its work (:func:`aiodd.guest.child.prepare`); the work
    it is then given decides.
    """

    def __init__(self, entry: str = ENTRY, isolation: str = "auto", input_format: str = "") -> None:
        self.started = time.perf_counter()
        self.entry = entry
        parent, child = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        paths = [p for p in sys.path if p and os.path.isabs(p)]
        env = {k: v for k, v in os.environ.items() if k in ("LD_LIBRARY_PATH", "AIODD_TIMING")}
        # AIODD_TIMING: the guest prints its own start-up phases, before seccomp seals it.
        shown = os.environ.get("AIODD_GUEST_STDERR") == "1" or "AIODD_TIMING" in env
        # Every descriptor here is close-on-exec (PEP 446) but the guest's end, which
        # dup2 puts at CONTROL_FD without that flag, in the child only.
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, child.fileno(), CONTROL_FD),
        ]
        if not shown:
            actions.append((os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0))
        argv = [sys.executable, "-I", "-S", "-c", _BOOT, str(CONTROL_FD), entry, isolation,
                input_format, *paths]  # fmt: skip
        try:
            pid = os.posix_spawn(
                sys.executable,
                argv,
                env,
                file_actions=actions,
                setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ),  # as Popen's restore_signals
                setsigmask=(),
            )
        except OSError as exc:
            parent.close()
            raise IsolationError(f"cannot start the guest reader: {exc.strerror}") from None
        finally:
            child.close()
        try:
            self.proc = GuestProcess(pid)
        except OSError as exc:  # no pidfd (Linux before 5.3): no way to wait safely
            os.kill(pid, _signal.SIGKILL)
            os.waitpid(pid, 0)
            parent.close()
            raise IsolationError(f"cannot watch the guest reader: {exc.strerror}") from None
        self.sock = parent


_spare: Spawned | None = None
_spare_lock = _thread.allocate_lock()


def prestart(isolation: str = "auto", input_format: str = "") -> bool:
    """Start a guest now so that the next :func:`take` finds it ready; whether one was
    started (``False``: one already waits).  ``isolation``, ``input_format``: see
    :class:`Spawned`.

    Meant for the ``aiodd`` command to call first thing (:mod:`aiodd._command`): the
    guest's interpreter start-up and imports then overlap with the host's own.
    """
    global _spare
    with _spare_lock:
        if _spare is not None:
            return False
        _spare = Spawned(isolation=isolation, input_format=input_format)
        return True


def discard_prestarted() -> None:
    """Stop the guest :func:`prestart` started if no copy took it (one stopped first)."""
    global _spare
    with _spare_lock:
        proc, _spare = _spare, None
    if proc is not None:
        import contextlib  # here: not before the command's guest is started

        proc.sock.close()
        with contextlib.suppress(OSError):
            proc.proc.kill()
        proc.proc.wait()


def take(entry: str = ENTRY, isolation: str = "auto", input_format: str = "") -> Spawned:
    """The prestarted guest if it runs ``entry`` and lives, else a new one (expecting
    ``isolation`` and ``input_format``: see :class:`Spawned`)."""
    global _spare
    with _spare_lock:
        proc = _spare
        if proc is not None and proc.entry == entry:
            _spare = None
        else:
            proc = None
    if proc is not None:
        if proc.proc.poll() is None:
            return proc
        proc.sock.close()  # it died waiting: reap it
        proc.proc.wait()
    return Spawned(entry, isolation, input_format)
