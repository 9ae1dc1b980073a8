"""The guest reader's side: runs in a fresh process started by :mod:`aiodd.guest.spawn`.

It receives its descriptors (the input image and the shared memory), imports what
decoding needs, puts itself in the sandbox (:mod:`aiodd.guest.sandbox`) and only then
reads image bytes.  From then on it can read the descriptors it holds, use memory and
talk on its control socket; each further file the image names is asked of the host, which
decides under the backing-file policy and answers with a descriptor or a refusal.

Reads come on the read lanes (:mod:`aiodd.guest.process`), one socket each, a read at a
time: with the Python decoders a thread per lane receives, decodes and answers.

In the ``kvm`` mode (and ``auto``, where KVM runs) it also sets up the KVM guest reader
(:mod:`aiodd.guest.kvm.reader`) before it seals itself, and the decoding happens in that
micro-VM: the main thread runs the VM's work (``KVM_RUN`` runs there, for the
watchdog's ``SIGPROF``) and serves the first lane, another thread receives the host's
other messages.  A second VM, opening the same image, serves the second lane on a
thread of its own, under a watchdog of its own, so two reads decode at once (a
compressed image uses both cores, as the Python decoders' two lanes do).  Under
``auto``, a host where KVM cannot run sends it back to the Python decoders, in this same
sandboxed process; where the VM runs, it decodes every format, and the process imports
no Python decoder (only the probes that detect a format), ``zlib`` or ``zstandard``.
"""

from __future__ import annotations

import _queue
import _signal
import _socket
import _thread
import mmap
import os
import struct
import sys
import time

from aiodd import _timing
from aiodd.errors import ImageError, IsolationError
from aiodd.guest import kvm, protocol, sandbox, seccomp
from aiodd.guest.protocol import (
    Call,
    Close,
    Done,
    Failed,
    Init,
    Opened,
    Read,
    Ready,
    Resolve,
    Resolved,
    WireError,
)
from aiodd.io import LocalFile

# The guest imports the C cores of signal and threading, and neither typing nor
# collections: each brings enum, re or functools, milliseconds of its start-up, which a
# short copy waits for (docs/performance.md, "Start-up"; tests/test_startup.py checks).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeAlias

    from aiodd.formats.base import RandomAccessFile, Reference, VirtualDisk
    from aiodd.guest.kvm.reader import KvmReader

WORKERS = 2
VMS = 2  # two reads decode at once, one per core; the host may queue more
# The codecs the Python decoders use (names, the vhdx and vpc parent locators, the vmdk
# descriptor), by their modules in the encodings package; utf-8 is the interpreter's own.
CODEC_MODULES = ("utf_16", "utf_16_le", "utf_16_be", "latin_1", "ascii")
M_TRIM_THRESHOLD = -1
M_ARENA_MAX = -8
THREAD_STACK = 1 << 20  # worker threads need little stack; keeps RLIMIT_AS meaningful
# A vmdk descriptor may name up to 4096 extents (vmdk/layout.py's MAX_EXTENTS), each an open
# file, plus a chain of 64 layers: the guest must be able to hold them all.
MAX_FDS = 4096 + 256
_FD = struct.Struct("i")  # one descriptor in an SCM_RIGHTS message


class Flag:
    """What the guest needs of :class:`threading.Event`: set once, waited for by any
    number of threads."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()

    def wait(self) -> None:
        with self._lock:  # each waiter passes it on to the next
            pass


class HostLink:
    """The control socket to the host, shared by the receiving thread and the workers."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self._send_lock = _thread.allocate_lock()
        self._waiters: dict[int, list[Any]] = {}
        self._lock = _thread.allocate_lock()
        self._next = 0
        # The host's number for each file it gave and holds open (those below
        # MAP_LAYERS), by descriptor: a read's map names the layer (protocol.Done).
        self.layers: dict[int, int] = {}
        # Whether the Python decoders read those files, and leave a mapped read's reads
        # of them to the host (aiodd.guest.maps); the VM's reader maps them itself.
        self.mappable = False

    def file(self, fd: int, name: str, layer: int) -> LocalFile:
        """The file the host gave as ``layer``, as the decoders are to read it."""
        if layer < protocol.MAP_LAYERS:
            self.layers[fd] = layer
            if self.mappable:
                from aiodd.guest.maps import MappableFile  # imported before the seal

                return MappableFile(fd, name, layer)
        return LocalFile(fd, name)

    def send(self, message: protocol.GuestMessage) -> None:
        with self._send_lock:
            _send(self.sock, message)

    def ask(self, request: Resolve) -> tuple[Resolved, list[int]]:
        """Send a request to the host and wait for its answer."""
        event = Flag()
        with self._lock:
            self._next += 1
            rid = self._next
            slot: list[Any] = [event, None, []]
            self._waiters[rid] = slot
        self.send(request.replace(rid=rid))
        event.wait()
        answer: Resolved = slot[1]
        fds: list[int] = slot[2]
        return answer, fds

    def answered(self, message: Resolved, fds: list[int]) -> None:
        with self._lock:
            slot = self._waiters.pop(message.rid, None)
        if slot is None:
            for fd in fds:
                os.close(fd)
            return
        slot[1], slot[2] = message, fds
        slot[0].set()


class GuestResolver:
    """Resolver whose every answer comes from the host's policy."""

    def __init__(self, link: HostLink, layer: int) -> None:
        self._link = link
        self._layer = layer

    def _ask(self, ref: Reference, disk: bool) -> tuple[LocalFile, int]:
        answer, fds = self._link.ask(
            Resolve(self._layer, ref.kind, ref.name, ref.referrer, ref.format, disk)
        )
        if answer.error is not None or answer.layer is None or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if answer.error is None:
                raise ImageError(ref.referrer, "refused")
            raise answer.error.exception(ref.referrer)
        return self._link.file(fds[0], ref.name, answer.layer), answer.layer

    def open_file(self, ref: Reference) -> RandomAccessFile:
        return self._ask(ref, disk=False)[0]

    def open_disk(self, ref: Reference) -> VirtualDisk:
        file, layer = self._ask(ref, disk=True)
        try:
            # Imported before the seal (_import_python_decoders): only a lookup now.
            from aiodd.formats import registry

            return registry.open_disk(file, GuestResolver(self._link, layer), ref.format)
        except BaseException:
            file.close()
            raise

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, GuestResolver]:
        file, layer = self._ask(ref, disk=True)
        return file, GuestResolver(self._link, layer)


if TYPE_CHECKING:
    Job: TypeAlias = Callable[[], None] | None
    """Work for a thread (None: stop)."""

    Handler: TypeAlias = Callable[["Guest", Call], str]
    """Answers a :class:`~aiodd.guest.protocol.Call` its entry point registered; runs on
    a worker thread, inside the sandbox.  An exception is answered as the request's
    error."""


class Guest:
    def __init__(
        self, link: HostLink, init: Init, fds: list[int], handlers: Mapping[str, Handler]
    ) -> None:
        self.link = link
        self.init = init
        self.input_fd = fds[0] if fds else -1
        self.mems: list[mmap.mmap] = []
        for fd, size in zip(fds[1:], init.mems, strict=False):
            self.mems.append(mmap.mmap(fd, size))
            os.close(fd)
        lane_fds = fds[1 + len(init.mems) :]
        if len(lane_fds) != init.lanes:
            os._exit(2)
        self.lanes = [
            _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, fd) for fd in lane_fds
        ]
        # Under kvm each VM's thread receives its own lane's reads (serve_lane); where a
        # VM has no thread of its own, plain threads receive them for the VMs' queue.
        self.lanes_direct = False
        self.lanes_decided = Flag()
        self.disk: VirtualDisk | None = None
        self.jobs: _queue.SimpleQueue[Job] = _queue.SimpleQueue()  # the worker threads'
        self.main_jobs: _queue.SimpleQueue[Job] = _queue.SimpleQueue()  # the VM's
        self.handlers = handlers
        self.reader: KvmReader | None = None
        self.mode = "sandbox"  # where the image is decoded: kvm or sandbox
        self.reason = "requested"

    # -- the KVM guest reader --------------------------------------------------------

    def start_vm(self) -> None:
        """Set up the KVM guest reader if asked to (main thread, before sealing)."""
        wanted = self.init.isolation
        if wanted not in ("auto", "kvm"):
            return
        device = self.init.kvm_device
        available, why = kvm.availability(device)
        if available:
            # Here, not at the module's import: a guest that decodes in Python does not
            # need the VM's monitor, 3 ms of its start (prepare() imports it earlier
            # where the VM will most likely run).
            from aiodd.guest.kvm.reader import KvmReader

            try:
                self.reader = KvmReader(
                    self.init.name,
                    self.mems,
                    vms=VMS,
                    host_layers=self.link.layers,
                    map_extents=protocol.MAP_EXTENTS,
                    map_factor=protocol.MAP_FACTOR,
                )
            except (IsolationError, OSError) as exc:
                if self.reader is not None:
                    self.reader.close()
                    self.reader = None
                why = _unnamed(str(exc), self.init.name)
        if self.reader is not None:
            self.mode = "kvm"
            self.reason = "requested" if wanted == "kvm" else f"auto: {device} available"
        else:
            self.reason = why if wanted == "kvm" else f"auto: {why}"

    def start_vm_threads(self, reader: KvmReader) -> int:
        """A thread for each further VM, reading as the main thread does, each with its
        watchdog's timer made before sealing (it cannot be made after); a VM whose
        thread could not get one is closed.  Each VM's thread then serves its own lane,
        if every VM has a thread and a lane; else a thread per lane receives the reads
        for the VMs' queue.  How many threads were started."""
        started = 0
        for index in range(1, reader.vms):
            ready = Flag()
            # SIGPROF stays unblocked there: the watchdog's tick must interrupt KVM_RUN.
            _thread.start_new_thread(self._vm_thread, (reader, ready, index))
            ready.wait()
            started += 1
        reader.drop_unbound()  # reader.vms now counts the VMs with a thread
        self.lanes_direct = len(self.lanes) == reader.vms
        self.lanes_decided.set()
        if not self.lanes_direct:
            for lane in self.lanes:
                _start(self.serve_lane, lane, True)
            started += len(self.lanes)
        return started

    def _vm_thread(self, reader: KvmReader, ready: Flag, index: int) -> None:
        from aiodd.guest.kvm.vmm import ThreadWatchdog  # imported with the reader

        try:
            watchdog = ThreadWatchdog()
        except OSError:
            ready.set()  # reads wait for the other VM
            return
        reader.bind(watchdog)
        ready.set()
        self.lanes_decided.wait()
        if self.lanes_direct:
            self.serve_lane(self.lanes[index])
        self.worker(self.main_jobs)

    # -- sandbox -------------------------------------------------------------------

    def enter_sandbox(self) -> dict[str, str]:
        wanted = set(self.init.layers)
        status: dict[str, str] = {}

        def attempt(name: str, fn: Callable[[], str]) -> None:
            if name not in wanted:
                status[name] = "disabled: not requested"
                return
            try:
                status[name] = "active: " + fn()
            except OSError as exc:
                status[name] = f"missing: {exc.strerror or exc}"

        # glibc reads /proc/sys/vm/overcommit_memory the first time it shrinks a thread's
        # heap: an open() the seccomp filter would kill.  Never shrinking avoids it.
        sandbox.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        # Each thread arena reserves 64-128 MiB of address space up front, which would eat
        # the RLIMIT_AS budget; one arena for all threads keeps the limit about real memory.
        sandbox.mallopt(M_ARENA_MAX, 1)
        # glibc loads libgcc_s on demand (thread exit and unwinding after a failed
        # allocation): an open() the seccomp filter would kill.  Load it while we may.
        sandbox.preload_unwinder()
        time.localtime()  # loads the time zone (a file) now rather than later
        # The namespaces in two halves, the VM between them (sandbox.unshare says why).
        attempt("namespaces", _unshare)
        _timing.mark("namespaces")
        self.start_vm()
        _timing.mark("KVM VM made")
        if self.reader is not None:
            # The reader detects formats in Python: their probes, now, while open()
            # is allowed; it needs no Python decoder.  An input named raw needs none:
            # it names no backing file to detect.
            if self.init.fmt != "raw":
                from aiodd.formats import registry

                registry.import_probes()
        elif self.init.isolation != "kvm":
            _import_python_decoders(self.init.fmt)
            self.link.mappable = True
        _timing.mark("decoders imported")
        base_vm = sandbox.vm_size()  # the VM's memory is part of the start-up size
        if status["namespaces"].startswith("active"):
            attempt("namespaces", sandbox.empty_root)
        attempt("no_new_privs", sandbox.no_new_privs)
        attempt("landlock", sandbox.landlock)
        _timing.mark("root, privileges, landlock")
        # Now: RLIMIT_FSIZE=0 forbids writing to a regular file, and seccomp any stderr.
        _timing.report("aiodd guest")
        attempt("rlimits", lambda: sandbox.rlimits(MAX_FDS, self.init.cpu))
        _thread.stack_size(THREAD_STACK)
        for _ in range(WORKERS):
            _start(self.worker, self.jobs)
        threads = WORKERS + 2
        if self.reader is not None:  # the main thread is the VM's: receive on another
            _start(self.serve)  # (now: seccomp forbids starting threads)
            threads += self.start_vm_threads(self.reader)
        else:
            for lane in self.lanes:
                _start(self.serve_lane, lane)
            threads += len(self.lanes)
        if "rlimits" in wanted and status["rlimits"].startswith("active"):
            limit = base_vm + self.init.memory_limit + threads * 2 * THREAD_STACK
            try:
                sandbox.limit_address_space(limit)
                status["rlimits"] += f", AS={limit >> 20} MiB"
            except OSError as exc:
                status["rlimits"] = f"missing: RLIMIT_AS: {exc.strerror}"
        if "no_new_privs" not in wanted or not status["no_new_privs"].startswith("active"):
            if "seccomp" in wanted:
                status["seccomp"] = "missing: needs no_new_privs"
            else:
                status["seccomp"] = "disabled: not requested"
        else:

            def install_seccomp() -> str:
                reader = self.reader
                lanes = [lane.fileno() for lane in self.lanes]
                if reader is None:
                    seccomp.install(self.link.sock.fileno(), lanes=lanes)
                    return "allow-list; open/exec/socket/ptrace/... kill the guest"
                rule = seccomp.KvmRule(reader.ioctl_fds, reader.ioctl_requests)
                seccomp.install(self.link.sock.fileno(), rule, lanes=lanes)
                return (
                    "allow-list; open/exec/socket/ptrace/... kill the guest;"
                    " ioctl only on the KVM VM's descriptors, with its monitor's requests"
                )

            attempt("seccomp", install_seccomp)
        return status

    # -- work ----------------------------------------------------------------------

    @staticmethod
    def worker(jobs: _queue.SimpleQueue[Job]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            job()

    def open(self) -> None:
        try:
            file = self.link.file(self.input_fd, self.init.name, 0)
            resolver = GuestResolver(self.link, 0)
            if self.reader is not None:
                self.disk = self._open_in_vm(self.reader, file, resolver)
            else:
                from aiodd.formats import registry  # imported before the seal

                self.disk = registry.open_disk(file, resolver, self.init.fmt)
            disk = self.disk
            self.link.send(Opened(disk.format_name, disk.virtual_size, self.mode, self.reason))
        except BaseException as exc:
            self.link.send(Failed(WireError.of_vm(exc)))

    def _open_in_vm(
        self, reader: KvmReader, file: LocalFile, resolver: GuestResolver
    ) -> VirtualDisk:
        """The image opened in the VM, which decodes every format: there is no going
        back to the Python decoders once it runs."""
        try:
            return reader.open_disk(file, resolver, self.init.fmt)
        except BaseException:
            file.close()
            raise

    def read(self, request: Read, reply: Callable[[protocol.GuestMessage], None]) -> None:
        """Decode ``request`` into its shared memory; answer on ``reply``."""
        try:
            disk = self.disk
            if disk is None:
                raise ImageError(self.init.name, "read before the image was opened")
            mem = self.mems[_within(request.mem, len(self.mems) - 1, "mem")]
            moff = _within(request.moff, len(mem), "moff")
            length = _within(request.len, len(mem) - moff, "len")
            extents = None
            with memoryview(mem) as view:
                out = view[moff : moff + length]
                if not request.map:
                    disk.read_into(request.offset, out)
                elif (read_map := getattr(disk, "read_map", None)) is not None:
                    extents = read_map(request.offset, out)  # the VM's, which maps its reads
                else:  # the Python decoders'
                    from aiodd.guest import maps  # imported before the seal

                    extents = maps.read_map(disk, request.offset, out)
                out.release()
            reply(Done(request.id, map=extents))
        except BaseException as exc:
            reply(Done(request.id, WireError.of_vm(exc)))

    def serve_lane(self, lane: _socket.socket, queued: bool = False) -> None:
        """Answer the reads the host sends on ``lane``, one at a time, here (or,
        ``queued``, on the VMs' threads); a lane carries nothing else."""

        def reply(answer: protocol.GuestMessage) -> None:
            _send(lane, answer)

        while True:
            message, fds = _next_message(lane)
            if fds or not isinstance(message, Read):
                os._exit(2)
            if queued:
                self.main_jobs.put(_job(self.read, message, reply))
            else:
                self.read(message, reply)

    def call(self, request: Call) -> None:
        try:
            result = self.handlers[request.op](self, request)
        except BaseException as exc:
            self.link.send(Done(request.id, WireError.of(exc)))
            return
        self.link.send(Done(request.id, result=result))

    def serve(self) -> None:
        while True:
            message, fds = _next_message(self.link.sock)
            if isinstance(message, Resolved):
                self.link.answered(message, fds)
            elif isinstance(message, Call) and message.op in self.handlers:
                self.jobs.put(_job(self.call, message))
            elif isinstance(message, Close):
                os._exit(0)
            else:  # a Read among them: reads come on the lanes only
                os._exit(2)


def _import_python_decoders(fmt: str | None) -> None:
    """Import everything the Python decoders may need for ``fmt`` (None: any format),
    while open() is still allowed.

    Only a guest that decodes in Python (``sandbox``, or ``auto`` where the VM cannot
    be made) pays for it: the VM decodes every format, and a guest that runs it never
    imports a decoder, ``zlib`` or ``zstandard`` (docs/performance.md, "Start-up").
    An input named raw needs the raw decoder alone: it names no other file and holds
    nothing compressed or encoded.  Any other format may name a backing file of any
    format: every decoder is read now, and runs when first imported
    (:mod:`aiodd.guest.preload`).
    """
    import aiodd.guest.maps  # a read asked with a map leaves reads to the host

    if fmt == "raw":
        from aiodd.formats import registry

        registry.decoder("raw")
        return
    _import_what_decoders_share()
    # What the decoders import from outside aiodd.formats, which the preloader does not
    # serve (tests/test_preload.py checks the list).
    import array  # noqa: F401
    import bisect  # noqa: F401
    import encodings
    import heapq  # noqa: F401
    import zlib  # noqa: F401

    import aiodd.formats
    from aiodd.guest.preload import Preloaded

    preloaded = Preloaded()
    # Every probe and decoder (a guest encodes nothing), and the codecs a decoder may
    # look up (imported by the codec registry on first use).
    preloaded.add_package(aiodd.formats, skip=("encode",))
    preloaded.add_modules(encodings, CODEC_MODULES)
    preloaded.install()
    _import_zstandard()


def _import_zstandard() -> None:
    """The qcow2 decoder's zstd clusters: ``zstandard``'s C module, loaded as the package
    itself.  The package's ``__init__`` would import ``platform`` and ``typing`` (with
    ``re`` and ``enum``) to choose that very module on CPython, milliseconds of the
    guest's start-up; the decoder uses only what the C module defines
    (``ZstdDecompressor``, ``ZstdError``).  Where the package is laid out otherwise, it
    is imported as it is."""
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    package = PathFinder.find_spec("zstandard")
    backend = None
    if package is not None and package.submodule_search_locations:
        backend = PathFinder.find_spec(
            "zstandard.backend_c", list(package.submodule_search_locations)
        )
    if backend is None or backend.loader is None:
        import zstandard  # noqa: F401

        return
    module = module_from_spec(backend)
    backend.loader.exec_module(module)
    sys.modules["zstandard"] = module


def _import_what_decoders_share() -> None:
    """What every Python decoder but the raw one imports (through
    :mod:`aiodd.formats.common`), which the guest's own start does not.  Not ``typing``
    (:mod:`aiodd._typing_names`), nor with it ``re`` and ``enum``."""
    import collections  # noqa: F401
    import contextlib  # noqa: F401
    import functools  # noqa: F401
    import threading  # noqa: F401

    import aiodd._typing_names  # noqa: F401  # outside aiodd.formats: not preloaded


def expected_mode() -> str:
    """The isolation mode the host expects to ask for (``auto``, ``sandbox``, ``kvm``),
    a guess that only saves time: the third of the arguments
    :class:`aiodd.guest.spawn.Spawned` starts the guest with (tests/test_guest.py checks
    the two agree)."""
    return sys.argv[3] if len(sys.argv) > 3 else "auto"


def expected_format() -> str:
    """The input format the user named (``-f``; ``""`` for none), as the host guessed it
    before parsing its command line: the fourth argument, like :func:`expected_mode`."""
    return sys.argv[4] if len(sys.argv) > 4 else ""


def prepare() -> None:
    """While the host starts (its imports outlast the guest's): import what this guest
    will most likely run (the mode the host expects to ask for: :func:`expected_mode`).
    Where the VM will run (asked for ``kvm``, or for ``auto`` where KVM can run), its
    monitor, :mod:`aiodd.guest.kvm.reader`.  Otherwise what the Python decoders share,
    on an input not named raw (the raw decoder needs none of it: :func:`expected_format`).
    In both, on an input not named raw, the probes that detect formats, which both
    run (the VM's monitor and the Python decoders' detection alike).  Where the Python
    decoders will run, :mod:`aiodd.guest.maps`, whose files leave a mapped read's reads
    to the host.

    The host's ``Init`` decides; the guess only moves work that the guest does after
    ``Init`` before it, onto the core the host is not using.  A wrong guess costs the
    imports after ``Init``, or imports what the guest does not need.
    """
    expected = expected_mode()
    detects = expected_format() != "raw"
    if detects:
        from aiodd.formats import registry

        registry.import_probes()
    if expected == "kvm" or (expected == "auto" and kvm.availability()[0]):
        from aiodd.guest.kvm import reader  # noqa: F401  # start_vm() makes the VMs with it

        return
    import aiodd.guest.maps  # noqa: F401  # for the mapped reads

    if detects:
        _import_what_decoders_share()


def _send(sock: _socket.socket, message: protocol.GuestMessage) -> None:
    """Send ``message``; a socket that fails means the host is gone: so is the guest."""
    try:
        sock.send(protocol.to_bytes(message))
    except OSError:
        os._exit(1)


def _next_message(sock: _socket.socket) -> tuple[protocol.HostMessage, list[int]]:
    """The host's next message on ``sock`` and its descriptors.  The process exits when
    the host is gone or closes the socket (status 0), when the socket fails (1), and on
    a message that does not decode (2)."""
    try:
        data, fds = _receive(sock)
    except OSError:
        os._exit(1)
    if not data:
        os._exit(0)
    try:
        return protocol.from_host(data), fds
    except (ValueError, KeyError, TypeError):
        os._exit(2)


def _receive(sock: _socket.socket) -> tuple[bytes, list[int]]:
    """One message from the host and the descriptors it carries (at most 16).

    ``socket.recv_fds`` over ``_socket``: the ``socket`` module's enums cost the guest
    about 2 ms of start-up (docs/performance.md, "Start-up")."""
    data, ancillary, _flags, _addr = sock.recvmsg(
        protocol.MAX_MESSAGE, _socket.CMSG_SPACE(16 * _FD.size)
    )
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD.size
            fds.extend(fd for (fd,) in _FD.iter_unpack(payload[:usable]))
    return data, fds


def _unshare() -> str:
    sandbox.unshare()
    return "unshared"


def _job(target: Callable[..., None], *args: object) -> Job:
    """``target(*args)`` as work for a thread (``functools.partial``, which the guest
    does not import)."""
    return lambda: target(*args)


def _start(target: Callable[..., object], *args: object) -> None:
    """A thread running ``target(*args)`` that leaves ``SIGPROF`` to the main thread:
    the VM's watchdog needs it there, to interrupt ``KVM_RUN``.  Like every thread of
    the guest, it ends with the process."""
    _thread.start_new_thread(_unprofiled, (target, args))


def _unprofiled(target: Callable[..., object], args: tuple[object, ...]) -> None:
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGPROF})
    target(*args)


def _unnamed(message: str, name: str) -> str:
    """An error's text without the image's name in front (a reason is not about one)."""
    return message.removeprefix(f"{name}: ")


def _within(value: int, hi: int, key: str) -> int:
    if not 0 <= value <= hi:
        raise ValueError(f"bad field {key!r}")
    return value


def main(control_fd: int, handlers: Mapping[str, Handler] | None = None) -> None:
    """Serve the host on ``control_fd``; ``handlers`` answer further requests (tests')."""
    _timing.mark("imports")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, control_fd)
    link = HostLink(sock)
    prepare()
    _timing.mark("prepared")
    data, fds = _receive(sock)
    if not data:
        os._exit(0)
    _timing.mark("waiting for the host")
    init = Init.decode(protocol.decode(data))
    guest = Guest(link, init, fds, handlers or {})
    status = guest.enter_sandbox()
    missing = [name for name, line in status.items() if line.startswith("missing")]
    link.send(Ready(status, guest.mode, guest.reason))
    if missing and init.require:
        os._exit(3)
    if init.probe:
        os._exit(0)
    if init.isolation == "kvm" and guest.reader is None:
        guest.serve()  # the host reports why and closes us: nothing to open
    if guest.reader is None:
        guest.jobs.put(guest.open)
        guest.serve()
    guest.open()  # here: a VM's thread would take it from the queue
    if guest.lanes_direct:
        guest.serve_lane(guest.lanes[0])
    guest.worker(guest.main_jobs)
    sys.exit(0)  # pragma: no cover - serve() never returns
