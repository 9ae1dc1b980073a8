"""Shared fixtures: the anyio backends and the real qemu-img, the oracle."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from aiodd.guest.kvm import availability
from aiodd.guest.options import GuestOptions

if TYPE_CHECKING:
    from tests.fuzz.hosted import Hosted

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

needs_qemu = pytest.mark.skipif(
    QEMU_IMG is None or QEMU_IO is None,
    reason="qemu-img/qemu-io not installed (apt-get install qemu-utils); .ci/run installs it",
)

# As the guest sees it: AIODD_KVM_DEVICE=/nonexistent runs the suite as on a host without KVM.
KVM_AVAILABLE, KVM_WHY = availability(GuestOptions().kvm_path())
needs_kvm = pytest.mark.skipif(
    not KVM_AVAILABLE, reason=f"the KVM guest reader cannot run here: {KVM_WHY}"
)

# The input formats the KVM guest reader decodes, for the tests that rotate
# --isolation=kvm into their runs where every layer of the input is of one of them
# (tests/test_isolation.py checks the reader agrees).
KVM_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "parallels", "qcow", "qed"})


def with_kvm(isolations: Sequence[str], formats: Collection[str]) -> tuple[str, ...]:
    """``isolations``, and ``kvm`` too when the KVM guest decodes every one of ``formats``
    and runs here (where it does not, the rotation keeps the other modes' share; the
    tests of tests/test_isolation.py say it with their skips)."""
    if KVM_AVAILABLE and set(formats) <= KVM_FORMATS:
        return (*isolations, "kvm")
    return tuple(isolations)


def kvm_marks(isolation: str) -> list[pytest.MarkDecorator]:
    """The marks of a test run with ``--isolation=isolation``: kvm needs /dev/kvm."""
    return [needs_kvm] if isolation == "kvm" else []


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio+uvloop"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    backend: tuple[str, dict[str, object]] = request.param
    return backend


def run_qemu(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a qemu-img / qemu-io command line (first arg names the tool)."""
    return subprocess.run([str(a) for a in args], capture_output=True, check=check)


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run_qemu("qemu-img", *args, check=check)


def qemu_io(image: str | Path, commands: Sequence[str], fmt: str | None = None) -> None:
    """Run qemu-io commands (e.g. ``write -P 0xab 0 64k``) against an image."""
    args: list[str | Path] = ["qemu-io"]
    if fmt:
        args += ["-f", fmt]
    for command in commands:
        args += ["-c", command]
    args.append(image)
    run_qemu(*args)


def qemu_raw_bytes(image: str | Path, tmp_path: Path, fmt: str | None = None) -> bytes:
    """The image's virtual disk as qemu reads it (``qemu-img convert -O raw``)."""
    out = tmp_path / "qemu-view.raw"
    args: list[str | Path] = ["convert"]
    if fmt:
        args += ["-f", fmt]
    args += ["-O", "raw", image, out]
    qemu_img(*args)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.fixture(scope="session")
def kvm_hostile_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The KVM tests' hostile guest (tests/kvm/hostile.c), built with the shipped guest's
    runtime and flags, once per session."""
    from aiodd.guest.kvm.build import BuildError, build

    source = Path(__file__).parent / "kvm" / "hostile.c"
    try:
        return build(tmp_path_factory.mktemp("hostile") / "hostile.elf", [source],
                     libraries=False)  # fmt: skip
    except BuildError as exc:
        pytest.skip(f"cannot build the hostile test guest: {exc}")


@pytest.fixture(scope="session", params=["normal", "tiny-tables"])
def hosted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Hosted:
    """The guest's C decoders built natively (tests/fuzz/), as the guest has them and with
    their table budgets cut to nothing (every table through a one-slot cache): both must
    read as Python does.  Built once per run, for every decoder's differential tests."""
    from tests.fuzz.build import CompilerMissing, HostedBuildError, build_library
    from tests.fuzz.hosted import Hosted  # at run time, not only for mypy

    tiny = request.param == "tiny-tables"
    try:
        library = build_library(
            tmp_path_factory.mktemp("hosted") / "libhosted.so", tiny_tables=tiny
        )
    except CompilerMissing as exc:
        pytest.skip(f"cannot build the hosted decoders: {exc}")
    except HostedBuildError as exc:
        pytest.fail(f"the hosted decoders do not build: {exc}")
    return Hosted(library, tiny_tables=tiny)
