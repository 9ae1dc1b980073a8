"""The host's entry points to the guest reader: open an image in a guest, report the sandbox.

:func:`open_guest` hands the user's already-opened image to a fresh guest process and
returns a :class:`~aiodd.guest.disk.GuestDisk`, a
:class:`~aiodd.formats.base.VirtualDisk` whose reads are done by the guest straight into
shared memory.  The other names here are re-exported for the modules that import them
from this one.
"""

from __future__ import annotations

import mmap
import time

from aiodd.errors import IsolationError
from aiodd.guest.disk import GuestDisk, IsolationWarning
from aiodd.guest.memory import SharedBuffer, shared_buffer
from aiodd.guest.options import GuestOptions
from aiodd.guest.process import ProcessChannel
from aiodd.guest.spawn import Spawned, prestart, take
from aiodd.policy import Layer, Policy

__all__ = (
    "GuestDisk",
    "GuestOptions",
    "IsolationWarning",
    "SharedBuffer",
    "isolation_report",
    "open_guest",
    "prestart",
    "shared_buffer",
)


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
    options = options or GuestOptions()
    spawned = take(options.entry, options.isolation, fmt or "")
    channel = ProcessChannel(name, spawned, options.open_timeout)
    disk = GuestDisk(name, channel, policy, top, options)
    try:
        disk.start(input_fd, fmt, memory)
    except BaseException:
        disk.close()
        raise
    return disk


def isolation_report(options: GuestOptions | None = None) -> list[str]:
    """One line per sandbox layer, as a guest started on this host sets it up; whether
    the KVM guest reader runs there, and so what ``auto`` picks."""
    options = options or GuestOptions()
    started = time.perf_counter()
    channel = ProcessChannel("report", Spawned(options.entry), options.open_timeout)
    disk = GuestDisk("report", channel, Policy(), Layer("report", "/", 0, frozenset()), options)
    try:
        disk.start(-1, None, None, probe=True)
        elapsed = (time.perf_counter() - started) * 1000
    except IsolationError as exc:
        return [f"guest reader: unavailable ({exc})"]
    finally:
        disk.close()
    lines = [f"{layer}: {line}" for layer, line in disk.isolation.items()]
    if options.isolation == "auto":
        if disk.mode == "kvm":
            lines.append(f"kvm: available ({options.kvm_path()}, the guest binary built)")
        else:
            lines.append(f"kvm: unavailable: {disk.mode_reason.removeprefix('auto: ')}")
        lines.append(f"auto: picks {disk.mode}")
    lines.append(f"guest start-up: {elapsed:.0f} ms")
    return lines
