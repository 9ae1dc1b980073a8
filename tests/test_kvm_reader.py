"""The KVM guest reader's Python face (aiodd/guest/kvm/reader.py, docs/kvm.md "The
reader"): raw images read by the guest equal the Python decoder's bytes, straight into the
caller's shared buffers or through OUT; formats are detected in Python as the registry
detects them, for the top layer and every backing file the guest opens; errors come out as
the Python decoders and the resolver raise them; the disk closes what the chain opened.

The hostile guest (tests/kvm/hostile.c) stands in for a qcow2 decoder where a test needs
the guest to open files or report errors: its CMD_OPEN runs a script of requests from the
image.  Differential tests of the C qcow2 decoder against the Python one belong with it.
"""

from __future__ import annotations

import mmap
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiodd.errors import ImageError, IsolationError, PolicyError, UsageError
from aiodd.formats import registry
from aiodd.formats.base import RandomAccessFile, Reference, VirtualDisk
from aiodd.guest.kvm import availability
from aiodd.guest.kvm import layout as L
from aiodd.guest.kvm.reader import (
    GUEST_FORMATS,
    MAX_FILES,
    KvmDisk,
    KvmReader,
)
from aiodd.guest.kvm.vmm import KVM_RUN, slot_address
from aiodd.guest.memory import shared_buffer
from aiodd.guest.protocol import MAP_FACTOR
from aiodd.io import LocalFile
from tests import hostile
from tests.conftest import needs_qemu, qemu_img, qemu_io

_AVAILABLE, _WHY = availability()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"KVM guest reader unavailable: {_WHY}")

MiB = 1 << 20
QCOW2_HEAD = b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(1016)
VMDK_HEAD = b"KDMV" + bytes(1020)
VPC_HEAD = b"conectix" + bytes(1016)
LUKS_HEAD = b"LUKS\xba\xbe\0\1" + bytes(1016)  # a format aiodd does not read


class MemFile:
    """An in-memory file that counts its closes."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self._name = name
        self.closed = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def readinto(self, offset: int, buf: memoryview) -> int:
        chunk = self.data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self.closed += 1


class MemResolver:
    """Serves named in-memory files; refuses the rest as the policy would.  Every file it
    opens and every reference it is asked for is logged, with the layer that asked."""

    def __init__(
        self, files: dict[str, bytes], owner: str = "top", log: list[object] | None = None
    ):
        self.files = files
        self.owner = owner
        self.log: list[object] = [] if log is None else log
        self.opened: list[MemFile] = []
        self.refusals: list[PolicyError] = []

    def _open(self, ref: Reference) -> MemFile:
        self.log.append((self.owner, ref))
        if ref.name not in self.files:
            error = PolicyError(ref.referrer, f"{ref.kind} '{ref.name}' is refused")
            self.refusals.append(error)
            raise error
        file = MemFile(self.files[ref.name], ref.name)
        self.opened.append(file)
        return file

    def open_file(self, ref: Reference) -> RandomAccessFile:
        return self._open(ref)

    def open_disk(self, ref: Reference) -> VirtualDisk:
        file, resolver = self.open_layer(ref)
        return registry.open_disk(file, resolver, ref.format)

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, MemResolver]:
        file = self._open(ref)
        child = MemResolver(self.files, ref.name, self.log)
        child.opened = self.opened  # one list of every file the chain opened
        child.refusals = self.refusals
        return file, child


class HeldResolver:
    """Opens the chain's files from ``directory``, as the host does for a guest, and
    numbers each as the host numbers the layers it holds (the image 0, then each in
    turn): by descriptor in ``layers``, the files in ``files``."""

    def __init__(self, directory: Path, layers: dict[int, int]) -> None:
        self.directory = directory
        self.layers = layers
        self.files: list[LocalFile] = []

    def open(self, name: str) -> LocalFile:
        file = LocalFile.open(str(self.directory / name), name)
        self.layers[file.fd] = len(self.files)
        self.files.append(file)
        return file

    def open_file(self, ref: Reference) -> RandomAccessFile:
        return self.open(ref.name)

    def open_disk(self, ref: Reference) -> VirtualDisk:  # the Python decoders' way
        return registry.open_disk(self.open(ref.name), self, ref.format)

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, HeldResolver]:
        return self.open(ref.name), self


@pytest.fixture
def reader() -> Iterator[KvmReader]:
    kvm = KvmReader("image")
    yield kvm
    kvm.close()


def data_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


# -- the API ---------------------------------------------------------------------------


def test_the_guest_decodes_every_input_format() -> None:
    """auto picks kvm whatever the image: nothing is left to the Python decoders."""
    assert set(registry.input_formats()) == GUEST_FORMATS


def test_ioctls_used_after_sealing(reader: KvmReader) -> None:
    fds = reader.ioctl_fds
    assert len(fds) == 2 and len(set(fds)) == 2 and min(fds) >= 0
    assert reader.ioctl_requests == (KVM_RUN,)
    assert 0 < reader.start_time < 1


def test_start_outside_the_main_thread_is_refused() -> None:
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: errors.append(_start_or_error()))
    thread.start()
    thread.join()
    assert [str(e) for e in errors] == ["x.img: the KVM guest reader must run in the main thread"]


def _start_or_error() -> BaseException:
    try:
        KvmReader("x.img")
    except BaseException as exc:
        return exc
    raise AssertionError("started outside the main thread")


# -- raw: the guest's bytes are the Python decoder's -----------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, 511, 512, 513, 4095, 65543, L.IN_SIZE + 1, L.OUT_SIZE + 17, 2 * L.OUT_SIZE + 3],
)
def test_raw_reads_as_the_python_decoder_reads(tmp_path: Path, size: int) -> None:
    data = data_of(size, seed=size)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    memory = shared_buffer(24 * MiB)
    kvm = KvmReader("disk.img", [memory])
    file = LocalFile.open(str(path), "disk.img")
    try:
        disk = kvm.open_disk(file, MemResolver({}), None)
        assert disk.format_name == "raw"
        python = LocalFile.open(str(path), "disk.img")
        expected_disk = registry.open_disk(python, MemResolver({}), None)
        assert disk.virtual_size == expected_disk.virtual_size == (size + 511) // 512 * 512
        windows = [(0, disk.virtual_size + 1000), (disk.virtual_size, 10)]
        rng = random.Random(size)
        windows += [(rng.randrange(size + 1), rng.randrange(1, 3 * MiB)) for _ in range(8)]
        for offset, length in windows:
            want = bytearray(length)
            expected_disk.read_into(offset, memoryview(want))
            # through OUT, into a buffer of the caller's own
            got = bytearray(length)
            disk.read_into(offset, memoryview(got))
            assert got == want, (offset, length)
            # straight into the slot, at an odd place in it
            with memoryview(memory) as view:
                view[:length] = b"\xaa" * length
                disk.read_into(offset, view[3 : 3 + length])
                assert view[3 : 3 + length] == want, (offset, length)
        expected_disk.close()
        disk.close()
        assert file.fd == -1  # the disk owned the file
    finally:
        kvm.close()
        memory.close()


class Spy:
    """Records the reader's commands: (offset, length, address, timeout)."""

    def __init__(self, kvm: KvmReader, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[int, int, int, float]] = []
        self.copies = 0
        vm = kvm._vm
        real_read, real_copy = vm.read, vm.copy_output

        def read(offset: int, length: int, address: int, *, timeout: float | None = None) -> None:
            assert timeout is not None
            self.reads.append((offset, length, address, timeout))
            real_read(offset, length, address, timeout=timeout)

        def copy_output(buf: memoryview) -> None:
            self.copies += 1
            real_copy(buf)

        monkeypatch.setattr(vm, "read", read)
        monkeypatch.setattr(vm, "copy_output", copy_output)


@pytest.mark.parametrize("kind", ["memfd", "anonymous"])
def test_a_buffer_inside_a_slot_is_written_by_the_guest(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = data_of(20 * MiB)
    small = mmap.mmap(-1, 8 * MiB) if kind == "anonymous" else shared_buffer(8 * MiB)
    big = mmap.mmap(-1, 16 * MiB) if kind == "anonymous" else shared_buffer(16 * MiB)
    kvm = KvmReader("disk.img", [small, big])
    spy = Spy(kvm, monkeypatch)
    try:
        disk = kvm.open_disk(MemFile(data, "disk.img"), MemResolver({}), "raw")
        with memoryview(big) as view:
            disk.read_into(5, view[4 * MiB : 8 * MiB])
            assert view[4 * MiB : 8 * MiB] == data[5 : 5 + 4 * MiB]
            # one command, at the buffer's place in slot 1: no copy
            assert spy.reads == [(5, 4 * MiB, slot_address(1) + 4 * MiB, 15.25)]
            assert spy.copies == 0
            disk.read_into(0, view)  # the whole slot, in one command
            assert view == data[: 16 * MiB] and len(spy.reads) == 2 and spy.copies == 0
            assert spy.reads[-1][2:] == (slot_address(1), 16.0)
        with memoryview(small) as view:
            disk.read_into(7, view[100:200])
            assert view[100:200] == data[7:107]
            assert spy.reads[-1] == (7, 100, slot_address(0) + 100, 15 + 100 / (16 * MiB))
        # a buffer of its own goes through OUT, in OUT-sized commands, and one copy each
        spy.reads.clear()
        buf = bytearray(L.OUT_SIZE * 2 + 5)
        disk.read_into(11, memoryview(buf))
        assert buf == data[11 : 11 + len(buf)]
        assert [(r[1], r[2]) for r in spy.reads] == [
            (L.OUT_SIZE, L.OUT_BASE), (L.OUT_SIZE, L.OUT_BASE), (5, L.OUT_BASE),
        ]  # fmt: skip
        assert [r[0] for r in spy.reads] == [11, 11 + L.OUT_SIZE, 11 + 2 * L.OUT_SIZE]
        assert spy.copies == 3
        disk.close()
    finally:
        kvm.close()
        small.close()
        big.close()


def test_a_buffer_straddling_a_slot_goes_through_out(monkeypatch: pytest.MonkeyPatch) -> None:
    data = data_of(3 * MiB)
    memory = mmap.mmap(-1, 3 * MiB)
    kvm = KvmReader("disk.img", [memory])
    spy = Spy(kvm, monkeypatch)
    try:
        disk = kvm.open_disk(MemFile(data, "disk.img"), MemResolver({}), "raw")
        # a view of the slot that runs past it cannot exist; a buffer that merely holds
        # the same bytes elsewhere is not in the slot
        buf = bytearray(memory[: 2 * MiB])
        disk.read_into(1, memoryview(buf))
        assert buf == data[1 : 1 + 2 * MiB] and spy.reads[-1][2] == L.OUT_BASE
        disk.close()
    finally:
        kvm.close()
        memory.close()


def test_reads_past_the_end_are_zeros_without_the_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    data = data_of(1000)
    kvm = KvmReader("disk.img")
    spy = Spy(kvm, monkeypatch)
    try:
        disk = kvm.open_disk(MemFile(data, "disk.img"), MemResolver({}), None)
        assert disk.virtual_size == 1024
        buf = bytearray(b"\xff" * 4096)
        disk.read_into(1024, memoryview(buf))
        disk.read_into(1 << 62, memoryview(buf))
        assert buf == bytes(4096) and spy.reads == []
        buf = bytearray(b"\xff" * 4096)
        disk.read_into(900, memoryview(buf))
        assert buf == data[900:] + bytes(4096 - 100)
        assert [r[:2] for r in spy.reads] == [(900, 124)]  # up to the virtual size only
        disk.read_into(0, memoryview(bytearray()))
        assert len(spy.reads) == 1
        with pytest.raises(ValueError, match="negative offset -1"):
            disk.read_into(-1, memoryview(buf))
        disk.close()
    finally:
        kvm.close()


def test_an_empty_file_is_an_empty_disk(reader: KvmReader) -> None:
    disk = reader.open_disk(MemFile(b"", "empty.img"), MemResolver({}), None)
    assert (disk.format_name, disk.virtual_size) == ("raw", 0)
    buf = bytearray(b"\x01" * 100)
    disk.read_into(0, memoryview(buf))
    assert buf == bytes(100)
    disk.close()


# -- the disk's life -------------------------------------------------------------------


def test_closing_the_disk_closes_its_file_once(reader: KvmReader) -> None:
    file = MemFile(b"x" * 512, "disk.img")
    disk = reader.open_disk(file, MemResolver({}), None)
    with pytest.raises(RuntimeError, match="already has an open disk"):
        reader.open_disk(MemFile(b"", "other.img"), MemResolver({}), None)
    disk.close()
    disk.close()
    assert file.closed == 1
    with pytest.raises(IsolationError, match=r"^image: the disk is closed$"):
        disk.read_into(0, memoryview(bytearray(10)))
    # the next disk, in the same VM
    again = reader.open_disk(MemFile(b"y" * 512, "next.img"), MemResolver({}), None)
    buf = bytearray(3)
    again.read_into(0, memoryview(buf))
    assert buf == b"yyy"
    again.close()


def test_a_closed_reader_refuses_reads(reader: KvmReader) -> None:
    disk = reader.open_disk(MemFile(b"x" * 512, "disk.img"), MemResolver({}), None)
    reader.close()
    with pytest.raises(IsolationError, match=r"^image: the guest reader is closed$"):
        disk.read_into(0, memoryview(bytearray(10)))
    disk.close()


def test_reads_outside_the_main_thread_are_refused(reader: KvmReader) -> None:
    disk = reader.open_disk(MemFile(b"x" * 512, "disk.img"), MemResolver({}), None)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            disk.read_into(0, memoryview(bytearray(10)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert [str(e) for e in errors] == ["image: the guest reader must run in the main thread"]
    disk.close()


# -- formats: detected in Python, as the registry detects them -------------------------


def hostile_reader(
    guest: Path, watchdog_floor: float = 15.0, watchdog_rate: float = 16 * MiB
) -> KvmReader:
    return KvmReader(
        "top.img", guest=guest, watchdog_floor=watchdog_floor, watchdog_rate=watchdog_rate
    )


@pytest.mark.parametrize(
    ("head", "fmt", "code"),
    [
        (QCOW2_HEAD, None, L.FMT_QCOW2),
        (QCOW2_HEAD, "raw", L.FMT_RAW),  # a named format is not detected
        (data_of(1000), "qcow2", L.FMT_QCOW2),
        (data_of(1000), None, L.FMT_RAW),
    ],
)
def test_the_top_layer_is_given_to_the_guest_as_detected_or_named(
    kvm_hostile_guest: Path, head: bytes, fmt: str | None, code: int
) -> None:
    """The hostile guest answers CMD_OPEN with the format and size it was given."""
    kvm = hostile_reader(kvm_hostile_guest)
    try:
        disk = kvm.open_disk(MemFile(head, "top.img"), MemResolver({}), fmt)
        assert disk.virtual_size == code << 40 | len(head)
        assert disk.format_name == {L.FMT_RAW: "raw", L.FMT_QCOW2: "qcow2"}[code]
        disk.close()
    finally:
        kvm.close()


@needs_qemu
@pytest.mark.parametrize("fmt", [None, "vhdx"])
def test_a_vhdx_log_larger_than_8_mib_is_replayed_in_the_guest(
    reader: KvmReader, tmp_path: Path, fmt: str | None
) -> None:
    """A 16 MiB dirty log (qemu writes 1 MiB ones) streams through the guest's windows:
    the image reads as the Python decoder reads it."""
    path = hostile.vhdx_dirty(
        hostile.vhdx(tmp_path / "big-log.vhdx", "2M", "log_size=16M", ("write -P 0x61 0 64k",))
    )
    data = path.read_bytes()
    python = registry.open_disk(MemFile(data, "big-log.vhdx"), MemResolver({}), fmt)
    expected = bytearray(2 * MiB)
    python.read_into(0, memoryview(expected))
    assert expected[:4] == b"aaaa" and python.virtual_size == 2 * MiB
    disk = reader.open_disk(MemFile(data, "big-log.vhdx"), MemResolver({}), fmt)
    try:
        got = bytearray(2 * MiB)
        disk.read_into(0, memoryview(got))
        assert disk.virtual_size == 2 * MiB and got == expected
    finally:
        disk.close()


@pytest.mark.parametrize(("head", "fmt"), [(LUKS_HEAD, None), (b"x" * 512, "foo"), (b"", "vvfat")])
def test_refusals_are_the_registrys(reader: KvmReader, head: bytes, fmt: str | None) -> None:
    with pytest.raises((ImageError, UsageError)) as python:
        registry.open_disk(MemFile(head, "disk.img"), MemResolver({}), fmt)
    with pytest.raises((ImageError, UsageError)) as kvm:
        reader.open_disk(MemFile(head, "disk.img"), MemResolver({}), fmt)
    assert type(kvm.value) is type(python.value)
    assert str(kvm.value) == str(python.value)


# -- what the guest opens ---------------------------------------------------------------


def script(*requests: tuple[int, bytes, int, int]) -> bytes:
    """An image whose opening the hostile guest scripts: each request (op, REQ body,
    length, status) is rung in turn; a READY ends the command with it."""
    out = b"AIODDRNG" + len(requests).to_bytes(8, "little")
    for op, body, length, status in requests:
        out += len(body).to_bytes(8, "little") + L.DESC.pack(op, 0, 0, length, 0, status) + body
    return out


def open_request(
    name: str, fmt: str = "", *, referrer: int = 0, kind: int = L.REF_BACKING
) -> tuple[int, bytes, int, int]:
    raw, raw_fmt = name.encode(), fmt.encode()
    body = L.OPEN_REQ.pack(referrer, kind, len(raw), len(raw_fmt)) + raw + raw_fmt
    return (L.OP_OPEN, body, 0, 0)


def ready(status: int, layer: int = 0, message: str = "", length: int = 0) -> tuple[
    int, bytes, int, int
]:  # fmt: skip
    raw = message.encode()
    return (L.OP_READY, L.ERROR.pack(layer, len(raw)) + raw, length, status)


def opened(virtual_size: int) -> tuple[int, int, int]:
    """The hostile guest's answer: the last open's (handle, format, size)."""
    return virtual_size >> 48, virtual_size >> 40 & 0xFF, virtual_size & ((1 << 40) - 1)


@pytest.mark.parametrize(
    ("base", "fmt", "code"),
    [
        (QCOW2_HEAD, "", L.FMT_QCOW2),
        (data_of(3000), "", L.FMT_RAW),
        (QCOW2_HEAD, "raw", L.FMT_RAW),  # the image's backing format is honoured
        (data_of(3000), "qcow2", L.FMT_QCOW2),
    ],
)
def test_a_backing_file_is_opened_by_the_resolver_and_detected(
    kvm_hostile_guest: Path, base: bytes, fmt: str, code: int
) -> None:
    resolver = MemResolver({"base.img": base})
    top = MemFile(script(open_request("base.img", fmt)), "top.img")
    kvm = hostile_reader(kvm_hostile_guest)
    try:
        disk = kvm.open_disk(top, resolver, None)
        assert opened(disk.virtual_size) == (1, code, len(base))
        assert resolver.log == [("top", Reference("backing", "base.img", "top.img", fmt or None))]
        disk.close()
        assert top.closed == 1 and [f.closed for f in resolver.opened] == [1]
    finally:
        kvm.close()


def test_a_chain_asks_each_layers_own_resolver(kvm_hostile_guest: Path) -> None:
    resolver = MemResolver({"mid.img": QCOW2_HEAD, "base.img": QCOW2_HEAD, "data": b"d" * 70})
    top = MemFile(
        script(
            open_request("mid.img"),
            open_request("base.img", "qcow2", referrer=1),
            open_request("data", kind=L.REF_DATA_FILE, referrer=2),
        ),
        "top.img",
    )
    kvm = hostile_reader(kvm_hostile_guest)
    try:
        disk = kvm.open_disk(top, resolver, None)
        assert opened(disk.virtual_size) == (3, L.FMT_NONE, 70)
        assert resolver.log == [
            ("top", Reference("backing", "mid.img", "top.img")),
            ("mid.img", Reference("backing", "base.img", "mid.img", "qcow2")),
            ("base.img", Reference("data_file", "data", "base.img")),
        ]
        disk.close()
        assert [f.closed for f in resolver.opened] == [1, 1, 1] and top.closed == 1
    finally:
        kvm.close()


@pytest.mark.parametrize(
    ("files", "request_", "message"),
    [
        ({"base.luks": LUKS_HEAD}, open_request("base.luks"), None),
        ({}, open_request("missing.img"), "top.img: backing 'missing.img' is refused"),
        ({}, open_request("gone", kind=L.REF_DATA_FILE),
         "top.img: data_file 'gone' is refused"),
    ],
    ids=["foreign luks", "refused backing", "refused data file"],
)  # fmt: skip
def test_a_refused_open_is_raised_as_the_host_raised_it(
    kvm_hostile_guest: Path,
    files: dict[str, bytes],
    request_: tuple[int, bytes, int, int],
    message: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refusal reaches the caller as raised (the resolver's own exception); the files
    the chain opened are closed, the top layer stays the caller's, the VM goes on."""
    resolver = MemResolver(files)
    top = MemFile(script(open_request("ok.img"), request_), "top.img")
    resolver.files["ok.img"] = b"ok" * 300
    kvm = hostile_reader(kvm_hostile_guest)
    try:
        with pytest.raises(ImageError) as info:
            kvm.open_disk(top, resolver, None)
        if message is None:  # as the registry would have refused the file
            name, data = next(iter(files.items()))
            with pytest.raises((ImageError, UsageError)) as python:
                fmt = request_[1][L.OPEN_REQ.size + len(name) :].decode() or None
                registry.open_disk(MemFile(data, name), MemResolver({}), fmt)
            message = str(python.value)
            assert type(info.value) is type(python.value)
        assert str(info.value) == message
        if resolver.refusals:
            assert info.value is resolver.refusals[0]
        assert top.closed == 0 and all(f.closed == 1 for f in resolver.opened)
        disk = kvm.open_disk(MemFile(b"fine" * 128, "fine.img"), MemResolver({}), None)
        assert opened(disk.virtual_size) == (0, L.FMT_RAW, 512)
        disk.close()
    finally:
        kvm.close()


def test_an_unknown_named_format_is_the_registrys_usage_error(kvm_hostile_guest: Path) -> None:
    resolver = MemResolver({"base.img": b"x" * 10})
    top = MemFile(script(open_request("base.img", "nonsense")), "top.img")
    kvm = hostile_reader(kvm_hostile_guest)
    try:
        with pytest.raises(UsageError) as info:
            kvm.open_disk(top, resolver, None)
        assert str(info.value) == (
            "unknown input format 'nonsense': supported formats are"
            " parallels, qcow, qcow2, qed, raw, vdi, vhdx, vmdk, vpc"
        )
    finally:
        kvm.close()


@pytest.mark.parametrize("status", [L.E_IMAGE, L.E_UNSUPPORTED])
def test_the_guests_errors_name_their_layer(kvm_hostile_guest: Path, status: int) -> None:
    resolver = MemResolver({"base.qcow2": QCOW2_HEAD})
    message = "qcow2 L1 table at 0x30000 extends past the end of the file"
    top = MemFile(script(open_request("base.qcow2"), ready(status, 1, message)), "top.img")
    kvm = hostile_reader(kvm_hostile_guest)
    try:
        with pytest.raises(ImageError) as info:
            kvm.open_disk(top, resolver, None)
        kind = {L.E_IMAGE: "ImageError", L.E_UNSUPPORTED: "UnsupportedImageError"}[status]
        assert type(info.value).__name__ == kind
        assert str(info.value) == f"base.qcow2: {message}"
        assert info.value.fmt == "qcow2"
        assert [f.closed for f in resolver.opened] == [1] and top.closed == 0
    finally:
        kvm.close()


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ((ready(L.E_NOMEM),), "top.img: the guest reader ran out of memory (its limit is 32 MiB)"),
        (
            (open_request("d", kind=L.REF_DATA_FILE), open_request("x", referrer=1)),
            "top.img: the guest reader broke the ABI (open named by handle 1, which is not an"
            " image)",
        ),
        (
            (open_request("d", kind=L.REF_DATA_FILE),) * MAX_FILES,
            f"top.img: the guest reader broke the ABI (open of more than {MAX_FILES} files)",
        ),
        (
            (ready(L.OK, length=1 << 63),),
            f"top.img: the guest reader broke the ABI (reported a virtual size of {1 << 63} bytes)",
        ),
    ],
)
def test_a_guest_that_misbehaves_while_opening(
    kvm_hostile_guest: Path, requests: tuple[tuple[int, bytes, int, int], ...], message: str
) -> None:
    resolver = MemResolver({"d": b"data", "x": b"x"})
    top = MemFile(script(*requests), "top.img")
    kvm = hostile_reader(kvm_hostile_guest)
    try:
        with pytest.raises(IsolationError) as info:
            kvm.open_disk(top, resolver, None)
        assert str(info.value) == message
        assert top.closed == 0 and all(f.closed == 1 for f in resolver.opened)
        with pytest.raises(IsolationError, match="is closed"):
            kvm.open_disk(top, resolver, None)
    finally:
        kvm.close()


# -- a guest that misbehaves while reading ---------------------------------------------


def test_more_output_than_asked_ends_the_vm(kvm_hostile_guest: Path) -> None:
    kvm = hostile_reader(kvm_hostile_guest)
    top = MemFile(b"t" * 10000, "top.img")
    disk = kvm.open_disk(top, MemResolver({}), "raw")
    assert isinstance(disk, KvmDisk)
    with pytest.raises(IsolationError) as info:
        disk.read_into(0, memoryview(bytearray(4096)))
    assert str(info.value) == (
        "top.img: the guest reader broke the ABI (reported 4097 bytes of output for a read of 4096)"
    )
    assert kvm.ioctl_fds == (-1, -1)
    disk.close()
    assert top.closed == 1
    kvm.close()


def test_the_watchdog_stops_a_read(kvm_hostile_guest: Path) -> None:
    kvm = hostile_reader(kvm_hostile_guest, watchdog_floor=0.5, watchdog_rate=1 << 40)
    disk = kvm.open_disk(MemFile(b"t" * 10000, "top.img"), MemResolver({}), "raw")
    started = time.monotonic()
    with pytest.raises(IsolationError) as info:
        disk.read_into(4096, memoryview(bytearray(4096)))  # the hostile guest spins there
    assert time.monotonic() - started < 2.5
    assert str(info.value) == (
        "top.img: the guest reader did not finish within 0.5 s (watchdog) and was stopped"
    )
    disk.close()
    kvm.close()


@needs_qemu
@pytest.mark.parametrize(
    ("most", "factor", "held"),
    [(256, 1, True), (256, MAP_FACTOR, True), (1, MAP_FACTOR, True), (256, 0, True),
     (256, MAP_FACTOR, False)],
)  # fmt: skip
def test_a_mapped_read_leaves_the_reads_of_held_files_to_the_host(
    tmp_path: Path, most: int, factor: int, held: bool
) -> None:
    """A read's map (KvmDisk.read_map): the reads of the files the host holds, left to
    it, made in order over what the guest wrote, are the image's bytes, each byte read
    once; with more extents or bytes than the map may hold, or a file the host does not
    hold, the guest reads everything itself and the map is empty (docs/kvm.md, "Reads
    the host finishes")."""
    (tmp_path / "base.raw").write_bytes(data_of(4 * MiB, seed=7))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    # Clusters written last-first lie first-last in the file: an extent each.
    writes = ["write -P 0x11 3M 64k", "write -P 0x22 2M 64k", "write -P 0x33 1M 128k"]
    qemu_io(top, [*writes, "write -z 512k 64k"], fmt="qcow2")
    want = bytearray(4 * MiB)
    python = HeldResolver(tmp_path, {})
    expected = registry.open_disk(python.open("top.qcow2"), python, None)
    expected.read_into(0, memoryview(want))
    expected.close()
    layers: dict[int, int] = {}
    resolver = HeldResolver(tmp_path, layers if held else {})
    memory = shared_buffer(4 * MiB)
    kvm = KvmReader("top.qcow2", [memory], host_layers=layers, map_extents=most, map_factor=factor)
    try:
        disk = kvm.open_disk(resolver.open("top.qcow2"), resolver, None)
        with memoryview(memory) as view:
            view[:] = b"\xaa" * len(view)
            extents = disk.read_map(0, view)
            for i in range(0, len(extents), 4):
                layer, offset, length, moff = extents[i : i + 4]
                part = view[moff : moff + length]
                got = resolver.files[layer].readinto(offset, part)
                part[got:] = bytes(length - got)
            assert view == want
            disk.read_into(0, view)  # never a map
            assert view == want
        if most == 256 and factor and held:
            assert {extents[i] for i in range(0, len(extents), 4)} == {0, 1}  # both layers
            assert len(extents) // 4 >= 8  # three of the top's, five of the base's
        else:
            assert extents == ()
        disk.close()
    finally:
        kvm.close()
        memory.close()
