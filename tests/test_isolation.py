"""The isolation modes (docs/usage.md#isolation-modes): ``auto`` (the default), ``kvm``,
``sandbox``, ``inline``; which one ran and why, on the command line, in the library, in
the JSON progress and in ``--version --verbose``; auto's choice; kvm's refusals; and
the KVM guest reader's process, sealed (docs/security.md#the-kvm-guest-reader).

A host without KVM is simulated by pointing the guest at a KVM device that does not exist
(``AIODD_KVM_DEVICE``, read by the host's guest options)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

import aiodd
from aiodd import options
from aiodd.chain import open_input
from aiodd.cli import main
from aiodd.errors import IsolationError
from aiodd.formats import INPUT_FORMATS
from aiodd.guest import isolation_report, shared_buffer
from aiodd.guest.disk import GuestDisk
from aiodd.guest.host import open_guest
from aiodd.guest.kvm.build import build
from aiodd.guest.kvm.reader import GUEST_FORMATS
from aiodd.guest.options import KVM_DEVICE_VARIABLE, GuestOptions
from aiodd.policy import Policy
from tests import hostile
from tests.conftest import (
    KVM_AVAILABLE,
    KVM_FORMATS,
    KVM_WHY,
    QEMU_IMG,
    needs_kvm,
    needs_qemu,
    qemu_img,
)
from tests.guest_attempts import ENTRY, attempt
from tests.harness import aiodd_run, leftovers, qemu_dd

MiB = 1 << 20
MISSING_DEVICE = "/nonexistent/kvm"
HOSTILE_SOURCE = Path(__file__).parent / "kvm" / "hostile.c"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 1 MiB + 1000 bytes as raw, as each other format, and as a vhdx whose
    dirty log (16 MiB) is larger than the 8 MiB the VM once held whole ("big-log")."""
    directory = tmp_path_factory.mktemp("images")
    raw = directory / "in.raw"
    raw.write_bytes(os.urandom(MiB + 1000))
    made = {"raw": raw}
    if QEMU_IMG is not None:
        for fmt in ("vmdk", "vpc", "vhdx", "vdi", "parallels"):
            path = directory / f"in.{fmt}"
            qemu_img("convert", "-f", "raw", "-O", fmt, raw, path)
            made[fmt] = path
        big = directory / "big-log.vhdx"
        qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "log_size=16M", raw, big)
        made["big-log"] = hostile.vhdx_dirty(big)
    return made


def _data(images: dict[str, Path]) -> bytes:
    data = images["raw"].read_bytes()
    return data + bytes(-len(data) % 512)


def _records(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _modes(stderr: str) -> list[tuple[object, object]]:
    """(isolation, isolation_reason) of the JSON records that carry them."""
    return [(r["isolation"], r["isolation_reason"]) for r in _records(stderr) if "isolation" in r]


def test_the_formats_the_tests_rotate_kvm_into_are_the_readers() -> None:
    assert KVM_FORMATS <= GUEST_FORMATS
    assert "raw" in KVM_FORMATS
    assert set(INPUT_FORMATS) == GUEST_FORMATS  # auto has nothing to leave to Python


# -- kvm where it runs ------------------------------------------------------------------


@needs_kvm
@needs_qemu
@pytest.mark.parametrize(
    "operands",
    [["bs=1M"], ["bs=512", "skip=3", "count=2000"], ["bs=4K", "skip=200", "count=7E"]],
    ids=str,
)
def test_kvm_copies_the_bytes_qemu_img_dd_copies(
    images: dict[str, Path], tmp_path: Path, operands: list[str]
) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    run = aiodd_run(
        ["--isolation=kvm", "--progress=json", f"if={images['raw']}", f"of={ours}", *operands],
        ours,
    )
    qemu = qemu_dd([f"if={images['raw']}", f"of={theirs}", *operands], theirs)
    assert (run.status, qemu.status) == (0, 0), run.stderr
    assert run.output is not None and run.output == qemu.output
    assert _modes(run.stderr) == [("kvm", "requested")] * 2  # the first record and the last
    assert leftovers(tmp_path) == []


@needs_kvm
def test_auto_picks_kvm_here(images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.raw"
    run = aiodd_run(["--progress=json", f"if={images['raw']}", f"of={out}"], out)
    assert run.status == 0 and run.output == _data(images)
    assert _modes(run.stderr) == [("kvm", "auto: /dev/kvm available")] * 2
    assert all(line.startswith("{") for line in run.stderr.splitlines())  # nothing else said


@needs_kvm
@needs_qemu
@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vhdx", "vdi", "parallels"])
def test_auto_decodes_every_format_in_kvm(
    images: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / "o.raw"
    run = aiodd_run(["--progress=json", f"if={images[fmt]}", f"of={out}"], out)
    assert run.status == 0, run.stderr
    assert run.output is not None and run.output[: MiB + 1000] == _data(images)[: MiB + 1000]
    assert [line for line in run.stderr.splitlines() if not line.startswith("{")] == []
    assert _modes(run.stderr) == [("kvm", "auto: /dev/kvm available")] * 2


@needs_kvm
@needs_qemu
@pytest.mark.parametrize("isolation", ["auto", "kvm"])
def test_a_vhdx_log_over_8_mib_is_decoded_in_the_vm(
    images: dict[str, Path], tmp_path: Path, isolation: str
) -> None:
    """Once a fallback to the sandbox (auto) or a refusal (kvm): the VM replays any log
    now, without a note."""
    out = tmp_path / "o.raw"
    src = images["big-log"]
    run = aiodd_run([f"--isolation={isolation}", "--progress=json", f"if={src}", f"of={out}"], out)
    assert run.status == 0, run.stderr
    assert run.output is not None and run.output[: MiB + 1000] == _data(images)[: MiB + 1000]
    assert [line for line in run.stderr.splitlines() if not line.startswith("{")] == []
    reason = "auto: /dev/kvm available" if isolation == "auto" else "requested"
    assert _modes(run.stderr) == [("kvm", reason)] * 2
    assert leftovers(tmp_path) == []


@needs_kvm
@needs_qemu
def test_the_library_reports_where_it_decoded_and_why(
    images: dict[str, Path], tmp_path: Path
) -> None:
    events: list[aiodd.Progress] = []

    async def copies() -> list[aiodd.DdResult]:
        results = []
        for isolation in options.ISOLATION_MODES:
            out = tmp_path / f"{isolation}.raw"
            result = await aiodd.dd(
                images["raw"], out, isolation=isolation, on_progress=events.append
            )
            results.append(result)
        results.append(await aiodd.dd(images["big-log"], tmp_path / "big-log.raw"))
        return results

    results = anyio.run(copies)
    assert [(r.isolation, r.isolation_reason) for r in results] == [
        ("kvm", "auto: /dev/kvm available"),
        ("kvm", "requested"),
        ("sandbox", "requested"),
        ("inline", "requested"),
        ("kvm", "auto: /dev/kvm available"),
    ]
    assert [r.warnings for r in results] == [()] * 5
    for isolation in ("auto", "kvm", "sandbox", "inline"):
        assert (tmp_path / f"{isolation}.raw").read_bytes() == _data(images)
    assert (tmp_path / "big-log.raw").read_bytes()[: MiB + 1000] == _data(images)[: MiB + 1000]
    assert {(e.isolation, e.isolation_reason) for e in events} == {
        (r.isolation, r.isolation_reason) for r in results[:4]
    }


# -- a host without KVM -----------------------------------------------------------------


def test_without_kvm_auto_uses_the_sandbox_and_kvm_fails(
    images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KVM_DEVICE_VARIABLE, MISSING_DEVICE)
    src, out = images["raw"], tmp_path / "o.raw"
    why = f"cannot open {MISSING_DEVICE} read-write: No such file or directory"
    for extra in ([], ["--require-isolation"]):  # which asks for every sandbox layer, not KVM
        run = aiodd_run([*extra, "--progress=json", f"if={src}", f"of={out}"], out)
        assert run.status == 0 and run.output == _data(images)
        assert _modes(run.stderr) == [("sandbox", f"auto: {why}")] * 2
        assert all(line.startswith("{") for line in run.stderr.splitlines())  # no note
        out.unlink()
    for extra in ([], ["--require-isolation"]):
        run = aiodd_run(["--isolation=kvm", *extra, f"if={src}", f"of={out}"], out)
        assert (run.status, run.output) == (1, None)
        assert run.stderr == (
            f"aiodd: {src}: the KVM guest reader cannot run here: {why}; this host offers no"
            " KVM (a container needs the device passed in, a VM nested virtualisation),"
            " choose the auto or sandbox isolation\n"
        )
    lines = isolation_report()  # what --version --verbose prints
    assert f"kvm: unavailable: {why}" in lines and "auto: picks sandbox" in lines
    assert leftovers(tmp_path) == []


def test_a_kvm_device_that_is_not_kvm_is_named(
    images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_kvm = tmp_path / "kvm"
    not_kvm.write_bytes(b"")
    monkeypatch.setenv(KVM_DEVICE_VARIABLE, str(not_kvm))
    with pytest.raises(IsolationError) as info:
        open_input(str(images["raw"]), None, isolation="kvm")
    assert str(info.value) == (
        f"{images['raw']}: the KVM guest reader cannot run here: {not_kvm}: KVM_GET_API_VERSION"
        " failed: Inappropriate ioctl for device; choose the auto or sandbox isolation to"
        " decode without it"
    )


def test_version_verbose_says_what_auto_picks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version", "--verbose"]) == 0
    lines = capsys.readouterr().out.splitlines()
    if KVM_AVAILABLE:
        assert "isolation: kvm: available (/dev/kvm, the guest binary built)" in lines
        assert "isolation: auto: picks kvm" in lines
        seccomp_line = next(line for line in lines if line.startswith("isolation: seccomp:"))
        assert "ioctl only on the KVM VM's descriptors" in seccomp_line
    else:
        assert f"isolation: kvm: unavailable: {KVM_WHY}" in lines
        assert "isolation: auto: picks sandbox" in lines


# -- the KVM guest reader's process, sealed ---------------------------------------------


@needs_kvm
def test_the_kvm_guest_readers_process_is_sealed(images: dict[str, Path]) -> None:
    """Only the VM's descriptors and its monitor's requests pass the ioctl rule; reads
    still come through; opening a file still kills the process."""
    path = images["raw"]
    policy = Policy()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    memory = shared_buffer(2 * MiB)
    try:
        options = GuestOptions(entry=ENTRY, isolation="kvm")
        disk: GuestDisk = open_guest(str(path), fd, None, policy, policy.top(str(path), fd),
                                     memory=memory, options=options)  # fmt: skip
    finally:
        os.close(fd)
    try:
        assert (disk.mode, disk.mode_reason) == ("kvm", "requested")
        assert "ioctl only on the KVM VM's descriptors" in disk.isolation["seccomp"]
        assert set(attempt(disk, "kvm_ioctl", "other-fd").split(", ")) == {
            "Operation not permitted"
        }
        # every descriptor of both VMs (the second reads on a thread of its own)
        assert (
            attempt(disk, "kvm_ioctl", "other-request").split(", ")
            == ["Operation not permitted"] * 4
        )
        with memoryview(memory) as view:
            disk.read_into(512, view[:MiB])
            assert view[:MiB] == _data(images)[512 : 512 + MiB]
        with pytest.raises(IsolationError, match="killed by its seccomp filter"):
            attempt(disk, "open", "/etc/hostname")
    finally:
        disk.close()
        memory.close()


@needs_kvm
@needs_qemu
def test_the_kvm_guest_reader_decodes_two_reads_at_once(tmp_path: Path) -> None:
    """Two reads in flight at once (as the pipeline's two workers ask) go to the two VMs:
    both open the image, and every byte lands where it belongs."""
    raw = tmp_path / "in.raw"
    rng = random.Random(5)
    raw.write_bytes(b"".join(
        rng.randbytes(4096) if rng.random() < 0.3 else bytes([n % 251]) * 4096
        for n in range(4096)
    ))  # fmt: skip
    image = tmp_path / "in.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", raw, image)
    data = raw.read_bytes()
    policy = Policy()
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    chunk = 2 * MiB
    memory = shared_buffer(2 * chunk)
    try:
        options = GuestOptions(entry=ENTRY, isolation="kvm")
        disk: GuestDisk = open_guest(str(image), fd, None, policy, policy.top(str(image), fd),
                                     memory=memory, options=options)  # fmt: skip
    finally:
        os.close(fd)
    errors: list[BaseException] = []

    def read(offset: int, view: memoryview) -> None:
        try:
            disk.read_into(offset, view)
        except BaseException as exc:
            errors.append(exc)

    try:
        assert attempt(disk, "kvm_vms") == "2 VMs, 1 opened"
        with memoryview(memory) as view:
            for start in range(0, len(data), 2 * chunk):
                second = threading.Thread(
                    target=read, args=(start + chunk, view[chunk : 2 * chunk])
                )
                second.start()
                read(start, view[:chunk])
                second.join()
                assert not errors, errors
                assert view[:chunk] == data[start : start + chunk], start
                assert view[chunk:] == data[start + chunk : start + 2 * chunk], start
        assert attempt(disk, "kvm_vms") == "2 VMs, 2 opened"
    finally:
        disk.close()
        memory.close()


_WATCHDOG_SCRIPT = """
import os, sys
from pathlib import Path
from aiodd.errors import IsolationError
from aiodd.guest import sandbox, seccomp
from aiodd.guest.kvm.vmm import KVM_RUN, GuestVM

sandbox.unshare()
vm = GuestVM(name="evil.img", guest=Path(sys.argv[1]), timeout=0.3)
vcpus = []
for fd in os.listdir("/proc/self/fd"):
    try:
        if os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:kvm-vcpu"):
            vcpus.append(int(fd))
    except OSError:
        pass  # the listing's own descriptor, gone
assert vcpus
sandbox.empty_root()
sandbox.no_new_privs()
sandbox.landlock()
# stdout stands for the control socket
seccomp.install(1, seccomp.KvmRule(tuple(vcpus), (KVM_RUN,)))
try:
    vm.command(0x203)  # the hostile guest spins
except IsolationError as exc:
    print(exc, flush=True)
os.open("/etc/hostname", os.O_RDONLY)
"""


@needs_kvm
def test_the_vms_watchdog_works_in_a_sealed_process(tmp_path: Path) -> None:
    """setitimer and SIGPROF pass the filter: a spinning guest is stopped by the watchdog
    after sealing as before, and the process is still sealed afterwards."""
    hostile = build(tmp_path / "hostile.elf", [HOSTILE_SOURCE], libraries=False)
    proc = subprocess.run(
        [sys.executable, "-c", _WATCHDOG_SCRIPT, str(hostile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout == (
        "evil.img: the guest reader did not finish within 0.3 s (watchdog) and was stopped\n"
    ), proc.stderr
    assert proc.returncode == -signal.SIGSYS


_SECOND_VM_SCRIPT = """
import os, sys, threading
from pathlib import Path
from aiodd.errors import IsolationError
from aiodd.guest import sandbox, seccomp
from aiodd.guest.kvm.vmm import KVM_RUN, GuestVM, ThreadWatchdog, keep_handler

sandbox.unshare()
first = GuestVM(name="first.img", guest=Path(sys.argv[1]), timeout=0.3)
second = GuestVM(name="second.img", guest=Path(sys.argv[1]), timeout=0.3)
keep_handler()
sandbox.empty_root()
sandbox.no_new_privs()
sandbox.landlock()
bound = threading.Event()
sealed = threading.Event()
ended = []

def run():
    second.bind(ThreadWatchdog())  # before sealing: timer_create is not in the filter
    bound.set()
    sealed.wait()
    try:
        second.command(0x203)  # the hostile guest spins
    except IsolationError as exc:
        ended.append(str(exc))

thread = threading.Thread(target=run)
thread.start()
bound.wait()
# stdout stands for the control socket
seccomp.install(1, seccomp.KvmRule((*first.ioctl_fds, *second.ioctl_fds), (KVM_RUN,)))
sealed.set()
thread.join()
print(ended[0], flush=True)
try:
    first.command(0x203)
except IsolationError as exc:
    print(exc, flush=True)
os.open("/etc/hostname", os.O_RDONLY)
"""


@needs_kvm
def test_the_second_vms_watchdog_works_in_a_sealed_process(tmp_path: Path) -> None:
    """A VM run from a thread of its own is stopped by its own watchdog after sealing
    (timer_settime passes the filter, the tick reaches that thread); the main thread's VM
    is stopped by its own after it; the process is still sealed."""
    hostile = build(tmp_path / "hostile.elf", [HOSTILE_SOURCE], libraries=False)
    proc = subprocess.run(
        [sys.executable, "-c", _SECOND_VM_SCRIPT, str(hostile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout == (
        "second.img: the guest reader did not finish within 0.3 s (watchdog) and was stopped\n"
        "first.img: the guest reader did not finish within 0.3 s (watchdog) and was stopped\n"
    ), proc.stderr
    assert proc.returncode == -signal.SIGSYS
