"""A CI-sized libFuzzer run over the KVM guest's parallels decoder (tests/fuzz/README.md).

tests/fuzz/fuzz_parallels.c built with ``clang -fsanitize=fuzzer,address,undefined`` runs for
``AIODD_LIBFUZZER_SECONDS`` (25 by default) from a seed corpus of qemu-made and
hand-built parallels images of both magics; any crash, leak,
sanitizer report or hang fails the test and leaves the input in the test's temporary
directory.  Inputs a run once crashed on go into tests/fuzz/regressions/parallels/, which
every run replays first.  Skipped where clang cannot build a libFuzzer binary.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.fuzz.build import HostedBuildError, build_fuzzer
from tests.fuzz.make_corpus import write_parallels_corpus

SECONDS = int(os.environ.get("AIODD_LIBFUZZER_SECONDS", "25"))
REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions" / "parallels"


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_fuzzer(
            tmp_path_factory.mktemp("fuzzer") / "fuzz_parallels", target="fuzz_parallels.c"
        )
    except HostedBuildError as exc:
        pytest.skip(f"clang cannot build a libFuzzer binary here: {exc}")


@pytest.mark.slow
def test_a_fuzzing_run_finds_nothing(fuzzer: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    assert write_parallels_corpus(seeds) >= 30
    if REGRESSIONS.is_dir():
        for path in REGRESSIONS.iterdir():
            (seeds / f"regression-{path.name}").write_bytes(path.read_bytes())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = subprocess.run(
        [
            str(fuzzer),
            f"-max_total_time={SECONDS}",
            "-max_len=1048576",
            "-rss_limit_mb=2048",
            "-timeout=20",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
            str(corpus),
            str(seeds),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = re.search(r"stat::number_of_executed_units: *(\d+)", result.stderr)
    cover = re.findall(r"cov: (\d+)", result.stderr)
    assert runs is not None and int(runs[1]) > 1000, result.stderr[-2000:]
    # an input refused at once reaches 65 edges, the seeds 223: the reads were reached
    assert cover and int(cover[-1]) > 150
