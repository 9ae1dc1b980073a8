"""The guest's preloader: modules read before the seal, run on first import after it
(aiodd/guest/preload.py)."""

from __future__ import annotations

import importlib
import py_compile
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from aiodd.guest.preload import Preloaded
from tests.harness import run_as_guest

PACKAGE = "preload_probe_pkg"  # a name nothing else imports


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Path]:
    """A package with a module, a subpackage and a module the guest would skip, each
    compiled as an installed package is; imported from ``tmp_path``."""
    root = tmp_path / PACKAGE
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from preload_probe_pkg.sub import b\nVALUE = 'a' + b.VALUE\n")
    (root / "sub" / "__init__.py").write_text("SUB = True\n")
    (root / "sub" / "b.py").write_text("VALUE = 'b'\n")
    (root / "encode.py").write_text("raise AssertionError('skipped, never run')\n")
    for path in root.rglob("*.py"):
        py_compile.compile(str(path), doraise=True)
    sys.path.insert(0, str(tmp_path))
    try:
        yield root
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def _preloaded(root: Path) -> Preloaded:
    package = importlib.import_module(PACKAGE)
    assert isinstance(package, ModuleType)
    preloaded = Preloaded()
    preloaded.add_package(package, skip=("encode",))
    return preloaded


def test_modules_are_served_from_memory_once_their_files_are_gone(package: Path) -> None:
    """What a sealed guest sees: no file can be opened, yet every module read imports,
    its code run only then, with the attributes the file system's loader sets."""
    preloaded = _preloaded(package)
    assert sorted(preloaded.modules) == [f"{PACKAGE}.a", f"{PACKAGE}.sub", f"{PACKAGE}.sub.b"]
    assert f"{PACKAGE}.a" not in sys.modules  # read, not run
    shutil.rmtree(package)
    importlib.invalidate_caches()
    preloaded.install()
    try:
        a = importlib.import_module(f"{PACKAGE}.a")
        assert a.VALUE == "ab"
        assert a.__file__ == str(package / "a.py")
        sub = sys.modules[f"{PACKAGE}.sub"]
        assert sub.SUB is True and sub.__path__ == [str(package / "sub")]
        with pytest.raises(ModuleNotFoundError):  # skipped: not read, and its file is gone
            importlib.import_module(f"{PACKAGE}.encode")
    finally:
        sys.meta_path.remove(preloaded)


def test_a_module_whose_compiled_file_is_stale_is_compiled_from_its_source(
    package: Path,
) -> None:
    """The import system's rule for a timestamp-based cache: a source changed since
    (another size here) is compiled again, not the cache's old code run."""
    (package / "sub" / "b.py").write_text("VALUE = 'new b'\n")
    preloaded = _preloaded(package)
    module = preloaded.modules[f"{PACKAGE}.sub.b"]
    assert module.cached is None and module.source == b"VALUE = 'new b'\n"
    assert preloaded.modules[f"{PACKAGE}.a"].cached is not None
    preloaded.install()
    try:
        assert importlib.import_module(f"{PACKAGE}.a").VALUE == "anew b"
    finally:
        sys.meta_path.remove(preloaded)


@pytest.mark.parametrize(
    ("mode", "cached"),
    [
        (py_compile.PycInvalidationMode.UNCHECKED_HASH, True),
        (py_compile.PycInvalidationMode.CHECKED_HASH, False),
    ],
)
def test_a_hash_based_compiled_file_is_used_only_unchecked(
    package: Path, mode: py_compile.PycInvalidationMode, cached: bool
) -> None:
    py_compile.compile(str(package / "a.py"), doraise=True, invalidation_mode=mode)
    preloaded = _preloaded(package)
    assert (preloaded.modules[f"{PACKAGE}.a"].cached is not None) is cached


def test_a_module_imported_already_is_not_read_again(package: Path) -> None:
    importlib.import_module(f"{PACKAGE}.sub.b")
    assert f"{PACKAGE}.sub.b" not in _preloaded(package).modules


# Every decoder and all it imports, after the sandbox guest's preparation, with the
# file system's finders removed: a module it failed to import or read fails here by
# name, instead of killing a sealed guest (seccomp) at its first image of that format.
# In an interpreter started as the guest's is (tests.harness.run_as_guest).
_SEALED = """
import codecs
from aiodd.guest import child
child._import_python_decoders(None)
sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") != "PathFinder"]
sys.path_hooks.clear()
sys.path_importer_cache.clear()
from aiodd.formats import registry
registry.import_probes()
for name, fmt in registry.FORMATS.items():
    if fmt.reads:
        registry.decoder(name)
for codec in ("utf-8", "utf-16-le", "utf-16-be", "utf-16", "latin-1", "ascii"):
    codecs.lookup(codec)
print("ok", len([m for m in sys.modules if m.endswith(".decode")]))
"""


def test_the_sandbox_guest_has_all_the_decoders_need_before_its_seal() -> None:
    proc = run_as_guest(_SEALED)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "9"]


def test_without_the_preparation_the_sealed_import_fails() -> None:
    """The check above can fail: with no decoder read first, the first import does."""
    without = _SEALED.replace("child._import_python_decoders(None)", "")
    proc = run_as_guest(without)
    assert proc.returncode != 0
    last = proc.stderr.splitlines()[-1]  # ModuleNotFoundError is an ImportError
    assert last.startswith(("ImportError: ", "ModuleNotFoundError: ")), proc.stderr
    assert "aiodd.formats" in last
