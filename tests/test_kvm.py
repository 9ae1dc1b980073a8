"""The KVM guest's VMM (docs/kvm.md): it boots the C guest, maps the caller's buffers as
slots, serves the guest's readv and open requests, runs zlib and zstd inside it, and turns
every way a hostile guest can stop, and every request that breaks the ABI, into one
IsolationError within the watchdog's time.  The reader on top is tested in
tests/test_kvm_reader.py."""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import random
import re
import signal
import statistics
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from aiodd.errors import ImageError, IsolationError, UnsupportedImageError
from aiodd.formats.base import RandomAccessFile
from aiodd.guest.kvm import GUEST, availability, elf, vmm
from aiodd.guest.kvm import layout as L
from aiodd.guest.kvm.build import RUNTIME, BuildError, build
from aiodd.guest.kvm.vmm import KVM_RUN, AbiViolation, GuestVM, slot_address
from aiodd.guest.memory import shared_buffer
from aiodd.io import LocalFile

_AVAILABLE, _WHY = availability()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"KVM guest reader unavailable: {_WHY}")

FILE_SIZE = 9 * 1024 * 1024 + 123  # past the OUT window, and not a multiple of anything


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFile, bytes]]:
    data = os.urandom(FILE_SIZE)
    path = tmp_path_factory.mktemp("kvm") / "random.bin"
    path.write_bytes(data)
    file = LocalFile.open(str(path), "random.bin")
    yield file, data
    file.close()


@pytest.fixture
def vm(data_file: tuple[LocalFile, bytes]) -> Iterator[GuestVM]:
    with GuestVM([data_file[0]], name="disk.raw") as guest:
        yield guest


class MemFile:
    """An in-memory file: the host reads only through ``readinto``."""

    def __init__(self, data: bytes, name: str = "mem.img", error: OSError | None = None):
        self.data = data
        self._name = name
        self.error = error
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
        if self.error is not None:
            raise self.error
        chunk = self.data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self.closed += 1


# -- the ABI, both sides ---------------------------------------------------------------


def test_abi_header_and_layout_agree() -> None:
    text = (RUNTIME / "abi.h").read_text()
    defines = dict(re.findall(r"#define AIODD_(\w+) (0x[0-9A-Fa-f]+|\d+)", text))
    assert len(defines) == 53
    for name, value in defines.items():
        assert getattr(L, name) == int(value, 0), name
    assert "#define AIODD_MAX_SEGMENTS (AIODD_REQ_SIZE / 40)" in text
    assert L.MAX_SEGMENTS == L.REQ_SIZE // 40 == L.REQ_SIZE // L.SEGMENT.size

    def fields(struct_name: str) -> list[tuple[str, str]]:
        found = re.search(rf"struct {struct_name} \{{(.*?)\}};", text, re.S)
        assert found is not None, struct_name
        return re.findall(r"uint(\d+)_t (\w+);", found.group(1))

    def fmt(types: list[tuple[str, str]]) -> str:
        return "<" + "".join({"32": "I", "64": "Q"}[bits] for bits, _ in types)

    assert [n for _, n in fields("aiodd_desc")] == [
        "op", "handle", "offset", "length", "address", "status",
    ]  # fmt: skip
    assert [n for _, n in fields("aiodd_segment")] == [
        "handle", "reserved", "offset", "length", "dest", "got",
    ]  # fmt: skip
    assert [n for _, n in fields("aiodd_open_req")] == [
        "referrer", "kind", "name_length", "format_length",
    ]  # fmt: skip
    assert [n for _, n in fields("aiodd_error")] == ["layer", "length"]
    for name, mirror in (
        ("aiodd_desc", L.DESC),
        ("aiodd_segment", L.SEGMENT),
        ("aiodd_open_req", L.OPEN_REQ),
        ("aiodd_error", L.ERROR),
    ):
        assert mirror.format == fmt(fields(name)), name
    assert L.SEGMENT.size - 8 == L.SEGMENT_GOT  # got is the last field


def test_address_map_regions_do_not_overlap() -> None:
    regions = sorted(
        [
            (0, L.PAGE),
            (L.GDT, L.PAGE),
            (L.TSS, L.PAGE),
            (L.PML4, 5 * L.PAGE),
            (L.FS_PAGE, L.PAGE),
            (L.MAILBOX, L.PAGE),
            (L.REQ_BASE, L.REQ_SIZE),
            (L.SLOT_TABLES, 2 * L.MAX_SLOTS * L.PAGE),
            (L.STACK_BASE, L.STACK_TOP - L.STACK_BASE),
            (L.IMAGE_BASE, L.IMAGE_END - L.IMAGE_BASE),
            (L.HEAP_BASE, L.HEAP_SIZE),
            (L.IN_BASE, L.IN_SIZE),
            (L.OUT_BASE, L.OUT_SIZE),
            *((slot_address(i), L.SLOT_STRIDE) for i in range(L.MAX_SLOTS)),
        ]
    )
    for (a, size), (b, _) in itertools.pairwise(regions):
        assert a + size < b or (a + size == b and (a in (0, L.GDT) or a >= L.SLOT_BASE)), hex(a)
    # After OUT, RAM ends: the page tables map nothing there (a hostile test writes it)
    assert L.OUT_BASE + L.OUT_SIZE == L.RAM_SIZE
    # The slots lie above RAM and the VMX pages, all under one PML4 entry
    assert L.RAM_SIZE < L.VMX_TSS < L.SLOT_BASE
    assert slot_address(L.MAX_SLOTS) <= 1 << 39


# -- raw reads through the shipped guest -------------------------------------------------


def read(vm: GuestVM, offset: int, length: int) -> bytes:
    vm.read(offset, length, L.OUT_BASE)
    return vm.output(length)


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 0),
        (0, 1),
        (1, 4095),
        (4093, 8193),
        (123457, 1 << 20),
        (1, L.IN_SIZE + 17),  # more than IN: the guest reads straight into OUT
        (7, L.OUT_SIZE),  # the whole window
        (FILE_SIZE - 5, 5),
    ],
)
def test_raw_reads_the_file(
    vm: GuestVM, data_file: tuple[LocalFile, bytes], offset: int, length: int
) -> None:
    assert vm.open(L.FMT_RAW) == (FILE_SIZE + 511) // 512 * 512
    assert read(vm, offset, length) == data_file[1][offset : offset + length]


def test_raw_reads_zeros_past_the_end_of_file(
    vm: GuestVM, data_file: tuple[LocalFile, bytes]
) -> None:
    data = data_file[1]
    vm.open(L.FMT_RAW)
    assert read(vm, FILE_SIZE - 10, 4096) == data[-10:] + bytes(4086)
    assert read(vm, FILE_SIZE, 4096) == bytes(4096)
    assert read(vm, FILE_SIZE + (1 << 40), 4096) == bytes(4096)
    # and the VM goes on serving
    assert read(vm, 100, 200) == data[100:300]


def test_raw_many_reads_in_one_vm(vm: GuestVM, data_file: tuple[LocalFile, bytes]) -> None:
    data = data_file[1]
    vm.open(L.FMT_RAW)
    rng = random.Random(7)
    for _ in range(50):
        offset = rng.randrange(FILE_SIZE)
        length = rng.randrange(1, 300_000)
        expected = data[offset : offset + length]
        assert read(vm, offset, length) == expected + bytes(length - len(expected))


def test_read_out_of_range_is_refused_on_the_host(vm: GuestVM) -> None:
    vm.open(L.FMT_RAW)
    for offset, length, address in (
        (-1, 1, L.OUT_BASE),
        (1 << 63, 1, L.OUT_BASE),
        (0, -1, L.OUT_BASE),
    ):
        with pytest.raises(ValueError, match="read out of range"):
            vm.read(offset, length, address)
    for offset, length, address in (
        (0, L.OUT_SIZE + 1, L.OUT_BASE),
        (0, 16, L.OUT_BASE - 1),
        (0, 16, L.IN_BASE),
        (0, 16, L.SLOT_BASE),  # no slot here
        (0, 2, L.OUT_BASE + L.OUT_SIZE - 1),
    ):
        with pytest.raises(ValueError, match="output range outside OUT and the slots"):
            vm.read(offset, length, address)
    assert read(vm, 0, 10) != bytes(10)


def test_the_shipped_guest_refuses_what_it_does_not_decode(vm: GuestVM) -> None:
    with pytest.raises(IsolationError) as info:
        vm.read(0, 16, L.OUT_BASE)  # nothing open
    assert str(info.value) == "disk.raw: the guest reader refused the request 0x105"
    assert vm.closed


def test_a_failed_read_is_raised_as_the_file_raised_it() -> None:
    failure = OSError(errno.EIO, "Input/output error")
    with GuestVM([MemFile(b"x" * 1000, "bad.img", failure)], name="bad.img") as guest:
        guest.open(L.FMT_RAW)
        with pytest.raises(OSError) as info:
            read(guest, 0, 10)
        assert info.value is failure
        assert guest.zlib(zlib.compress(b"still alive")) == b"still alive"


def test_in_memory_files_are_read_through_readinto() -> None:
    data = os.urandom(70_000)
    with GuestVM([MemFile(data)]) as guest:
        assert guest.open(L.FMT_RAW) == 70_144
        assert read(guest, 1, 69_999) == data[1:]
        assert read(guest, 69_000, 1144) == data[69_000:] + bytes(144)


# -- memory slots ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4096, 10_000, 2 << 20, (2 << 20) + 12288, 5 << 20])
def test_raw_reads_straight_into_a_slot(data_file: tuple[LocalFile, bytes], size: int) -> None:
    file, data = data_file
    memory = shared_buffer(size)
    try:
        with GuestVM([file], memories=[memory]) as guest:
            guest.open(L.FMT_RAW)
            guest.read(17, size, slot_address(0))
            assert memory[:] == data[17 : 17 + size]
            guest.read(FILE_SIZE - 100, 200, slot_address(0) + size - 200)
            assert memory[size - 200 :] == data[-100:] + bytes(100)
            # the last byte, not one past it
            with pytest.raises(ValueError, match="output range outside"):
                guest.read(0, 2, slot_address(0) + size - 1)
    finally:
        memory.close()


class _CountingFile(LocalFile):
    sparse_reads = 0

    def readinto_sparse(
        self, offset: int, buf: memoryview, holes: list[tuple[int, int]] | None = None
    ) -> int:
        self.sparse_reads += 1
        return super().readinto_sparse(offset, buf, holes)


def test_long_reads_zero_a_local_file_s_holes_instead_of_reading_them(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    with path.open("wb") as f:
        f.truncate(8 << 20)
        f.seek((3 << 20) + 5)
        f.write(b"data" * 1024)
    expected = path.read_bytes()
    file = _CountingFile(os.open(path, os.O_RDONLY), "sparse.raw")
    memory = shared_buffer(4 << 20)
    try:
        with GuestVM([file], memories=[memory]) as guest:
            guest.open(L.FMT_RAW)
            guest.read(1 << 20, 4 << 20, slot_address(0))
            assert memory[:] == expected[1 << 20 : 5 << 20]
            assert file.sparse_reads == 1
            guest.read((3 << 20) + 1, 4096, slot_address(0))  # short: a plain read
            assert memory[:4096] == expected[(3 << 20) + 1 : (3 << 20) + 4097]
            assert file.sparse_reads == 1
    finally:
        memory.close()
        file.close()


def test_several_slots_and_plain_anonymous_memory(data_file: tuple[LocalFile, bytes]) -> None:
    file, data = data_file
    memories = [shared_buffer(1 << 20), mmap.mmap(-1, 3 << 20), shared_buffer(4096)]
    try:
        with GuestVM([file], memories=memories) as guest:
            guest.open(L.FMT_RAW)
            for index, memory in enumerate(memories):
                guest.read(index * 1000, len(memory), slot_address(index))
                assert memory[:] == data[index * 1000 : index * 1000 + len(memory)]
            # a buffer of ours inside a slot is found there; anything else is not
            with memoryview(memories[1]) as view:
                assert guest.locate(view[100:200]) == slot_address(1) + 100
                assert guest.locate(view) == slot_address(1)
                assert guest.locate(view.toreadonly()) is None
            assert guest.locate(memoryview(bytearray(100))) is None
    finally:
        for memory in memories:
            memory.close()


def test_slots_are_checked_before_the_vm_starts() -> None:
    with pytest.raises(ValueError, match=f"at most {L.MAX_SLOTS} memories"):
        GuestVM(memories=[mmap.mmap(-1, 4096) for _ in range(L.MAX_SLOTS + 1)])
    read_only = mmap.mmap(-1, 4096, prot=mmap.PROT_READ)
    with pytest.raises(ValueError, match="memory 0 is not a writable mapping"):
        GuestVM(memories=[read_only])
    read_only.close()


@pytest.mark.parametrize(
    ("size", "where", "faults"),
    [
        (4096, 4088, False),
        (4096, 4096, True),  # past the slot's end: nothing is mapped
        (10_000, 9_992, False),
        (10_000, 12_280, False),  # rounded up to 4 KiB
        (10_000, 12_288, True),
        ((2 << 20) + 8192, (2 << 20) + 8184, False),  # the tail's 4 KiB pages
        ((2 << 20) + 8192, (2 << 20) + 8192, True),
        (4 << 20, (4 << 20) - 8, False),  # 2 MiB pages, no tail
        (4 << 20, 4 << 20, True),
    ],
)
def test_a_slot_is_mapped_to_its_end_and_no_further(
    kvm_hostile_guest: Path, size: int, where: int, faults: bool
) -> None:
    memory = shared_buffer(size)
    other = shared_buffer(4096)
    try:
        guest = GuestVM(guest=kvm_hostile_guest, memories=[memory, other], timeout=HOSTILE_TIMEOUT)
        if faults:
            with pytest.raises(IsolationError, match=r"faulted \(triple fault\)$"):
                guest.command(NULL_WRITE, offset=slot_address(0) + where)
            assert guest.closed
        else:
            guest.command(NULL_WRITE, offset=slot_address(0) + where)
            if where < size:  # else in the last page's rounding, which Python does not see
                assert memory[where : where + 8] == (1).to_bytes(8, "little")
            guest.command(NULL_WRITE, offset=slot_address(1))
            assert other[:8] == (1).to_bytes(8, "little")
            # never executable
            with pytest.raises(IsolationError, match=r"faulted \(triple fault\)$"):
                guest.command(EXEC_AT, offset=slot_address(0))
    finally:
        memory.close()
        other.close()


# -- zlib and zstd, inside the guest ---------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 65536, 3_000_000, L.OUT_SIZE])
def test_zlib_round_trip(vm: GuestVM, data_file: tuple[int, bytes], size: int) -> None:
    data = data_file[1][:size] if size < 3_000_000 else b"ab" * (size // 2)
    assert vm.zlib(zlib.compress(data)) == data


@pytest.mark.parametrize("size", [0, 1, 65536, 3_000_000, L.OUT_SIZE])
def test_zstd_round_trip(vm: GuestVM, data_file: tuple[int, bytes], size: int) -> None:
    data = data_file[1][:size] if size < 3_000_000 else b"xyz" * (size // 3)
    assert vm.zstd(zstandard.ZstdCompressor(level=3).compress(data)) == data


def test_zstd_several_frames(vm: GuestVM) -> None:
    one = zstandard.ZstdCompressor().compress(b"one" * 1000)
    two = zstandard.ZstdCompressor().compress(b"two" * 1000)
    assert vm.zstd(one + two) == b"one" * 1000 + b"two" * 1000


def test_corrupt_and_oversized_data_are_image_errors(vm: GuestVM) -> None:
    good = zlib.compress(b"hello" * 1000)
    cases: list[tuple[bytes, str, str]] = [
        (good[:-1], "zlib", "disk.raw: compressed data does not decode"),
        (b"\x00" * 64, "zlib", "disk.raw: compressed data does not decode"),
        (zlib.compress(bytes(L.OUT_SIZE + 1)), "zlib",
         f"disk.raw: compressed data decodes to more than {L.OUT_SIZE} bytes"),
        (os.urandom(1000), "zstd", "disk.raw: compressed data does not decode"),
        (zstandard.ZstdCompressor().compress(b"abc" * 10000)[:-3], "zstd",
         "disk.raw: compressed data does not decode"),
        (zstandard.ZstdCompressor().compress(bytes(L.OUT_SIZE + 1)), "zstd",
         f"disk.raw: compressed data decodes to more than {L.OUT_SIZE} bytes"),
    ]  # fmt: skip
    for data, codec, message in cases:
        with pytest.raises(ImageError) as info:
            vm.zlib(data) if codec == "zlib" else vm.zstd(data)
        assert str(info.value) == message
    # the VM survives every one of them
    assert vm.zstd(zstandard.ZstdCompressor().compress(b"ok")) == b"ok"


def test_zstd_window_is_capped(vm: GuestVM) -> None:
    """A streamed frame asking for a window past 4 MiB (windowLog 22) is refused, not
    allocated.  A frame that states its size and fits in OUT is decoded in one pass
    straight into OUT, with no window to allocate: that one is fine."""
    params = zstandard.ZstdCompressionParameters(window_log=25, enable_ldm=True)
    data = os.urandom(1 << 20) * 6  # repeats 1 MiB apart: the long window is used
    # streamed, its size unknown: the frame names its 32 MiB window
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    streamed = stream.compress(data) + stream.flush()
    assert zstandard.get_frame_parameters(streamed).window_size == 1 << 25
    with pytest.raises(ImageError, match="compressed data does not decode"):
        vm.zstd(streamed)
    sized = zstandard.ZstdCompressor(compression_params=params).compress(data)
    assert zstandard.get_frame_parameters(sized).content_size == len(data)
    assert vm.zstd(sized) == data


def test_input_larger_than_the_window(vm: GuestVM) -> None:
    with pytest.raises(ValueError, match="input larger than the window"):
        vm.zlib(bytes(L.IN_SIZE + 1))


# -- start-up --------------------------------------------------------------------------


def test_vm_start_time(data_file: tuple[LocalFile, bytes]) -> None:
    times = []
    for _ in range(20):
        with GuestVM([data_file[0]]) as guest:
            times.append(guest.start_time)
    median = statistics.median(times)
    print(f"KVM guest start: median {median * 1e3:.2f} ms, best {min(times) * 1e3:.2f} ms")
    assert median < 0.05


def test_start_outside_the_main_thread_is_refused() -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            GuestVM()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], IsolationError)
    assert str(errors[0]) == "image: the KVM guest reader must run in the main thread"


def test_closed_vm_refuses_work(data_file: tuple[LocalFile, bytes]) -> None:
    guest = GuestVM([data_file[0]])
    assert guest.ioctl_requests == (KVM_RUN,)
    assert len(set(guest.ioctl_fds)) == 2 and min(guest.ioctl_fds) >= 0
    guest.close()
    guest.close()
    assert guest.ioctl_fds == (-1, -1)
    with pytest.raises(IsolationError, match=r"^image: the guest reader is closed$"):
        guest.open(L.FMT_RAW)
    with pytest.raises(IsolationError, match=r"^image: the guest reader is closed$"):
        guest.zlib(b"")


# -- the guest binary ------------------------------------------------------------------


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_elf_loader_accepts_the_guest_and_maps_it_w_xor_x() -> None:
    image = elf.parse(GUEST.read_bytes())
    assert [(s.executable, s.writable) for s in image.segments] == [
        (True, False),
        (False, False),
        (False, True),
    ]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (lambda d: _patched(d, 0, b"\x7fELG"), "not a little-endian ELF64"),
        (lambda d: _patched(d, 16, b"\x03\x00"), "not a static x86-64 executable"),
        (lambda d: _patched(d, 64 + 4, b"\x07\x00\x00\x00"), "both writable and executable"),
        (lambda d: _patched(d, 64, b"\x03\x00\x00\x00"), "unexpected program header type 0x3"),
        (lambda d: _patched(d, 64 + 16, (0x1000).to_bytes(8, "little")), "outside the image"),
        (lambda d: _patched(d, 24, (0x100).to_bytes(8, "little")), "entry point outside"),
        (lambda d: d[:100], "program headers outside the file"),
    ],
)
def test_elf_loader_is_strict(patch: object, message: str, tmp_path: Path) -> None:
    assert callable(patch)
    bad = patch(GUEST.read_bytes())
    with pytest.raises(ValueError, match=message):
        elf.parse(bad)
    path = tmp_path / "bad.elf"
    path.write_bytes(bad)
    with pytest.raises(IsolationError, match=r"^image: the KVM guest binary is invalid: "):
        GuestVM(guest=path)


# -- hostile guests --------------------------------------------------------------------

HOSTILE_TIMEOUT = 0.5
FAULT = "the guest reader faulted (triple fault)"
NULL_WRITE, HEAP_COUNT, RING, EXEC_AT = 0x201, 0x204, 0x213, 0x214

HOSTILE = {
    "null write": (0x201, {}, FAULT),
    "write to its own text": (0x202, {}, FAULT),
    "heap exhausted": (0x205, {}, "the guest reader ran out of memory (its limit is 32 MiB)"),
    "read longer than the window": (
        0x206,
        {},
        f"the guest reader broke the ABI (readv segment 0 writes {L.IN_SIZE + 1} bytes at "
        f"{L.IN_BASE:#x}, outside IN and the command's output)",
    ),
    "read from an unknown handle": (
        0x207,
        {"handle": 9},
        "the guest reader broke the ABI (readv segment 0 reads handle 9, which does not exist)",
    ),
    "output longer than the window": (
        0x208,
        {},
        f"the guest reader broke the ABI (reported {L.OUT_SIZE + 1} bytes of output)",
    ),
    "out to an unknown port": (0x209, {"offset": 0x80}, FAULT),
    "out to the port after the fault port": (0x209, {"offset": L.PORT_FAULT + 1}, FAULT),
    "stack smashed": (0x20A, {}, "the guest reader faulted (its stack protector tripped)"),
    "write to the IN window": (0x20B, {}, FAULT),
    "write to the GDT": (0x20C, {}, FAULT),
    "read the page tables": (0x20D, {}, FAULT),
    "stack overflow": (0x20E, {}, FAULT),
    "hlt": (0x20F, {}, FAULT),
    "unknown request": (0x210, {}, "the guest reader broke the ABI (unknown request 0x63)"),
    "execute the heap": (0x211, {}, FAULT),
    "write past the OUT window": (0x212, {}, FAULT),
    "write to the page after page 0": (0x201, {"offset": 0x3000}, FAULT),
    "write to the slots' page tables": (0x201, {"offset": L.SLOT_TABLES}, FAULT),
    "write to a slot that is not there": (0x201, {"offset": L.SLOT_BASE}, FAULT),
    "execute REQ": (EXEC_AT, {"offset": L.REQ_BASE}, FAULT),
    "spin forever": (
        0x203,
        {},
        f"the guest reader did not finish within {HOSTILE_TIMEOUT:g} s (watchdog) and was stopped",
    ),
}


def assert_ends_in_one_error(
    guest: GuestVM, run: Callable[[], object], message: str, started: float
) -> None:
    """``run`` raises one IsolationError with ``message``, within the watchdog's time; the
    VM is gone, the watchdog disarmed, and the host goes on."""
    before = signal.getsignal(signal.SIGPROF)
    with pytest.raises(IsolationError) as info:
        run()
    elapsed = time.monotonic() - started
    assert str(info.value) == f"evil.img: {message}"
    # one error: no chained exception printed with it
    exc = info.value
    assert exc.__cause__ is None and (exc.__suppress_context__ or exc.__context__ is None)
    assert elapsed < HOSTILE_TIMEOUT + 2.0  # the machine is shared: slack, not a benchmark
    assert guest.closed and guest.ioctl_fds == (-1, -1)
    with pytest.raises(IsolationError, match="is closed"):
        guest.command(HEAP_COUNT, length=1)
    assert signal.getsignal(signal.SIGPROF) is before
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


@pytest.mark.parametrize("behaviour", list(HOSTILE))
def test_hostile_guest_ends_in_one_error(
    behaviour: str, kvm_hostile_guest: Path, data_file: tuple[LocalFile, bytes]
) -> None:
    op, fields, message = HOSTILE[behaviour]
    started = time.monotonic()
    guest = GuestVM(
        [data_file[0]], name="evil.img", guest=kvm_hostile_guest, timeout=HOSTILE_TIMEOUT
    )
    handle, offset = fields.get("handle", 0), fields.get("offset", 0)
    assert_ends_in_one_error(guest, lambda: guest.command(op, handle, offset), message, started)
    with GuestVM([data_file[0]]) as good:
        good.open(L.FMT_RAW)
        assert read(good, 5, 10) == data_file[1][5:15]


# Requests written in Python: the hostile guest's RING command sends them as they are.


def segment(
    handle: int = 0, offset: int = 0, length: int = 16, dest: int = L.IN_BASE,
    reserved: int = 0, got: int = 0,
) -> bytes:  # fmt: skip
    return L.SEGMENT.pack(handle, reserved, offset, length, dest, got)


def open_req(
    name: bytes, fmt: bytes = b"", *, referrer: int = 0, kind: int = L.REF_BACKING,
    name_length: int | None = None, format_length: int | None = None,
) -> bytes:  # fmt: skip
    lengths = (
        len(name) if name_length is None else name_length,
        len(fmt) if format_length is None else format_length,
    )
    return L.OPEN_REQ.pack(referrer, kind, *lengths) + name + fmt


def error_record(message: bytes, layer: int = 0, length: int | None = None) -> bytes:
    return L.ERROR.pack(layer, len(message) if length is None else length) + message


def ring(
    guest: GuestVM, op: int, body: bytes = b"", *, handle: int = 0, length: int = 0,
    status: int = 0, output: tuple[int, int] | None = None,
) -> tuple[tuple[int, ...], bytes]:  # fmt: skip
    """Have the guest ring ``op`` with ``body`` in REQ: the host's answer, and REQ after."""
    guest.input(L.DESC.pack(op, handle, 0, length, 0, status) + body)
    n = guest.command(RING, length=len(body), output=output)
    answer = guest.output(n)
    return L.DESC.unpack_from(answer), answer[L.DESC.size :]


def readv(
    guest: GuestVM, *segments: bytes, count: int | None = None,
    output: tuple[int, int] | None = None,
) -> tuple[tuple[int, ...], bytes]:  # fmt: skip
    n = len(segments) if count is None else count
    return ring(guest, L.OP_READV, b"".join(segments), length=n, output=output)


OUTPUT = (L.OUT_BASE + (1 << 20), 4096)  # the output range the ABI tests give their command
TOP = (1 << 64) - 1

ABI_VIOLATIONS: dict[str, tuple[Callable[[GuestVM], object], str]] = {
    "readv from an unknown handle": (
        lambda g: readv(g, segment(), segment(handle=1)),
        "readv segment 1 reads handle 1, which does not exist",
    ),
    "readv with reserved bits": (
        lambda g: readv(g, segment(reserved=1)),
        "readv segment 0 has reserved bits 0x1",
    ),
    "readv of too many segments": (
        lambda g: readv(g, *[segment()] * L.MAX_SEGMENTS, count=L.MAX_SEGMENTS + 1),
        f"readv of {L.MAX_SEGMENTS + 1} segments, more than {L.MAX_SEGMENTS}",
    ),
    "readv of 2^32-1 segments": (
        lambda g: readv(g, count=(1 << 32) - 1),
        f"readv of {(1 << 32) - 1} segments, more than {L.MAX_SEGMENTS}",
    ),
    "readv past 2^63-1": (
        lambda g: readv(g, segment(offset=(1 << 63) - 8, length=16)),
        "readv segment 0 reads 16 bytes at offset 9223372036854775800, past 2^63-1",
    ),
    "readv whose offset + length wraps around": (
        lambda g: readv(g, segment(offset=TOP, length=2)),
        f"readv segment 0 reads 2 bytes at offset {TOP}, past 2^63-1",
    ),
    "readv of 2^64-1 bytes": (
        lambda g: readv(g, segment(length=TOP)),
        f"readv segment 0 reads {TOP} bytes at offset 0, past 2^63-1",
    ),
    "readv into OUT outside the command's output": (
        lambda g: readv(g, segment(dest=L.OUT_BASE), output=OUTPUT),
        f"readv segment 0 writes 16 bytes at {L.OUT_BASE:#x}, outside IN and the command's output",
    ),
    "readv across the end of the command's output": (
        lambda g: readv(g, segment(dest=OUTPUT[0] + 4090, length=7), output=OUTPUT),
        f"readv segment 0 writes 7 bytes at {OUTPUT[0] + 4090:#x}, outside IN and the command's"
        " output",
    ),
    "readv into a command without output": (
        lambda g: readv(g, segment(dest=OUTPUT[0])),
        f"readv segment 0 writes 16 bytes at {OUTPUT[0]:#x}, outside IN and the command's output",
    ),
    "readv across the end of IN": (
        lambda g: readv(g, segment(dest=L.IN_BASE + L.IN_SIZE - 8)),
        f"readv segment 0 writes 16 bytes at {L.IN_BASE + L.IN_SIZE - 8:#x}, outside IN and the"
        " command's output",
    ),
    "readv whose destination wraps around": (
        lambda g: readv(g, segment(dest=TOP - 7, length=16)),
        f"readv segment 0 writes 16 bytes at {TOP - 7:#x}, outside IN and the command's output",
    ),
    "readv into the mailbox": (
        lambda g: readv(g, segment(dest=L.MAILBOX, length=40)),
        f"readv segment 0 writes 40 bytes at {L.MAILBOX:#x}, outside IN and the command's output",
    ),
    "open with a name longer than REQ": (
        lambda g: ring(g, L.OP_OPEN, open_req(b"a" * (L.REQ_SIZE - 16 + 1))),
        f"open request of {L.REQ_SIZE - 15} + 0 bytes does not fit in REQ",
    ),
    "open whose format overflows REQ": (
        lambda g: ring(g, L.OP_OPEN, open_req(b"a" * 100, b"raw", format_length=L.REQ_SIZE - 115)),
        f"open request of 100 + {L.REQ_SIZE - 115} bytes does not fit in REQ",
    ),
    "open whose lengths wrap around": (
        lambda g: ring(g, L.OP_OPEN, open_req(b"a", name_length=(1 << 32) - 1, format_length=2)),
        f"open request of {(1 << 32) - 1} + 2 bytes does not fit in REQ",
    ),
    "open named by an unknown handle": (
        lambda g: ring(g, L.OP_OPEN, open_req(b"base.img", referrer=5)),
        "open named by handle 5, which does not exist",
    ),
    "open of an unknown kind": (
        lambda g: ring(g, L.OP_OPEN, open_req(b"base.img", kind=5)),
        "open of unknown kind 5",
    ),
    "open asked of a VM without an opener": (
        lambda g: ring(g, L.OP_OPEN, open_req(b"base.img")),
        "open asked of a VM that opens no file",
    ),
    "error about an unknown handle": (
        lambda g: ring(g, L.OP_READY, error_record(b"bad", layer=7), status=L.E_IMAGE),
        "error about handle 7, which does not exist",
    ),
    "error message longer than REQ": (
        lambda g: ring(
            g, L.OP_READY, error_record(b"bad", length=L.REQ_SIZE - 7), status=L.E_UNSUPPORTED
        ),
        f"error message of {L.REQ_SIZE - 7} bytes, more than {L.REQ_SIZE - 8}",
    ),
    "refused with nothing refused": (
        lambda g: ring(g, L.OP_READY, status=L.E_REFUSED),
        "status 8 when the host failed nothing",
    ),
    "an I/O error with nothing failed": (
        lambda g: ring(g, L.OP_READY, status=L.E_IO),
        "status 5 when the host failed nothing",
    ),
    "an unknown status": (lambda g: ring(g, L.OP_READY, status=99), "status 99"),
    "more output than a read asked for": (
        lambda g: g.read(0, 4096, L.OUT_BASE),
        "reported 4097 bytes of output for a read of 4096",
    ),
    "a virtual size past 2^63-1": (
        lambda g: g.command(L.CMD_OPEN, 0, 0, 1 << 63),  # the hostile guest echoes it
        f"reported a virtual size of {1 << 63} bytes",
    ),
}


@pytest.mark.parametrize("behaviour", list(ABI_VIOLATIONS))
def test_a_request_that_breaks_the_abi_ends_in_one_error(
    behaviour: str, kvm_hostile_guest: Path, data_file: tuple[LocalFile, bytes]
) -> None:
    run, why = ABI_VIOLATIONS[behaviour]
    started = time.monotonic()
    guest = GuestVM(
        [data_file[0]], name="evil.img", guest=kvm_hostile_guest, timeout=HOSTILE_TIMEOUT
    )
    assert_ends_in_one_error(
        guest, lambda: run(guest), f"the guest reader broke the ABI ({why})", started
    )


def test_readv_fills_its_segments_and_reports_got(
    kvm_hostile_guest: Path, data_file: tuple[LocalFile, bytes]
) -> None:
    file, data = data_file
    small = MemFile(b"0123456789", "small.img")
    memory = shared_buffer(1 << 20)
    try:
        guest = GuestVM([file, small], guest=kvm_hostile_guest, memories=[memory])
        with guest:
            output = (slot_address(0) + 4096, 65536)
            answer, req = readv(
                guest,
                segment(0, 5, 1000, slot_address(0) + 4096),
                segment(1, 4, 100, slot_address(0) + 8192),  # short: the file ends
                segment(0, FILE_SIZE, 10, slot_address(0) + 9000),  # past the end: nothing
                segment(0, 0, 0, L.IN_BASE + L.IN_SIZE),  # empty, at the very end of IN
                segment(0, 7, 20, L.IN_BASE),
                output=output,
            )
            assert answer == (L.OP_READV, 0, 0, 5, 0, L.OK)
            gots = [L.SEGMENT.unpack_from(req, i * 40)[5] for i in range(5)]
            assert gots == [1000, 6, 0, 0, 20]
            assert memory[4096:5096] == data[5:1005]
            assert memory[8192:8198] == b"456789"
            assert memory[8198:8292] == bytes(94)  # what the file did not have stays
            # the whole output range, to its last byte
            readv(guest, segment(0, 0, 65536, output[0]), output=output)
            assert memory[4096 : 4096 + 65536] == data[:65536]
            assert readv(guest, count=0)[0] == (L.OP_READV, 0, 0, 0, 0, L.OK)
            # the most segments there are room for
            many = [segment(0, i, 1, L.IN_BASE + i) for i in range(L.MAX_SEGMENTS)]
            answer, req = readv(guest, *many)
            assert answer[5] == L.OK
            assert all(L.SEGMENT.unpack_from(req, i * 40)[5] == 1 for i in range(len(many)))
    finally:
        memory.close()


def test_reads_into_the_output_are_made_at_the_end_and_stay_few(
    kvm_hostile_guest: Path, data_file: tuple[LocalFile, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read into the command's output is put off to the command's end (docs/kvm.md,
    "Reads the host finishes"), but past PUT_OFF_MAX of them they are made at once."""
    monkeypatch.setattr(vmm, "PUT_OFF_MAX", 2)
    file, data = data_file
    memory = shared_buffer(1 << 20)
    try:
        guest = GuestVM([file], guest=kvm_hostile_guest, memories=[memory])
        made: list[int] = []
        make = guest._make_put_off

        def spy() -> None:
            made.append(len(guest._put_off))
            make()

        monkeypatch.setattr(guest, "_make_put_off", spy)
        with guest:
            # five reads, none next to another in the file and in the output
            pieces = [segment(0, 100 * i, 10, slot_address(0) + 1000 * i) for i in range(5)]
            answer, req = readv(guest, *pieces, output=(slot_address(0), 65536))
            assert answer[5] == L.OK
            assert [L.SEGMENT.unpack_from(req, i * 40)[5] for i in range(5)] == [10] * 5
            assert made == [2, 2, 1]  # at the third and the fifth, then at the end
            for i in range(5):
                assert memory[1000 * i : 1000 * i + 10] == data[100 * i : 100 * i + 10]
    finally:
        memory.close()


@pytest.mark.parametrize(("budget", "left"), [(30, 3), (29, 0)])
def test_reads_left_to_the_caller_stay_within_their_bytes(
    kvm_hostile_guest: Path, data_file: tuple[LocalFile, bytes], budget: int, left: int
) -> None:
    """A read may leave at most ``leave_bytes`` to its caller: past them, the VMM makes
    every one itself, those it had put aside included, and leaves none."""
    file, data = data_file
    memory = shared_buffer(1 << 20)
    try:
        guest = GuestVM([file], guest=kvm_hostile_guest, memories=[memory])
        with guest:
            guest._leave, guest._leave_max, guest._leave_bytes = (lambda h: True), 256, budget
            # three reads of 10 bytes, the last two over the same output bytes
            pieces = [segment(0, 100 * i, 10, slot_address(0) + 1000 * min(i, 1)) for i in range(3)]
            answer, _ = readv(guest, *pieces, output=(slot_address(0), 65536))
            assert answer[5] == L.OK
            assert len(guest._put_off) == left
            if not left:
                assert memory[:10] == data[:10]
                assert memory[1000:1010] == data[200:210]  # in order: the later wins
    finally:
        memory.close()


def test_a_failed_readv_is_raised_after_the_command(kvm_hostile_guest: Path) -> None:
    failure = OSError(errno.EIO, "Input/output error")
    with GuestVM([MemFile(b"abc", error=failure)], guest=kvm_hostile_guest) as guest:
        with pytest.raises(OSError) as info:
            readv(guest, segment(), segment())
        assert info.value is failure
        guest.files[0] = MemFile(b"abc")
        answer, req = readv(guest, segment(length=3))
        assert answer[5] == L.OK and L.SEGMENT.unpack_from(req)[5] == 3


def test_open_gives_the_guest_a_handle(kvm_hostile_guest: Path) -> None:
    asked: list[tuple[int, int, str, str | None]] = []
    base = MemFile(b"b" * 5000, "base.img")

    def opener(referrer: int, kind: int, name: str, fmt: str | None) -> tuple[int, int, int]:
        asked.append((referrer, kind, name, fmt))
        if name == "refused":
            raise PermissionError("no")
        if name == "broken":
            raise AbiViolation("that is not a thing")
        return guest.add_file(base, L.FMT_QCOW2), base.size, L.FMT_QCOW2

    top = MemFile(b"t" * 100, "top.img")
    guest = GuestVM([top], guest=kvm_hostile_guest, opener=opener)
    with guest:
        answer, _ = ring(guest, L.OP_OPEN, open_req(b"base\xff.img", b"qcow2"))
        assert answer == (L.OP_OPEN, 1, 5000, L.FMT_QCOW2, 0, L.OK)
        assert asked == [(0, L.REF_BACKING, "base\udcff.img", "qcow2")]
        assert guest.files == [top, base] and guest.formats == [L.FMT_NONE, L.FMT_QCOW2]
        # the new handle can be read, and can name files in turn
        answer, req = readv(guest, segment(handle=1, length=10))
        assert L.SEGMENT.unpack_from(req)[5] == 10
        ring(guest, L.OP_OPEN, open_req(b"data", kind=L.REF_DATA_FILE, referrer=1))
        assert asked[-1] == (1, L.REF_DATA_FILE, "data", None)
        # a refusal is answered, then raised as the opener raised it once the command ends
        with pytest.raises(PermissionError, match=r"^no$"):
            ring(guest, L.OP_OPEN, open_req(b"refused"))
        assert not guest.closed
        answer, _ = ring(guest, L.OP_OPEN, open_req(b"base.img"))
        assert answer[5] == L.OK
    guest = GuestVM([top], name="evil.img", guest=kvm_hostile_guest, opener=opener)
    with pytest.raises(IsolationError) as info:
        ring(guest, L.OP_OPEN, open_req(b"broken"))
    assert str(info.value) == "evil.img: the guest reader broke the ABI (that is not a thing)"
    assert guest.closed


def test_a_refusal_answers_the_guest_with_e_refused(kvm_hostile_guest: Path) -> None:
    """The guest sees E_REFUSED, and may end its command with it."""
    failure = PermissionError("refused by the policy")

    def opener(referrer: int, kind: int, name: str, fmt: str | None) -> tuple[int, int, int]:
        raise failure

    with GuestVM([MemFile(b"")], guest=kvm_hostile_guest, opener=opener) as guest:
        guest.input(L.DESC.pack(L.OP_OPEN, 0, 0, 0, 0, 0) + open_req(b"x"))
        with pytest.raises(PermissionError) as info:
            guest.command(RING, length=len(open_req(b"x")))
        assert info.value is failure
        # what the guest saw, from OUT
        assert L.DESC.unpack_from(guest.output(40))[5] == L.E_REFUSED


@pytest.mark.parametrize(
    ("status", "kind"), [(L.E_IMAGE, ImageError), (L.E_UNSUPPORTED, UnsupportedImageError)]
)
def test_an_error_record_is_the_image_error_of_its_layer(
    kvm_hostile_guest: Path, status: int, kind: type[ImageError]
) -> None:
    files: list[RandomAccessFile] = [MemFile(b"", "top.qcow2"), MemFile(b"", "base.qcow2")]
    with GuestVM(files, guest=kvm_hostile_guest) as guest:
        guest.formats[1] = L.FMT_QCOW2
        message = "qcow2 L2 table at 0x10000 lies past the end of the file \u2713".encode()
        with pytest.raises(ImageError) as info:
            ring(guest, L.OP_READY, error_record(message, layer=1), status=status)
        assert type(info.value) is kind
        assert str(info.value) == (
            "base.qcow2: qcow2 L2 table at 0x10000 lies past the end of the file \u2713"
        )
        assert info.value.fmt == "qcow2"
        # invalid UTF-8 (a name quoted from an image) is kept as the Python decoders
        # decode names, surrogateescape, then spelled out as repr spells it, as are control
        # characters; no format: None
        with pytest.raises(ImageError) as info:
            ring(guest, L.OP_READY, error_record(b"bad \xff\nline", layer=0), status=status)
        assert str(info.value) == "top.qcow2: bad \\udcff\\nline" and info.value.fmt is None
        # an empty message, and the longest
        with pytest.raises(ImageError, match=r"^top\.qcow2: $"):
            ring(guest, L.OP_READY, error_record(b""), status=status)
        longest = b"m" * (L.REQ_SIZE - 8)
        with pytest.raises(ImageError) as info:
            ring(guest, L.OP_READY, error_record(longest), status=status)
        assert str(info.value) == "top.qcow2: " + "m" * (L.REQ_SIZE - 8)
        assert not guest.closed


def test_heap_is_capped(kvm_hostile_guest: Path) -> None:
    """malloc returns NULL past the cap; every block costs a 16-byte header and rounds up
    to 16 bytes; the heap is empty again after each command."""

    def expected(block: int) -> int:
        cost = 16 + (block + 15) // 16 * 16
        return ((L.HEAP_SIZE - block - 31) // cost + 1) * block

    with GuestVM(guest=kvm_hostile_guest) as guest:
        for block in (1 << 20, 4096, 1000, 1, 1 << 20):
            total = int.from_bytes(guest.output(guest.command(0x204, length=block)), "little")
            assert total == expected(block), block
        assert expected(1 << 20) == 31 << 20


def test_unknown_command_is_refused(vm: GuestVM) -> None:
    with pytest.raises(IsolationError, match=r"^disk.raw: the guest reader refused the request "):
        vm.command(0x201)  # the shipped guest has no hostile commands


# -- availability ----------------------------------------------------------------------


def test_availability_names_what_is_missing(tmp_path: Path) -> None:
    assert availability() == (True, "")
    assert availability(device=str(tmp_path / "kvm")) == (
        False,
        f"cannot open {tmp_path / 'kvm'} read-write: No such file or directory",
    )
    assert availability(device="/dev/null") == (
        False,
        "/dev/null: KVM_GET_API_VERSION failed: Inappropriate ioctl for device",
    )
    missing = tmp_path / "guest.elf"
    assert availability(guest=missing) == (
        False,
        f"the guest binary {missing} was not built when aiodd was installed (install the "
        "Debian packages gcc zlib1g-dev libzstd-dev, then reinstall aiodd)",
    )


def test_build_without_a_compiler_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-gcc"))
    with pytest.raises(BuildError) as info:
        build(tmp_path / "guest.elf")
    assert str(info.value) == (
        f"C compiler '{tmp_path / 'no-gcc'}' not found "
        "(install the Debian packages: gcc zlib1g-dev libzstd-dev)"
    )
    assert not (tmp_path / "guest.elf").exists()
