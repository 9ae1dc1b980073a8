"""The names of :mod:`typing` that the modules of a copy build with (``NamedTuple``,
``Protocol``, ``Generic``, ``TypeVar``), without importing it.

``typing`` costs about 3 ms of a process's start, and brings ``re`` and ``enum``: a
guest that decodes in Python imports the decoders' layouts before its seal, and the
command imports the copy's modules before it can ask its guest for anything, so a short
copy waits for both (docs/performance.md, "Start-up").  mypy reads these names as
:mod:`typing`'s own, so the types are checked as before.  At run time a ``NamedTuple``
class is a :func:`collections.namedtuple` with the class body's methods, as ``typing``
makes it; a protocol and a generic class are plain classes.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Generic as Generic
    from typing import NamedTuple as NamedTuple
    from typing import Protocol as Protocol
    from typing import TypeVar as TypeVar
else:
    from collections import namedtuple

    # What the named tuple makes itself, and what a class body holds that is not the
    # record's: as typing.NamedTuple, a body may not redefine the first.
    _MADE_BY_NAMEDTUPLE = frozenset(
        ("__new__", "__init__", "__slots__", "__getnewargs__", "_fields",
         "_field_defaults", "_make", "_replace", "_asdict", "_source")
    )  # fmt: skip
    _NOT_COPIED = frozenset(("__module__", "__annotations__"))

    class _NamedTupleMeta(type):
        def __new__(cls, name, bases, namespace):
            fields = tuple(namespace.get("__annotations__", ()))
            defaults = [namespace[field] for field in fields if field in namespace]
            if any(field in namespace for field in fields[: len(fields) - len(defaults)]):
                raise TypeError(f"{name}: a field without a default follows one with a default")
            record = namedtuple(name, fields, defaults=defaults, module=namespace["__module__"])
            for key, value in namespace.items():
                if key in _MADE_BY_NAMEDTUPLE:
                    raise AttributeError(f"{name}: cannot redefine {key}")
                if key not in _NOT_COPIED and key not in fields:
                    setattr(record, key, value)
            return record

    NamedTuple = type.__new__(_NamedTupleMeta, "NamedTuple", (), {})

    class Protocol:
        """A protocol: to mypy, what a class must have; at run time a plain base class,
        never checked with isinstance (mypy refuses that of a protocol that is not
        runtime-checkable, and none is)."""

        __slots__ = ()

    class Generic:
        """A generic base class: subscripted, it is itself."""

        __slots__ = ()

        def __class_getitem__(cls, parameters):
            return cls

    def TypeVar(name, *constraints, bound=None):  # typing's spelling
        return name
