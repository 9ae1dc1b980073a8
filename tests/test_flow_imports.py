"""The copy's data path imports in one direction (docs/architecture.md, "The flow")."""

from __future__ import annotations

import ast
from pathlib import Path

import aiodd

PACKAGE = Path(aiodd.__file__).parent


def _imports(path: Path) -> set[str]:
    """The aiodd modules ``path`` imports, at any depth (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("aiodd.")}


def _under(names: set[str], prefix: str) -> set[str]:
    return {name for name in names if name == prefix or name.startswith(prefix + ".")}


def test_stages_import_neither_each_other_nor_the_wiring() -> None:
    stages = sorted((PACKAGE / "stages").glob("*.py"))
    assert {p.stem for p in stages} == {
        "__init__",
        "reader",
        "windower",
        "digest",
        "encoder",
        "sink",
    }
    for path in stages:
        imported = _imports(path)
        assert _under(imported, "aiodd.pipeline") == set(), path.name
        assert _under(imported, "aiodd.stages") == set(), path.name


def test_what_flows_imports_nothing_above_it() -> None:
    above = ("aiodd.stages", "aiodd.pipeline", "aiodd.api", "aiodd.cli", "aiodd.chain")
    for name in ("buffers.py", "progress.py", "options.py", "window.py"):
        imported = _imports(PACKAGE / name)
        for prefix in above:
            assert _under(imported, prefix) == set(), (name, prefix)


def test_the_package_has_one_encoder_stage_and_no_other_encoder_module() -> None:
    """``encoder`` is the stage; a format's own output code is its ``encode`` module."""
    named = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("encoder*.py")
        if "formats" not in p.relative_to(PACKAGE).parts
    )
    assert named == ["stages/encoder.py"]
