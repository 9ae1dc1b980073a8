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
