"""Times the KVM guest reader's start-up to its first decoded byte, in one process.

Run by the kvm section as ``python bench/kvm_probe.py ROUNDS IMAGE...``; prints
``{image: {"made": [seconds...], "opened": [...], "first": [...]}}`` as JSON, each
cumulative from the start: the VMs made and booted (two, as the guest process makes
them; the second opens the image at its own first read, off this path), the image opened
in the first, the first 512 bytes decoded into a shared buffer.  Two warm-up rounds are
dropped.
"""

from __future__ import annotations

import json
import sys
import time

from aiodd.chain import LocalResolver
from aiodd.guest.kvm.reader import KvmReader
from aiodd.guest.memory import shared_buffer
from aiodd.io import LocalFile
from aiodd.policy import Policy

WARM_UP = 2
VMS = 2  # as the guest process makes them (aiodd/guest/child.py)


def main(argv: list[str]) -> int:
    rounds = int(argv[1])
    memory = shared_buffer(8 << 20)
    report: dict[str, dict[str, list[float]]] = {}
    for path in argv[2:]:
        times: dict[str, list[float]] = {"made": [], "opened": [], "first": []}
        for i in range(WARM_UP + rounds):
            policy = Policy()
            file = LocalFile.open(path)
            resolver = LocalResolver(policy, policy.top(path, file.fd))
            started = time.perf_counter()
            reader = KvmReader(path, [memory], vms=VMS)
            made = time.perf_counter()
            disk = reader.open_disk(file, resolver, None)
            opened = time.perf_counter()
            with memoryview(memory) as view:
                disk.read_into(0, view[:512])
            first = time.perf_counter()
            disk.close()
            reader.close()
            if i >= WARM_UP:
                times["made"].append(made - started)
                times["opened"].append(opened - started)
                times["first"].append(first - started)
        report[path] = times
    memory.close()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
