"""Opening an input image and the files it refers to, on the host.

:class:`LocalResolver` is the inline resolver: it resolves each reference an image
makes under the backing-file policy (:mod:`aiodd.policy` when present; until then a
conservative stand-in that admits only plain names in the referrer's own directory) and
decodes referenced images in this process.
"""

from __future__ import annotations

import os
import stat

from aiodd.errors import ImageError, PolicyError
from aiodd.formats import decoders
from aiodd.formats.base import RandomAccessFile, Reference, VirtualDisk
from aiodd.io import LocalFile

MAX_CHAIN = 64


class LocalResolver:
    def __init__(self, image_dir: str, depth: int = 0, seen: frozenset[tuple[int, int]] = frozenset()) -> None:
        self._dir = image_dir
        self._depth = depth
        self._seen = seen

    def _open(self, ref: Reference) -> LocalFile:
        name = ref.name
        if (
            not name
            or os.path.isabs(name)
            or ":" in name.split("/", 1)[0]
            or any(part in ("..", "") for part in name.split("/"))
        ):
            raise PolicyError(
                ref.referrer,
                f"{ref.kind} '{name}' is refused: only files in the image's own directory"
                " are allowed",
            )
        path = os.path.join(self._dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise ImageError(ref.referrer, f"cannot open {ref.kind} '{name}': {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise PolicyError(ref.referrer, f"{ref.kind} '{name}' is not a regular file")
        if (st.st_dev, st.st_ino) in self._seen:
            os.close(fd)
            raise PolicyError(ref.referrer, f"{ref.kind} '{name}' makes the chain loop")
        return LocalFile(fd, name)

    def open_file(self, ref: Reference) -> RandomAccessFile:
        return self._open(ref)

    def open_disk(self, ref: Reference) -> VirtualDisk:
        if self._depth + 1 >= MAX_CHAIN:
            raise PolicyError(ref.referrer, f"backing chain deeper than {MAX_CHAIN} layers")
        file = self._open(ref)
        st = os.fstat(file.fd)
        child = LocalResolver(
            os.path.dirname(os.path.join(self._dir, ref.name)),
            self._depth + 1,
            self._seen | {(st.st_dev, st.st_ino)},
        )
        try:
            return decoders.open_disk(file, child, ref.format)
        except BaseException:
            file.close()
            raise


def open_input(path: str, fmt: str | None) -> VirtualDisk:
    """Open the user's input image (any path the user names is allowed) and decode it."""
    try:
        file = LocalFile.open(path)
    except OSError as exc:
        raise ImageError(path, f"cannot open: {exc.strerror}") from None
    st = os.fstat(file.fd)
    resolver = LocalResolver(os.path.dirname(os.path.abspath(path)), 0, frozenset({(st.st_dev, st.st_ino)}))
    try:
        return decoders.open_disk(file, resolver, fmt)
    except BaseException:
        file.close()
        raise
