"""The KVM guest reader (docs/kvm.md): the VMM boots the C guest, serves its reads, runs
zlib and zstd inside it, and turns every way a hostile guest can stop into one
IsolationError within the watchdog's time."""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import statistics
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from aiodd.errors import ImageError, IsolationError
from aiodd.guest.kvm import GUEST, availability, elf
from aiodd.guest.kvm import layout as L
from aiodd.guest.kvm.build import RUNTIME, BuildError, build
from aiodd.guest.kvm.vmm import GuestVM

_AVAILABLE, _WHY = availability()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"KVM guest reader unavailable: {_WHY}")

HOSTILE_SOURCE = Path(__file__).parent / "kvm" / "hostile.c"
FILE_SIZE = 9 * 1024 * 1024 + 123  # past the OUT window, and not a multiple of anything


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(FILE_SIZE)
    path = tmp_path_factory.mktemp("kvm") / "random.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


@pytest.fixture
def vm(data_file: tuple[int, bytes]) -> Iterator[GuestVM]:
    with GuestVM([data_file[0]], name="disk.raw") as guest:
        yield guest


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test-only hostile guest, built with the shipped guest's runtime and flags."""
    try:
        return build(tmp_path_factory.mktemp("hostile") / "hostile.elf", [HOSTILE_SOURCE],
                     libraries=False)  # fmt: skip
    except BuildError as exc:
        pytest.skip(f"cannot build the hostile test guest: {exc}")


# -- the ABI, both sides ---------------------------------------------------------------


def test_abi_header_and_layout_agree() -> None:
    text = (RUNTIME / "abi.h").read_text()
    defines = dict(re.findall(r"#define AIODD_(\w+) (0x[0-9A-Fa-f]+|\d+)", text))
    assert len(defines) == 29
    for name, value in defines.items():
        assert getattr(L, name) == int(value, 0), name
    # struct aiodd_desc: the same five fields, in the same order
    fields = re.search(r"struct aiodd_desc \{(.*?)\};", text, re.S)
    assert fields is not None
    types = re.findall(r"uint(\d+)_t (\w+);", fields.group(1))
    assert types == [("32", "op"), ("32", "handle"), ("64", "offset"), ("64", "length"),
                     ("64", "status")]  # fmt: skip
    assert L.DESC.format == "<IIQQQ"


def test_address_map_regions_do_not_overlap() -> None:
    regions = sorted(
        [
            (0, L.PAGE),
            (L.GDT, L.PAGE),
            (L.TSS, L.PAGE),
            (L.PML4, 5 * L.PAGE),
            (L.FS_PAGE, L.PAGE),
            (L.MAILBOX, L.PAGE),
            (L.STACK_BASE, L.STACK_TOP - L.STACK_BASE),
            (L.IMAGE_BASE, L.IMAGE_END - L.IMAGE_BASE),
            (L.HEAP_BASE, L.HEAP_SIZE),
            (L.IN_BASE, L.IN_SIZE),
            (L.OUT_BASE, L.OUT_SIZE),
        ]
    )
    for (a, size), (b, _) in itertools.pairwise(regions):
        assert a + size < b or (a + size == b and a in (0, L.GDT)), hex(a)
    # After OUT, RAM ends: the page tables map nothing there (a hostile test writes it)
    assert L.OUT_BASE + L.OUT_SIZE == L.RAM_SIZE


# -- raw reads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 0),
        (0, 1),
        (1, 4095),
        (4093, 8193),
        (123457, 1 << 20),
        (1, L.IN_SIZE + 17),  # crosses one doorbell's batch
        (7, L.OUT_SIZE),  # the whole window, three batches
        (FILE_SIZE - 5, 5),
    ],
)
def test_raw_reads_the_file(
    vm: GuestVM, data_file: tuple[int, bytes], offset: int, length: int
) -> None:
    assert vm.raw(0, offset, length) == data_file[1][offset : offset + length]


def test_raw_is_short_at_end_of_file(vm: GuestVM, data_file: tuple[int, bytes]) -> None:
    data = data_file[1]
    assert vm.raw(0, FILE_SIZE - 10, 4096) == data[-10:]
    assert vm.raw(0, FILE_SIZE, 4096) == b""
    assert vm.raw(0, FILE_SIZE + (1 << 40), 4096) == b""
    # and the VM goes on serving
    assert vm.raw(0, 100, 200) == data[100:300]


def test_raw_many_reads_in_one_vm(vm: GuestVM, data_file: tuple[int, bytes]) -> None:
    data = data_file[1]
    rng = random.Random(7)
    for _ in range(50):
        offset = rng.randrange(FILE_SIZE)
        length = rng.randrange(1, 300_000)
        assert vm.raw(0, offset, length) == data[offset : offset + length]


def test_raw_refuses_out_of_range_requests_on_the_host(vm: GuestVM) -> None:
    with pytest.raises(ValueError, match="read out of range"):
        vm.raw(0, 0, L.OUT_SIZE + 1)
    with pytest.raises(ValueError, match="read out of range"):
        vm.raw(0, -1, 1)
    with pytest.raises(ValueError, match="read out of range"):
        vm.raw(0, 1 << 63, 1)


def test_raw_from_a_handle_that_does_not_exist(vm: GuestVM) -> None:
    with pytest.raises(IsolationError) as info:
        vm.raw(1, 0, 10)
    assert str(info.value) == (
        "disk.raw: the guest reader broke the ABI (read from handle 1, which does not exist)"
    )


def test_unreadable_file_is_an_image_error(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread gives EISDIR
    try:
        with GuestVM([fd], name="dir") as guest:
            with pytest.raises(ImageError) as info:
                guest.raw(0, 0, 10)
            assert str(info.value) == "dir: the image could not be read"
            assert guest.zlib(zlib.compress(b"still alive")) == b"still alive"
    finally:
        os.close(fd)


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


def test_vm_start_time(data_file: tuple[int, bytes]) -> None:
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


def test_closed_vm_refuses_work(data_file: tuple[int, bytes]) -> None:
    guest = GuestVM([data_file[0]])
    guest.close()
    guest.close()
    with pytest.raises(IsolationError, match=r"^image: the guest reader is closed$"):
        guest.raw(0, 0, 1)


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

HOSTILE = {
    "null write": (0x201, {}, FAULT),
    "write to its own text": (0x202, {}, FAULT),
    "heap exhausted": (0x205, {}, "the guest reader ran out of memory (its limit is 32 MiB)"),
    "read longer than the window": (
        0x206,
        {},
        f"the guest reader broke the ABI (read of {L.IN_SIZE + 1} bytes at offset 0 is out of "
        "range)",
    ),
    "read from an unknown handle": (
        0x207,
        {"handle": 9},
        "the guest reader broke the ABI (read from handle 9, which does not exist)",
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
    "spin forever": (
        0x203,
        {},
        f"the guest reader did not finish within {HOSTILE_TIMEOUT:g} s (watchdog) and was stopped",
    ),
}


@pytest.mark.parametrize("behaviour", list(HOSTILE))
def test_hostile_guest_ends_in_one_error(
    behaviour: str, hostile: Path, data_file: tuple[int, bytes]
) -> None:
    op, fields, message = HOSTILE[behaviour]
    before = signal.getsignal(signal.SIGPROF)
    started = time.monotonic()
    guest = GuestVM([data_file[0]], name="evil.img", guest=hostile, timeout=HOSTILE_TIMEOUT)
    with pytest.raises(IsolationError) as info:
        guest.command(op, **fields)
    elapsed = time.monotonic() - started
    assert str(info.value) == f"evil.img: {message}"
    assert elapsed < HOSTILE_TIMEOUT + 2.0  # the machine is shared: slack, not a benchmark
    # The VM is gone, the watchdog disarmed, and the host goes on.
    with pytest.raises(IsolationError, match="is closed"):
        guest.command(0x204, length=1)
    assert signal.getsignal(signal.SIGPROF) is before
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    with GuestVM([data_file[0]]) as good:
        assert good.raw(0, 5, 10) == data_file[1][5:15]


def test_heap_is_capped(hostile: Path) -> None:
    """malloc returns NULL past the cap; every block costs a 16-byte header and rounds up
    to 16 bytes; the heap is empty again after each command."""

    def expected(block: int) -> int:
        cost = 16 + (block + 15) // 16 * 16
        return ((L.HEAP_SIZE - block - 31) // cost + 1) * block

    with GuestVM(guest=hostile) as guest:
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
