"""Build the KVM guest reader with gcc (docs/kvm.md, "The build").

Self-contained on purpose: the build hook (``hatch_build.py``) loads this file by its
path, before aiodd or its dependencies are installed, and the tests build their own
hostile guests with it.  Imports nothing of aiodd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNTIME = HERE / "runtime"
SRC = HERE / "src"
FORMATS = HERE.parent.parent / "formats"
# The decoders live beside their Python twins (aiodd/formats/<name>/guest.c).
DECODERS = (
    FORMATS / "qcow2" / "guest.c",
    FORMATS / "raw" / "guest.c",
    FORMATS / "vmdk" / "guest.c",
    FORMATS / "vpc" / "guest.c",
    FORMATS / "vhdx" / "guest.c",
    FORMATS / "vdi" / "guest.c",
    FORMATS / "parallels" / "guest.c",
    FORMATS / "qcow" / "guest.c",
    FORMATS / "qed" / "guest.c",
)
GUEST_SOURCES = (
    SRC / "main.c",
    SRC / "disk.c",
    RUNTIME / "host.c",
    RUNTIME / "report.c",
    *DECODERS,
)
# Every guest, the test guests too, has these: the entry point, mem*, the heap.
RUNTIME_SOURCES = (RUNTIME / "start.c", RUNTIME / "heap.c")
INCLUDES = (RUNTIME, SRC, FORMATS)
GUEST = HERE / "guest.elf"

ARCHIVE_DIR = Path("/usr/lib/x86_64-linux-gnu")
ARCHIVES = {"libz.a": "zlib1g-dev", "libzstd.a": "libzstd-dev"}
APT_PACKAGES = "gcc zlib1g-dev libzstd-dev"

WARNINGS = ("-std=c11", "-Wall", "-Wextra", "-Werror")
CFLAGS = (
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-fstack-protector-strong",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-ffunction-sections",
    "-fdata-sections",
)
# The runtime's own mem* must not be compiled back into calls to themselves.
RUNTIME_CFLAGS = ("-fno-builtin", "-fno-tree-loop-distribute-patterns")
LDFLAGS = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--gc-sections",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,-z,max-page-size=0x1000",
)


class BuildError(Exception):
    """The guest cannot be built here; the message says why and what to install."""


def find_cc() -> str:
    """The C compiler: ``$CC`` if set (a single path), else gcc on ``PATH``."""
    cc = os.environ.get("CC") or "gcc"
    found = shutil.which(cc)
    if found is None:
        raise BuildError(
            f"C compiler {cc!r} not found (install the Debian packages: {APT_PACKAGES})"
        )
    return found


def find_archives() -> list[Path]:
    archives = [ARCHIVE_DIR / name for name in ARCHIVES]
    missing = [f"{a} ({ARCHIVES[a.name]})" for a in archives if not a.is_file()]
    if missing:
        raise BuildError(
            f"static libraries missing: {', '.join(missing)} "
            f"(install the Debian packages: {APT_PACKAGES})"
        )
    return archives


def _run(args: Sequence[str]) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{Path(args[0]).name} failed:\n{result.stderr.strip()}")


def build(
    output: Path,
    sources: Sequence[Path] = GUEST_SOURCES,
    *,
    libraries: bool = True,
    cc: str | None = None,
) -> Path:
    """Compile ``sources`` with the runtime into the static ELF ``output``.

    ``libraries`` links Debian's libz.a and libzstd.a (the shipped guest needs them; a
    test guest need not).  Raises :class:`BuildError`.
    """
    compiler = cc if cc is not None else find_cc()
    archives = find_archives() if libraries else []
    with tempfile.TemporaryDirectory(prefix="aiodd-kvm-build-") as tmp:
        objects: list[str] = []
        units: list[tuple[Path, tuple[str, ...]]] = [(Path(s), ()) for s in sources]
        units += [(s, ()) for s in RUNTIME_SOURCES]
        units.append((RUNTIME / "libc.c", RUNTIME_CFLAGS))
        includes = [arg for path in INCLUDES for arg in ("-I", str(path))]
        for index, (source, extra) in enumerate(units):
            obj = str(Path(tmp) / f"{index}-{Path(source).stem}.o")
            args = [compiler, *WARNINGS, *CFLAGS, *extra, *includes]
            _run([*args, "-c", str(source), "-o", obj])
            objects.append(obj)
        partial = Path(tmp) / "guest.elf"
        _run(
            [
                compiler,
                *LDFLAGS,
                "-T",
                str(RUNTIME / "guest.ld"),
                "-o",
                str(partial),
                *objects,
                *map(str, archives),
            ]
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        # Into place atomically: a running aiodd may be reading the old one.
        staged = output.with_name(f".{output.name}.tmp")
        shutil.copyfile(partial, staged)
        os.replace(staged, output)
    return output


if __name__ == "__main__":  # pragma: no cover - by hand: python aiodd/guest/kvm/build.py
    print(build(GUEST))
