"""The KVM guest reader: decoders in a freestanding C guest under a pure-Python VMM.

Not wired into the CLI or the library yet (docs/kvm.md says what is left).  The guest
binary, ``guest.elf``, is built with gcc when aiodd is installed (``hatch_build.py``);
:func:`availability` says whether this host can run it, and if not, why.
"""

from __future__ import annotations

import fcntl
import os

TYPE_CHECKING = False  # typing, not imported: the guest's process imports this package
if TYPE_CHECKING:
    from pathlib import Path

    GUEST: Path
    """The guest binary, as a Path (made on first use: see :data:`GUEST_PATH`)."""

GUEST_PATH = os.path.join(os.path.dirname(os.path.realpath(__file__)), "guest.elf")
"""The guest binary: a string, so that the guest process need not import pathlib
(docs/performance.md, "Start-up")."""
KVM_DEVICE = "/dev/kvm"
APT_PACKAGES = "gcc zlib1g-dev libzstd-dev"

_KVM_GET_API_VERSION = 0xAE00


def __getattr__(name: str) -> object:
    if name == "GUEST":
        from pathlib import Path

        return Path(GUEST_PATH)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def availability(
    device: str = KVM_DEVICE, guest: str | os.PathLike[str] = GUEST_PATH
) -> tuple[bool, str]:
    """Whether the KVM guest reader can run here: ``(True, "")``, or ``(False, reason)``."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"cannot open {device} read-write: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION, 0)
    except OSError as exc:
        return False, f"{device}: KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return False, f"{device}: KVM API version {version}, not 12"
    if not os.path.isfile(guest):
        return False, (
            f"the guest binary {guest} was not built when aiodd was installed "
            f"(install the Debian packages {APT_PACKAGES}, then reinstall aiodd)"
        )
    return True, ""
