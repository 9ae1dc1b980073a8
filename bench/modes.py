"""The isolation modes the sections measure aiodd in, and what the isolation and kvm
sections share: their copies to raw in each mode, and the in-process start-up probes."""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.context import Bench
from bench.measure import Case, Result, find
from bench.report import Floor, ratio_floor

BASE_MODES = ("sandbox", "inline")

_KVM_CHECK = "from aiodd.guest.kvm import availability as a; ok, why = a(); print(why)"


@functools.cache
def kvm_unavailable(python: str) -> str | None:
    """Why ``--isolation=kvm`` cannot run with the aiodd of ``python``; None when it can."""
    proc = subprocess.run([python, "-c", _KVM_CHECK], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return f"its KVM reader does not load ({lines[-1] if lines else proc.returncode})"
    return proc.stdout.strip() or None


def modes(b: Bench) -> tuple[str, ...]:
    """sandbox, inline, and kvm where KVM runs here."""
    return BASE_MODES if kvm_unavailable(b.config.python) else (*BASE_MODES, "kvm")


def kvm_skipped(b: Bench) -> str:
    """A sentence for a table's introduction when its kvm rows are left out, else ''."""
    why = kvm_unavailable(b.config.python)
    return "" if why is None else f"No aiodd (kvm) rows: KVM cannot run here: {why}."


def joined(*sentences: str) -> str:
    return "  ".join(s for s in sentences if s)


@dataclass(frozen=True)
class Copy:
    """One input copied to raw: ``-f fmt``, and the raw bytes the output must hold."""

    fmt: str
    label: str  # the input, in the tables
    src: Path
    expected: Path

    @property
    def case(self) -> str:
        return f"{self.label} → raw, bs=1M"


def copy_cases(
    b: Bench, section: str, copies: Sequence[Copy], modes: Sequence[str], runs: int | None
) -> list[Case]:
    """Each copy in each mode, interleaved, each output checked once against ``expected``."""
    size = b.sizes.main
    out = b.out(f"{section}.raw")
    return [
        Case(
            Result(section, "main", f"aiodd ({mode})", c.case, size),
            (b.aiodd(c.src, out, bs="1M", isolation=mode, fmt_in=c.fmt),),
            (out,),
            check=b.same_bytes(c.expected, out, size),
            runs=runs,
        )
        for c in copies
        for mode in modes
    ]


def within_inline(
    group: str, results: Sequence[Result], copies: Sequence[Copy], mode: str, suffix: str = ""
) -> list[Floor]:
    """The floor of every isolation mode: each copy within 10 % of the same copy inline."""
    return [
        ratio_floor(
            group,
            f"{mode} within 10% of inline: {c.label}{suffix}",
            find(results, f"aiodd ({mode})", c.case),
            find(results, "aiodd (inline)", c.case),
            1.10,
        )
        for c in copies
    ]


Timings = dict[str, dict[str, list[float]]]  # image → what was timed → seconds, per round


def run_probe(b: Bench, probe: Path, copies: Sequence[Copy]) -> Timings | str:
    """Run a start-up probe (``python PROBE ROUNDS IMAGE...``, JSON on stdout) over the
    copies' inputs; its timings, or why it failed."""
    argv = [b.config.python, str(probe), str(b.sizes.startup_rounds)]
    proc = subprocess.run(
        [*argv, *(str(c.src) for c in copies)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return f"The start-up probe failed: {proc.stderr.strip()[-500:]}"
    report: Timings = json.loads(proc.stdout)
    return report
