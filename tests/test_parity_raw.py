"""Raw parity with the real ``qemu-img dd``: exit status and output bytes, exactly.

The whole matrix (input sizes, bs, count, skip) runs with ``-m full_matrix`` (in the
default isolation); the default run takes an evenly spread slice of it, plus the cases
picked by hand below, decoded in turn in the KVM guest reader and in the sandbox.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiodd.window import compute_window, round_up
from tests.conftest import kvm_marks, needs_qemu, with_kvm
from tests.harness import aiodd_run, leftovers, qemu_dd

pytestmark = needs_qemu

MiB = 1 << 20
TiB = 1 << 40
SIZES = [0, 1, 511, 513, 3000, 1_000_000, MiB, 3 * TiB]
BS = ["1", "5", "512", "1000", "1K", "4096", "64K", "1M", "2147483647"]
BS_VALUES = {"1K": 1024, "64K": 65536, "1M": MiB}
HUGE = "7E"


def _blocks(text: str | None) -> int | None:
    if text is None:
        return None
    return 7 << 60 if text == HUGE else int(text)


def _skips(size: int, bs: int) -> list[str | None]:
    at_end = -(-round_up(size) // bs)  # the first skip that leaves nothing
    return [None, "0", "1", "3", HUGE, str(at_end), str(at_end + 1)]


def _cases() -> list[tuple[int, str, str | None, str | None]]:
    cases = []
    for size in SIZES:
        for bs_text in BS:
            bs = BS_VALUES.get(bs_text) or int(bs_text)
            for count in [None, "0", "1", "3", HUGE]:
                for skip in dict.fromkeys(_skips(size, bs)):
                    window = compute_window(round_up(size), bs, _blocks(count), _blocks(skip) or 0)
                    # qemu-img dd moves one bs block per loop turn: keep its side bounded
                    if window.length > 16 * MiB or window.length // bs > 20_000:
                        continue
                    cases.append((size, bs_text, count, skip))
    return cases


ALL_CASES = _cases()
PICKED = [
    (3000, "512", None, None),
    (3000, "1", "3", "2"),
    (3000, "5", "3", "1"),
    (513, "512", None, "1"),
    (511, "1K", None, None),
    (0, "512", None, None),
    (1_000_000, "1M", None, None),
    (MiB, "64K", "3", "3"),
    (3 * TiB, "1M", "1", "3"),
    (3 * TiB, "2147483647", "0", None),
    (3000, "512", "0", "1"),  # count=0 with a skip: qemu warns
]
SLICE = sorted(set(ALL_CASES[:: max(1, len(ALL_CASES) // 80)]) | set(PICKED), key=str)
ISOLATIONS = with_kvm(["sandbox"], ["raw"])


def _input(directory: Path, size: int) -> Path:
    path = directory / f"in-{size}.raw"
    if not path.exists():
        with path.open("wb") as f:
            if size >= TiB:
                f.truncate(size)  # sparse; the tests read only its start and end
                f.seek(0)
                f.write(os.urandom(4 * MiB))
                f.seek(size - MiB)
                f.write(os.urandom(MiB))
            else:
                f.write(os.urandom(size))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inputs")


def _check(
    inputs: Path,
    tmp_path: Path,
    case: tuple[int, str, str | None, str | None],
    isolation: str | None = None,
) -> None:
    size, bs, count, skip = case
    source = _input(inputs, size)
    operands = [f"bs={bs}"]
    if count is not None:
        operands.append(f"count={count}")
    if skip is not None:
        operands.append(f"skip={skip}")
    ours_path, theirs_path = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    flags = [] if isolation is None else [f"--isolation={isolation}"]
    ours = aiodd_run([*flags, f"if={source}", f"of={ours_path}", *operands], ours_path)
    theirs = qemu_dd([f"if={source}", f"of={theirs_path}", *operands], theirs_path)
    assert ours.status == theirs.status, (ours.stderr, theirs.stderr)
    assert ours.output is not None and theirs.output is not None
    assert len(ours.output) == len(theirs.output)
    assert ours.output == theirs.output
    warned = "cannot skip to specified offset" in theirs.stderr
    assert ("cannot skip to specified offset" in ours.stderr) == warned
    assert leftovers(tmp_path) == []
    # dense: every block of the output is allocated
    assert os.stat(ours_path).st_blocks * 512 >= len(ours.output)


@pytest.mark.parametrize(
    ("case", "isolation"),
    [
        pytest.param(case, mode, id=f"{case}-{mode}", marks=kvm_marks(mode))
        for i, case in enumerate(SLICE)
        for mode in [ISOLATIONS[i % len(ISOLATIONS)]]
    ],
)
def test_raw_parity(
    inputs: Path, tmp_path: Path, case: tuple[int, str, str | None, str | None], isolation: str
) -> None:
    _check(inputs, tmp_path, case, isolation)


@pytest.mark.full_matrix
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_raw_parity_full(
    inputs: Path, tmp_path: Path, case: tuple[int, str, str | None, str | None]
) -> None:
    _check(inputs, tmp_path, case)
