"""aiodd: copy a byte window out of a virtual-machine disk image, qemu-img dd compatible.

The public API is re-exported here: :func:`dd`, its :class:`DdResult`, the
:class:`Progress` events and the exceptions.  ``dd`` and its types load on first use,
so the guest reader process, which imports this package too, does not pay for the
pipeline's imports at start-up.
"""

# First: AIODD_TIMING's clock starts with the package (docs/performance.md, "Start-up").
from aiodd import _timing as _timing  # isort: skip

from aiodd._version import __version__ as __version__
from aiodd.errors import AioddError as AioddError
from aiodd.errors import ImageError as ImageError
from aiodd.errors import InUseError as InUseError
from aiodd.errors import IsolationError as IsolationError
from aiodd.errors import OutputError as OutputError
from aiodd.errors import PolicyError as PolicyError
from aiodd.errors import StageError as StageError
from aiodd.errors import UnsupportedImageError as UnsupportedImageError
from aiodd.errors import UsageError as UsageError

# typing.TYPE_CHECKING, without importing typing (with re and enum, most of the time
# to the command's first act, starting its guest: docs/performance.md, "Start-up").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from aiodd.api import Checksum as Checksum
    from aiodd.api import DdResult as DdResult
    from aiodd.api import dd as dd
    from aiodd.options import Isolation as Isolation
    from aiodd.progress import Progress as Progress
    from aiodd.progress import ProgressCallback as ProgressCallback
    from aiodd.window import Window as Window
del TYPE_CHECKING  # not part of the package

__all__ = (
    "AioddError",
    "Checksum",
    "DdResult",
    "ImageError",
    "InUseError",
    "Isolation",
    "IsolationError",
    "OutputError",
    "PolicyError",
    "Progress",
    "ProgressCallback",
    "StageError",
    "UnsupportedImageError",
    "UsageError",
    "Window",
    "__version__",
    "dd",
)

_LAZY = {
    "Checksum": "aiodd.api",
    "DdResult": "aiodd.api",
    "Isolation": "aiodd.options",
    "dd": "aiodd.api",
    "Progress": "aiodd.progress",
    "ProgressCallback": "aiodd.progress",
    "Window": "aiodd.window",
}


def __getattr__(name: str) -> "Any":
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aiodd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
