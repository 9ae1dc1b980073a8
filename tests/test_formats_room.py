"""The formats room's rules (docs/architecture.md, "The formats"): a lazy registry that
covers every format name, one package per format.  The sans-IO import rule is
tests/test_architecture.py's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aiodd.formats import INPUT_FORMATS, OUTPUT_FORMATS
from aiodd.formats.registry import FORMATS

FORMATS_DIR = Path(__file__).resolve().parent.parent / "aiodd" / "formats"


def test_every_format_has_its_room_and_a_registry_entry() -> None:
    assert set(FORMATS) == {*INPUT_FORMATS, *OUTPUT_FORMATS}
    for name, fmt in FORMATS.items():
        room = FORMATS_DIR / name
        assert {p.name for p in room.glob("*.py")} >= {"__init__.py", "layout.py"}
        assert fmt.reads == (room / "decode.py").exists() == (name in INPUT_FORMATS)
        assert fmt.writes == (room / "encode.py").exists() == (name in OUTPUT_FORMATS)
        if fmt.reads:
            assert name == fmt.decoder.NAME
        if fmt.writes:
            assert name == fmt.encoder.NAME


def test_the_registry_imports_no_format_until_asked() -> None:
    code = (
        "import sys, aiodd.formats.registry as r\n"
        "print(sorted(m for m in sys.modules if m.endswith(('.decode', '.encode', '.layout'))))\n"
        "r.plan('raw', 1)\n"
        "print(sorted(m for m in sys.modules if m.endswith(('.decode', '.encode', '.layout'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[]",
        "['aiodd.formats.raw.encode', 'aiodd.formats.raw.layout']",
    ]


def test_every_reader_probes_from_a_module_of_its_own() -> None:
    """Detection needs only ``probe.py``; the decoder's probe is the same function."""
    for name, fmt in FORMATS.items():
        if fmt.reads:
            assert fmt.probe.__module__ == f"aiodd.formats.{name}.probe"
            assert fmt.decoder.probe is fmt.probe


def test_detection_imports_no_decoder() -> None:
    code = (
        "import sys, aiodd.formats.registry as r\n"
        "print(r.detect(b'QFI\\xfb\\0\\0\\0\\3' + bytes(4088)), r.detect(bytes(4096)))\n"
        "print(sorted(m for m in sys.modules if m.endswith(('.decode', '.encode', '.layout'))))\n"
        "print('zstandard' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["qcow2 raw", "[]", "False"]
