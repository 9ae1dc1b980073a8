"""O_DIRECT writes from memory shared with the guest go through a private staging copy
in huge pages where the disk's queue gathers too few pieces of memory per request
(aiodd/stages/sink.py, ``OutputFile.stage_direct_writes``)."""

from __future__ import annotations

import functools
import mmap
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiodd import api
from aiodd.stages import sink
from aiodd.stages.sink import OutputFile, segments_bind, segments_bound_requests
from tests.conftest import KVM_AVAILABLE

MiB = 1 << 20


@given(
    segments=st.integers(1, 4096),
    request=st.integers(1, 1 << 16).map(lambda kib: kib * 1024),
    write=st.integers(4096, 64 * MiB),
)
def test_segments_bind_when_they_cut_a_write_more_than_the_request_size(
    segments: int, request: int, write: int
) -> None:
    assert segments_bind(segments, request, write) == (
        segments * 4096 < request and segments * 4096 < write
    )


def test_segments_bind_on_the_disks_measured() -> None:
    assert segments_bind(254, 4096 * 1024, 4 * MiB)  # the virtio disk of performance.md
    assert not segments_bind(127, 128 * 1024, 4 * MiB)  # requests of 128 KiB: size binds
    assert not segments_bind(254, 4096 * 1024, 512 * 1024)  # a write too small to cut


def test_no_queue_no_staging() -> None:
    fd = os.open("/proc/self/status", os.O_RDONLY)  # procfs: no block device under it
    try:
        assert not segments_bound_requests(fd, 4 * MiB)
    finally:
        os.close(fd)


@pytest.fixture
def staged_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OutputFile:
    monkeypatch.setattr(sink, "segments_bound_requests", lambda fd, write: True)
    out = OutputFile.create(str(tmp_path / "out.raw"), 12 * MiB, raw=True)
    if not out.stage_direct_writes():
        out.abort()
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    return out


def test_staged_writes_write_the_same_bytes(staged_output: OutputFile, tmp_path: Path) -> None:
    data = os.urandom(9 * MiB + 700)
    shared = mmap.mmap(-1, len(data))  # shared, as the guest's memory is
    shared[:] = data
    with memoryview(shared) as view:
        staged_output.write(
            [
                (0, view[: 9 * MiB + 700]),  # more than a stage: three of them, then a tail
                (10 * MiB, view[4096 : 8192 + 100]),
            ]
        )
    shared.close()
    assert staged_output.direct_bytes == 9 * MiB + 4096
    assert len(staged_output._stage_memory) == 1  # one thread wrote, through its stage
    staged_output.commit(12 * MiB)
    got = (tmp_path / "out.raw").read_bytes()
    expected = bytearray(12 * MiB)
    expected[: 9 * MiB + 700] = data
    expected[10 * MiB : 10 * MiB + 4196] = data[4096 : 8192 + 100]
    assert got == bytes(expected)
    assert staged_output._stage_memory == []  # closed with the O_DIRECT descriptors


def test_each_writer_thread_has_its_own_stage(staged_output: OutputFile) -> None:
    import threading

    data = os.urandom(2 * MiB)
    memories = [mmap.mmap(-1, 2 * MiB) for _ in range(3)]
    views = [memoryview(m) for m in memories]
    for m in memories:
        m[:] = data
    threads = [
        threading.Thread(target=staged_output.write, args=([(i * 2 * MiB, views[i])],))
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(staged_output._stage_memory) == 3
    for v in views:
        v.release()
    staged_output.commit(12 * MiB)
    assert staged_output._stage_memory == []


def _staging_asked(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    asked: list[bool] = []
    real = OutputFile.stage_direct_writes

    def record(self: OutputFile) -> bool:
        asked.append(True)
        return real(self)

    monkeypatch.setattr(OutputFile, "stage_direct_writes", record)
    return asked


@pytest.mark.parametrize(
    ("isolation", "input_format", "cache", "staged"),
    [
        ("inline", None, "none", False),
        ("sandbox", "raw", "none", False),  # read here, beside the guest: private memory
        # past the page cache the guest's reads come back as maps, read into private
        # memory here; through it, the guest fills the buffers, shared with it
        ("sandbox", None, "none", False),
        ("sandbox", None, "writeback", True),
        *([("kvm", None, "none", False)] if KVM_AVAILABLE else []),
    ],
)
def test_a_copy_stages_only_what_the_guest_fills(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    isolation: str,
    input_format: str | None,
    cache: str,
    staged: bool,
) -> None:
    asked = _staging_asked(monkeypatch)
    src, dst = tmp_path / "in.raw", tmp_path / "out.raw"
    data = os.urandom(5 * MiB)
    src.write_bytes(data)
    args: dict[str, Any] = dict(
        bs=65536, count=None, skip=0, input_format=input_format, output_format="raw",
        isolation=isolation, allow_backing=(), require_isolation=False, force_share=False,
        cache=cache,
    )  # fmt: skip
    api.plain_copy(str(src), str(dst), stopped=lambda: False, **args)
    assert dst.read_bytes() == data
    assert asked == ([True] if staged else [])


def test_the_pipeline_stages_what_the_guest_fills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio

    asked = _staging_asked(monkeypatch)
    src, dst = tmp_path / "in.raw", tmp_path / "out.raw"
    data = os.urandom(3 * MiB)
    src.write_bytes(data)
    for cache in ("writeback", "none"):  # shared with the guest, then maps
        anyio.run(functools.partial(api.dd, str(src), str(dst), isolation="sandbox", cache=cache))
        assert dst.read_bytes() == data
    anyio.run(lambda: api.dd(str(src), str(dst), isolation="inline"))
    assert asked == [True]


def test_a_short_piece_off_the_alignment_is_not_staged(
    staged_output: OutputFile, tmp_path: Path
) -> None:
    short = sink.RECUT_LENGTH // 2
    data = os.urandom(short)
    shared = mmap.mmap(-1, len(data))
    shared[:] = data
    with memoryview(shared) as view:
        staged_output.write([(5 * MiB + 512, view)])  # 512-aligned, as vpc's data
    shared.close()
    assert staged_output._stage_memory == []  # not copied for nothing
    assert staged_output.direct_bytes == 0
    staged_output.commit(12 * MiB)
    assert (tmp_path / "out.raw").read_bytes()[5 * MiB + 512 : 5 * MiB + 512 + short] == data


def test_a_long_piece_off_the_alignment_goes_direct_through_the_stage(
    tmp_path: Path,
) -> None:
    """Staged whether or not the guest fills the buffers: the stage is what aligns it."""
    out = OutputFile.create(str(tmp_path / "out.raw"), 12 * MiB, raw=True)
    if out.direct_fd is None:
        out.abort()
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    data = os.urandom(2 * MiB)
    private = mmap.mmap(-1, len(data))
    private[:] = data
    with memoryview(private) as view:
        out.write([(5 * MiB + 512, view)])  # a vpc block's data: 512-aligned
    private.close()
    assert len(out._stage_memory) == 1
    assert out.direct_bytes == 2 * MiB - out.granule
    out.commit(12 * MiB)
    assert (tmp_path / "out.raw").read_bytes()[5 * MiB + 512 : 7 * MiB + 512] == data
