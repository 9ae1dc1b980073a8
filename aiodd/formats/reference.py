"""A file named inside an image: what a decoder asks its
:class:`~aiodd.formats.base.Resolver` to open.

Apart from :mod:`aiodd.formats.base` because the guest process makes them and must not
import ``typing`` to do so (docs/performance.md, "Start-up").
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from aiodd.formats.base import ReferenceKind


class Reference:
    """A file named inside an image: compared, hashed and shown by its fields, as a
    named tuple would be (it was one; a class costs the guest's start-up less)."""

    __slots__ = ("format", "kind", "name", "referrer")

    def __init__(
        self, kind: ReferenceKind, name: str, referrer: str, format: str | None = None
    ) -> None:
        self.kind: ReferenceKind = kind
        self.name = name  # exactly as written in the image
        self.referrer = referrer  # the name of the image that holds the reference
        self.format = format  # the format the referrer declares (qcow2 backing_fmt), if any

    def _fields(self) -> tuple[str, str, str, str | None]:
        return (self.kind, self.name, self.referrer, self.format)

    def __eq__(self, other: object) -> bool:
        return type(other) is Reference and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"Reference(kind={self.kind!r}, name={self.name!r}, referrer={self.referrer!r},"
            f" format={self.format!r})"
        )
