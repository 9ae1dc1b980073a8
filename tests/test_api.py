"""The library API, ``await aiodd.dd(...)``, under asyncio, asyncio+uvloop and trio.

Every test runs on the three backends (the ``anyio_backend`` fixture in conftest.py);
the copies run in both isolation modes where the mode could change the outcome.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
from pathlib import Path

import anyio
import pytest

import aiodd
from aiodd import DdResult, Progress
from aiodd.formats import OUTPUT_FORMATS
from tests.conftest import needs_kvm, needs_qemu

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
MODES = ["sandbox", "inline"]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".aiodd-tmp"))


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(5 * MiB + 3000)  # not a multiple of 512: the tail reads as zeros
    path = tmp_path / "in.raw"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("isolation", [*MODES, pytest.param("kvm", marks=needs_kvm)])
async def test_copy_window(
    sample: tuple[Path, bytes], tmp_path: Path, isolation: aiodd.Isolation
) -> None:
    src, data = sample
    dst = tmp_path / "out.raw"
    result = await aiodd.dd(src, dst, bs="1K", skip=3, count=4000, isolation=isolation)
    assert isinstance(result, DdResult)
    assert (result.window.start, result.window.end) == (3 * 1024, 4000 * 1024)
    assert result.bytes_copied == 3997 * 1024
    assert result.input_format == "raw" and result.output_format == "raw"
    assert result.virtual_size == len(data) + (-len(data) % 512)
    assert result.output_size == 3997 * 1024
    assert result.warnings == ()
    assert (result.isolation, result.isolation_reason) == (isolation, "requested")
    assert dst.read_bytes() == data[3 * 1024 : 4000 * 1024]
    assert _leftovers(tmp_path) == []


async def test_tail_past_the_file_reads_as_zeros(
    sample: tuple[Path, bytes], tmp_path: Path
) -> None:
    src, data = sample
    dst = tmp_path / "tail.raw"
    result = await aiodd.dd(src, dst, bs=1000, skip=(len(data) - 10) // 1000)
    start = result.window.start
    expected = data[start:] + b"\0" * (result.virtual_size - len(data))
    assert dst.read_bytes() == expected + b"\0" * (-len(expected) % 512)


async def test_progress_events(sample: tuple[Path, bytes], tmp_path: Path) -> None:
    src, _ = sample
    events: list[Progress] = []
    result = await aiodd.dd(
        src, tmp_path / "p.raw", bs="1M", on_progress=events.append, progress_interval=0
    )
    assert events[0].bytes_done == 0
    assert events[-1].finished and events[-1].percent == 100.0
    assert events[-1].bytes_done == events[-1].total_bytes == result.output_size
    done = [e.bytes_done for e in events]
    assert done == sorted(done)
    assert len(events) >= 3  # a start, at least one buffer, the end


async def test_skip_past_the_end_warns_and_writes_an_empty_file(
    sample: tuple[Path, bytes], tmp_path: Path
) -> None:
    src, _ = sample
    dst = tmp_path / "empty.raw"
    result = await aiodd.dd(src, dst, bs="1M", skip=100)
    assert result.bytes_copied == 0
    assert result.warnings == (f"{src}: cannot skip to specified offset",)
    assert dst.read_bytes() == b""


async def test_a_hex_size_with_a_suffix_warns_as_qemu_does(
    sample: tuple[Path, bytes], tmp_path: Path
) -> None:
    src, data = sample
    dst = tmp_path / "out.raw"
    result = await aiodd.dd(src, dst, bs="0x1K", count="0x2", skip=1)
    # qemu's window ends at count * bs from the start of the input, not after skip
    assert (result.window.start, result.window.end) == (1024, 2048)
    assert result.warnings == (
        "warning: using a multiplier suffix on hex numbers is deprecated: 0x1K",
    )
    assert dst.read_bytes() == data[1024:2048]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bs": 0}, "invalid bs '0': must be between 1 and 2147483647"),
        ({"bs": "2G"}, "invalid bs '2G': must be between 1 and 2147483647"),
        ({"bs": True}, "invalid bs True: must be an integer or a size string"),
        ({"bs": 1.5}, "invalid bs 1.5: must be an integer or a size string"),
        (
            {"count": "1KB"},
            "invalid count '1KB': not a size (use a number with an optional"
            " k, M, G, T, P or E suffix, e.g. 4K or 1.5M)",
        ),
        ({"count": "16E"}, "invalid count '16E': must be between 0 and 9223372036854775807"),
        ({"skip": -1}, "invalid skip '-1': must be between 0 and 9223372036854775807"),
        (
            {"output_format": "qcow3"},
            f"unknown output format 'qcow3': supported formats are {', '.join(OUTPUT_FORMATS)}",
        ),
        (
            {"output_format": "qed"},
            "output format 'qed' is not supported: QED is kept in qemu for old images only;"
            " write qcow2 instead (-O qcow2)",
        ),
        (
            {"output_format": "qcow"},
            "output format 'qcow' is not supported: qcow (version 1) is kept in qemu for old"
            " images only; write qcow2 instead (-O qcow2)",
        ),
        ({"isolation": "none"}, "invalid isolation 'none': use auto, kvm, sandbox or inline"),
        ({"io_size": 1000}, "invalid io_size '1000': must be a multiple of 4096 of at least 65536"),
        (
            {"allow_backing": ["/nonexistent/dir"]},
            "invalid allow_backing '/nonexistent/dir': not a directory",
        ),
    ],
)
async def test_usage_errors(
    sample: tuple[Path, bytes], tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    src, _ = sample
    dst = tmp_path / "never.raw"
    with pytest.raises(aiodd.UsageError) as info:
        await aiodd.dd(src, dst, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert not dst.exists()


async def test_same_file_is_refused(sample: tuple[Path, bytes]) -> None:
    src, data = sample
    with pytest.raises(aiodd.UsageError) as info:
        await aiodd.dd(src, src)
    assert str(info.value) == f"of={src} and if={src} name the same file; choose another output"
    assert src.read_bytes() == data


@needs_qemu
@pytest.mark.parametrize("isolation", MODES)
async def test_policy_refusals_name_the_library_parameter(
    tmp_path: Path, isolation: aiodd.Isolation
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "base.raw").write_bytes(bytes(MiB))
    images = tmp_path / "images"
    images.mkdir()
    overlay = images / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "../base/base.raw",
         str(overlay)],
        check=True,
    )  # fmt: skip
    dst = tmp_path / "out.raw"
    with pytest.raises(aiodd.PolicyError) as info:
        await aiodd.dd(overlay, dst, isolation=isolation)
    assert str(info.value).endswith("(allow it with allow_backing=[DIR])")
    assert info.value.allowable is True
    assert not dst.exists()
    result = await aiodd.dd(overlay, dst, isolation=isolation, allow_backing=[base])
    assert result.bytes_copied == MiB


@pytest.mark.parametrize("isolation", MODES)
async def test_image_errors(tmp_path: Path, isolation: aiodd.Isolation) -> None:
    with pytest.raises(aiodd.ImageError, match="cannot open"):
        await aiodd.dd(tmp_path / "missing.raw", tmp_path / "o.raw", isolation=isolation)
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb\0\0\0\x03" + b"\0" * 200)
    with pytest.raises(aiodd.ImageError, match="qcow2"):
        await aiodd.dd(bad, tmp_path / "o.raw", isolation=isolation)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("isolation", MODES)
async def test_cancellation_leaves_the_old_output_untouched(
    tmp_path: Path, isolation: aiodd.Isolation
) -> None:
    src = tmp_path / "big.raw"
    with src.open("wb") as f:
        f.truncate(64 * 1024 * MiB)  # sparse: reading it is cheap, copying takes a while
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"previous contents")
    seen: list[Progress] = []
    with anyio.CancelScope() as scope:

        def cancel_once_started(progress: Progress) -> None:
            seen.append(progress)
            if progress.bytes_done > 0:
                scope.cancel()

        await aiodd.dd(
            src,
            dst,
            bs="1M",
            on_progress=cancel_once_started,
            progress_interval=0,
            isolation=isolation,
        )
    assert scope.cancelled_caught
    assert seen and not seen[-1].finished
    assert dst.read_bytes() == b"previous contents"
    assert _leftovers(tmp_path) == []


async def test_timeout_with_move_on_after(tmp_path: Path) -> None:
    src = tmp_path / "big.raw"
    with src.open("wb") as f:
        f.truncate(64 * 1024 * MiB)
    dst = tmp_path / "out.raw"
    with anyio.move_on_after(0.3) as scope:
        await aiodd.dd(src, dst, bs="1M")
    assert scope.cancelled_caught
    assert not dst.exists() and _leftovers(tmp_path) == []


async def test_output_error_names_the_output(sample: tuple[Path, bytes], tmp_path: Path) -> None:
    src, _ = sample
    with pytest.raises(aiodd.OutputError, match="cannot create output"):
        await aiodd.dd(src, tmp_path / "no" / "such" / "dir.raw")


async def test_replacing_a_file_keeps_its_mode(sample: tuple[Path, bytes], tmp_path: Path) -> None:
    src, data = sample
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"old")
    dst.chmod(0o600)
    await aiodd.dd(src, dst, bs="1M", count=1)
    assert dst.read_bytes() == data[:MiB]
    assert dst.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx", "vdi"])
async def test_structured_output_round_trips(
    sample: tuple[Path, bytes], tmp_path: Path, fmt: str
) -> None:
    src, data = sample
    image = tmp_path / f"out.{fmt}"
    result = await aiodd.dd(src, image, bs=4096, skip=1, count=700, output_format=fmt)
    assert result.output_format == fmt
    back = tmp_path / "back.raw"
    again = await aiodd.dd(image, back, bs="1M")
    assert again.input_format == fmt
    window = data[4096 : 700 * 4096]  # count counts from the disk's start, as in qemu
    got = back.read_bytes()
    assert got[: len(window)] == window
    assert got[len(window) :].strip(b"\0") == b""


# -- the public surface ------------------------------------------------------------------


def test_all_is_complete_and_importable() -> None:
    public = {name for name in dir(aiodd) if not name.startswith("_")}
    public -= {m.name for m in pkgutil.iter_modules(aiodd.__path__)}  # submodules
    public -= {"TYPE_CHECKING", "Any"}
    assert public <= set(aiodd.__all__)
    for name in aiodd.__all__:
        assert getattr(aiodd, name) is not None


def test_errors_are_one_hierarchy() -> None:
    errors = importlib.import_module("aiodd.errors")
    for name in dir(errors):
        obj = getattr(errors, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, Exception)
            and obj.__module__ == errors.__name__
        ):
            assert issubclass(obj, aiodd.AioddError)
            assert name in aiodd.__all__
    assert issubclass(aiodd.UsageError, ValueError)  # what callers of a bad argument catch
