"""What the numbers were measured on."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.measure import GiB, free_bytes


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, f"{fields[2]} ({fields[0]} on {mount})"
    except OSError:
        pass
    return kind


def _git(repo: Path) -> str:
    head = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = " + uncommitted changes" if status.stdout.strip() else ""
    return head + dirty


def describe(workdir: Path, aiodd: str, python: str) -> list[tuple[str, str]]:
    repo = Path(__file__).resolve().parent.parent
    verbose = subprocess.run(
        [aiodd, "--version", "--verbose"], capture_output=True, text=True, check=False
    )
    layers = "; ".join(
        line.removeprefix("isolation: ")
        for line in verbose.stdout.splitlines()
        if line.startswith("isolation:")
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("cpus (nproc)", str(os.cpu_count())),
        ("cpu", _cpu_model()),
        ("memory", _mem_total()),
        ("kernel", platform.release()),
        ("python", f"{sys.version.split()[0]} ({python})"),
        ("aiodd", f"{_first_line([aiodd, '--version'])} ({aiodd}), git {_git(repo)}"),
        ("aiodd isolation layers", layers or "unknown"),
        ("qemu-img", _first_line(["qemu-img", "--version"])),
        ("dd", _first_line(["dd", "--version"])),
        (
            "work directory",
            f"{workdir}: {_fs_type(workdir)}, {free_bytes(workdir) / GiB:.0f} GiB free",
        ),
        ("load average at start (1, 5, 15 min)", load),
    ]


def render(facts: list[tuple[str, str]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in facts]
    return "\n".join(lines) + "\n"


# Free page reporting (virtio-balloon): pages the guest kernel frees are reported to the
# hypervisor, which takes them back; touching them again costs a fault in the host and a
# page of zeros. A page-cache copy that lands on reported pages runs several times slower
# (docs/performance.md, "Two speeds"), and whether it does depends on how long ago the
# previous run's output was freed, which is to say on the tools' order in the rotation.
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")
BUDDYINFO = Path("/proc/buddyinfo")


def _orders() -> int:
    """How many page orders the buddy allocator has (11 on x86-64: orders 0 to 10)."""
    try:
        line = BUDDYINFO.read_text().splitlines()[0]
    except (OSError, IndexError):
        return 11
    return len(line.split()) - 4  # "Node 0, zone DMA" and then one count per order


@contextlib.contextmanager
def steady_page_cache(keep: bool, log: Callable[[str], None]) -> Iterator[str]:
    """Turn free page reporting off for the run, where there is any and it may be
    changed; yields the line the machine table shows about it.

    An order no free block can have (one past the largest) leaves nothing to report.
    The previous value is written back on the way out, SIGTERM included.
    """
    try:
        before = PAGE_REPORTING.read_text().strip()
    except OSError:
        yield "none here (no virtio-balloon page reporting): the page cache has one speed"
        return
    if keep:
        yield (
            f"on (page_reporting_order {before}), left so by --keep-page-reporting:"
            " page-cache rows may run at two speeds"
        )
        return
    off = str(_orders())
    try:
        PAGE_REPORTING.write_text(off)
    except OSError as exc:
        yield (
            f"on (page_reporting_order {before}; cannot turn it off: {exc.strerror}):"
            " page-cache rows may run at two speeds"
        )
        return
    log(f"free page reporting off for the run (page_reporting_order {before} -> {off})")
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield f"off for the run (page_reporting_order {before} → {off}, restored after)"
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            PAGE_REPORTING.write_text(before)
            log(f"free page reporting restored (page_reporting_order {before})")
        except OSError as exc:
            log(f"could not restore page_reporting_order {before}: {exc.strerror}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
