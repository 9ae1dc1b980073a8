"""The bench reads a group's inputs before its first round (bench/measure.py,
``named_inputs``), so that no tool's first run reads its input cold while the others
read it from the page cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import context, measure
from bench.context import QUICK, Bench, Config
from bench.measure import Case, Result, named_inputs


def _case(*steps: tuple[str, ...], outputs: tuple[Path, ...] = ()) -> Case:
    return Case(Result("s", "t", steps[0][0], "case", 0), steps, outputs)


def test_the_inputs_are_the_files_the_command_lines_name_to_read(tmp_path: Path) -> None:
    image, base, out = tmp_path / "in.qcow2", tmp_path / "base.raw", tmp_path / "out.raw"
    big = tmp_path / "big.raw"
    for path in (image, base, out):
        path.write_bytes(b"x" * 1000)
    with open(big, "wb") as f:
        f.truncate(1 << 20)  # past the limit below: not read
    cases = [
        _case(("aiodd", f"if={image}", f"of={out}", "bs=1M"), ("sync", str(out)), outputs=(out,)),
        _case(("qemu-img", "convert", "-f", "raw", str(base), str(out)), outputs=(out,)),
        _case(("dd", f"if={image}", f"of={out}", "bs=4M"), outputs=(out,)),  # named again
        _case(("aiodd", f"if={big}", f"of={out}"), outputs=(out,)),
        _case(("aiodd", f"if={tmp_path}", f"of={tmp_path / 'missing'}", "if=relative.raw")),
    ]
    assert named_inputs(cases, limit=4096) == [image, base]


def test_a_group_reads_its_inputs_before_its_first_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "in.raw"
    image.write_bytes(os.urandom(4096))
    events: list[str] = []
    monkeypatch.setattr(context, "read_through", lambda path: events.append(f"read {path.name}"))

    def run(case: Case) -> None:
        events.append("run")
        case.result.samples.append(measure.Sample(0.1, 0.1, 0, None, ""))

    config = Config(tmp_path, QUICK, runs=2, slow=10, verify=False, aiodd="aiodd",
                    python="python", quick=True)  # fmt: skip
    bench = Bench(config, lambda line: None)
    monkeypatch.setattr(bench, "_run_case", run)
    copy = ("cp", str(image), str(tmp_path / "o"))
    bench.run([_case(copy, outputs=(tmp_path / "o",)), _case(copy, ("sync",))])
    assert events == ["read in.raw", "run", "run", "run", "run"]
