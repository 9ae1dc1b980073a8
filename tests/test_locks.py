"""qemu's image locks, both ways, and outputs that are files the input reads.

The lock bytes each role takes were read from /proc/locks while qemu 7.2 held images
(docs/usage.md, "Image locks and the input's files"); the tests against the real
qemu-io and qemu-img check that aiodd and qemu refuse each other as qemu refuses itself.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

import aiodd
from aiodd import locks
from aiodd.locks import (
    ALL,
    CONSISTENT_READ,
    RESIZE,
    WRITE,
    Access,
    check_bytes,
    lock_bytes,
    output_locks,
)
from tests.conftest import needs_qemu, qemu_img, qemu_io
from tests.formats_corpus import create
from tests.harness import aiodd_run, leftovers
from tests.hostile import vhdx, vhdx_differencing, vpc_differencing, vpc_dynamic

MODES = ("sandbox", "inline")
MiB = 1 << 20


# -- the bytes (sans-IO) ----------------------------------------------------------------


def test_roles_lock_the_bytes_qemu_7_2_locks() -> None:
    # Observed in /proc/locks (OFDLCK) while qemu-img dd / qemu-io held the files.
    assert sorted(locks.INPUT.lock) == [100, 201, 203]  # qemu-img dd's input, qemu-io -r
    assert sorted(locks.INPUT_SHARED.lock) == [100]  # qemu-io -r -U, qemu-img dd -U
    assert sorted(output_locks(raw=True, replacing=False).lock) == [100, 101]
    assert sorted(output_locks(raw=False, replacing=False).lock) == [100, 101, 103, 201, 203]
    # What each role tests before it goes on (QEMU's raw_check_lock_bytes).
    assert sorted(locks.INPUT.test) == [101, 103, 200]
    assert sorted(locks.INPUT_SHARED.test) == [200]
    assert sorted(check_bytes(locks.CREATOR)) == [103, 201, 203]
    assert sorted(output_locks(raw=True, replacing=True).test) == [101, 103, 200, 201, 203]
    assert sorted(output_locks(raw=False, replacing=True).test) == [101, 103, 200, 201, 203]


perms = st.integers(0, ALL)


@given(perms, perms, perms, perms)
def test_bytes_conflict_exactly_when_permissions_do(
    a_perm: int, a_shared: int, b_perm: int, b_shared: int
) -> None:
    # B, arriving while A holds the file, is refused exactly when one wants what the
    # other does not share.
    a, b = Access(a_perm, a_shared), Access(b_perm, b_shared)
    refused = bool(b.perm & ~a.shared) or bool(a.perm & ~b.shared)
    assert bool(check_bytes(b) & lock_bytes(a)) == refused


@given(st.sampled_from(range(100, 104)) | st.sampled_from(range(200, 204)))
def test_every_lock_byte_has_a_reason(byte: int) -> None:
    bit, unshared = locks.permission_of(byte)
    assert (bit, unshared) == (1 << (byte % 100), byte >= 200)
    assert locks.conflict_reason(byte)


def test_bits_outside_qemu_7_2_are_refused() -> None:
    with pytest.raises(ValueError, match="outside 0xf"):
        Access(0x10, ALL)
    with pytest.raises(ValueError, match="not one of qemu's lock bytes"):
        locks.permission_of(104)


def test_readers_share_and_writers_do_not() -> None:
    reader = locks.READER
    assert not check_bytes(reader) & lock_bytes(reader)  # two aiodd copies of one input
    assert check_bytes(locks.IMAGE_WRITER) & lock_bytes(reader)  # a VM may not start
    assert check_bytes(locks.RAW_WRITER) & lock_bytes(reader)  # nor a raw writer
    assert ALL & ~reader.shared == WRITE | RESIZE
    # -U: refused only by a user that does not let others read consistently.
    assert check_bytes(locks.SHARED_READER) == {200}
    assert check_bytes(locks.SHARED_READER) & lock_bytes(Access(0, ALL & ~CONSISTENT_READ))


# -- the fcntl layer --------------------------------------------------------------------


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def test_two_open_files_see_each_others_locks(tmp_path: Path) -> None:
    # OFD locks belong to the open file, not the process: two opens conflict.
    path = tmp_path / "f"
    path.write_bytes(b"x")
    a, b, c = _open(path), _open(path), _open(path)
    try:
        assert locks.take(a, locks.INPUT) is None
        assert locks.take(b, locks.INPUT) is None  # readers share
        writer = output_locks(raw=False, replacing=True)
        assert locks.take(c, writer) == 201  # the first byte tested that a reader holds
        assert not locks.held_by_other(a, 101)  # the refused writer left nothing behind
        os.close(a)
        os.close(b)
        a = b = -1
        assert locks.take(c, writer) is None
    finally:
        for fd in (a, b, c):
            if fd >= 0:
                os.close(fd)


def test_locks_stay_with_a_duplicated_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = _open(path)
    assert locks.take(fd, locks.INPUT) is None
    copy = os.dup(fd)  # what SCM_RIGHTS hands the guest: the same open file
    os.close(fd)
    probe = _open(path)
    try:
        assert locks.held_by_other(probe, 201)
        os.close(copy)
        assert not locks.held_by_other(probe, 201)
    finally:
        os.close(probe)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.ENOLCK])
def test_no_ofd_locks_means_going_on_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(locks, "_fcntl", refuse)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = _open(path)
    try:
        assert locks.take(fd, locks.INPUT) is None
    finally:
        os.close(fd)
    # A whole copy too, in-process so that the patch applies.
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(8192))
    out = tmp_path / "out.raw"
    outcome = aiodd_run(["--isolation=inline", f"if={src}", f"of={out}"], out)
    assert (outcome.status, outcome.stderr) == (0, "")
    assert outcome.output == src.read_bytes()


def test_other_lock_errors_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(locks, "_fcntl", broken)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = _open(path)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            locks.take(fd, locks.INPUT)
    finally:
        os.close(fd)


# -- holders: real qemu tools -------------------------------------------------------------


@dataclass
class Holder:
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.proc.communicate(timeout=10)  # qemu-io quits at the end of its input


def lock_bytes_held(path: Path) -> set[int]:
    """Every OFD lock byte anyone holds on ``path`` (from /proc/locks)."""
    st = os.stat(path)
    held: set[int] = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[1] != "OFDLCK":
            continue
        ino = int(fields[5].rsplit(":", 1)[1])
        if ino != st.st_ino:
            continue
        start, end = int(fields[6]), int(fields[7]) if fields[7] != "EOF" else 1 << 62
        held.update(range(start, min(end, 300) + 1))
    return held


@pytest.fixture
def hold() -> Iterator[Callable[..., Holder]]:
    holders: list[Holder] = []

    def start(path: Path, *opts: str, expect: set[int]) -> Holder:
        proc = subprocess.Popen(
            ["qemu-io", *opts, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        holder = Holder(proc)
        holders.append(holder)
        for _ in range(200):  # until qemu-io has the image open
            if lock_bytes_held(path) >= expect:
                return holder
            if proc.poll() is not None:
                raise AssertionError(f"qemu-io exited: {holder.proc.communicate()[1]!r}")
            threading.Event().wait(0.02)
        raise AssertionError(f"qemu-io did not lock {sorted(expect)} of {path}")

    yield start
    for holder in holders:
        holder.stop()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "inuse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, ["write -P 0x5a 0 1M"], "qcow2")
    return path


RW_QCOW2 = {100, 101, 103, 201, 203}  # qemu-io -f qcow2, read-write
RO_QCOW2 = {100, 201, 203}  # qemu-io -r -f qcow2


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
def test_input_held_for_writing_is_refused_and_u_reads_it(
    tmp_path: Path, image: Path, hold: Callable[..., Holder], isolation: str
) -> None:
    hold(image, "-f", "qcow2", expect=RW_QCOW2)
    out = tmp_path / "out.raw"
    args = [f"--isolation={isolation}", f"if={image}", f"of={out}", "bs=1M", "count=1"]
    refused = aiodd_run(args, out)
    assert refused.status == 1
    assert refused.stderr == (
        f"aiodd: {image}: the image is in use: another process has it open for writing"
        " (qemu's image lock); use -U to read it anyway\n"
    )
    assert refused.output is None and leftovers(tmp_path) == []
    # qemu-img dd refuses it too, and reads it with -U.
    theirs = subprocess.run(
        ["qemu-img", "dd", f"if={image}", f"of={tmp_path / 'q.raw'}", "bs=1M", "count=1"],
        capture_output=True,
        text=True,
    )
    assert theirs.returncode == 1 and 'Failed to get shared "write" lock' in theirs.stderr
    forced = aiodd_run(["-U", *args], out)
    assert (forced.status, forced.stderr) == (0, "")
    assert forced.output == b"\x5a" * MiB


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.anyio
async def test_library_names_force_share(
    tmp_path: Path, image: Path, hold: Callable[..., Holder], isolation: aiodd.Isolation
) -> None:
    hold(image, "-f", "qcow2", expect=RW_QCOW2)
    out = tmp_path / "out.raw"
    with pytest.raises(aiodd.InUseError) as info:
        await aiodd.dd(image, out, bs="1M", count=1, isolation=isolation)
    assert str(info.value) == (
        f"{image}: the image is in use: another process has it open for writing"
        " (qemu's image lock); use force_share=True to read it anyway"
    )
    result = await aiodd.dd(image, out, bs="1M", count=1, isolation=isolation, force_share=True)
    assert result.bytes_copied == MiB and out.read_bytes() == b"\x5a" * MiB


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
def test_backing_file_held_for_writing_is_refused(
    tmp_path: Path, image: Path, hold: Callable[..., Holder], isolation: str
) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", image.name, "-F", "qcow2", top)
    hold(image, "-f", "qcow2", expect=RW_QCOW2)
    out = tmp_path / "out.raw"
    outcome = aiodd_run([f"--isolation={isolation}", f"if={top}", f"of={out}"], out)
    assert outcome.status == 1
    assert outcome.stderr == (
        f"aiodd: {top}: backing file 'inuse.qcow2' is in use: another process has it open"
        " for writing (qemu's image lock); use -U to read it anyway\n"
    )


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize("opts", [("-r", "-f", "qcow2"), ("-r", "-U", "-f", "qcow2")])
def test_input_held_read_only_is_read(
    tmp_path: Path, image: Path, hold: Callable[..., Holder], isolation: str, opts: tuple[str]
) -> None:
    hold(image, *opts, expect={100})
    out = tmp_path / "out.raw"
    args = [f"--isolation={isolation}", f"if={image}", f"of={out}", "bs=1M", "count=1"]
    outcome = aiodd_run(args, out)
    assert (outcome.status, outcome.stderr) == (0, "")
    assert outcome.output == b"\x5a" * MiB


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize(
    ("opts", "held", "reason"),
    [
        (("-f", "qcow2"), RW_QCOW2, "has it open for writing"),
        (("-r", "-f", "qcow2"), RO_QCOW2, "is reading it and does not let others write to it"),
        (("-f", "raw"), {100, 101}, "has it open for writing"),
    ],
)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_existing_output_in_use_is_refused(
    tmp_path: Path,
    hold: Callable[..., Holder],
    isolation: str,
    opts: tuple[str],
    held: set[int],
    reason: str,
    fmt: str,
) -> None:
    src = tmp_path / "in.raw"
    src.write_bytes(b"\x11" * MiB)
    out = tmp_path / "inuse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", out, "4M")
    before = digest(out)
    hold(out, *opts, expect=held)
    outcome = aiodd_run([f"--isolation={isolation}", "-O", fmt, f"if={src}", f"of={out}"], out)
    assert outcome.status == 1
    assert outcome.stderr == (
        f"aiodd: of={out}: the file is in use: another process {reason} (qemu's image lock);"
        " stop that process or choose another output\n"
    )
    assert digest(out) == before
    assert leftovers(tmp_path) == []


@needs_qemu
def test_existing_output_read_with_u_is_replaced_as_qemu_replaces_it(
    tmp_path: Path, hold: Callable[..., Holder]
) -> None:
    # A reader that shares everything (qemu-io -r -U) does not stop qemu-img dd either;
    # it keeps reading the file it opened, which the copy only unlinks.
    src = tmp_path / "in.raw"
    src.write_bytes(b"\x11" * MiB)
    out = tmp_path / "inuse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", out, "4M")
    hold(out, "-r", "-U", "-f", "qcow2", expect={100})
    outcome = aiodd_run([f"if={src}", f"of={out}"], out)
    assert (outcome.status, outcome.stderr, outcome.output) == (0, "", b"\x11" * MiB)


# -- aiodd holding: qemu tools refused while it copies --------------------------------------


class Paused:
    """A library copy stopped at its first progress report, in a thread of its own."""

    def __init__(self, src: Path, dst: Path, **kwargs: object) -> None:
        self.started = threading.Event()
        self.proceed = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(src, dst, kwargs))
        self._thread.start()
        if not self.started.wait(60):
            raise AssertionError(f"the copy did not start: {self.error!r}")
        if self.error is not None:
            raise self.error

    def _wait(self, _: object) -> None:
        self.started.set()
        self.proceed.wait(60)

    def _run(self, src: Path, dst: Path, kwargs: dict[str, object]) -> None:
        try:
            anyio.run(lambda: aiodd.dd(src, dst, on_progress=self._wait, **kwargs))  # type: ignore[arg-type]
        except BaseException as exc:
            self.error = exc
            self.started.set()

    def finish(self) -> None:
        self.proceed.set()
        self._thread.join(60)
        if self.error is not None:
            raise self.error


def qemu_io_opens(path: Path, *opts: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", *opts, "-c", "quit", str(path)], capture_output=True, text=True
    )


def fds_on(path: Path) -> list[str]:
    """This process's descriptors on ``path``'s inode."""
    st = os.stat(path)
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fst = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
            found.append(name)
    return found


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_tools_are_refused_while_aiodd_copies(
    tmp_path: Path, image: Path, isolation: str, fmt: str
) -> None:
    base = tmp_path / "base.qcow2"
    shutil.move(image, base)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    out = tmp_path / "out.img"
    qemu_img("create", "-q", "-f", "qcow2", out, "1M")  # an existing output, replaced
    copy = Paused(top, out, bs="1M", isolation=isolation, output_format=fmt)
    try:
        for layer in (top, base):
            assert lock_bytes_held(layer) == RO_QCOW2  # what qemu-img dd holds
            opened = qemu_io_opens(layer, "-f", "qcow2")
            assert opened.returncode == 1
            assert 'Failed to get "write" lock' in opened.stderr
            assert qemu_io_opens(layer, "-r", "-f", "qcow2").returncode == 0
        if isolation == "sandbox":
            # The host keeps one descriptor of each, to read the guest's maps with: a
            # copy of the guest's, on the same open file, whose locks it carries.
            assert len(fds_on(top)) == 1 and len(fds_on(base)) == 1
        # The output, as qemu-img dd -O FMT holds its output: a raw one shares
        # everything, another format lets no reader of its metadata in.
        writer = {100, 101} if fmt == "raw" else RW_QCOW2
        temps = [tmp_path / name for name in leftovers(tmp_path)]
        for held in [out, *temps]:
            assert lock_bytes_held(held) == writer
        # As its format: a raw output shares everything, whatever the file held before.
        info = qemu_img("info", "-f", fmt, out, check=False)
        if fmt == "raw":
            assert info.returncode == 0
        else:
            assert info.returncode == 1
            assert b'Failed to get shared "write" lock' in info.stderr
        assert qemu_img("info", "-U", out, check=False).returncode == 0
        assert qemu_io_opens(out, "-f", "qcow2").returncode == 1  # no writer either
        for temp in temps:  # a named temporary file (an O_TMPFILE one has no name)
            probe = qemu_img("info", "-f", fmt, temp, check=False)
            assert probe.returncode == (0 if fmt == "raw" else 1)
    finally:
        copy.finish()
    for path in (top, base, out):
        assert lock_bytes_held(path) == set()
    assert leftovers(tmp_path) == []
    assert qemu_img("compare", "-F", fmt, top, out, check=False).returncode == 0


@needs_qemu
def test_another_aiodd_is_refused_both_ways(tmp_path: Path, image: Path) -> None:
    out = tmp_path / "out.raw"
    out.write_bytes(b"old")
    copy = Paused(image, out, bs="1M", isolation="inline")
    try:
        # Its output may be neither written nor read by a second copy ...
        again = aiodd_run([f"if={image}", f"of={out}"], out)
        assert again.status == 1
        assert again.stderr == (
            f"aiodd: of={out}: the file is in use: another process has it open for writing"
            " (qemu's image lock); stop that process or choose another output\n"
        )
        other = tmp_path / "other.raw"
        read = aiodd_run([f"if={out}", f"of={other}"], other)
        assert read.stderr == (
            f"aiodd: {out}: the image is in use: another process has it open for writing"
            " (qemu's image lock); use -U to read it anyway\n"
        )
        # ... and its input may be read by another copy, not replaced by one.
        shared = aiodd_run([f"if={image}", f"of={other}", "bs=1M", "count=1"], other)
        assert (shared.status, shared.output) == (0, b"\x5a" * MiB)
        src = tmp_path / "src.raw"
        src.write_bytes(b"x" * 512)
        replace = aiodd_run([f"if={src}", f"of={image}"], image)
        assert replace.stderr == (
            f"aiodd: of={image}: the file is in use: another process is reading it and does"
            " not let others write to it (qemu's image lock); stop that process or choose"
            " another output\n"
        )
    finally:
        copy.finish()
    assert out.read_bytes()[:MiB] == b"\x5a" * MiB


# -- outputs that are files the input reads --------------------------------------------------


@dataclass(frozen=True)
class Chain:
    image: Path  # the input
    target: Path  # a file the input's chain opens
    role: str  # how the message names it


def _qcow2(path: Path, *opts: str) -> Path:
    return create(path, "qcow2", "4M", *opts)  # in its directory, as references are


def chain_backing(d: Path) -> Chain:
    base = _qcow2(d / "base.qcow2")
    qemu_io(base, ["write -P 0x61 0 64k"], "qcow2")
    top = _qcow2(d / "top.qcow2", "backing_file=base.qcow2", "backing_fmt=qcow2")
    return Chain(top, base, f"the backing file 'base.qcow2' of {top}")


def chain_grandparent(d: Path) -> Chain:
    base = _qcow2(d / "base.qcow2")
    _qcow2(d / "mid.qcow2", "backing_file=base.qcow2", "backing_fmt=qcow2")
    top = _qcow2(d / "top.qcow2", "backing_file=mid.qcow2", "backing_fmt=qcow2")
    return Chain(top, base, "the backing file 'base.qcow2' of mid.qcow2")


def chain_data_file(d: Path) -> Chain:
    top = _qcow2(d / "dat.qcow2", "data_file=data.bin")
    return Chain(top, d / "data.bin", f"the data file 'data.bin' of {top}")


def chain_vmdk_flat(d: Path) -> Chain:
    top = create(d / "flat.vmdk", "vmdk", "4M", "subformat=monolithicFlat")
    return Chain(top, d / "flat-flat.vmdk", f"the extent 'flat-flat.vmdk' of {top}")


def chain_vmdk_2gb_sparse(d: Path) -> Chain:
    top = create(d / "sp.vmdk", "vmdk", "3G", "subformat=twoGbMaxExtentSparse")
    return Chain(top, d / "sp-s002.vmdk", f"the extent 'sp-s002.vmdk' of {top}")


def chain_vhdx_parent(d: Path) -> Chain:
    base = vhdx(d / "base.vhdx", "8M", "block_size=1M", ("write -P 0x71 0 1M",))
    child = vhdx(d / "child.vhdx", "8M", "block_size=1M")
    vhdx_differencing(child, [("relative_path", ".\\base.vhdx")])
    return Chain(child, base, f"the parent 'base.vhdx' of {child}")


def chain_vpc_parent(d: Path) -> Chain:
    base = vpc_dynamic(d / "base.vhd", "2M", ("write -P 0x81 0 1M",))
    child = vpc_dynamic(d / "child.vhd", "2M")
    vpc_differencing(child, [(b"W2ru", ".\\base.vhd".encode("utf-16-le"))])
    return Chain(child, base, f"the parent 'base.vhd' of {child}")


CHAINS = {
    "backing": chain_backing,
    "grandparent": chain_grandparent,
    "data_file": chain_data_file,
    "vmdk_flat_extent": chain_vmdk_flat,
    "vmdk_2gb_sparse_extent": chain_vmdk_2gb_sparse,
    "vhdx_parent": chain_vhdx_parent,
    "vpc_parent": chain_vpc_parent,
}


def refusal(of: str | Path, role: str) -> str:
    return f"aiodd: of={of} is {role} (the input reads it); choose another output\n"


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize("case", sorted(CHAINS))
def test_output_may_not_be_a_file_of_the_chain(tmp_path: Path, isolation: str, case: str) -> None:
    chain = CHAINS[case](tmp_path)
    before = digest(chain.target)
    # Read first: the chain itself opens (so the refusal below is about the output).
    fine = tmp_path / "fine.raw"
    ok = aiodd_run([f"--isolation={isolation}", f"if={chain.image}", f"of={fine}"], fine)
    assert (ok.status, ok.stderr) == (0, "")
    for fmt in ("raw", "qcow2"):
        args = [f"--isolation={isolation}", "-O", fmt, f"if={chain.image}", f"of={chain.target}"]
        outcome = aiodd_run(args, chain.target)
        assert (outcome.status, outcome.stderr) == (1, refusal(chain.target, chain.role))
    assert digest(chain.target) == before
    assert leftovers(tmp_path) == []


def _spellings(tmp_path: Path, target: Path) -> Iterator[tuple[str, str]]:
    """Other names of ``target``: (id, the spelling of=)."""
    link = tmp_path / "link.qcow2"
    link.symlink_to(target.name)
    yield "symlink", str(link)
    hard = tmp_path / "hard.qcow2"
    os.link(target, hard)
    yield "hard link", str(hard)
    sub = tmp_path / "sub"
    sub.mkdir()
    yield "dot-dot", f"{sub}/../{target.name}"
    yield "relative", os.path.relpath(target)


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
def test_every_spelling_of_the_backing_file_is_refused(tmp_path: Path, isolation: str) -> None:
    chain = chain_backing(tmp_path)
    before = digest(chain.target)
    for _, spelled in _spellings(tmp_path, chain.target):
        args = [f"--isolation={isolation}", f"if={chain.image}", f"of={spelled}"]
        outcome = aiodd_run(args, chain.target)
        assert (outcome.status, outcome.stderr) == (1, refusal(spelled, chain.role))
    assert digest(chain.target) == before
    assert leftovers(tmp_path) == []


@pytest.fixture
def bind_alias(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/alias``: the same directory as ``tmp_path/real``, by a bind mount."""
    real, alias = tmp_path / "real", tmp_path / "alias"
    real.mkdir()
    alias.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(real), str(alias)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"no bind mount here: {mounted.stderr.decode().strip() or 'not root'}")
    try:
        yield alias
    finally:
        subprocess.run(["umount", str(alias)], check=True)


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
def test_a_bind_mount_alias_of_the_backing_file_is_refused(
    tmp_path: Path, bind_alias: Path, isolation: str
) -> None:
    chain = chain_backing(tmp_path / "real")
    before = digest(chain.target)
    spelled = bind_alias / chain.target.name
    assert str(spelled) != str(chain.target) and os.path.realpath(spelled) == str(spelled)
    args = [f"--isolation={isolation}", f"if={chain.image}", f"of={spelled}"]
    outcome = aiodd_run(args, spelled)
    assert (outcome.status, outcome.stderr) == (1, refusal(spelled, chain.role))
    assert digest(chain.target) == before


@pytest.mark.parametrize("isolation", MODES)
def test_the_input_itself_is_refused(tmp_path: Path, isolation: str) -> None:
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(4096))
    before = digest(src)
    link = tmp_path / "alias.raw"
    link.symlink_to(src)
    for spelled in (src, link):
        args = [f"--isolation={isolation}", f"if={src}", f"of={spelled}"]
        outcome = aiodd_run(args, src)
        assert outcome.status == 1
        assert outcome.stderr == (
            f"aiodd: of={spelled} and if={src} name the same file; choose another output\n"
        )
    assert digest(src) == before


def test_references_after_the_chain_is_open_are_refused(tmp_path: Path) -> None:
    from aiodd.formats.base import Reference
    from aiodd.policy import Policy

    (tmp_path / "a").write_bytes(b"a")
    policy = Policy()
    fd = os.open(tmp_path / "a", os.O_RDONLY)
    try:
        layer = policy.top(str(tmp_path / "a"), fd)
        policy.seal()
        with pytest.raises(aiodd.PolicyError, match="asked for it after the chain was opened"):
            policy.open_reference(layer, Reference("extent", "a", "a"), disk=False)
    finally:
        os.close(fd)
    assert [f.kind for f in policy.opened] == ["image"]


# -- block devices -----------------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A loop device over ``tmp_path/disk.raw`` (8 MiB of a pattern): (device, file)."""
    backing = tmp_path / "disk.raw"
    backing.write_bytes(bytes(range(256)) * (8 * MiB // 256))
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device here: {made.stderr.strip() or 'not root'}")
    device = Path(made.stdout.strip())
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=True)


@contextlib.contextmanager
def _mounted(device: Path, mnt: Path) -> Iterator[Path]:
    """A fresh ext2 filesystem on ``device``, mounted at ``mnt`` for the block."""
    if shutil.which("mke2fs") is None:
        pytest.skip("mke2fs is not installed")
    subprocess.run(["mke2fs", "-q", "-F", str(device)], check=True, capture_output=True)
    mnt.mkdir()
    mounted = subprocess.run(["mount", str(device), str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("isolation", MODES)
def test_a_loop_device_and_its_file_are_one_output(
    tmp_path: Path, loop_device: tuple[Path, Path], isolation: str
) -> None:
    device, backing = loop_device
    before = digest(backing)
    src = tmp_path / "small.raw"
    src.write_bytes(b"\xee" * 4096)
    # The input is the file behind the device ...
    args = [f"--isolation={isolation}", f"if={backing}", f"of={device}", "count=1"]
    outcome = aiodd_run(args, backing)
    assert (outcome.status, outcome.stderr) == (
        1,
        f"aiodd: of={device} is a loop device over the input image {backing} (the input"
        " reads it); choose another output\n",
    )
    # ... or the device is the input, and the output the file behind it.
    args = [f"--isolation={isolation}", f"if={device}", f"of={backing}", "count=1"]
    outcome = aiodd_run(args, backing)
    assert (outcome.status, outcome.stderr) == (
        1,
        f"aiodd: of={backing} is the file behind the loop device if={device};"
        " choose another output\n",
    )
    # The device itself, by another name.
    alias = tmp_path / "alias"
    alias.symlink_to(device)
    args = [f"--isolation={isolation}", f"if={device}", f"of={alias}", "count=1"]
    outcome = aiodd_run(args, backing)
    assert (outcome.status, outcome.stderr) == (
        1,
        f"aiodd: of={alias} and if={device} name the same file; choose another output\n",
    )
    assert digest(backing) == before


@needs_qemu
def test_a_block_device_output_is_locked_while_written(
    tmp_path: Path, loop_device: tuple[Path, Path], hold: Callable[..., Holder]
) -> None:
    device, backing = loop_device
    src = tmp_path / "small.raw"
    src.write_bytes(b"\xee" * MiB)
    holder = hold(device, "-f", "raw", expect={100, 101})
    refused = aiodd_run([f"if={src}", f"of={device}"], backing)
    assert refused.stderr == (
        f"aiodd: of={device}: the file is in use: another process has it open for writing"
        " (qemu's image lock); stop that process or choose another output\n"
    )
    holder.stop()
    copy = Paused(src, device, bs="64K", isolation="inline")
    try:
        assert lock_bytes_held(device) == {100, 101}  # as qemu-img dd -O raw holds it
        again = aiodd_run([f"if={src}", f"of={device}"], backing)
        assert again.status == 1 and "the file is in use" in again.stderr
    finally:
        copy.finish()
    assert lock_bytes_held(device) == set()
    assert backing.read_bytes()[:MiB] == b"\xee" * MiB


def test_the_device_under_the_input_is_refused(
    tmp_path: Path, loop_device: tuple[Path, Path]
) -> None:
    device, _ = loop_device
    with _mounted(device, tmp_path / "mnt") as mnt:
        src = mnt / "in.raw"
        src.write_bytes(b"\x42" * 4096)
        outcome = aiodd_run([f"if={src}", f"of={device}"], src)
        assert (outcome.status, outcome.stderr) == (
            1,
            f"aiodd: of={device} is the device that holds the input image {src} (the input"
            " reads it); choose another output\n",
        )
        assert src.read_bytes() == b"\x42" * 4096


@pytest.fixture
def partitioned_loop(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A loop device over a 16 MiB disk with one MBR partition from 1 MiB to the end:
    (disk device, partition device, the file behind them)."""
    backing = tmp_path / "parted.raw"
    mbr = bytearray(512)
    # One primary Linux partition: LBA 2048 for the remaining sectors.
    mbr[446:462] = (
        bytes([0, 0, 0, 0, 0x83, 0, 0, 0])
        + (2048).to_bytes(4, "little")
        + ((16 * MiB // 512) - 2048).to_bytes(4, "little")
    )
    mbr[510:512] = b"\x55\xaa"
    with backing.open("wb") as f:
        f.write(mbr)
        f.truncate(16 * MiB)
    made = subprocess.run(
        ["losetup", "-f", "-P", "--show", str(backing)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"no loop device here: {made.stderr.strip() or 'not root'}")
    disk = Path(made.stdout.strip())
    try:
        # The kernel lists the partition in sysfs; without udev nobody makes its node.
        sysfs = Path("/sys/class/block") / f"{disk.name}p1" / "dev"
        if not sysfs.exists() and shutil.which("partx"):
            # Some kernels scan no partitions at attach time: ask for them.
            subprocess.run(["partx", "-a", str(disk)], capture_output=True)
        for _ in range(200):
            if sysfs.exists():
                break
            threading.Event().wait(0.01)
        else:
            pytest.skip(f"{disk} shows no partition (no partition scanning here)")
        part = Path(f"{disk}p1")
        if not part.exists():
            major, minor = (int(n) for n in sysfs.read_text().split(":"))
            part = tmp_path / f"{disk.name}p1"
            os.mknod(part, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        yield disk, part, backing
    finally:
        subprocess.run(["losetup", "-d", str(disk)], check=True)


@pytest.mark.parametrize("isolation", MODES)
def test_a_disk_and_its_partition_are_one_output(
    partitioned_loop: tuple[Path, Path, Path], isolation: str
) -> None:
    disk, part, backing = partitioned_loop
    before = digest(backing)
    for src, dst in ((disk, part), (part, disk)):
        args = [f"--isolation={isolation}", f"if={src}", f"of={dst}", "count=1"]
        outcome = aiodd_run(args, backing)
        assert (outcome.status, outcome.stderr) == (
            1,
            f"aiodd: of={dst} shares its storage with the device if={src} (a partition,"
            " its disk, or a device stacked on it); choose another output\n",
        )
    assert digest(backing) == before


def test_a_device_with_a_mounted_partition_is_refused(
    tmp_path: Path, partitioned_loop: tuple[Path, Path, Path]
) -> None:
    disk, part, backing = partitioned_loop
    with _mounted(part, tmp_path / "mnt") as mnt:
        src = tmp_path / "other.raw"  # an input that has nothing to do with the device
        src.write_bytes(b"\x42" * 4096)
        before = digest(backing)
        outcome = aiodd_run([f"if={src}", f"of={disk}"], src)
        assert (outcome.status, outcome.stderr) == (
            1,
            f"aiodd: of={disk}: the device is in use (mounted, or held by another device"
            " or process); choose another output\n",
        )
        assert digest(backing) == before
        # The input on the mounted partition, the output its disk: refused before opening.
        inside = mnt / "in.raw"
        inside.write_bytes(b"\x42" * 4096)
        outcome = aiodd_run([f"if={inside}", f"of={disk}"], src)
        assert (outcome.status, outcome.stderr) == (
            1,
            f"aiodd: of={disk} is the device that holds the input image {inside} (the input"
            " reads it); choose another output\n",
        )
