"""The guest's sandbox layers, applied by the child to itself before it reads an image.

Each layer is a function that either applies itself or raises :class:`OSError` saying why
it could not; the child (:meth:`aiodd.guest.child.Guest.enter_sandbox`) runs the requested
layers in the only order that works and reports one status line per layer.  The order
matters:

1. ``namespaces`` — new user, mount, network, IPC and UTS namespaces, then an empty,
   read-only root (a tmpfs the child ``chroot``\\ s into) and no capabilities.  Needs a
   single-threaded process, so it runs first (in two halves when the KVM guest reader
   is set up between them: :func:`unshare`, :func:`empty_root`).
2. ``no_new_privs`` — ``PR_SET_NO_NEW_PRIVS`` (and not dumpable): nothing executed later
   can gain privileges; Landlock and seccomp need it.
3. ``landlock`` — a ruleset that handles every file-system right (and TCP, and the
   scopes, where the kernel's ABI knows them) with no rule allowing any: no file can be
   opened, created or executed any more.  Descriptors already held keep working.
4. ``rlimits`` — ``RLIMIT_FSIZE=0``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0``,
   ``RLIMIT_CPU`` (raised by the host as it asks for work) and, once the worker threads
   exist, ``RLIMIT_AS``.
5. ``seccomp`` — the allow-list of :mod:`aiodd.guest.seccomp`, synchronised to all
   threads; last, because it forbids the calls the layers above use.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource

from aiodd.guest import seccomp

LAYERS = ("namespaces", "no_new_privs", "landlock", "rlimits", "seccomp")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# -- namespaces ------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def namespaces() -> str:
    """New namespaces, an empty read-only root, no capabilities."""
    unshare()
    return empty_root()


def unshare() -> None:
    """The first half of :func:`namespaces`: new namespaces, the host's files still in view.

    Needs a single-threaded process.  The KVM guest reader is set up between the two
    halves: KVM starts a kernel worker thread in this process when the VM first runs,
    and ``/dev/kvm`` and the guest binary are files, which the second half takes away.
    """
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    _check(_libc.unshare(flags), "unshare(user, mount, net, ipc, uts)")


def empty_root() -> str:
    """The second half of :func:`namespaces`: an empty read-only root, no capabilities."""
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    mount_flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(_libc.mount(b"none", b"/tmp", b"tmpfs", mount_flags, b"size=4k,nr_inodes=1"),
           "mount an empty tmpfs")  # fmt: skip
    os.chdir("/tmp")
    os.chroot(".")
    os.chdir("/")
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset (drop all)")
    return "user, mount, net, ipc, uts; empty read-only root; no capabilities"


# -- no_new_privs ----------------------------------------------------------------------

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


def no_new_privs() -> str:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    return "no_new_privs set, not dumpable"


# -- landlock --------------------------------------------------------------------------

_SYS_LANDLOCK = {"x86_64": (444, 446), "aarch64": (444, 446)}
LANDLOCK_CREATE_RULESET_VERSION = 1


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (raises OSError when Landlock is unavailable)."""
    arch = seccomp.machine()
    if arch not in _SYS_LANDLOCK:
        raise OSError(errno.ENOSYS, f"Landlock syscall numbers unknown on {arch}")
    create, _ = _SYS_LANDLOCK[arch]
    rc = _libc.syscall(
        ctypes.c_long(create),
        None,
        ctypes.c_long(0),
        ctypes.c_long(LANDLOCK_CREATE_RULESET_VERSION),
    )
    _check(rc, "landlock_create_ruleset(VERSION)")
    return int(rc)


def landlock() -> str:
    """Restrict this thread (and threads it starts) to no file access at all."""
    abi = landlock_abi()
    fs = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= 1 << 14  # TRUNCATE
    if abi >= 5:
        fs |= 1 << 15  # IOCTL_DEV
    net = 0b11 if abi >= 4 else 0  # BIND_TCP, CONNECT_TCP
    scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET, SIGNAL
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    create, restrict = _SYS_LANDLOCK[seccomp.machine()]
    fd = _libc.syscall(ctypes.c_long(create), ctypes.byref(attr), ctypes.c_long(size),
                       ctypes.c_long(0))  # fmt: skip
    _check(fd, "landlock_create_ruleset")
    try:
        _check(_libc.syscall(ctypes.c_long(restrict), ctypes.c_long(fd), ctypes.c_long(0)),
               "landlock_restrict_self")  # fmt: skip
    finally:
        os.close(fd)
    extra = [n for n, on in (("tcp", net), ("scopes", scoped)) if on]
    return f"ABI {abi}: no file access" + (f", no {' or '.join(extra)}" if extra else "")


# -- rlimits ---------------------------------------------------------------------------


def rlimits(nofile: int, cpu_seconds: int) -> str:
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, hard))
    return f"FSIZE=0, CORE=0, NOFILE={nofile}, CPU={cpu_seconds}s (extended per request)"


def vm_size() -> int:
    """This process's current address-space size in bytes."""
    with open("/proc/self/statm", "rb") as f:
        pages = int(f.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def limit_address_space(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def get_no_new_privs() -> int:
    return int(_libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0))


def mallopt(param: int, value: int) -> None:
    """glibc's ``mallopt``; a no-op where the C library has none."""
    fn = getattr(_libc, "mallopt", None)
    if fn is not None:
        fn(param, value)


def preload_unwinder() -> None:
    """Load libgcc_s now, so that glibc never has to open it inside the sandbox."""
    try:  # noqa: SIM105  (not contextlib: the guest's start-up)
        ctypes.CDLL("libgcc_s.so.1")
    except OSError:  # a static or musl build has none to load
        pass
