"""The architecture's rules, checked on the source (docs/architecture.md#invariants).

Every module under aiodd/ is parsed with :mod:`ast`; nothing is imported.  Two readings
of a module's imports:

- **run-time imports**: every ``import``/``from ... import`` the module can execute,
  at its top level or inside a function (a lazy import is still a dependency, only a
  later one).  ``if TYPE_CHECKING:`` blocks are left out: they never run, and a type
  annotation does not make one room depend on another at run time.  The layering rules
  (who may import whom) use this reading.
- **import-time imports**: the run-time imports outside function bodies (module level,
  class bodies, top-level ``if``/``try``).  Only these run while a module is being
  imported, so only these can form an import cycle; a function-local import is how a
  module legitimately reaches back up (``aiodd/__init__.py`` loads ``dd`` on first use).
  The cycle test uses this reading.

Imports made by name at run time (``importlib.import_module(f"...{name}")``, the
registries' way of loading one format) are not seen by either reading; they stay inside
their own package.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "aiodd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    target: str  # the aiodd module it loads (a package's __init__ is the package)
    line: int
    at_import_time: bool  # outside any function body


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _resolve(module: str, names: list[str]) -> set[str]:
    """``from module import names``: a name that is a submodule loads that submodule."""
    found = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    if len(found) < len(names):
        found.add(module)  # at least one plain name: the module itself is loaded
    return found


def imports_of(name: str) -> list[Import]:
    path = MODULES[name]
    return read_imports(path.read_text(), name, is_package=path.name == "__init__.py")


def read_imports(source: str, name: str, *, is_package: bool) -> list[Import]:
    """The aiodd imports in ``source``, the text of module ``name``."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.orelse:
                visit(statement, in_function)
            return
        targets: set[str] = set()
        if isinstance(node, ast.Import):
            targets = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            targets = _resolve(module, [alias.name for alias in node.names])
        for target in targets:
            if target == "aiodd" or target.startswith("aiodd."):
                found.append(Import(target, getattr(node, "lineno", 0), not in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def _within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def violations(sources: str, banned: tuple[str, ...], *, face: bool = False) -> list[str]:
    """The run-time imports of modules in package ``sources`` that load a banned module
    (or, with ``face``, the package face ``aiodd`` itself)."""
    bad: list[str] = []
    for name in MODULES:
        if not _within(name, sources):
            continue
        for imp in imports_of(name):
            if any(_within(imp.target, b) for b in banned) or (face and imp.target == "aiodd"):
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{imp.line} imports {imp.target}")
    return sorted(bad)


# --- who may import whom ---------------------------------------------------------------

FORMATS_MAY_NOT = (
    "aiodd.io",
    "aiodd.guest",
    "aiodd.pipeline",
    "aiodd.stages",
    "aiodd.api",
    "aiodd.cli",
    "aiodd.chain",
    "aiodd.policy",
    "aiodd.terminal",
)


def test_formats_are_sans_io() -> None:
    """A format turns bytes into structures and back: it never reaches files, processes,
    the pipeline or the package face (docs/architecture.md#invariants)."""
    assert violations("aiodd.formats", FORMATS_MAY_NOT, face=True) == []


TOPS = {"aiodd", "aiodd.__main__", "aiodd._command", "aiodd.cli", "aiodd.api"}


def test_nothing_below_imports_the_api_or_the_cli() -> None:
    """``api`` and ``cli`` are the two doors; only the package face, ``__main__`` and
    the command's entry point (``_command``) lead to them, and the CLI may call the
    library (never the other way)."""
    bad = [
        f"{MODULES[name].relative_to(ROOT)}:{imp.line} imports {imp.target}"
        for name in MODULES
        for imp in imports_of(name)
        if (name not in TOPS and imp.target in {"aiodd.api", "aiodd.cli"})
        or (name == "aiodd.api" and imp.target == "aiodd.cli")
    ]
    assert bad == []


HOST_SIDE = (
    "aiodd.policy",
    "aiodd.guest.host",
    "aiodd.guest.process",
    "aiodd.guest.spawn",
    "aiodd.guest.disk",
)


def test_the_guest_side_imports_nothing_of_the_host_side() -> None:
    """The guest process runs ``aiodd.guest.child``: it must not load the policy or the
    host's guest machinery (docs/security.md#the-guest-reader)."""
    assert violations("aiodd.guest.child", HOST_SIDE) == []
    assert violations("aiodd.guest.__main__", HOST_SIDE) == []


def _import_time_graph() -> dict[str, set[str]]:
    return {
        name: {i.target for i in imports_of(name) if i.at_import_time and i.target != name}
        for name in MODULES
    }


def unordered(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """The modules that cannot be put in an import order (empty: no cycle), each with
    what it still waits for."""
    done: set[str] = set()
    while len(done) < len(graph):  # peel off the modules whose imports are all done
        ready = {n for n, deps in graph.items() if n not in done and deps <= done}
        if not ready:
            return {n: sorted(graph[n] - done) for n in sorted(set(graph) - done)}
        done |= ready
    return {}


def test_the_module_graph_has_no_import_cycle() -> None:
    assert unordered(_import_time_graph()) == {}


# --- the checker itself -----------------------------------------------------------------


SAMPLE = """
import os
import aiodd.window
from aiodd import errors, dd
from . import base
from .crc32c import crc32c
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from aiodd.policy import Policy
else:
    from aiodd.io import LocalFile
try:
    from aiodd.chain import open_input
except ImportError:
    pass
class K:
    from aiodd.locks import PERM_NAMES
def lazy():
    from aiodd.api import dd
"""


def test_the_reader_sees_every_kind_of_import() -> None:
    """The rules are only as good as the reading: plain, from (a submodule or a name),
    relative, nested and function-local imports are seen, ``TYPE_CHECKING`` blocks are
    not."""
    got = read_imports(SAMPLE, "aiodd.formats.sample", is_package=False)
    assert sorted((i.target, i.at_import_time) for i in got) == [
        ("aiodd", True),  # ``dd`` is a name of the package face
        ("aiodd.api", False),
        ("aiodd.chain", True),
        ("aiodd.errors", True),
        ("aiodd.formats.base", True),
        ("aiodd.formats.crc32c", True),
        ("aiodd.io", True),
        ("aiodd.locks", True),
        ("aiodd.window", True),
    ]
    assert all(i.target != "aiodd.api" for i in imports_of("aiodd"))  # TYPE_CHECKING only


def test_a_cycle_would_be_seen() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert unordered(graph) == {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert unordered({"a": {"e"}, "e": set()}) == {}


# --- the public surface -----------------------------------------------------------------


def _declared_all(path: Path) -> tuple[str, ...] | None:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                assert node.value is not None
                value = ast.literal_eval(node.value)
                return tuple(value)
    return None


def _defined_public(path: Path) -> set[str]:
    """The public functions and classes a module defines itself (not what it imports)."""
    return {
        node.name
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and not node.name.startswith("_")
    }


DECLARING = sorted(n for n, p in MODULES.items() if n != "aiodd" and _declared_all(p))


def test_some_modules_declare_their_surface() -> None:
    assert {"aiodd.chain", "aiodd.guest"} <= set(DECLARING)


@pytest.mark.parametrize("name", DECLARING)
def test_a_modules_all_is_importable_and_complete(name: str) -> None:
    """In the spirit of anyio and trio: every name a module's ``__all__`` lists is there,
    once, and every public function or class it defines is listed.  (The package face,
    ``aiodd.__all__``, is checked in tests/test_api.py.)"""
    declared = _declared_all(MODULES[name])
    assert declared is not None
    assert len(set(declared)) == len(declared), "a name is listed twice"
    module = importlib.import_module(name)
    for public in declared:
        assert getattr(module, public) is not None, public
    missing = _defined_public(MODULES[name]) - set(declared)
    assert missing == set(), f"{name} defines {sorted(missing)} but does not list them"


# --- no citations a reader cannot follow ------------------------------------------------

# A rule is stated, or linked to a docs/ page: never "SPEC", an issue number or a path
# on the machine the project was written on.
BANNED = re.compile(r"\bSPEC\b|§|(?<![\w&/])#\d+\b|(?i:\bissues? \d)|/work/")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "*.py", "*.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        return sorted(
            p
            for p in ROOT.rglob("*")
            if p.suffix in {".py", ".md"} and ".venv" not in p.parts and ".git" not in p.parts
        )
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def _citations(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        if path == Path(__file__).resolve():
            continue  # this file names what it bans
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "re.compile(" in line:
                continue  # a pattern that names what it bans (tests/test_cli.py's)
            for match in BANNED.finditer(line):
                yield f"{path.relative_to(ROOT)}:{number}: {match[0]}"


def _part(part: str) -> list[Path]:
    files = _tracked()
    if part == "aiodd/ (guest)":
        return [p for p in files if p.is_relative_to(PACKAGE / "guest")]
    if part == "aiodd/ (the rest)":
        return [
            p
            for p in files
            if p.is_relative_to(PACKAGE) and not p.is_relative_to(PACKAGE / "guest")
        ]
    if part == "top level":
        return [p for p in files if p.parent == ROOT]
    return [p for p in files if p.is_relative_to(ROOT / part)]


PARTS = [
    "top level",
    "docs",
    "tests",
    "bench",
    "examples",
    "aiodd/ (guest)",
    "aiodd/ (the rest)",
]


@pytest.mark.parametrize("part", PARTS)
def test_no_file_cites_spec_issue_numbers_or_machine_paths(part: str) -> None:
    """Every tracked .py and .md file stands on its own (docs/architecture.md#invariants)."""
    paths = _part(part)
    assert paths or part == "examples"
    assert list(_citations(paths)) == []


def test_the_citation_check_bites() -> None:
    for text in ("see SPEC §5", "(issue 4)", "Issue 2: the raw engine", "floor #2", "/work/main/x"):
        assert BANNED.search(text), text
    for text in ("&#39;", "a#2", "issues one read", "docs/security.md#the-guest-reader"):
        assert not BANNED.search(text), text
