"""The guest reader: image decoding in a sandboxed child process.

- :mod:`aiodd.guest.host` — the host's side: start, feed, answer and watch a guest.
- :mod:`aiodd.guest.child` — the guest's side (``python -m aiodd.guest`` runs it too).
- :mod:`aiodd.guest.sandbox` and :mod:`aiodd.guest.seccomp` — the layers the guest puts
  itself in before it reads a byte of the image.

The names below are loaded on first use, so that the guest process, which imports this
package too, does not pay for the host's machinery at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiodd.guest.host import GuestDisk as GuestDisk
    from aiodd.guest.host import GuestOptions as GuestOptions
    from aiodd.guest.host import IsolationWarning as IsolationWarning
    from aiodd.guest.host import SharedBuffer as SharedBuffer
    from aiodd.guest.host import discard_prestarted as discard_prestarted
    from aiodd.guest.host import isolation_report as isolation_report
    from aiodd.guest.host import open_guest as open_guest
    from aiodd.guest.host import prestart as prestart
    from aiodd.guest.host import shared_buffer as shared_buffer

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
    if name in __all__:
        from aiodd.guest import host

        return getattr(host, name)
    raise AttributeError(f"module 'aiodd.guest' has no attribute {name!r}")
