"""The KVM guest reader against in-process decoding: the same 1 GiB copies to raw with
``--isolation=kvm`` and ``--isolation=inline`` (and ``sandbox`` for reference), for every
input the guest decodes, and the VM's start-up to its first decoded byte."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from bench.context import Bench
from bench.data import ImageKind
from bench.measure import human
from bench.modes import Copy, copy_cases, kvm_unavailable, run_probe, within_inline
from bench.report import Floor, Section, Table

NAME = "kvm"
GROUP = "kvm"  # the first column of the floor tables
MODES = ("kvm", "inline", "sandbox")
PROBE = Path(__file__).with_name("kvm_probe.py")
START_LIMIT_MS = 5.0

KINDS = (
    ImageKind("qcow2", "qcow2", "qcow2", (), False),
    ImageKind("qcow2-zlib", "qcow2", "qcow2 compressed (zlib)", ("-c",), True),
    ImageKind(
        "qcow2-zstd",
        "qcow2",
        "qcow2 compressed (zstd)",
        ("-c", "-o", "compression_type=zstd"),
        True,
    ),
    ImageKind("vmdk-sparse", "vmdk", "vmdk monolithicSparse", (), False),
    ImageKind(
        "vmdk-stream", "vmdk", "vmdk streamOptimized", ("-o", "subformat=streamOptimized"), True
    ),
    ImageKind(
        "vpc-dynamic", "vpc", "vpc dynamic", ("-o", "subformat=dynamic,force_size=on"), False
    ),
    ImageKind("vhdx", "vhdx", "vhdx (dynamic)", (), False),
    ImageKind("vdi", "vdi", "vdi (dynamic)", (), False),
    ImageKind("parallels", "parallels", "parallels (1 MiB clusters)", (), False),
)


def _guest_formats(b: Bench) -> frozenset[str]:
    """The formats the installed guest decodes (the bench measures those)."""
    proc = subprocess.run(
        [b.config.python, "-c",
         "from aiodd.guest.kvm.reader import GUEST_FORMATS as g; print(','.join(sorted(g)))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return frozenset(proc.stdout.strip().split(",")) if proc.returncode == 0 else frozenset()


def run(b: Bench) -> Section:
    size = b.sizes.main
    sec = Section(NAME, "The KVM guest reader: kvm vs inline")
    why = kvm_unavailable(b.config.python)
    formats = _guest_formats(b)
    if why is not None or "raw" not in formats:
        sec.notes.append(f"The KVM guest reader cannot run here ({why}): nothing measured.")
        return sec
    raw = b.data.mixed_raw(size)
    copies = [
        Copy("raw", f"{human(size)} random raw", b.data.random_raw(size), b.data.random_raw(size))
    ]
    for kind in KINDS:
        if kind.fmt in formats:
            copies.append(Copy(kind.fmt, kind.label, b.data.image(kind, size), raw))
    if "qcow2" in formats:
        chain, expected = b.data.qcow2_chain(size)
        copies.append(Copy("qcow2", "3-layer qcow2 chain", chain, expected))
    if "vhdx" in formats:
        child, expected = b.data.vhdx_differencing(size)
        copies.append(Copy("vhdx", "vhdx differencing over a dynamic parent", child, expected))
    runs = max(b.config.runs, 7) if not b.config.quick else b.config.runs
    b.log("[kvm] copies, kvm vs inline vs sandbox")
    results = b.run(copy_cases(b, NAME, copies, MODES, runs))
    sec.tables.append(Table(f"{human(size)} copies to raw, bs=1M", results))
    floors = within_inline(GROUP, results, copies, "kvm")

    b.log("[kvm] the VM's start-up to its first decoded byte")
    rounds = b.sizes.startup_rounds
    report = run_probe(b, PROBE, copies[:2])
    if isinstance(report, str):
        sec.notes.append(report)
        sec.floors = floors
        return sec
    rows = [
        "| input | VM made ms | opened ms | first byte ms | min-max first byte ms |",
        "|---|---|---|---|---|",
    ]
    for c in copies[:2]:
        times = report[str(c.src)]
        made, opened, first = (
            statistics.median(times[key]) * 1000 for key in ("made", "opened", "first")
        )
        lo, hi = min(times["first"]) * 1000, max(times["first"]) * 1000
        rows.append(f"| {c.label} | {made:.2f} | {opened:.2f} | {first:.2f} | {lo:.2f}-{hi:.2f} |")
        floors.append(
            Floor(
                GROUP,
                f"VM start to the first decoded byte under {START_LIMIT_MS:g} ms ({c.label})",
                f"{first:.2f} ms",
                f"< {START_LIMIT_MS:g} ms",
                first < START_LIMIT_MS,
            )
        )
    sec.appendix.append(
        "#### The VM's start-up\n\n"
        "`KvmReader(...)` (open `/dev/kvm`, make the VM and its memory, boot the guest to "
        "its first doorbell), `open_disk` (the guest parses the image), then the first "
        f"512 bytes read: cumulative times in one process, {rounds} rounds after 2 warm-up "
        "rounds, medians.  The copy's own child process (the sandbox around the VMM) is "
        "the sandbox mode's start-up, in the isolation section.\n\n" + "\n".join(rows)
    )
    sec.floors = floors
    return sec
