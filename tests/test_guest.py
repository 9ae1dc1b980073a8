"""The guest reader: the sandboxed child, its protocol, its watchdog and each sandbox layer.

Each layer has a test that makes the guest attempt the forbidden thing (the test-only
``attempt`` requests of tests/guest_attempts.py, which these tests' guests run) and a
control that shows the same attempt succeeding without the layer, so the test can fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiodd.chain import open_input
from aiodd.errors import ImageError, IsolationError, UsageError
from aiodd.guest import child, host, isolation_report, sandbox, seccomp, shared_buffer
from aiodd.guest.host import GuestDisk, GuestOptions, IsolationWarning, open_guest
from aiodd.guest.process import death_reason
from aiodd.guest.protocol import Read, clean
from aiodd.policy import Policy
from tests.conftest import KVM_AVAILABLE, KVM_WHY, needs_kvm
from tests.guest_attempts import ENTRY, attempt

SECRET = b"HOST-SECRET-" + b"s" * 52


@pytest.fixture
def raw_image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * 1024 * 1024 + 1000)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    return path


def guest(
    path: Path, layers: tuple[str, ...] = sandbox.LAYERS, fmt: str | None = None, **kw: object
) -> GuestDisk:
    """A guest on ``path`` (opened as ``fmt``, or detected); the Python decoders
    (``isolation="sandbox"``) unless ``kw`` says otherwise."""
    pol = Policy()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    kw.setdefault("isolation", "sandbox")
    try:
        top = pol.top(str(path), fd)
        return open_guest(str(path), fd, fmt, pol, top,
                          options=GuestOptions(layers=layers, entry=ENTRY, **kw))  # type: ignore[arg-type]  # fmt: skip
    finally:
        os.close(fd)


@pytest.fixture
def make_guest(raw_image: tuple[Path, bytes]) -> Iterator[object]:
    made: list[GuestDisk] = []

    def make(
        layers: tuple[str, ...] = sandbox.LAYERS, fmt: str | None = None, **kw: object
    ) -> GuestDisk:
        disk = guest(raw_image[0], layers, fmt, **kw)
        made.append(disk)
        return disk

    yield make
    for disk in made:
        disk.close()


# -- the seccomp program, interpreted -------------------------------------------------


@pytest.mark.parametrize("arch", sorted(seccomp.SYSCALLS))
def test_seccomp_program(arch: str) -> None:
    table = seccomp.SYSCALLS[arch]
    prog = seccomp.build_filter(arch, 7)
    assert len(prog) // 8 < 4096
    eperm = seccomp.RET_ERRNO | errno.EPERM
    for name in seccomp.ALLOW:
        if name in table:
            assert seccomp.run_filter(prog, arch, table[name]) == seccomp.RET_ALLOW, name
    for name in seccomp.KILL:
        if name in table:
            assert seccomp.run_filter(prog, arch, table[name]) == seccomp.RET_KILL_PROCESS, name
    for name in seccomp.ALLOW_ON_CONTROL:
        assert seccomp.run_filter(prog, arch, table[name], 7) == seccomp.RET_ALLOW
        assert seccomp.run_filter(prog, arch, table[name], 1) == eperm
        assert seccomp.run_filter(prog, arch, table[name], 7 | 1 << 32) == eperm
    assert seccomp.run_filter(prog, arch, 999) == eperm  # unknown calls: EPERM
    assert not set(seccomp.ALLOW) & set(seccomp.KILL)
    for name in ("open" if arch == "x86_64" else "openat", "execve", "socket", "connect",
                 "ptrace", "openat", "clone3", "memfd_create"):  # fmt: skip
        assert name in seccomp.KILL and name in table


@pytest.mark.parametrize("arch", sorted(seccomp.SYSCALLS))
def test_seccomp_program_lets_the_lanes_be_written(arch: str) -> None:
    table = seccomp.SYSCALLS[arch]
    prog = seccomp.build_filter(arch, 7, lanes=(9, 12))
    eperm = seccomp.RET_ERRNO | errno.EPERM
    for name in seccomp.ALLOW_ON_CONTROL:
        for fd in (7, 9, 12):
            assert seccomp.run_filter(prog, arch, table[name], fd) == seccomp.RET_ALLOW
        for fd in (0, 1, 8, 10, 11, 13, 9 | 1 << 32):
            assert seccomp.run_filter(prog, arch, table[name], fd) == eperm
    for name in seccomp.KILL:
        if name in table:
            assert seccomp.run_filter(prog, arch, table[name], 9) == seccomp.RET_KILL_PROCESS


@pytest.mark.parametrize("arch", sorted(seccomp.SYSCALLS))
def test_seccomp_kvm_rule(arch: str) -> None:
    """With two VMs: KVM_RUN on any of their four descriptors, nothing else; the
    watchdogs' timer calls only then; creating a timer never (it is made before)."""
    table = seccomp.SYSCALLS[arch]
    kvm_run = 0xAE80
    rule = seccomp.KvmRule((11, 12, 13, 14), (kvm_run,))
    prog = seccomp.build_filter(arch, 7, rule)
    plain = seccomp.build_filter(arch, 7)
    eperm = seccomp.RET_ERRNO | errno.EPERM
    for fd in rule.fds:
        assert seccomp.run_filter(prog, arch, table["ioctl"], fd, kvm_run) == seccomp.RET_ALLOW
        assert seccomp.run_filter(prog, arch, table["ioctl"], fd, 0xAE81) == eperm
        assert seccomp.run_filter(plain, arch, table["ioctl"], fd, kvm_run) == eperm
    for fd in (0, 7, 10, 15, 11 | 1 << 32):
        assert seccomp.run_filter(prog, arch, table["ioctl"], fd, kvm_run) == eperm
    for name in ("setitimer", "timer_settime", "timer_delete"):
        assert seccomp.run_filter(prog, arch, table[name]) == seccomp.RET_ALLOW, name
        assert seccomp.run_filter(plain, arch, table[name]) == eperm, name
    assert "timer_create" not in table


def test_seccomp_program_checks_the_abi() -> None:
    prog = seccomp.build_filter("x86_64", 3)
    x32_read = 0x40000000
    assert seccomp.run_filter(prog, "x86_64", x32_read) == seccomp.RET_KILL_PROCESS
    # a program for one architecture kills calls made under another
    import struct

    data_arch = seccomp.AUDIT_ARCH["aarch64"]
    _code, _jt, _jf, k = struct.unpack_from("=HBBI", prog, 8)
    assert k == seccomp.AUDIT_ARCH["x86_64"] != data_arch


# -- reading through the guest --------------------------------------------------------


def test_reads_into_shared_memory_and_plain_buffers(raw_image: tuple[Path, bytes]) -> None:
    path, data = raw_image
    memory = shared_buffer(8 << 20)
    disk = open_input(str(path), None, memory=memory)
    try:
        assert disk.format_name == "raw" and disk.virtual_size == -(-len(data) // 512) * 512
        view = memoryview(memory)
        disk.read_into(0, view[4096 : 4096 + len(data)])
        assert view[4096 : 4096 + len(data)] == data
        tail = view[100 : 100 + 1000 + 512]
        disk.read_into(len(data) - 1000, tail)
        assert bytes(tail) == data[-1000:] + bytes(512)
        plain = bytearray(len(data))  # not shared: goes through the staging slots
        disk.read_into(0, memoryview(plain))
        assert plain == data
        disk.read_into(5, memoryview(plain)[0:0])
    finally:
        disk.close()
        del tail
        view.release()
        memory.close()


@pytest.mark.parametrize("isolation", ["auto", "sandbox", pytest.param("kvm", marks=needs_kvm)])
@pytest.mark.parametrize("threads", [2, 4])
def test_threads_read_concurrently(
    raw_image: tuple[Path, bytes], threads: int, isolation: str
) -> None:
    """Reads from several threads at once; four share the two read lanes (under kvm,
    the two VMs' own threads)."""
    path, data = raw_image
    memory = shared_buffer(threads << 20)
    disk = open_input(str(path), None, memory=memory, isolation=isolation)  # type: ignore[arg-type]
    if isolation != "auto":
        assert getattr(disk, "mode", None) == isolation
    view = memoryview(memory)
    errors: list[BaseException] = []

    def reader(n: int) -> None:
        try:
            for i in range(20):
                start = (i * 65536 + n * 1000) % (len(data) - (1 << 20))
                part = view[n << 20 : (n + 1) << 20]
                disk.read_into(start, part)
                assert part == data[start : start + (1 << 20)]
                part.release()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    started = [threading.Thread(target=reader, args=(n,)) for n in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    disk.close()
    view.release()
    memory.close()
    assert errors == []


def test_close_ends_the_guest(make_guest: object) -> None:
    disk = make_guest()  # type: ignore[operator]
    pid = disk.pid
    disk.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(IsolationError):
        disk.read_into(0, memoryview(bytearray(512)))
    disk.close()  # idempotent


def test_inline_mode_and_bad_modes(raw_image: tuple[Path, bytes]) -> None:
    path, data = raw_image
    disk = open_input(str(path), "raw", isolation="inline")
    buf = bytearray(4096)
    disk.read_into(0, memoryview(buf))
    disk.close()
    assert buf == data[:4096]
    with pytest.raises(UsageError):
        open_input(str(path), None, isolation="nope")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        open_input(str(path), "floppy")


def test_image_errors_cross_the_boundary_as_themselves(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb\0\0\0\x03" + b"\0" * 200)
    got = []
    for mode in ("inline", "sandbox"):
        with pytest.raises(ImageError) as info:
            open_input(str(bad), None, isolation=mode)
        got.append((type(info.value), str(info.value), info.value.fmt))
    assert got[0] == got[1]


def test_isolation_report_and_start_up() -> None:
    lines = isolation_report()
    layers = [line.split(":")[0] for line in lines]
    assert layers == [*sandbox.LAYERS, "kvm", "auto", "guest start-up"]
    for line in lines[: len(sandbox.LAYERS)]:
        assert ": active: " in line, line  # every layer works on this host
    picks = "kvm" if KVM_AVAILABLE else "sandbox"
    assert lines[-2] == f"auto: picks {picks}"
    if KVM_AVAILABLE:
        assert lines[-3] == "kvm: available (/dev/kvm, the guest binary built)"
    else:
        assert lines[-3] == f"kvm: unavailable: {KVM_WHY}"
    lines = isolation_report(GuestOptions(isolation="sandbox"))
    assert [line.split(":")[0] for line in lines] == [*sandbox.LAYERS, "guest start-up"]


def test_prestarted_guest_opens_fast(raw_image: tuple[Path, bytes]) -> None:
    host.prestart()
    time.sleep(1.0)  # the guest imports while the host does other things
    started = time.perf_counter()
    disk = open_input(str(raw_image[0]), None)
    elapsed = time.perf_counter() - started
    disk.close()
    assert elapsed < 0.5  # typically a few ms; generous for a loaded CI machine


def test_guest_environment_is_empty(make_guest: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIODD_FAKE_TOKEN", "hunter2")
    disk = make_guest(())  # type: ignore[operator]
    result = attempt(disk, "open", "/proc/self/environ")
    assert result.startswith("ok: ")
    assert b"hunter2".hex() not in result and "AIODD" not in bytes.fromhex(result[4:]).decode()


@pytest.mark.parametrize("isolation", ["sandbox", "auto"])
def test_the_guest_is_told_the_mode_to_expect(make_guest: object, isolation: str) -> None:
    """What the spawner passes is what the guest reads (aiodd.guest.child.prepare)."""
    from aiodd.guest import kvm

    if isolation == "auto" and not kvm.availability()[0]:
        isolation = "sandbox"  # auto would decode in Python: the same as above
    disk = make_guest(isolation=isolation)  # type: ignore[operator]
    assert attempt(disk, "expected_mode") == isolation


@pytest.mark.parametrize("fmt", ["raw", None])
def test_the_guest_is_told_the_input_format_to_expect(make_guest: object, fmt: str | None) -> None:
    """The format the host names for the input is what the guest reads before its
    ``Init`` (aiodd.guest.child.prepare skips the decoders' imports for raw)."""
    disk = make_guest(fmt=fmt)  # type: ignore[operator]
    assert attempt(disk, "expected_format") == (fmt or "")
    assert attempt(disk, "expected_mode") == "sandbox"


def test_the_shipped_guest_answers_no_test_request(raw_image: tuple[Path, bytes]) -> None:
    pol = Policy()
    fd = os.open(raw_image[0], os.O_RDONLY | os.O_CLOEXEC)
    try:
        disk = open_guest(str(raw_image[0]), fd, None, pol, pol.top(str(raw_image[0]), fd))
    finally:
        os.close(fd)
    try:
        with pytest.raises(IsolationError, match=r"exited unexpectedly \(status 2\)"):
            attempt(disk, "ids")
    finally:
        disk.close()


# -- each layer stops what it should --------------------------------------------------


@pytest.mark.parametrize(
    "isolation", ["sandbox", pytest.param("kvm", marks=needs_kvm)]
)  # the KVM guest reader's process is sealed the same way, an ioctl rule aside
@pytest.mark.parametrize(
    ("what", "arg"),
    [("open", "/etc/hostname"), ("exec", "/bin/true"), ("connect", "1"), ("ptrace", "1"),
     ("stat", "/etc/hostname"), ("setrlimit", None)],
)  # fmt: skip
def test_seccomp_kills_the_guest(
    make_guest: object, what: str, arg: object, isolation: str
) -> None:
    disk = make_guest(isolation=isolation)  # type: ignore[operator]
    assert disk.mode == isolation
    if what == "stat":  # not on the kill list: answered EPERM, the guest lives on
        assert "Operation not permitted" in attempt(disk, what, arg)
        return
    with pytest.raises(IsolationError, match="seccomp filter"):
        attempt(disk, what, arg)


def test_without_seccomp_open_works(make_guest: object, secret: Path) -> None:
    disk = make_guest(())  # type: ignore[operator]
    assert attempt(disk, "open", str(secret)) == "ok: " + SECRET[:64].hex()


def test_guest_holds_no_descriptor_it_was_not_given(make_guest: object, secret: Path) -> None:
    # An inheritable descriptor of the caller's (a shell's 9<file) must not reach the
    # guest, even with no sandbox layer to close it: spawning leaves it open.
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        disk = make_guest(())  # type: ignore[operator]
        held = attempt(disk, "fds")
    finally:
        os.close(fd)
    assert held.startswith("ok: ")
    assert str(secret) not in held


def test_landlock_denies_opening(make_guest: object, secret: Path) -> None:
    disk = make_guest(("no_new_privs", "landlock"))  # type: ignore[operator]
    assert disk.isolation["landlock"].startswith("active")
    assert attempt(disk, "open", str(secret)).startswith("PermissionError")
    assert attempt(disk, "exec", "/bin/true").startswith("PermissionError")


def test_namespaces_give_an_empty_root(make_guest: object, secret: Path) -> None:
    disk = make_guest(("namespaces",))  # type: ignore[operator]
    assert attempt(disk, "open", str(secret)).startswith("FileNotFoundError")
    assert attempt(disk, "listdir", "/") == "ok: "
    assert attempt(disk, "ids").startswith("uid=65534 ")


def test_network_namespace(make_guest: object) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        control = make_guest(())  # type: ignore[operator]
        assert attempt(control, "connect", port) == "ok: connected"
        disk = make_guest(("namespaces",))  # type: ignore[operator]
        result = attempt(disk, "connect", port)
        assert not result.startswith("ok"), result
    finally:
        server.close()


def test_no_new_privs(make_guest: object) -> None:
    assert attempt(make_guest(()), "ids").endswith("nnp=0")  # type: ignore[operator]
    assert attempt(make_guest(("no_new_privs",)), "ids").endswith("nnp=1")  # type: ignore[operator]


def test_rlimit_fsize_and_nofile(make_guest: object) -> None:
    control = make_guest(())  # type: ignore[operator]
    assert attempt(control, "write_memfd", "new") == "ok: wrote"
    disk = make_guest(("rlimits",))  # type: ignore[operator]
    assert "File too large" in attempt(disk, "write_memfd", "new")
    result = attempt(disk, "dup")
    assert result.startswith("stopped after ") and "Too many open files" in result
    assert int(result.split()[2].rstrip(":")) < child.MAX_FDS


def test_rlimit_as_bounds_memory(make_guest: object) -> None:
    control = make_guest(())  # type: ignore[operator]
    assert attempt(control, "alloc", 300 << 20) == f"ok: {300 << 20}"
    disk = make_guest(memory_limit=64 << 20)  # type: ignore[operator]
    with pytest.raises(IsolationError, match="ran out of memory"):
        attempt(disk, "alloc", 300 << 20)
    assert attempt(disk, "alloc", 1 << 20) == f"ok: {1 << 20}"  # and it lives on


def test_rlimit_cpu(make_guest: object) -> None:
    disk = make_guest(("rlimits",), start_cpu=1)  # type: ignore[operator]
    with pytest.raises(IsolationError, match="CPU time"):
        attempt(disk, "spin", timeout=30)


def test_watchdog_kills_a_guest_that_stops_answering(make_guest: object) -> None:
    """A read that never ends: its deadline kills the guest, and the read says so."""
    disk = make_guest(watchdog_floor=1.0)  # type: ignore[operator]
    assert attempt(disk, "spin_reads") == "ok"
    started = time.perf_counter()
    with pytest.raises(IsolationError, match="watchdog") as info:
        disk.read_into(0, memoryview(bytearray(4096)))
    assert time.perf_counter() - started < 10
    assert "did not finish reading 4096 bytes at offset 0" in str(info.value)
    assert "was killed" in str(info.value)
    with pytest.raises(IsolationError):
        disk.read_into(0, memoryview(bytearray(512)))


def test_reads_do_not_wait_for_the_workers(
    make_guest: object, raw_image: tuple[Path, bytes]
) -> None:
    """Reads take their lanes: with both workers spinning, a read is answered, and a
    further request, which waits behind the workers, meets its watchdog."""
    disk = make_guest()  # type: ignore[operator]
    spinners = [threading.Thread(target=_swallow, args=(disk,)) for _ in range(2)]
    for t in spinners:
        t.start()
    time.sleep(0.3)  # both workers now spin
    buf = bytearray(4096)
    disk.read_into(8192, memoryview(buf))
    assert buf == raw_image[1][8192 : 8192 + 4096]
    with pytest.raises(IsolationError, match="did not answer within 1 s"):
        attempt(disk, "stat", "/", timeout=1.0)
    for t in spinners:
        t.join()


def test_a_lane_answer_to_no_read_kills_the_guest(make_guest: object) -> None:
    disk = make_guest()  # type: ignore[operator]
    assert attempt(disk, "lane_noise") == "ok: 2"
    with pytest.raises(IsolationError, match="broke the protocol and was killed"):
        disk.read_into(0, memoryview(bytearray(512)))


def test_a_message_nested_too_deep_kills_the_guest(make_guest: object) -> None:
    """Nesting past the host's recursion limit is a broken message, not the end of the
    host's receiving thread (which would leave the guest's reads waiting)."""
    disk = make_guest()  # type: ignore[operator]
    with pytest.raises(IsolationError, match="broke the protocol and was killed"):
        attempt(disk, "deep_nesting")


def test_reads_stopped_while_they_wait_leave_the_lanes_usable(
    make_guest: object, raw_image: tuple[Path, bytes]
) -> None:
    """A read interrupted by an exception (here a signal handler's) leaves its answer on
    its lane: the lane's next reads skip it rather than take it for their own, however
    many such answers a lane holds (four reads stopped, two on each lane)."""
    disk = make_guest()  # type: ignore[operator]
    assert attempt(disk, "slow_reads") == "ok"

    class Stopped(Exception):
        pass

    def stop(signum: int, frame: object) -> None:
        raise Stopped

    old = signal.signal(signal.SIGALRM, stop)
    try:
        for _ in range(4):
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with pytest.raises(Stopped):
                disk.read_into(0, memoryview(bytearray(512)))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    for offset in (4096, 8192, 12288):  # both lanes, the stopped reads' included
        buf = bytearray(512)
        disk.read_into(offset, memoryview(buf))
        assert buf == raw_image[1][offset : offset + 512]


def test_a_read_on_the_control_socket_is_refused(make_guest: object) -> None:
    """A guest takes reads on its lanes only."""
    disk = make_guest()  # type: ignore[operator]
    disk.channel._send(Read(0, 0, 0, 512, id=99))
    with pytest.raises(IsolationError, match=r"exited unexpectedly \(status 2\)"):
        for _ in range(100):
            disk.read_into(0, memoryview(bytearray(512)))
            time.sleep(0.05)


def _swallow(disk: GuestDisk) -> None:
    with contextlib.suppress(IsolationError):
        attempt(disk, "spin", timeout=60)


def test_missing_layer_warns_or_refuses(raw_image: tuple[Path, bytes]) -> None:
    # seccomp without no_new_privs cannot be installed: that layer is "missing"
    with pytest.warns(IsolationWarning, match="without seccomp"):
        disk = guest(raw_image[0], ("seccomp",))
    disk.close()
    with pytest.raises(IsolationError, match="isolation required"):
        guest(raw_image[0], ("seccomp",), require_isolation=True)


def test_death_reasons() -> None:
    assert "seccomp" in death_reason(-signal.SIGSYS)
    assert "CPU" in death_reason(-signal.SIGXCPU)
    assert "SIGSEGV" in death_reason(-signal.SIGSEGV)
    assert "status 7" in death_reason(7)


def test_guest_strings_are_cleaned() -> None:
    assert clean("a\nb\x1b[2Jc") == "a\\nb\\x1b[2Jc"
    assert len(clean("x" * 10_000)) < 600
