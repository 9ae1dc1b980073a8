"""Start-up: a one-sector copy in each isolation mode, against the runtime's floor.

The floor is the smallest asyncio program on the Python that runs aiodd
(``asyncio.run(asyncio.sleep(0))``): interpreter start, asyncio's imports, one loop.  A
one-sector copy (``bs=512 count=1`` of a raw file, durable, the format detected) is
nearly all start-up; ``qemu-img dd`` of the same sector shows what a C tool pays.
docs/performance.md, "Start-up", says where aiodd's milliseconds go.
"""

from __future__ import annotations

from bench.context import Bench
from bench.measure import Case, Result, find
from bench.report import Section, Table, ratio_floor

NAME = "startup"
GROUP = "start-up"  # the first column of the floor tables
ASYNCIO_HELLO = "import asyncio; asyncio.run(asyncio.sleep(0))"
# The default mode (auto: kvm where it runs, else sandbox), then the other two.
MODES = ("auto", "sandbox", "inline")
SECTOR = 512


def _r(tool: str, case: str) -> Result:
    return Result(NAME, "startup", tool, case, SECTOR)


def run(b: Bench) -> Section:
    sec = Section(NAME, "Start-up: a one-sector copy")
    src = b.data.random_raw(b.sizes.tiny)
    out = b.out("sector.raw")
    runs = b.config.runs if b.config.quick else max(b.config.runs, 20)
    hello = Case(
        _r("python", "asyncio.run(asyncio.sleep(0))"),
        ((b.config.python, "-c", ASYNCIO_HELLO),),
        runs=runs,
    )
    cases = [hello]
    for mode in MODES:
        cases.append(
            Case(
                _r(f"aiodd ({mode})", "bs=512 count=1"),
                (
                    (
                        b.config.aiodd,
                        f"--isolation={mode}",
                        f"if={src}",
                        f"of={out}",
                        "bs=512",
                        "count=1",
                    ),
                ),
                (out,),
                check=b.same_bytes(src, out, SECTOR),
                runs=runs,
            )
        )
    cases.append(
        Case(
            _r("qemu-img dd", "bs=512 count=1"),
            (("qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=512", "count=1", f"if={src}",
              f"of={out}"),),
            (out,),
            check=b.same_bytes(src, out, SECTOR),
            runs=runs,
        )
    )  # fmt: skip
    b.log("[startup] one-sector copies against the asyncio floor")
    results = b.run(cases)
    sec.tables.append(
        Table(
            "One sector (bs=512 count=1) of a raw file, the format detected; the cases "
            "alternate, run after run",
            results,
        )
    )
    floor = find(results, "python", "asyncio.run(asyncio.sleep(0))")
    sec.floors = [
        ratio_floor(
            GROUP,
            "one sector, default isolation (auto) within 1.25x the smallest asyncio program",
            find(results, "aiodd (auto)", "bs=512 count=1"),
            floor,
            1.25,
        ),
        ratio_floor(
            GROUP,
            "one sector, --isolation=inline within 1.15x the smallest asyncio program",
            find(results, "aiodd (inline)", "bs=512 count=1"),
            floor,
            1.15,
        ),
        ratio_floor(
            GROUP,
            "one sector, --isolation=sandbox within 1.25x the smallest asyncio program",
            find(results, "aiodd (sandbox)", "bs=512 count=1"),
            floor,
            1.25,
            informative=True,
        ),
    ]
    return sec
