"""qemu's image locks: the byte-range locks QEMU's file driver takes on every image file.

QEMU says who uses an image file, and how, with open-file-description locks
(``F_OFD_SETLK``) on single bytes of the file; no data is locked, the bytes are only
names.  For each permission bit ``i`` (see :data:`PERM_NAMES`):

- byte ``100 + i`` is read-locked by every process that *holds* the permission;
- byte ``200 + i`` is read-locked by every process that does *not share* it.

A process that wants permissions ``perm`` and shares only ``shared`` first takes its
own bytes, then tests (``F_OFD_GETLK``) byte ``200 + i`` for each bit it wants and
byte ``100 + i`` for each bit it does not share: a lock there, held by another open
file, is a conflict.  The bits and bytes are those of QEMU 7.2 (``BLK_PERM_ALL`` is
``0x0f``); what aiodd takes in each role is in :data:`INPUT`, :data:`INPUT_SHARED`,
:func:`output_locks` and is described in docs/usage.md ("Image locks and the input's
files").

The first half of this module is sans-IO (which bytes to lock and test); the second
half is the thin ``fcntl`` layer.  Where the filesystem has no OFD locks (``EINVAL``,
``ENOTSUP``, ``ENOLCK``), aiodd goes on without them, as QEMU's ``locking=auto`` does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct

from aiodd._typing_names import NamedTuple
from aiodd.errors import OutputError

# -- permissions and the bytes that name them (sans-IO) -----------------------------

CONSISTENT_READ = 0x01
WRITE = 0x02
WRITE_UNCHANGED = 0x04
RESIZE = 0x08
ALL = 0x0F  # QEMU 6.2 dropped 0x10 (GRAPH_MOD); 7.2 locks bytes 100-103 and 200-203

PERM_BASE = 100
SHARED_BASE = 200

PERM_NAMES = {
    CONSISTENT_READ: "consistent read",
    WRITE: "write",
    WRITE_UNCHANGED: "write unchanged",
    RESIZE: "resize",
}

_BITS = tuple(sorted(PERM_NAMES))


# The records here are NamedTuples, not dataclasses: every copy imports this module,
# and dataclasses (with inspect) costs milliseconds of start-up (docs/performance.md,
# "Start-up").
class _AccessFields(NamedTuple):
    perm: int
    shared: int


class Access(_AccessFields):
    """What a user of a file needs (``perm``) and lets others have (``shared``)."""

    __slots__ = ()

    def __new__(cls, perm: int, shared: int) -> Access:
        if perm & ~ALL or shared & ~ALL:
            raise ValueError(f"permission bits outside {ALL:#x}: Access({perm=}, {shared=})")
        return super().__new__(cls, perm, shared)


def lock_bytes(access: Access) -> frozenset[int]:
    """The bytes a user with ``access`` read-locks (QEMU's ``raw_apply_lock_bytes``)."""
    held = {PERM_BASE + i for i, bit in enumerate(_BITS) if access.perm & bit}
    unshared = {SHARED_BASE + i for i, bit in enumerate(_BITS) if not access.shared & bit}
    return frozenset(held | unshared)


def check_bytes(access: Access) -> frozenset[int]:
    """The bytes that, locked by someone else, refuse ``access`` (``raw_check_lock_bytes``)."""
    wanted = {SHARED_BASE + i for i, bit in enumerate(_BITS) if access.perm & bit}
    refused = {PERM_BASE + i for i, bit in enumerate(_BITS) if not access.shared & bit}
    return frozenset(wanted | refused)


def permission_of(byte: int) -> tuple[int, bool]:
    """The permission bit a lock byte names, and whether it is a ``200 +`` (unshared) byte."""
    for base, unshared in ((PERM_BASE, False), (SHARED_BASE, True)):
        if base <= byte < base + len(_BITS):
            return _BITS[byte - base], unshared
    raise ValueError(f"byte {byte} is not one of qemu's lock bytes")


# QEMU's reader of an image file (any format with metadata, every layer and sparse
# extent of a chain, as ``qemu-img dd`` and ``qemu-io -r`` take them): it reads
# consistently and lets nobody write or resize the file meanwhile.
READER = Access(CONSISTENT_READ, ALL & ~(WRITE | RESIZE))
# With -U (force-share) QEMU shares everything: it still takes the read byte, and is
# refused only by someone who does not let others read.
SHARED_READER = Access(CONSISTENT_READ, ALL)
# QEMU's writer of an image with metadata (qcow2, vmdk, vpc, vhdx output) ...
IMAGE_WRITER = Access(CONSISTENT_READ | WRITE | RESIZE, ALL & ~(WRITE | RESIZE))
# ... and of a raw image, which shares everything.
RAW_WRITER = Access(CONSISTENT_READ | WRITE, ALL)
# ``qemu-img create`` (and so ``qemu-img dd``) truncating an existing file.
CREATOR = Access(WRITE | RESIZE, ALL & ~RESIZE)


class LockSet(NamedTuple):
    """The bytes one role locks, and the bytes it tests for other users."""

    lock: frozenset[int]
    test: frozenset[int]


def role(access: Access) -> LockSet:
    return LockSet(lock_bytes(access), check_bytes(access))


INPUT = role(READER)
INPUT_SHARED = role(SHARED_READER)


def output_locks(*, raw: bool, replacing: bool) -> LockSet:
    """What aiodd takes on an output written as qemu-img writes a ``raw`` or other image.

    ``replacing``: an existing file (or device) about to be overwritten, which is tested
    as ``qemu-img create`` tests it and then as the writer opening it.  aiodd also
    refuses one that another process holds open for writing, in every output format:
    QEMU lets a raw writer share its file, but the copy would take the file's name away
    from under it.
    """
    writer = RAW_WRITER if raw else IMAGE_WRITER
    tested = check_bytes(writer)
    if replacing:
        tested |= check_bytes(CREATOR) | {PERM_BASE + _BITS.index(WRITE)}
    return LockSet(lock_bytes(writer), frozenset(tested))


def conflict_reason(byte: int) -> str:
    """What another process does, when it holds lock ``byte``: for messages."""
    bit, unshared = permission_of(byte)
    if unshared:
        return {
            CONSISTENT_READ: "does not let others read it",
            WRITE: "is reading it and does not let others write to it",
            WRITE_UNCHANGED: "does not let others write to it",
            RESIZE: "is reading it and does not let others resize it",
        }[bit]
    return {
        CONSISTENT_READ: "is reading it",
        WRITE: "has it open for writing",
        WRITE_UNCHANGED: "has it open for writing",
        RESIZE: "may resize it",
    }[bit]


# -- the fcntl layer ---------------------------------------------------------------

# Python's fcntl names these only on some builds; the values are Linux's, on every
# architecture.
F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_SETLKW: int = getattr(fcntl, "F_OFD_SETLKW", 38)

# The filesystem (or kernel) has no OFD locks: go on without, as locking=auto does.
UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK})


# struct flock with a 64-bit off_t (LP64 Linux), C padding spelled out: l_type,
# l_whence, l_start, l_len, l_pid.  struct, not ctypes: ctypes costs every copy 2 ms
# of start-up.
_FLOCK = struct.Struct("=hh4xqqi4x")


def _fcntl(fd: int, cmd: int, kind: int, byte: int, length: int = 1) -> int:
    """The ``l_type`` of the answer."""
    # l_pid must be 0 for the OFD commands.
    answer = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, length, 0))
    l_type: int = _FLOCK.unpack(answer)[0]
    return l_type


class Unsupported(Exception):
    """The file's filesystem does not take OFD locks."""


def _call(fd: int, cmd: int, kind: int, byte: int) -> int:
    try:
        return _fcntl(fd, cmd, kind, byte)
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            raise Unsupported from None
        raise


def held_by_other(fd: int, byte: int) -> bool:
    """Whether another open file holds a lock on ``byte`` (QEMU's ``qemu_lock_fd_test``)."""
    return _call(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def take(fd: int, locks: LockSet) -> int | None:
    """Lock ``locks.lock`` on ``fd``, then test ``locks.test``.

    Returns None when the file is now held, or the first byte another process holds
    (all of ``fd``'s bytes released again).  Locking before testing, as QEMU does,
    leaves no window in which two processes both pass the test.  A filesystem without
    OFD locks is taken as held: there is nothing to lock with.  ``fd`` must be open
    for reading.
    """
    try:
        for byte in sorted(locks.lock):
            try:
                _call(fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    release(fd)
                    return byte  # someone holds it exclusively (QEMU never does)
                raise
        for byte in sorted(locks.test):
            if held_by_other(fd, byte):
                release(fd)
                return byte
    except Unsupported:
        release(fd)
    return None


def release(fd: int) -> None:
    """Drop every lock byte ``fd`` holds (closing the last copy of ``fd`` does too)."""
    with contextlib.suppress(OSError):
        _fcntl(fd, F_OFD_SETLK, fcntl.F_UNLCK, PERM_BASE, SHARED_BASE + len(_BITS) - PERM_BASE)


# -- the output ----------------------------------------------------------------------


class OutputLock:
    """qemu's writer locks on the output, held from before it is created until the end.

    :meth:`acquire` tests the existing ``of=`` (a file about to be replaced, or a block
    device about to be written) as ``qemu-img`` tests an image it overwrites, and locks
    it; :meth:`hold` then locks the new file the copy writes.  The locks go when
    :meth:`close` closes the descriptors.  aiodd's own read-only descriptors carry them:
    the sink's are write-only, and a read lock needs a descriptor open for reading.
    """

    def __init__(self, raw: bool) -> None:
        self._raw = raw
        self._fds: list[int] = []
        self._held: set[tuple[int, int]] = set()

    @classmethod
    def acquire(cls, path: str, *, raw: bool) -> OutputLock:
        """Lock the existing ``path``; :class:`OutputError` if another process uses it."""
        guard = cls(raw)
        target = os.path.realpath(path)
        try:
            # Only a file or a block device is opened: opening some character devices
            # acts (a watchdog arms, a tape rewinds), and the sink refuses them anyway.
            mode = os.stat(target).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                return guard
            fd = os.open(target, _READ_FLAGS)
        except OSError:
            return guard  # nothing there yet, or nothing aiodd may read: nobody to ask
        guard._adopt(fd, path, replacing=True)
        return guard

    def hold(self, fd: int, path: str) -> None:
        """Lock the file open (write-only) as ``fd``, unless it is the one already held."""
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in self._held:
                return
            # A new descriptor on the same file (an O_TMPFILE file has no other name).
            reader = os.open(f"/proc/self/fd/{fd}", _READ_FLAGS)
        except OSError:
            return  # no /proc, or a file aiodd may not read: go on without
        self._adopt(reader, path, replacing=False)

    def _adopt(self, fd: int, path: str, *, replacing: bool) -> None:
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                os.close(fd)  # the sink says what is wrong with it
                return
            byte = take(fd, output_locks(raw=self._raw, replacing=replacing))
        except BaseException:
            os.close(fd)
            raise
        if byte is not None:
            os.close(fd)
            self.close()
            raise OutputError(
                f"of={path}: the file is in use: another process {conflict_reason(byte)}"
                " (qemu's image lock); stop that process or choose another output"
            )
        self._fds.append(fd)
        self._held.add((st.st_dev, st.st_ino))

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
