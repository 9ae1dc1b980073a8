"""The file sink: atomic replacement, clean-up on failure, block devices written in place."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiodd.api import DdResult
from aiodd.buffers import Bytes
from aiodd.errors import OutputError, UsageError
from aiodd.stages import sink
from aiodd.stages.sink import OutputFile
from tests.harness import aiodd_run, aiodd_subprocess

MiB = 1024 * 1024


def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".aiodd-tmp")]


def _names(directory: Path) -> set[str]:
    """Every entry, hidden ones included."""
    return {p.name for p in directory.iterdir()}


@pytest.fixture
def named_temp(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without O_TMPFILE: the sink falls back to a named temporary file."""
    monkeypatch.setattr(sink, "_open_unnamed", lambda directory: None)


def test_the_output_has_no_name_until_commit(tmp_path: Path) -> None:
    target = tmp_path / "out.raw"
    target.write_bytes(b"old")
    out = OutputFile.create(str(target), 4096, raw=True)
    assert out.unnamed and out.temp_path is None
    out.write([(0, b"x" * 4096)])
    assert target.read_bytes() == b"old"  # nothing visible before the commit
    assert _names(tmp_path) == {"out.raw"}
    out.commit(4096)
    out.abort()  # after a commit, abort has nothing left to undo
    assert target.read_bytes() == b"x" * 4096
    assert _names(tmp_path) == {"out.raw"}

    out = OutputFile.create(str(target), 4096, raw=True)
    out.write([(0, b"y" * 4096)])
    out.abort()
    assert target.read_bytes() == b"x" * 4096
    assert _names(tmp_path) == {"out.raw"}


def test_a_new_output_is_linked_straight_to_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    links: list[str] = []
    real_link = os.link

    def link(src: str, dst: str, **kwargs: bool) -> None:
        links.append(os.path.basename(dst))
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link)
    target = tmp_path / "new.raw"
    out = OutputFile.create(str(target), 512, raw=True)
    out.write([(0, b"n" * 512)])
    out.commit(512)
    assert links == ["new.raw"]
    assert target.read_bytes() == b"n" * 512
    assert _names(tmp_path) == {"new.raw"}


def test_an_output_that_appears_meanwhile_is_replaced(tmp_path: Path) -> None:
    """of= did not exist when the copy began: linking to it fails, a rename replaces it."""
    target = tmp_path / "out.raw"
    out = OutputFile.create(str(target), 512, raw=True)
    out.write([(0, b"n" * 512)])
    target.write_bytes(b"someone else's")
    out.commit(512)
    assert target.read_bytes() == b"n" * 512
    assert _names(tmp_path) == {"out.raw"}


@pytest.mark.usefixtures("named_temp")
def test_without_o_tmpfile_a_hidden_named_file_is_renamed(tmp_path: Path) -> None:
    target = tmp_path / "out.raw"
    target.write_bytes(b"old")
    out = OutputFile.create(str(target), 4096, raw=True)
    assert not out.unnamed
    out.write([(0, b"x" * 4096)])
    assert target.read_bytes() == b"old"
    (temp,) = _temp_files(tmp_path)
    assert temp.startswith(".out.raw.") and len(temp) == len(".out.raw.12345678.aiodd-tmp")
    out.commit(4096)
    assert target.read_bytes() == b"x" * 4096
    assert _names(tmp_path) == {"out.raw"}

    out = OutputFile.create(str(target), 4096, raw=True)
    out.write([(0, b"y" * 4096)])
    out.abort()
    assert target.read_bytes() == b"x" * 4096
    assert _names(tmp_path) == {"out.raw"}


def test_commit_pads_to_the_planned_size(tmp_path: Path) -> None:
    target = tmp_path / "out.raw"
    out = OutputFile.create(str(target), 1024, raw=True)
    out.write([(0, b"a" * 700)])
    out.commit(1024)
    assert target.read_bytes() == b"a" * 700 + b"\0" * 324


def test_writes_through_a_symlink_to_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real.raw"
    real.write_bytes(b"old")
    link = tmp_path / "link.raw"
    link.symlink_to(real)
    out = OutputFile.create(str(link), 512, raw=True)
    out.write([(0, b"n" * 512)])
    out.commit(512)
    assert link.is_symlink() and real.read_bytes() == b"n" * 512


def test_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(OutputError) as caught:
        OutputFile.create(str(tmp_path), 512, raw=True)
    assert str(caught.value) == f"{tmp_path}: cannot create output: Is a directory"


def test_refuses_streams_and_special_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (str(fifo), "/dev/null"):
        with pytest.raises(OutputError) as caught:
            OutputFile.create(target, 512, raw=True)
        assert str(caught.value) == (
            f"of={target}: aiodd writes image files and block devices, not streams"
        )
    assert _names(tmp_path) == {"fifo"}


def test_stdout_into_a_pipe_is_refused_as_a_stream(tmp_path: Path) -> None:
    """/dev/stdout is a symlink to /proc/self/fd/1, whose target is no path ('pipe:[…]')."""
    src = tmp_path / "in.raw"
    src.write_bytes(bytes(4096))
    proc = subprocess.run(
        [sys.executable, "-m", "aiodd", f"if={src}", "of=/dev/stdout"],
        capture_output=True,
        text=True,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        1,
        "",
        "aiodd: of=/dev/stdout: aiodd writes image files and block devices, not streams\n",
    )


def test_a_failure_mid_copy_leaves_the_old_output(tmp_path: Path) -> None:
    """A qcow2 whose second L2 table lies past the end of the file fails half-way."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img not installed (apt-get install qemu-utils)")
    image = tmp_path / "broken.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "2G"], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 1G 1M", str(image)],
        check=True,
        capture_output=True,
    )
    raw = bytearray(image.read_bytes())
    l1_offset = int.from_bytes(raw[40:48], "big")
    # L1 entry 2 covers 1 GiB..1.5 GiB with 64 KiB clusters: point it far past the end.
    entry = l1_offset + 2 * 8
    raw[entry : entry + 8] = ((1 << 63) | (1 << 40)).to_bytes(8, "big")
    image.write_bytes(raw)
    out = tmp_path / "out.raw"
    out.write_bytes(b"previous")
    for mode in ("sandbox", "inline"):
        result = aiodd_subprocess([f"--isolation={mode}", f"if={image}", f"of={out}", "bs=1M"], out)
        assert result.status == 1
        assert "L2 table" in result.stderr and "past the end" in result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert out.read_bytes() == b"previous"
        assert _temp_files(tmp_path) == []


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xee" * (4 * MiB))
    losetup = shutil.which("losetup")
    if losetup is None or os.geteuid() != 0:
        pytest.skip("needs root and losetup to make a block device")
    made = subprocess.run(
        [losetup, "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        with contextlib.suppress(OSError):
            subprocess.run([losetup, "-d", str(device)], check=False)


def test_block_device_is_written_in_place(loop_device: Path, tmp_path: Path) -> None:
    data = os.urandom(MiB + 1000)
    src = tmp_path / "in.raw"
    src.write_bytes(data)
    result = aiodd_subprocess([f"if={src}", f"of={loop_device}", "bs=4096"], tmp_path / "none")
    assert result.status == 0, result.stderr
    with loop_device.open("rb") as dev:
        written = dev.read(4 * MiB)
    padded = data + b"\0" * (-len(data) % 512)
    assert written[: len(padded)] == padded  # the window, zero-padded to 512
    assert written[len(padded) :] == b"\xee" * (4 * MiB - len(padded))  # the rest untouched
    assert loop_device.is_block_device()


def test_a_signal_on_a_block_device_says_it_was_partly_written(
    loop_device: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(2 * MiB))
    real_write = OutputFile.write

    def write(self: OutputFile, writes: list[tuple[int, Bytes]]) -> None:
        real_write(self, writes)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)

    monkeypatch.setattr(OutputFile, "write", write)
    result = aiodd_run(["--isolation=inline", f"if={src}", f"of={loop_device}"], tmp_path / "x")
    assert (result.status, result.stderr) == (
        143,
        f"aiodd: interrupted by SIGTERM; {loop_device} was partly written"
        " (a block device is written in place)\n",
    )
    assert loop_device.is_block_device()


def test_block_device_refuses_containers_and_small_devices(
    loop_device: Path, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="only raw output"):
        OutputFile.create(str(loop_device), 512, raw=False)
    with pytest.raises(OutputError, match="the device holds 4194304 bytes"):
        OutputFile.create(str(loop_device), 8 * MiB, raw=True)


def test_the_first_corruption_in_disk_order_is_reported(tmp_path: Path) -> None:
    """Two readers race; the error is still the one a sequential read meets first.

    The first 4 MiB chunk fails at its last cluster (slow), the second at its first
    (fast): before the reader ordered its failures, the second one's often won.
    """
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img not installed (apt-get install qemu-utils)")
    image = tmp_path / "cut.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    writes = ["write -P 1 0 4032k", "write -P 2 4M 4M", "write -P 3 4032k 64k"]
    subprocess.run(
        ["qemu-io", *(a for w in writes for a in ("-c", w)), str(image)],
        check=True,
        capture_output=True,
    )
    os.truncate(image, 0x440000)  # the file ends where the second chunk's data began
    messages = set()
    for mode in ("sandbox", "inline") * 3:
        out = tmp_path / "out.raw"
        result = aiodd_subprocess([f"--isolation={mode}", f"if={image}", f"of={out}"], out)
        assert result.status == 1 and result.output is None
        messages.add(result.stderr)
    assert messages == {
        f"aiodd: {image}: qcow2 data cluster at 0x840000 lies past the end of the file\n"
    }


# -- replacing a file: owner, group, mode, hard links ----------------------------------


def _copy(src: Path, dst: str) -> DdResult:
    import anyio

    from aiodd.api import dd

    return anyio.run(lambda: dd(str(src), dst, isolation="inline"))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(64 * 1024))
    return src


def test_overwriting_keeps_owner_group_and_mode(tmp_path: Path, source: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file another owner")
    target = tmp_path / "out.raw"
    target.write_bytes(b"old")
    os.chown(target, 1234, 5678)
    target.chmod(0o6751)  # set-user-ID and set-group-ID too, which a chown clears
    result = _copy(source, str(target))
    st = target.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o6751)
    assert target.read_bytes() == source.read_bytes()
    assert result.warnings == ()


def test_a_new_output_belongs_to_whoever_wrote_it(tmp_path: Path, source: Path) -> None:
    target = tmp_path / "new.raw"
    old_umask = os.umask(0o022)
    try:
        _copy(source, str(target))
    finally:
        os.umask(old_umask)
    st = target.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), os.getegid(), 0o644)


def test_an_owner_that_cannot_be_kept_is_a_warning(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an unprivileged user overwriting someone else's writable file sees."""
    target = tmp_path / "out.raw"
    target.write_bytes(b"old")
    target.chmod(0o640)
    old = target.stat()
    new_owner = (old.st_uid + 1, old.st_gid + 1)
    real_stat = os.stat

    def stat_(path: str, *args: object, **kwargs: object) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)  # type: ignore[arg-type]
        if path == str(target):  # the file to replace seems to be someone else's
            fields = list(st)
            fields[4:6] = new_owner
            return os.stat_result(fields)
        return st

    def fchown(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "stat", stat_)
    monkeypatch.setattr(os, "fchown", fchown)
    result = _copy(source, str(target))
    assert result.warnings == (
        f"warning: of={target}: could not keep the owner (uid {new_owner[0]}, gid {new_owner[1]}):"
        f" Operation not permitted; the new file belongs to uid {old.st_uid},"
        f" gid {old.st_gid}",
    )
    assert stat.S_IMODE(real_stat(target).st_mode) == 0o640  # the mode is kept all the same
    assert target.read_bytes() == source.read_bytes()


def test_other_hard_links_keep_the_old_data(tmp_path: Path, source: Path) -> None:
    target = tmp_path / "out.raw"
    target.write_bytes(b"old")
    os.link(target, tmp_path / "second")
    os.link(target, tmp_path / "third")
    result = _copy(source, str(target))
    assert result.warnings == (
        f"warning: of={target}: 2 other hard links keep the old data"
        " (the output replaces the file with a new one)",
    )
    assert target.read_bytes() == source.read_bytes()
    assert (tmp_path / "second").read_bytes() == b"old"
    assert target.stat().st_nlink == 1


def test_the_cli_prints_the_warnings_after_the_copy(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("out.raw").write_bytes(b"old")
    os.link("out.raw", "other")
    result = aiodd_run(["--isolation=inline", f"if={source}", "of=out.raw"], Path("out.raw"))
    assert (result.status, result.stderr) == (
        0,
        "aiodd: warning: of=out.raw: 1 other hard link keeps the old data"
        " (the output replaces the file with a new one)\n",
    )


# -- messages name of= as the user typed it ----------------------------------------------


def test_write_errors_name_of_as_typed(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    monkeypatch.chdir(tmp_path)
    Path("link").symlink_to("real")

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    result = aiodd_run(["--isolation=inline", f"if={source}", "of=link/out.raw"], real / "out.raw")
    assert (result.status, result.stderr, result.output) == (
        1,
        "aiodd: link/out.raw: write failed: No space left on device\n",
        None,
    )
    assert _names(real) == set()


def test_finishing_errors_name_of_as_typed(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    result = aiodd_run(["--isolation=inline", f"if={source}", "of=out.raw"], Path("out.raw"))
    assert (result.status, result.stderr, result.output) == (
        1,
        "aiodd: out.raw: cannot finish output: Input/output error\n",
        None,
    )
    assert _names(tmp_path) == {"in.raw"}
