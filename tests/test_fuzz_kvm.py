"""The fuzz target in the KVM guest reader: the C decoders against the Python ones.

The mutated images of :mod:`tests.test_fuzz` (the same bases and mutations), each
decoded twice in this process: by the Python decoders (``isolation="inline"``'s
``registry.open_disk``) and by the KVM guest (:class:`~aiodd.guest.kvm.reader.KvmReader`,
one VM for the whole module).  Both must read the same bytes, or fail with the same
error class and message; a divergence is a failing example.  Bases whose format the
guest does not decode are skipped, and so is a mutated image that detects as such a
format.

``AIODD_FUZZ_EXAMPLES=N`` draws N random examples per base instead of the fixed,
derandomized ``DEFAULT_EXAMPLES``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiodd.chain import LocalResolver
from aiodd.errors import AioddError
from aiodd.formats import registry
from aiodd.formats.base import VirtualDisk
from aiodd.guest.kvm.reader import GUEST_FORMATS, KvmReader
from aiodd.io import LocalFile
from aiodd.policy import Policy
from tests.conftest import needs_kvm
from tests.hostile import BASE_BUILDERS, base
from tests.test_fuzz import CHUNK, FULL_READ, MiB, Mutation, mutate, mutations

pytestmark = needs_kvm

EXAMPLES = int(os.environ.get("AIODD_FUZZ_EXAMPLES", "0") or 0)
DEFAULT_EXAMPLES = 60

FUZZ = settings(
    max_examples=EXAMPLES or DEFAULT_EXAMPLES,
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

Outcome = tuple[str, str]
"""("ok", digest of the bytes read) or (error class, message)."""


@pytest.fixture(scope="module")
def reader() -> Iterator[KvmReader]:
    kvm = KvmReader("fuzzed.img")
    yield kvm
    kvm.close()


def _read(disk: VirtualDisk) -> str:
    size = disk.virtual_size
    spans = [(0, size)] if size <= FULL_READ else [(0, MiB), (size - MiB, MiB)]
    digest = hashlib.sha256(str(size).encode())
    buf = memoryview(bytearray(CHUNK))
    for start, length in spans:
        at = start
        while at < start + length:
            n = min(CHUNK, start + length - at)
            disk.read_into(at, buf[:n])
            digest.update(buf[:n])
            at += n
    return digest.hexdigest()


def _outcome(path: Path, fmt: str | None, reader: KvmReader | None) -> Outcome:
    """Decode ``path`` (in the guest when ``reader`` is given): its outcome."""
    policy = Policy()
    file = LocalFile.open(str(path), path.name)
    resolver = LocalResolver(policy, policy.top(str(path), file.fd))
    disk: VirtualDisk | None = None
    try:
        if reader is None:
            disk = registry.open_disk(file, resolver, fmt)
        else:
            disk = reader.open_disk(file, resolver, fmt)
        return "ok", _read(disk)
    except AioddError as exc:
        return type(exc).__name__, str(exc)
    finally:
        if disk is not None:
            disk.close()
        else:
            file.close()


def check_same(data: bytes, fmt: str | None, reader: KvmReader) -> None:
    with tempfile.TemporaryDirectory(prefix="aiodd-fuzz-kvm-") as work:
        path = Path(work) / "fuzzed.img"
        path.write_bytes(data)
        python = _outcome(path, fmt, None)
        assert _outcome(path, fmt, reader) == python


IN_GUEST = sorted(name for name in BASE_BUILDERS if base(name).fmt in GUEST_FORMATS)


@pytest.mark.parametrize("name", IN_GUEST)
@FUZZ
@given(
    ops=st.lists(mutations(), min_size=1, max_size=6),
    cut=st.none() | st.none() | st.integers(0, 1 << 24),
    reseal=st.booleans(),
    forced=st.booleans(),
)
def test_mutated_images_decode_alike_in_the_guest(
    reader: KvmReader,
    name: str,
    ops: list[Mutation],
    cut: int | None,
    reseal: bool,
    forced: bool,
) -> None:
    b = base(name)
    check_same(mutate(b, ops, cut, reseal), b.fmt if forced else None, reader)


@pytest.mark.parametrize("name", IN_GUEST)
def test_bases_decode_alike_in_the_guest(reader: KvmReader, name: str) -> None:
    b = base(name)
    check_same(b.data, None, reader)
    check_same(b.data, b.fmt, reader)
