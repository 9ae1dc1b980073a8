"""The guest disk: the :class:`~aiodd.formats.base.VirtualDisk` a guest reader decodes.

:class:`GuestDisk` is what the pipeline reads.  It talks to its guest through a
:class:`~aiodd.guest.channel.Channel` and knows nothing of how the guest runs.  A read
becomes :class:`~aiodd.guest.protocol.Read` requests: straight into the caller's buffer
when that lies in the shared memory the guest maps, else through two staging slots.  The
files the image names are asked of the host by the guest; the disk opens them under the
:class:`~aiodd.policy.Policy` and the channel hands them over.

A read through a staging slot asks for a map: the guest (its VM under ``kvm``, its
Python decoders under ``sandbox``) leaves the reads of the files the disk holds open
(the image and its first layers) to the disk, which makes them straight into the
caller's buffer and copies only the rest from the slot (docs/architecture.md, "The
wire protocol").
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import warnings

from aiodd import _timing
from aiodd.errors import AioddError, ImageError, IsolationError, PolicyError
from aiodd.formats.base import Reference
from aiodd.formats.zeros import zero_fill
from aiodd.guest.channel import Channel, FileAnswer
from aiodd.guest.memory import address, shared_buffer
from aiodd.guest.options import GuestOptions
from aiodd.guest.protocol import (
    MAP_FACTOR,
    MAP_LAYERS,
    Done,
    Failed,
    Init,
    Read,
    Resolve,
    Resolved,
    WireError,
)
from aiodd.io import LocalFile, read_through_holes
from aiodd.policy import Layer, Policy

TYPE_CHECKING = False  # typing, not imported: not needed to copy
if TYPE_CHECKING:
    from typing import NoReturn

MAX_FILES = 4096
"""References one image may resolve (vmdk extents included) before the guest is stopped."""

STAGE = 4 << 20
"""Size of each staging slot used when the caller's buffer is not shared memory."""

LANES = 2
"""Read lanes to the guest: as many reads as it decodes at once (two workers, or two
VMs); a further reading thread waits for a free lane (aiodd.guest.process)."""


class IsolationWarning(UserWarning):
    """A sandbox layer could not be set up; the guest runs with the others."""


def kvm_unavailable(name: str, reason: str, device: str) -> str:
    """The one line for ``kvm`` asked for where it cannot run: why, and what would help."""
    if reason.startswith(f"cannot open {device}") and reason.endswith("No such file or directory"):
        hint = (
            "; this host offers no KVM (a container needs the device passed in, a VM nested"
            " virtualisation), choose the auto or sandbox isolation"
        )
    elif reason.startswith(f"cannot open {device}"):
        hint = (
            f"; let this user read and write {device} (often: the kvm group),"
            " or choose the auto or sandbox isolation"
        )
    else:
        hint = "; choose the auto or sandbox isolation to decode without it"
    return f"{name}: the KVM guest reader cannot run here: {reason}{hint}"


class GuestDisk:
    """A virtual disk decoded by the guest reader at the other end of ``channel``."""

    def __init__(
        self,
        name: str,
        channel: Channel,
        policy: Policy,
        top: Layer,
        options: GuestOptions,
    ) -> None:
        self.channel = channel
        self._name = name
        self._policy = policy
        self._layers: list[Layer] = [top]
        self._options = options
        self._lock = threading.Lock()
        self._policy_error: ImageError | None = None
        self._files = 0
        self.isolation: dict[str, str] = {}
        self.mode = ""  # where the guest decodes: kvm or sandbox
        self.mode_reason = ""  # and why (see aiodd.api.DdResult.isolation_reason)
        self.format_name = ""
        self.virtual_size = 0
        self._mems: list[tuple[int, int, int]] = []  # (mem id, base address, size)
        self._stage: mmap.mmap | None = None
        self._stage_slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        # The layers this disk reads a map's extents from, by number, and whether it
        # still keeps them: until it closes.
        self._held: dict[int, LocalFile] = {}
        self._holding = True

    # -- start ---------------------------------------------------------------------

    def start(
        self, input_fd: int, fmt: str | None, memory: mmap.mmap | None, *, probe: bool = False
    ) -> None:
        fds = [] if probe else [input_fd]
        sizes: list[int] = []
        shared_fd = getattr(memory, "memfd", None)
        if memory is not None and isinstance(shared_fd, int) and len(memory) > 0:
            fds.append(shared_fd)
            sizes.append(len(memory))
            self._mems.append((0, address(memory), len(memory)))
        if not probe:
            stage = shared_buffer(2 * STAGE)
            self._stage = stage
            fds.append(stage.memfd)
            sizes.append(len(stage))
            self._stage_slots.put(0)
            self._stage_slots.put(STAGE)
        options = self._options
        init = Init(
            name=self._name,
            fmt=fmt,
            mems=tuple(sizes),
            layers=tuple(options.layers),
            require=options.require_isolation,
            memory_limit=options.memory_limit,
            cpu=options.start_cpu,
            probe=probe,
            isolation=options.isolation,
            kvm_device=options.kvm_path(),
            lanes=0 if probe else LANES,
        )
        ready = self.channel.start(init, fds, self._resolve)
        _timing.mark("guest ready")
        self.isolation = dict(ready.layers)
        self._set_mode(ready.mode, ready.reason)
        if options.isolation == "kvm" and ready.mode != "kvm":
            self.close()
            raise IsolationError(kvm_unavailable(self._name, ready.reason, options.kvm_path()))
        missing = {k: v for k, v in self.isolation.items() if v.startswith("missing")}
        if missing and options.require_isolation:
            self.close()
            lines = "; ".join(f"{k} {v}" for k, v in missing.items())
            raise IsolationError(
                f"{self._name}: isolation required but a sandbox layer is missing ({lines})"
            )
        for layer, line in missing.items():
            warnings.warn(
                IsolationWarning(f"guest reader runs without {layer} ({line})"), stacklevel=4
            )
        if probe:
            return
        self._hold(0, input_fd, self._name)
        opened = self.channel.opened()
        _timing.mark("guest opened input")
        if isinstance(opened, Failed):
            raise self._policy_error or self.error_of(opened.error)
        self._set_mode(opened.mode, opened.reason)
        self.format_name = opened.format
        self.virtual_size = opened.virtual_size

    def _set_mode(self, mode: str, reason: str) -> None:
        # A guest asked for the Python decoders does not get to say it used the VM.
        if self._options.isolation == "sandbox" and mode != "sandbox":
            self.close()
            raise IsolationError(f"{self._name}: the guest reader broke the protocol")
        self.mode, self.mode_reason = mode, reason

    # -- reading -------------------------------------------------------------------

    def read_into(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        if length == 0:
            return
        where = self._locate(buf)
        if where is not None:
            self._request(offset, where[0], where[1], length)
            return
        assert self._stage is not None
        slot = self._stage_slots.get()
        try:
            done = 0
            while done < length:
                n = min(STAGE, length - done)
                answer = self._request(offset + done, len(self._mems), slot, n, True)
                part = buf[done : done + n]
                with memoryview(self._stage) as stage, stage[slot : slot + n] as staged:
                    if answer.map is None:
                        part[:] = staged
                    else:
                        self._place(part, staged, answer.map)
                done += n
        finally:
            self._stage_slots.put(slot)

    def _place(self, buf: memoryview, staged: memoryview, extents: tuple[int, ...]) -> None:
        """Fill ``buf`` as a read's map says: the reads the guest left, made here in
        order, over what it wrote (``staged``), which is copied where none falls."""
        spans = []
        for i in range(0, len(extents), 4):
            layer, offset, length, moff = extents[i : i + 4]
            if layer not in self._held or moff + length > len(buf):
                why = "a map past its read" if layer in self._held else "a map of an unknown layer"
                self._broke(why)
            spans.append((moff, moff + length))
        if sum(end - start for start, end in spans) > MAP_FACTOR * len(buf):
            self._broke(f"a map of more than {MAP_FACTOR} times its read")
        spans.sort()
        pos = 0
        for start, end in spans:
            if start > pos:
                buf[pos:start] = staged[pos:start]
            pos = max(pos, end)
        if pos < len(buf):
            buf[pos:] = staged[pos:]
        for i in range(0, len(extents), 4):
            layer, offset, length, moff = extents[i : i + 4]
            part = buf[moff : moff + length]
            got = read_through_holes(self._held[layer], offset, part)
            if got < length:  # where the file ends: zeros, as the guest reads it
                zero_fill(part[got:])

    def _locate(self, buf: memoryview) -> tuple[int, int] | None:
        if not self._mems or buf.readonly:
            return None
        try:
            start = address(buf)
        except (TypeError, ValueError):
            return None
        for mem_id, base, size in self._mems:
            if base <= start and start + len(buf) <= base + size:
                return mem_id, start - base
        return None

    def _request(self, offset: int, mem: int, moff: int, length: int, maps: bool = False) -> Done:
        deadline = self._options.watchdog_floor + length / self._options.watchdog_rate
        done = self.channel.call(
            Read(offset, mem, moff, length, map=maps),
            deadline,
            cpu=deadline,
            late=f"did not finish reading {length} bytes at offset {offset} within"
            f" {deadline:.1f} s (watchdog)",
        )
        if done.error is not None:
            raise self.error_of(done.error)
        if done.map is not None and not maps:
            self._broke("a map unasked")
        return done

    def _broke(self, why: str) -> NoReturn:
        self.close()
        raise IsolationError(f"{self._name}: the guest reader broke the protocol ({why})")

    def error_of(self, wire: WireError) -> AioddError:
        """The exception a guest's error stands for."""
        # A refusal the host decided is reported as the host worded it, not as the
        # guest repeats it.
        if wire.kind in ("PolicyError", "InUseError") and self._policy_error is not None:
            return self._policy_error
        return wire.exception(self._name, self._options.memory_limit)

    # -- the files the image names -------------------------------------------------

    def _resolve(self, request: Resolve) -> FileAnswer:
        """Open a file the guest asks for, under the policy (runs on the channel's thread)."""
        if request.layer >= len(self._layers):
            raise ValueError("bad field 'layer'")
        layer = self._layers[request.layer]
        ref = Reference(request.kind, request.name, layer.name, request.format)  # type: ignore[arg-type]
        self._files += 1
        try:
            if self._files > MAX_FILES:
                raise PolicyError(layer.name, f"the image names more than {MAX_FILES} files")
            fd, new = self._policy.open_reference(layer, ref, disk=request.disk)
        except ImageError as exc:
            if isinstance(exc, PolicyError) and self._policy_error is None:
                self._policy_error = exc
            return Resolved(request.rid, error=WireError.of(exc)), None
        with self._lock:
            self._layers.append(new)
            new_id = len(self._layers) - 1
        try:
            self._hold(new_id, fd, new.name)
        except OSError as exc:  # no descriptor left to hold it with
            os.close(fd)
            error = ImageError(layer.name, f"cannot hold {new.name} open: {exc.strerror}")
            return Resolved(request.rid, error=WireError.of(error)), None
        return Resolved(request.rid, new_id), fd

    def _hold(self, layer: int, fd: int, name: str) -> None:
        """Keep layer ``layer`` open, to read a map's extents from it: the layers below
        MAP_LAYERS, until the disk closes."""
        if self._holding and layer < MAP_LAYERS:
            held = os.dup(fd)
            try:
                file = LocalFile(held, name)
            except BaseException:
                os.close(held)
                raise
            with self._lock:
                if self._holding:
                    self._held[layer] = file
                    return
            file.close()

    def _let_go(self) -> None:
        """Close the layers held for maps, and hold no more (a file the guest asks for
        while the disk closes is not held)."""
        with self._lock:
            self._holding = False
            held, self._held = self._held, {}
        for file in held.values():
            file.close()

    # -- the end -------------------------------------------------------------------

    def close(self) -> None:
        self.channel.close()
        if self._stage is not None:
            self._stage.close()
        self._let_go()

    @property
    def pid(self) -> int:
        return self.channel.pid

    @property
    def name(self) -> str:
        """The image's name, as the user gave it (for messages)."""
        return self._name
