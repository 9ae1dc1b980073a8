"""The guest reader's knobs, shared by the disk and the transports."""

from __future__ import annotations

import os

from aiodd._typing_names import NamedTuple
from aiodd.guest.sandbox import LAYERS
from aiodd.guest.spawn import ENTRY

KVM_DEVICE_VARIABLE = "AIODD_KVM_DEVICE"


def _kvm_device() -> str:
    # The tests point it at a path that does not exist, to see aiodd on a host without KVM.
    return os.environ.get(KVM_DEVICE_VARIABLE) or "/dev/kvm"


class GuestOptions(NamedTuple):
    """Knobs of the guest reader (the defaults are the product's).  A NamedTuple, not a
    dataclass: importing dataclasses costs every copy milliseconds of start-up
    (docs/performance.md, "Start-up")."""

    layers: tuple[str, ...] = LAYERS
    memory_limit: int = 1 << 30  # bytes the guest may allocate beyond its start-up size
    watchdog_floor: float = 15.0  # seconds every request may take
    watchdog_rate: float = 16 << 20  # bytes per second a request must at least progress
    open_timeout: float = 30.0  # seconds without progress while opening
    start_cpu: int = 35  # CPU seconds for start-up and opening; each request adds its deadline
    require_isolation: bool = False
    # auto, kvm or sandbox (aiodd.guest.protocol.GUEST_MODES): where the guest decodes.
    isolation: str = "auto"
    # None: $AIODD_KVM_DEVICE, else /dev/kvm, read when the guest starts (kvm_path).
    kvm_device: str | None = None
    # The module whose ``main(control_fd)`` the guest runs: tests name one that adds
    # test-only requests (tests/guest_entry.py); the product's is the plain guest.
    entry: str = ENTRY

    def kvm_path(self) -> str:
        """The KVM device the guest opens."""
        return self.kvm_device or _kvm_device()
