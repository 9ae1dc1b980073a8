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

from aiodd.errors import ImageError, IsolationError
from aiodd.formats.raw.decode import RawDisk

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.guest.disk import GuestDisk
    from aiodd.io import LocalFile
    from aiodd.policy import Layer, Policy


class RawBesideGuest:
    """A :class:`~aiodd.formats.base.VirtualDisk` read here, confirmed by a guest.

    Call :meth:`confirm` before the output is published and before reporting any other
    error: the guest's error, when it has one, is the one to report (it is the error
    the copy would have met first).  The guest's machinery is imported in its thread
    too (about 8 ms), so the copy does not wait for that either.
    """

    format_name = "raw"

    def __init__(
        self,
        name: str,
        file: LocalFile,
        policy: Policy,
        top: Layer,
        *,
        isolation: str,
        require_isolation: bool,
    ) -> None:
        self._raw = RawDisk(file)  # owns ``file`` from now on
        self._name = name
        self._lock = threading.Lock()
        self._closed = False
        self._guest: GuestDisk | None = None
        self._error: BaseException | None = None
        self._mode = ("", "")
        self._thread = threading.Thread(
            target=self._open,
            args=(file.fd, policy, top, isolation, require_isolation),
            name="aiodd-guest-open",
            daemon=True,
        )
        self._thread.start()

    def _open(
        self, fd: int, policy: Policy, top: Layer, isolation: str, require_isolation: bool
    ) -> None:
        try:
            from aiodd.guest.disk import GuestDisk
            from aiodd.guest.options import GuestOptions
            from aiodd.guest.process import ProcessChannel
            from aiodd.guest.spawn import take

            options = GuestOptions(require_isolation=require_isolation, isolation=isolation)
            with self._lock:
                if self._closed:
                    return
                spawned = take(options.entry, isolation, "raw")
                channel = ProcessChannel(self._name, spawned, options.open_timeout)
                guest = self._guest = GuestDisk(self._name, channel, policy, top, options)
            # The guest reads nothing: no shared memory for it.
            guest.start(fd, "raw", None)
            if guest.format_name != "raw":
                raise IsolationError(f"{self._name}: the guest reader broke the protocol")
            if guest.virtual_size != self._raw.virtual_size:
                # Only another writer could do this: qemu's users are locked out.
                raise ImageError(self._name, "changed size while it was being opened")
            self._mode = (guest.mode, guest.mode_reason)
            # Its work is done: it exits while the copy goes on.  The input's locks stay,
            # held by this process's descriptor of the same open file.
            guest.close()
        except BaseException as exc:  # reported by confirm(), in the caller's thread
            self._error = exc

    @property
    def virtual_size(self) -> int:
        return self._raw.virtual_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._raw.read_into(offset, buf)

    def read_into_holes(self, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        """:meth:`~aiodd.formats.raw.decode.RawDisk.read_into_holes`: ``--sparse`` needs
        no looking at the file's holes."""
        return self._raw.read_into_holes(offset, buf)

    def confirm(self) -> tuple[str, str]:
        """Wait for the guest to have opened the image; raise its error if it failed.
        Returns where it decodes, and why (as :class:`~aiodd.guest.disk.GuestDisk`)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._guest is None:
            raise IsolationError(f"{self._name}: the guest reader is closed")
        return self._mode

    def close(self) -> None:
        with self._lock:
            self._closed = True
            guest = self._guest
        # A guest still starting is stopped: its thread then ends with an error nobody
        # reads.
        if guest is not None:
            guest.close()
        self._thread.join()
        if guest is not None:
            guest.close()  # what start() set up after the first close, if anything
        self._raw.close()
