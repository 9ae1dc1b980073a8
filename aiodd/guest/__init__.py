"""The guest reader: image decoding in a sandboxed child process (docs/security.md).

- :mod:`aiodd.guest.host` — the host's entry points: open an image in a guest, report
  the sandbox.
- :mod:`aiodd.guest.disk` — the :class:`~aiodd.formats.base.VirtualDisk` a guest decodes,
  over a :mod:`~aiodd.guest.channel` (the interface a transport implements).
- :mod:`aiodd.guest.process` — the transport: a child process on a socket pair, started
  by :mod:`aiodd.guest.spawn` (which the CLI runs first thing).
- :mod:`aiodd.guest.protocol` — every message between host and guest, both directions.
- :mod:`aiodd.guest.child` — the guest's side (``python -m aiodd.guest`` runs it too).
- :mod:`aiodd.guest.sandbox` and :mod:`aiodd.guest.seccomp` — the layers the guest puts
  itself in before it reads a byte of the image.

The names below are loaded on first use, so that the guest process, which imports this
package too, does not pay for the host's machinery at start-up.
"""

from __future__ import annotations

# typing.TYPE_CHECKING without typing's import: the command imports this package to
# start its guest, first thing (aiodd/__init__.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from aiodd.guest.disk import GuestDisk as GuestDisk
    from aiodd.guest.disk import IsolationWarning as IsolationWarning
    from aiodd.guest.host import isolation_report as isolation_report
    from aiodd.guest.host import open_guest as open_guest
    from aiodd.guest.memory import SharedBuffer as SharedBuffer
    from aiodd.guest.memory import shared_buffer as shared_buffer
    from aiodd.guest.options import GuestOptions as GuestOptions
    from aiodd.guest.spawn import discard_prestarted as discard_prestarted
    from aiodd.guest.spawn import prestart as prestart
del TYPE_CHECKING

# Each name, by the module that defines it: ``prestart`` must not wait for the host's
# machinery, it runs first thing in the CLI.
_HOMES = {
    "GuestDisk": "disk",
    "GuestOptions": "options",
    "IsolationWarning": "disk",
    "SharedBuffer": "memory",
    "discard_prestarted": "spawn",
    "isolation_report": "host",
    "open_guest": "host",
    "prestart": "spawn",
    "shared_buffer": "memory",
}

__all__ = (
    "GuestDisk",
    "GuestOptions",
    "IsolationWarning",
    "SharedBuffer",
    "discard_prestarted",
    "isolation_report",
    "open_guest",
    "prestart",
    "shared_buffer",
)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'aiodd.guest' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"aiodd.guest.{home}"), name)
