"""A CI-sized libFuzzer run of one target, for the tests/test_kvm_fuzz*.py wrappers
(README.md, "A run").

:func:`fuzzer_or_skip` builds a target or skips the test where clang cannot;
:func:`fuzzing_run` replays the target's regressions with the seeds, runs it for a while
and fails on any crash, leak, sanitizer report or hang (its input left in the test's
temporary directory) or on a run too short to have fuzzed; it gives the run's final
coverage, for the caller's bound that the decoder, not only the harness, was reached.
"""

from __future__ import annotations

import re
import resource
import subprocess
from pathlib import Path

import pytest

from tests.fuzz.build import CompilerMissing, HostedBuildError, build_fuzzer


def fuzzer_or_skip(tmp_path_factory: pytest.TempPathFactory, target: str) -> Path:
    """The libFuzzer binary of ``target`` (``fuzz_vpc.c``), in a fresh folder."""
    output = tmp_path_factory.mktemp("fuzzer") / Path(target).stem
    try:
        return build_fuzzer(output, target=target)
    except CompilerMissing as exc:
        pytest.skip(f"clang cannot build a libFuzzer binary here: {exc}")
    except HostedBuildError as exc:
        if "libclang_rt.fuzzer" in str(exc):  # a clang without its libFuzzer runtime
            pytest.skip(f"clang cannot build a libFuzzer binary here: {exc}")
        pytest.fail(f"the fuzz target {target} does not build: {exc}")


def fuzzing_run(
    fuzzer: Path, tmp_path: Path, seeds: Path, regressions: Path, *, seconds: int, max_len: int
) -> int:
    """Run ``fuzzer`` for ``seconds`` over ``seeds`` and the inputs in ``regressions``;
    the coverage it ends with (0 where it says none)."""
    if regressions.is_dir():
        for path in regressions.iterdir():
            (seeds / f"regression-{path.name}").write_bytes(path.read_bytes())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # libFuzzer's RSS limit is on the peak getrusage gives, and Linux hands a spawned
    # process the peak of the one that spawned it (it is carried across execve): the
    # limit is 2 GiB above what this test process has reached, not 2 GiB in all.
    inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    args = [
        f"-max_total_time={seconds}",
        f"-max_len={max_len}",
        f"-rss_limit_mb={inherited + 2048}",
        "-malloc_limit_mb=2048",
        "-timeout=20",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        corpus,
        seeds,
    ]
    result = subprocess.run(
        [str(fuzzer), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=seconds + 300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = re.search(r"stat::number_of_executed_units: *(\d+)", result.stderr)
    assert runs is not None and int(runs[1]) > 1000, result.stderr[-2000:]
    cover = re.findall(r"cov: (\d+)", result.stderr)
    return int(cover[-1]) if cover else 0
