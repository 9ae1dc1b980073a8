"""The library API: ``await aiodd.dd(...)``."""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence

from aiodd import _timing, chain, options
from aiodd._typing_names import NamedTuple
from aiodd.buffers import DEFAULT_COUNT, DEFAULT_UNIT, private_memory
from aiodd.errors import UsageError
from aiodd.formats import registry as encoders
from aiodd.formats.base import OutputPlan, VirtualDisk
from aiodd.locks import OutputLock
from aiodd.policy import Policy
from aiodd.progress import ProgressCallback, ProgressMeter
from aiodd.stages.sink import OutputFile, clone_range
from aiodd.window import Window, compute_window

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.options import Cache, Isolation

# anyio and the pipeline are imported by dd() itself (hashlib only for a checksum): the
# command line's plain_copy() runs without an event loop.

SKIP_WARNING = "cannot skip to specified offset"


class Checksum(NamedTuple):
    """The digest of the output's virtual disk: every byte a guest sees, the zero
    padding included (what ``qemu-img convert -O raw`` of the output holds).
    ``str()`` gives ``ALGORITHM:HEX``, as the command line prints it."""

    algorithm: str  # "sha256", "sha512" or "blake2b"
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


class DdResult(NamedTuple):
    """What a finished copy did."""

    input_format: str
    output_format: str
    virtual_size: int  # of the input
    window: Window  # the input bytes [start, end) that were copied
    output_size: int  # the output's virtual size (the window, zero-padded)
    elapsed: float
    warnings: tuple[str, ...] = ()
    # Where the input was decoded: "kvm" (the KVM guest reader), "sandbox" (the Python
    # decoders in the guest process) or "inline" (this process); and why, e.g.
    # "auto: /dev/kvm available" (docs/usage.md, "Isolation modes").
    isolation: str = ""
    isolation_reason: str = ""
    checksum: Checksum | None = None  # when asked for (``checksum=``)

    @property
    def bytes_copied(self) -> int:
        return self.window.length


def _loop_backing(rdev: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file behind loop device ``rdev``, if it is one."""
    where = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/loop/backing_file"
    try:
        with open(where, encoding="utf-8", errors="surrogateescape") as f:
            st = os.stat(f.read().rstrip("\n"))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _block_family(rdev: int) -> set[int]:
    """Device numbers that share storage with block device ``rdev``: itself, its whole
    disk and partitions, and the devices stacked under or over it (dm, md, LVM), from
    sysfs; just ``{rdev}`` where sysfs says nothing."""
    family: set[int] = set()
    pending = [f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"]
    while pending:
        node = os.path.realpath(pending.pop())
        try:
            with open(os.path.join(node, "dev"), encoding="ascii") as f:
                major, minor = f.read().split(":")
        except (OSError, ValueError):
            continue
        number = os.makedev(int(major), int(minor))
        if number in family:
            continue
        family.add(number)
        if os.path.exists(os.path.join(node, "partition")):
            pending.append(os.path.dirname(node))  # the whole disk
        with contextlib.suppress(OSError):
            pending += [
                entry.path
                for entry in os.scandir(node)
                if os.path.exists(os.path.join(entry.path, "partition"))
            ]
        for link in ("slaves", "holders"):
            with contextlib.suppress(OSError):
                pending += [entry.path for entry in os.scandir(os.path.join(node, link))]
    return family or {rdev}


def _check_output(src: str, dst: str, policy: Policy) -> None:
    """Refuse an output that is a file the input reads (by inode: any spelling)."""
    try:
        st = os.stat(dst)  # through symlinks, as the output is written
    except OSError:
        return  # nothing there yet (or nothing to compare): the sink reports the rest
    file = policy.reads(st)
    if file is not None:
        if file.kind == "image":
            raise UsageError(f"of={dst} and if={src} name the same file; choose another output")
        raise UsageError(f"of={dst} is {file.role()} (the input reads it); choose another output")
    if stat.S_ISBLK(st.st_mode):
        backing = _loop_backing(st.st_rdev)
        family = _block_family(st.st_rdev)
        for file in policy.opened:
            if file.key[0] in family:
                raise UsageError(
                    f"of={dst} is the device that holds {file.role()} (the input reads it);"
                    " choose another output"
                )
            if file.rdev and file.rdev in family:
                raise UsageError(
                    f"of={dst} shares its storage with the device if={file.name}"
                    " (a partition, its disk, or a device stacked on it); choose another output"
                )
            if file.key == backing:
                raise UsageError(
                    f"of={dst} is a loop device over {file.role()} (the input reads it);"
                    " choose another output"
                )
    elif stat.S_ISREG(st.st_mode):
        for file in policy.opened:
            if file.rdev and _loop_backing(file.rdev) == (st.st_dev, st.st_ino):
                raise UsageError(
                    f"of={dst} is the file behind the loop device if={file.name};"
                    " choose another output"
                )


def _clone_source(
    src: str,
    disk: VirtualDisk,
    policy: Policy,
    *,
    cache: Cache,
    isolation: Isolation,
    input_format: str | None,
    output_format: str,
) -> int | None:
    """A descriptor on the input for ``copy_file_range``, or None where the copy may not
    bypass the pipeline (docs/usage.md, "-t CACHE"; docs/security.md, "The guest reader").

    Only raw to raw, in the page-cache modes, and only where this process knows the
    input is raw without having read it in the guest: it decoded the input itself
    (inline), or the caller said ``-f raw``; never on the guest's word.  The name is
    opened again, so it must still be the very file the chain opened (by inode).
    """
    if cache not in ("writeback", "unsafe") or output_format != "raw":
        return None
    if input_format != "raw" and not (isolation == "inline" and disk.format_name == "raw"):
        return None
    image = next((file for file in policy.opened if file.kind == "image"), None)

    def same(st: os.stat_result) -> bool:
        return (
            image is not None and stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == image.key
        )

    try:
        # Looked at before it is opened, and without waiting: a name swapped for a FIFO
        # or a device in the meantime is neither waited on nor opened.
        if not same(os.stat(src)):
            return None
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    if not same(os.fstat(fd)):
        os.close(fd)
        return None
    return fd


def _settings(output_format: str, isolation: Isolation, cache: Cache) -> tuple[Isolation, Cache]:
    """The options every copy checks first, in this order."""
    encoders.check_output_format(output_format)
    return options.isolation(isolation), options.cache(cache)


def _prepare(
    disk: VirtualDisk,
    src: str,
    dst: str,
    window_operands: tuple[int, int | None, int],
    output_format: str,
    policy: Policy,
    warnings: list[str],
) -> tuple[Window, OutputPlan]:
    """What a copy does with the open input before it touches the output: the window of
    (bs, count, skip), the output's plan, and the output's check against the input's
    files."""
    window = compute_window(disk.virtual_size, *window_operands)
    if window.skip_past_end:
        warnings.append(f"{src}: {SKIP_WARNING}")
    plan = encoders.plan(output_format, window.length, filename=os.path.basename(dst))
    _check_output(src, dst, policy)
    return window, plan


def _open_output(
    dst: str, plan: OutputPlan, output_format: str, cache: Cache
) -> tuple[OutputLock, OutputFile]:
    """The output's locks, then the output itself, held by them; the caller closes the
    lock and aborts the output (a no-op once it is published)."""
    raw = output_format == "raw"
    guard = OutputLock.acquire(dst, raw=raw)
    try:
        output = OutputFile.create(dst, plan.file_size, raw=raw, cache=cache)
    except BaseException:
        guard.close()
        raise
    _timing.mark("output opened")
    try:
        guard.hold(output.fd, dst)
    except BaseException:
        output.abort()
        guard.close()
        raise
    return guard, output


def _result(
    disk: VirtualDisk,
    output_format: str,
    window: Window,
    plan: OutputPlan,
    started: float,
    warnings: list[str],
    mode: tuple[str, str],
    checksum: Checksum | None = None,
) -> DdResult:
    return DdResult(
        input_format=disk.format_name,
        output_format=output_format,
        virtual_size=disk.virtual_size,
        window=window,
        output_size=plan.virtual_size,
        elapsed=time.monotonic() - started,
        warnings=tuple(warnings),
        isolation=mode[0],
        isolation_reason=mode[1],
        checksum=checksum,
    )


async def dd(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    bs: int | str = 512,
    count: int | str | None = None,
    skip: int | str = 0,
    input_format: str | None = None,
    output_format: str = "raw",
    on_progress: ProgressCallback | None = None,
    progress_interval: float = 0.1,
    isolation: Isolation = "auto",
    allow_backing: Sequence[str | os.PathLike[str]] = (),
    require_isolation: bool = False,
    io_size: int = DEFAULT_UNIT,
    force_share: bool = False,
    checksum: str | None = None,
    sparse: bool = False,
    cache: Cache = "none",
) -> DdResult:
    """Copy the window ``skip*bs`` … ``count*bs`` of ``src``'s virtual disk to ``dst``.

    Sizes may be given as integers (bytes or blocks) or as strings with qemu's
    suffixes (``"4K"``, ``"1.5M"``).  Raises :class:`~aiodd.errors.UsageError` for bad
    arguments, :class:`~aiodd.errors.ImageError` for a bad input image and
    :class:`~aiodd.errors.OutputError` when the output cannot be written.  Cancelling
    the caller's scope stops the copy and removes the partial output; a cancel that
    comes once the output is being put in place (a link and a rename) lets that finish.

    Every file the input's chain opens holds qemu's reader locks for the whole copy,
    and one another process has open for writing is refused
    (:class:`~aiodd.errors.InUseError`) unless ``force_share`` (qemu's ``-U``); the
    output holds qemu's writer locks.  ``dst`` may not be any file the input reads.
    See docs/usage.md, "Image locks and the input's files".

    ``checksum`` (``"sha256"``, ``"sha512"`` or ``"blake2b"``) hashes the output's
    virtual disk while copying: :attr:`DdResult.checksum`.  ``sparse`` leaves the blocks
    that hold only zeros unallocated (holes in a raw file); on a block device, which
    has no holes, the zeros are written.  See docs/usage.md, "Checksum" and "Sparse
    output".

    ``cache`` is ``-t``: how the output reaches the disk, in qemu's words (``none``,
    ``writeback``, ``writethrough``, ``directsync``, ``unsafe``); see docs/usage.md,
    "-t CACHE".  ``unsafe`` skips every flush: the output is still complete or absent,
    but not durable across a power cut.
    """
    import anyio

    from aiodd.buffers import BufferPool
    from aiodd.pipeline.run import run_pipeline
    from aiodd.stages.sink import clone_stream

    started = time.monotonic()
    warnings: list[str] = []
    bs_value = options.size_operand("bs", bs, warnings)
    count_value = None if count is None else options.size_operand("count", count, warnings)
    skip_value = options.size_operand("skip", skip, warnings)
    src_path, dst_path = os.fspath(src), os.fspath(dst)
    isolation, cache = _settings(output_format, isolation, cache)
    io_size = options.io_size(io_size)
    hasher = None
    if checksum is not None:
        import hashlib  # here: a copy without --checksum does not pay its import

        hasher = hashlib.new(options.checksum(checksum))
    policy = Policy(allow_backing, force_share=force_share)
    # An input named raw is read here while the guest opens it (aiodd/guest/raw_beside.py).
    beside = isolation != "inline" and input_format == "raw"
    memory: mmap.mmap | None = None
    if _guest_fills(isolation, beside, cache):
        from aiodd.guest import shared_buffer

        # The pool lives in shared memory, so the guest decodes straight into it.
        memory = shared_buffer(DEFAULT_COUNT * io_size)
    try:
        disk: VirtualDisk = await anyio.to_thread.run_sync(
            lambda: chain.open_input(
                src_path,
                input_format,
                isolation=isolation,
                require_isolation=require_isolation,
                memory=memory,
                policy=policy,
                raw_beside=beside,
            )
        )
    except BaseException:
        if memory is not None:
            memory.close()
        raise
    _timing.mark("input opened")
    try:
        operands = (bs_value, count_value, skip_value)
        if not beside:
            mode = _mode(disk, isolation)
        elif on_progress is None:
            mode = ("", "")  # the guest says where it opened the input at the end
        else:  # waits for the guest: the events say where from the first on
            mode = await anyio.to_thread.run_sync(_mode, disk, isolation)
        window, plan = _prepare(disk, src_path, dst_path, operands, output_format, policy, warnings)
        meter = ProgressMeter(plan.data_size, on_progress, progress_interval, mode)
        # A cancel that comes while a worker thread creates the output waits for it, and
        # takes effect at the next await: within the try blocks that close it.
        guard, output = await anyio.to_thread.run_sync(
            lambda: _open_output(dst_path, plan, output_format, cache)
        )
        if memory is not None:  # shared with the guest, in small pages
            output.stage_direct_writes()
        try:
            pool: BufferPool | None = None
            source: int | None = None
            try:
                pool = BufferPool(DEFAULT_COUNT, io_size, memory)
                # A device keeps its old bytes where nothing is written: dense there.
                dst_name = os.path.basename(dst_path)
                layout = (
                    encoders.sparse_plan(output_format, window.length, filename=dst_name)
                    if sparse and not output.device
                    else None
                )
                done = 0
                # The kernel's copy bypasses the stages: not when a digest or holes are asked.
                if not output.device and window.length and hasher is None and layout is None:
                    source = _clone_source(
                        src_path,
                        disk,
                        policy,
                        cache=cache,
                        isolation=isolation,
                        input_format=input_format,
                        output_format=output_format,
                    )
                if source is not None:
                    meter.start()
                    # Up to the input's end: the pipeline writes the zeros past it.
                    length = min(window.end, os.fstat(source).st_size) - window.start
                    done = await clone_stream(output, source, window.start, length, meter)
                if not done:
                    await run_pipeline(
                        disk,
                        window.start,
                        window.end,
                        plan,
                        output,
                        pool,
                        meter,
                        sparse=layout,
                        hasher=hasher,
                    )
                elif done < plan.data_size:
                    # What the kernel did not copy, and the tail: the usual way, after it.
                    rest = encoders.plan(output_format, window.length - done)
                    output.offset = done
                    await run_pipeline(
                        disk, window.start + done, window.end, rest, output, pool, meter
                    )
                file_size = plan.file_size if layout is None else layout.file_size
                _timing.mark("copy")
                # A cancel during the flush (which the kernel finishes regardless) still
                # undoes the copy; once the output is being put in place, that completes.
                await anyio.to_thread.run_sync(output.flush, file_size)
                _timing.mark("fsync")
                if beside:  # waits for the guest to have opened the image
                    mode = await anyio.to_thread.run_sync(_mode, disk, isolation)
                await anyio.lowlevel.checkpoint_if_cancelled()
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(output.publish)
                _timing.mark("rename")
            finally:
                output.abort()
                if pool is not None:
                    pool.close()
                if source is not None:
                    os.close(source)
            warnings.extend(output.warnings)
        finally:
            guard.close()
    except Exception:
        # Opening the input comes first, so a guest's error beside the copy is the one
        # the copy reports.
        if beside:
            await anyio.to_thread.run_sync(_mode, disk, isolation)
        raise
    finally:
        disk.close()
        if memory is not None:
            memory.close()
    checksum_value = None if hasher is None else Checksum(hasher.name, hasher.hexdigest())
    return _result(disk, output_format, window, plan, started, warnings, mode, checksum_value)


# The copy without an event loop: one thread per buffer (aiodd.pipeline.threads), the
# buffers slices of one PLAIN_MEMORY (shared with the guest, so mapped before the
# output is open).  Past the page cache, four of the pipeline's unit keep two writes in
# flight while the others read.  Through it, a write is a copy into memory, CPU as a
# read is: more threads than the two cores here only contend, and each read a guest
# serves costs a round trip, so two threads in buffers twice as big go faster
# (docs/performance.md, "Two threads through the page cache").
PLAIN_BUFFERS = 4
PAGE_CACHE_BUFFERS = 2
PLAIN_MEMORY = PLAIN_BUFFERS * DEFAULT_UNIT


def plain_buffers(output: OutputFile) -> int:
    """How many buffers (threads) the copy without an event loop cuts PLAIN_MEMORY into."""
    return PLAIN_BUFFERS if output.direct_fd is not None else PAGE_CACHE_BUFFERS


def plain_copy(
    src: str,
    dst: str,
    *,
    bs: int,
    count: int | None,
    skip: int,
    input_format: str | None,
    output_format: str,
    isolation: Isolation,
    allow_backing: Sequence[str],
    require_isolation: bool,
    force_share: bool,
    cache: Cache,
    stopped: Callable[[], bool],
    on_progress: ProgressCallback | None = None,
    checksum: str | None = None,
) -> DdResult | None:
    """:func:`dd` without holes, and without an event loop: the command line's copy
    unless it asks for ``--sparse``, at the cost of a process start
    (docs/performance.md, "Start-up"; docs/architecture.md, "The copy without an event
    loop").

    The same steps as :func:`dd`, in its order, with the same locks, checks and atomic
    output, and the pipeline's stages run in threads (:mod:`aiodd.pipeline.threads`),
    which call ``on_progress`` one at a time.  ``stopped`` is asked between steps and
    before each chunk (the command line's signal handlers only note a signal): when it
    says so before the output is put in place, the output is forgotten and None is
    returned; once it is being put in place, that completes.

    An input the caller names as raw is read here while the guest, if any, opens it
    beside the copy (:mod:`aiodd.guest.raw_beside`).  With progress asked for, the
    first event waits for the guest to have opened it, as a copy decoded in the guest
    would: the events say where the input is decoded from the first one on.
    """
    from aiodd.pipeline.threads import copy_in_threads

    started = time.monotonic()
    warnings: list[str] = []
    isolation, cache = _settings(output_format, isolation, cache)
    hasher = None
    if checksum is not None:
        import hashlib  # here: a copy without --checksum does not pay its import

        hasher = hashlib.new(options.checksum(checksum))
    policy = Policy(allow_backing, force_share=force_share)
    beside = isolation != "inline" and input_format == "raw"
    guest_fills = _guest_fills(isolation, beside, cache)  # the buffers, shared with it
    # Mapped, not touched: a short copy's pages are the few it reads.
    if not guest_fills:
        memory = private_memory(PLAIN_MEMORY)
    else:
        from aiodd.guest import shared_buffer

        memory = shared_buffer(PLAIN_MEMORY)
    try:
        disk = chain.open_input(
            src,
            input_format,
            isolation=isolation,
            require_isolation=require_isolation,
            memory=memory,
            policy=policy,
            raw_beside=beside,
        )
        _timing.mark("input opened")
        try:
            with _guest_first(disk):
                # Beside the copy, the guest says where it opened the input at the end;
                # with progress, this waits for it: the events say so from the first on.
                mode = ("", "") if beside and on_progress is None else _mode(disk, isolation)
                window, plan = _prepare(
                    disk, src, dst, (bs, count, skip), output_format, policy, warnings
                )
                if stopped():
                    return None
                meter = ProgressMeter(plan.data_size, on_progress, isolation=mode)
                guard, output = _open_output(dst, plan, output_format, cache)
                if guest_fills:
                    output.stage_direct_writes()
                try:
                    source: int | None = None
                    try:
                        meter.start()
                        # What the threads copy: all of the window, or what the kernel did
                        # not.
                        rest, start = plan, window.start
                        if not output.device and window.length and hasher is None:
                            source = _clone_source(
                                src,
                                disk,
                                policy,
                                cache=cache,
                                isolation=isolation,
                                input_format=input_format,
                                output_format=output_format,
                            )
                        if source is not None:
                            # Up to the input's end: the threads write the zeros past it.
                            length = min(window.end, os.fstat(source).st_size) - window.start
                            done = clone_range(output, source, window.start, length, meter, stopped)
                            if done:
                                rest = encoders.plan(output_format, window.length - done)
                                output.offset = done
                                start += done
                        with memoryview(memory) as whole:
                            unit = PLAIN_MEMORY // plain_buffers(output)
                            buffers = [whole[at : at + unit] for at in range(0, PLAIN_MEMORY, unit)]
                            try:
                                if not copy_in_threads(
                                    disk,
                                    start,
                                    window.end,
                                    rest,
                                    output,
                                    buffers,
                                    stopped,
                                    meter,
                                    hasher,
                                ):
                                    return None
                            finally:
                                for view in buffers:
                                    view.release()
                        _timing.mark("copy")
                        output.flush(plan.file_size)
                        _timing.mark("fsync")
                        if beside:  # waits for the guest to have opened the image
                            mode = _mode(disk, isolation)
                        if stopped():
                            return None
                        output.publish()
                        _timing.mark("rename")
                    finally:
                        output.abort()
                        if source is not None:
                            os.close(source)
                    warnings.extend(output.warnings)
                finally:
                    guard.close()
        finally:
            disk.close()
    finally:
        # A failure's traceback may still hold a view of the buffer: the mmap then goes
        # with the last of them.
        with contextlib.suppress(BufferError):
            memory.close()
    checksum_value = None if hasher is None else Checksum(hasher.name, hasher.hexdigest())
    return _result(disk, output_format, window, plan, started, warnings, mode, checksum_value)


@contextlib.contextmanager
def _guest_first(disk: VirtualDisk) -> Iterator[None]:
    """Report the error of a guest beside the copy, if it had one, instead of the
    block's: opening the input comes first, so its error is the one a copy reports."""
    try:
        yield
    except Exception:
        from aiodd.guest.raw_beside import RawBesideGuest

        if isinstance(disk, RawBesideGuest):
            disk.confirm()
        raise


def _guest_fills(isolation: Isolation, beside: bool, cache: Cache) -> bool:
    """Whether the buffers are to be shared with a guest, which then decodes into them.

    Not where no guest decodes (inline, or an input named raw read beside it), nor where
    the output is written past the page cache: a guest's reads then come back as maps,
    whose extents the host reads itself into private memory in huge pages, one copy,
    not two (aiodd/guest/disk.py; docs/performance.md, "Maps for the KVM guest's reads"
    and "Maps for the sandbox's reads").  Through the page cache the guest's own reads
    are faster: its process reads while this one writes."""
    if isolation == "inline" or beside:
        return False
    return cache not in ("none", "directsync")


def _mode(disk: VirtualDisk, isolation: Isolation) -> tuple[str, str]:
    """Where ``disk`` is decoded, and why; beside the copy, once the guest has opened it."""
    if isolation == "inline":
        return "inline", "requested"
    from aiodd.guest.disk import GuestDisk
    from aiodd.guest.raw_beside import RawBesideGuest

    if isinstance(disk, RawBesideGuest):
        return disk.confirm()
    assert isinstance(disk, GuestDisk)
    return disk.mode, disk.mode_reason
