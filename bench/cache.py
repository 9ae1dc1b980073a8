"""``-t CACHE``: aiodd's cache modes on the 1 GiB random raw → raw copy, each against the
tool that makes the same promise: ``-t unsafe`` (page cache, never flushed) against plain
``qemu-img convert`` (whose default is ``-t unsafe`` too) and plain coreutils ``dd``; the
default ``-t none`` (past the page cache, flushed) against ``dd oflag=direct conv=fsync``."""

from __future__ import annotations

from bench.context import Bench
from bench.measure import Case, Result, find, human
from bench.report import Floor, Section, Table, ratio_floor

NAME = "cache"
GROUP = "-t CACHE"
CACHES = ("none", "writeback", "writethrough", "directsync", "unsafe")


def _r(tool: str, case: str, nbytes: int) -> Result:
    return Result(NAME, "cache", tool, case, nbytes)


def run(b: Bench) -> Section:
    size = b.sizes.main
    src = b.data.random_raw(size)
    out = b.out("cache.raw")
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
            _r("aiodd (inline)", "-t unsafe", size),
            (b.aiodd(src, out, bs="1M", isolation="inline", cache="unsafe"),),
            (out,),
            check=b.same_bytes(src, out, size),
        ),
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
            "Every aiodd row passes -f raw, so -t writeback and -t unsafe copy with "
            "copy_file_range in both isolation modes.  Page cache, never flushed: aiodd "
            "-t unsafe, qemu-img convert, dd bs=4M.  Durable (flushed before exit): aiodd "
            "-t none, writeback, writethrough, directsync; dd conv=fsync; dd oflag=direct "
            "conv=fsync, which also writes past the page cache, as -t none does.",
        )
    ]
    unsafe = find(results, "aiodd (sandbox)", "-t unsafe")
    default = find(results, "aiodd (sandbox)", "-t none (the default)")
    floors: list[Floor] = [
        ratio_floor(
            GROUP,
            "aiodd -t unsafe ≤ qemu-img convert (page cache against page cache)",
            unsafe,
            find(results, "qemu-img convert", "-O raw"),
            1.0,
            informative=True,
        ),
        ratio_floor(
            GROUP,
            "aiodd -t unsafe within 1.25x coreutils dd bs=4M (page cache against page cache)",
            unsafe,
            find(results, "coreutils dd", "bs=4M"),
            1.25,
            informative=True,
        ),
        ratio_floor(
            GROUP,
            "aiodd default (-t none) within 1.25x dd oflag=direct conv=fsync (durable, "
            "past the page cache)",
            default,
            find(results, "coreutils dd", "bs=4M oflag=direct conv=fsync"),
            1.25,
            informative=True,
        ),
    ]
    sec.floors = floors
    return sec
