"""aiodd: copy a byte window out of a virtual-machine disk image, qemu-img dd compatible."""

from aiodd.errors import AioddError as AioddError
from aiodd.errors import ImageError as ImageError
from aiodd.errors import IsolationError as IsolationError
from aiodd.errors import OutputError as OutputError
from aiodd.errors import PolicyError as PolicyError
from aiodd.errors import StageError as StageError
from aiodd.errors import UnsupportedImageError as UnsupportedImageError
from aiodd.errors import UsageError as UsageError

__version__ = "0.1.0"

__all__ = (
    "AioddError",
    "ImageError",
    "IsolationError",
    "OutputError",
    "PolicyError",
    "StageError",
    "UnsupportedImageError",
    "UsageError",
    "__version__",
)
