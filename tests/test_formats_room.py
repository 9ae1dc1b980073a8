"""The formats room's rules (docs/architecture.md ("The formats")): sans-IO imports, a lazy
registry that covers every format name, one package per format."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from aiodd.formats import INPUT_FORMATS, OUTPUT_FORMATS
from aiodd.formats.registry import FORMATS

FORMATS_DIR = Path(__file__).resolve().parent.parent / "aiodd" / "formats"
FORBIDDEN = (
    "aiodd.io",
    "aiodd.guest",
    "aiodd.pipeline",
    "aiodd.stages",
    "aiodd.api",
    "aiodd.cli",
    "aiodd.chain",
    "aiodd.policy",
)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "aiodd":  # `from aiodd import x` is the package face
                found |= {f"aiodd.{alias.name}" for alias in node.names}
    return found


def test_formats_import_nothing_of_the_host() -> None:
    for path in sorted(FORMATS_DIR.rglob("*.py")):
        for name in _imports(path):
            assert name != "aiodd", f"{path} imports the package face"
            assert not name.startswith(FORBIDDEN), f"{path} imports {name}"


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
