"""aiodd._typing_names: the decoders' records behave as typing's own do."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from aiodd import _typing_names as typing_names
from aiodd.formats.qcow2.layout import Header


def _records(base: type) -> type:
    class Point(base):  # type: ignore[misc]
        """A point."""

        x: int
        y: int = 2
        label: str = "p"

        @property
        def norm(self) -> int:
            return abs(self.x) + abs(self.y)

        def moved(self, dx: int) -> Point:
            return self._replace(x=self.x + dx)  # type: ignore[no-any-return]

        @classmethod
        def origin(cls) -> Point:
            return cls(0, 0)

    return Point


OURS = _records(typing_names.NamedTuple)
TYPINGS = _records(typing.NamedTuple)


def _seen(record: Any) -> tuple[object, ...]:
    point = record(-3)
    return (
        record.__name__, record.__qualname__, record.__module__, record.__doc__,
        record._fields, record._field_defaults, tuple(point), repr(point), point.norm,
        tuple(point.moved(1)), tuple(record.origin()), point._asdict(),
        tuple(record._make([1, 5, "q"])), issubclass(record, tuple),
        hash(point) == hash((-3, 2, "p")), point == (-3, 2, "p"),
    )  # fmt: skip


def test_a_record_is_what_typing_makes() -> None:
    assert _seen(OURS) == _seen(TYPINGS)


def test_a_record_is_checked_as_typing_checks_it() -> None:
    with pytest.raises(TypeError):

        class Late(typing_names.NamedTuple):
            a: int = 1
            b: int  # type: ignore[misc]  # mypy refuses it too

    with pytest.raises(AttributeError):

        class Replaced(typing_names.NamedTuple):
            a: int

            def _replace(self, **kw: object) -> None:  # type: ignore[misc]  # as mypy
                pass


def test_the_decoders_records_are_built_without_typing() -> None:
    """The layouts' records come from the stand-in, not typing (whose classes carry
    ``__orig_bases__``), and ``Generic`` subscripted is the class itself."""
    assert not hasattr(Header, "__orig_bases__")
    assert Header._fields[:2] == ("version", "cluster_bits")
    if not typing.TYPE_CHECKING:
        assert typing_names.Generic[int, str] is typing_names.Generic
        assert typing_names.TypeVar("T", bound=int) == "T"
