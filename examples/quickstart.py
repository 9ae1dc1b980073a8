"""A first real copy: make a sample disk, cut a window out of it with the aiodd CLI.

    python examples/quickstart.py [WORKDIR]

It builds a 64 MiB raw disk (an MBR, two "partitions" of recognisable data and some
zeros), copies the second partition out to a qcow2 image with progress shown, copies
that image back to raw, and checks the bytes.  Only aiodd itself is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1024 * 1024
DISK = 64 * MiB
PART2 = (40 * MiB, 16 * MiB)  # offset, length


def make_sample(path: Path) -> bytes:
    disk = bytearray(DISK)
    disk[510:512] = b"\x55\xaa"  # an MBR signature, so the boot sector is not all zeros
    disk[1 * MiB : 1 * MiB + 8 * MiB] = os.urandom(8 * MiB)
    offset, length = PART2
    pattern = b"aiodd quickstart partition 2\n"
    disk[offset : offset + length] = (pattern * (length // len(pattern) + 1))[:length]
    path.write_bytes(disk)
    return bytes(disk)


def aiodd(*args: str) -> None:
    command = [shutil.which("aiodd") or sys.executable, *args]
    if command[0] == sys.executable:
        command[1:1] = ["-m", "aiodd"]
    print("$", " ".join(["aiodd", *args]), flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="aiodd-"))
    work.mkdir(parents=True, exist_ok=True)
    sample = work / "sample.raw"
    data = make_sample(sample)
    offset, length = PART2
    aiodd("-p", "-O", "qcow2", f"if={sample}", f"of={work / 'part2.qcow2'}",
          "bs=1M", f"skip={offset // MiB}", f"count={(offset + length) // MiB}")  # fmt: skip
    aiodd(f"if={work / 'part2.qcow2'}", f"of={work / 'part2.raw'}", "bs=1M")
    aiodd(f"if={sample}", f"of={work / 'boot.raw'}", "count=1")
    copied = (work / "part2.raw").read_bytes()
    ok = copied == data[offset : offset + length]
    ok = ok and (work / "boot.raw").read_bytes() == data[:512]
    print(f"window of {length // MiB} MiB at {offset // MiB} MiB copied to qcow2 and back:",
          "identical" if ok else "DIFFERENT")  # fmt: skip
    print(f"files are in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
