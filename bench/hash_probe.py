"""Hashes SIZE bytes with hashlib in one thread, as ``--checksum``'s stage feeds it: 4 MiB
buffers taken in turn from a 32 MiB pool (the pipeline's 8 buffers), no copies.

Run by the checksum section as ``python bench/hash_probe.py ALGORITHM SIZE``; prints
``{"elapsed": SECONDS}`` (the hashing alone, without the start-up) as the last line of
stderr, in the shape of aiodd's ``--progress=json`` records, so the section reads both
the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

UNIT = 4 << 20
BUFFERS = 8


def main(argv: list[str]) -> int:
    algorithm, size = argv[1], int(argv[2])
    with memoryview(bytearray(UNIT * BUFFERS)) as pool:
        for at in range(0, len(pool), UNIT):
            pool[at : at + UNIT] = os.urandom(UNIT)
        hasher = hashlib.new(algorithm)
        started = time.perf_counter()
        done = 0
        while done < size:
            at = (done // UNIT % BUFFERS) * UNIT
            n = min(UNIT, size - done)
            hasher.update(pool[at : at + n])
            done += n
        elapsed = time.perf_counter() - started
    print(json.dumps({"elapsed": elapsed, "checksum": hasher.hexdigest()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
