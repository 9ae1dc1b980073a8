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
import re
import subprocess
from pathlib import Path

import pytest

from tests.fuzz.build import HostedBuildError, build_fuzzer
from tests.fuzz.make_corpus import write_corpus

SECONDS = int(os.environ.get("AIODD_LIBFUZZER_SECONDS", "40"))
VMDK_SECONDS = int(os.environ.get("AIODD_LIBFUZZER_SECONDS", "25"))
REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions"
VMDK_REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions-vmdk"


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_fuzzer(tmp_path_factory.mktemp("fuzzer") / "fuzz_qcow2")
    except HostedBuildError as exc:
        pytest.skip(f"clang cannot build a libFuzzer binary here: {exc}")


def _run(fuzzer: Path, *args: str | Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(fuzzer), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_a_fuzzing_run_finds_nothing(fuzzer: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    assert write_corpus(seeds) >= 40
    if REGRESSIONS.is_dir():
        for path in REGRESSIONS.iterdir():
            (seeds / f"regression-{path.name}").write_bytes(path.read_bytes())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = _run(
        fuzzer,
        f"-max_total_time={SECONDS}",
        "-max_len=3145728",  # the compact vhdx seeds are up to 2.7 MiB
        "-rss_limit_mb=2048",
        "-timeout=20",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        corpus,
        seeds,
        timeout=SECONDS + 300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = re.search(r"stat::number_of_executed_units: *(\d+)", result.stderr)
    cover = re.findall(r"cov: (\d+)", result.stderr)
    assert runs is not None and int(runs[1]) > 1000, result.stderr[-2000:]
    assert cover and int(cover[-1]) > 500  # the decoder, not only the harness, was reached


@pytest.fixture(scope="module")
def vmdk_fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_fuzzer(tmp_path_factory.mktemp("fuzzer") / "fuzz_vmdk", target="fuzz_vmdk.c")
    except HostedBuildError as exc:
        pytest.skip(f"clang cannot build a libFuzzer binary here: {exc}")


@pytest.mark.slow
def test_a_vmdk_fuzzing_run_finds_nothing(vmdk_fuzzer: Path, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    assert write_corpus(seeds, "vmdk") >= 80
    if VMDK_REGRESSIONS.is_dir():
        for path in VMDK_REGRESSIONS.iterdir():
            (seeds / f"regression-{path.name}").write_bytes(path.read_bytes())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = _run(
        vmdk_fuzzer,
        f"-max_total_time={VMDK_SECONDS}",
        "-max_len=1048576",
        "-rss_limit_mb=2048",
        "-timeout=20",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        corpus,
        seeds,
        timeout=VMDK_SECONDS + 300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = re.search(r"stat::number_of_executed_units: *(\d+)", result.stderr)
    cover = re.findall(r"cov: (\d+)", result.stderr)
    assert runs is not None and int(runs[1]) > 1000, result.stderr[-2000:]
    assert cover and int(cover[-1]) > 400  # the decoder, not only the harness, was reached
