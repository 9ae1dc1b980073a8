"""A seccomp-BPF allow-list for the guest reader, built as bytes and installed by ctypes.

:func:`build_filter` is pure: from an architecture's syscall table and the control
socket's descriptor it builds the classic-BPF program.  The program

- kills the process when the system call comes from another ABI than the one expected
  (x32 on x86_64, or a foreign architecture);
- allows what decoding needs: reads on descriptors already held (``read``, ``pread64``,
  ``preadv``, ``lseek``), memory (``mmap``, ``munmap``, ``mremap``, ``mprotect``,
  ``madvise``, ``brk``), threads waiting (``futex``), clocks, signals returning, exit;
- allows ``write``/``sendto``/``sendmsg`` only on the control socket and the read lanes
  (:mod:`aiodd.guest.process`);
- for the KVM guest reader only (a :class:`KvmRule`): ``ioctl`` only on the VM's
  descriptors and only with the requests its monitor makes (``KVM_RUN``), and
  ``setitimer``, ``timer_settime`` and ``timer_delete`` for its watchdogs;
- kills the process on the calls an attacker wants (:data:`KILL`: opening, executing,
  networking, tracing, forking, mounting, signalling others, loading BPF...);
- answers ``EPERM`` to everything else (harmless calls the runtime may try).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

TYPE_CHECKING = False  # typing and collections, not imported: the guest's start-up
if TYPE_CHECKING:
    from collections.abc import Sequence

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

# Calls added since Linux 5.1 have one number on every architecture (the kernel's
# unified syscall table), so both tables share them.
_UNIFIED = {
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435,
    "openat2": 437, "pidfd_getfd": 438, "mount_setattr": 442, "futex_waitv": 449,
}  # fmt: skip

# Syscall numbers of the calls named below, per architecture.
_X86_64 = {
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6,
    "poll": 7, "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12,
    "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16,
    "pread64": 17, "readv": 19, "select": 23, "sched_yield": 24, "mremap": 25,
    "madvise": 28, "nanosleep": 35, "setitimer": 38, "getpid": 39, "socket": 41,
    "connect": 42, "accept": 43, "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47,
    "bind": 49, "listen": 50, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59,
    "exit": 60, "kill": 62, "truncate": 76, "ftruncate": 77, "chdir": 80, "fchdir": 81,
    "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85, "link": 86, "unlink": 87,
    "symlink": 88, "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94,
    "ptrace": 101, "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114,
    "setresuid": 117, "setresgid": 119, "capset": 126, "sigaltstack": 131, "mknod": 133,
    "uselib": 134, "personality": 135, "setrlimit": 160, "pivot_root": 155, "prctl": 157,
    "chroot": 161, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "gettid": 186, "tkill": 200, "futex": 202, "set_tid_address": 218,
    "timer_settime": 223, "timer_delete": 226,
    "restart_syscall": 219, "clock_gettime": 228, "clock_getres": 229,
    "clock_nanosleep": 230, "exit_group": 231, "tgkill": 234, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "openat": 257, "mkdirat": 258,
    "mknodat": 259, "fchownat": 260, "unlinkat": 263, "renameat": 264, "linkat": 265,
    "symlinkat": 266, "fchmodat": 268, "pselect6": 270, "ppoll": 271, "unshare": 272,
    "set_robust_list": 273, "accept4": 288, "preadv": 295, "perf_event_open": 298,
    "prlimit64": 302, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "renameat2": 316, "seccomp": 317, "getrandom": 318, "memfd_create": 319,
    "kexec_file_load": 320, "bpf": 321, "execveat": 322, "userfaultfd": 323,
    "preadv2": 327, "rseq": 334, **_UNIFIED,
}  # fmt: skip

_AARCH64 = {
    "getcwd": 17, "dup": 23, "ioctl": 29, "mknodat": 33, "mkdirat": 34, "unlinkat": 35,
    "symlinkat": 36, "linkat": 37, "renameat": 38, "umount2": 39, "mount": 40,
    "pivot_root": 41, "truncate": 45, "ftruncate": 46, "chdir": 49, "fchdir": 50,
    "chroot": 51, "fchmod": 52, "fchmodat": 53, "fchownat": 54, "fchown": 55,
    "openat": 56, "close": 57, "quotactl": 60, "lseek": 62, "read": 63, "write": 64,
    "readv": 65, "pread64": 67, "preadv": 69, "pselect6": 72, "ppoll": 73, "fstat": 80,
    "exit": 93, "exit_group": 94, "set_tid_address": 96, "unshare": 97, "futex": 98,
    "set_robust_list": 99, "nanosleep": 101, "clock_gettime": 113, "clock_getres": 114,
    "clock_nanosleep": 115, "setitimer": 103, "ptrace": 117, "sched_yield": 124,
    "timer_settime": 110, "timer_delete": 111,
    "restart_syscall": 128, "kill": 129, "tkill": 130, "tgkill": 131, "sigaltstack": 132,
    "rt_sigaction": 134, "rt_sigprocmask": 135, "rt_sigreturn": 139, "setregid": 143, "setgid": 144,
    "setreuid": 145, "setuid": 146, "setresuid": 147, "setresgid": 149, "setrlimit": 164,
    "prctl": 167, "getpid": 172, "gettid": 178, "socket": 198, "socketpair": 199,
    "bind": 200, "listen": 201, "accept": 202, "connect": 203, "sendto": 206,
    "recvfrom": 207, "sendmsg": 211, "recvmsg": 212, "brk": 214, "munmap": 215,
    "mremap": 216, "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220,
    "execve": 221, "mmap": 222, "mprotect": 226, "madvise": 233, "capset": 91,
    "personality": 92, "perf_event_open": 241, "accept4": 242, "prlimit64": 261,
    "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268,
    "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "finit_module": 273,
    "renameat2": 276, "seccomp": 277, "getrandom": 278, "memfd_create": 279, "bpf": 280,
    "execveat": 281, "userfaultfd": 282, "preadv2": 286, "rseq": 293,
    "kexec_load": 104, "init_module": 105, "delete_module": 106, "reboot": 142,
    "kexec_file_load": 294, **_UNIFIED,
}  # fmt: skip

SYSCALLS: dict[str, dict[str, int]] = {"x86_64": _X86_64, "aarch64": _AARCH64}

ALLOW = (
    "read", "pread64", "readv", "preadv", "preadv2", "lseek", "fstat", "close",
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",
    "futex", "futex_waitv", "set_robust_list", "rseq", "set_tid_address", "sched_yield",
    "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres",
    "getpid", "gettid", "getrandom",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    "recvmsg", "recvfrom", "poll", "ppoll", "select", "pselect6",
    "exit", "exit_group",
)  # fmt: skip
"""Allowed with any arguments."""

ALLOW_ON_CONTROL = ("write", "sendto", "sendmsg")
"""Allowed only when the first argument is the control socket or a read lane."""

KILL = (
    "open", "openat", "openat2", "creat", "open_by_handle_at", "name_to_handle_at",
    "execve", "execveat", "uselib",
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "fork", "vfork", "clone", "clone3",
    "kill", "tkill", "tgkill", "pidfd_open", "pidfd_send_signal",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "quotactl", "personality",
    "memfd_create", "mknod", "mknodat", "link", "linkat", "symlink", "symlinkat",
    "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir",
    "truncate", "ftruncate", "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown",
    "fchownat", "chdir", "fchdir", "setrlimit", "prlimit64", "prctl", "capset",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
)  # fmt: skip
"""Kill the process: the calls that only an attacker would make."""

ALLOW_FOR_KVM = ("setitimer", "timer_settime", "timer_delete")
"""Allowed, with any arguments, only when the KVM guest reader runs: its watchdogs (the
main thread's interval timer, a reading thread's CPU-time timer, made before sealing; a
process's timers are its own)."""


class KvmRule:
    """What the KVM guest reader needs of the kernel once sealed: ``ioctl`` with a
    descriptor among ``fds`` and a request among ``requests``, nothing else."""

    __slots__ = ("fds", "requests")

    def __init__(self, fds: tuple[int, ...], requests: tuple[int, ...]) -> None:
        self.fds = fds
        self.requests = requests


RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_X32_BIT = 0x40000000

# offsets in struct seccomp_data (both architectures are little-endian)
_NR = 0
_ARCH = 4
_ARG0_LO = 16
_ARG0_HI = 20
_ARG1_LO = 24
_ARG1_HI = 28


def machine() -> str:
    # What platform.machine() says, without importing platform into the guest.
    return os.uname().machine


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _one_of(values: tuple[int, ...], lo: int, hi: int, allow: int, deny: int) -> list[bytes]:
    """Jump to ``allow`` instructions ahead when the 64-bit argument at ``lo``/``hi`` is
    one of ``values``, else to ``deny`` (both counted from the end of this block)."""
    block = [_insn(_LD_W_ABS, 0, 0, hi)]
    size = 3 + len(values)
    block.append(_insn(_JEQ_K, 0, size - 2 + deny, 0))  # upper half must be 0
    block.append(_insn(_LD_W_ABS, 0, 0, lo))
    for i, value in enumerate(values):
        left = len(values) - 1 - i  # instructions after this one in the block
        block.append(_insn(_JEQ_K, left + allow, 0 if left else deny, value))
    return block


def _kvm_rule(table: dict[str, int], rule: KvmRule) -> list[bytes]:
    """``ioctl(fd, request, ...)`` allowed for the rule's descriptors and requests, EPERM
    for any other; the other calls fall through to the rest of the filter."""
    if not rule.fds or not rule.requests:
        return []
    eperm = RET_ERRNO | errno.EPERM
    # past the requests' block and the RET ALLOW, to the RET EPERM
    fds = _one_of(rule.fds, _ARG0_LO, _ARG0_HI, 0, 3 + len(rule.requests) + 1)
    requests = _one_of(rule.requests, _ARG1_LO, _ARG1_HI, 0, 1)
    body = [*fds, *requests, _insn(_RET_K, 0, 0, RET_ALLOW), _insn(_RET_K, 0, 0, eperm)]
    return [_insn(_JEQ_K, 0, len(body), table["ioctl"]), *body]


def build_filter(
    arch: str, control_fd: int, kvm: KvmRule | None = None, *, lanes: Sequence[int] = ()
) -> bytes:
    """The BPF program (a sequence of ``struct sock_filter``) for ``arch``; ``kvm``
    opens what the KVM guest reader needs; ``lanes`` are the read lanes' sockets, which
    may be written to as the control socket may."""
    table = SYSCALLS[arch]
    prog = [
        _insn(_LD_W_ABS, 0, 0, _ARCH),
        _insn(_JEQ_K, 1, 0, AUDIT_ARCH[arch]),
        _insn(_RET_K, 0, 0, RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _NR),
    ]
    if arch == "x86_64":
        prog += [_insn(_JGE_K, 0, 1, _X32_BIT), _insn(_RET_K, 0, 0, RET_KILL_PROCESS)]
    for name in (*ALLOW, *(ALLOW_FOR_KVM if kvm is not None else ())):
        if name in table:
            prog += [_insn(_JEQ_K, 0, 1, table[name]), _insn(_RET_K, 0, 0, RET_ALLOW)]
    if kvm is not None:
        prog += _kvm_rule(table, kvm)
    eperm = RET_ERRNO | errno.EPERM
    sockets = (control_fd, *lanes)
    for name in ALLOW_ON_CONTROL:
        block = _one_of(sockets, _ARG0_LO, _ARG0_HI, 0, 1)
        prog += [
            _insn(_JEQ_K, 0, len(block) + 2, table[name]),
            *block,
            _insn(_RET_K, 0, 0, RET_ALLOW),
            _insn(_RET_K, 0, 0, eperm),
        ]
    for name in KILL:
        if name in table:
            prog += [_insn(_JEQ_K, 0, 1, table[name]), _insn(_RET_K, 0, 0, RET_KILL_PROCESS)]
    prog.append(_insn(_RET_K, 0, 0, eperm))
    return b"".join(prog)


def run_filter(program: bytes, arch: str, nr: int, arg0: int = 0, arg1: int = 0) -> int:
    """Interpret ``program`` for one system call (a test oracle for :func:`build_filter`)."""
    data = struct.pack("=iIQ6Q", nr, AUDIT_ARCH[arch], 0, arg0, arg1, 0, 0, 0, 0)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = struct.unpack_from("=HBBI", program, pc * 8)
        pc += 1
        if code == _LD_W_ABS:
            (acc,) = struct.unpack_from("=I", data, k)
        elif code == _JEQ_K:
            pc += jt if acc == k else jf
        elif code == _JGE_K:
            pc += jt if acc >= k else jf
        elif code == _RET_K:
            return int(k)
        else:  # pragma: no cover - build_filter emits nothing else
            raise ValueError(f"unknown BPF opcode {code:#x}")


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}


def install(control_fd: int, kvm: KvmRule | None = None, *, lanes: Sequence[int] = ()) -> None:
    """Install the filter on every thread of this process (needs no_new_privs first)."""
    arch = machine()
    if arch not in SYSCALLS:
        raise OSError(errno.ENOSYS, f"no syscall table for {arch}")
    program = build_filter(arch, control_fd, kvm, lanes=lanes)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(
        ctypes.c_long(_SYS_SECCOMP[arch]),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.byref(prog),
    )
    if rc != 0:
        err = ctypes.get_errno() if rc < 0 else errno.EBUSY
        raise OSError(err, f"seccomp(SET_MODE_FILTER): {errno.errorcode.get(err, err)}")
