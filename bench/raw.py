"""Raw → raw, the engine alone.  Random raw → raw against qemu-img dd, qemu-img convert and
coreutils dd; fixed costs; where aiodd's time goes; peak memory on big sparse inputs."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from bench.context import Bench
from bench.measure import Case, Result, find, human
from bench.modes import kvm_skipped, modes
from bench.report import Floor, Section, Table, ratio_floor, rss_floor

BS_SWEEP = ("512", "4K", "64K", "1M", "4M")
NAME = "raw"
GROUP = "raw → raw"  # the first column of the floor tables


def _r(table: str, tool: str, case: str, nbytes: int) -> Result:
    return Result(NAME, table, tool, case, nbytes)


def _aiodd_cases(
    b: Bench, table: str, src: Path, out: Path, size: int, bs: str, modes: tuple[str, ...]
) -> list[Case]:
    """aiodd at ``bs`` in each isolation mode, its output checked against ``src``."""
    return [
        Case(
            _r(table, f"aiodd ({mode})", f"bs={bs}", size),
            (b.aiodd(src, out, bs=bs, isolation=mode),),
            (out,),
            check=b.same_bytes(src, out, size),
        )
        for mode in modes
    ]


def copy_seconds(sample_stderr: str) -> float | None:
    """aiodd's own copy time: ``elapsed`` of the last ``--progress=json`` record."""
    for line in reversed(sample_stderr.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return float(json.loads(line)["elapsed"])
            except (ValueError, KeyError):
                return None
    return None


def run(b: Bench) -> Section:
    s = b.sizes
    sec = Section(NAME, "Raw → raw")
    ms = modes(b)
    if skipped := kvm_skipped(b):
        sec.preamble.append(skipped)
    small = b.data.random_raw(s.sweep)
    main = b.data.random_raw(s.main)
    tiny = b.data.random_raw(s.tiny)

    # --- fixed costs: what a copy of almost nothing costs ----------------------------
    out = b.out("tiny.raw")
    fixed_runs = max(b.config.runs, 3 if b.config.quick else 10)
    fixed = [
        Case(
            _r("fixed", "python", "-c pass", 0), ((b.config.python, "-c", "pass"),), runs=fixed_runs
        ),
        Case(
            _r("fixed", "python", "-c 'import aiodd.cli'", 0),
            ((b.config.python, "-c", "import aiodd.cli"),),
            runs=fixed_runs,
        ),
    ]
    for mode in ms:
        fixed.append(
            Case(
                _r("fixed", f"aiodd ({mode})", "bs=1M", s.tiny),
                (b.aiodd(tiny, out, bs="1M", isolation=mode),),
                (out,),
                runs=fixed_runs,
            )
        )
    fixed += [
        Case(
            _r("fixed", "qemu-img convert", "-O raw", s.tiny),
            (b.qemu_convert(tiny, out),),
            (out,),
            runs=fixed_runs,
        ),
        Case(
            _r("fixed", "qemu-img dd", "bs=1M", s.tiny),
            (b.qemu_dd(tiny, out, bs="1M"),),
            (out,),
            runs=fixed_runs,
        ),
        Case(
            _r("fixed", "coreutils dd", "bs=4M", s.tiny),
            (b.coreutils_dd(tiny, out),),
            (out,),
            runs=fixed_runs,
        ),
    ]
    b.log(f"[raw] fixed costs ({human(s.tiny)} input)")
    fixed_results = b.run(fixed)

    # --- the bs sweep against qemu-img dd --------------------------------------------
    out = b.out("sweep.raw")
    sweep: list[Case] = []
    for bs in BS_SWEEP:
        sweep += _aiodd_cases(b, "sweep", small, out, s.sweep, bs, ms)
        sweep.append(
            Case(
                _r("sweep", "qemu-img dd", f"bs={bs}", s.sweep),
                (b.qemu_dd(small, out, bs=bs),),
                (out,),
                check=b.same_bytes(small, out, s.sweep),
            )
        )
    b.log(f"[raw] bs sweep ({human(s.sweep)} input)")
    sweep_results = b.run(sweep)

    # --- the main comparison ---------------------------------------------------------
    out = b.out("main.raw")
    main_cases = [c for bs in BS_SWEEP for c in _aiodd_cases(b, "main", main, out, s.main, bs, ms)]
    main_cases += [
        Case(_r("main", "qemu-img dd", "bs=1M", s.main), (b.qemu_dd(main, out, bs="1M"),), (out,)),
        Case(
            _r("main", "qemu-img convert", "-O raw", s.main), (b.qemu_convert(main, out),), (out,)
        ),
        Case(
            _r("main", "qemu-img convert + sync", "-O raw, then sync FILE", s.main),
            (b.qemu_convert(main, out), b.sync(out)),
            (out,),
        ),
        Case(_r("main", "coreutils dd", "bs=4M", s.main), (b.coreutils_dd(main, out),), (out,)),
        Case(
            _r("main", "coreutils dd", "bs=4M conv=fsync", s.main),
            (b.coreutils_dd(main, out, fsync=True),),
            (out,),
        ),
        # The disk's own speed for a durable copy, past the page cache: no durable
        # copy of this file, aiodd's included, can finish faster than this.
        Case(
            _r("main", "coreutils dd", "bs=4M oflag=direct conv=fsync", s.main),
            (b.coreutils_dd(main, out, fsync=True, direct=True),),
            (out,),
        ),
    ]
    b.log(f"[raw] main comparison ({human(s.main)} input)")
    main_results = b.run(main_cases)

    # --- where aiodd's time goes -----------------------------------------------------
    out = b.out("split.raw")
    split = [
        Case(
            _r("split", f"aiodd ({mode})", "bs=1M --progress=json", s.main),
            (b.aiodd(main, out, bs="1M", isolation=mode, progress_json=True),),
            (out,),
        )
        for mode in ms
    ]
    b.log("[raw] time split (--progress=json)")
    split_results = b.run(split)
    python_start = find(fixed_results, "python", "-c 'import aiodd.cli'")
    startup = python_start.median if python_start.ok else 0.0
    for r in split_results:
        copies = [c for c in (copy_seconds(x.stderr_tail) for x in r.samples) if c is not None]
        if copies:
            r.extra["copy"] = statistics.median(copies)
            r.extra["rest"] = r.median - r.extra["copy"] - startup

    # --- peak memory on big sparse inputs --------------------------------------------
    big = b.fitting(s.big_raw)
    sparse = b.data.sparse(big)
    out = b.out("big.raw")
    note = "" if big == s.big_raw else f"reduced from {human(s.big_raw)}: disk space"
    rss_cases = [
        Case(
            _r("rss", f"aiodd ({mode})", f"{human(s.main)} random, bs=1M", s.main),
            (b.aiodd(main, out, bs="1M", isolation=mode),),
            (out,),
            sample_tree=True,
            runs=min(b.config.runs, 3),
        )
        for mode in ms
    ]
    big_modes = [("sandbox", "1M"), ("sandbox", "512"), ("inline", "1M")]
    big_modes += [("kvm", "1M")] if "kvm" in ms else []
    for mode, bs in big_modes:
        result = _r("rss", f"aiodd ({mode})", f"{human(big)} sparse, bs={bs}", big)
        result.note = note
        rss_cases.append(
            Case(
                result,
                (b.aiodd(sparse, out, bs=bs, isolation=mode),),
                (out,),
                check=b.size_is(out, big),
                sample_tree=True,
                runs=1,
            )
        )
    b.log(f"[raw] peak memory ({human(big)} sparse input; the output is written dense)")
    rss_results = b.run(rss_cases)

    # --- tables ----------------------------------------------------------------------
    sec.tables = [
        Table(
            f"Fixed costs: a {human(s.tiny)} random raw input",
            fixed_results,
            "Start-up and tear-down, nearly nothing copied.",
        ),
        Table(
            f"bs sweep: {human(s.sweep)} random raw → raw, aiodd vs qemu-img dd",
            sweep_results,
            "qemu-img dd issues one read and one write per block; aiodd's I/O unit does "
            "not depend on bs.  A case whose first run took over "
            f"{b.config.slow:g} s ran once.",
        ),
        Table(
            f"{human(s.main)} random raw → raw",
            main_results,
            "aiodd fsyncs its output before the rename (docs/usage.md#durability); qemu-img "
            "convert and "
            "coreutils dd do not, unless followed by `sync FILE` or given conv=fsync.  "
            "dd oflag=direct conv=fsync writes past the page cache: the disk's own speed.",
        ),
        Table(
            f"Where aiodd's time goes ({human(s.main)}, bs=1M)",
            split_results,
            "copy s: the copy's own elapsed time (the last `--progress=json` record); "
            f"start-up: `python -c 'import aiodd.cli'` ({startup:.3f} s, fixed-cost table); "
            "rest s = median - copy - start-up: opening the input (and the guest), "
            "creating the output, the final fsync, rename and exit.",
            extra=[("copy s", _extra("copy")), ("rest s", _extra("rest"))],
        ),
        Table(
            "Peak memory",
            rss_results,
            "peak RSS: the child's ru_maxrss from wait4, started by a small spawner "
            "process (about 9 MiB, the floor of the figure: a process's peak carries "
            "across exec) rather than by the bench (for sandbox: the larger of the "
            "host and guest processes); tree PSS: the sampled (every 20 ms) peak of the "
            "summed proportional set size of aiodd and its guest, shared memory counted once.  "
            "The sparse runs are single runs: reading a hole still allocates a zeroed page "
            "in the page cache, so the first run over the sparse file reads it cold and the "
            "later ones partly warm; their times are not comparable with each other.",
            pss=True,
        ),
    ]

    # --- floors ----------------------------------------------------------------------
    convert = find(main_results, "qemu-img convert", "-O raw")
    convert_sync = find(main_results, "qemu-img convert + sync", "-O raw, then sync FILE")
    dd = find(main_results, "coreutils dd", "bs=4M")
    dd_fsync = find(main_results, "coreutils dd", "bs=4M conv=fsync")
    dd_direct = find(main_results, "coreutils dd", "bs=4M oflag=direct conv=fsync")
    floors: list[Floor] = []
    for mode in ms:
        rows = [r for r in main_results if r.tool == f"aiodd ({mode})" and r.ok]
        if not rows:
            continue
        slowest = max(rows, key=lambda r: r.median)
        fastest = min(rows, key=lambda r: r.median)
        floors += [
            # Durable against the page cache: shown, not a floor (the plain tools stop
            # before the disk; -t unsafe is compared with them in the cache section).
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) durable vs page cache: at every bs (slowest: "
                f"{slowest.case}) ≤ plain qemu-img convert",
                slowest,
                convert,
                1.0,
                informative=True,
            ),
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) durable vs page cache: at every bs (slowest: "
                f"{slowest.case}) within 1.25x plain coreutils dd",
                slowest,
                dd,
                1.25,
                informative=True,
            ),
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) durable vs durable: slowest bs ≤ qemu-img convert + sync",
                slowest,
                convert_sync,
                1.0,
                informative=True,
            ),
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) durable vs durable: slowest bs within 1.25x dd conv=fsync",
                slowest,
                dd_fsync,
                1.25,
                informative=True,
            ),
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) against the disk: slowest bs within 1.25x dd oflag=direct "
                "conv=fsync",
                slowest,
                dd_direct,
                1.25,
                informative=True,
            ),
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) speed independent of bs: slowest / fastest "
                f"({slowest.case} / {fastest.case})",
                slowest,
                fastest,
                1.10,
                informative=True,
            ),
        ]
        # Durable against durable, the default mode's promise: the disk itself, and the
        # tool aiodd replaces (which fdatasyncs too), on the 1 GiB copy and at every bs.
        one_mib = find(main_results, f"aiodd ({mode})", "bs=1M")
        floors += [
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) durable, bs=1M, within 1.10x dd oflag=direct conv=fsync "
                "(the disk)",
                one_mib,
                dd_direct,
                1.10,
            ),
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) bs=1M ≤ qemu-img dd bs=1M ({human(s.main)})",
                one_mib,
                find(main_results, "qemu-img dd", "bs=1M"),
                1.0,
            ),
            _worst_against_qemu_dd(sweep_results, mode, human(s.sweep)),
        ]
        ours = find(sweep_results, f"aiodd ({mode})", "bs=512")
        theirs = find(sweep_results, "qemu-img dd", "bs=512")
        floors.append(
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) bs=512 ~100x faster than qemu-img dd bs=512 ({human(s.sweep)})",
                ours,
                theirs,
                0.01,
                informative=True,
            )
        )
    for r in rss_results:
        floors.append(rss_floor(GROUP, f"peak memory, {r.tool} {r.case}", r, 100))
    sec.floors = floors
    if note:
        sec.notes.append(f"The big sparse input was {human(big)}, not {human(s.big_raw)}: {note}.")
    return sec


def _extra(key: str) -> Callable[[Result], str]:
    def cell(r: Result) -> str:
        value = r.extra.get(key)
        return "" if value is None else f"{value:.3f}"

    return cell


def _worst_against_qemu_dd(sweep: list[Result], mode: str, size: str) -> Floor:
    """aiodd against ``qemu-img dd`` at each bs of the sweep: the floor holds at the worst."""
    pairs = [
        (bs, find(sweep, f"aiodd ({mode})", f"bs={bs}"), find(sweep, "qemu-img dd", f"bs={bs}"))
        for bs in BS_SWEEP
    ]
    ok = [(bs, a, b) for bs, a, b in pairs if a.ok and b.ok]
    worst = max(ok, key=lambda p: p[1].median / p[2].median, default=None)
    name = f"aiodd ({mode}) ≤ qemu-img dd at every bs ({size} sweep)"
    if worst is None or len(ok) < len(pairs):
        return Floor(GROUP, name, "a run failed", "≤ 1x", None)
    return ratio_floor(GROUP, f"{name}; worst: bs={worst[0]}", worst[1], worst[2], 1.0)
