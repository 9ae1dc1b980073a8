"""An input the user names as raw (``-f raw``), read by this process while its guest starts.

Raw has nothing to decode: the file's bytes are the disk.  When the user says the input
is raw, this process reads those bytes itself, as the kernel's copy already does under
``-t unsafe`` (docs/security.md, "The guest reader"), instead of waiting for the guest
reader's start, 20 to 40 ms, before the first byte moves (docs/performance.md,
"Start-up").  The guest is still started and handed the image, in a thread beside the
copy, and the copy is not published until it has opened the image as raw, of the same
size: what the isolation mode refuses (no KVM under ``--isolation=kvm``, a missing
sandbox layer under ``--require-isolation``) still refuses the copy, with the same
error, and the result still says where the input was opened.
"""

from __future__ import annotations

import threading

from aiodd.errors import IsolationError
from aiodd.formats.raw.decode import RawDisk
from aiodd.guest.disk import GuestDisk


class RawBesideGuest:
    """A :class:`~aiodd.formats.base.VirtualDisk` read here, confirmed by a guest.

    Call :meth:`confirm` before the output is published and before reporting any other
    error: the guest's error, when it has one, is the one to report (it is the error
    the copy would have met first).
    """

    format_name = "raw"

    def __init__(self, raw: RawDisk, guest: GuestDisk, input_fd: int) -> None:
        self._raw = raw
        self._guest = guest
        self._error: BaseException | None = None
        self._checked = False
        self._thread = threading.Thread(
            target=self._start, args=(input_fd,), name="aiodd-guest-open", daemon=True
        )
        self._thread.start()

    def _start(self, input_fd: int) -> None:
        try:
            # The guest reads nothing: no shared memory for it.
            self._guest.start(input_fd, "raw", None)
        except BaseException as exc:  # reported by confirm(), in the caller's thread
            self._error = exc

    @property
    def virtual_size(self) -> int:
        return self._raw.virtual_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._raw.read_into(offset, buf)

    def confirm(self) -> GuestDisk:
        """Wait for the guest to have opened the image; raise its error if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        guest = self._guest
        if not self._checked:
            if guest.format_name != "raw" or guest.virtual_size != self._raw.virtual_size:
                raise IsolationError(f"{guest.name}: the guest reader broke the protocol")
            self._checked = True
        return guest

    def close(self) -> None:
        # A guest still starting is stopped: its thread then ends with an error nobody
        # reads.
        self._guest.close()
        self._thread.join()
        self._guest.close()  # what start() set up after the first close, if anything
        self._raw.close()
