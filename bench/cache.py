"""``-t CACHE``: aiodd's cache modes on the 1 GiB random raw → raw copy, each against the
tool that makes the same promise: ``-t unsafe`` (page cache, never flushed) against plain
``qemu-img convert`` (whose default is ``-t unsafe`` too) and plain coreutils ``dd``; the
default ``-t none`` (past the page cache, flushed) against ``dd oflag=direct conv=fsync``.

Then ``-t unsafe`` on every format row of the inputs and outputs sections, in every
isolation mode (``kvm`` where it runs here), against plain ``qemu-img convert``: like
for like, page cache against page cache."""

from __future__ import annotations

from bench.context import Bench
from bench.data import IMAGE_KINDS
from bench.measure import Case, Result, find, human
from bench.modes import joined, kvm_skipped, modes
from bench.report import Floor, Section, Table, ratio_floor

NAME = "cache"
GROUP = "-t CACHE"
CACHES = ("none", "writeback", "writethrough", "directsync", "unsafe")
OUTPUT_FORMATS = ("qcow2", "vmdk", "vpc", "vhdx")


def _r(tool: str, case: str, nbytes: int) -> Result:
    return Result(NAME, "cache", tool, case, nbytes)


def run(b: Bench) -> Section:
    size = b.sizes.main
    src = b.data.random_raw(size)
    out = b.out("cache.raw")
    ms = modes(b)
    cases = [
        Case(
            _r(
                "aiodd (sandbox)",
                f"-t {cache}" + (" (the default)" if cache == "none" else ""),
                size,
            ),
            (b.aiodd(src, out, bs="1M", isolation="sandbox", cache=cache),),
            (out,),
            check=b.same_bytes(src, out, size),
        )
        for cache in CACHES
    ]
    cases += [
        Case(
            _r(f"aiodd ({mode})", "-t unsafe", size),
            (b.aiodd(src, out, bs="1M", isolation=mode, cache="unsafe"),),
            (out,),
            check=b.same_bytes(src, out, size),
        )
        for mode in ms
        if mode != "sandbox"
    ]
    cases += [
        Case(_r("qemu-img convert", "-O raw", size), (b.qemu_convert(src, out),), (out,)),
        Case(_r("coreutils dd", "bs=4M", size), (b.coreutils_dd(src, out),), (out,)),
        Case(
            _r("coreutils dd", "bs=4M conv=fsync", size),
            (b.coreutils_dd(src, out, fsync=True),),
            (out,),
        ),
        Case(
            _r("coreutils dd", "bs=4M oflag=direct conv=fsync", size),
            (b.coreutils_dd(src, out, fsync=True, direct=True),),
            (out,),
        ),
    ]
    b.log(f"[cache] -t modes ({human(size)} random raw input)")
    results = b.run(cases)

    sec = Section(NAME, "Cache modes (-t)")
    sec.tables = [
        Table(
            f"{human(size)} random raw → raw, by cache mode",
            results,
            joined(
                "Every aiodd row passes -f raw, so -t writeback and -t unsafe copy with "
                "copy_file_range in every isolation mode.",
                kvm_skipped(b),
                "Page cache, never flushed: aiodd -t unsafe, qemu-img convert, dd bs=4M.  "
                "Durable (flushed before exit): aiodd -t none, writeback, writethrough, "
                "directsync; dd conv=fsync; dd oflag=direct conv=fsync, which also writes "
                "past the page cache, as -t none does.",
            ),
        )
    ]
    default = find(results, "aiodd (sandbox)", "-t none (the default)")
    convert_raw = find(results, "qemu-img convert", "-O raw")
    plain_dd = find(results, "coreutils dd", "bs=4M")
    floors: list[Floor] = []
    for mode in ms:
        unsafe = find(results, f"aiodd ({mode})", "-t unsafe")
        floors += [
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) -t unsafe raw → raw ≤ qemu-img convert (page cache against"
                " page cache)",
                unsafe,
                convert_raw,
                1.0,
            ),
            ratio_floor(
                GROUP,
                f"aiodd ({mode}) -t unsafe raw → raw within 1.25x coreutils dd bs=4M (page"
                " cache against page cache)",
                unsafe,
                plain_dd,
                1.25,
            ),
        ]
    floors.append(
        ratio_floor(
            GROUP,
            "aiodd default (-t none) within 1.25x dd oflag=direct conv=fsync (durable, "
            "past the page cache)",
            default,
            find(results, "coreutils dd", "bs=4M oflag=direct conv=fsync"),
            1.25,
            informative=True,
        )
    )
    format_results, format_floors = _formats(b, ms)
    sec.tables.append(
        Table(
            f"{human(size)} format rows with -t unsafe, against plain qemu-img convert",
            format_results,
            "The inputs section's images → raw and its random raw → each output format, "
            "every copy left in the page cache.  aiodd's copy is dense; convert writes holes "
            "where an input has no data.",
        )
    )
    floors += format_floors
    sec.floors = floors
    return sec


def _formats(b: Bench, ms: tuple[str, ...]) -> tuple[list[Result], list[Floor]]:
    size = b.sizes.main
    random = b.data.random_raw(size)
    cases: list[Case] = []
    rows: list[str] = []  # one label per format row, for its floors
    for kind in IMAGE_KINDS:
        src = b.data.image(kind, size)
        out = b.out("cache-inputs.raw")
        label = f"{kind.label} → raw"
        cases += [
            Case(
                _r(f"aiodd ({mode})", f"{label}, -t unsafe", size),
                (b.aiodd(src, out, bs="1M", isolation=mode, fmt_in=kind.fmt, cache="unsafe"),),
                (out,),
                check=b.same_bytes(b.data.source(kind, size), out, size),
            )
            for mode in ms
        ]
        cases.append(
            Case(
                _r("qemu-img convert", label, size),
                (b.qemu_convert(src, out, fmt_in=kind.fmt),),
                (out,),
            )
        )
        rows.append(label)
    for fmt in OUTPUT_FORMATS:
        out = b.out(f"cache-outputs.{fmt}")
        label = f"raw → {fmt}"
        cases += [
            Case(
                _r(f"aiodd ({mode})", f"{label}, -t unsafe", size),
                (b.aiodd(random, out, bs="1M", isolation=mode, fmt_out=fmt, cache="unsafe"),),
                (out,),
                check=b.same_image(random, out, fmt),
            )
            for mode in ms
        ]
        cases.append(
            Case(
                _r("qemu-img convert", label, size),
                (b.qemu_convert(random, out, fmt_out=fmt),),
                (out,),
            )
        )
        rows.append(label)
    b.log(f"[cache] -t unsafe on the format rows ({human(size)})")
    results = b.run(cases)
    floors = [
        ratio_floor(
            GROUP,
            f"aiodd ({mode}) -t unsafe {label} ≤ qemu-img convert (page cache against page cache)",
            find(results, f"aiodd ({mode})", f"{label}, -t unsafe"),
            find(results, "qemu-img convert", label),
            1.0,
        )
        for label in rows
        for mode in ms
    ]
    return results, floors
