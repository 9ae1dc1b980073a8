"""Modules read before the guest seals itself, and run on their first import after it.

Once sealed, the guest cannot open a file, so it cannot import one either.  A guest that
decodes in Python used to import every decoder before the seal, since an image may name
a backing file of any format: 12-25 ms of its start-up, mostly the NamedTuples and
structs of nine formats' layouts, for a copy that decodes one or two of them
(docs/performance.md, "Start-up").  Instead, :class:`Preloaded` reads the modules'
compiled code into memory while files may still be read and, placed first on
``sys.meta_path``, serves them from there: a module's code runs when something first
imports it, and nothing is looked up on disk.

What those modules import from elsewhere (the standard library's C modules among them)
must be imported before the seal, as any module the guest needs: tests/test_preload.py
imports every decoder with the file system's finders removed, to find any missing.
"""

from __future__ import annotations

import marshal
import os
import sys
from collections.abc import Iterable
from importlib.machinery import ModuleSpec
from importlib.util import MAGIC_NUMBER, cache_from_source
from types import CodeType, ModuleType

TYPE_CHECKING = False
if TYPE_CHECKING:
    # A loader to mypy; not imported at run time, where the import system asks for the
    # methods alone: importlib.abc imports importlib.resources and pathlib, and typing
    # (for a cast) re and enum.
    from importlib.abc import Loader as _Loader
else:
    _Loader = object

_HEADER = 16  # PEP 552: magic, flags, then the source's mtime and size (or a hash)


class _Module:
    """One module's code, as read before the seal: the compiled file when it is current
    for its source, else the source, compiled on first import."""

    def __init__(self, name: str, path: str, package: bool) -> None:
        self.name = name
        self.path = path
        self.package = package
        self.cached: bytes | None = None
        self.source: bytes | None = None
        stat = os.stat(path)
        try:
            with open(cache_from_source(path), "rb") as f:
                cached = f.read()
        except (OSError, NotImplementedError):  # no cache, or caching turned off
            cached = b""
        if _current(cached, stat):
            self.cached = cached
        else:
            with open(path, "rb") as f:
                self.source = f.read()

    def code(self) -> CodeType:
        if self.cached is None:
            assert self.source is not None
            return compile(self.source, self.path, "exec", dont_inherit=True)
        code = marshal.loads(memoryview(self.cached)[_HEADER:])
        if not isinstance(code, CodeType):
            raise ImportError(f"{self.path}: its compiled file holds no code", name=self.name)
        return code


def _current(cached: bytes, stat: os.stat_result) -> bool:
    """Whether ``cached`` (a ``.pyc``) is the compiled form of the source ``stat``
    describes, as the import system decides for a timestamp-based or an unchecked
    hash-based file; a checked hash-based one is compiled again from the source."""
    if len(cached) < _HEADER or cached[:4] != MAGIC_NUMBER:
        return False
    flags = int.from_bytes(cached[4:8], "little")
    if flags == 0b01:  # hash-based, unchecked: used as it is
        return True
    if flags != 0:
        return False
    mtime = int.from_bytes(cached[8:12], "little")
    size = int.from_bytes(cached[12:16], "little")
    return mtime == int(stat.st_mtime) & 0xFFFFFFFF and size == stat.st_size & 0xFFFFFFFF


class Preloaded(_Loader):
    """The finder and loader of the modules read before the seal."""

    def __init__(self) -> None:
        self.modules: dict[str, _Module] = {}

    def add_package(self, package: ModuleType, skip: Iterable[str] = ()) -> None:
        """Every module of ``package`` and of its subpackages not imported yet, but
        those whose last name is in ``skip``."""
        skipped = set(skip)
        for directory in package.__path__:
            self._walk(directory, package.__name__, skipped)

    def _walk(self, directory: str, prefix: str, skip: set[str]) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.is_dir():
                init = os.path.join(entry.path, "__init__.py")
                if entry.name != "__pycache__" and os.path.exists(init):
                    name = f"{prefix}.{entry.name}"
                    self._add(name, init, package=True)
                    self._walk(entry.path, name, skip)
            elif entry.name.endswith(".py") and entry.name[:-3] not in {"__init__", *skip}:
                self._add(f"{prefix}.{entry.name[:-3]}", entry.path)

    def add_modules(self, package: ModuleType, names: Iterable[str]) -> None:
        """The modules ``names`` of ``package`` (one directory), those not imported yet."""
        (directory,) = package.__path__
        for name in names:
            self._add(f"{package.__name__}.{name}", os.path.join(directory, f"{name}.py"))

    def _add(self, name: str, path: str, *, package: bool = False) -> None:
        if name not in sys.modules:
            self.modules[name] = _Module(name, path, package)

    def install(self) -> None:
        """Serve the modules read, first of every finder."""
        sys.meta_path.insert(0, self)

    # -- the import system's finder and loader -------------------------------------

    def find_spec(
        self, name: str, path: object = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        module = self.modules.get(name)
        if module is None:
            return None
        spec = ModuleSpec(name, self, origin=module.path, is_package=module.package)
        spec.has_location = True  # sets __file__, as the file system's finder does
        if module.package:
            spec.submodule_search_locations = [os.path.dirname(module.path)]
        return spec

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the import system's default module

    def exec_module(self, module: ModuleType) -> None:
        exec(self.modules[module.__name__].code(), module.__dict__)
