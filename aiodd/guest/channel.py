"""The channel: what the guest disk needs from whatever runs a guest reader.

A transport implements :class:`Channel`: it starts a guest, carries the messages of
:mod:`aiodd.guest.protocol` to and from it, matches answers to requests, hands over
descriptors, and watches it (a guest that stops answering is killed).  The disk
(:mod:`aiodd.guest.disk`) knows nothing of how: today's transport is a sandboxed child
process (:mod:`aiodd.guest.process`); a micro-VM would be another, speaking the same
messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiodd._typing_names import Protocol
from aiodd.guest.protocol import Done, Failed, Init, Opened, Ready, Request, Resolve, Resolved

FileAnswer = tuple[Resolved, int | None]
"""The host's answer to a guest's :class:`Resolve`, and the descriptor of the file it
opened (None when it refused); the channel sends the file and then closes the descriptor."""

FileResolver = Callable[[Resolve], FileAnswer]
"""Answers a guest's request for a file; raises ValueError if the request is malformed
(the channel then kills the guest, as for any broken message)."""


class Channel(Protocol):
    """One guest reader, seen from the host.

    Every method may raise :class:`~aiodd.errors.IsolationError`: the guest died, was
    killed by the watchdog, or the channel is closed.  Requests may be made from several
    threads at once.
    """

    @property
    def pid(self) -> int:
        """The host process that runs the guest (the child, or a micro-VM's monitor)."""
        ...

    def start(self, init: Init, fds: Sequence[int], resolve: FileResolver) -> Ready:
        """Hand the guest its work: ``init`` and the descriptors it describes (the caller
        keeps its own copies); wait until the guest's sandbox is up.  From now on, the
        guest's requests for files are answered by ``resolve``."""
        ...

    def opened(self) -> Opened | Failed:
        """Wait until the guest has opened the image (or could not)."""
        ...

    def call(self, request: Request, timeout: float, *, cpu: float, late: str) -> Done:
        """Send ``request`` and wait for its answer.

        The guest is killed if it does not answer within ``timeout`` seconds (the
        watchdog; ``late`` says why, e.g. ``did not answer within 10 s (watchdog)``), and
        may spend ``cpu`` more seconds of CPU time on it.
        """
        ...

    def close(self) -> None:
        """End the guest and release everything; idempotent."""
        ...
