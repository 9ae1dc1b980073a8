"""The sink's O_DIRECT path: what goes direct, what goes buffered, and the fallback."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiodd import chain
from aiodd.buffers import Bytes
from aiodd.errors import OutputError
from aiodd.io import filesystem_magic
from aiodd.options import Cache
from aiodd.stages.sink import (
    DIRECT_FILESYSTEMS,
    RECUT_LENGTH,
    OutputFile,
    direct_length,
    granules_clash,
)

MiB = 1024 * 1024


@given(
    offset=st.integers(0, 1 << 40),
    length=st.integers(0, 1 << 24),
    address=st.none() | st.integers(0, 1 << 47),
    alignment=st.sampled_from([512, 4096]),
)
def test_direct_length_is_the_aligned_prefix(
    offset: int, length: int, address: int | None, alignment: int
) -> None:
    n = direct_length(offset, length, address, alignment)
    assert 0 <= n <= length and n % alignment == 0
    if address is None or offset % alignment or address % alignment:
        assert n == 0
    else:
        assert length - n < alignment


def _pool_memory(data: bytes) -> mmap.mmap:
    """Page-aligned memory, as the pipeline's buffer pool is."""
    memory = mmap.mmap(-1, len(data))
    memory[:] = data
    return memory


@pytest.fixture
def direct_output(tmp_path: Path) -> OutputFile:
    out = OutputFile.create(str(tmp_path / "out.raw"), 8 * MiB, raw=True)
    if out.direct_fd is None:
        out.abort()
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    return out


def test_aligned_pool_buffers_go_direct_and_the_rest_buffered(
    direct_output: OutputFile, tmp_path: Path
) -> None:
    data = os.urandom(4 * MiB + 700)
    memory = _pool_memory(data)
    view = memoryview(memory)
    direct_output.write(
        [
            (0, view[: 4 * MiB + 700]),  # 4 MiB direct, a 700-byte tail buffered
            # Off the alignment: buffered up to the next granule, then direct through
            # the stage, up to the last whole granule.
            (5 * MiB + 3, view[1 : 2 * MiB]),
            (7 * MiB, bytes(data[:4096])),  # read-only bytes: buffered
        ]
    )
    granule = direct_output.granule
    assert direct_output.direct_bytes == 4 * MiB + 2 * MiB - granule
    direct_output.commit(8 * MiB)
    view.release()
    memory.close()
    got = (tmp_path / "out.raw").read_bytes()
    expected = bytearray(8 * MiB)
    expected[: 4 * MiB + 700] = data
    expected[5 * MiB + 3 : 7 * MiB + 2] = data[1 : 2 * MiB]
    expected[7 * MiB : 7 * MiB + 4096] = data[:4096]
    assert got == bytes(expected)


def test_einval_gives_o_direct_up(
    direct_output: OutputFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    direct_fd = direct_output.direct_fd
    calls: list[tuple[int, int]] = []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fd == direct_fd:
            calls.append((offset, len(data)))
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom(MiB)
    memory = _pool_memory(data)
    view = memoryview(memory)
    direct_output.write([(0, view)])
    assert calls == [(0, MiB)]  # a file starts at 4096: nothing coarser to try
    assert direct_output.direct_fd is None and direct_output.direct_bytes == 0
    direct_output.write([(MiB, view)])  # later writes go straight to the page cache
    assert len(calls) == 1
    direct_output.commit(2 * MiB)
    view.release()
    memory.close()
    assert (tmp_path / "out.raw").read_bytes() == data + data


def test_other_write_errors_are_reported_not_retried(
    direct_output: OutputFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct_fd = direct_output.direct_fd
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fd == direct_fd:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    memory = _pool_memory(bytes(MiB))
    view = memoryview(memory)
    with pytest.raises(OutputError, match="write failed: No space left on device"):
        direct_output.write([(0, view)])
    direct_output.abort()
    view.release()
    memory.close()


def test_a_filesystem_without_o_direct_is_written_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def open_(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", open_)
    out = OutputFile.create(str(tmp_path / "out.raw"), MiB, raw=True)
    assert out.direct_fd is None
    memory = _pool_memory(b"z" * MiB)
    view = memoryview(memory)
    out.write([(0, view)])
    out.commit(MiB)
    view.release()
    memory.close()
    assert (tmp_path / "out.raw").read_bytes() == b"z" * MiB


def test_only_local_disk_filesystems_go_direct(tmp_path: Path) -> None:
    """/dev/shm is tmpfs: O_DIRECT there would save nothing, so it is not used."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    out = OutputFile.create(str(shm / f"aiodd-test-{os.getpid()}.raw"), MiB, raw=True)
    try:
        assert out.direct_fd is None
    finally:
        out.abort()
    out = OutputFile.create(str(tmp_path / "out.raw"), MiB, raw=True)
    try:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            local = filesystem_magic(fd) in DIRECT_FILESYSTEMS
        finally:
            os.close(fd)
        assert (out.direct_fd is not None) == local
    finally:
        out.abort()


def _outputs_made(monkeypatch: pytest.MonkeyPatch) -> list[OutputFile]:
    """Every OutputFile a copy creates from now on."""
    outputs: list[OutputFile] = []
    real_create = OutputFile.create

    def create(path: str, size: int, **options: Any) -> OutputFile:
        out = real_create(path, size, **options)
        outputs.append(out)
        return out

    monkeypatch.setattr(OutputFile, "create", create)
    return outputs


def test_a_real_copy_goes_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline hands the sink pool buffers that O_DIRECT takes whole."""
    import anyio

    from aiodd.api import dd

    outputs = _outputs_made(monkeypatch)
    src = tmp_path / "in.raw"
    data = os.urandom(9 * MiB + 512)
    src.write_bytes(data)
    anyio.run(lambda: dd(str(src), str(tmp_path / "out.raw"), isolation="inline"))
    assert (tmp_path / "out.raw").read_bytes() == data
    if outputs[0].direct_bytes == 0:
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    assert outputs[0].direct_bytes == 9 * MiB  # the 512-byte tail is not a whole block


@pytest.mark.parametrize("fmt", ["vdi", "vpc"])
def test_layouts_off_the_alignment_go_direct_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """vdi's data starts at byte 4608, vpc's blocks 512 bytes past a 4 KiB boundary, as
    qemu lays them out: all but a page around each write's ends goes past the page
    cache, and the image reads back as the input."""
    from aiodd.api import plain_copy

    outputs = _outputs_made(monkeypatch)
    src, dst = tmp_path / "in.raw", tmp_path / f"out.{fmt}"
    data = os.urandom(9 * MiB)
    src.write_bytes(data)
    plain_copy(
        str(src), str(dst), bs=512, count=None, skip=0, input_format="raw",
        output_format=fmt, isolation="inline", allow_backing=(), require_isolation=False,
        force_share=False, cache="none", stopped=lambda: False,
    )  # fmt: skip
    if outputs[0].direct_fd is None and outputs[0].direct_bytes == 0:
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    # At most two granules a MiB through the page cache (vpc's 2 MiB blocks, vdi's
    # 4 MiB writes), and the chunk's edges.
    assert outputs[0].direct_bytes >= 9 * MiB - 16 * outputs[0].granule
    disk = chain.open_input(str(dst), fmt, isolation="inline")
    try:
        got = bytearray(9 * MiB)
        disk.read_into(0, memoryview(got))
    finally:
        disk.close()
    assert bytes(got) == data


def test_pieces_off_the_filesystem_block_go_direct_from_the_next_one(
    direct_output: OutputFile, tmp_path: Path
) -> None:
    """512-aligned, as vpc's data is past each bitmap, but not on a 4 KiB block: a long
    piece goes direct from its first whole granule to its last, through the stage; a
    short one, not worth the copy, and the ends go through the page cache."""
    data = os.urandom(2 * MiB)
    memory = _pool_memory(data)
    view = memoryview(memory)
    short = RECUT_LENGTH // 2
    direct_output.write(
        [
            (MiB + 512, view[512 : MiB + 512]),
            (3 * MiB + 512, view[:short]),
            (4 * MiB, view[:MiB]),
        ]
    )
    granule = direct_output.granule
    assert direct_output.direct_bytes == MiB + MiB - granule
    direct_output.commit(5 * MiB)
    view.release()
    memory.close()
    got = (tmp_path / "out.raw").read_bytes()
    assert got[MiB + 512 : 2 * MiB + 512] == data[512 : MiB + 512]
    assert got[3 * MiB + 512 : 3 * MiB + 512 + short] == data[:short]
    assert got[4 * MiB :] == data[:MiB]


@settings(max_examples=40, deadline=None)
@given(
    pieces=st.lists(
        st.tuples(st.integers(0, 64), st.integers(0, 6 * 4096 + 600)), min_size=1, max_size=4
    )
)
def test_what_goes_direct_is_what_granules_calls_direct(
    tmp_path_factory: pytest.TempPathFactory,
    pieces: list[tuple[int, int]],
) -> None:
    """The sink's clash rule rests on this: every byte written past the page cache lies
    in a granule :meth:`OutputFile.granules` marks direct, and those are whole
    granules of one write."""
    tmp = tmp_path_factory.mktemp("granules")
    out = OutputFile.create(str(tmp / "out.raw"), 64 * MiB, raw=True)
    try:
        if out.direct_fd is None:
            pytest.skip(f"{tmp} does not take O_DIRECT")
        granule = out.granule
        direct: list[tuple[int, int]] = []
        real_pwrite = os.pwrite

        def pwrite(fd: int, data: memoryview, offset: int) -> int:
            if fd == out.direct_fd:
                direct.append((offset, len(data)))
            return real_pwrite(fd, data, offset)

        memory = _pool_memory(os.urandom(MiB))
        view = memoryview(memory)
        writes: list[tuple[int, Bytes]] = []
        at = 0
        for gap, length in pieces:
            at += gap * 512
            # Odd lengths are long enough to be cut into pieces; the address follows the
            # offset's place in its page, as a pool buffer's does.
            size = RECUT_LENGTH + length if length % 2 else length
            writes.append((at, view[at % 4096 : at % 4096 + size]))
            at += size
        with pytest.MonkeyPatch.context() as m:
            m.setattr(os, "pwrite", pwrite)
            out.write(writes)
        spans = out.granules(writes)
        marked = [(s * granule, e * granule) for s, e, d in spans if d]
        for offset, length in direct:
            assert offset % granule == 0 and length % granule == 0
            assert any(lo <= offset and offset + length <= hi for lo, hi in marked)
        for s, e, d in spans:
            if not d:
                assert 0 < e - s <= 2  # the granules a write covers only in part
        for _, piece in writes:
            assert isinstance(piece, memoryview)
            piece.release()
        view.release()
        memory.close()
    finally:
        out.abort()


def test_writes_that_share_only_granules_in_part_do_not_clash() -> None:
    """vdi's data: each 4 MiB write starts 512 bytes past a 4 KiB boundary, and its
    neighbour ends there; they share one page, written through the page cache by both."""
    g = 4096
    a = [(1, 2, False), (2, 1025, True), (1025, 1026, False)]
    b = [(1025, 1026, False), (1026, 2049, True), (2049, 2050, False)]
    assert not granules_clash(a, b)
    assert granules_clash(a, [(1024, 1026, False)])  # touches a's direct granule 1024
    assert granules_clash([(5, 9, True)], [(8, 12, True)])
    assert not granules_clash([(5, 9, True)], [(9, 12, True)])
    assert g == 4096


def _ops(pool: Any, layout: list[tuple[int, int]]) -> list[Any]:
    """One WriteOp per ``(offset, length)``, each in its own pool buffer."""
    from aiodd.buffers import Chunk, WriteOp

    ops = []
    for i, (offset, length) in enumerate(layout):
        buffer = pool._receive.receive_nowait()  # as the reader acquires it
        buffer.view[:length] = bytes([i + 1]) * length
        ops.append(WriteOp([(offset, buffer.view[:length])], Chunk(offset, length, buffer), length))
    return ops


def _run_sink(out: OutputFile, layout: list[tuple[int, int]], reserve: int) -> list[int]:
    """Feed ``layout``'s ops to sink_stream; return how many writes were in flight at
    each write's start."""
    import threading
    import time

    import anyio

    from aiodd.buffers import BufferPool, WriteOp
    from aiodd.progress import ProgressMeter
    from aiodd.stages.sink import sink_stream

    lock = threading.Lock()
    running = 0
    seen: list[int] = []
    real_write = out.write

    def write(writes: list[tuple[int, Any]]) -> None:
        nonlocal running
        with lock:
            running += 1
            seen.append(running)
        time.sleep(0.02)  # long enough for the other slot to start, if it may
        real_write(writes)
        with lock:
            running -= 1

    out.write = write  # type: ignore[method-assign]
    pool = BufferPool(max(2, len(layout)), MiB)
    total = sum(length for _, length in layout)
    meter = ProgressMeter(total, None)

    async def main() -> None:
        send, receive = anyio.create_memory_object_stream[WriteOp](len(layout))
        for op in _ops(pool, layout):
            send.send_nowait(op)
        send.close()
        await sink_stream(out, pool, receive, meter, reserve)

    anyio.run(main)
    assert meter.done == total
    assert pool._receive.statistics().current_buffer_used == pool.count  # all released
    pool.close()
    return seen


def test_two_writes_go_to_an_allocated_file_together(
    direct_output: OutputFile, tmp_path: Path
) -> None:
    layout = [(i * MiB, MiB) for i in range(6)]
    seen = _run_sink(direct_output, layout, 6 * MiB)
    if not direct_output.reserved:
        pytest.skip(f"{tmp_path} cannot allocate ahead")
    assert direct_output.writes_in_flight == 2
    assert max(seen) == 2
    direct_output.commit(6 * MiB)
    got = (tmp_path / "out.raw").read_bytes()
    assert got == b"".join(bytes([i + 1]) * MiB for i in range(6))


def test_writes_sharing_a_page_in_part_go_together(
    direct_output: OutputFile, tmp_path: Path
) -> None:
    """Neighbours that each cover part of one granule write it through the page cache,
    and may be in flight together: vdi's data, 512 bytes past each 4 KiB boundary."""
    g = direct_output.granule
    layout = [(0, g + 1000), (g + 1000, g - 1000), (2 * g, g), (3 * g, g)]
    seen = _run_sink(direct_output, layout, 4 * g)
    if not direct_output.reserved:
        pytest.skip(f"{tmp_path} cannot allocate ahead")
    assert max(seen) == 2
    direct_output.commit(4 * g)
    expected = b"\1" * (g + 1000) + b"\2" * (g - 1000) + b"\3" * g + b"\4" * g
    assert (tmp_path / "out.raw").read_bytes() == expected


def test_writes_sharing_a_granule_that_goes_direct_never_overlap(
    direct_output: OutputFile, tmp_path: Path
) -> None:
    """A granule one op may write past the page cache, another touches: they go one by
    one, in the order received (no plan overlaps, but the sink does not rely on it)."""
    g = direct_output.granule
    layout = [(0, 2 * g), (g, 2 * g), (4 * g, g)]
    seen = _run_sink(direct_output, layout, 5 * g)
    if not direct_output.reserved:
        pytest.skip(f"{tmp_path} cannot allocate ahead")
    assert seen[:2] == [1, 1]
    direct_output.commit(5 * g)
    expected = b"\1" * g + b"\2" * 2 * g + bytes(g) + b"\3" * g
    assert (tmp_path / "out.raw").read_bytes() == expected


@pytest.mark.parametrize("why", ["no allocation", "write-through", "sparse"])
def test_one_write_at_a_time_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """Without an allocated file ext4 would serialise the writes anyway; write-through
    promises each write is on disk before the next starts."""
    from aiodd.stages import sink

    if why == "no allocation":
        monkeypatch.setattr(sink, "_fallocate", lambda *args: -1)
    cache: Cache = "writethrough" if why == "write-through" else "none"
    out = OutputFile.create(str(tmp_path / "out.raw"), 4 * MiB, raw=True, cache=cache)
    if cache == "none" and out.direct_fd is None:
        out.abort()
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    layout = [(i * MiB, MiB) for i in range(4)]
    seen = _run_sink(out, layout, 0 if why == "sparse" else 4 * MiB)
    assert out.writes_in_flight == 1 and seen == [1, 1, 1, 1]
    out.commit(4 * MiB)
    got = (tmp_path / "out.raw").read_bytes()
    assert got == b"".join(bytes([i + 1]) * MiB for i in range(4))


def test_an_o_direct_descriptor_given_up_stays_open_until_the_end(
    direct_output: OutputFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another write may still be using it: a closed number could be reused by any open."""
    real_pwrite = os.pwrite
    direct_fd = direct_output.direct_fd
    assert direct_fd is not None

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fd == direct_fd:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    memory = _pool_memory(bytes(MiB))
    view = memoryview(memory)
    direct_output.write([(0, view)])
    assert direct_output.direct_fd is None
    os.fstat(direct_fd)  # still open
    direct_output.commit(MiB)
    with pytest.raises(OSError) as caught:
        os.fstat(direct_fd)
    assert caught.value.errno == errno.EBADF
    view.release()
    memory.close()


def test_an_allocation_that_fails_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiodd.stages import sink

    monkeypatch.setattr(sink, "_fallocate", lambda *args: -1)
    out = OutputFile.create(str(tmp_path / "out.raw"), MiB, raw=True)
    out.reserve(MiB)
    assert not out.reserved and out.writes_in_flight == 1
    out.write([(0, b"w" * MiB)])
    out.commit(MiB)
    assert (tmp_path / "out.raw").read_bytes() == b"w" * MiB


def _record_fallocate(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The sink's fallocate calls from now on, each answered as a success."""
    from aiodd.stages import sink

    calls: list[tuple[int, ...]] = []

    def fallocate(*args: int) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(sink, "_fallocate", fallocate)
    return calls


@pytest.mark.parametrize("cache", ["writeback", "unsafe", "writethrough"])
def test_through_the_page_cache_a_dense_file_is_allocated_first(
    cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Buffered writes into allocated blocks skip delayed allocation's bookkeeping;
    not worth it below PAGE_CACHE_RESERVE."""
    from aiodd.stages import sink

    monkeypatch.setattr(sink, "PAGE_CACHE_RESERVE", 4 * MiB)
    out = OutputFile.create(str(tmp_path / "out.raw"), 4 * MiB, raw=True, cache=cache)
    try:
        if filesystem_magic(out.fd) not in DIRECT_FILESYSTEMS:
            pytest.skip(f"{tmp_path} is not on a local disk's filesystem")
        assert out.direct_fd is None
        out.reserve(4 * MiB - 4096)
        assert not out.reserved and os.fstat(out.fd).st_blocks == 0
        out.reserve(4 * MiB)
        if not out.reserved:
            pytest.skip(f"{tmp_path} cannot allocate ahead")
        assert os.fstat(out.fd).st_blocks * 512 >= 4 * MiB
        assert out.writes_in_flight == 1  # one at a time through the page cache
        out.write([(0, b"p" * 4 * MiB)])
        out.commit(4 * MiB)
    finally:
        out.abort()
    assert (tmp_path / "out.raw").read_bytes() == b"p" * 4 * MiB


def test_elsewhere_nothing_is_allocated_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tmpfs, NFS and the like: allocating there may write zeros, or cost a round trip."""
    from aiodd.stages import sink

    calls = _record_fallocate(monkeypatch)
    monkeypatch.setattr(sink, "filesystem_magic", lambda fd: 0x01021994)  # tmpfs
    monkeypatch.setattr(sink, "PAGE_CACHE_RESERVE", MiB)
    out = OutputFile.create(str(tmp_path / "out.raw"), MiB, raw=True, cache="unsafe")
    out.reserve(MiB)
    out.reserve(MiB, clone=True)
    assert calls == [] and not out.reserved
    out.abort()


def test_an_output_over_half_the_free_space_is_not_allocated_ahead(
    direct_output: OutputFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A huge window (a hostile header's, say) must not fill the disk in one call."""
    calls = _record_fallocate(monkeypatch)
    free = os.fstatvfs(direct_output.fd)
    half = free.f_bavail * free.f_frsize // 2
    direct_output.reserve(half + 4096)
    assert calls == [] and not direct_output.reserved and direct_output.writes_in_flight == 1
    direct_output.reserve(8 * MiB)
    assert calls == [(direct_output.fd, 0, direct_output.offset, 8 * MiB)]
    assert direct_output.reserved
    direct_output.abort()


def test_a_failed_allocation_gives_back_what_it_got(
    direct_output: OutputFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiodd.stages import sink

    calls: list[tuple[int, ...]] = []

    def fallocate(*args: int) -> int:
        calls.append(args)
        return -1 if args[1] == 0 else 0

    monkeypatch.setattr(sink, "_fallocate", fallocate)
    direct_output.reserve(8 * MiB)
    fd, at = direct_output.fd, direct_output.offset
    assert calls == [(fd, 0, at, 8 * MiB), (fd, 0x02 | 0x01, at, 8 * MiB)]
    assert not direct_output.reserved and direct_output.writes_in_flight == 1
    direct_output.abort()
