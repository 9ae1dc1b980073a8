"""An input named as raw (``-f raw``) is read by the host while its guest opens it
(aiodd/guest/raw_beside.py): the same bytes, the same isolation report, the guest's
error before any other, and no output until the guest has opened the image."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import aiodd
from aiodd import api, locks
from aiodd.errors import ImageError, IsolationError
from aiodd.guest.disk import GuestDisk
from aiodd.guest.options import KVM_DEVICE_VARIABLE
from aiodd.guest.raw_beside import RawBesideGuest
from aiodd.progress import Progress
from tests.conftest import KVM_AVAILABLE
from tests.harness import aiodd_run, leftovers

MISSING_DEVICE = "/nonexistent/kvm"
MODES = ["sandbox", *(["kvm"] if KVM_AVAILABLE else [])]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.raw"
    path.write_bytes(os.urandom((1 << 20) + 1000))
    return path


def _copy(
    src: Path,
    dst: Path,
    isolation: str,
    input_format: str | None = "raw",
    stopped: Callable[[], bool] = lambda: False,
    **kw: Any,
) -> api.DdResult | None:
    return api.plain_copy(
        str(src), str(dst), bs=512, count=None, skip=0, input_format=input_format,
        output_format="raw", isolation=isolation, allow_backing=(),  # type: ignore[arg-type]
        require_isolation=False, force_share=False, cache="none", stopped=stopped, **kw,
    )  # fmt: skip


def _guests(monkeypatch: pytest.MonkeyPatch) -> list[GuestDisk]:
    """Every GuestDisk made from now on."""
    made: list[GuestDisk] = []
    init = GuestDisk.__init__

    def record(self: GuestDisk, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(GuestDisk, "__init__", record)
    return made


def _host_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every read the host makes of an input beside its guest, from now on."""
    reads: list[int] = []
    read_into = RawBesideGuest.read_into

    def counted(self: RawBesideGuest, offset: int, buf: memoryview) -> None:
        reads.append(len(buf))
        read_into(self, offset, buf)

    monkeypatch.setattr(RawBesideGuest, "read_into", counted)
    return reads


@pytest.mark.parametrize("isolation", MODES)
def test_the_host_reads_and_the_guest_opens(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str
) -> None:
    reads = _host_reads(monkeypatch)
    guests = _guests(monkeypatch)
    result = _copy(image, tmp_path / "beside.raw", isolation)
    told = (result.isolation, result.isolation_reason) if result else None
    assert told == (isolation, "requested")
    data = image.read_bytes()
    assert (tmp_path / "beside.raw").read_bytes() == data + bytes(-len(data) % 512)
    assert sum(reads) == result.output_size if result else False  # all of it read here
    assert len(guests) == 1 and guests[0].format_name == "raw"  # and opened there
    # Detected: decoded in the guest, as before.
    reads.clear()
    detected = _copy(image, tmp_path / "detected.raw", isolation, input_format=None)
    assert detected is not None and (detected.isolation, reads) == (isolation, [])
    # With progress: read here too, and the first event already says where it is decoded.
    events: list[Progress] = []
    assert _copy(image, tmp_path / "p.raw", isolation, on_progress=events.append) is not None
    assert sum(reads) == result.output_size if result else False
    assert (tmp_path / "p.raw").read_bytes() == (tmp_path / "beside.raw").read_bytes()
    assert events[0].bytes_done == 0
    assert {(e.isolation, e.isolation_reason) for e in events} == {(isolation, "requested")}
    assert all(g.channel._process.proc.poll() is not None for g in guests)  # type: ignore[attr-defined]


def test_the_guests_error_comes_first(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVM asked for where it cannot run: the same refusal as a detected input's, also
    where the output would have failed on its own, and nothing left behind."""
    monkeypatch.setenv(KVM_DEVICE_VARIABLE, MISSING_DEVICE)
    out, unreachable = tmp_path / "o.raw", tmp_path / "missing" / "o.raw"
    refusal = (
        f"aiodd: {image}: the KVM guest reader cannot run here: cannot open {MISSING_DEVICE}"
        " read-write: No such file or directory; this host offers no KVM (a container needs"
        " the device passed in, a VM nested virtualisation), choose the auto or sandbox"
        " isolation\n"
    )
    cases = [([], out), (["-f", "raw"], out), (["-f", "raw", "-t", "unsafe"], out),
             (["-f", "raw", "--progress=json"], out),
             (["-f", "raw"], unreachable), (["-f", "raw", "bs=1M"], unreachable)]  # fmt: skip
    for extra, dst in cases:
        run = aiodd_run(["--isolation=kvm", *extra, f"if={image}", f"of={dst}"], dst)
        assert (run.status, run.output, run.stderr) == (1, None, refusal), extra
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [("format", IsolationError, "the guest reader broke the protocol"),
     ("size", ImageError, "changed size while it was being opened")],
)  # fmt: skip
def test_a_guest_that_opens_something_else_is_refused(
    image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
    error: type[Exception],
    message: str,
) -> None:
    start = GuestDisk.start

    def other(self: GuestDisk, *args: Any, **kwargs: Any) -> None:
        start(self, *args, **kwargs)
        if change == "format":
            self.format_name = "qcow2"
        else:
            self.virtual_size += 512

    monkeypatch.setattr(GuestDisk, "start", other)
    with pytest.raises(error, match=rf"in\.raw: {message}$"):
        _copy(image, tmp_path / "o.raw", "sandbox")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw"]


@pytest.mark.parametrize("when", [1, 2])
def test_stopped_beside_a_starting_guest(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: int
) -> None:
    """A signal while the guest still starts: nothing published, the guest gone."""
    guests = _guests(monkeypatch)
    asked = 0

    def stopped() -> bool:
        nonlocal asked
        asked += 1
        return asked >= when

    assert _copy(image, tmp_path / "o.raw", "sandbox", stopped=stopped) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw"]
    assert len(guests) == 1 and guests[0].channel._process.proc.poll() is not None  # type: ignore[attr-defined]


def test_the_input_stays_locked_once_its_guest_has_gone(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest exits as soon as it has opened the image; qemu's reader locks stay,
    held by this process's descriptor of the same open file, until the copy ends."""
    guests = _guests(monkeypatch)
    seen: list[tuple[bool, bool]] = []

    def stopped() -> bool:
        if guests and not seen:
            proc = guests[0].channel._process.proc  # type: ignore[attr-defined]
            with contextlib.suppress(TimeoutError):
                proc.wait(10)
            probe = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                seen.append((proc.poll() is not None, locks.held_by_other(probe, 100)))
            finally:
                os.close(probe)
        return False

    assert _copy(image, tmp_path / "o.raw", "sandbox", stopped=stopped) is not None
    assert seen == [(True, True)]
    probe = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert not locks.held_by_other(probe, 100)  # and released at the end
    finally:
        os.close(probe)


# The library: the same, under an event loop.


@pytest.mark.anyio
@pytest.mark.parametrize("isolation", MODES)
async def test_the_library_reads_here_too(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str
) -> None:
    reads = _host_reads(monkeypatch)
    guests = _guests(monkeypatch)
    events: list[Progress] = []
    plain = await aiodd.dd(image, tmp_path / "plain.raw", input_format="raw", isolation=isolation)  # type: ignore[arg-type]
    told = await aiodd.dd(
        image, tmp_path / "told.raw", input_format="raw", isolation=isolation,  # type: ignore[arg-type]
        on_progress=events.append, progress_interval=0,
    )  # fmt: skip
    data = image.read_bytes()
    for result, name in ((plain, "plain.raw"), (told, "told.raw")):
        assert (result.isolation, result.isolation_reason) == (isolation, "requested")
        assert (tmp_path / name).read_bytes() == data + bytes(-len(data) % 512)
    assert sum(reads) == 2 * plain.output_size  # all of it read here, both times
    assert [g.format_name for g in guests] == ["raw", "raw"]  # and opened there
    assert events[0].bytes_done == 0
    assert {(e.isolation, e.isolation_reason) for e in events} == {(isolation, "requested")}


@pytest.mark.anyio
async def test_the_librarys_sparse_copy_is_told_the_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw file's holes, reported by the host's read, are not looked at for zeros."""
    holey = tmp_path / "holey.raw"
    with open(holey, "wb") as f:
        f.write(b"x" * 4096)
        f.truncate(8 << 20)
    told: list[list[tuple[int, int]]] = []
    read_into_holes = RawBesideGuest.read_into_holes

    def counted(self: RawBesideGuest, offset: int, buf: memoryview) -> list[tuple[int, int]]:
        told.append(read_into_holes(self, offset, buf))
        return told[-1]

    monkeypatch.setattr(RawBesideGuest, "read_into_holes", counted)
    out = tmp_path / "o.raw"
    result = await aiodd.dd(holey, out, input_format="raw", isolation="sandbox", sparse=True)
    assert result.isolation == "sandbox"
    got, data = out.read_bytes(), holey.read_bytes()
    # Failed once, under load, with zeros from byte 0, and never since: say what the
    # reads reported, should it fail again.
    if got != data:
        pairs = enumerate(zip(got, data, strict=False))
        differs = next((i for i, (a, b) in pairs if a != b), min(len(got), len(data)))
        pytest.fail(f"the copy differs from byte {differs}; the holes reported: {told}")
    assert told  # read here
    if any(told):  # where the filesystem reports holes (tmpfs and ext4 do)
        assert os.stat(out).st_blocks * 512 < 1 << 20


@pytest.mark.anyio
async def test_the_librarys_guest_error_comes_first(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KVM asked for where it cannot run, and an output that cannot be made: the guest's
    refusal is the error, as where the input is not named raw, and nothing is left."""
    monkeypatch.setenv(KVM_DEVICE_VARIABLE, MISSING_DEVICE)
    for dst in (tmp_path / "o.raw", tmp_path / "missing" / "o.raw"):
        for progress in (None, lambda p: None):
            with pytest.raises(IsolationError, match="the KVM guest reader cannot run here"):
                await aiodd.dd(
                    image, dst, input_format="raw", isolation="kvm", on_progress=progress
                )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw"]
    assert leftovers(tmp_path) == []
