"""The buffers a copy with no guest to fill them writes from: private to the process and
in transparent huge pages where the kernel gives them on request (aiodd/buffers.py,
``private_memory``; docs/performance.md, "Huge pages for the buffers")."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import anyio
import pytest

from aiodd import api, buffers
from aiodd.buffers import BufferPool, private_memory
from aiodd.guest.disk import GuestDisk
from tests.conftest import needs_kvm, needs_qemu, qemu_img, qemu_io

MiB = 1 << 20
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _mapping_of(memory: mmap.mmap) -> dict[str, str]:
    """The ``/proc/self/smaps`` entry of ``memory``'s mapping: its fields, and ``flags``."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            entry = {"perms": line.split()[1]} if int(head.split("-")[0], 16) == start else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
            if key == "VmFlags":
                return entry
    raise AssertionError("the mapping is not in /proc/self/smaps")


def _thp_on_request() -> bool:
    try:
        return "[never]" not in THP_ENABLED.read_text()
    except OSError:
        return False


def test_private_memory_is_private_and_asks_for_huge_pages() -> None:
    memory = private_memory(8 * MiB)
    try:
        entry = _mapping_of(memory)
        assert entry["perms"].endswith("p"), entry  # private, not shared
        flags = entry["VmFlags"].split()
        assert "sh" not in flags
        if not _thp_on_request():
            pytest.skip(f"{THP_ENABLED}: transparent huge pages are off on this kernel")
        assert "hg" in flags  # MADV_HUGEPAGE
        assert entry.get("THPeligible") == "1"
    finally:
        memory.close()


def test_the_huge_pages_are_there_once_written() -> None:
    if not _thp_on_request():
        pytest.skip(f"{THP_ENABLED}: transparent huge pages are off on this kernel")
    memory = private_memory(8 * MiB)
    try:
        memory.write(b"\xa5" * len(memory))
        huge = int(_mapping_of(memory)["AnonHugePages"].split()[0])
        if huge == 0:
            pytest.skip("the kernel had no huge page free to give (memory fragmented)")
        assert huge % 2048 == 0
    finally:
        memory.close()


def _recorded(monkeypatch: pytest.MonkeyPatch, module: object) -> list[int]:
    sizes: list[int] = []

    def record(size: int) -> mmap.mmap:
        sizes.append(size)
        return private_memory(size)

    monkeypatch.setattr(module, "private_memory", record)
    return sizes


@pytest.mark.parametrize("isolation", ["inline", "sandbox"])
def test_a_copy_without_a_guest_filling_its_buffers_uses_private_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str
) -> None:
    """Inline, or a guest beside an input named raw: the buffers are this process's."""
    sizes = _recorded(monkeypatch, api)
    src, dst = tmp_path / "in.raw", tmp_path / "out.raw"
    data = os.urandom(5 * MiB + 512)
    src.write_bytes(data)
    api.plain_copy(
        str(src), str(dst), bs=65536, count=None, skip=0, input_format="raw",
        output_format="raw", isolation=isolation, allow_backing=(),  # type: ignore[arg-type]
        require_isolation=False, force_share=False, cache="none", stopped=lambda: False,
    )  # fmt: skip
    assert dst.read_bytes() == data
    assert sizes == [api.PLAIN_MEMORY]


def test_the_pipelines_own_pool_uses_private_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = _recorded(monkeypatch, buffers)
    src, dst = tmp_path / "in.raw", tmp_path / "out.raw"
    data = os.urandom(3 * MiB)
    src.write_bytes(data)
    anyio.run(lambda: api.dd(str(src), str(dst), isolation="inline"))
    assert dst.read_bytes() == data
    assert sizes == [buffers.DEFAULT_COUNT * buffers.DEFAULT_UNIT]


def test_a_pool_given_its_memory_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _recorded(monkeypatch, buffers)
    memory = mmap.mmap(-1, 2 * 4096)
    pool = BufferPool(2, 4096, memory)
    assert pool.memory is memory
    assert sizes == []
    pool.close()
    memory.close()


def _chain(tmp_path: Path) -> tuple[Path, bytes]:
    """A qcow2 over a raw backing file, and what it reads as (qemu-img's word)."""
    (tmp_path / "base.raw").write_bytes(os.urandom(6 * MiB))
    top, expected = tmp_path / "top.qcow2", tmp_path / "expected.raw"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    qemu_io(top, ["write -P 0x5a 1M 2M"], fmt="qcow2")
    qemu_img("convert", "-O", "raw", top, expected)
    return top, expected.read_bytes()


def _mapped_layers(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """The layers whose extents the host reads from the guest's maps, as they come."""
    layers: set[int] = set()
    place = GuestDisk._place

    def spy(disk: GuestDisk, buf: memoryview, staged: memoryview, extents: tuple[int, ...]) -> None:
        layers.update(extents[0::4])
        place(disk, buf, staged, extents)

    monkeypatch.setattr(GuestDisk, "_place", spy)
    return layers


@needs_kvm
@needs_qemu
@pytest.mark.parametrize(("cache", "maps"), [("none", True), ("writeback", False)])
def test_under_kvm_past_the_page_cache_the_host_reads_the_guests_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str, maps: bool
) -> None:
    """Written O_DIRECT, a kvm copy's buffers are private (in huge pages) and the host
    reads the extents of the guest's maps into them itself, from the image and its
    backing file; through the page cache the guest fills shared buffers, its process
    reading while this one writes (docs/performance.md, "Maps for the KVM guest's
    reads")."""
    sizes = _recorded(monkeypatch, api)
    layers = _mapped_layers(monkeypatch)
    top, expected = _chain(tmp_path)
    dst = tmp_path / "out.raw"
    api.plain_copy(
        str(top), str(dst), bs=65536, count=None, skip=0, input_format=None,
        output_format="raw", isolation="kvm", allow_backing=(), require_isolation=False,
        force_share=False, cache=cache, stopped=lambda: False,  # type: ignore[arg-type]
    )  # fmt: skip
    assert dst.read_bytes() == expected
    assert (sizes, layers) == (([api.PLAIN_MEMORY], {0, 1}) if maps else ([], set()))


@needs_kvm
@needs_qemu
def test_the_pipelines_kvm_copy_reads_the_guests_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = _recorded(monkeypatch, buffers)
    layers = _mapped_layers(monkeypatch)
    top, expected = _chain(tmp_path)
    dst = tmp_path / "out.raw"
    anyio.run(lambda: api.dd(str(top), str(dst), isolation="kvm"))
    assert dst.read_bytes() == expected
    assert (sizes, layers) == ([buffers.DEFAULT_COUNT * buffers.DEFAULT_UNIT], {0, 1})
