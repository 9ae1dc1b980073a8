"""What every section shares: sizes, the runner, the tools' command lines, output checks."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.data import Data
from bench.measure import (
    Argv,
    Case,
    CommandFailed,
    GiB,
    Log,
    MiB,
    Result,
    clear,
    free_bytes,
    named_inputs,
    read_through,
    run_once,
)


@dataclass(frozen=True)
class Sizes:
    sweep: int  # the bs sweep against qemu-img dd (slow at bs=512)
    main: int  # the 1 GiB copies against qemu-img convert and coreutils dd
    big_raw: int  # sparse input for the raw peak-RSS run
    big_formats: int  # sparse input for the peak-RSS run of each output format
    tiny: int  # fixed costs (start-up)
    startup_rounds: int  # in-process timings of the guest start-up


FULL = Sizes(
    sweep=256 * MiB,
    main=1 * GiB,
    big_raw=16 * GiB,
    big_formats=64 * GiB,
    tiny=1 * MiB,
    startup_rounds=30,
)
QUICK = Sizes(
    sweep=8 * MiB,
    main=32 * MiB,
    big_raw=128 * MiB,
    big_formats=128 * MiB,
    tiny=1 * MiB,
    startup_rounds=5,
)

SPACE_MARGIN = 10 * GiB  # left free on the work file system for everybody else


@dataclass
class Config:
    workdir: Path
    sizes: Sizes
    runs: int
    slow: float  # a case whose first run takes longer is run only once
    verify: bool
    aiodd: str
    python: str
    quick: bool


class Bench:
    """Runs cases, interleaved, and knows how to spell each tool's command line."""

    def __init__(self, config: Config, log: Log) -> None:
        self.config = config
        self.log = log
        self._scratch = config.workdir / "stderr.txt"
        self.data = Data(config.workdir, log)

    @property
    def sizes(self) -> Sizes:
        return self.config.sizes

    @property
    def stderr_path(self) -> Path:
        """Where the last run's stderr is, for a check that reads what aiodd printed."""
        return self._scratch

    def out(self, name: str) -> Path:
        return self.config.workdir / "out" / name

    # --- running ---------------------------------------------------------------------

    def run(self, cases: Sequence[Case]) -> list[Result]:
        """Run every case ``runs`` times, round-robin, so a burst of load elsewhere on
        the machine is spread over the tools instead of landing on one of them.

        Every other round runs the cases in the reverse order: a tool's place in the
        rotation (first after another input, right after a heavier tool) is then not
        the same in every round, and what that place costs is shared between tools
        instead of falling on whichever comes first (docs/performance.md, "The order
        of the runs")."""
        (self.config.workdir / "out").mkdir(exist_ok=True)
        # Read first, the inputs are in the page cache for every tool's first run, not
        # only for those after the first tool of round 1 (docs/performance.md, "A run
        # that waited").
        for path in named_inputs(cases):
            read_through(path)
        target = {id(c): c.runs or self.config.runs for c in cases}
        for round_ in itertools.count():
            todo = [
                c for c in cases if c.result.error is None and len(c.result.samples) < target[id(c)]
            ]
            if not todo:
                break
            for case in todo if round_ % 2 == 0 else todo[::-1]:
                self._run_case(case)
                first = case.result.samples[:1]
                if case.runs is None and first and first[0].wall > self.config.slow:
                    target[id(case)] = 1
        return [c.result for c in cases]

    def _run_case(self, case: Case) -> None:
        r = case.result
        clear(case.outputs)
        os.sync()  # the previous run's dirty pages are flushed before the clock starts
        n = len(r.samples) + 1
        try:
            sample = run_once(case.steps, stderr_path=self._scratch, sample_tree=case.sample_tree)
        except CommandFailed as exc:
            r.error = f"exit {exc.status}: {exc.stderr.strip()[-300:]}"
            self.log(f"  {r.tool} {r.case}: FAILED {r.error}")
            clear(case.outputs)
            return
        if n == 1 and case.check is not None and self.config.verify:
            problem = case.check()
            if problem is not None:
                r.error = f"wrong output: {problem}"
                self.log(f"  {r.tool} {r.case}: WRONG OUTPUT {problem}")
        clear(case.outputs)
        r.samples.append(sample)
        self.log(
            f"  {r.tool} | {r.case} | run {n}: {sample.wall:.3f} s, "
            f"{sample.max_rss / MiB:.1f} MiB peak RSS"
        )
        if sample.waited:
            self.log(
                f"    waited ({sample.cpu:.2f} s of CPU): "
                + "; ".join(f"{where} ({share:.0%})" for where, share in sample.waits)
            )

    # --- command lines ---------------------------------------------------------------

    def aiodd(
        self,
        src: Path,
        dst: Path,
        *,
        bs: str,
        isolation: str,
        fmt_in: str = "raw",
        fmt_out: str = "raw",
        progress_json: bool = False,
        options: tuple[str, ...] = (),
        cache: str | None = None,
    ) -> Argv:
        argv = [self.config.aiodd, f"--isolation={isolation}", "-f", fmt_in, "-O", fmt_out]
        if cache is not None:
            argv += ["-t", cache]
        if progress_json:
            argv.append("--progress=json")
        argv += options
        return (*argv, f"if={src}", f"of={dst}", f"bs={bs}")

    @staticmethod
    def qemu_dd(
        src: Path, dst: Path, *, bs: str, fmt_in: str = "raw", fmt_out: str = "raw"
    ) -> Argv:
        return ("qemu-img", "dd", "-f", fmt_in, "-O", fmt_out, f"bs={bs}", f"if={src}", f"of={dst}")

    @staticmethod
    def qemu_convert(src: Path, dst: Path, *, fmt_in: str = "raw", fmt_out: str = "raw") -> Argv:
        return ("qemu-img", "convert", "-f", fmt_in, "-O", fmt_out, str(src), str(dst))

    @staticmethod
    def sync(path: Path) -> Argv:
        """coreutils ``sync FILE``: fsync of that one file."""
        return ("sync", str(path))

    @staticmethod
    def coreutils_dd(src: Path, dst: Path, *, fsync: bool = False, direct: bool = False) -> Argv:
        argv: Argv = ("dd", f"if={src}", f"of={dst}", "bs=4M", "status=none")
        if direct:
            argv = (*argv, "oflag=direct")
        return (*argv, "conv=fsync") if fsync else argv

    # --- checks ----------------------------------------------------------------------

    @staticmethod
    def same_bytes(expected: Path, actual: Path, length: int) -> Callable[[], str | None]:
        """The output is exactly the first ``length`` bytes of ``expected``."""

        def check() -> str | None:
            size = actual.stat().st_size
            if size != length:
                return f"{actual.name} is {size} bytes, expected {length}"
            with expected.open("rb") as a, actual.open("rb") as b:
                offset = 0
                while offset < length:
                    want = a.read(min(8 * MiB, length - offset))
                    got = b.read(len(want))
                    if want != got:
                        return f"{actual.name} differs from the input in [{offset}, +8 MiB)"
                    offset += len(want)
            return None

        return check

    @staticmethod
    def same_image(raw: Path, image: Path, fmt: str) -> Callable[[], str | None]:
        """``qemu-img compare`` says the image holds the raw file's bytes."""

        def check() -> str | None:
            proc = subprocess.run(
                ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(image)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                return f"qemu-img compare: {proc.stdout.strip()} {proc.stderr.strip()}"
            return None

        return check

    @staticmethod
    def virtual_size(image: Path, fmt: str, at_least: int) -> Callable[[], str | None]:
        def check() -> str | None:
            proc = subprocess.run(
                ["qemu-img", "info", "-f", fmt, "--output=json", str(image)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                return f"qemu-img info: {proc.stderr.strip()}"
            size = int(json.loads(proc.stdout)["virtual-size"])
            if size < at_least:
                return f"virtual size {size} < {at_least}"
            return None

        return check

    @staticmethod
    def size_is(path: Path, size: int) -> Callable[[], str | None]:
        def check() -> str | None:
            actual = path.stat().st_size
            return None if actual == size else f"{path.name} is {actual} bytes, expected {size}"

        return check

    # --- disk space ------------------------------------------------------------------

    def fitting(self, wanted: int, overhead: float = 1.02) -> int:
        """The largest whole-GiB size (at most ``wanted``) whose dense output fits."""
        free = free_bytes(self.config.workdir) - SPACE_MARGIN
        if wanted * overhead <= free:
            return wanted
        return max(GiB, int(free / overhead) // GiB * GiB)
