"""How aiodd/guest/ is put together: who imports whom, what ships, and the channel
interface a second transport would implement (docs/architecture.md#the-guest-room)."""

from __future__ import annotations

import ast
import importlib.util
import mmap
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import aiodd
from aiodd.errors import IsolationError, PolicyError
from aiodd.guest.channel import Channel, FileResolver
from aiodd.guest.disk import STAGE, GuestDisk
from aiodd.guest.memory import shared_buffer
from aiodd.guest.options import GuestOptions
from aiodd.guest.protocol import (
    Done,
    Failed,
    Init,
    Opened,
    Read,
    Ready,
    Request,
    Resolve,
    WireError,
)
from aiodd.policy import Policy

GUEST = Path(aiodd.__file__).parent / "guest"

# Who may import whom inside aiodd/guest/ (at run time; type-only imports aside).  The
# guest's side (child and what it needs) never reaches the host's machinery.
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),  # loads its names lazily, by module name
    "__main__": {"child"},
    "child": {"protocol", "sandbox", "seccomp", "kvm", "preload", "maps"},  # kvm: aiodd/guest/kvm/
    "maps": {"protocol"},
    "preload": set(),
    "protocol": set(),
    "sandbox": {"seccomp"},
    "seccomp": set(),
    "options": {"sandbox", "spawn"},
    "spawn": set(),
    "memory": set(),
    "channel": {"protocol"},
    "process": {"channel", "protocol", "spawn"},
    "disk": {"channel", "memory", "options", "protocol"},
    "host": {"disk", "memory", "options", "process", "spawn"},
    "raw_beside": {"disk", "options", "process", "spawn"},
}
HOST_SIDE = ("host", "disk", "process", "spawn", "channel", "memory", "options", "raw_beside")


def _imports(path: Path) -> set[str]:
    """The aiodd.guest modules ``path`` imports at run time (``if TYPE_CHECKING`` aside)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.orelse:
                visit(statement)
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "aiodd.guest":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("aiodd.guest."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("aiodd.guest."):
                    found.add(alias.name.split(".")[2])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_the_import_graph_is_the_documented_one_and_has_no_cycle() -> None:
    modules = {p.stem for p in GUEST.glob("*.py")}
    assert modules == set(ALLOWED)
    graph = {name: _imports(GUEST / f"{name}.py") for name in modules}
    for name, deps in graph.items():
        assert deps <= ALLOWED[name], f"{name} imports {sorted(deps - ALLOWED[name])}"
        graph[name] = deps & modules  # the kvm package imports none of these modules:
    for path in (GUEST / "kvm").glob("*.py"):
        assert _imports(path) <= {"kvm"}, path.name
    done: set[str] = set()
    while len(done) < len(graph):  # peel off modules whose imports are all done
        ready = {n for n, deps in graph.items() if n not in done and deps - {n} <= done}
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        done |= ready


@pytest.mark.parametrize("name", sorted(set(ALLOWED) - {"__main__"}))
def test_each_module_imports_alone(name: str) -> None:
    module = "aiodd.guest" if name == "__init__" else f"aiodd.guest.{name}"
    code = (
        f"import sys, {module}\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('aiodd'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    if name == "child":  # the guest pays for none of the host's machinery at start-up
        assert not loaded & ({f"aiodd.guest.{m}" for m in HOST_SIDE} | {"aiodd.policy"})


def test_the_test_hooks_are_not_shipped() -> None:
    assert importlib.util.find_spec("aiodd.guest.attempts") is None
    for path in Path(aiodd.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert "from tests" not in text and "import tests" not in text, path


# -- the channel interface, implemented by something that is not a process -------------


class BytesChannel:
    """A guest that serves ``data`` in this process: what a new transport implements."""

    def __init__(
        self, data: bytes, refuse: Resolve | None = None, mode: tuple[str, str] = ("sandbox", "")
    ) -> None:
        self.data = data
        self.refuse = refuse
        self.mode = mode
        self.mems: list[mmap.mmap] = []
        self.requests: list[Read] = []
        self.closed = False
        self._resolve: FileResolver | None = None

    @property
    def pid(self) -> int:
        return os.getpid()

    def start(self, init: Init, fds: Sequence[int], resolve: FileResolver) -> Ready:
        assert len(fds) == 1 + len(init.mems)
        self.mems = [
            mmap.mmap(os.dup(fd), size) for fd, size in zip(fds[1:], init.mems, strict=True)
        ]
        self._resolve = resolve
        return Ready({"layer": "active: in-process"}, *self.mode)

    def opened(self) -> Opened | Failed:
        if self.refuse is not None:
            assert self._resolve is not None
            answer, fd = self._resolve(self.refuse)
            assert fd is None and answer.error is not None
            # the guest words the refusal its own way: the host's wording wins
            return Failed(WireError("PolicyError", "the guest's account", "elsewhere"))
        return Opened("raw", len(self.data), *self.mode)

    def call(self, request: Request, timeout: float, *, cpu: float, late: str) -> Done:
        assert isinstance(request, Read)
        self.requests.append(request)
        mem = self.mems[request.mem]
        mem[request.moff : request.moff + request.len] = self.data[
            request.offset : request.offset + request.len
        ]
        return Done(len(self.requests))

    def close(self) -> None:
        self.closed = True
        for mem in self.mems:
            mem.close()


def _disk(
    tmp_path: Path, channel: Channel, options: GuestOptions | None = None, data: bytes = b""
) -> GuestDisk:
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    policy = Policy()
    fd = os.open(path, os.O_RDONLY)
    try:
        top = policy.top(str(path), fd)
        disk = GuestDisk(str(path), channel, policy, top, options or GuestOptions())
        memory = shared_buffer(1 << 20)
        try:
            disk.start(fd, None, memory)
        finally:
            memory.close()
    finally:
        os.close(fd)
    return disk


def test_the_disk_needs_only_the_channel_interface(tmp_path: Path) -> None:
    data = os.urandom(STAGE + 5000)
    channel = BytesChannel(data)
    disk = _disk(tmp_path, channel)
    assert (disk.format_name, disk.virtual_size) == ("raw", len(data))
    assert disk.isolation == {"layer": "active: in-process"}
    buf = bytearray(len(data) - 100)  # not shared: through the staging slots
    disk.read_into(100, memoryview(buf))
    assert buf == data[100:]
    assert [(r.offset, r.mem, r.len) for r in channel.requests] == [
        (100, 1, STAGE), (100 + STAGE, 1, len(data) - 100 - STAGE),
    ]  # fmt: skip
    disk.close()
    assert channel.closed


def test_a_refusal_is_reported_as_the_host_worded_it(tmp_path: Path) -> None:
    refuse = Resolve(0, "backing", "/etc/passwd", "disk.raw", None, True, 1)
    channel = BytesChannel(b"", refuse)
    with pytest.raises(PolicyError) as info:
        _disk(tmp_path, channel)
    assert "/etc/passwd" in str(info.value) and "is refused" in str(info.value)
    assert "the guest's account" not in str(info.value)


def test_the_disk_holds_the_guest_to_the_mode_it_asked_for(tmp_path: Path) -> None:
    # kvm asked, and the guest says it cannot: its reason, with the way out
    why = "cannot open /dev/kvm read-write: Permission denied"
    channel = BytesChannel(b"", mode=("sandbox", why))
    with pytest.raises(IsolationError) as info:
        _disk(tmp_path, channel, GuestOptions(isolation="kvm", kvm_device="/dev/kvm"))
    assert str(info.value) == (
        f"{tmp_path / 'disk.raw'}: the KVM guest reader cannot run here: {why}; let this user"
        " read and write /dev/kvm (often: the kvm group), or choose the auto or sandbox"
        " isolation"
    )
    assert channel.closed
    # sandbox asked: a guest that claims the VM broke the protocol
    channel = BytesChannel(b"", mode=("kvm", "auto: /dev/kvm available"))
    with pytest.raises(IsolationError, match="broke the protocol"):
        _disk(tmp_path, channel, GuestOptions(isolation="sandbox"))
    # auto: the guest's word, as it gave it
    channel = BytesChannel(b"x" * 512, mode=("kvm", "auto: /dev/kvm available"))
    disk = _disk(tmp_path, channel, GuestOptions(isolation="auto"))
    assert (disk.mode, disk.mode_reason) == ("kvm", "auto: /dev/kvm available")
    disk.close()


@pytest.mark.parametrize("opened", ["kvm", "sandbox"])
def test_the_disk_holds_the_image_for_maps_until_it_closes(tmp_path: Path, opened: str) -> None:
    # The guest started its VM, then opened the image in it or fell back to Python: the
    # VM and the Python decoders both answer with maps.
    class Opening(BytesChannel):
        def opened(self) -> Opened | Failed:
            return Opened("raw", len(self.data), opened, "auto: in-process")

    channel = Opening(b"x" * 512, mode=("kvm", "auto: /dev/kvm available"))
    disk = _disk(tmp_path, channel, GuestOptions(isolation="auto"), data=b"x" * 512)
    assert sorted(disk._held) == [0]
    disk.close()
    assert disk._held == {}


# -- maps: the reads a guest leaves to the host -------------------------------------------


class MapChannel(BytesChannel):
    """A guest in the VM that answers each read with what ``answer`` gives: the bytes it
    decodes into the staging slot, and its map (aiodd.guest.protocol.Done)."""

    def __init__(
        self, data: bytes, answer: Callable[[Read], tuple[bytes, tuple[int, ...] | None]]
    ) -> None:
        super().__init__(data, mode=("kvm", "auto: in-process"))
        self.answer = answer

    def call(self, request: Request, timeout: float, *, cpu: float, late: str) -> Done:
        assert isinstance(request, Read)
        self.requests.append(request)
        written, extents = self.answer(request)
        self.mems[request.mem][request.moff : request.moff + len(written)] = written
        return Done(len(self.requests), map=extents)


def test_a_kvm_guests_map_is_read_by_the_host_in_order(tmp_path: Path) -> None:
    data = os.urandom(65536)
    extents = (
        0, 100, 1000, 0,  # layer, file offset, length, offset in the read
        0, 5000, 2000, 500,  # over the end of the one before: the later read wins
        0, len(data) - 10, 50, 6000,  # where the file ends: zeros
    )  # fmt: skip
    channel = MapChannel(data, lambda request: (b"G" * request.len, extents))
    disk = _disk(tmp_path, channel, data=data)
    buf = bytearray(8192)
    disk.read_into(0, memoryview(buf))
    assert all(request.map for request in channel.requests)
    expected = bytearray(b"G" * 8192)  # what the guest decoded, where no extent falls
    expected[0:1000] = data[100:1100]
    expected[500:2500] = data[5000:7000]
    expected[6000:6050] = data[-10:] + bytes(40)
    assert buf == expected
    disk.close()


@pytest.mark.parametrize(
    ("extents", "why"),
    [
        ((1, 0, 10, 0), "a map of an unknown layer"),  # the host holds layer 0 alone
        ((0, 0, 10, 8190), "a map past its read"),
        ((0, 0, 8192, 0) * 2 + (0, 0, 1, 0), "a map of more than 2 times its read"),
    ],
)
def test_a_map_the_host_did_not_allow_ends_the_guest(
    tmp_path: Path, extents: tuple[int, ...], why: str
) -> None:
    channel = MapChannel(b"x" * 65536, lambda request: (b"", extents))
    disk = _disk(tmp_path, channel, data=b"x" * 65536)
    with pytest.raises(IsolationError, match=rf"broke the protocol \({why}\)"):
        disk.read_into(0, memoryview(bytearray(8192)))
    assert channel.closed


def test_a_map_may_read_twice_its_length(tmp_path: Path) -> None:
    # A parent's block read under its child's sectors: bytes read twice, the later wins.
    data = os.urandom(65536)
    extents = (0, 0, 8192, 0, 0, 10000, 8192, 0)
    channel = MapChannel(data, lambda request: (b"", extents))
    disk = _disk(tmp_path, channel, data=data)
    buf = bytearray(8192)
    disk.read_into(0, memoryview(buf))
    assert buf == data[10000:18192]
    disk.close()


def test_a_map_unasked_ends_the_guest(tmp_path: Path) -> None:
    # A read straight into the shared memory asks for no map: there is no slot to copy
    # from, the guest decodes all of it there.
    class Mapping(BytesChannel):
        def call(self, request: Request, timeout: float, *, cpu: float, late: str) -> Done:
            assert isinstance(request, Read) and not request.map
            return Done(1, map=(0, 0, 1, 0))

    channel = Mapping(b"x" * 512)
    path = tmp_path / "disk.raw"
    path.write_bytes(b"x" * 512)
    policy = Policy()
    fd = os.open(path, os.O_RDONLY)
    memory = shared_buffer(1 << 20)
    try:
        disk = GuestDisk(str(path), channel, policy, policy.top(str(path), fd), GuestOptions())
        disk.start(fd, None, memory)
        unasked = pytest.raises(IsolationError, match=r"broke the protocol \(a map unasked\)")
        with memoryview(memory) as view, view[:512] as shared, unasked:
            disk.read_into(0, shared)
    finally:
        os.close(fd)
        memory.close()
    assert channel.closed
