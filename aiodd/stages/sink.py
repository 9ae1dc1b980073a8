"""Stage 4, the file sink: writes the container and puts it in place atomically.

The output is written to an unnamed file (``O_TMPFILE``) in ``of=``'s directory and
linked into place only once complete and fsynced, so ``of=`` is either the whole new
image or what it was before, and a process killed outright (or a power cut) leaves no
file behind: the kernel frees an unnamed file with its last descriptor.  Where the
filesystem has no ``O_TMPFILE``, a hidden named temporary file beside ``of=`` takes
its place, renamed over ``of=`` at the end (docs/usage.md says what that one can leave).
An existing block device is the exception: it is written in place.

Aligned data goes out through a second, ``O_DIRECT`` descriptor.  The fsync that
durability requires (docs/usage.md, "Durability") makes the copy wait for the disk
anyway, so staging the output in the page cache only adds a memory copy per byte and
fills memory with pages nobody will read; on these VMs, taking fresh page-cache pages
is also what made half of the buffered copies two to three times slower.  Only whole
granules (pages, or filesystem blocks) go that way; a long piece that starts off them
(vdi's data, vpc's blocks) is copied into aligned memory between its ends.  Whatever
the filesystem refuses to take directly (the ends of pieces, small metadata) is
written through the page cache, and so is everything on a filesystem that is not a
local disk's (NFS, tmpfs, FUSE...).

That is the default cache mode, ``none``; the others (``-t``, qemu's names) change
only how the bytes reach the disk and when they are flushed, never where the file is
made or how it is put in place: docs/usage.md, "-t CACHE", says what each promises.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import stat
import threading
from collections.abc import Callable

from aiodd.buffers import DEFAULT_UNIT, private_memory
from aiodd.errors import OutputError, UsageError
from aiodd.io import buffer_address, filesystem_magic, libc_function

TYPE_CHECKING = False
if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream

    from aiodd.buffers import BufferPool, Bytes, WriteOp
    from aiodd.options import Cache
    from aiodd.progress import ProgressMeter


def _sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    """libc's sync_file_range, which Python's os module does not offer; a hint, so a
    libc without it is no error."""
    fn = libc_function(("sync_file_range",), ("c_int", "c_int64", "c_int64", "c_uint"))
    if fn is not None:
        fn(fd, offset, length, flags)


_SYNC_FILE_RANGE_WRITE = 2


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """libc's fallocate(2), which Python's os module does not offer: 0, or -1 (also where
    libc has none).

    Not os.posix_fallocate: where the filesystem cannot allocate, glibc emulates it by
    writing zeros over the whole range, a second copy's worth of writing.
    """
    # fallocate64 takes 64-bit offsets on every ABI; musl has only fallocate (64-bit there).
    fn = libc_function(("fallocate64", "fallocate"), ("c_int", "c_int", "c_int64", "c_int64"))
    return -1 if fn is None else fn(fd, mode, offset, length)


_KEEP_SIZE = 0x01  # FALLOC_FL_KEEP_SIZE
_PUNCH_HOLE = 0x02  # FALLOC_FL_PUNCH_HOLE

# O_DIRECT writes the sink keeps in flight at once.  With one, the disk idles while
# each write's completion comes back through the worker thread and the next is
# handed out (docs/performance.md, "Durable at the disk's speed").
WRITES_IN_FLIGHT = 2
# What goes past the page cache is whole write granules (a page, or the filesystem's
# block where that is larger; OutputFile.granule): a buffered write into a page that
# an O_DIRECT write covers at the same time could write stale bytes back over it, so
# a granule written O_DIRECT is one write's alone, and an op that touches one another
# op may write that way waits for it (granules_clash).  Where the granule cannot be
# told, this, which covers every page size and filesystem block size in use.
_LARGEST_GRANULE = 64 << 10
# ``(first, last, direct)``: granules ``[first, last)`` of one write (OutputFile.granules).
Span = tuple[int, int, bool]

# O_DIRECT needs the file offset, the length and the memory address aligned to the
# device's logical block.  512 is the common case; a device that wants 4096 says so
# with EINVAL, and the writer moves up once before giving O_DIRECT up.  Files start
# at 4096 (OutputFile.__init__ says why).
_DIRECT_ALIGNMENTS = (512, 4096)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# Local disk filesystems, where a large O_DIRECT write goes to the device as it is.
# Elsewhere it can cost more than it saves: on NFS each one is a synchronous round
# trip, on tmpfs there is no disk to go to.
DIRECT_FILESYSTEMS = {
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
}
# Through the page cache, a file is allocated first (OutputFile.reserve) from this
# size on: allocating saves about 0.06 ms a MiB, and looking at the filesystem loads
# ctypes, 2 ms of a short copy's start.
PAGE_CACHE_RESERVE = 64 << 20
# Where copy_file_range shares the input's blocks instead of copying them.
_SHARING_FILESYSTEMS = {
    magic for magic, name in DIRECT_FILESYSTEMS.items() if name in ("xfs", "btrfs")
}


def segments_bound_requests(fd: int, write: int) -> bool:
    """Whether a ``write``-byte ``O_DIRECT`` write from 4 KiB pages reaches the disk under
    ``fd``'s file as more requests than its size allows, because each request gathers
    at most ``max_segments`` pieces of memory: the disk's queue limits, read from sysfs
    (a partition's are its disk's).  False where they cannot be read."""
    try:
        st = os.fstat(fd)
        dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
        block = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        queue = f"{block}/queue" if os.path.isdir(f"{block}/queue") else f"{block}/../queue"
        with open(f"{queue}/max_segments") as f:
            segments = int(f.read())
        with open(f"{queue}/max_sectors_kb") as f:
            largest = int(f.read()) * 1024
    except (OSError, ValueError):
        return False
    return segments_bind(segments, largest, write)


def segments_bind(max_segments: int, max_request: int, write: int) -> bool:
    """Whether a ``write``-byte write from 4 KiB pages is cut into more requests by a
    queue's ``max_segments`` than by its largest request, ``max_request`` bytes."""
    return max_segments * 4096 < min(max_request, write)


def _open_direct(path: str, *, local: bool) -> int | None:
    """A second, ``O_DIRECT`` descriptor on ``path``, or None; only ``local``: a block
    device or a file on one of :data:`DIRECT_FILESYSTEMS`."""
    if not _O_DIRECT or not local:
        return None
    try:
        return os.open(path, os.O_WRONLY | _O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


def direct_length(offset: int, length: int, address: int | None, alignment: int) -> int:
    """How many leading bytes of a write can go through O_DIRECT (a multiple of ``alignment``)."""
    if address is None or offset % alignment or address % alignment:
        return 0
    return length - length % alignment


# Writes through the page cache go in pieces of this size.  The kernel sizes the
# page-cache folios it allocates for a write by the write's length; a 4 MiB write asks
# for 2 MiB folios, which on these VMs are often memory the hypervisor has to back
# again on first touch: 4 MiB writes cost 1-4 CPU-s per GiB where 128 KiB pieces cost
# 0.4, steadily (docs/performance.md, "Cache modes (-t)").
PAGE_CACHE_PIECE = 128 << 10
# A long write that starts off the granule (vdi's data begins at byte 4608, each of
# vpc's blocks 512 bytes past a 4 KiB boundary) goes past the page cache from the next
# granule on, copied into an aligned stage first; a shorter one is not worth the copy.
RECUT_LENGTH = 256 << 10

_TEMP_SUFFIX = ".aiodd-tmp"
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)


def _proc_fd(fd: int) -> str:
    """The name under which the kernel lets a descriptor's file be reopened or linked."""
    return f"/proc/self/fd/{fd}"


def _temp_name(target: str) -> str:
    directory, base = os.path.split(target)
    return os.path.join(directory, f".{base}.{os.urandom(4).hex()}{_TEMP_SUFFIX}")


def _open_unnamed(directory: str) -> int | None:
    """An ``O_TMPFILE`` in ``directory`` that can be linked into it later, or None.

    None where the kernel or the filesystem has no ``O_TMPFILE``, or where ``/proc``
    is missing (linking goes through ``/proc/self/fd``): the caller then falls back to
    a named temporary file, which also reports what is wrong with the directory.
    """
    if not _O_TMPFILE:
        return None
    try:
        fd = os.open(directory, _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        linkable = os.stat(_proc_fd(fd)).st_ino == os.fstat(fd).st_ino
    except OSError:
        linkable = False
    if not linkable:
        os.close(fd)
        return None
    return fd


class OutputFile:
    """The destination being written: an unnamed or a hidden temporary file, or a block device.

    ``path`` is the file finally written (``of=`` with symlinks resolved); ``name`` is
    ``of=`` as the user typed it, for messages.  ``warnings`` collects what the user
    should know about a successful replace (an owner that could not be kept, hard links
    that keep the old data).
    """

    def __init__(
        self,
        fd: int,
        path: str,
        *,
        name: str | None = None,
        temp_path: str | None = None,
        unnamed: bool = False,
        replacing: bool = False,
        cache: Cache = "none",
    ) -> None:
        self.fd = fd
        self.path = path
        self.name = path if name is None else name
        # The temporary file's name while it has one: the named fallback's from the
        # start, an unnamed file's only between its link and the rename over of=.
        self.temp_path = temp_path
        self.unnamed = unnamed  # an O_TMPFILE, not yet linked anywhere
        self.device = temp_path is None and not unnamed  # written in place
        self.replacing = replacing
        self.published = False
        self.warnings: list[str] = []
        self.cache = cache
        # qemu's cache.direct: past the page cache; cache.writeback off: each write is
        # on disk before the next; cache.no-flush: no flush at the end either.
        self._sync_each = cache in ("writethrough", "directsync")
        self.durable = cache != "unsafe"
        self.direct_fd: int | None = None
        if cache in ("none", "directsync"):
            direct_path = _proc_fd(fd) if unnamed else (temp_path or path)
            local = self.device or self._filesystem in DIRECT_FILESYSTEMS
            self.direct_fd = _open_direct(direct_path, local=local)
        # A block device takes 512-byte pieces directly.  A filesystem takes them too,
        # but ext4 serialises a direct write that is not aligned to its 4 KiB block,
        # waits for every other one and zeroes the rest of the block: through the page
        # cache such pieces cost less (docs/performance.md, "Durable at the disk's speed").
        self._alignment = 0 if self.device else _DIRECT_ALIGNMENTS.index(4096)
        self.direct_bytes = 0  # written through O_DIRECT, for tests and the bench
        # Several writes may be in flight (sink_stream): what they share changes under it.
        self._lock = threading.Lock()
        # O_DIRECT descriptors given up on: closed only once no write can still use them,
        # as a closed descriptor's number can come back as another file's.
        self._retired: list[int] = []
        self.reserved = False  # the whole file is allocated (reserve)
        # Each writer thread's private, aligned copy of what it writes O_DIRECT: all of
        # it where the buffers are shared memory in small pages (stage_direct_writes),
        # else what a long write off the alignment has between its ends.
        self._stage_all = False
        self._stages = threading.local()
        self._stage_memory: list[mmap.mmap] = []
        # Where the writes' offset 0 lies in the file: past what a clone put in place.
        self.offset = 0

    @classmethod
    def create(cls, path: str, size: int, *, raw: bool, cache: Cache = "none") -> OutputFile:
        if not path:
            raise UsageError("of= names no file")
        try:
            # Follows symlinks, and /dev/stdout's /proc magic link to what it really is.
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise OutputError(f"{path}: cannot create output: {exc.strerror}") from None
        if st is not None and stat.S_ISBLK(st.st_mode):
            return cls._open_device(path, size, raw=raw, cache=cache)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path}: cannot create output: Is a directory")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"of={path}: aiodd writes image files and block devices, not streams")
        # Like qemu, write through a symlink to the file it names.
        target = os.path.realpath(path)
        if st is not None and not os.access(target, os.W_OK, effective_ids=True):
            # Replacing needs only the directory's permission; qemu would have to open
            # the file for writing, and so must whoever overwrites it.
            raise OutputError(f"{path}: cannot create output: Permission denied")
        fd = _open_unnamed(os.path.dirname(target))
        temp = None
        if fd is None:
            temp = _temp_name(target)
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"{path}: cannot create output: {exc.strerror}") from None
        try:
            out = cls(
                fd,
                target,
                name=path,
                temp_path=temp,
                unnamed=temp is None,
                replacing=st is not None,
                cache=cache,
            )
        except BaseException:
            os.close(fd)
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise
        if st is not None:
            try:
                out._keep_attributes(st)
            except BaseException:
                out.abort()  # its descriptors, and a named temporary file
                raise
        return out

    @classmethod
    def _open_device(cls, path: str, size: int, *, raw: bool, cache: Cache) -> OutputFile:
        if not raw:
            raise UsageError(f"{path}: only raw output can be written into a block device")
        try:
            # O_EXCL claims the device: the kernel refuses it while it, a partition of
            # it or its disk is mounted or held by another device (dm, md, LVM).
            fd = os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise OutputError(
                    f"of={path}: the device is in use (mounted, or held by another device"
                    " or process); choose another output"
                ) from None
            raise OutputError(f"{path}: cannot open output device: {exc.strerror}") from None
        capacity = os.lseek(fd, 0, os.SEEK_END)
        if capacity < size:
            os.close(fd)
            raise OutputError(f"{path}: the device holds {capacity} bytes, the output needs {size}")
        return cls(fd, os.path.realpath(path), name=path, cache=cache)

    def _keep_attributes(self, old: os.stat_result) -> None:
        """Give the new file the replaced one's owner, group and mode, as writing into
        the old file would have kept them."""
        new = os.fstat(self.fd)
        if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
            try:
                os.fchown(self.fd, old.st_uid, old.st_gid)
            except OSError as exc:
                # Without the privilege, a user may still give the file a group it is in.
                if new.st_gid != old.st_gid:
                    with contextlib.suppress(OSError):
                        os.fchown(self.fd, -1, old.st_gid)
                now = os.fstat(self.fd)
                self.warnings.append(
                    f"warning: of={self.name}: could not keep the owner (uid {old.st_uid},"
                    f" gid {old.st_gid}): {exc.strerror}; the new file belongs to"
                    f" uid {now.st_uid}, gid {now.st_gid}"
                )
        # After the chown, which clears the set-user-ID and set-group-ID bits.
        try:
            os.fchmod(self.fd, stat.S_IMODE(old.st_mode))
        except OSError as exc:  # pragma: no cover - the file is ours to chmod
            self.warnings.append(
                f"warning: of={self.name}: could not keep the mode"
                f" {stat.S_IMODE(old.st_mode):04o}: {exc.strerror}"
            )
        if old.st_nlink > 1:
            others = old.st_nlink - 1
            links = "hard link keeps" if others == 1 else "hard links keep"
            self.warnings.append(
                f"warning: of={self.name}: {others} other {links} the old data"
                " (the output replaces the file with a new one)"
            )

    def write(self, writes: list[tuple[int, Bytes]]) -> None:
        try:
            for offset, data in writes:
                offset += self.offset
                view = memoryview(data).cast("B")
                done = self._write_direct(offset, view) if self.direct_fd is not None else 0
                if done < len(view):
                    self._write_buffered(offset + done, view[done:])
            if self._sync_each and writes:
                # qemu's write-through: the write is on disk before the next one starts.
                os.fdatasync(self.fd)
        except OSError as exc:
            raise OutputError(f"{self.name}: write failed: {exc.strerror}") from None

    def stage_direct_writes(self) -> bool:
        """Copy each ``O_DIRECT`` write into this process's private memory first, in huge
        pages, where the disk's requests are bounded by how many pieces of memory they
        may gather (:func:`segments_bound_requests`); whether it will.

        For a copy whose buffers are memory shared with the guest: the kernel gives shared
        memory huge pages only where its administrator turned that on, and from 4 KiB
        pages a 4 MiB write goes to such a disk as four requests.  Copying costs about
        half a millisecond of CPU a write (0.11-0.20 s a GiB where it was measured), and
        there the durable copy took two thirds of the time it took without
        (docs/performance.md, "Huge pages for the buffers" and "The fourth machine
        again").
        """
        if (
            self.direct_fd is not None
            and not self._stage_all
            and segments_bound_requests(self.fd, DEFAULT_UNIT)
        ):
            self._stage_all = True
        return self._stage_all

    def _write_direct(self, offset: int, view: memoryview) -> int:
        """Write the whole granules of ``view`` O_DIRECT where the filesystem takes them,
        and what comes before them through the page cache; return how many leading bytes
        are written (the caller writes the rest through the page cache)."""
        granule = self.granule
        head = -offset % granule
        end = offset + len(view)
        core = end - end % granule - offset - head
        if core <= 0 or (head and core < RECUT_LENGTH):
            return 0
        if head:
            # Off the alignment, wherever the data is: copied into the stage, aligned.
            self._write_buffered(offset, view[:head])
            return head + self._write_staged(offset + head, view[head : head + core])
        if self._stage_all:
            return self._write_staged(offset, view[:core])
        return self._write_direct_from(offset, view[:core])

    def _write_staged(self, offset: int, view: memoryview) -> int:
        """:meth:`_write_direct` through this thread's stage."""
        stage: mmap.mmap | None = getattr(self._stages, "memory", None)
        if stage is None:
            stage = self._stages.memory = private_memory(DEFAULT_UNIT)
            with self._lock:
                self._stage_memory.append(stage)
        done = 0
        with memoryview(stage) as staged:
            while done < len(view):
                n = min(len(staged), len(view) - done)
                staged[:n] = view[done : done + n]
                wrote = self._write_direct_from(offset + done, staged[:n])
                done += wrote
                if wrote < n:
                    break
        return done

    def _write_direct_from(self, offset: int, view: memoryview) -> int:
        """:meth:`_write_direct` from ``view`` itself."""
        address = buffer_address(view)
        while True:
            fd = self.direct_fd
            if fd is None:  # another write gave O_DIRECT up meanwhile
                return 0
            level = self._alignment
            alignment = _DIRECT_ALIGNMENTS[level]
            length = direct_length(offset, len(view), address, alignment)
            if not length:
                return 0
            try:
                done = 0
                while done < length:
                    n = os.pwrite(fd, view[done:length], offset + done)
                    done += n
                    if n % alignment:
                        break  # a short, odd write: the rest goes buffered
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The filesystem wants a coarser alignment, or no O_DIRECT at all.
                # Returning 0 makes the buffered path redo the whole piece.
                with self._lock:
                    if self._alignment == level:  # not moved by another write meanwhile
                        if level + 1 < len(_DIRECT_ALIGNMENTS):
                            self._alignment += 1
                        else:
                            self._retired.append(fd)
                            self.direct_fd = None
                continue
            with self._lock:
                self.direct_bytes += done
            return done

    def _write_buffered(self, offset: int, view: memoryview) -> None:
        start = offset
        while view:
            n = os.pwrite(self.fd, view[:PAGE_CACHE_PIECE], offset)
            view = view[n:]
            offset += n
        self.start_writeback(start, offset - start)

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing what was just written at ``offset`` back to the disk, where the
        mode flushes once at the end (``none``, ``writeback``; the others flush at once,
        or never): the fsync before the rename then finds little left to do, flushing
        overlapping the copy instead of following it.  A MiB or more at a time."""
        if self.cache in ("none", "writeback") and length >= 1 << 20:
            _sync_file_range(self.fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def _stop_direct(self) -> None:
        """Close the O_DIRECT descriptors; only once no write is in flight."""
        if self.direct_fd is not None:
            self._retired.append(self.direct_fd)
            self.direct_fd = None
        while self._retired:
            with contextlib.suppress(OSError):
                os.close(self._retired.pop())
        while self._stage_memory:
            self._stage_memory.pop().close()

    @functools.cached_property
    def _filesystem(self) -> int | None:
        """The output's filesystem type (:func:`~aiodd.io.filesystem_magic`), asked once;
        only where it decides something (``O_DIRECT``, allocating first), as asking
        loads ctypes."""
        return filesystem_magic(self.fd)

    def reserve(self, size: int, *, clone: bool = False) -> None:
        """Allocate the file's ``size`` bytes (from :attr:`offset`) before writing them.

        On ext4 an O_DIRECT write that allocates blocks holds the file's lock until the
        disk has it, so two writes in flight would still reach the disk one by one;
        into allocated (unwritten) blocks they go together.  A write through the page
        cache into allocated blocks skips delayed allocation's bookkeeping page by
        page: a GiB costs about a fifth less (docs/performance.md, "Allocating the
        output first"); from :data:`PAGE_CACHE_RESERVE` on.  Only on a local disk's
        filesystem, where allocating is a change to the extent tree and not a write of
        zeros.  For a ``clone``, not where ``copy_file_range`` shares the input's
        blocks (xfs, btrfs): blocks allocated first would only be dropped again.

        Best effort: a filesystem that cannot allocate is written as before, and a real
        error (a full disk) is left for the write that meets it to report, in the words
        it always used.
        """
        if self.device or size <= 0:
            return
        if self.direct_fd is None and size < PAGE_CACHE_RESERVE:
            return
        magic = self._filesystem
        if magic not in DIRECT_FILESYSTEMS or (clone and magic in _SHARING_FILESYSTEMS):
            return
        # At most half the free space: a window that a hostile header makes huge, or a
        # disk shared with others, must not be filled in one call before the first read
        # has even been checked; such a copy is written one piece at a time instead.
        try:
            vfs = os.fstatvfs(self.fd)
        except OSError:
            return
        if size > vfs.f_bavail * vfs.f_frsize // 2:
            return
        if _fallocate(self.fd, 0, self.offset, size) == 0:
            self.reserved = True
        else:
            # ext4 keeps what a failed fallocate got: give it back (nothing is written yet).
            _fallocate(self.fd, _PUNCH_HOLE | _KEEP_SIZE, self.offset, size)

    @property
    def writes_in_flight(self) -> int:
        """How many writes :func:`sink_stream` may have in flight at once."""
        if self.direct_fd is None or self._sync_each or not (self.device or self.reserved):
            return 1
        return WRITES_IN_FLIGHT

    @functools.cached_property
    def granule(self) -> int:
        """The unit of what goes past the page cache: a page, or the filesystem's block
        where that is larger (:data:`_LARGEST_GRANULE` where it cannot be told)."""
        try:
            block = os.fstat(self.fd).st_blksize
        except OSError:
            return _LARGEST_GRANULE
        unit = max(mmap.PAGESIZE, block, _DIRECT_ALIGNMENTS[-1])
        return unit if unit <= _LARGEST_GRANULE and unit & (unit - 1) == 0 else _LARGEST_GRANULE

    def granules(self, writes: list[tuple[int, Bytes]]) -> list[Span]:
        """The write granules ``writes`` touch, as ``(first, last, direct)``: ``[first,
        last)`` in granules, and whether they may go past the page cache (the whole
        granules of a write), which no write in flight beside it may share
        (:func:`granules_clash`).  The granules a write covers only in part go through
        the page cache, where two writes to separate bytes of one page may meet."""
        granule = self.granule
        spans: list[Span] = []
        for offset, data in writes:
            start = offset + self.offset
            end = start + memoryview(data).nbytes
            if end == start:
                continue
            first, last = -(-start // granule), end // granule
            if first >= last:
                spans.append((start // granule, -(-end // granule), False))
                continue
            if start % granule:
                spans.append((first - 1, first, False))
            spans.append((first, last, True))
            if end % granule:
                spans.append((last, last + 1, False))
        return spans

    def flush(self, size: int) -> None:
        """Finish the file at ``size`` bytes and make it durable (unless ``unsafe``);
        still invisible."""
        try:
            if not self.device:
                os.ftruncate(self.fd, size)
            if self.durable:
                # fsync works on the inode: it covers what went through either descriptor.
                os.fsync(self.fd)
        except OSError as exc:
            raise OutputError(f"{self.name}: cannot finish output: {exc.strerror}") from None

    def publish(self) -> None:
        """Put the flushed file in place: the one step after which of= is the new image."""
        try:
            self._stop_direct()
            if not self.device:
                dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._link_into_place(dir_fd)
                    self.published = True
                    if self.durable:
                        os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            self.published = True
            os.close(self.fd)
            self.fd = -1
        except OSError as exc:
            if self.published:
                # of= already is the new image; only its directory entry may not be on
                # disk yet.  Saying the copy failed would be wrong.
                raise OutputError(
                    f"{self.name}: the output is in place, but its directory could not be"
                    f" flushed to disk: {exc.strerror}"
                ) from None
            raise OutputError(f"{self.name}: cannot finish output: {exc.strerror}") from None

    def commit(self, size: int) -> None:
        """Finish the file at ``size`` bytes, make it durable and put it in place."""
        self.flush(size)
        self.publish()

    def _link_into_place(self, dir_fd: int) -> None:
        base = os.path.basename(self.path)
        if self.unnamed:
            # A directory descriptor makes os.link call linkat, which can follow the
            # /proc link to the unnamed file (plain link() would link the symlink).
            link = functools.partial(
                os.link, _proc_fd(self.fd), src_dir_fd=dir_fd, dst_dir_fd=dir_fd
            )
            if not self.replacing:
                try:
                    link(base, follow_symlinks=True)
                except FileExistsError:
                    pass  # of= appeared meanwhile: replace it, as the rename below would
                else:
                    self.unnamed = False
                    return
            # linkat cannot replace a name: link under a temporary one, then rename.
            for _ in range(16):
                temp = _temp_name(self.path)
                try:
                    link(os.path.basename(temp), follow_symlinks=True)
                except FileExistsError:
                    continue
                self.temp_path = temp
                self.unnamed = False
                break
            else:  # pragma: no cover - 16 random names all taken
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        assert self.temp_path is not None
        os.rename(os.path.basename(self.temp_path), base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        self.temp_path = None

    def abort(self) -> None:
        """Forget the output: the temporary file goes, ``of=`` stays as it was.

        Once published, nothing is undone.  An unnamed file needs no removal: closing
        its last descriptor frees it.
        """
        self._stop_direct()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.temp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp_path)
            self.temp_path = None


async def sink_stream(
    output: OutputFile,
    pool: BufferPool,
    receive: MemoryObjectReceiveStream[WriteOp],
    meter: ProgressMeter,
    reserve: int = 0,
) -> None:
    """Write the ops received; ``reserve``, if given, is the dense file's size to allocate.

    ``output.writes_in_flight`` worker threads write, each op whole, and as many ops
    again wait queued behind them, so that a thread that finishes a write starts the
    next at once instead of waiting for the event loop to hand it out
    (:class:`~aiodd.workers.WorkerThreads`).  An op waits, before it is queued, for the
    ops queued or in flight that share a granule with it that either may write past
    the page cache (:func:`granules_clash`); in a plan, whose writes never overlap,
    none do, and neighbours that meet in a granule both write it through the page
    cache.  With one thread the ops are written in the order received.
    """
    import anyio  # here: a short copy writes through OutputFile with no event loop

    from aiodd.workers import WorkerThreads

    if reserve:
        await anyio.to_thread.run_sync(output.reserve, reserve)
    threads = output.writes_in_flight
    slots = anyio.Semaphore(2 * threads)
    busy: dict[int, tuple[list[Span], anyio.Event]] = {}

    def write(item: tuple[int, WriteOp]) -> None:
        output.write(item[1].writes)

    def written(item: tuple[int, WriteOp], error: BaseException | None) -> None:
        key, op = item
        if op.chunk is not None:
            pool.release(op.chunk.buffer)
        busy.pop(key)[1].set()
        slots.release()
        if error is not None:
            raise error
        # Not once the copy is failing: a progress callback that raised, or a copy
        # being cancelled, must not see another call.
        if op.data_bytes and not writers.failing:
            meter.advance(op.data_bytes)

    writers = WorkerThreads(write, written, threads)
    # ``receive`` closes last: closed while the threads finish, it would fail the
    # encoder's next send, and that echo could be reported instead of the sink's error.
    async with receive, writers.running():
        key = 0
        async for op in receive:
            if not op.writes:  # a sparse output's chunk of zeros: no thread to visit
                if op.chunk is not None:
                    pool.release(op.chunk.buffer)
                if op.data_bytes:
                    meter.advance(op.data_bytes)
                continue
            try:
                spans = output.granules(op.writes)
                await slots.acquire()
                try:
                    while clash := [e for s, e in busy.values() if granules_clash(s, spans)]:
                        await clash[0].wait()
                except BaseException:
                    slots.release()
                    raise
            except BaseException:
                if op.chunk is not None:
                    pool.release(op.chunk.buffer)
                raise
            key += 1
            busy[key] = (spans, anyio.Event())
            writers.put((key, op))


def granules_clash(a: list[Span], b: list[Span]) -> bool:
    """Whether two writes may not be in flight together: a granule one may write past the
    page cache is one the other touches."""
    return any(s1 < e2 and s2 < e1 and (d1 or d2) for s1, e1, d1 in a for s2, e2, d2 in b)


# Each CLONE_CHUNK is one copy_file_range job: between two rounds of them the copy can
# be cancelled and progress reported, as between two buffers of the pipeline.
CLONE_CHUNK = 64 << 20
# After the first chunk, this many go at once, each in its own thread.  Into a file
# allocated first (OutputFile.reserve) two calls copy 1 GiB in 0.21 s where one takes
# 0.25 s: one call's reading of the input overlaps the other's writing
# (docs/performance.md, "Allocating the output first").
CLONE_WAYS = 2
# What a partial clone leaves for the pipeline starts on this boundary, so that the
# pipeline's writes stay aligned for O_DIRECT and its 512-byte padding ends where the
# whole window's does.
CLONE_ALIGN = 4096


def _copy_range(source: int, target: int, length: int, src: int, dst: int) -> int:
    return os.copy_file_range(source, target, length, src, dst)


def clone_range(
    output: OutputFile,
    source: int,
    start: int,
    length: int,
    meter: ProgressMeter,
    stopped: Callable[[], bool],
    chunk: int | None = None,
) -> int:
    """:func:`clone_stream` without an event loop: ``stopped`` is asked before each round."""
    clone = _Clone(output, source, start, length, chunk or CLONE_CHUNK)
    output.reserve(clone.length, clone=True)
    while not clone.over and not stopped():
        for n in clone.round():
            meter.advance(n)
    return clone.reported


async def clone_stream(
    output: OutputFile,
    source: int,
    start: int,
    length: int,
    meter: ProgressMeter,
    chunk: int | None = None,
) -> int:
    """Have the kernel copy ``source[start:start+length]`` to the output's offset 0.

    ``copy_file_range`` copies inside the kernel, or shares the blocks where the
    filesystem can (btrfs, xfs): no byte passes through this process.  Returns how many
    bytes are in place, a multiple of :data:`CLONE_ALIGN` (the caller's pipeline writes
    the rest): all of ``length`` rounded down, or less where the kernel stopped.  Any
    error stops the clone without raising: cross-filesystem (``EXDEV``), a file or
    filesystem that cannot (``EINVAL``, ``EOPNOTSUPP``, ``ENOSYS``), or a real one,
    which the pipeline then meets again and reports in its own words.
    """
    import anyio

    clone = _Clone(output, source, start, length, chunk or CLONE_CHUNK)
    await anyio.to_thread.run_sync(functools.partial(output.reserve, clone.length, clone=True))
    while not clone.over:
        for n in await anyio.to_thread.run_sync(clone.round):
            meter.advance(n)
    return clone.reported


class _Clone:
    """A clone's chunks, copied in rounds: the first chunk alone, so that a filesystem
    that refuses is asked once, then :data:`CLONE_WAYS` at a time.

    What counts is the run of whole chunks from the start: a chunk the kernel stopped
    short in ends the clone, and whatever a chunk beside it copied past that point is
    written again by the pipeline.
    """

    def __init__(self, output: OutputFile, source: int, start: int, length: int, chunk: int):
        self.output = output
        self.source = source
        self.start = start
        self.length = length - length % CLONE_ALIGN
        self.chunk = chunk
        self.done = 0  # bytes in place from offset 0
        self.reported = 0  # of those, the whole CLONE_ALIGN blocks counted to the meter
        self.over = self.length == 0

    def round(self) -> list[int]:
        """Copy the next round's chunks; the counts to report, in order."""
        # Alone while nothing is copied yet: a round that copies nothing ends the clone.
        ways = 1 if self.done == 0 else CLONE_WAYS
        pieces: list[tuple[int, int]] = []
        offset = self.done
        while len(pieces) < ways and offset < self.length:
            size = min(self.chunk, self.length - offset)
            pieces.append((offset, size))
            offset += size
        copied = [0] * len(pieces)

        def copy(i: int) -> None:
            copied[i] = self._copy(*pieces[i])

        threads: list[threading.Thread] = []
        alone: list[int] = []  # no thread to be had: copied here, after the first
        for i in range(1, len(pieces)):
            thread = threading.Thread(target=copy, args=(i,))
            try:
                thread.start()
            except RuntimeError:
                alone.append(i)
            else:
                threads.append(thread)
        try:
            for i in (0, *alone):
                copy(i)
        finally:
            for thread in threads:
                thread.join()
        counts = []
        for (offset, size), n in zip(pieces, copied, strict=True):
            self.done = offset + n
            whole = self.done - self.done % CLONE_ALIGN
            if whole > self.reported:
                counts.append(whole - self.reported)
                self.reported = whole
            if n < size:
                self.over = True
                break
        if self.done >= self.length:
            self.over = True
        return counts

    def _copy(self, offset: int, size: int) -> int:
        """Copy one chunk; how much of it is in place, from its start."""
        done = 0
        while done < size:
            try:
                n = _copy_range(
                    self.source,
                    self.output.fd,
                    size - done,
                    self.start + offset + done,
                    offset + done,
                )
            except OSError:
                break
            if n <= 0:  # 0: the input ended early, it shrank since it was opened
                break
            done += n
        self.output.start_writeback(offset, done)
        return done
