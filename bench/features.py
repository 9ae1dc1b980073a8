"""Options that change the work per byte, one section each: ``checksum`` (what
``--checksum`` costs on a 1 GiB raw → raw copy, against the same copy without it and
against hashing the output afterwards) and ``sparse`` (a big, mostly empty qcow2 written
with ``--sparse`` and densely, to every output format)."""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.context import Bench
from bench.measure import Case, MiB, Result, find, human
from bench.raw import copy_seconds
from bench.report import Floor, Section, Table, ratio_floor

NAME = "options"
GROUP = "options"  # the first column of the floor tables
ALGORITHMS = ("sha256", "sha512", "blake2b")
HASH_PROBE = Path(__file__).with_name("hash_probe.py")
# OpenSSL's mask for the CPU's SHA extensions (CPUID leaf 7, EBX bit 29): a run with it
# shows whether hashlib's sha256 uses them.
NO_SHA_EXTENSIONS = "OPENSSL_ia32cap=:~0x20000000"
FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx")
EXT = {"vpc": "vhd"}


def _digest_check(b: Bench, src: Path, out: Path, algorithm: str) -> Callable[[], str | None]:
    """The output holds the input's bytes, and the checksum in aiodd's last
    ``--progress=json`` record is the digest of those bytes."""
    same = b.same_bytes(src, out, b.sizes.main)

    def check() -> str | None:
        problem = same()
        if problem is not None:
            return problem
        lines = b.stderr_path.read_text().strip().splitlines()
        printed = json.loads(lines[-1]).get("checksum") if lines else None
        digest = hashlib.new(algorithm)
        with out.open("rb") as f:
            while chunk := f.read(8 * MiB):
                digest.update(chunk)
        expected = f"{algorithm}:{digest.hexdigest()}"
        return None if printed == expected else f"checksum {printed}, expected {expected}"

    return check


def _sha_extensions() -> bool:
    """Whether the CPU has the x86 SHA extensions (``sha_ni`` in /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "sha_ni" in line.split() for line in text.splitlines())


def _hash_alone(b: Bench, algorithm: str, *, masked: bool = False) -> Case:
    """hashlib alone, in one thread, over as many bytes as the copy (bench/hash_probe.py)."""
    size = b.sizes.main
    case = f"{algorithm} of {human(size)} in memory"
    argv: tuple[str, ...] = (b.config.python, str(HASH_PROBE), algorithm, str(size))
    if masked:
        case += ", SHA extensions masked"
        argv = ("env", NO_SHA_EXTENSIONS, *argv)
    return Case(Result(NAME, "checksum", "hashlib, one thread", case, size), (argv,))


def _copy_time(r: Result) -> str:
    copies = [c for c in (copy_seconds(s.stderr_tail) for s in r.samples) if c is not None]
    if not copies:
        return ""
    copies.sort()
    return f"{copies[len(copies) // 2]:.3f}"


def _allocated(r: Result) -> str:
    value = r.extra.get("allocated")
    return "" if value is None else f"{value / MiB:,.1f}"


def _image_check(
    src: Path, out: Path, fmt: str, result: Result, *, compare: bool
) -> Callable[[], str | None]:
    """qemu-img compare against the source (or the virtual size alone, for the dense
    copies: comparing 16 GiB of zeros adds nothing), and the output's allocation."""

    def check() -> str | None:
        result.extra["allocated"] = out.stat().st_blocks * 512
        if compare:
            proc = subprocess.run(
                ["qemu-img", "compare", "-f", "qcow2", "-F", fmt, str(src), str(out)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                return f"qemu-img compare: {proc.stdout.strip()} {proc.stderr.strip()}"
        return None

    return check


def run_checksum(b: Bench) -> Section:
    s = b.sizes
    sec = Section("checksum", "Options: --checksum")

    # --- --checksum on a 1 GiB raw → raw copy ------------------------------------------
    src = b.data.random_raw(s.main)
    out = b.out("checksum.raw")
    cases = [
        Case(
            Result(NAME, "checksum", "aiodd (sandbox)", "bs=1M", s.main),
            (b.aiodd(src, out, bs="1M", isolation="sandbox", progress_json=True),),
            (out,),
            check=b.same_bytes(src, out, s.main),
        )
    ]
    for algorithm in ALGORITHMS:
        cases.append(
            Case(
                Result(
                    NAME, "checksum", "aiodd (sandbox)", f"bs=1M --checksum={algorithm}", s.main
                ),
                (
                    b.aiodd(
                        src,
                        out,
                        bs="1M",
                        isolation="sandbox",
                        progress_json=True,
                        options=(f"--checksum={algorithm}",),
                    ),
                ),
                (out,),
                check=_digest_check(b, src, out, algorithm),
            )
        )
    cases.append(
        Case(
            Result(NAME, "checksum", "aiodd, then sha256sum OUTPUT", "bs=1M", s.main),
            (b.aiodd(src, out, bs="1M", isolation="sandbox"), ("sha256sum", str(out))),
            (out,),
        )
    )
    cases += [_hash_alone(b, algorithm) for algorithm in ALGORITHMS]
    sha_extensions = _sha_extensions()
    if sha_extensions:
        cases.append(_hash_alone(b, "sha256", masked=True))
    b.log(f"[checksum] {human(s.main)} random raw → raw")
    checksum_results = b.run(cases)
    sec.tables = [
        Table(
            f"--checksum: {human(s.main)} random raw → raw",
            checksum_results,
            "Every aiodd row writes durably, as always (O_DIRECT, fsync before the rename). "
            "own s: the copy's own time (the last `--progress=json` record), or for the "
            "hashlib rows the hashing's own time, without the interpreter's start.  The row "
            "`aiodd, then sha256sum OUTPUT` hashes the output after the copy instead, with "
            "coreutils sha256sum (which reads it back from the disk: aiodd's O_DIRECT writes "
            "leave it out of the page cache).  The hashlib rows hash as many bytes alone, in "
            "one thread, 4 MiB at a time from a 32 MiB pool, as the digest stage does: the "
            "least CPU time `--checksum` adds, which hides behind the copy only where a CPU "
            "is free"
            + (
                "; `SHA extensions masked` runs with "
                f"`{NO_SHA_EXTENSIONS}`, which turns off OpenSSL's use of the CPU's SHA "
                "instructions (this CPU has them)."
                if sha_extensions
                else "."
            ),
            extra=[("own s", _copy_time)],
        )
    ]
    plain = find(checksum_results, "aiodd (sandbox)", "bs=1M")
    alone = f"%s of {human(s.main)} in memory"
    for algorithm in ALGORITHMS:
        sec.floors += [
            ratio_floor(
                GROUP,
                f"--checksum={algorithm} costs at most 5% ({human(s.main)} raw → raw)",
                find(checksum_results, "aiodd (sandbox)", f"bs=1M --checksum={algorithm}"),
                plain,
                1.05,
                informative=algorithm != "sha256",
            ),
            _hash_limit(find(checksum_results, "hashlib, one thread", alone % algorithm), plain),
        ]
    return sec


def _hash_limit(alone: Result, plain: Result) -> Floor:
    """The hash alone against the plain copy: what ``--checksum`` costs where it cannot
    overlap the copy (no free CPU), beside the 5 % floor that assumes it does."""
    algorithm = alone.case.split()[0]
    name = (
        f"hash alone: {algorithm} in one thread, against the plain copy (what "
        f"--checksum={algorithm} costs where no CPU is free to overlap it)"
    )
    hashing = [c for c in (copy_seconds(x.stderr_tail) for x in alone.samples) if c is not None]
    if not (alone.ok and plain.ok and hashing):
        return Floor(GROUP, name, "a run failed", "≤ 0.05x", None, informative=True)
    seconds = statistics.median(hashing)
    ratio = seconds / plain.median
    measured = f"{seconds:.3f} s vs {plain.median:.3f} s = **{ratio:.2f}x**"
    return Floor(GROUP, name, measured, "≤ 0.05x", ratio <= 0.05, informative=True)


def run_sparse(b: Bench) -> Section:
    s = b.sizes
    sec = Section("sparse", "Options: --sparse")
    big = b.fitting(s.big_raw, overhead=1.01)
    image = b.data.mostly_empty_qcow2(big)
    note = "" if big == s.big_raw else f"reduced from {human(s.big_raw)}: disk space"
    sparse_cases: list[Case] = []
    for fmt in FORMATS:
        target = b.out(f"sparse.{EXT.get(fmt, fmt)}")
        for sparse in (True, False):
            label = f"{human(big)} qcow2 (4 MiB of data) → {fmt}" + (", --sparse" if sparse else "")
            result = Result(NAME, "sparse", "aiodd (sandbox)", label, big)
            result.note = note
            options = ("--sparse",) if sparse else ()
            sparse_cases.append(
                Case(
                    result,
                    (
                        b.aiodd(
                            image,
                            target,
                            bs="1M",
                            isolation="sandbox",
                            fmt_in="qcow2",
                            fmt_out=fmt,
                            options=options,
                        ),
                    ),
                    (target,),
                    check=_image_check(image, target, fmt, result, compare=sparse),
                    runs=None if sparse else 1,  # a dense copy writes all of it: once
                )
            )
    b.log(f"[sparse] {human(big)} mostly empty qcow2 → each format")
    sparse_results = b.run(sparse_cases)

    sec.tables = [
        Table(
            f"--sparse: {human(big)} qcow2 with 4 MiB of data → each format",
            sparse_results,
            "The input is made by `qemu-img create` and four 1 MiB `qemu-io` writes; the rest "
            "of it is unallocated.  Dense copies (one run each) write every byte; sparse ones "
            "are checked with `qemu-img compare` against the input.  allocated MiB: the "
            "output's st_blocks.",
            extra=[("allocated MiB", _allocated)],
        ),
    ]

    floors: list[Floor] = []
    for fmt in FORMATS:
        dense_label = f"{human(big)} qcow2 (4 MiB of data) → {fmt}"
        floors.append(
            ratio_floor(
                GROUP,
                f"--sparse faster than dense, {human(big)} mostly empty → {fmt}",
                find(sparse_results, "aiodd (sandbox)", dense_label + ", --sparse"),
                find(sparse_results, "aiodd (sandbox)", dense_label),
                1.0,
                informative=True,
            )
        )
    sec.floors = floors
    if note:
        sec.notes.append(f"The mostly empty input was {human(big)}: {note}.")
    return sec
