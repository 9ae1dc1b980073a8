"""Times ``open_input(...).close()`` in the guest and inline, in one process.

Run by the isolation section as ``python bench/startup_probe.py ROUNDS IMAGE...``; prints
``{image: {"inline": [seconds...], "sandbox": [...], "inline close": [...],
"sandbox close": [...]}}`` as JSON: the first two time open and close together, the
``close`` lists the close alone.  The two modes
alternate, and two warm-up rounds are dropped (imports, first page-cache touches).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Literal

from aiodd.chain import open_input

Mode = Literal["inline", "sandbox"]
MODES: tuple[Mode, ...] = ("inline", "sandbox")
WARM_UP = 2


def main(argv: list[str]) -> int:
    rounds = int(argv[1])
    report: dict[str, dict[str, list[float]]] = {}
    for path in argv[2:]:
        times: dict[str, list[float]] = {}
        for i in range(WARM_UP + rounds):
            for mode in MODES:
                started = time.perf_counter()
                disk = open_input(path, None, isolation=mode)
                opened = time.perf_counter()
                disk.close()
                closed = time.perf_counter()
                if i >= WARM_UP:
                    times.setdefault(mode, []).append(closed - started)
                    times.setdefault(f"{mode} close", []).append(closed - opened)
        report[path] = times
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
