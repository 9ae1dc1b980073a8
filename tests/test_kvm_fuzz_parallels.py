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
from pathlib import Path

import pytest

from tests.fuzz.make_corpus import write_parallels_corpus
from tests.fuzz.runner import fuzzer_or_skip, fuzzing_run

SECONDS = int(os.environ.get("AIODD_LIBFUZZER_SECONDS", "25"))
REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions" / "parallels"


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fuzzer_or_skip(tmp_path_factory, "fuzz_parallels.c")


@pytest.mark.slow
def test_a_fuzzing_run_finds_nothing(fuzzer: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    assert write_parallels_corpus(seeds) >= 30
    cover = fuzzing_run(fuzzer, tmp_path, seeds, REGRESSIONS, seconds=SECONDS, max_len=1048576)
    # an input refused at once reaches 65 edges, the seeds 223: the reads were reached
    assert cover > 150
