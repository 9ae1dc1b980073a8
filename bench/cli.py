"""The bench's command line: run the sections, print markdown tables, save results."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import cache, features, inputs, isolation, kvm, machine, outputs, raw, startup
from bench.context import FULL, QUICK, Bench, Config
from bench.measure import MiB
from bench.report import Floor, Section, render_floors, render_section

SECTIONS: dict[str, Callable[[Bench], Section]] = {
    "raw": raw.run,
    "inputs": inputs.run,
    "outputs": outputs.run,
    "isolation": isolation.run,
    "kvm": kvm.run,
    "checksum": features.run_checksum,
    "sparse": features.run_sparse,
    "cache": cache.run,
    "startup": startup.run,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark aiodd against qemu-img dd, qemu-img convert and coreutils dd. "
        "Prints one markdown table per case group and the floors (raw copy, input formats, "
        "output formats, isolation), pass or fail.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small inputs (8/32/128 MiB) and 1 run per case: a smoke test in about half a minute",
    )
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    p.add_argument(
        "--runs", type=int, help="runs per case, the median is shown (default 5; quick 1)"
    )
    p.add_argument(
        "--slow",
        type=float,
        default=10.0,
        help="a case whose first run takes longer than this many seconds runs once (default 10)",
    )
    p.add_argument(
        "--workdir", type=Path, help="where to make a temporary directory (default /tmp)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-verify", action="store_true", help="skip checking aiodd's outputs")
    p.add_argument("--aiodd", help="the aiodd executable (default: the one beside this python)")
    p.add_argument("--plot", type=Path, help="write the throughput-against-bs plot (PNG) here")
    p.add_argument("--markdown", type=Path, help="also write every table to this file")
    p.add_argument("--json", type=Path, help="write every measurement to this JSON file")
    p.add_argument(
        "--check", action="store_true", help="exit 3 when any floor fails (default: report only)"
    )
    p.add_argument(
        "--keep-page-reporting",
        action="store_true",
        help="leave the kernel's free page reporting (virtio-balloon) on, as it is; by default "
        "the bench turns it off for the run where it may, so that page-cache copies run at one "
        'speed (docs/performance.md, "Two speeds")',
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        print(
            f"unknown section(s): {', '.join(unknown)}; use {','.join(SECTIONS)}", file=sys.stderr
        )
        return 2
    if args.plot is not None and "raw" not in only:
        print("--plot needs the raw section", file=sys.stderr)
        return 2
    aiodd = args.aiodd or str(Path(sys.executable).with_name("aiodd"))
    if shutil.which(aiodd) is None:
        print(f"aiodd not found at {aiodd}: pass --aiodd", file=sys.stderr)
        return 2
    for tool in ("qemu-img", "dd", "sync"):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH", file=sys.stderr)
            return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # Said now, not after the whole run has been measured.
        print("--plot needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    parent = args.workdir or Path(tempfile.gettempdir())
    workdir = Path(tempfile.mkdtemp(prefix="aiodd-bench-", dir=parent))
    config = Config(
        workdir=workdir,
        sizes=QUICK if args.quick else FULL,
        runs=args.runs or (1 if args.quick else 5),
        slow=args.slow,
        verify=not args.no_verify,
        aiodd=aiodd,
        python=sys.executable,
        quick=args.quick,
    )
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        with machine.steady_page_cache(args.keep_page_reporting, log) as reporting:
            return _run(args, only, config, log, started, reporting)
    finally:
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    only: list[str],
    config: Config,
    log: Callable[[str], None],
    started: float,
    reporting: str,
) -> int:
    bench = Bench(config, log)
    facts = machine.describe(config.workdir, config.aiodd, config.python)
    facts.append(("free page reporting", reporting))
    mode = "quick" if config.quick else "full"
    facts.append(("bench", f"{mode}; {config.runs} runs per case unless the table says otherwise"))
    head = "## Machine\n\n" + machine.render(facts)
    print(head, flush=True)
    log(f"work directory {config.workdir}")
    sections: list[Section] = []
    failed_runs = False
    for name in only:
        section_started = time.monotonic()
        load_before = os.getloadavg()[0]
        section = SECTIONS[name](bench)
        elapsed = time.monotonic() - section_started
        load_after = os.getloadavg()[0]
        section.notes.append(
            f"Section time: {elapsed:.0f} s; 1-minute load average {load_before:.2f} at its "
            f"start, {load_after:.2f} at its end (the machine has {os.cpu_count()} CPUs)."
        )
        sections.append(section)
        failed_runs |= any(not r.ok for t in section.tables for r in t.results)
        print(render_section(section), flush=True)

    floors: list[Floor] = [f for s in sections for f in s.floors]
    summary = "## All floors\n\n" + render_floors(floors)
    total = time.monotonic() - started
    made = "\n".join(
        f"| {name} | {what} | {size / MiB:,.1f} | {alloc / MiB:,.1f} |"
        for name, what, size, alloc in bench.data.describe()
    )
    files = (
        "## Inputs made\n\n| file | what | size MiB | allocated MiB |\n|---|---|---|---|\n" + made
    )
    tail = f"{summary}\n{files}\n\nTotal bench time: {total:.0f} s.\n"
    print(tail, flush=True)

    if args.markdown is not None:
        body = "\n".join(render_section(s) for s in sections)
        args.markdown.write_text(f"{head}\n{body}\n{tail}")
        log(f"markdown written to {args.markdown}")
    if args.json is not None:
        data = {
            "machine": dict(facts),
            "results": [r.as_json() for s in sections for t in s.tables for r in t.results],
            "floors": [f.__dict__ for f in floors],
        }
        args.json.write_text(json.dumps(data, indent=1))
        log(f"measurements written to {args.json}")
    if args.plot is not None:
        from bench.plot import plot_throughput

        raw_results = [r for s in sections if s.name == "raw" for t in s.tables for r in t.results]
        plot_throughput(raw_results, args.plot)
        log(f"plot written to {args.plot}")

    if failed_runs:
        log("some runs failed: see the tables")
        return 1
    if args.check and any(f.passed is False and not f.informative for f in floors):
        return 3
    return 0
