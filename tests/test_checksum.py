"""``--checksum=ALGO`` / ``dd(checksum=...)`` (docs/usage.md, "Checksum"): the digest of
the output's virtual disk equals that of ``qemu-img convert -O raw`` of the output, for
every output format and window shape; the line on stdout, the JSON done record, the
library's result, and the usage errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from pathlib import Path

import anyio
import pytest

import aiodd
from aiodd.buffers import BufferPool, Chunk
from aiodd.cli import checksum_line, main
from aiodd.formats.vpc import encode as vpc
from aiodd.stages.digest import Hasher, digest_stream
from tests.conftest import needs_qemu, qemu_img

pytestmark = pytest.mark.anyio

KiB, MiB = 1 << 10, 1 << 20
ALGORITHMS = ("sha256", "sha512", "blake2b")
FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi")
# (bs, skip, count) of each window shape
SHAPES = {
    "empty": (512, 3, 3),
    "one sector": (512, 1, 2),
    "unaligned tail": (1000, 3, 3001),  # 2998000 bytes: padded to 512, ends mid-cluster
    "vpc CHS rounding": (MiB, 0, 2),  # 2 MiB: the CHS size adds a block of zeros past it
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the backends are test_api's concern; one is enough here


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 MiB: random data with a run of zeros in the middle."""
    path = tmp_path_factory.mktemp("checksum") / "in.raw"
    data = bytearray(os.urandom(4 * MiB))
    data[MiB : 2 * MiB + 3000] = bytes(MiB + 3000)
    path.write_bytes(data)
    return path


def raw_digest(image: Path, fmt: str, algorithm: str, tmp_path: Path) -> str:
    """What the checksum must be: the digest of the output converted back to raw."""
    back = tmp_path / "back.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", image, back)
    digest = hashlib.new(algorithm, back.read_bytes()).hexdigest()
    back.unlink()
    return digest


@needs_qemu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
async def test_digest_is_that_of_the_raw_conversion(
    source: Path, tmp_path: Path, fmt: str, shape: str
) -> None:
    bs, skip, count = SHAPES[shape]
    # Each algorithm in turn, so that every one meets every format and most shapes.
    algorithm = ALGORITHMS[(FORMATS.index(fmt) + list(SHAPES).index(shape)) % 3]
    out = tmp_path / f"out.{fmt}"
    if fmt == "vmdk" and shape == "empty":
        with pytest.raises(aiodd.UsageError, match="vmdk cannot hold an empty image"):
            await aiodd.dd(source, out, bs=bs, skip=skip, count=count, output_format=fmt,
                           isolation="inline", checksum=algorithm)  # fmt: skip
        return
    result = await aiodd.dd(
        source, out, bs=bs, skip=skip, count=count, output_format=fmt,
        isolation="inline", checksum=algorithm,
    )  # fmt: skip
    assert result.checksum is not None
    assert result.checksum.algorithm == algorithm
    assert result.checksum.hexdigest == raw_digest(out, fmt, algorithm, tmp_path)
    assert str(result.checksum) == f"{algorithm}:{result.checksum.hexdigest}"
    if fmt == "vpc" and shape == "vpc CHS rounding":
        plan = vpc.plan(result.bytes_copied)
        assert plan.virtual_size > plan.data_size  # zeros past the data stream were hashed


@needs_qemu
@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_each_algorithm_sparse_or_not_sandboxed_or_not(
    source: Path, tmp_path: Path, algorithm: str
) -> None:
    """The same digest whatever the layout and wherever the image is decoded."""
    digests = set()
    runs: list[tuple[bool, aiodd.Isolation]] = [
        (False, "inline"),
        (True, "inline"),
        (True, "sandbox"),
    ]
    for sparse, isolation in runs:
        out = tmp_path / f"out-{sparse}-{isolation}.vhd"
        result = await aiodd.dd(
            source, out, bs=4096, skip=1, count=1000, output_format="vpc",
            isolation=isolation, checksum=algorithm, sparse=sparse,
        )  # fmt: skip
        assert result.checksum is not None
        digests.add(result.checksum.hexdigest)
    assert digests == {raw_digest(out, "vpc", algorithm, tmp_path)}


async def test_no_checksum_unless_asked(source: Path, tmp_path: Path) -> None:
    result = await aiodd.dd(source, tmp_path / "o.raw", count=1, isolation="inline")
    assert result.checksum is None


@pytest.mark.parametrize(
    ("value", "shown"), [("md5", "'md5'"), ("SHA256", "'SHA256'"), (256, "'256'"), (b"x", "b'x'")]
)
async def test_a_bad_algorithm_is_a_usage_error(
    source: Path, tmp_path: Path, value: object, shown: str
) -> None:
    with pytest.raises(aiodd.UsageError) as info:
        await aiodd.dd(source, tmp_path / "o.raw", checksum=value)  # type: ignore[arg-type]
    assert str(info.value) == f"invalid checksum {shown}: use sha256, sha512 or blake2b"
    assert info.value.option == "checksum"
    assert not (tmp_path / "o.raw").exists()


# --- the command line ------------------------------------------------------------------


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["--isolation=inline", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_the_line_is_algo_hex_two_spaces_and_of_as_typed(
    source: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    status, out, err = run_cli(
        ["--checksum=sha512", f"if={source}", "of=./sub/../w.raw", "bs=4K", "count=3"], capsys
    )
    assert (status, err) == (0, "")
    expected = hashlib.sha512(source.read_bytes()[: 12 * KiB]).hexdigest()
    assert out == f"sha512:{expected}  ./sub/../w.raw\n"


def test_json_done_record_has_the_checksum(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "j.qcow2"
    status, out, err = run_cli(
        ["--progress=json", "--checksum=blake2b", "-O", "qcow2", f"if={source}",
         f"of={out_path}", "bs=1M"],
        capsys,
    )  # fmt: skip
    assert status == 0
    records = [json.loads(line) for line in err.splitlines()]
    assert [r["done"] for r in records][-1] is True
    assert all("checksum" not in r for r in records[:-1])
    digest = hashlib.blake2b(source.read_bytes()).hexdigest()
    assert records[-1]["checksum"] == f"blake2b:{digest}"
    assert out == f"blake2b:{digest}  {out_path}\n"


def test_progress_on_stdout_ends_before_the_checksum_line(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "p.raw"
    status, out, _ = run_cli(["-p", "--checksum=sha256", f"if={source}", f"of={out_path}"], capsys)
    assert status == 0
    progress, line = out.rsplit("\n", 2)[:2]
    assert progress.endswith("(100.00/100%)\r")
    assert line == f"sha256:{hashlib.sha256(source.read_bytes()).hexdigest()}  {out_path}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checksum=md5"], "aiodd: invalid --checksum 'md5': use sha256, sha512 or blake2b\n"),
        (["--checksum="], "aiodd: invalid --checksum '': use sha256, sha512 or blake2b\n"),
        (["--checksum"], "aiodd: option --checksum requires argument (see 'aiodd --help')\n"),
        (
            ["--sparse=yes"],
            "aiodd: option --sparse must not have an argument (see 'aiodd --help')\n",
        ),
    ],
)
def test_usage_errors_are_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_cli(["if=x", f"of={tmp_path / 'o'}", *args], capsys)
    assert (status, out, err) == (1, "", message)
    assert not (tmp_path / "o").exists()


def test_a_stdout_that_cannot_take_the_line_fails_the_command(
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr("sys.stdout", closed)
    out_path = tmp_path / "c.raw"
    status = main(["--isolation=inline", "--checksum=sha256", f"if={source}", f"of={out_path}"])
    err = capsys.readouterr().err
    assert status == 1
    assert (
        err == f"aiodd: cannot print the checksum: Bad file descriptor ({out_path} is complete)\n"
    )
    assert out_path.read_bytes() == source.read_bytes()


def test_help_shows_both_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    usage, options = text.split("\n\n")[0], text.split("options:")[1]
    assert "[--checksum=ALGO] [--sparse]" in usage
    assert "--checksum=ALGO      sha256, sha512 or blake2b" in options
    assert "--sparse             leave blocks of zeros unallocated" in options


def test_names_that_would_break_the_line_are_escaped_as_sha256sum_does() -> None:
    assert checksum_line("sha256:ab", "o.raw") == "sha256:ab  o.raw\n"
    assert checksum_line("sha256:ab", "a\nb\\c") == "\\sha256:ab  a\\nb\\\\c\n"
    assert checksum_line("sha256:ab", "a\rb") == "\\sha256:ab  a\\rb\n"


# -- the digest stage: a side branch ---------------------------------------------------


async def test_a_held_buffer_is_free_after_both_releases() -> None:
    pool = BufferPool(2, 4096)
    first = await pool.acquire()
    await pool.acquire()
    pool.hold(first)
    pool.release(first)
    with pytest.raises(anyio.WouldBlock):
        pool._receive.receive_nowait()  # the second reader still has it
    pool.release(first)
    assert await pool.acquire() is first
    pool.close()


async def test_the_writes_do_not_wait_for_the_hash() -> None:
    """Every chunk reaches the encoder while the hash of the first is still running; a
    stage that hashed before passing a chunk on would hold them all back."""
    pool = BufferPool(4, 4096)
    go = threading.Event()
    seen: list[bytes] = []

    class Slow:
        def __init__(self) -> None:
            self.inner = hashlib.sha256()

        def update(self, data: bytes | memoryview, /) -> None:
            assert go.wait(10), "the hash was never let go"
            self.inner.update(data)

    hasher = Slow()
    in_tx, in_rx = anyio.create_memory_object_stream[Chunk](4)
    out_tx, out_rx = anyio.create_memory_object_stream[Chunk](4)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(digest_stream, hasher, 100, pool, in_rx, out_tx)
            async with in_tx:
                for i in range(4):
                    buffer = await pool.acquire()
                    buffer.view[:4096] = bytes([i + 1]) * 4096
                    await in_tx.send(Chunk(i * 4096, 4096, buffer))
            async with out_rx:
                async for chunk in out_rx:
                    seen.append(bytes(chunk.data))
                    pool.release(chunk.buffer)  # the sink's release
            assert len(seen) == 4  # all passed on, none hashed yet
            go.set()
    assert hasher.inner.digest() == hashlib.sha256(b"".join(seen) + bytes(100)).digest()
    for _ in range(4):  # both releases of every buffer happened
        pool._receive.receive_nowait()
    pool.close()


def _open_pipes() -> set[str]:
    """The pipes this process holds open (the stage's wake-up pipe is one)."""
    pipes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("pipe:"):
                pipes.add(f"{fd} {target}")
    return pipes


async def _feed(pool: BufferPool, count: int, hasher: Hasher) -> list[bytes]:
    """Run the stage on ``count`` chunks of one page each, taken as the sink would."""
    seen: list[bytes] = []
    in_tx, in_rx = anyio.create_memory_object_stream[Chunk](count)
    out_tx, out_rx = anyio.create_memory_object_stream[Chunk](count)

    async def sink() -> None:
        async with out_rx:
            async for chunk in out_rx:
                seen.append(bytes(chunk.data))
                pool.release(chunk.buffer)

    async with anyio.create_task_group() as tg:
        tg.start_soon(digest_stream, hasher, 0, pool, in_rx, out_tx)
        tg.start_soon(sink)
        async with in_tx:
            for i in range(count):
                buffer = await pool.acquire()
                buffer.view[:4096] = bytes([i + 1]) * 4096
                await in_tx.send(Chunk(i * 4096, 4096, buffer))
    return seen


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_hash_frees_buffers_the_copy_waits_for(anyio_backend: str) -> None:
    """Ten chunks through a pool of two: each buffer is taken again only after the hash
    thread gave it back, through the loop's side of the branch."""
    pool = BufferPool(2, 4096)
    hasher = hashlib.sha256()
    before = _open_pipes()
    with anyio.fail_after(10):
        seen = await _feed(pool, 10, hasher)
    assert hasher.digest() == hashlib.sha256(b"".join(seen)).digest()
    assert len(seen) == 10
    assert _open_pipes() <= before  # none left open
    pool.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_failing_hash_fails_the_stage_and_leaves_nothing_open(
    anyio_backend: str,
) -> None:
    class Failing:
        calls = 0

        def update(self, data: bytes | memoryview, /) -> None:
            self.calls += 1
            if self.calls == 2:
                raise ValueError("the hash broke")

    before = _open_pipes()
    pool = BufferPool(4, 4096)
    with anyio.fail_after(10), pytest.raises(BaseExceptionGroup) as caught:
        await _feed(pool, 4, Failing())
    assert caught.value.subgroup(ValueError) is not None
    assert _open_pipes() <= before  # none left open
    pool.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_cancelled_copy_waits_for_the_hash_thread_and_hashes_no_more(
    anyio_backend: str,
) -> None:
    entered, go = threading.Event(), threading.Event()
    updates: list[int] = []

    class Slow:
        def update(self, data: bytes | memoryview, /) -> None:
            updates.append(len(data))
            entered.set()
            assert go.wait(10), "the hash was never let go"

    before = _open_pipes()
    pool = BufferPool(4, 4096)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_feed, pool, 4, Slow())
            await anyio.to_thread.run_sync(entered.wait)
            tg.cancel_scope.cancel()
            # The stage cannot end while its thread hashes: the cancelled copy waits.
            threading.Timer(0.2, go.set).start()
    assert go.is_set()
    assert updates == [4096]  # the chunks queued behind it were handed back unhashed
    assert _open_pipes() <= before  # none left open
    pool.close()
