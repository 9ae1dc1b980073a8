"""Opening an input image and the files it refers to.

:func:`open_input` opens the user's image (any path the user names is allowed) and
decodes it either in the guest reader (``isolation="auto"``, the default, ``"kvm"`` or
``"sandbox"``: see :mod:`aiodd.guest`) or in this process (``isolation="inline"``, for
embedders who trust their input).  Either way every file the image names is resolved on
the host under the backing-file policy (:mod:`aiodd.policy`); :class:`LocalResolver` is
the inline resolver.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Sequence

from aiodd import options
from aiodd.errors import ImageError
from aiodd.formats import check_input_format
from aiodd.formats.base import RandomAccessFile, Reference, VirtualDisk
from aiodd.io import LocalFile
from aiodd.policy import MAX_CHAIN, Layer, Policy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.options import Isolation

__all__ = ("MAX_CHAIN", "LocalResolver", "open_input")


class LocalResolver:
    """Resolves references under ``policy`` and decodes referenced images in-process."""

    def __init__(self, policy: Policy, layer: Layer) -> None:
        self._policy = policy
        self._layer = layer

    def open_file(self, ref: Reference) -> RandomAccessFile:
        fd, _ = self._policy.open_reference(self._layer, ref, disk=False)
        return _local(fd, ref.name)

    def open_disk(self, ref: Reference) -> VirtualDisk:
        from aiodd.formats import registry as decoders

        file, resolver = self.open_layer(ref)
        try:
            return decoders.open_disk(file, resolver, ref.format)
        except BaseException:
            file.close()
            raise

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, LocalResolver]:
        fd, layer = self._policy.open_reference(self._layer, ref, disk=True)
        return _local(fd, ref.name), LocalResolver(self._policy, layer)


def _local(fd: int, name: str) -> LocalFile:
    try:
        return LocalFile(fd, name)
    except BaseException:
        os.close(fd)
        raise


def open_input(
    path: str,
    fmt: str | None,
    *,
    isolation: Isolation = "auto",
    allow_dirs: Sequence[str] = (),
    require_isolation: bool = False,
    memory: mmap.mmap | None = None,
    policy: Policy | None = None,
    raw_beside: bool = False,
) -> VirtualDisk:
    """Open the user's input image and decode it.

    ``allow_dirs`` widens the backing-file policy (``--allow-backing DIR``).  Unless
    ``isolation="inline"`` the returned disk is served by a guest process (a
    :class:`~aiodd.guest.disk.GuestDisk`, which says where it decodes); ``memory``
    is the caller's buffer pool, ideally from :func:`aiodd.guest.shared_buffer` so the
    guest writes straight into it (any other buffer works, through a copy).
    ``require_isolation`` refuses to run when a sandbox layer cannot be set up.
    ``policy``, when given, is used instead of a new one made from ``allow_dirs``: it
    then records every file the chain opened, and is sealed once the chain is open.
    ``raw_beside``, with ``fmt="raw"`` and a guest, returns at once a
    :class:`~aiodd.guest.raw_beside.RawBesideGuest`, read here while the guest opens
    the image: the caller must :meth:`~aiodd.guest.raw_beside.RawBesideGuest.confirm`
    it before the output is published.
    """
    isolation = options.isolation(isolation)  # dd() checked it; other callers come here
    if fmt is not None:
        check_input_format(fmt)  # an unknown format is a usage error, before anything else
    if policy is None:
        policy = Policy(allow_dirs)
    try:
        file = LocalFile.open(path)
    except OSError as exc:
        raise ImageError(path, f"cannot open: {exc.strerror}") from None
    if stat.S_ISDIR(os.fstat(file.fd).st_mode):
        file.close()
        raise ImageError(path, "cannot open: Is a directory")
    try:
        top = policy.top(path, file.fd)
        if isolation == "inline":
            from aiodd.formats import registry as decoders

            disk: VirtualDisk = decoders.open_disk(file, LocalResolver(policy, top), fmt)
            policy.seal()  # decoders open what they need in open_disk, never later
            return disk
        if raw_beside and fmt == "raw":
            from aiodd.guest.raw_beside import RawBesideGuest

            disk = RawBesideGuest(
                path, file, policy, top, isolation=isolation, require_isolation=require_isolation
            )
            policy.seal()  # a raw image names no files
            return disk
        from aiodd.guest.host import GuestOptions, open_guest

        guest_options = GuestOptions(require_isolation=require_isolation, isolation=isolation)
        disk = open_guest(path, file.fd, fmt, policy, top, memory=memory, options=guest_options)
    except BaseException:
        file.close()
        raise
    # A guest asking for a file from now on is not decoding any more: refuse it.
    policy.seal()
    # The guest holds its own copy of the descriptor, and with it qemu's locks.
    file.close()
    return disk
