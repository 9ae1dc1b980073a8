"""A CI-sized libFuzzer run over the KVM guest's vdi decoder (tests/fuzz/README.md).

tests/fuzz/fuzz_vdi.c built with ``clang -fsanitize=fuzzer,address,undefined`` runs for
``AIODD_LIBFUZZER_SECONDS`` (10 by default here: the decoder is small) from a seed
corpus of qemu-made and hand-built VDIs; any crash, leak, sanitizer report or hang fails
the test and leaves the input in the test's temporary directory.  Inputs a run once
crashed on go into tests/fuzz/regressions/vdi/, which every run replays first.  Skipped
where clang cannot build a libFuzzer binary.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz.make_corpus import write_vdi_corpus
from tests.fuzz.runner import fuzzer_or_skip, fuzzing_run

SECONDS = int(os.environ.get("AIODD_LIBFUZZER_SECONDS", "10"))
REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions" / "vdi"


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fuzzer_or_skip(tmp_path_factory, "fuzz_vdi.c")


@pytest.mark.slow
def test_a_fuzzing_run_finds_nothing(fuzzer: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    assert write_vdi_corpus(seeds) >= 10
    cover = fuzzing_run(fuzzer, tmp_path, seeds, REGRESSIONS, seconds=SECONDS, max_len=1048576)
    assert cover > 150  # the decoder was reached
