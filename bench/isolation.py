"""Isolation: the cost of the guest reader.  The same raw and qcow2 → raw copies with
``--isolation=sandbox`` and ``--isolation=inline``, and the guest's start-up."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from bench.context import Bench
from bench.data import IMAGE_KINDS
from bench.measure import Case, Result, find, human
from bench.report import Floor, Section, Table, ratio_floor

NAME = "isolation"
GROUP = "isolation"  # the first column of the floor tables
MODES = ("sandbox", "inline")
PROBE = Path(__file__).with_name("startup_probe.py")


def run(b: Bench) -> Section:
    size = b.sizes.main
    sec = Section(NAME, "Isolation: sandbox vs inline")
    qcow2 = IMAGE_KINDS[0]
    inputs = (
        (
            "raw",
            f"{human(size)} random raw → raw",
            b.data.random_raw(size),
            b.data.random_raw(size),
        ),
        ("qcow2", f"{human(size)} qcow2 → raw", b.data.image(qcow2, size), b.data.mixed_raw(size)),
    )
    out = b.out("isolation.raw")
    runs = max(b.config.runs, 7) if not b.config.quick else b.config.runs
    cases = [
        Case(
            Result(NAME, "main", f"aiodd ({mode})", f"{label}, bs=1M", size),
            (b.aiodd(src, out, bs="1M", isolation=mode, fmt_in=fmt),),
            (out,),
            check=b.same_bytes(expected, out, size),
            runs=runs,
        )
        for fmt, label, src, expected in inputs
        for mode in MODES
    ]
    b.log("[isolation] copies, sandbox vs inline")
    results = b.run(cases)
    sec.tables.append(Table(f"{human(size)} copies, bs=1M", results))

    floors: list[Floor] = []
    for _, label, _, _ in inputs:
        floors.append(
            ratio_floor(
                GROUP,
                f"sandbox within 10% of inline: {label}",
                find(results, "aiodd (sandbox)", f"{label}, bs=1M"),
                find(results, "aiodd (inline)", f"{label}, bs=1M"),
                1.10,
            )
        )

    # --- the guest's start-up, timed in one process -----------------------------------
    b.log("[isolation] guest start-up (open_input in-process)")
    rounds = b.sizes.startup_rounds
    paths = [str(src) for _, _, src, _ in inputs]
    proc = subprocess.run(
        [b.config.python, str(PROBE), str(rounds), *paths],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sec.notes.append(f"The start-up probe failed: {proc.stderr.strip()[-500:]}")
        sec.floors = floors
        return sec
    report: dict[str, dict[str, list[float]]] = json.loads(proc.stdout)
    rows = [
        "| input | inline open+close ms | sandbox open+close ms | sandbox close alone ms "
        "| guest start-up ms (sandbox - inline) | sandbox min-max ms |",
        "|---|---|---|---|---|---|",
    ]
    for (_, label, _, _), path in zip(inputs, paths, strict=True):
        times = report[path]
        inline = statistics.median(times["inline"]) * 1000
        sandbox = statistics.median(times["sandbox"]) * 1000
        close = statistics.median(times["sandbox close"]) * 1000
        startup = sandbox - inline
        lo, hi = min(times["sandbox"]) * 1000, max(times["sandbox"]) * 1000
        name = label.split(" → ")[0]
        rows.append(
            f"| {name} | {inline:.2f} | {sandbox:.1f} | {close:.1f} | {startup:.1f} "
            f"| {lo:.1f}-{hi:.1f} |"
        )
        floors.append(
            Floor(
                GROUP,
                f"guest start-up under 50 ms ({name})",
                f"{startup:.1f} ms",
                "< 50 ms",
                startup < 50,
            )
        )
    sec.appendix.append(
        "#### Guest start-up\n\n"
        "`open_input(path, None, isolation=MODE).close()` timed in one process, "
        f"{rounds} rounds after 2 warm-up rounds, the modes alternating; medians.  This is "
        "a cold start: the CLI starts its guest first thing (`prestart`), so part of it "
        "overlaps the host's own imports (compare the two aiodd rows of the fixed-cost "
        "table in the raw section).\n\n" + "\n".join(rows)
    )
    sec.floors = floors
    return sec
