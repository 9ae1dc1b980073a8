"""Isolation: the cost of the guest reader.  The same raw and qcow2 → raw copies with
``--isolation=sandbox`` and ``--isolation=inline``, and the guest's start-up."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.context import Bench
from bench.data import IMAGE_KINDS
from bench.measure import human
from bench.modes import Copy, copy_cases, run_probe, within_inline
from bench.report import Floor, Section, Table

NAME = "isolation"
GROUP = "isolation"  # the first column of the floor tables
MODES = ("sandbox", "inline")
PROBE = Path(__file__).with_name("startup_probe.py")


def run(b: Bench) -> Section:
    size = b.sizes.main
    sec = Section(NAME, "Isolation: sandbox vs inline")
    qcow2 = IMAGE_KINDS[0]
    copies = (
        Copy("raw", f"{human(size)} random raw", b.data.random_raw(size), b.data.random_raw(size)),
        Copy("qcow2", f"{human(size)} qcow2", b.data.image(qcow2, size), b.data.mixed_raw(size)),
    )
    runs = max(b.config.runs, 7) if not b.config.quick else b.config.runs
    b.log("[isolation] copies, sandbox vs inline")
    results = b.run(copy_cases(b, NAME, copies, MODES, runs))
    sec.tables.append(Table(f"{human(size)} copies, bs=1M", results))

    floors = within_inline(GROUP, results, copies, "sandbox", " → raw")

    # --- the guest's start-up, timed in one process -----------------------------------
    b.log("[isolation] guest start-up (open_input in-process)")
    rounds = b.sizes.startup_rounds
    report = run_probe(b, PROBE, copies)
    if isinstance(report, str):
        sec.notes.append(report)
        sec.floors = floors
        return sec
    rows = [
        "| input | inline open+close ms | sandbox open+close ms | sandbox close alone ms "
        "| guest start-up ms (sandbox - inline) | sandbox min-max ms |",
        "|---|---|---|---|---|---|",
    ]
    for c in copies:
        times = report[str(c.src)]
        inline = statistics.median(times["inline"]) * 1000
        sandbox = statistics.median(times["sandbox"]) * 1000
        close = statistics.median(times["sandbox close"]) * 1000
        startup = sandbox - inline
        lo, hi = min(times["sandbox"]) * 1000, max(times["sandbox"]) * 1000
        name = c.label
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
