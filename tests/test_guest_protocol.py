"""The guest reader's wire format (aiodd/guest/protocol.py), without a guest.

Every message survives encoding and decoding unchanged; every error that crosses the wire
as itself comes back as the same class with the same message, in both directions; and a
hostile guest's messages are refused or cleaned, never trusted.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiodd import errors
from aiodd.errors import (
    AioddError,
    ImageError,
    InUseError,
    IsolationError,
    PolicyError,
    UnsupportedImageError,
    UsageError,
)
from aiodd.guest import protocol
from aiodd.guest.protocol import (
    ERROR_CLASSES,
    REFERENCE_KINDS,
    Call,
    Close,
    Done,
    Failed,
    Init,
    Opened,
    Read,
    Ready,
    Resolve,
    Resolved,
    WireError,
    from_guest,
    from_host,
    to_bytes,
)
from tests.harness import run_as_guest

# -- strategies -----------------------------------------------------------------------

# What a guest says is cleaned (one printable line, bounded): only such text comes back
# unchanged.  What the host says is taken as it is.
characters = st.characters(exclude_categories=["Cs"])  # JSON has no lone surrogates
any_text = st.text(characters, max_size=40)
printable = any_text.filter(str.isprintable)
short_printable = st.text(characters, max_size=16).filter(str.isprintable)
ids = st.integers(0, 1 << 63)
json_values = st.none() | st.booleans() | st.integers(-(1 << 53), 1 << 53) | any_text

wire_errors = st.one_of(
    st.builds(
        WireError,
        st.sampled_from(sorted(ERROR_CLASSES)),
        printable,
        st.none() | printable,
        st.none() | short_printable,
    ),
    st.builds(WireError, st.sampled_from(["UsageError", "MemoryError", "vm"]), printable),
    st.builds(
        lambda message, kind: WireError("internal", message, type=kind),
        printable,
        short_printable,
    ),
    st.just(WireError("malformed", "")),
)

host_messages = st.one_of(
    st.builds(
        Init,
        any_text,
        st.none() | any_text,
        st.lists(ids, max_size=3).map(tuple),
        st.lists(any_text, max_size=5).map(tuple),
        st.booleans(),
        ids,
        ids,
        st.booleans(),
        st.sampled_from(protocol.GUEST_MODES),
        any_text,
        st.integers(0, protocol.MAX_LANES),
    ),
    st.builds(Read, ids, ids, ids, ids, ids, st.booleans()),
    st.builds(
        Call,
        st.text(min_size=1, max_size=10).filter(
            lambda op: op not in ("init", "read", "resolved", "close")
        ),
        st.dictionaries(any_text.filter(lambda k: k not in ("op", "id")), json_values, max_size=4),
        ids,
    ),
    st.builds(lambda rid, layer: Resolved(rid, layer), ids, ids),
    st.builds(lambda rid, error: Resolved(rid, error=error), ids, wire_errors),
    st.just(Close()),
)

TOP = (1 << 63) - 1
# A read's map: (layer, file offset, length, offset in the read) each, in bounds.
maps = st.lists(
    st.integers(1, TOP).flatmap(
        lambda length: st.tuples(
            st.integers(0, protocol.MAP_LAYERS - 1),
            st.integers(0, TOP - length),
            st.just(length),
            st.integers(0, TOP - length),
        )
    ),
    max_size=protocol.MAP_EXTENTS,
).map(lambda extents: tuple(n for extent in extents for n in extent))

guest_messages = st.one_of(
    st.builds(
        Ready,
        st.dictionaries(printable, printable, max_size=5),
        st.sampled_from(protocol.RUN_MODES),
        printable,
    ),
    st.builds(
        Opened,
        short_printable,
        ids,
        st.sampled_from(protocol.RUN_MODES),
        printable,
    ),
    st.builds(Failed, wire_errors),
    st.builds(Done, ids, st.none() | wire_errors, st.none() | printable, st.none() | maps),
    st.builds(
        Resolve,
        ids,
        st.sampled_from(REFERENCE_KINDS),
        any_text,
        any_text,
        st.none() | any_text,
        st.booleans(),
        ids,
    ),
)


# -- round trips ----------------------------------------------------------------------


@given(host_messages)
def test_host_messages_round_trip(message: protocol.HostMessage) -> None:
    assert from_host(to_bytes(message)) == message


@given(guest_messages)
def test_guest_messages_round_trip(message: protocol.GuestMessage) -> None:
    assert from_guest(to_bytes(message)) == message


@given(wire_errors)
def test_wire_errors_round_trip(error: WireError) -> None:
    back = WireError.decode(json.loads(json.dumps(error.encode())))
    assert back == error


def test_a_request_takes_its_id() -> None:
    read = Read(4096, 1, 0, 512)
    assert read.replace(id=7) == Read(4096, 1, 0, 512, 7)
    assert read.id == 0  # the original is unchanged
    assert repr(read.replace(id=7)) == "Read(id=7, len=512, map=False, mem=1, moff=0, offset=4096)"
    assert Read(1, 2, 3, 4) != Call("read", {})


def test_the_messages_on_the_wire() -> None:
    # The bytes themselves: what a second transport must speak.
    assert json.loads(to_bytes(Read(4096, 1, 8, 512, 3))) == {
        "op": "read", "offset": 4096, "mem": 1, "moff": 8, "len": 512, "id": 3,
    }  # fmt: skip
    assert json.loads(to_bytes(Read(0, 1, 0, 512, 4, map=True))) == {
        "op": "read", "offset": 0, "mem": 1, "moff": 0, "len": 512, "id": 4, "map": True,
    }  # fmt: skip
    assert json.loads(to_bytes(Done(4, map=(0, 4096, 512, 0)))) == {
        "op": "done", "id": 4, "map": [0, 4096, 512, 0],
    }  # fmt: skip
    assert json.loads(to_bytes(Call("attempt", {"what": "ids", "arg": None}, 2))) == {
        "op": "attempt", "what": "ids", "arg": None, "id": 2,
    }  # fmt: skip
    assert json.loads(to_bytes(Done(3, WireError.of(UsageError("no"))))) == {
        "op": "done", "id": 3, "error": {"class": "UsageError", "message": "no"},
    }  # fmt: skip
    assert json.loads(to_bytes(Resolved(5, error=WireError.of(ImageError("a", "b"))))) == {
        "op": "resolved", "rid": 5,
        "error": {"class": "ImageError", "file": "a", "message": "b", "fmt": None},
    }  # fmt: skip


# -- errors ---------------------------------------------------------------------------

CROSSING: list[AioddError] = [
    ImageError("disk.qcow2", "L1 table offset is not aligned", "qcow2"),
    ImageError("disk.raw", "truncated"),
    UnsupportedImageError("disk.vhdx", "log replay is not supported", "vhdx"),
    PolicyError("base.qcow2", "backing file '/etc/passwd' is refused: outside", "qcow2"),
    PolicyError("base.qcow2", "backing file 'b' is refused: not below", allowable=True),
    PolicyError("base.qcow2", "chain loops", allowable=False),
    InUseError("base.qcow2", "the image is in use: another process has it open for writing"),
    InUseError("base.qcow2", "in use", "qcow2", forceable=True),
    UsageError("invalid format 'floppy'"),
]


def _same(back: BaseException, exc: BaseException) -> None:
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    if isinstance(exc, ImageError):
        assert isinstance(back, ImageError)
        assert (back.file, back.detail, back.fmt) == (exc.file, exc.detail, exc.fmt)


@pytest.mark.parametrize("exc", CROSSING, ids=lambda e: type(e).__name__)
def test_errors_cross_as_themselves_from_the_guest(exc: AioddError) -> None:
    done = from_guest(to_bytes(Done(1, WireError.of(exc))))
    assert isinstance(done, Done) and done.error is not None
    _same(done.error.exception("other.img", 1 << 30), exc)
    failed = from_guest(to_bytes(Failed(WireError.of(exc))))
    assert isinstance(failed, Failed)
    _same(failed.error.exception("other.img"), exc)


@pytest.mark.parametrize(
    "exc", [e for e in CROSSING if isinstance(e, ImageError)], ids=lambda e: type(e).__name__
)
def test_errors_cross_as_themselves_from_the_host(exc: ImageError) -> None:
    resolved = from_host(to_bytes(Resolved(2, error=WireError.of(exc))))
    assert isinstance(resolved, Resolved) and resolved.error is not None
    _same(resolved.error.exception("referrer.img"), exc)


def test_every_error_class_that_may_cross_is_tested() -> None:
    # A new ImageError or UsageError class must be added to ERROR_CLASSES (or it would
    # cross as its parent) and to CROSSING above.
    defined = {
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, ImageError | UsageError)
    }
    assert defined == {type(e) for e in CROSSING}
    assert set(ERROR_CLASSES.values()) == defined - {UsageError}


@given(
    st.sampled_from([ImageError, UnsupportedImageError, PolicyError]),
    printable.filter(bool),
    st.text(max_size=50),  # escaped to one line, it stays within the 500 characters shown
    st.none() | short_printable,
)
def test_any_image_error_crosses_as_itself(
    cls: type[ImageError], file: str, message: str, fmt: str | None
) -> None:
    exc = cls(file, message, fmt)
    done = from_guest(to_bytes(Done(1, WireError.of(exc))))
    assert isinstance(done, Done) and done.error is not None
    _same(done.error.exception("other.img"), exc)


def test_a_subclass_crosses_as_its_nearest_known_class() -> None:
    class Odd(UnsupportedImageError):
        pass

    assert WireError.of(Odd("a", "b")).kind == "UnsupportedImageError"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (MemoryError(), IsolationError(
            "disk.img: the guest reader ran out of memory (its limit is 64 MiB)")),
        (ValueError("bad\nthing"), ImageError(
            "disk.img", "the decoder failed on this image (ValueError: bad\\nthing)")),
        (IsolationError("x"), ImageError(
            "disk.img", "the decoder failed on this image (IsolationError: x)")),
    ],
)  # fmt: skip
def test_other_errors_do_not_cross_as_themselves(exc: BaseException, expected: AioddError) -> None:
    done = from_guest(to_bytes(Done(1, WireError.of(exc))))
    assert isinstance(done, Done) and done.error is not None
    _same(done.error.exception("disk.img", 64 << 20), expected)


def test_the_kvm_guest_readers_end_crosses_as_an_isolation_error() -> None:
    # Only what the KVM guest reader raised is sent this way (the child's of_vm).
    vm = IsolationError("disk.img: the guest reader faulted (triple fault)")
    done = from_guest(to_bytes(Done(1, WireError.of_vm(vm))))
    assert isinstance(done, Done) and done.error is not None
    assert done.error.kind == "vm"
    _same(done.error.exception("other.img"), vm)
    image = ImageError("disk.img", "compressed data does not decode", "qcow2")
    assert WireError.of_vm(image) == WireError.of(image)
    # its text is the guest's word: cleaned like any other
    done = _guest({"op": "done", "id": 1, "error": {"class": "vm", "message": "a\nb" * 300}})
    assert isinstance(done, Done) and done.error is not None
    err = done.error.exception("disk.img")
    assert type(err) is IsolationError and str(err) == protocol.clean("a\nb" * 300)
    assert "\n" not in str(err) and len(str(err)) < 1000


# -- a hostile guest ------------------------------------------------------------------


def _guest(message: dict[str, Any]) -> protocol.GuestMessage:
    return from_guest(json.dumps(message).encode())


@pytest.mark.parametrize(
    "message",
    [
        {"op": "hello"},
        {"op": "init", "name": "x"},  # a host's message
        {"op": "ready", "layers": ["seccomp"], "mode": "kvm"},
        {"op": "ready", "layers": {}},  # no mode
        {"op": "ready", "layers": {}, "mode": "inline"},  # not a guest's mode
        {"op": "opened", "format": "raw", "virtual_size": -1, "mode": "kvm"},
        {"op": "opened", "format": "raw", "virtual_size": True, "mode": "kvm"},
        {"op": "opened", "format": 7, "virtual_size": 0, "mode": "kvm"},
        {"op": "opened", "format": "raw", "virtual_size": 0, "mode": ["kvm"]},
        {"op": "done", "id": "1"},
        {"op": "done", "id": 1 << 64},
        {"op": "done", "id": 1, "error": {"class": ["ImageError"]}},
        {"op": "done", "id": 1, "map": {}},
        {"op": "done", "id": 1, "map": [0, 0, 1]},  # not four numbers each
        {"op": "done", "id": 1, "map": [0, 0, 0, 0]},  # nothing to read
        {"op": "done", "id": 1, "map": [-1, 0, 1, 0]},
        {"op": "done", "id": 1, "map": [64, 0, 1, 0]},  # a layer the host does not hold
        {"op": "done", "id": 1, "map": [0, (1 << 63) - 1, 1, 0]},  # past 2^63 - 1
        {"op": "done", "id": 1, "map": [0, 0, 1, (1 << 63) - 1]},
        {"op": "done", "id": 1, "map": [0, 0, True, 0]},
        {"op": "done", "id": 1, "map": [0, 0.0, 1, 0]},
        {"op": "done", "id": 1, "map": [0, 0, 1, 0] * 257},  # more than MAP_EXTENTS
        {"op": "resolve", "rid": 1, "layer": 0, "kind": "socket", "name": "x", "disk": True},
        {"op": "resolve", "rid": 1, "layer": -1, "kind": "backing", "name": "x"},
        {"op": "resolve", "rid": 1, "layer": 0, "kind": "backing", "name": None},
    ],
)
def test_broken_messages_are_refused(message: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        _guest(message)


@pytest.mark.parametrize("lanes", [-1, protocol.MAX_LANES + 1, True, "2", None])
def test_an_init_with_bad_lanes_is_refused(lanes: object) -> None:
    message = json.loads(to_bytes(Init("x", None, (), (), False, 0, 0, lanes=2)))
    assert from_host(json.dumps(message).encode()) == Init("x", None, (), (), False, 0, 0, lanes=2)
    message["lanes"] = lanes
    with pytest.raises(ValueError, match="lanes"):
        from_host(json.dumps(message).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"[1]",
        b'{"op": 1}',
        b"{",
        b" " * (protocol.MAX_MESSAGE + 1),
        b'{"op": "done", "id": 1, "result": ' + b"[" * 30000,  # past the recursion limit
        b'{"op": "done", "id": 1} ',
        '{"op": "done", "id": 1}'.encode("utf-16"),
    ],
)
def test_what_is_not_a_message_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        from_guest(data)


# -- the JSON, without the json package -----------------------------------------------

json_trees = st.recursive(
    json_values | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(any_text, json_trees, max_size=6).map(lambda d: {**d, "op": "x"})


@given(json_objects)
def test_the_wire_encoder_writes_what_json_dumps_writes(message: dict[str, Any]) -> None:
    assert protocol.encode(message) == json.dumps(message, separators=(",", ":")).encode()


@given(json_objects)
def test_the_wire_decoder_reads_what_json_loads_reads(message: dict[str, Any]) -> None:
    for text in (json.dumps(message), json.dumps(message, indent=1, ensure_ascii=False)):
        # Leading or trailing whitespace is not what an encoder writes: refused there.
        assert protocol.decode(text.encode()) == json.loads(text)


@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_the_wire_decoder_refuses_what_json_loads_refuses(data: bytes) -> None:
    try:
        expected = json.loads(data.decode())
    except ValueError:  # malformed UTF-8 or JSON
        with pytest.raises(ValueError):
            protocol.decode(data)
        return
    if isinstance(expected, dict) and isinstance(expected.get("op"), str):
        if data == data.strip():
            assert protocol.decode(data) == expected
    else:
        with pytest.raises(ValueError):
            protocol.decode(data)


# As the guest runs it, and the host until something else imports json: json.decoder,
# which gives the C scanner its error class, not imported.  Each of these must be
# refused as a ValueError, not crash or pass.
_WITHOUT_JSON = r"""
from aiodd.guest import protocol
assert "json" not in sys.modules
for data in (b'{"op": 1', b'{"op" 1}', b'{"op": "\\x"}', b'[NaN]', b'{"op": "a"} x',
             b'{"op": "a", "n": Infinity}', b"\xff", b"", b"[1]"):
    try:
        protocol.decode(data)
    except ValueError:
        continue
    raise SystemExit(f"accepted {data!r}")
assert protocol.decode(b'{"op": "a", "n": [1.5, null]}') == {"op": "a", "n": [1.5, None]}
assert "json" not in sys.modules
print("ok")
"""


def test_the_wire_decoder_refuses_malformed_messages_without_the_json_package() -> None:
    proc = run_as_guest(_WITHOUT_JSON)
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok"), proc.stderr


def test_guest_strings_are_cleaned_and_bounded() -> None:
    ready = _guest({"op": "ready", "layers": {"seccomp\n": "active: \x1b[2J"},
                    "mode": "kvm", "reason": "auto:\n"})  # fmt: skip
    assert ready == Ready({"seccomp\\n": "active: \\x1b[2J"}, "kvm", "auto:\\n")
    opened = _guest({"op": "opened", "format": "q" * 40, "virtual_size": 0, "mode": "sandbox",
                     "reason": 7})  # fmt: skip
    assert opened == Opened("q" * 16 + "...", 0, "sandbox", "7")
    done = _guest({"op": "done", "id": 1, "result": ["not", "text"]})
    assert done == Done(1, result="['not', 'text']")
    resolve = _guest({"op": "resolve", "rid": 1, "layer": 0, "kind": "backing",
                      "name": "b", "referrer": 7, "format": None, "disk": "yes"})  # fmt: skip
    assert resolve == Resolve(0, "backing", "b", "", None, False, 1)


def test_a_guests_error_is_never_more_than_an_error() -> None:
    for wire in (None, "ImageError", 7):
        done = _guest({"op": "done", "id": 1, "error": wire})
        assert isinstance(done, Done) and done.error == WireError("malformed", "")
        err = done.error.exception("disk.img")
        assert type(err) is IsolationError
        assert str(err) == "disk.img: the guest reader sent a malformed error"
    failed = _guest({"op": "failed"})
    assert isinstance(failed, Failed) and failed.error.kind == "malformed"
    error = {"class": "IsolationError", "message": "x", "type": "SystemExit\n" + "y" * 100}
    done = _guest({"op": "done", "id": 1, "error": error})
    assert isinstance(done, Done) and done.error is not None
    err = done.error.exception("disk.img")
    assert type(err) is ImageError
    assert str(err) == (
        "disk.img: the decoder failed on this image (SystemExit\\n" + "y" * 29 + "...: x)"
    )
    done = _guest({"op": "done", "id": 1,
                   "error": {"class": "ImageError", "file": "f\x1b", "message": "m" * 600,
                             "fmt": ["qcow2"]}})  # fmt: skip
    assert isinstance(done, Done) and done.error is not None
    err = done.error.exception("disk.img")
    assert isinstance(err, ImageError) and err.fmt is None
    assert str(err) == "f\\x1b: " + "m" * 500 + "..."
