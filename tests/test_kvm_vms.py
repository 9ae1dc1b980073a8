"""Two VMs in one reader (docs/kvm.md, "Two VMs"): the second decodes on a thread of its
own, the same bytes as the first and as the Python decoders; the chain's files are opened
once for both; a guest spinning on either VM is stopped by that VM's watchdog; either
VM's failure is its read's error and leaves the other reading.
"""

from __future__ import annotations

import functools
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aiodd.errors import ImageError, IsolationError
from aiodd.formats import registry
from aiodd.guest.kvm import availability
from aiodd.guest.kvm.reader import KvmReader
from aiodd.guest.kvm.vmm import ThreadWatchdog
from aiodd.guest.memory import shared_buffer
from aiodd.io import LocalFile
from tests.conftest import needs_qemu
from tests.test_kvm_reader import MemFile, MemResolver

_AVAILABLE, _WHY = availability()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"KVM guest reader unavailable: {_WHY}")

MiB = 1 << 20
CHUNK = MiB


class Bound:
    """A thread bound to one of ``reader``'s further VMs, running what it is given."""

    def __init__(self, reader: KvmReader) -> None:
        self._jobs: list[Callable[[], object]] = []
        self._wake = threading.Condition()
        self._ready = threading.Event()
        self._done = False
        self.error: BaseException | None = None
        self.watchdog: ThreadWatchdog | None = None
        self._reader = reader
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            self.watchdog = ThreadWatchdog()
            self._reader.bind(self.watchdog)
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            with self._wake:
                while not self._jobs and not self._done:
                    self._wake.wait()
                if not self._jobs:
                    break
                job = self._jobs.pop(0)
            job()
        self.watchdog.close()

    def submit(self, job: Callable[[], object]) -> threading.Event:
        done = threading.Event()

        def run() -> None:
            try:
                job()
            except BaseException as exc:
                self.error = exc
            finally:
                done.set()

        with self._wake:
            self._jobs.append(run)
            self._wake.notify()
        return done

    def stop(self) -> None:
        with self._wake:
            self._done = True
            self._wake.notify()
        self._thread.join()


@pytest.fixture
def sigprof() -> Iterator[None]:
    """The reader leaves SIGPROF as it found it."""
    before = signal.getsignal(signal.SIGPROF)
    yield
    assert signal.getsignal(signal.SIGPROF) is before
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def _mixed(size: int, seed: int) -> bytes:
    """Compressible and incompressible 64 KiB pieces, some zeros."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghij ", k=rng.randint(2, 9))) for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        kind = rng.random()
        if kind < 0.3:
            out += rng.randbytes(65536)
        elif kind < 0.8:
            out += b" ".join(rng.choices(words, k=12000))[:65536]
        else:
            out += bytes(65536)
    return bytes(out[:size])


def _qemu(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A zstd-compressed qcow2 over a zlib-compressed qcow2, 16 MiB, with writes in the
    top: (directory, its files by name)."""
    where = tmp_path_factory.mktemp("chain")
    raw = where / "data.raw"
    raw.write_bytes(_mixed(16 * MiB, 7))
    _qemu(
        "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(where / "base.qcow2")
    )
    _qemu("qemu-img", "create", "-f", "qcow2", "-o", "compression_type=zstd",
          "-b", "base.qcow2", "-F", "qcow2", str(where / "mid.qcow2"))  # fmt: skip
    writes = []
    for n in range(12):
        writes += ["-c", f"write -c -P {0x30 + n} {n * 1300 * 1024 // 65536 * 65536} 65536"]
    _qemu("qemu-io", "-f", "qcow2", *writes, str(where / "mid.qcow2"))
    _qemu("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
          str(where / "top.qcow2"))  # fmt: skip
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 5M 3M", str(where / "top.qcow2"))
    files = {name: (where / name).read_bytes() for name in ("base.qcow2", "mid.qcow2", "top.qcow2")}
    return where, files


def _names(resolver: MemResolver) -> list[str]:
    """The names of the files ``resolver`` (and its layers') opened, in order."""
    return [entry[1].name for entry in resolver.log if isinstance(entry, tuple)]


def _python_bytes(files: dict[str, bytes]) -> bytes:
    disk = registry.open_disk(MemFile(files["top.qcow2"], "top.qcow2"), MemResolver(files), None)
    out = bytearray(disk.virtual_size)
    disk.read_into(0, memoryview(out))
    disk.close()
    return bytes(out)


@needs_qemu
def test_both_vms_decode_a_compressed_chain_as_python_does(
    chain: tuple[Path, dict[str, bytes]], sigprof: None
) -> None:
    """Chunks alternate between the VMs, read at once, straight into the shared buffer:
    the bytes are the Python decoders', in their places; each file is opened once."""
    _, files = chain
    expected = _python_bytes(files)
    memory = shared_buffer(len(expected))
    reader = KvmReader("top.qcow2", [memory], vms=2)
    assert reader.vms == 2 and len(set(reader.ioctl_fds)) == 4
    bound = Bound(reader)
    resolver = MemResolver(files)
    top = MemFile(files["top.qcow2"], "top.qcow2")
    try:
        disk = reader.open_disk(top, resolver, None)
        assert disk.virtual_size == len(expected)
        assert _names(resolver) == ["mid.qcow2", "base.qcow2"]
        with memoryview(memory) as view:
            for start in range(0, len(expected), 2 * CHUNK):
                second = start + CHUNK
                part = view[second : second + CHUNK]
                done = bound.submit(functools.partial(disk.read_into, second, part))
                disk.read_into(start, view[start : start + CHUNK])
                done.wait()
                assert bound.error is None
            assert view == expected
        # the second VM opened the chain at its first read, with the first VM's files
        assert _names(resolver) == ["mid.qcow2", "base.qcow2"]
        disk.close()
        assert top.closed == 1 and [f.closed for f in resolver.opened] == [1, 1]
    finally:
        bound.stop()
        reader.close()
        memory.close()


def test_the_threads_vm_is_its_own(sigprof: None, tmp_path: Path) -> None:
    """A raw image read on both threads: the second thread's reads run in the second VM
    (the first would refuse a thread other than the main one)."""
    data = random.Random(3).randbytes(5 * MiB + 77)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    reader = KvmReader("disk.img", vms=2)
    bound = Bound(reader)
    try:
        disk = reader.open_disk(LocalFile.open(str(path), "disk.img"), MemResolver({}), None)
        got = bytearray(len(data))
        with memoryview(got) as view:
            done = bound.submit(lambda: disk.read_into(MiB, view[MiB:]))
            disk.read_into(0, view[:MiB])
            done.wait()
        assert bound.error is None and got == data
        disk.close()
    finally:
        bound.stop()
        reader.close()


def test_one_vm_when_asked_for_one(sigprof: None) -> None:
    reader = KvmReader("image")
    try:
        assert reader.vms == 1 and len(reader.ioctl_fds) == 2
        with pytest.raises(ValueError, match="no VM is left"):
            reader.bind(ThreadWatchdog())
    finally:
        reader.close()


def test_an_unbound_vm_is_dropped(sigprof: None) -> None:
    reader = KvmReader("image", vms=2)
    try:
        fds = reader.ioctl_fds
        reader.drop_unbound()
        assert reader.vms == 1 and reader.ioctl_fds == fds[:2]
    finally:
        reader.close()


def _spins(reader: KvmReader) -> Callable[[], object]:
    disk = reader.open_disk(MemFile(b"t" * 100000, "top.img"), MemResolver({}), "raw")
    return lambda: disk.read_into(4096, memoryview(bytearray(4096)))  # the guest spins


def test_the_watchdog_stops_a_guest_spinning_on_the_second_vm(
    kvm_hostile_guest: Path, sigprof: None
) -> None:
    """The second VM's watchdog stops it, on its thread, while the first VM is idle; the
    first then spins too and its own watchdog stops it: one error each, on time."""
    reader = KvmReader("top.img", guest=kvm_hostile_guest, vms=2, watchdog_floor=0.4,
                       watchdog_rate=1 << 40)  # fmt: skip
    bound = Bound(reader)
    try:
        read = _spins(reader)
        started = time.monotonic()
        bound.submit(read).wait()
        assert time.monotonic() - started < 2.4  # shared machine: slack, not a benchmark
        assert str(bound.error) == (
            "top.img: the guest reader did not finish within 0.4 s (watchdog) and was stopped"
        )
        assert reader.ioctl_fds[2:] == (-1, -1) and min(reader.ioctl_fds[:2]) >= 0
        with pytest.raises(IsolationError, match="watchdog"):
            read()
        assert reader.ioctl_fds[:2] == (-1, -1)
    finally:
        bound.stop()
        reader.close()


def test_both_vms_spinning_at_once_are_both_stopped(kvm_hostile_guest: Path, sigprof: None) -> None:
    reader = KvmReader("top.img", guest=kvm_hostile_guest, vms=2, watchdog_floor=0.4,
                       watchdog_rate=1 << 40)  # fmt: skip
    bound = Bound(reader)
    try:
        read = _spins(reader)
        started = time.monotonic()
        done = bound.submit(read)
        with pytest.raises(IsolationError, match=r"within 0.4 s \(watchdog\)"):
            read()
        done.wait()
        assert time.monotonic() - started < 2.4
        assert isinstance(bound.error, IsolationError) and "watchdog" in str(bound.error)
        assert reader.ioctl_fds == (-1,) * 4
    finally:
        bound.stop()
        reader.close()


@needs_qemu
def test_a_corrupt_cluster_is_the_error_of_the_vm_that_reads_it(
    chain: tuple[Path, dict[str, bytes]], sigprof: None
) -> None:
    """A compressed cluster that does not decode: the VM that meets it raises the Python
    decoder's error and goes on; so does the other, for its own reads."""
    _, files = chain
    base = bytearray(files["base.qcow2"])
    # the compressed clusters sit past the tables: spoil bytes far into the file
    for at in range(len(base) // 2, len(base) - 4096, 40000):
        base[at : at + 8] = b"\xff" * 8  # a reserved block type, wherever deflate meets it
    broken = bytes(base)
    python = registry.open_disk(MemFile(broken, "base.qcow2"), MemResolver({}), None)
    errors: dict[int, str] = {}
    for offset in range(0, python.virtual_size, CHUNK):
        try:
            python.read_into(offset, memoryview(bytearray(CHUNK)))
        except ImageError as exc:
            errors[offset] = str(exc)
    python.close()
    assert errors, "the spoiled bytes must break some chunk"
    reader = KvmReader("base.qcow2", vms=2)
    bound = Bound(reader)
    try:
        disk = reader.open_disk(MemFile(broken, "base.qcow2"), MemResolver({}), None)
        for offset in range(0, disk.virtual_size, CHUNK):
            for on_thread in (False, True):
                bound.error = None
                failure = ""
                buf = memoryview(bytearray(CHUNK))
                if on_thread:
                    bound.submit(functools.partial(disk.read_into, offset, buf)).wait()
                    failure = str(bound.error) if bound.error is not None else ""
                    assert bound.error is None or isinstance(bound.error, ImageError)
                else:
                    try:
                        disk.read_into(offset, buf)
                    except ImageError as exc:
                        failure = str(exc)
                assert failure == errors.get(offset, ""), (offset, on_thread)
        disk.close()
    finally:
        bound.stop()
        reader.close()
