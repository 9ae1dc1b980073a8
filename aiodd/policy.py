"""The backing-file policy: which files an image may make aiodd open.

The rules, and why, are written down in docs/security.md ("The backing-file policy").

An image names other files (qcow2 backing file and ``data_file``, vmdk extents, VHD and
VHDX parents).  The image is untrusted, so every such reference is resolved here, on the
host, before the file is handed to a decoder:

1. **By spelling first.**  Names that are not plain paths (``json:{...}``, ``nbd:``,
   ``http:`` and any other protocol prefix, empty names, NUL bytes) are refused.  The
   path is joined to the referring image's directory and normalised *lexically*; if the
   result is not inside an allowed directory it is refused without a single ``stat`` or
   ``realpath`` outside them, so neither the error text nor its timing tells the image
   whether a host path exists.
2. **Then walked inside.**  From the allowed directory it lies in, the path is walked one
   component at a time with directory descriptors (``openat`` with ``O_NOFOLLOW``).  A
   symlink is read, its target normalised lexically and followed only when that target is
   inside an allowed directory too.
3. **Then checked.**  The result must be a regular file, not on ``/proc``, ``/sys`` or a
   similar kernel filesystem, not a layer already in the chain (by device and inode, not
   by spelling), and the chain may hold at most :data:`MAX_CHAIN` layers.  It is opened
   read-only with ``O_NOFOLLOW``; only the descriptor leaves this module.
4. **Then locked and recorded.**  Every file the chain opens, the user's image
   included, gets qemu's reader locks (:mod:`aiodd.locks`) before anything decodes it,
   and is refused when another process has it open for writing (unless
   ``force_share``); the locks stay with the open file, wherever its descriptor goes.
   The Policy remembers each file (:attr:`Policy.opened`), so that the output can be
   checked against all of them, and once :meth:`Policy.seal` is called it opens nothing
   more.

The allowed directories for a reference are the referring image's own directory (and
everything below it) plus the directories the user allowed explicitly
(``--allow-backing DIR``, ``allow_dirs=``).  ``..`` is resolved lexically, so a chain
spelled ``../base.qcow2`` is refused unless the parent directory is allowed.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
from collections.abc import Sequence

from aiodd import locks
from aiodd._typing_names import NamedTuple
from aiodd.errors import ImageError, InUseError, PolicyError
from aiodd.formats.base import Reference
from aiodd.io import filesystem_magic
from aiodd.options import allow_backing_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

MAX_CHAIN = 64
"""The most layers a chain may hold, the user's image included."""

MAX_SYMLINKS = 40
"""Symlinks followed while resolving one reference (the kernel's own limit)."""


_KIND_NAMES = {
    "backing": "backing file",
    "data_file": "data file",
    "extent": "extent",
    "parent": "parent",
}

# Kernel filesystems whose "regular files" are windows into the host.
_PSEUDO_FS_MAGIC = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x73636673: "securityfs",
    0x74726163: "tracefs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore",
}
_PSEUDO_DIRS = ("/proc", "/sys")

# qemu's path_has_protocol(): a ':' before the first '/' makes "proto:rest".
_PROTOCOL = re.compile(r"^([^/:]*):")

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class Layer(NamedTuple):
    """A file opened on the host: where its own references resolve, and its chain."""

    name: str  # as the user or the referring image spelled it (for messages)
    directory: str  # the real directory its relative references are joined to
    depth: int  # 0 for the user's image
    chain: frozenset[tuple[int, int]]  # (st_dev, st_ino) of this layer and those above


class Opened(NamedTuple):
    """A file the chain opened: what it is to the chain, for the output's check."""

    key: tuple[int, int]  # (st_dev, st_ino)
    rdev: int  # the device, for a block device (the user's image may be one); else 0
    kind: str  # "image" (the user's), "backing", "data_file", "extent" or "parent"
    name: str  # as the user or the referring image spelled it
    referrer: str  # the image that names it ("" for the user's image)

    def role(self) -> str:
        """``the backing file 'b.qcow2' of a.qcow2``: for messages."""
        if self.kind == "image":
            return f"the input image {self.name}"
        kind = _KIND_NAMES.get(self.kind, self.kind)
        return f"the {kind} {printable(self.name)} of {self.referrer}"


def describe(ref: Reference) -> str:
    """``backing file 'x'``: the reference as written, for messages."""
    return f"{_KIND_NAMES.get(ref.kind, ref.kind)} {printable(ref.name)!s}"


def printable(name: str, limit: int = 200) -> str:
    """``name`` quoted for one line of a terminal: control characters escaped, clipped."""
    text = name if len(name) <= limit else name[:limit] + "..."
    escaped = "".join(
        ch if ch.isprintable() and ch not in "'\\" else ascii(ch)[1:-1] for ch in text
    )
    return f"'{escaped}'"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root if root == "/" else root + "/")


def _components(path: str, root: str) -> list[str]:
    rest = path[len(root) :]
    return [part for part in rest.split("/") if part]


class Policy:
    """Resolves references under the backing-file policy and opens what it allows.

    ``allow_dirs`` are the directories the user trusts in addition to each image's own
    directory; they are the user's own choice, so they are resolved with ``realpath``
    (and each must be a directory: :func:`aiodd.options.allow_backing_dir`).
    """

    def __init__(
        self, allow_dirs: Sequence[str | os.PathLike[str]] = (), *, force_share: bool = False
    ) -> None:
        self.force_share = force_share
        self.opened: list[Opened] = []
        self._sealed = False
        self.allow_dirs: tuple[str, ...] = tuple(
            os.path.realpath(allow_backing_dir(directory)) for directory in allow_dirs
        )

    # -- the user's own image ---------------------------------------------------------

    def top(self, path: str, fd: int) -> Layer:
        """The layer for the user's image ``path``, already opened as ``fd``.

        The user may name any file.  Its references resolve against the real directory
        that holds the name (the final component itself is not followed, as qemu joins
        references to the name the user gave).
        """
        directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        st = os.fstat(fd)
        self._lock(fd, path, "the image")
        self._record(st, "image", path, "")
        return Layer(path, directory, 0, frozenset({(st.st_dev, st.st_ino)}))

    def seal(self) -> None:
        """The chain is open: refuse every later reference (see docs/security.md)."""
        self._sealed = True

    def reads(self, st: os.stat_result) -> Opened | None:
        """The file of the chain that ``st`` is (same inode, or same block device)."""
        device = st.st_rdev if stat.S_ISBLK(st.st_mode) else 0
        for file in self.opened:
            if file.key == (st.st_dev, st.st_ino) or (device and file.rdev == device):
                return file
        return None

    def _record(self, st: os.stat_result, kind: str, name: str, referrer: str) -> None:
        rdev = st.st_rdev if stat.S_ISBLK(st.st_mode) else 0
        self.opened.append(Opened((st.st_dev, st.st_ino), rdev, kind, name, referrer))

    def _lock(self, fd: int, image: str, what: str) -> None:
        """qemu's reader locks on ``fd``, or :class:`InUseError` naming who holds what."""
        held = locks.INPUT_SHARED if self.force_share else locks.INPUT
        try:
            byte = locks.take(fd, held)
        except OSError as exc:
            raise ImageError(image, f"cannot lock {what}: {exc.strerror}") from None
        if byte is None:
            return
        reason = locks.conflict_reason(byte)
        # -U helps unless the holder refuses even readers that share everything.
        forceable = byte not in locks.INPUT_SHARED.test
        raise InUseError(
            image,
            f"{what} is in use: another process {reason} (qemu's image lock)",
            forceable=forceable,
        )

    # -- references ------------------------------------------------------------------

    def open_reference(self, layer: Layer, ref: Reference, *, disk: bool) -> tuple[int, Layer]:
        """Open what ``ref`` (made by ``layer``) names, read-only, if the policy allows.

        ``disk`` is True for a layer of the chain (backing file, parent): depth and loops
        are checked.  Returns the descriptor and the new file's :class:`Layer`.  Raises
        :class:`PolicyError` for a refusal, :class:`ImageError` for a missing file.
        """
        image = layer.name
        what = describe(ref)
        if self._sealed:
            self._refuse(image, what, "the image asked for it after the chain was opened")
        if disk and layer.depth + 1 >= MAX_CHAIN:
            self._refuse(image, what, f"the chain would exceed {MAX_CHAIN} layers")
        name = ref.name
        if not name or "\0" in name:
            self._refuse(image, what, "it is not a file name")
        if name.startswith("json:"):
            self._refuse(image, what, "qemu's json: pseudo-protocol is not supported")
        protocol = _PROTOCOL.match(name)
        if protocol:
            self._refuse(
                image,
                what,
                f"protocol prefix '{printable(protocol.group(1))[1:-1]}:' is not supported;"
                " only plain file paths are",
            )
        roots = (layer.directory, *self.allow_dirs)
        spelled = posixpath.normpath(posixpath.join(layer.directory, name))
        dir_fd, real_dir, leaf = self._walk(image, what, spelled, roots)
        try:
            fd = self._open_leaf(image, what, dir_fd, real_dir, leaf)
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if disk and key in layer.chain:
                self._refuse(image, what, "the chain loops back to a layer above it")
            self._lock(fd, image, what)
            self._record(st, ref.kind, name, image)
            depth = layer.depth + 1 if disk else layer.depth
            return fd, Layer(name, real_dir, depth, layer.chain | {key})
        except BaseException:
            os.close(fd)
            raise

    def _walk(
        self, image: str, what: str, spelled: str, roots: tuple[str, ...]
    ) -> tuple[int, str, str]:
        """Walk ``spelled`` inside ``roots``; returns (dir fd, its real path, final name)."""
        root = self._root_of(image, what, spelled, roots)
        pending = _components(spelled, root)
        cur_real = root
        cur_fd = self._open_root(image, what, root)
        links = 0
        try:
            while True:
                if not pending:
                    self._refuse(image, what, "it names a directory, not a regular file")
                comp = pending.pop(0)
                try:
                    st = os.stat(comp, dir_fd=cur_fd, follow_symlinks=False)
                except OSError as exc:
                    raise self._missing(image, what, exc) from None
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        self._refuse(image, what, "too many levels of symbolic links")
                    try:
                        target = os.readlink(comp, dir_fd=cur_fd)
                    except OSError as exc:
                        raise self._missing(image, what, exc) from None
                    joined = posixpath.join(cur_real, target, *pending)
                    spelled = posixpath.normpath(joined)
                    if not target or "\0" in target:
                        self._refuse(image, what, "a symlink on its path is empty")
                    root = self._root_of(image, what, spelled, roots, via_link=True)
                    os.close(cur_fd)
                    cur_fd = -1
                    cur_fd = self._open_root(image, what, root)
                    cur_real = root
                    pending = _components(spelled, root)
                    continue
                if not pending:
                    fd, cur_fd = cur_fd, -1
                    return fd, cur_real, comp
                if not stat.S_ISDIR(st.st_mode):
                    raise ImageError(
                        image, f"cannot open {what}: a path component is not a directory"
                    )
                try:
                    next_fd = os.open(comp, _DIR_FLAGS, dir_fd=cur_fd)
                except OSError as exc:
                    raise self._missing(image, what, exc) from None
                os.close(cur_fd)
                cur_fd = next_fd
                cur_real = posixpath.join(cur_real, comp)
        finally:
            if cur_fd >= 0:
                os.close(cur_fd)

    def _root_of(
        self, image: str, what: str, spelled: str, roots: tuple[str, ...], via_link: bool = False
    ) -> str:
        """The allowed directory ``spelled`` lies in (lexically), or a refusal."""
        for pseudo in _PSEUDO_DIRS:
            if _inside(spelled, pseudo):
                rule = (
                    "it is a /proc or /sys entry"
                    if not via_link
                    else ("a symlink on its path leads into /proc or /sys")
                )
                self._refuse(image, what, rule)
        inside = [root for root in roots if _inside(spelled, root)]
        if not inside:
            where = " or ".join(printable(r) for r in roots)
            rule = (
                f"a symlink on its path leads outside the allowed directories ({where})"
                if via_link
                else f"it lies outside the allowed directories ({where})"
            )
            self._refuse(image, what, rule, allowable=True)
        return max(inside, key=len)

    @staticmethod
    def _open_root(image: str, what: str, root: str) -> int:
        try:
            return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(image, f"cannot open {what}: {exc.strerror}") from None

    def _open_leaf(self, image: str, what: str, dir_fd: int, real_dir: str, leaf: str) -> int:
        try:
            st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise self._missing(image, what, exc) from None
        if not stat.S_ISREG(st.st_mode):
            kind = _file_kind(st.st_mode)
            self._refuse(image, what, f"it is a {kind}, not a regular file")
        try:
            fd = os.open(leaf, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise self._missing(image, what, exc) from None
        try:
            st2 = os.fstat(fd)
            if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (
                st.st_dev,
                st.st_ino,
            ):
                self._refuse(image, what, "it changed while being opened")
            magic = filesystem_magic(fd)
            if magic in _PSEUDO_FS_MAGIC:
                fs = _PSEUDO_FS_MAGIC[magic]
                self._refuse(image, what, f"it is on the kernel's {fs} filesystem")
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _missing(image: str, what: str, exc: OSError) -> ImageError:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "error")
        return ImageError(image, f"cannot open {what}: {reason}")

    @staticmethod
    def _refuse(image: str, what: str, rule: str, *, allowable: bool = False) -> NoReturn:
        raise PolicyError(image, f"{what} is refused: {rule}", allowable=allowable)


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
