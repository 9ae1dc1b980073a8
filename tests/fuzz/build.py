"""Build the KVM guest's decoders natively, for the tests and the fuzzer (README.md).

The same C sources as the guest (aiodd/guest/kvm/build.py), with tests/fuzz/hosted.c in
place of the doorbell and the guest's heap: a shared library for ctypes
(:func:`build_library`) and a libFuzzer binary (:func:`build_fuzzer`).  Both link the
system's zlib and zstd.  Run by hand::

    python tests/fuzz/build.py fuzzer OUT   # or fuzzer-vpc, fuzzer-vmdk, fuzzer-parallels, library
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from aiodd.guest.kvm import build as guest_build

HERE = Path(__file__).resolve().parent
SOURCES = (
    HERE / "hosted.c",
    guest_build.SRC / "disk.c",
    guest_build.RUNTIME / "report.c",
    *guest_build.DECODERS,
)
FLAGS = (*guest_build.WARNINGS, "-DAIODD_HOSTED", "-g")
INCLUDES = tuple(arg for path in (*guest_build.INCLUDES, HERE) for arg in ("-I", str(path)))
LIBRARIES = ("-lz", "-lzstd")
# src/disk.c's budgets cut down: no L1 table is held whole and the cache has one slot,
# so every table is read through the cache and evicted by the next; and the vhdx log's
# windows too: an entry of more than two sectors spans windows of the log, and the
# overlay is built two edges at a time, so every replayed log is read window by window.
TINY_TABLES = (
    "-DTABLES_HELD_BUDGET=0",
    "-DCACHE_BUDGET=0",
    "-DCACHE_MIN_SLOTS=1",
    "-DLOG_WINDOW=8192ULL",
    "-DEDGE_MAX=2ULL",
)
SANITIZERS = "-fsanitize=fuzzer,address,undefined"


class HostedBuildError(Exception):
    """The compiler is missing or refused the sources; the message says which."""


class CompilerMissing(HostedBuildError):
    """No such compiler here: the tests that need it skip.  Any other build error fails
    them (a decoder that stopped compiling must not read as a skip)."""


def _compile(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HostedBuildError(f"{Path(args[0]).name} failed:\n{result.stderr.strip()}")


def compiler(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise CompilerMissing(f"{name} not found")
    return found


def build_library(output: Path, *, cc: str = "gcc", tiny_tables: bool = False) -> Path:
    """The decoders as a shared library with the hosted_* API (hosted.h), for ctypes;
    undefined behaviour stops it (UBSan, no recovery)."""
    ub = ("-fsanitize=undefined", "-fno-sanitize-recover=all")
    tiny = TINY_TABLES if tiny_tables else ()
    _compile(
        [compiler(cc), *FLAGS, *tiny, *ub, "-O1", "-fPIC", "-shared", *INCLUDES]
        + ["-o", str(output)]
        + [str(s) for s in SOURCES]
        + list(LIBRARIES)
    )
    return output


def build_fuzzer(
    output: Path, *, cc: str = "clang", tiny_tables: bool = True, target: str = "fuzz_qcow2.c"
) -> Path:
    """The libFuzzer binary of ``target`` (fuzz_qcow2.c, fuzz_vpc.c, fuzz_vmdk.c,
    fuzz_parallels.c), with AddressSanitizer and UBSan; with tiny tables by default, as a
    fuzzing input is too small to need the cache otherwise."""
    tiny = TINY_TABLES if tiny_tables else ()
    _compile(
        [compiler(cc), *FLAGS, *tiny, SANITIZERS, "-fno-sanitize-recover=undefined", "-O1"]
        + list(INCLUDES)
        + ["-o", str(output), str(HERE / target)]
        + [str(s) for s in SOURCES]
        + list(LIBRARIES)
    )
    return output


if __name__ == "__main__":  # pragma: no cover - by hand
    what, out = sys.argv[1], Path(sys.argv[2])
    if what.startswith("fuzzer"):  # fuzzer, or fuzzer-vpc for fuzz_vpc.c
        fmt = what.partition("-")[2] or "qcow2"
        print(build_fuzzer(out, target=f"fuzz_{fmt}.c"))
    else:
        print(build_library(out, tiny_tables="tiny" in what))
