"""Messages between the host and the guest reader.

One JSON object per ``SOCK_SEQPACKET`` message (descriptors travel alongside with
``SCM_RIGHTS``).  JSON, not pickle: the host must never run code the guest chose.  Every
message from the guest is treated as hostile: size-bounded, type-checked field by field,
and strings meant for messages are escaped to one printable line.
"""

from __future__ import annotations

import json
from typing import Any

from aiodd.errors import ImageError, PolicyError, UnsupportedImageError, UsageError, one_line

MAX_MESSAGE = 65536

Message = dict[str, Any]

# Exception classes that cross the boundary, by name.  Anything else is reported as a
# decoder failure (an ImageError), never re-created from the guest's word.
ERROR_CLASSES: dict[str, type[ImageError]] = {
    "ImageError": ImageError,
    "UnsupportedImageError": UnsupportedImageError,
    "PolicyError": PolicyError,
}


def encode(message: Message) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    return data


def decode(data: bytes) -> Message:
    """Parse one message; raises ValueError on anything that is not a JSON object."""
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    message = json.loads(data)
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("not a message")
    return message


def clean(value: object, limit: int = 500) -> str:
    """A guest-supplied string made safe for one line of a terminal."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return one_line(text)


def error_to_wire(exc: BaseException) -> Message:
    """An exception raised in the guest, as fields (class name + constructor fields)."""
    if isinstance(exc, ImageError):
        return {
            "class": type(exc).__name__,
            "file": exc.file,
            "message": exc.detail,
            "fmt": exc.fmt,
        }
    if isinstance(exc, UsageError):
        return {"class": "UsageError", "message": str(exc)}
    if isinstance(exc, MemoryError):
        return {"class": "MemoryError", "message": "out of memory"}
    return {"class": "internal", "type": type(exc).__name__, "message": str(exc)}


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
