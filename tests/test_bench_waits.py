"""The bench's watch on long runs: a run that waits says where, one that works does not
count as waiting (bench/measure.py, ``WaitSampler``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import measure
from bench.measure import run_once


@pytest.fixture(scope="module", autouse=True)
def _spawner_ended() -> Iterator[None]:
    """The bench's spawner outlives a run (the bench ends with it); these tests end it."""
    yield
    if measure._spawner is not None:
        measure._spawner.close()
        measure._spawner = None


@pytest.fixture(autouse=True)
def _short_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bench's thresholds are seconds; these runs last a fraction of one.
    monkeypatch.setattr(measure.WaitSampler, "AFTER", 0.1)
    monkeypatch.setattr(measure, "WAITED_WALL", 0.4)


def test_a_sleeping_run_waited_and_says_in_what(tmp_path: Path) -> None:
    sample = run_once([("sleep", "0.6")], stderr_path=tmp_path / "stderr")
    assert sample.waited
    where, share = sample.waits[0]
    assert where.startswith("sleep S: ")
    # Root reads the kernel stack, anyone else the wchan: either names the sleep.
    assert "sleep" in where.removeprefix("sleep S: ")
    assert share >= 0.5  # every look but one that caught it exiting


def test_a_busy_run_did_not_wait(tmp_path: Path) -> None:
    spin = "import time\nend = time.monotonic() + 0.6\nwhile time.monotonic() < end: pass"
    sample = run_once([(sys.executable, "-c", spin)], stderr_path=tmp_path / "stderr")
    assert not sample.waited
    assert [where for where, _ in sample.waits] == [f"{Path(sys.executable).name} R: on a CPU"]


def test_a_short_run_is_not_looked_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure.WaitSampler, "AFTER", 5.0)
    sample = run_once([("sleep", "0.5")], stderr_path=tmp_path / "stderr")
    assert sample.waits == ()
    assert sample.waited  # long and idle all the same: the log then has no places to give


def test_the_waits_of_each_step_are_kept(tmp_path: Path) -> None:
    sample = run_once([("sleep", "0.3"), ("sleep", "0.3")], stderr_path=tmp_path / "stderr")
    assert [where.split(":")[0] for where, _ in sample.waits] == ["sleep S", "sleep S"]
