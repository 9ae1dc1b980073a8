"""The KVM guest reader: decoders in a freestanding C guest under a pure-Python VMM.

Not wired into the CLI or the library yet (docs/kvm.md says what is left).  The guest
binary, ``guest.elf``, is built with gcc when aiodd is installed (``hatch_build.py``);
:func:`availability` says whether this host can run it, and if not, why.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

GUEST = Path(__file__).resolve().parent / "guest.elf"
KVM_DEVICE = "/dev/kvm"
APT_PACKAGES = "gcc zlib1g-dev libzstd-dev"

_KVM_GET_API_VERSION = 0xAE00


def availability(device: str = KVM_DEVICE, guest: Path = GUEST) -> tuple[bool, str]:
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
    if not guest.is_file():
        return False, (
            f"the guest binary {guest} was not built when aiodd was installed "
            f"(install the Debian packages {APT_PACKAGES}, then reinstall aiodd)"
        )
    return True, ""
