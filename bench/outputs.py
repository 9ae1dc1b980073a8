"""Output formats.  A random raw input → qcow2, vmdk, vpc, vhdx, vdi; and the peak
memory of a big sparse input → each format."""

from __future__ import annotations

from bench.context import Bench
from bench.measure import Case, Result, find, human
from bench.modes import kvm_skipped, modes
from bench.report import Floor, Section, Table, ratio_floor, rss_floor

NAME = "outputs"
GROUP = "output formats"  # the first column of the floor tables
FORMATS = ("qcow2", "vmdk", "vpc", "vhdx", "vdi")
# The copies: sandbox, and kvm where it runs (a raw input: kvm only reads it; the encoders
# run in the host whatever the mode).  The big memory runs are sandboxed only.
MODES = ("sandbox", "kvm")


def run(b: Bench) -> Section:
    size = b.sizes.main
    sec = Section(NAME, "Raw → output formats")
    src = b.data.random_raw(size)
    ms = [mode for mode in MODES if mode in modes(b)]
    if skipped := kvm_skipped(b):
        sec.preamble.append(skipped)

    cases: list[Case] = []
    for fmt in FORMATS:
        out = b.out(f"outputs.{fmt}")
        cases += [
            Case(
                Result(NAME, "main", f"aiodd ({mode})", f"-O {fmt}, bs=1M", size),
                (b.aiodd(src, out, bs="1M", isolation=mode, fmt_out=fmt),),
                (out,),
                check=b.same_image(src, out, fmt),
            )
            for mode in ms
        ]
        cases += [
            Case(
                Result(NAME, "main", "qemu-img dd", f"-O {fmt}, bs=1M", size),
                (b.qemu_dd(src, out, bs="1M", fmt_out=fmt),),
                (out,),
            ),
            Case(
                Result(NAME, "main", "qemu-img convert", f"-O {fmt}", size),
                (b.qemu_convert(src, out, fmt_out=fmt),),
                (out,),
            ),
            Case(
                Result(NAME, "main", "qemu-img convert + sync", f"-O {fmt}", size),
                (b.qemu_convert(src, out, fmt_out=fmt), b.sync(out)),
                (out,),
            ),
        ]
    b.log(f"[outputs] {human(size)} random raw → each format")
    results = b.run(cases)

    # One format at a time, the size chosen just before it runs: the disk is shared and
    # its free space changes while the bench runs.
    wanted = b.sizes.big_formats
    big_results: list[Result] = []
    reduced: list[str] = []
    for fmt in FORMATS:
        big = b.fitting(wanted, overhead=1.01)
        sparse = b.data.sparse(big)
        out = b.out(f"big.{fmt}")
        result = Result(NAME, "rss", "aiodd (sandbox)", f"{human(big)} sparse → {fmt}, bs=1M", big)
        if big != wanted:
            result.note = f"reduced from {human(wanted)}: disk space"
            reduced.append(f"{fmt}: {human(big)}")
        case = Case(
            result,
            (b.aiodd(sparse, out, bs="1M", isolation="sandbox", fmt_out=fmt),),
            (out,),
            check=b.virtual_size(out, fmt, big),
            sample_tree=True,
            runs=1,
        )
        b.log(f"[outputs] peak memory, {human(big)} sparse raw → {fmt} (written dense)")
        big_results += b.run([case])

    sec.tables = [
        Table(
            f"{human(size)} random raw → each format",
            results,
            "aiodd's output is checked once with `qemu-img compare` against the input.",
        ),
        Table(
            "Peak memory: a big sparse raw → each format (aiodd only, one run each)",
            big_results,
            "The copy is dense, so every output holds the whole window as data.",
            pss=True,
        ),
    ]
    floors: list[Floor] = []
    for fmt in FORMATS:
        for mode in ms:
            ours = find(results, f"aiodd ({mode})", f"-O {fmt}, bs=1M")
            floors += [
                # Durable against the page cache: shown, not a floor (the cache
                # section compares -t unsafe with plain convert).
                ratio_floor(
                    GROUP,
                    f"aiodd ({mode}) -O {fmt} durable vs page cache: ≤ plain qemu-img "
                    f"convert -O {fmt}",
                    ours,
                    find(results, "qemu-img convert", f"-O {fmt}"),
                    1.0,
                    informative=True,
                ),
                ratio_floor(
                    GROUP,
                    f"aiodd ({mode}) -O {fmt} ≤ qemu-img dd -O {fmt}",
                    ours,
                    find(results, "qemu-img dd", f"-O {fmt}, bs=1M"),
                    1.0,
                ),
                ratio_floor(
                    GROUP,
                    f"aiodd ({mode}) -O {fmt} ≤ qemu-img convert -O {fmt} + sync "
                    "(durable vs durable)",
                    ours,
                    find(results, "qemu-img convert + sync", f"-O {fmt}"),
                    1.0,
                ),
            ]
    for r in big_results:
        floor = rss_floor(GROUP, f"bounded memory, {r.case} (the raw → raw memory limit)", r, 100)
        floors.append(floor)
    sec.floors = floors
    if reduced:
        sec.notes.append(
            f"The big sparse input was smaller than {human(wanted)} ({', '.join(reduced)}): "
            "the dense output of a larger one would not have fitted in the free disk space "
            "while leaving 10 GiB for the other users of the machine."
        )
    return sec
