"""The wire format between the host and the guest reader: every message, both directions.

One JSON object per ``SOCK_SEQPACKET`` message (descriptors travel alongside with
``SCM_RIGHTS``).  JSON, not pickle: the host must never run code the guest chose.  Both
sides write and read it with the ``json`` package's C core, the encoder and scanner the
package runs: the package itself imports ``re`` and ``enum``, milliseconds of the
guest's start-up, and of the host's before its first message from the guest
(docs/performance.md, "Start-up").

Each message is a class whose ``encode`` (to a JSON-ready dict) and ``decode``
(from one) sit side by side; :func:`to_bytes`, :func:`from_guest` and :func:`from_host`
add the framing.

- host → guest: :class:`Init` (first, once), :class:`Read`, :class:`Call`,
  :class:`Resolved`, :class:`Close`;
- guest → host: :class:`Ready`, :class:`Opened` or :class:`Failed`, :class:`Done` (one per
  request), :class:`Resolve`;
- errors in either direction: :class:`WireError`.

The host trusts nothing the guest says (docs/security.md, "The guest reader"): decoding a
guest's message raises ``ValueError`` (or ``KeyError``/``TypeError``) on anything
malformed, and every string meant for a message is escaped to one printable line and
bounded (:func:`clean`).  The guest trusts its host, so decoding a host's message only
checks types.
"""

from __future__ import annotations

import _json

from aiodd.errors import (
    AioddError,
    ImageError,
    InUseError,
    IsolationError,
    PolicyError,
    UnsupportedImageError,
    UsageError,
    one_line,
)

MAX_MESSAGE = 65536
MAX_LANES = 4  # read lanes a guest serves (the host opens one per reading thread it runs)
MAP_LAYERS = 64
"""The layers a host holds open to read a map's extents itself: those numbered below it
(the image is 0, then each :class:`Resolved` file in turn)."""
MAP_EXTENTS = 256
"""The most extents in one read's map (a :class:`Done` stays far below MAX_MESSAGE)."""
MAP_FACTOR = 2
"""A read's map totals at most this many times the read's length.  A decoder's reads
cover each byte of its output about once (a parent's read fills only what its child
lacks), so this leaves room to spare, and a guest cannot make the host read much more
than the host asked for."""

TYPE_CHECKING = False  # typing, not imported: the guest imports this module
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Self, TypeAlias

    Message: TypeAlias = dict[str, Any]

# Exception classes that cross the boundary as themselves, by name.  Anything else is
# reported as a decoder failure (an ImageError), never re-created from the guest's word.
ERROR_CLASSES: dict[str, type[ImageError]] = {
    "ImageError": ImageError,
    "UnsupportedImageError": UnsupportedImageError,
    "PolicyError": PolicyError,
    "InUseError": InUseError,
}

REFERENCE_KINDS = ("backing", "data_file", "extent", "parent")


# -- framing and fields ---------------------------------------------------------------


def _unencodable(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON")


# What json.dumps(message, separators=(",", ":")) runs: the same bytes.
_DUMPS = _json.make_encoder(
    None, _unencodable, _json.encode_basestring_ascii, None, ":", ",", False, False, True
)


class _Strict:
    """What the C scanner asks of its decoder: json.JSONDecoder's defaults, but
    ``NaN`` and ``Infinity`` refused (no message holds them)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> object:
        raise ValueError(f"{name} in a message")


# typeshed asks for a scanner: it has the attributes the C scanner reads, as _Strict does.
_SCAN = _json.make_scanner(_Strict())  # type: ignore[arg-type]


def encode(message: Message) -> bytes:
    data = "".join(_DUMPS(message, 0)).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    return data


def decode(data: bytes) -> Message:
    """Parse one message; raises ValueError on anything that is not one JSON object,
    in UTF-8, as :func:`encode` writes it (no whitespace around it).

    ``json.loads`` runs the same scanner, but the scanner reports its errors with
    ``json.decoder``'s class, and where that module is not imported, without a class
    (``SystemError``): either is a malformed message here.  So is nesting deeper than
    the interpreter's recursion limit, which a hostile guest would otherwise use to end
    the host's receiving thread with a ``RecursionError``.
    """
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    text = data.decode()
    try:
        value, end = _SCAN(text, 0)
    except (StopIteration, SystemError, RecursionError):
        raise ValueError("not JSON") from None
    if end != len(text):
        raise ValueError("not one JSON value")
    if not isinstance(value, dict) or not isinstance(value.get("op"), str):
        raise ValueError("not a message")
    return value


def clean(value: object, limit: int = 500) -> str:
    """A guest-supplied string made safe for one line of a terminal."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return one_line(text)


def int_field(message: Message, key: str, lo: int = 0, hi: int = 1 << 63) -> int:
    value = message.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"bad field {key!r}")
    return value


def str_field(message: Message, key: str, optional: bool = False) -> str | None:
    value = message.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"bad field {key!r}")
    return value


def _str(message: Message, key: str) -> str:
    value = str_field(message, key)
    assert value is not None
    return value


class _Record:
    """Equality and repr by fields: what the messages need of a dataclass.  Not one: the
    guest imports this module while it starts, and a dozen dataclasses (or named tuples)
    cost it milliseconds to define, these classes a tenth of that."""

    __slots__: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (e.g. a request with its id)."""
        new = object.__new__(type(self))
        for k in self.__slots__:
            setattr(new, k, changes[k] if k in changes else getattr(self, k))
        return new


# -- errors, both directions ----------------------------------------------------------


class WireError(_Record):
    """An exception as it crosses the wire: the name of its class and its fields.

    ``kind`` is a name in :data:`ERROR_CLASSES`, ``"UsageError"``, ``"MemoryError"``,
    ``"vm"`` (the KVM guest reader's VM misbehaved and was ended: its monitor's
    :class:`~aiodd.errors.IsolationError`), ``"internal"`` (any other exception; ``type``
    names it) or ``"malformed"`` (what the host makes of an error that is not one).
    """

    __slots__ = ("file", "fmt", "kind", "message", "type")

    def __init__(
        self,
        kind: str,
        message: str,
        file: str | None = None,
        fmt: str | None = None,
        type: str | None = None,
    ) -> None:
        self.kind = kind
        self.message = message
        self.file = file
        self.fmt = fmt
        self.type = type

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        if isinstance(exc, ImageError):
            return cls(_error_class(exc), exc.detail, exc.file, exc.fmt)
        if isinstance(exc, UsageError):
            return cls("UsageError", str(exc))
        if isinstance(exc, MemoryError):
            return cls("MemoryError", "out of memory")
        return cls("internal", str(exc), type=type(exc).__name__)

    @classmethod
    def of_vm(cls, exc: BaseException) -> WireError:
        """:meth:`of`, for what the KVM guest reader raised: its monitor's
        :class:`~aiodd.errors.IsolationError` (the VM misbehaved and is gone) crosses as
        one; nothing else in the guest may raise one."""
        if isinstance(exc, IsolationError):
            return cls("vm", str(exc))
        return cls.of(exc)

    def encode(self) -> Message:
        wire: Message = {"class": self.kind}
        if self.kind in ERROR_CLASSES:
            if self.file is not None:
                wire["file"] = self.file
            wire["message"] = self.message
            wire["fmt"] = self.fmt
        elif self.kind == "internal":
            wire["type"] = self.type
            wire["message"] = self.message
        elif self.kind != "malformed":
            wire["message"] = self.message
        return wire

    @classmethod
    def decode(cls, wire: object) -> WireError:
        """Cleans every field; what is not a dict is a ``malformed`` error, still an error."""
        if not isinstance(wire, dict) or wire.get("class") == "malformed":
            return cls("malformed", "")
        kind = wire.get("class")
        message = clean(wire.get("message", ""))
        if kind in ERROR_CLASSES:  # an unhashable class raises TypeError: a protocol break
            fmt = wire.get("fmt")
            file = clean(wire["file"]) if "file" in wire else None
            return cls(kind, message, file, clean(fmt, 16) if isinstance(fmt, str) else None)
        if kind in ("UsageError", "MemoryError", "vm"):
            return cls(kind, message)
        return cls("internal", message, type=clean(wire.get("type", "error"), 40))

    def exception(self, name: str, memory_limit: int = 0) -> AioddError:
        """The error to raise: ``name`` is the image the request was about (the default
        file), ``memory_limit`` the guest's, in bytes."""
        if self.kind in ERROR_CLASSES:
            file = self.file if self.file is not None else clean(name)
            return ERROR_CLASSES[self.kind](file, self.message, self.fmt)
        if self.kind == "UsageError":
            return UsageError(self.message)
        if self.kind == "vm":
            return IsolationError(self.message)
        if self.kind == "MemoryError":
            limit = memory_limit >> 20
            return IsolationError(
                f"{name}: the guest reader ran out of memory (its limit is {limit} MiB)"
            )
        if self.kind == "malformed":
            return IsolationError(f"{name}: the guest reader sent a malformed error")
        return ImageError(name, f"the decoder failed on this image ({self.type}: {self.message})")


def _error_class(exc: ImageError) -> str:
    """The nearest class of ``exc`` that crosses the wire as itself."""
    for cls in type(exc).__mro__:
        if ERROR_CLASSES.get(cls.__name__) is cls:
            return cls.__name__
    return "ImageError"  # pragma: no cover - ImageError itself is in ERROR_CLASSES


# -- host → guest ---------------------------------------------------------------------


GUEST_MODES = ("auto", "kvm", "sandbox")
"""What the host may ask of the guest: decode in the KVM guest reader (``kvm``), with the
Python decoders (``sandbox``), or the first where it can (``auto``)."""

RUN_MODES = ("kvm", "sandbox")
"""What a guest says it does."""


class Init(_Record):
    """The first message: the guest's work and its sandbox.

    Carries the image's descriptor (except in ``probe`` mode, which only reports the
    sandbox) followed by one memfd per size in ``mems``: the shared memory reads go into;
    then ``lanes`` sockets, each carrying one :class:`Read` at a time and its
    :class:`Done` (:mod:`aiodd.guest.process`).  ``isolation`` is one of
    :data:`GUEST_MODES`; ``kvm_device`` the KVM device to use.
    """

    __slots__ = (
        "cpu", "fmt", "isolation", "kvm_device", "lanes", "layers", "memory_limit", "mems",
        "name", "probe", "require",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        fmt: str | None,
        mems: tuple[int, ...],
        layers: tuple[str, ...],
        require: bool,
        memory_limit: int,
        cpu: int,
        probe: bool = False,
        isolation: str = "sandbox",
        kvm_device: str = "/dev/kvm",
        lanes: int = 0,
    ) -> None:
        self.name = name
        self.fmt = fmt
        self.mems = mems
        self.layers = layers
        self.require = require
        self.memory_limit = memory_limit
        self.cpu = cpu
        self.probe = probe
        self.isolation = isolation
        self.kvm_device = kvm_device
        self.lanes = lanes

    def encode(self) -> Message:
        return {
            "op": "init",
            "name": self.name,
            "fmt": self.fmt,
            "mems": list(self.mems),
            "layers": list(self.layers),
            "require": self.require,
            "memory_limit": self.memory_limit,
            "cpu": self.cpu,
            "probe": self.probe,
            "isolation": self.isolation,
            "kvm_device": self.kvm_device,
            "lanes": self.lanes,
        }

    @classmethod
    def decode(cls, message: Message) -> Init:
        mems, layers = message.get("mems"), message.get("layers")
        if not isinstance(mems, list) or not all(type(m) is int and m >= 0 for m in mems):
            raise ValueError("bad field 'mems'")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise ValueError("bad field 'layers'")
        if message.get("isolation") not in GUEST_MODES:
            raise ValueError("bad field 'isolation'")
        lanes = int_field(message, "lanes", hi=MAX_LANES)
        return cls(
            _str(message, "name"),
            str_field(message, "fmt", optional=True),
            tuple(mems),
            tuple(layers),
            message.get("require") is True,
            int_field(message, "memory_limit"),
            int_field(message, "cpu"),
            message.get("probe") is True,
            _str(message, "isolation"),
            _str(message, "kvm_device"),
            lanes,
        )


class Read(_Record):
    """Decode ``len`` bytes of the virtual disk at ``offset`` into shared memory ``mem``
    (an index into :attr:`Init.mems`) at ``moff``.  Answered by :class:`Done`.

    With ``map``, the guest may leave reads of the layers below :data:`MAP_LAYERS` to
    the host: its :class:`Done` then lists them (``map``), and the host makes them over
    what the guest wrote (docs/architecture.md, "The wire protocol")."""

    __slots__ = ("id", "len", "map", "mem", "moff", "offset")

    def __init__(
        self, offset: int, mem: int, moff: int, len: int, id: int = 0, map: bool = False
    ) -> None:
        self.offset = offset
        self.mem = mem
        self.moff = moff
        self.len = len
        self.id = id
        self.map = map

    def encode(self) -> Message:
        message: Message = {
            "op": "read",
            "offset": self.offset,
            "mem": self.mem,
            "moff": self.moff,
            "len": self.len,
            "id": self.id,
        }
        if self.map:
            message["map"] = True
        return message

    @classmethod
    def decode(cls, message: Message) -> Read:
        return cls(
            int_field(message, "offset"),
            int_field(message, "mem"),
            int_field(message, "moff"),
            int_field(message, "len"),
            int_field(message, "id"),
            message.get("map") is True,
        )


class Call(_Record):
    """A request the guest's entry point registered a handler for, under the name ``op``
    (the shipped guest registers none; the tests' registers ``attempt``).  Answered by
    :class:`Done` with a ``result``."""

    __slots__ = ("args", "id", "op")

    def __init__(self, op: str, args: Mapping[str, Any], id: int = 0) -> None:
        self.op = op
        self.args = args
        self.id = id

    def encode(self) -> Message:
        return {**self.args, "op": self.op, "id": self.id}

    @classmethod
    def decode(cls, message: Message) -> Call:
        args = {k: v for k, v in message.items() if k not in ("op", "id")}
        return cls(_str(message, "op"), args, int_field(message, "id"))


class Resolved(_Record):
    """The answer to :class:`Resolve` ``rid``: the file, opened under the policy (its
    descriptor alongside) and known from now on as layer ``layer``; or the ``error``."""

    __slots__ = ("error", "layer", "rid")

    def __init__(self, rid: int, layer: int | None = None, error: WireError | None = None) -> None:
        self.rid = rid
        self.layer = layer
        self.error = error

    def encode(self) -> Message:
        if self.error is not None:
            return {"op": "resolved", "rid": self.rid, "error": self.error.encode()}
        return {"op": "resolved", "rid": self.rid, "layer": self.layer}

    @classmethod
    def decode(cls, message: Message) -> Resolved:
        error = message.get("error")
        layer = None if error is not None else int_field(message, "layer")
        return cls(
            int_field(message, "rid"),
            layer,
            WireError.decode(error) if error is not None else None,
        )


class Close(_Record):
    """The host is done: the guest exits."""

    __slots__ = ()

    def encode(self) -> Message:
        return {"op": "close"}

    @classmethod
    def decode(cls, message: Message) -> Close:
        return cls()


HostMessage: TypeAlias = Init | Read | Call | Resolved | Close
Request: TypeAlias = Read | Call
"""A host's message the guest answers with :class:`Done`."""

_FROM_HOST: dict[str, type[Init | Read | Resolved | Close]] = {
    "init": Init,
    "read": Read,
    "resolved": Resolved,
    "close": Close,
}


def from_host(data: bytes) -> HostMessage:
    """A message from the host; an op this module does not know is a :class:`Call`."""
    message = decode(data)
    kind = _FROM_HOST.get(message["op"])
    return kind.decode(message) if kind is not None else Call.decode(message)


# -- guest → host ---------------------------------------------------------------------


def _mode(message: Message) -> str:
    mode = message.get("mode")
    if mode not in RUN_MODES:
        raise ValueError("bad field 'mode'")
    return str(mode)


class Ready(_Record):
    """The sandbox is up: one status line per layer (``active: ...``, ``missing: ...``
    or ``disabled: ...``), and the mode the guest decodes in (one of :data:`RUN_MODES`)
    and why (``auto: /dev/kvm available``).  A guest asked for ``kvm`` that cannot run it
    says ``sandbox`` and why, and waits to be closed."""

    __slots__ = ("layers", "mode", "reason")

    def __init__(self, layers: Mapping[str, str], mode: str = "sandbox", reason: str = "") -> None:
        self.layers = layers
        self.mode = mode
        self.reason = reason

    def encode(self) -> Message:
        return {"op": "ready", "layers": dict(self.layers), "mode": self.mode,
                "reason": self.reason}  # fmt: skip

    @classmethod
    def decode(cls, message: Message) -> Ready:
        layers = message.get("layers")
        if not isinstance(layers, dict):
            raise ValueError("bad layers")
        return cls(
            {clean(k): clean(v) for k, v in layers.items()},
            _mode(message),
            clean(message.get("reason", "")),
        )


class Opened(_Record):
    """The image is open: reads may come.  ``mode`` and ``reason`` are as in
    :class:`Ready`, once more, for the copy's report."""

    __slots__ = ("format", "mode", "reason", "virtual_size")

    def __init__(
        self, format: str, virtual_size: int, mode: str = "sandbox", reason: str = ""
    ) -> None:
        self.format = format
        self.virtual_size = virtual_size
        self.mode = mode
        self.reason = reason

    def encode(self) -> Message:
        return {
            "op": "opened",
            "format": self.format,
            "virtual_size": self.virtual_size,
            "mode": self.mode,
            "reason": self.reason,
        }

    @classmethod
    def decode(cls, message: Message) -> Opened:
        return cls(
            clean(str_field(message, "format"), 16),
            int_field(message, "virtual_size"),
            _mode(message),
            clean(message.get("reason", "")),
        )


class Failed(_Record):
    """The image could not be opened; the guest waits to be closed."""

    __slots__ = ("error",)

    def __init__(self, error: WireError) -> None:
        self.error = error

    def encode(self) -> Message:
        return {"op": "failed", "error": self.error.encode()}

    @classmethod
    def decode(cls, message: Message) -> Failed:
        return cls(WireError.decode(message.get("error")))


class Done(_Record):
    """The answer to request ``id``: its ``error``, or success (with a :class:`Call`'s
    ``result``, or a mapped :class:`Read`'s ``map``).

    ``map`` is the reads the guest left to the host, in the order to make them, four
    numbers each: the layer, the offset in its file, the length, and the offset in the
    read's output; where the file ends within one, it reads as zeros.  Decoding checks
    the numbers' shape and bounds (at most :data:`MAP_EXTENTS`, layers below
    :data:`MAP_LAYERS`, lengths above 0, nothing past 2^63 - 1), not against the read's
    length (at most :data:`MAP_FACTOR` times it in all), which the host alone knows."""

    __slots__ = ("error", "id", "map", "result")

    def __init__(
        self,
        id: int,
        error: WireError | None = None,
        result: str | None = None,
        map: tuple[int, ...] | None = None,
    ) -> None:
        self.id = id
        self.error = error
        self.result = result
        self.map = map

    def encode(self) -> Message:
        message: Message = {"op": "done", "id": self.id}
        if self.error is not None:
            message["error"] = self.error.encode()
        if self.result is not None:
            message["result"] = self.result
        if self.map is not None:
            message["map"] = list(self.map)
        return message

    @classmethod
    def decode(cls, message: Message) -> Done:
        result = message.get("result")
        return cls(
            int_field(message, "id"),
            WireError.decode(message["error"]) if "error" in message else None,
            clean(result) if result is not None else None,
            _map(message["map"]) if "map" in message else None,
        )


def _map(value: object) -> tuple[int, ...]:
    """A :class:`Done`'s ``map``, checked as the host needs it."""
    top = (1 << 63) - 1
    if type(value) is not list or len(value) % 4 or len(value) > 4 * MAP_EXTENTS:
        raise ValueError("bad field 'map'")
    for i in range(0, len(value), 4):
        layer, offset, length, moff = value[i : i + 4]
        if not (
            type(layer) is int
            and type(offset) is int
            and type(length) is int
            and type(moff) is int
            and 0 <= layer < MAP_LAYERS
            and 0 < length <= top
            and 0 <= offset <= top - length
            and 0 <= moff <= top - length
        ):
            raise ValueError("bad field 'map'")
    return tuple(value)


class Resolve(_Record):
    """The image names a file (``kind``, ``name``, as written in layer ``layer``): the
    guest asks the host to open it.  Answered by :class:`Resolved` ``rid``."""

    __slots__ = ("disk", "format", "kind", "layer", "name", "referrer", "rid")

    def __init__(
        self,
        layer: int,
        kind: str,
        name: str,
        referrer: str,
        format: str | None,
        disk: bool,
        rid: int = 0,
    ) -> None:
        self.layer = layer
        self.kind = kind
        self.name = name
        self.referrer = referrer
        self.format = format
        self.disk = disk
        self.rid = rid

    def encode(self) -> Message:
        return {
            "op": "resolve",
            "layer": self.layer,
            "kind": self.kind,
            "name": self.name,
            "referrer": self.referrer,
            "format": self.format,
            "disk": self.disk,
            "rid": self.rid,
        }

    @classmethod
    def decode(cls, message: Message) -> Resolve:
        rid = int_field(message, "rid")
        layer = int_field(message, "layer")
        kind = _str(message, "kind")
        name = _str(message, "name")
        fmt = str_field(message, "format", optional=True)
        if kind not in REFERENCE_KINDS:
            raise ValueError("bad reference kind")
        referrer = message.get("referrer")  # the host knows it better: only informative
        return cls(
            layer,
            kind,
            name,
            referrer if isinstance(referrer, str) else "",
            fmt,
            message.get("disk") is True,
            rid,
        )


GuestMessage: TypeAlias = Ready | Opened | Failed | Done | Resolve

_FROM_GUEST: dict[str, type[GuestMessage]] = {
    "ready": Ready,
    "opened": Opened,
    "failed": Failed,
    "done": Done,
    "resolve": Resolve,
}


def from_guest(data: bytes) -> GuestMessage:
    """A message from the guest; raises ValueError on anything else."""
    message = decode(data)
    kind = _FROM_GUEST.get(message["op"])
    if kind is None:
        raise ValueError("unknown message")
    return kind.decode(message)


def to_bytes(message: HostMessage | GuestMessage) -> bytes:
    return encode(message.encode())
