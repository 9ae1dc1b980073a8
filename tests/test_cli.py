"""The command line: grammar, errors and exit statuses (docs/usage.md)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aiodd.cli import parse_args
from aiodd.errors import UsageError
from tests.conftest import needs_qemu
from tests.harness import aiodd_run, aiodd_subprocess, leftovers, qemu_dd, terminal_signals

MiB = 1 << 20


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "in.raw"
    path.write_bytes(os.urandom(3000))
    return path


def test_operands_parse() -> None:
    inv = parse_args(["-f", "raw", "-O", "raw", "if=a", "of=b", "bs=1K", "count=3", "skip=2"])
    assert (inv.src, inv.dst, inv.bs, inv.count, inv.skip) == ("a", "b", 1024, 3, 2)
    assert inv.input_format == "raw"


def test_last_duplicate_wins() -> None:
    inv = parse_args(["if=a", "of=b", "bs=1", "bs=2", "count=1", "count=9", "if=c"])
    assert (inv.src, inv.bs, inv.count) == ("c", 2, 9)


def test_force_share_is_parsed() -> None:
    assert parse_args(["if=a", "of=b"]).force_share is False
    assert parse_args(["-U", "if=a", "of=b"]).force_share is True
    assert parse_args(["if=a", "of=b", "--force-share"]).force_share is True


def test_options_may_follow_operands_like_gnu_getopt() -> None:
    assert parse_args(["if=a", "of=b", "-O", "raw"]).output_format == "raw"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["foo=1", "bs=0"], "unrecognized operand 'foo'"),
        (["bs=0", "foo=1"], "invalid bs '0': must be between 1 and 2147483647"),
        (["BS=1", "if=a", "of=b"], "unrecognized operand 'BS'"),
        (["bs", "if=a", "of=b"], "unrecognized operand 'bs'"),
        (["=5", "if=a", "of=b"], "unrecognized operand ''"),
        (["conv=notrunc", "if=a", "of=b"], "unrecognized operand 'conv'"),
        (["seek=1"], "unrecognized operand 'seek'"),
        (["ibs=1"], "unrecognized operand 'ibs'"),
        (["status=none"], "unrecognized operand 'status'"),
        (["osize=1"], "unrecognized operand 'osize'"),
        (["if=a"], "must specify both input (if=) and output (of=) files"),
        (["of=a"], "must specify both input (if=) and output (of=) files"),
        ([], "must specify both input (if=) and output (of=) files"),
        (["if=a", "of=b", "bs=2G"], "invalid bs '2G': must be between 1 and 2147483647"),
        (["if=a", "of=b", "bs=1T"], "invalid bs '1T': must be between 1 and 2147483647"),
        (
            ["if=a", "of=b", "count=8E"],
            "invalid count '8E': must be between 0 and 9223372036854775807",
        ),
        (["if=a", "of=b", "skip=-1"], "invalid skip '-1': not a size"),
        (["if=a", "of=b", "bs=1KB"], "invalid bs '1KB': not a size"),
        (["-O", "qcow3", "if=a", "of=b"], "unknown output format 'qcow3': supported formats are"),
        (
            ["-O", "parallels", "if=a", "of=b"],
            "output format 'parallels' is not supported: aiodd reads parallels images and does"
            " not write them; write qcow2 instead (-O qcow2)",
        ),
        (
            ["-O", "qed", "if=a", "of=b"],
            "output format 'qed' is not supported: QED is kept in qemu for old images only;"
            " write qcow2 instead (-O qcow2)",
        ),
        (
            ["-O", "qcow", "if=a", "of=b"],
            "output format 'qcow' is not supported: qcow (version 1) is kept in qemu for old"
            " images only; write qcow2 instead (-O qcow2)",
        ),
        (["-f", "nope", "if=a", "of=b"], "unknown input format 'nope'"),
        (["-x", "if=a", "of=b"], "option -x not recognized"),
        (
            ["--progress=loud", "if=a", "of=b"],
            "invalid --progress 'loud': use none, percent, bar or json",
        ),
        (
            ["--isolation=none", "if=a", "of=b"],
            "invalid --isolation 'none': use auto, kvm, sandbox or inline",
        ),
        (
            ["--allow-backing", "/nonexistent/dir", "if=a", "of=b"],
            "invalid --allow-backing '/nonexistent/dir': not a directory",
        ),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_args(argv)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("argv", "kwargs", "message"),
    [
        (
            ["bs=1KB"],
            {"bs": "1KB"},
            "invalid bs '1KB': not a size (use a number with an optional"
            " k, M, G, T, P or E suffix, e.g. 4K or 1.5M)",
        ),
        (["count=8E"], {"count": "8E"}, "invalid count '8E': must be between 0 and {max}"),
        (["skip=16E"], {"skip": "16E"}, "invalid skip '16E': must be between 0 and {max}"),
        (
            ["--isolation=none"],
            {"isolation": "none"},
            "invalid {} 'none': use auto, kvm, sandbox or inline",
        ),
        (
            ["--allow-backing=/nonexistent/dir"],
            {"allow_backing": ["/nonexistent/dir"]},
            "invalid {} '/nonexistent/dir': not a directory",
        ),
    ],
)
def test_cli_and_library_say_the_same_but_for_the_option_name(
    argv: list[str], kwargs: dict[str, object], message: str, sample: Path, tmp_path: Path
) -> None:
    """One rule, one message: only the option's spelling differs (docs/usage.md)."""
    import anyio

    import aiodd

    names = {"isolation": "--isolation", "allow_backing": "--allow-backing"}
    name = next(iter(kwargs))
    expected = message.replace("{max}", str(2**63 - 1))
    with pytest.raises(UsageError) as cli:
        parse_args([*argv, "if=a", "of=b"])
    assert str(cli.value) == expected.format(names.get(name, name))
    with pytest.raises(UsageError) as lib:
        anyio.run(lambda: aiodd.dd(sample, tmp_path / "never.raw", **kwargs))  # type: ignore[arg-type]
    assert str(lib.value) == expected.format(name)


def test_an_option_error_from_the_library_names_the_cli_option() -> None:
    """dd() re-checks --allow-backing (the directory may go between the two checks)."""
    from aiodd.cli import _error_line

    exc = UsageError.invalid("allow_backing", "'/gone'", "not a directory")
    assert str(exc) == "invalid allow_backing '/gone': not a directory"
    assert _error_line(exc) == "invalid --allow-backing '/gone': not a directory"


def test_count_7e_is_valid() -> None:
    assert parse_args(["if=a", "of=b", "count=7E"]).count == 7 << 60


def test_help_documents_every_operand(capsys: pytest.CaptureFixture[str]) -> None:
    from aiodd.cli import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for operand in ("if=", "of=", "bs=", "count=", "skip=", "-f FMT", "-O FMT", "-p"):
        assert operand in text
    assert "e.g. bs=1M" in text


def _help() -> str:
    from aiodd.cli import HELP
    from aiodd.formats import INPUT_FORMATS, OUTPUT_FORMATS

    return HELP.format(inputs=", ".join(INPUT_FORMATS), outputs=", ".join(OUTPUT_FORMATS))


def test_help_usage_shows_every_option() -> None:
    usage = _help().split("\n\n")[0]
    for option in (
        "[-f FMT]",
        "[-O FMT]",
        "[-U]",
        "[--allow-backing DIR]...",
        "[--isolation=MODE]",
        "[--require-isolation]",
        "[-p | --progress=MODE]",
        "if=INPUT of=OUTPUT [bs=N] [count=N] [skip=N]",
        "-h | --help",
        "--version [--verbose]",
    ):
        assert option in usage, option
    for mode in ("none", "percent", "bar", "json"):
        assert parse_args([f"--progress={mode}", "if=a", "of=b"]).progress == mode
        assert mode in _help()
    assert parse_args(["if=a", "of=b"]).isolation == "auto"  # the default
    for mode in ("auto", "kvm", "sandbox", "inline"):
        assert parse_args([f"--isolation={mode}", "if=a", "of=b"]).isolation == mode
        assert parse_args(["--isolation", mode, "if=a", "of=b"]).isolation == mode
        assert f"{mode}:" in _help() or f"{mode} (default):" in _help()


def test_help_says_where_count_ends() -> None:
    text = " ".join(_help().split())
    assert (
        "count=N the window ends at input block N, counted from the start of the input,"
        " not from skip (unlike coreutils dd): skip=1 count=101 copies 100 blocks"
    ) in text
    assert "at most N blocks" not in text


def _help_examples() -> list[tuple[list[str], str]]:
    """The examples' command lines, each with its comment (which may sit on the next line)."""
    lines = _help().split("examples:\n")[1].splitlines()
    examples: list[tuple[list[str], str]] = []
    for line in lines:
        command, _, comment = line.partition("#")
        if command.strip():
            examples.append((command.split(), comment.strip()))
        elif comment:
            examples[-1] = (examples[-1][0], comment.strip())
    return examples


def _digest(path: Path, start: int = 0, length: int | None = None) -> str:
    """A hash of ``length`` bytes of ``path`` from ``start``, read a MiB at a time: the
    test process's peak memory is every later child's ``ru_maxrss`` (tests/test_hostile.py
    checks it), so no test may hold a 100 MiB file in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = path.stat().st_size - start if length is None else length
        while left > 0:
            chunk = f.read(min(MiB, left))
            assert chunk, f"{path} ends early"
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def test_help_examples_do_what_their_comments_say(tmp_path: Path) -> None:
    """Each example, on a generated 128 MiB input, copies the size its comment states."""
    from aiodd.cli import main

    src = tmp_path / "disk.raw"
    with src.open("wb") as f:
        f.write(os.urandom(2 * MiB))
        f.truncate(128 * MiB)
    examples = _help_examples()
    assert len(examples) == 3
    for argv, comment in examples:
        assert argv[0] == "aiodd"
        out, back = tmp_path / "out", tmp_path / "back.raw"
        args = [a for a in argv[1:] if a != "-p" and not a.startswith("--progress")]
        args = [f"if={src}" if a.startswith("if=") else a for a in args]
        args = [f"of={out}" if a.startswith("of=") else a for a in args]
        assert main(args) == 0, argv
        assert main([f"if={out}", f"of={back}"]) == 0  # back to raw (the qcow2 example)
        size = back.stat().st_size
        stated = re.search(r"(\d+) (bytes|MiB)", comment)
        if stated is None:
            assert comment == "the whole disk"
            assert _digest(back) == _digest(src)
        else:
            assert size == int(stated[1]) * (MiB if stated[2] == "MiB" else 1), argv
            inv = parse_args(args)
            assert _digest(back) == _digest(src, inv.skip * inv.bs, size)
        out.unlink()
        back.unlink()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from aiodd import __version__
    from aiodd.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"aiodd {__version__}\n"
    assert main(["--version", "--verbose"]) == 0
    assert "input formats: " in capsys.readouterr().out


BAD_OPERANDS = [
    ["bs=0"],
    ["bs=-1"],
    ["bs=2G"],
    ["bs=1.5"],
    ["bs=1KiB"],
    ["bs="],
    ["count=8E"],
    ["count=abc"],
    ["skip=1e3"],
    ["skip=99999999999999999999"],
    ["conv=notrunc"],
    ["BS=512"],
    ["bogus"],
    ["foo=1", "bs=0"],
]


@needs_qemu
@pytest.mark.parametrize("extra", BAD_OPERANDS, ids=" ".join)
def test_bad_operands_exit_1_like_qemu_and_write_nothing(
    tmp_path: Path, sample: Path, extra: list[str]
) -> None:
    ours = aiodd_run([f"if={sample}", f"of={tmp_path / 'a.raw'}", *extra], tmp_path / "a.raw")
    theirs = qemu_dd([f"if={sample}", f"of={tmp_path / 'q.raw'}", *extra], tmp_path / "q.raw")
    assert ours.status == theirs.status == 1
    assert ours.output is None and theirs.output is None
    assert ours.stderr.startswith("aiodd: ") and ours.stderr.count("\n") == 1
    assert leftovers(tmp_path) == []


@needs_qemu
def test_missing_input_file(tmp_path: Path) -> None:
    out = tmp_path / "o.raw"
    ours = aiodd_run([f"if={tmp_path / 'nope'}", f"of={out}"], out)
    theirs = qemu_dd([f"if={tmp_path / 'nope'}", f"of={out}"], out)
    assert ours.status == theirs.status == 1
    assert "No such file or directory" in ours.stderr
    assert ours.output is None


def test_output_directory_missing(tmp_path: Path, sample: Path) -> None:
    out = tmp_path / "no" / "o.raw"
    ours = aiodd_run([f"if={sample}", f"of={out}"], out)
    assert ours.status == 1
    assert "cannot create output: No such file or directory" in ours.stderr


def test_same_file_is_refused(tmp_path: Path, sample: Path) -> None:
    before = sample.read_bytes()
    link = tmp_path / "alias.raw"
    link.symlink_to(sample)
    for target in (sample, link):
        ours = aiodd_run([f"if={sample}", f"of={target}"], target)
        assert ours.status == 1
        assert ours.stderr == (
            f"aiodd: of={target} and if={sample} name the same file; choose another output\n"
        )
    assert sample.read_bytes() == before


def test_skip_warning(tmp_path: Path, sample: Path) -> None:
    out = tmp_path / "o.raw"
    ours = aiodd_run([f"if={sample}", f"of={out}", "skip=7"], out)
    assert ours.status == 0
    assert ours.stderr == f"aiodd: {sample}: cannot skip to specified offset\n"
    assert ours.output == b""


def test_hex_suffix_warning(tmp_path: Path, sample: Path) -> None:
    out = tmp_path / "o.raw"
    ours = aiodd_run([f"if={sample}", f"of={out}", "bs=0x1K", "count=1"], out)
    assert ours.status == 0
    assert "deprecated: 0x1K" in ours.stderr
    assert ours.output == sample.read_bytes()[:1024]


def test_python_m_and_progress_json(tmp_path: Path, sample: Path) -> None:
    out = tmp_path / "o.raw"
    result = aiodd_subprocess([f"if={sample}", f"of={out}", "--progress=json"], out)
    assert result.status == 0, result.stderr
    import json

    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records[-1]["bytes_done"] == records[-1]["total_bytes"] == 3072
    assert records[-1]["percent"] == 100.0
    fields = {"bytes_done", "total_bytes", "percent", "rate", "elapsed", "done"}
    mode = {"isolation", "isolation_reason"}  # said in the first record and the last
    assert set(records[0]) == set(records[-1]) == fields | mode
    assert all(set(r) == fields for r in records[1:-1])
    assert [r["done"] for r in records] == [False] * (len(records) - 1) + [True]


def test_progress_percent(tmp_path: Path, sample: Path) -> None:
    out = tmp_path / "o.raw"
    proc = subprocess.run(
        [sys.executable, "-m", "aiodd", "-p", f"if={sample}", f"of={out}"],
        capture_output=True,
    )
    assert proc.returncode == 0
    # qemu-img convert -p's format, on stdout, redrawn with carriage returns
    assert proc.stdout.startswith(b"    (0.00/100%)\r")
    assert proc.stdout.endswith(b"    (100.00/100%)\r\n")


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    big = tmp_path / "big.raw"
    with big.open("wb") as f:
        f.truncate(64 << 30)  # sparse: reads fast, never finishes before the signal
    out = tmp_path / "o.raw"
    out.write_bytes(b"precious")
    with terminal_signals():  # SIGINT heard even where this run inherited it ignored
        proc = subprocess.Popen(
            [sys.executable, "-m", "aiodd", f"if={big}", f"of={out}", "--progress=json"],
            stderr=subprocess.PIPE,
            text=True,
        )
    assert proc.stderr is not None
    # A copy the signal does not stop is killed before it fills the disk.
    watchdog = threading.Timer(10, proc.kill)
    with proc.stderr:
        first = proc.stderr.readline()  # the first progress record: the copy has started
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        watchdog.start()
        rest = proc.stderr.read()
    watchdog.cancel()
    status = proc.wait(timeout=60)
    assert status == 130, first + rest  # what the command said, if it did not stop so
    assert rest.endswith("aiodd: interrupted; no output was written\n")
    assert out.read_bytes() == b"precious"
    assert leftovers(tmp_path) == []


def test_input_directory_is_one_clear_line(tmp_path: Path) -> None:
    out = tmp_path / "o.raw"
    result = aiodd_run([f"if={tmp_path}", f"of={out}"], out)
    assert (result.status, result.stderr) == (
        1,
        f"aiodd: {tmp_path}: cannot open: Is a directory\n",
    )
    assert result.output is None


ROOT = Path(__file__).resolve().parent.parent


def test_an_error_line_into_a_closed_stream_does_not_raise() -> None:
    from aiodd.cli import _print_error

    stream = io.StringIO()
    stream.close()
    _print_error(stream, "x.raw: cannot open: No such file or directory")  # no ValueError
