"""The hostile corpus, end to end (docs/security.md; the output guarantees of
docs/usage.md#what-aiodd-guarantees-about-your-files).

Every case in :mod:`tests.hostile` is run through the real command line, as a
subprocess, under the ``sandbox`` and ``inline`` isolation modes, and under ``kvm`` too
where the KVM guest reader decodes the case's image (:data:`tests.conftest.KVM_FORMATS`).
Each must end with exit status 1 and exactly one line ``aiodd: ...`` on stderr naming
the rule or the structure, and leave nothing behind: no output, no temporary file, no
process, and the secret's bytes in no file and no message.  Each run is bounded in time
(a timeout) and in memory (the peak resident size of aiodd and its guest, from
``wait4`` in a small process that starts aiodd: ``run_aiodd`` says why).

``test_qemu_img_dd_on_the_same_corpus`` runs ``qemu-img dd`` on the reference cases and
checks what it does with them today: it copies the secret in the cases marked
``qemu="leaks"`` (the difference this corpus documents).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from aiodd.chain import open_input
from aiodd.errors import AioddError
from aiodd.formats.foreign import PROBE_SIZE
from aiodd.formats.registry import detect
from tests.conftest import QEMU_IMG, kvm_marks, needs_qemu, with_kvm
from tests.hostile import (
    CASES,
    ENV_VAR,
    REFERENCE_CASES,
    SECRET_NAME,
    TRUNCATED_BASES,
    TRUNCATED_CASES,
    Case,
    Tree,
    backing,
    base,
    base_fmt,
    flip_bits,
    make_tree,
    python_work_unit,
    qcow2,
    qcow2_chain,
    qcow2_set_l2,
    qcow2_with_data,
    quoted,
)

pytestmark = needs_qemu

ISOLATIONS = ("sandbox", "inline")
# The top image's format, by the prefix of a case's id (the cases that give no -f);
# test_the_case_formats_are_the_images checks the builders agree.
PREFIX_FORMATS = {
    "qcow2": "qcow2", "backing": "qcow2", "chain": "qcow2", "data": "qcow2",
    "vmdk": "vmdk", "vpc": "vpc", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi",
    "parallels": "parallels", "qcow": "qcow", "qed": "qed",
}  # fmt: skip
QCOW2_OVER_RAW = with_kvm(ISOLATIONS, ["qcow2", "raw"])  # backing(): a qcow2 over a raw file
TIMEOUT = 60.0  # seconds a run may take
MAX_RSS = 512 << 20  # peak resident bytes of aiodd (its guest included)
OUTPUT = "out.raw"
MiB = 1 << 20
# Every run copies at most this window: an image aiodd wrongly accepts cannot fill the
# disk (and RLIMIT_FSIZE stops a run that writes more than the window anyway).
WINDOW = ("bs=1M", "count=16")
FILE_LIMIT = 64 * MiB


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Run:
    status: int
    stdout: str
    stderr: str
    elapsed: float
    cpu: float  # seconds of CPU, the run's and its reaped children's (the guest)
    max_rss: int  # bytes
    timed_out: bool
    survivors: bool  # a process of the run was still alive after it exited


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused id
        return False
    return True


# Runs the command as its own child and reports that child's rusage: a process started by
# the test itself would inherit the test process's peak RSS (vfork shares its memory until
# exec), so a memory-hungry test earlier in the run would fail every case here.
_MEASURE = """
import os, resource, signal, subprocess, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
proc = subprocess.Popen(sys.argv[3:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run_aiodd(tree: Tree, args: Sequence[str], isolation: str, timeout: float = TIMEOUT) -> Run:
    """``aiodd --isolation=MODE ARGS`` in ``tree.img``, in its own process group."""
    env = dict(os.environ)
    env[ENV_VAR] = tree.env_marker
    command = [sys.executable, "-m", "aiodd", f"--isolation={isolation}", *args]
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r") as usage_file,
    ):
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURE, usage_file.name, str(FILE_LIMIT), *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=tree.img,
            env=env,
            start_new_session=True,
        )
        timed_out = False
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, _ = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        elapsed = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        survivors = False
        for _ in range(200):  # a guest that outlived aiodd, or a zombie not yet reaped
            survivors = _group_alive(proc.pid)
            if not survivors:
                break
            time.sleep(0.01)
        if survivors:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        measured = usage_file.read().split()
        max_rss, cpu = (int(measured[0]) * 1024, float(measured[1])) if measured else (0, 0.0)
        return Run(
            status=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            elapsed=elapsed,
            cpu=cpu,
            max_rss=max_rss,
            timed_out=timed_out,
            survivors=survivors,
        )


def cli_args(tree: Tree, case: Case, image: Path, extra: Sequence[str] = ()) -> list[str]:
    args = ["-f", case.fmt] if case.fmt else []
    return [*args, *extra, f"if={image}", f"of={tree.out / OUTPUT}", *WINDOW]


@dataclass(frozen=True)
class Snapshot:
    files: dict[Path, tuple[int, int, int]]  # path -> (inode, size, mtime_ns)


def snapshot(root: Path) -> Snapshot:
    files: dict[Path, tuple[int, int, int]] = {}
    for path in _regular_files(root):
        st = path.lstat()
        files[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return Snapshot(files)


def _regular_files(root: Path) -> Iterator[Path]:
    for directory, _dirs, names in os.walk(root):  # does not follow symlinks
        for name in names:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path


def changes(root: Path, before: Snapshot) -> list[Path]:
    """Regular files new or changed since ``before``."""
    found = []
    for path in _regular_files(root):
        st = path.lstat()
        if before.files.get(path) != (st.st_ino, st.st_size, st.st_mtime_ns):
            found.append(path)
    return found


def assert_refused(run: Run, tree: Tree, before: Snapshot, expect: Sequence[str] = ()) -> str:
    """The run failed cleanly; returns its error line."""
    assert not run.timed_out, f"no answer within {run.elapsed:.0f} s"
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {run.stderr!r}"
    line = lines[0]
    assert run.stderr == line + "\n"
    assert line.startswith("aiodd: "), line
    assert line.isprintable(), f"control characters in the error line: {line!r}"
    assert run.status == 1, f"exit status {run.status}: {line}"
    assert run.stdout == ""
    # the guest reports an exception no decoder meant to raise this way
    assert "the decoder failed on this image" not in line, line
    for text in expect:
        assert text in line, f"{text!r} not in {line!r}"
    assert tree.marker.decode() not in run.stderr + run.stdout
    assert sorted(p.name for p in tree.out.iterdir()) == [], "output or temporary file left"
    left = changes(tree.root, before)
    assert [p for p in left if tree.marker in p.read_bytes()] == [], "the secret was copied"
    assert left == [], "the run left files behind"
    assert run.max_rss < MAX_RSS, f"peak RSS {run.max_rss >> 20} MiB"
    assert not run.survivors, "a process of the run outlived it"
    return line


# --------------------------------------------------------------------------- the corpus


def top_format(case: Case) -> str | None:
    """The format the case's image is read as (None: not known here)."""
    if case.fmt is not None:
        return case.fmt
    head, _, rest = case.id.partition("_")
    if head == "message":  # message_<format>_...
        head = rest.partition("_")[0]
    return PREFIX_FORMATS.get(head)


def params(cases: Sequence[Case]) -> list[object]:
    """(case, isolation) pairs as pytest params: where a case shows a known aiodd bug
    in that mode, a strict xfail.  The KVM guest reader runs the cases whose top image
    it decodes (a layer under it that it does not decode makes the run fail, loudly)."""
    out: list[object] = []
    for c in cases:
        fmt = top_format(c)
        formats = [fmt] if fmt is not None else ["unknown"]
        for isolation in with_kvm(ISOLATIONS, formats):
            marks = kvm_marks(isolation)
            if c.bug and isolation in c.bug_in:
                marks.append(pytest.mark.xfail(strict=True, reason=c.bug))
            out.append(pytest.param(c, isolation, id=f"{c.id}-{isolation}", marks=marks))
    return out


@pytest.mark.parametrize(("case", "isolation"), params(CASES))
def test_hostile_case_is_refused(case: Case, isolation: str, tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    built = case.build(tree)
    before = snapshot(tree.root)
    unit = python_work_unit() if case.cpu_units is not None else 0.0
    run = run_aiodd(tree, cli_args(tree, case, built.image), isolation)
    line = assert_refused(run, tree, before, built.expect)
    if case.cpu_units is not None:
        # A tighter bound catches quadratic work: counted in CPU time, which a busy
        # machine stretches less than the wall clock, and in units of pure-Python work
        # measured before and after the run, which a slow or busy one stretches alike.
        unit = max(unit, python_work_unit())
        units = run.cpu / unit
        assert units < case.cpu_units, (
            f"{run.cpu:.1f} s of CPU, {units:.0f} units of {unit:.3f} s"
            f" (bound {case.cpu_units} units)"
        )
    for text in built.hidden:
        assert text not in line, f"the message reveals {text!r}: {line}"


@pytest.mark.parametrize(("case", "isolation"), params(TRUNCATED_CASES))
def test_truncated_image_is_refused(case: Case, isolation: str, tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    built = case.build(tree)
    before = snapshot(tree.root)
    run = run_aiodd(tree, cli_args(tree, case, built.image), isolation)
    assert_refused(run, tree, before, built.expect)


def _inline_outcome(image: Path, fmt: str) -> str | None:
    """What the decoders, run in this process, make of ``image``: None if the whole
    disk reads, else the error line."""
    try:
        disk = open_input(str(image), fmt, isolation="inline")
    except AioddError as exc:
        return f"aiodd: {exc}"
    try:
        buf = bytearray(MiB)
        end = min(disk.virtual_size, 16 * MiB)  # the WINDOW
        for at in range(0, end, MiB):
            n = min(MiB, end - at)
            disk.read_into(at, memoryview(buf)[:n])
    except AioddError as exc:
        return f"aiodd: {exc}"
    finally:
        disk.close()
    return None


FLIP_SEEDS = (1, 2, 3, 4)


@pytest.mark.parametrize("seed", FLIP_SEEDS)
@pytest.mark.parametrize(
    ("name", "isolation"),
    [
        pytest.param(name, isolation, id=f"{name}-{isolation}", marks=kvm_marks(isolation))
        for name in TRUNCATED_BASES
        for isolation in with_kvm(ISOLATIONS, [base_fmt(name)])
    ],
)
def test_bit_flips_end_to_end(name: str, seed: int, isolation: str, tmp_path: Path) -> None:
    """Random bit flips over headers and tables: a flipped image may still be valid, so
    the oracle is the in-process decoder; the command must agree with it, and fail
    cleanly when it fails (the fuzz target in test_fuzz.py does thousands of these)."""
    tree = make_tree(tmp_path)
    b = base(name)
    image = tree.img / "flipped.img"
    image.write_bytes(flip_bits(b, seed, flips=8))
    expected = _inline_outcome(image, b.fmt)
    before = snapshot(tree.root)
    run = run_aiodd(
        tree, ["-f", base_fmt(name), f"if={image}", f"of={tree.out / OUTPUT}"], isolation
    )
    if expected is None:
        assert (run.status, run.stderr) == (0, ""), run.stderr
        assert (tree.out / OUTPUT).exists()
    else:
        line = assert_refused(run, tree, before)
        assert line == expected


# --------------------------------------------------------------------------- qemu-img


@needs_qemu
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in REFERENCE_CASES if c.qemu])
def test_qemu_img_dd_on_the_same_corpus(case: Case, tmp_path: Path) -> None:
    """What qemu-img dd (7.2) does with each reference case: the leaks are the
    difference this corpus documents (docs/security.md#threat-model)."""
    assert QEMU_IMG is not None
    tree = make_tree(tmp_path)
    built = case.build(tree)
    env = dict(os.environ)
    env[ENV_VAR] = tree.env_marker
    args = ["-f", case.fmt] if case.fmt else []
    output = tree.out / OUTPUT
    command = [QEMU_IMG, "dd", *args, f"if={built.image}", f"of={output}"]
    try:
        subprocess.run(
            command,
            capture_output=True,
            cwd=tree.img,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=2 if case.qemu == "hangs" else 30,
        )
    except subprocess.TimeoutExpired:
        behaviour = "hangs"
    else:
        leaked = output.exists() and tree.marker in output.read_bytes()
        behaviour = "leaks" if leaked else "safe"
    assert behaviour == case.qemu


def test_qemu_leak_count() -> None:
    """The corpus holds at least the cases docs/security.md#threat-model counts: 55 images,
    from 23 of which qemu-img dd copies a host file."""
    leaks = [c.id for c in REFERENCE_CASES if c.qemu == "leaks"]
    assert len(leaks) >= 23
    assert len(REFERENCE_CASES) >= 55


# --------------------------------------------------------------------------- the policy


@pytest.mark.parametrize("isolation", [pytest.param(i, marks=kvm_marks(i)) for i in QCOW2_OVER_RAW])
def test_allow_backing_is_the_only_thing_in_the_way(isolation: str, tmp_path: Path) -> None:
    """The option the refusal names does widen the policy: with it the same image
    reads its backing file (so the refusals above are the policy, not an accident)."""
    tree = make_tree(tmp_path)
    image = backing(tree, f"../{SECRET_NAME}")
    args = ["--allow-backing", str(tree.root), f"if={image}", f"of={tree.out / OUTPUT}"]
    run = run_aiodd(tree, args, isolation)
    assert (run.status, run.stderr) == (0, "")
    assert (tree.out / OUTPUT).read_bytes() == tree.secret.read_bytes()


@pytest.mark.parametrize("isolation", [pytest.param(i, marks=kvm_marks(i)) for i in QCOW2_OVER_RAW])
def test_symlink_inside_the_tree_to_a_file_inside_is_followed(
    isolation: str, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path)
    (tree.img / "sub").mkdir()
    (tree.img / "sub" / "base.raw").write_bytes(b"\x5a" * MiB)
    (tree.img / "link").symlink_to("sub/base.raw")
    image = backing(tree, "link")
    run = run_aiodd(tree, [f"if={image}", f"of={tree.out / OUTPUT}"], isolation)
    assert (run.status, run.stderr) == (0, "")
    assert (tree.out / OUTPUT).read_bytes() == b"\x5a" * MiB


@pytest.mark.parametrize("isolation", [pytest.param(i, marks=kvm_marks(i)) for i in QCOW2_OVER_RAW])
@pytest.mark.parametrize("kind", ["absolute", "symlink"])
def test_no_oracle(kind: str, isolation: str, tmp_path: Path) -> None:
    """A reference outside the tree is refused by its spelling: the message for a host
    file that exists equals the one for a file that does not: no oracle
    (docs/security.md#the-backing-file-policy)."""
    tree = make_tree(tmp_path)
    missing = tree.root / "no-such-dir" / "no-such-file"
    lines = []
    for target in (tree.secret, missing):
        for stale in tree.img.iterdir():
            stale.unlink()
        if kind == "symlink":
            (tree.img / "base.raw").symlink_to(target)
            image = backing(tree, "base.raw")
        else:
            image = backing(tree, str(target))
        before = snapshot(tree.root)
        run = run_aiodd(tree, [f"if={image}", f"of={tree.out / OUTPUT}"], isolation)
        line = assert_refused(run, tree, before)
        lines.append(line.replace(str(target), "TARGET"))
    assert lines[0] == lines[1]
    if kind == "symlink":
        assert SECRET_NAME not in lines[0]


@pytest.mark.parametrize("isolation", [pytest.param(i, marks=kvm_marks(i)) for i in QCOW2_OVER_RAW])
def test_chain_of_64_layers_is_read_65_is_refused(isolation: str, tmp_path: Path) -> None:
    """A chain holds at most 64 layers, the user's image included
    (docs/security.md#the-backing-file-policy)."""
    tree = make_tree(tmp_path)
    top = qcow2_chain(tree.img, 64)
    run = run_aiodd(tree, [f"if={top}", f"of={tree.out / OUTPUT}"], isolation)
    assert (run.status, run.stderr) == (0, "")
    (tree.out / OUTPUT).unlink()
    for stale in tree.img.iterdir():
        stale.unlink()
    top = qcow2_chain(tree.img, 65)
    before = snapshot(tree.root)
    run = run_aiodd(tree, [f"if={top}", f"of={tree.out / OUTPUT}"], isolation)
    line = assert_refused(run, tree, before, ("64 layers",))
    assert quoted("l064.qcow2") in line


# --------------------------------------------------------------------------- output safety


@pytest.mark.parametrize(
    "isolation", [pytest.param(i, marks=kvm_marks(i)) for i in with_kvm(ISOLATIONS, ["qcow2"])]
)
@pytest.mark.parametrize("output_format", ["raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"])
def test_corruption_found_mid_copy_leaves_no_output(
    output_format: str, isolation: str, tmp_path: Path
) -> None:
    """The image opens, the copy starts, a data cluster 900 KiB in points past the end
    of the file: the temporary output is removed, whatever the output format."""
    tree = make_tree(tmp_path)
    image = qcow2_with_data(tree.img / "late.qcow2")
    qcow2_set_l2(image, 225, (1 << 63) | (1 << 45))  # the cluster at 900 KiB
    before = snapshot(tree.root)
    args = ["-O", output_format, "bs=4k", f"if={image}", f"of={tree.out / OUTPUT}"]
    run = run_aiodd(tree, args, isolation)
    assert_refused(run, tree, before, ("data cluster", "past the end"))


@pytest.mark.parametrize(
    "isolation", [pytest.param(i, marks=kvm_marks(i)) for i in with_kvm(ISOLATIONS, ["qcow2"])]
)
def test_existing_output_is_left_untouched(isolation: str, tmp_path: Path) -> None:
    """On an error an existing file at of= is left as it was
    (docs/usage.md#the-output-appears-whole-or-not-at-all)."""
    tree = make_tree(tmp_path)
    image = qcow2_with_data(tree.img / "late.qcow2")
    qcow2_set_l2(image, 225, (1 << 63) | (1 << 45))
    old = tree.root / "keep"
    old.mkdir()
    (old / OUTPUT).write_bytes(b"precious" * 1000)
    run = run_aiodd(tree, [f"if={image}", f"of={old / OUTPUT}"], isolation)
    assert run.status == 1
    assert len(run.stderr.splitlines()) == 1
    assert sorted(p.name for p in old.iterdir()) == [OUTPUT]
    assert (old / OUTPUT).read_bytes() == b"precious" * 1000


def test_the_case_formats_are_the_images(tmp_path: Path) -> None:
    """top_format, which picks the cases the KVM guest reader runs, names the format each
    kind of case is built in (one case per id prefix; a case that forces its format with
    -f is not detected, so it says nothing here)."""
    seen: dict[str | None, str] = {}
    for case in CASES:
        fmt = top_format(case)
        kind = case.id.split("_")[0] if case.id.split("_")[0] != "message" else case.id
        if fmt is None or case.fmt is not None or kind in seen:
            continue
        (tmp_path / case.id).mkdir()
        tree = make_tree(tmp_path / case.id)
        built = case.build(tree)
        with built.image.open("rb") as f:
            head = f.read(PROBE_SIZE)
        seen[kind] = detect(head, built.image.name)
        assert seen[kind] == fmt, case.id
    assert set(seen.values()) == {"qcow2", "vmdk", "vpc", "vhdx", "vdi", "parallels", "qcow", "qed"}


def test_corpus_is_built_as_described(tmp_path: Path) -> None:
    """A few spot checks that the builders make what the cases claim (so a refusal is
    not of some other, accidental, problem)."""
    tree = make_tree(tmp_path)
    image = backing(tree, f"../{SECRET_NAME}")
    info = subprocess.run(
        [str(QEMU_IMG), "info", "--output=json", str(image)], capture_output=True, check=True
    ).stdout
    assert f"../{SECRET_NAME}".encode() in info
    top = qcow2(tree.img / "plain.qcow2")
    assert top.read_bytes()[:4] == b"QFI\xfb"
