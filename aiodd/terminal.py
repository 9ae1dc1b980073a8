"""Progress rendered for people (``-p``) and for programs (``--progress=json``)."""

from __future__ import annotations

import json
from typing import TextIO

from aiodd.pipeline.progress import Progress


class PercentRenderer:
    """qemu-img convert's ``-p`` line: ``    (xx.xx/100%)``, redrawn with ``\\r``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = ""

    def __call__(self, progress: Progress) -> None:
        text = f"    ({progress.percent:.2f}/100%)"
        if text != self._last:
            self._last = text
            self._stream.write(text + "\r")
            self._stream.flush()

    def close(self) -> None:
        if self._last:
            self._stream.write("\n")
            self._stream.flush()


class JsonRenderer:
    """One JSON object per line, for programs that drive aiodd."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, progress: Progress) -> None:
        record = {
            "bytes_done": progress.bytes_done,
            "total_bytes": progress.total_bytes,
            "percent": round(progress.percent, 2),
            "rate": round(progress.rate),
            "elapsed": round(progress.elapsed, 3),
        }
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()

    def close(self) -> None:
        pass
