"""raw output: the file is the window, padded with zeros to a whole sector."""

from __future__ import annotations

from collections.abc import Iterator

from aiodd._typing_names import NamedTuple
from aiodd.formats.base import Extent
from aiodd.formats.raw import layout as L

NAME = L.NAME


class RawPlan(NamedTuple):
    virtual_size: int

    @property
    def data_size(self) -> int:
        return self.virtual_size

    @property
    def file_size(self) -> int:
        return self.virtual_size

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length)] if length else []

    def metadata(self) -> Iterator[tuple[int, bytes]]:
        return iter(())


class RawSparsePlan(RawPlan):
    """The same file, with the zero runs left as holes: nothing is written there, and
    the file's size, set at the end, makes them read as zeros."""

    __slots__ = ()

    def head(self) -> Iterator[tuple[int, bytes]]:
        return iter(())

    def ready(self, offset: int) -> list[tuple[int, bytes]]:
        return []

    def finish(self) -> Iterator[tuple[int, bytes]]:
        return iter(())


def plan(out: int, *, filename: str | None = None) -> RawPlan:
    return RawPlan(L.virtual_size(out))


def sparse_plan(out: int, *, filename: str | None = None) -> RawSparsePlan:
    return RawSparsePlan(L.virtual_size(out))
