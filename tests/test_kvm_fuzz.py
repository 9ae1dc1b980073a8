"""CI-sized libFuzzer runs over the KVM guest's decoders (tests/fuzz/README.md).

tests/fuzz/fuzz_qcow2.c and fuzz_vmdk.c built with ``clang
-fsanitize=fuzzer,address,undefined`` run for ``AIODD_LIBFUZZER_SECONDS`` (40 and 25 by
default) from a seed corpus of qemu-made and hand-built images; any crash, leak,
sanitizer report or hang fails the test and leaves the input in the test's temporary
directory.  Inputs a run once crashed on go into tests/fuzz/regressions/ (the vmdk
target's into regressions-vmdk/), which every run replays first.  Skipped where clang
cannot build a libFuzzer binary.  The longer runs, and their figures, are in the README.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz.make_corpus import write_corpus
from tests.fuzz.runner import fuzzer_or_skip, fuzzing_run

SECONDS = int(os.environ.get("AIODD_LIBFUZZER_SECONDS", "40"))
VMDK_SECONDS = int(os.environ.get("AIODD_LIBFUZZER_SECONDS", "25"))
REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions"
VMDK_REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions-vmdk"


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fuzzer_or_skip(tmp_path_factory, "fuzz_qcow2.c")


@pytest.mark.slow
def test_a_fuzzing_run_finds_nothing(fuzzer: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    assert write_corpus(seeds) >= 40
    # the compact vhdx seeds are up to 2.7 MiB
    cover = fuzzing_run(fuzzer, tmp_path, seeds, REGRESSIONS, seconds=SECONDS, max_len=3145728)
    assert cover > 500  # the decoder, not only the harness, was reached


@pytest.fixture(scope="module")
def vmdk_fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fuzzer_or_skip(tmp_path_factory, "fuzz_vmdk.c")


@pytest.mark.slow
def test_a_vmdk_fuzzing_run_finds_nothing(vmdk_fuzzer: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    assert write_corpus(seeds, "vmdk") >= 80
    cover = fuzzing_run(
        vmdk_fuzzer, tmp_path, seeds, VMDK_REGRESSIONS, seconds=VMDK_SECONDS, max_len=1048576
    )
    assert cover > 400  # the decoder, not only the harness, was reached
