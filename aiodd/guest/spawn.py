"""Starting a guest process: the part of the transport the CLI runs before anything else.

The guest's interpreter start-up and imports take longer than the host's work, so the
CLI starts it first thing (:func:`prestart`), and this module imports only what starting
a process needs; the transport's machinery (:mod:`aiodd.guest.process`) loads meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

from aiodd.errors import IsolationError

ENTRY = "aiodd.guest.child"
"""The module whose ``main(control_fd)`` the guest runs (tests name their own)."""

# argv: the control socket, the entry module, then sys.path, one entry per argument.
_BOOT = (
    "import sys;sys.path[:]=sys.argv[3:];"
    "__import__(sys.argv[2],fromlist=('main',)).main(int(sys.argv[1]))"
)


class Spawned:
    """A started guest process, possibly not yet given any work."""

    def __init__(self, entry: str = ENTRY) -> None:
        self.started = time.perf_counter()
        self.entry = entry
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        paths = [p for p in sys.path if p and os.path.isabs(p)]
        env = {k: v for k, v in os.environ.items() if k in ("LD_LIBRARY_PATH", "AIODD_TIMING")}
        # AIODD_TIMING: the guest prints its own start-up phases, before seccomp seals it.
        shown = os.environ.get("AIODD_GUEST_STDERR") == "1" or "AIODD_TIMING" in env
        stderr = None if shown else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, str(child.fileno()), entry, *paths],
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


_spare: Spawned | None = None
_spare_lock = threading.Lock()


def prestart() -> None:
    """Start a guest now so that the next :func:`take` finds it ready.

    Meant for the CLI to call first thing: the guest's interpreter start-up and imports
    then overlap with the host's own.
    """
    global _spare
    with _spare_lock:
        if _spare is None:
            _spare = Spawned()


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


def take(entry: str = ENTRY) -> Spawned:
    """The prestarted guest if it runs ``entry`` and lives, else a new one."""
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
    return Spawned(entry)
