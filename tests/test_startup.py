"""Start-up: the copy without an event loop, and AIODD_TIMING (docs/performance.md,
"Start-up")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from aiodd._command import input_format_named, isolation_named, needs_no_guest
from aiodd.api import dd
from aiodd.cli import _is_plain, main, parse_args
from tests.harness import run_as_guest, virtual_disk

MiB = 1 << 20
OUTPUTS = ("raw", "qcow2", "vmdk", "vpc", "vhdx")
# (bs, count, skip): a sector; a window that is no multiple of 512 (zero padding); one
# that runs past the input's end; one buffer (aiodd.buffers.DEFAULT_UNIT) whole; one
# that takes every thread (aiodd.api.PLAIN_BUFFERS) more than once; the whole input, past
# the last thread's buffer and no multiple of 512.
WINDOWS = [("512", 1, 0), ("1000", 3, 1), ("64K", 40, 30), ("1M", 4, 0), ("1M", 19, 2),
           ("1M", None, 0)]  # fmt: skip
IMAGE_SIZE = 21 * MiB + 777


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.raw"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return path


@pytest.fixture
def qcow2_image(image: Path, tmp_path: Path) -> Path:
    path = tmp_path / "in.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", image, path], check=True)
    return path


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"bs={w[0]},count={w[1]},skip={w[2]}")
@pytest.mark.parametrize("fmt", OUTPUTS)
def test_the_copy_without_a_loop_writes_what_the_pipeline_writes(
    image: Path, tmp_path: Path, fmt: str, window: tuple[str, int | None, int]
) -> None:
    bs, count, skip = window
    short, piped = tmp_path / f"short.{fmt}", tmp_path / f"piped.{fmt}"
    argv = ["--isolation=inline", "-O", fmt, f"bs={bs}", f"skip={skip}"]
    if count is not None:
        argv.append(f"count={count}")
    assert _is_plain(parse_args([*argv, f"if={image}", f"of={short}"]))
    assert main([*argv, f"if={image}", f"of={short}"]) == 0
    anyio.run(
        lambda: dd(
            image, piped, bs=bs, count=count, skip=skip, output_format=fmt, isolation="inline"
        )
    )
    assert short.stat().st_size == piped.stat().st_size
    assert virtual_disk(short, fmt) == virtual_disk(piped, fmt)
    if fmt == "raw":
        assert short.read_bytes() == piped.read_bytes()
    assert {p.name for p in tmp_path.iterdir()} == {"in.raw", short.name, piped.name}


@pytest.mark.parametrize("isolation", ["auto", "sandbox"])
@pytest.mark.parametrize(("bs", "count", "skip"), [("4K", 3, 1), ("1M", 19, 1)])
def test_the_copy_without_a_loop_decodes_in_the_guest(
    image: Path, tmp_path: Path, isolation: str, bs: str, count: int, skip: int
) -> None:
    out = tmp_path / "out.raw"
    assert main([f"--isolation={isolation}", f"bs={bs}", f"count={count}", f"skip={skip}",
                 f"if={image}", f"of={out}"]) == 0  # fmt: skip
    unit = 4096 if bs == "4K" else MiB
    assert out.read_bytes() == image.read_bytes()[skip * unit : count * unit]


def test_a_copy_without_a_loop_past_the_end_warns_as_the_pipeline_does(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.raw"
    assert main(["--isolation=inline", "bs=1M", "count=40", "skip=30", f"if={image}",
                 f"of={out}"]) == 0  # fmt: skip
    assert capsys.readouterr().err == f"aiodd: {image}: cannot skip to specified offset\n"
    assert out.read_bytes() == b""


@pytest.mark.parametrize(
    ("extra", "plain"),
    [
        (["count=1"], True),
        (["bs=1G", "count=100"], True),
        ([], True),  # to the input's end: any length
        (["-t", "unsafe"], True),
        (["-O", "qcow2", "--isolation=sandbox"], True),
        (["count=1", "-p"], True),
        (["--progress=json"], True),
        (["--progress=bar"], True),
        (["count=1", "--checksum=sha256"], True),
        (["--sparse"], False),
        (["--sparse", "count=1"], False),
    ],
)
def test_which_copies_run_without_a_loop(extra: list[str], plain: bool) -> None:
    assert _is_plain(parse_args(["if=a", "of=b", *extra])) is plain


_LOADED = (
    "import sys; from aiodd.cli import main; status = main(sys.argv[1:]);"
    "print(status, 'asyncio' in sys.modules, 'anyio' in sys.modules)"
)


@pytest.mark.parametrize(
    ("extra", "loop"),
    [(["bs=512", "count=1"], False), (["bs=1M", "--progress=json", "--checksum=sha256"], False),
     (["--sparse"], True)],
)  # fmt: skip
def test_only_a_sparse_copy_imports_an_event_loop(
    image: Path, tmp_path: Path, extra: list[str], loop: bool
) -> None:
    """asyncio alone costs what the start-up floor allows a whole copy."""
    out = tmp_path / "out.raw"
    argv = ["--isolation=inline", f"if={image}", f"of={out}", *extra]
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED, *argv], capture_output=True, text=True, check=True
    )
    assert proc.stdout.splitlines()[-1].split() == ["0", str(loop), str(loop)]


_MODULES = (
    "import sys; from aiodd.cli import main; status = main(sys.argv[1:]);"
    "print(status, 'dataclasses' in sys.modules, 'ctypes' in sys.modules)"
)


@pytest.mark.parametrize(
    ("extra", "ctypes"),
    [(["count=1"], True), (["-t", "directsync"], True), (["-t", "unsafe"], False),
     (["-t", "writethrough"], False),  # page-cache writes and a flush each: no O_DIRECT
     *((["-O", fmt, "-t", "unsafe"], False) for fmt in ("qcow2", "vmdk", "vpc", "vhdx", "vdi"))],
)  # fmt: skip
def test_a_copy_imports_no_dataclasses_and_ctypes_only_for_libc(
    image: Path, tmp_path: Path, extra: list[str], ctypes: bool
) -> None:
    """dataclasses (with inspect) costs a copy 8 ms of start-up, ctypes 2 ms: ctypes is
    for what os does not offer (fallocate and sync_file_range for O_DIRECT and the
    writeback hint, memcmp for --sparse), loaded when first needed.  (--sparse runs on
    anyio, which imports dataclasses itself.)"""
    out = tmp_path / "out.img"
    argv = ["--isolation=inline", f"if={image}", f"of={out}", *extra]
    proc = subprocess.run(
        [sys.executable, "-c", _MODULES, *argv], capture_output=True, text=True, check=True
    )
    assert proc.stdout.splitlines()[-1].split() == ["0", "False", str(ctypes)]


@pytest.mark.parametrize("isolation", ["inline", "sandbox", "auto"])
def test_aiodd_timing_prints_the_phases(image: Path, tmp_path: Path, isolation: str) -> None:
    out = tmp_path / "out.raw"
    env = {**os.environ, "AIODD_TIMING": "1"}
    # stderr a regular file: the guest must report before RLIMIT_FSIZE forbids writing one.
    with (tmp_path / "stderr").open("w+") as stderr:
        proc = subprocess.run(
            [sys.executable, "-m", "aiodd", f"--isolation={isolation}", "bs=512", "count=1",
             f"if={image}", f"of={out}"],
            stderr=stderr, env=env, check=False,
        )  # fmt: skip
        stderr.seek(0)
        lines = stderr.read().splitlines()
    assert proc.returncode == 0, lines
    host = [line.split(":")[2].split("  ")[0].strip() for line in lines
            if line.startswith("aiodd: timing:")]  # fmt: skip
    # The aiodd command starts the guest before it imports the CLI (aiodd/_command.py).
    early = ["guest spawned"] if isolation != "inline" else []
    phases = ["interpreter (CPU)", *early, "imports", "options", "library imported"]
    if isolation != "inline":
        phases += ["guest ready", "guest opened input"]
    phases += ["input opened", "output opened", "copy", "fsync", "rename", "close, exit"]
    assert host == [*phases, "total after interpreter"]
    guest = [line.split(":")[2].split("  ")[0].strip() for line in lines
             if line.startswith("aiodd guest: timing:")]  # fmt: skip
    if isolation == "inline":
        assert guest == []
    else:
        assert guest == ["interpreter (CPU)", "imports", "prepared", "waiting for the host",
                         "namespaces",
                         "KVM VM made", "decoders imported", "root, privileges, landlock",
                         "total after interpreter"]  # fmt: skip
    assert out.read_bytes() == image.read_bytes()[:512]
    quiet = subprocess.run(
        [sys.executable, "-m", "aiodd", f"--isolation={isolation}", "bs=512", "count=1",
         f"if={image}", f"of={out}"],
        capture_output=True, text=True, check=False,
        env={k: v for k, v in os.environ.items() if k != "AIODD_TIMING"},
    )  # fmt: skip
    assert (quiet.returncode, quiet.stderr) == (0, "")


@pytest.mark.parametrize(
    "extra",
    [["--isolation=inline", "bs=512", "count=1"], ["bs=512", "count=1"],
     ["--isolation=sandbox", "-f", "qcow2"], ["--isolation=sandbox", "-t", "unsafe"],
     ["--isolation=inline", "--checksum=sha256", "-p"],
     *(["--isolation=inline", "-O", fmt, "-t", "unsafe"]
       for fmt in ("qcow2", "vmdk", "vpc", "vhdx", "vdi"))],
)  # fmt: skip
def test_a_copy_imports_no_typing(qcow2_image: Path, tmp_path: Path, extra: list[str]) -> None:
    """typing costs a process 3 ms of its start (aiodd._typing_names), which a short
    copy waits for in every mode, the guest's start included.  In an interpreter
    without site (whose .pth files may import typing themselves)."""
    argv = [*extra, f"if={qcow2_image}", f"of={tmp_path / 'out.img'}"]
    proc = run_as_guest(
        f"from aiodd.cli import main; status = main({argv!r});"
        "print(status, 'typing' in sys.modules)"
    )
    assert proc.stdout.splitlines()[-1].split() == ["0", "False"], proc.stderr


def _guest_modules(
    image: Path,
    isolation: str,
    names: list[str],
    fmt: str | None = None,
    read: bytearray | None = None,
) -> tuple[str, set[str]]:
    """Where the guest of ``isolation`` decodes ``image`` (named ``fmt``, or detected),
    and which of the modules ``names`` (or ``".suffix"``: those whose name ends so) it
    imported, having first read the image's start into ``read`` where given."""
    from aiodd.guest import GuestOptions, open_guest, shared_buffer
    from aiodd.policy import Policy
    from tests.guest_attempts import ENTRY, attempt

    policy = Policy()
    memory = shared_buffer(MiB)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        options = GuestOptions(entry=ENTRY, isolation=isolation)
        disk = open_guest(str(image), fd, fmt, policy, policy.top(str(image), fd),
                          memory=memory, options=options)  # fmt: skip
    finally:
        os.close(fd)
    try:
        if read is not None:
            disk.read_into(0, memoryview(read))
        result = attempt(disk, "modules", names)
        assert result.startswith("ok: "), result
        return disk.mode, set(result[4:].split(",")) - {""}
    finally:
        disk.close()
        memory.close()


_DECODING = ("zlib", "zstandard", "aiodd.formats.raw.decode", "aiodd.formats.qcow2.decode",
             "aiodd.formats.vhdx.layout", "aiodd.formats.vmdk.layout")  # fmt: skip


def test_the_sandbox_guest_runs_the_decoders_it_uses(image: Path) -> None:
    """The sandbox guest reads every decoder before its seal and runs one when first
    used (aiodd/guest/preload.py): a raw image's, not vhdx's or qcow2's; what the
    decoders import from elsewhere is imported at the start.  It makes no VM, and does
    not import the VM's monitor either (aiodd.guest.kvm.layout is among the layouts)."""
    mode, modules = _guest_modules(
        image,
        "sandbox",
        [*_DECODING, ".decode", ".layout", "aiodd.guest.kvm.reader", "aiodd.guest.kvm.vmm"],
    )
    assert mode == "sandbox"
    assert modules == {"zlib", "zstandard", "aiodd.formats.raw.decode", "aiodd.formats.raw.layout"}


def test_a_sandbox_guest_decodes_zstd_clusters_without_typing(tmp_path: Path) -> None:
    """The guest loads zstandard's C module as the package (aiodd.guest.child), and
    nothing it runs to decode imports typing (aiodd._typing_names): neither that,
    re nor platform, milliseconds of its start-up, where the image needs the qcow2
    decoder and its zstd clusters."""
    from tests.formats_corpus import qcow2_zstd

    path, _ = qcow2_zstd(tmp_path)
    expected = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", path, expected], check=True)
    data = bytearray(expected.stat().st_size)
    names = ["typing", "re", "platform", "zstandard", "aiodd.formats.qcow2.decode"]
    mode, modules = _guest_modules(path, "sandbox", names, read=data)
    assert mode == "sandbox"
    assert data == expected.read_bytes()
    assert modules == {"zstandard", "aiodd.formats.qcow2.decode"}


def test_the_sandbox_guests_decoders_import_no_typing() -> None:
    """Every Python decoder and what the guest imports before its seal, in an
    interpreter started as the guest's is: no typing, re, enum or platform."""
    imported = _imported_by(
        "from aiodd.guest import child;"
        "sys.argv[1:] = ['3', 'aiodd.guest.child', 'sandbox'];"
        "child.prepare(); child._import_python_decoders(None);"
        "from aiodd.formats import INPUT_FORMATS, registry;"
        "[registry.decoder(name) for name in INPUT_FORMATS]"
    )
    assert {"aiodd.formats.qcow2.decode", "aiodd.formats.vmdk.decode", "zstandard"} <= imported
    assert not imported & {"typing", "re", "enum", "platform"}


def test_a_sandbox_guest_told_raw_imports_the_raw_decoder_alone(image: Path) -> None:
    """A raw image names no other file and holds nothing compressed: with ``-f raw`` the
    guest's start skips the other decoders, zlib and zstandard."""
    mode, modules = _guest_modules(image, "sandbox", [*_DECODING, ".decode"], fmt="raw")
    assert mode == "sandbox"
    assert modules == {"aiodd.formats.raw.decode"}


def test_the_kvm_guest_imports_no_python_decoder(image: Path) -> None:
    """The VM decodes every format: its process detects formats, and imports neither a
    Python decoder nor what one needs (docs/performance.md, "Start-up")."""
    from aiodd.guest import kvm

    available, why = kvm.availability()
    if not available:
        pytest.skip(f"the KVM guest reader cannot run here: {why}")
    mode, modules = _guest_modules(
        image, "kvm", [*_DECODING, ".decode", ".encode", ".layout", "aiodd.formats.qcow2.probe"]
    )
    assert mode == "kvm"
    modules.discard("aiodd.guest.kvm.layout")  # the VM's own
    assert modules == {"aiodd.formats.qcow2.probe"}  # detection's
    # Named raw, there is nothing to detect: not even the probes.
    mode, modules = _guest_modules(image, "kvm", [".probe", ".decode"], fmt="raw")
    assert (mode, modules) == ("kvm", set())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["if=a", "of=b"], False),
        (["--isolation=inline", "if=a", "of=b"], True),
        (["if=a", "--isolation", "inline", "of=b"], True),
        (["--iso=inline", "if=a"], True),  # getopt takes an unambiguous prefix
        (["--i", "inline"], True),
        (["--isolation=kvm", "if=a"], False),
        (["--isolation"], False),
        (["-h"], True),
        (["--help"], True),
        (["--version"], True),
        (["--verbose", "if=a"], False),
        (["--", "--isolation=inline"], False),  # an operand, not an option
        (["if=--isolation=inline"], False),
        (["-p", "if=a"], False),
    ],
)
def test_the_command_starts_a_guest_unless_none_is_needed(args: list[str], expected: bool) -> None:
    assert needs_no_guest(args) is expected


# Each of these is milliseconds (typing alone brings re, enum, collections, functools
# and contextlib) spent before the guest, the longest path of a short copy, starts.
_HEAVY = {"typing", "enum", "re", "collections", "functools", "contextlib", "threading",
          "signal", "dataclasses", "subprocess", "socket"}  # fmt: skip


def _imported_by(statements: str) -> set[str]:
    """The modules ``statements`` import in an interpreter that imported nothing else,
    started as the guest's is."""
    proc = run_as_guest(
        f"before = set(sys.modules); {statements}; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_the_command_starts_its_guest_before_importing_anything_heavy() -> None:
    # The package, its entry point and the spawner.
    imported = _imported_by("import aiodd._command, aiodd.guest.spawn")
    assert {"aiodd._command", "aiodd.guest.spawn"} <= imported
    assert not imported & _HEAVY, sorted(imported & _HEAVY)


def test_the_kvm_guest_starts_without_anything_heavy() -> None:
    """The guest's imports are the longest part of its start, which a short copy waits
    for: it takes the C cores of signal, threading, socket and json, and no typing
    (docs/performance.md, "Start-up")."""
    # The guest's entry (with the sandbox and the VM's monitor), and the probes that
    # detect a format.
    imported = _imported_by(
        "import aiodd.guest.child, aiodd.guest.kvm.reader;"
        "from aiodd.formats import registry; registry.import_probes()"
    )
    assert {"aiodd.guest.kvm.vmm", "aiodd.formats.qcow2.probe", "_json", "ctypes"} <= imported
    heavy = _HEAVY | {"json", "queue"}
    assert not imported & heavy, sorted(imported & heavy)


_DECODERS_NEED = {"threading", "collections", "contextlib", "functools"}
_MONITOR = {"aiodd.guest.kvm.reader", "aiodd.guest.kvm.vmm"}
_PROBES = {f"aiodd.formats.{name}.probe" for name in ("qcow2", "vmdk", "vpc", "vhdx")}


@pytest.mark.parametrize(
    ("expected", "kvm_runs", "prepares"),
    [("auto", True, False), ("auto", False, True), ("sandbox", True, True), ("kvm", False, False)],
)
def test_the_guest_prepares_for_the_python_decoders_it_will_most_likely_run(
    expected: str, kvm_runs: bool, prepares: bool
) -> None:
    """While it waits for the host, a guest that will most likely decode in Python
    (asked for sandbox, or auto where KVM cannot run) imports what the decoders import;
    one that will most likely run the VM imports the VM's monitor instead; both import
    the probes that detect the input's format."""
    imported = _imported_by(
        "from aiodd.guest import child, kvm;"
        f"sys.argv[1:] = ['3', 'aiodd.guest.child', {expected!r}];"
        f"kvm.availability = lambda *args: ({kvm_runs}, '');"
        "child.prepare()"
    )
    if prepares:
        assert imported >= _DECODERS_NEED
        assert not imported & _MONITOR
    else:
        assert not imported & _DECODERS_NEED
        assert imported >= _MONITOR
    assert imported >= _PROBES  # both detect the input's format


def test_the_guests_entry_imports_neither_the_decoders_needs_nor_the_vms_monitor() -> None:
    """Only prepare()'s guess, or the host's Init, decides which of the two the guest
    imports: the entry itself pays for neither."""
    entry = _imported_by("from aiodd.guest import child")
    assert not entry & (_DECODERS_NEED | _MONITOR), sorted(entry & (_DECODERS_NEED | _MONITOR))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["if=a", "of=b"], "auto"),
        (["--isolation=sandbox", "if=a"], "sandbox"),
        (["--iso", "kvm", "if=a"], "kvm"),
        (["--isolation=kvm", "--isolation=sandbox"], "sandbox"),  # the last one counts
        (["--", "--isolation=sandbox"], "auto"),  # an operand, not an option
        (["--isolation"], ""),
    ],
)
def test_the_command_tells_its_guest_the_isolation_it_names(args: list[str], expected: str) -> None:
    assert isolation_named(args) == expected


_FORMAT_NAMED = [
    (["if=a", "of=b"], ""),
    (["-f", "raw", "if=a", "of=b"], "raw"),
    (["-fraw", "if=a", "of=b"], "raw"),
    (["-pf", "raw", "if=a", "of=b"], "raw"),  # flags run together, then -f
    (["-pUfraw", "if=a", "of=b"], "raw"),
    (["if=a", "of=b", "-f", "qcow2"], "qcow2"),  # options after operands, as gnu_getopt
    (["-f", "raw", "-f", "qcow2", "if=a", "of=b"], "qcow2"),  # the last one counts
    (["-O", "-f", "if=a", "of=b"], ""),  # -f is -O's value here, not an option
    (["-Of", "raw", "if=a", "of=b"], ""),  # the same, run together
    (["-t", "unsafe", "-f", "raw", "if=a", "of=b"], "raw"),
    (["--isolation", "sandbox", "-f", "raw", "if=a", "of=b"], "raw"),
    (["if=a", "of=b", "--", "-f", "raw"], ""),  # operands, not options
]


@pytest.mark.parametrize(("args", "expected"), _FORMAT_NAMED)
def test_the_command_tells_its_guest_the_input_format_it_names(
    args: list[str], expected: str
) -> None:
    assert input_format_named(args) == expected


@pytest.mark.parametrize(("args", "expected"), [c for c in _FORMAT_NAMED if "--" not in c[0]])
def test_the_guess_of_the_input_format_is_what_the_parser_reads(
    args: list[str], expected: str
) -> None:
    """The guess reads short options as the CLI's parser does: where the parser takes
    the command line, both name the same format (or none)."""
    from aiodd.errors import UsageError

    assert input_format_named(args) == expected
    try:
        parsed = parse_args(args).input_format or ""
    except UsageError:  # -O took the f as its value, which is no format: no copy runs
        assert args[0] in ("-O", "-Of")
    else:
        assert parsed == expected


def test_a_guest_expecting_a_raw_input_prepares_nothing() -> None:
    """The raw decoder imports none of what the other decoders share (threading,
    collections, ...), and a raw input is not detected: a guest told the input is raw
    skips their import and the probes', in every mode."""
    imported = _imported_by(
        "from aiodd.guest import child, kvm;"
        "sys.argv[1:] = ['3', 'aiodd.guest.child', 'sandbox', 'raw'];"
        "kvm.availability = lambda *args: (False, '');"
        "child.prepare()"
    )
    assert not imported & _HEAVY, sorted(imported & _HEAVY)
    assert "aiodd.guest.kvm.reader" not in imported  # no VM in sandbox mode
    assert not imported & _PROBES  # nothing to detect
    # And what it then imports to read the input needs none of it either.
    imported = _imported_by(
        "import aiodd.guest.child; from aiodd.formats import registry; registry.decoder('raw')"
    )
    assert "aiodd.formats.raw.decode" in imported
    assert not imported & _HEAVY, sorted(imported & _HEAVY)
