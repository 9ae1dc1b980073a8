"""Running one command line and measuring it: wall time, CPU time, peak memory.

Every run is a fresh process started with :func:`os.posix_spawnp` and reaped with
:func:`os.wait4` by a small spawner process (:class:`Spawner`), not by the bench
itself: Linux carries a process's peak RSS (``ru_maxrss``) across ``exec`` from the
memory it had before, so a command started by the bench, 40-50 MiB of Python, would
report at least the bench's size (``dd`` included).  Started by the spawner, a command
reports at least the spawner's, about 9 MiB, and otherwise its own.  Linux folds a
reaped grandchild into that figure as a *maximum*, not a sum: for aiodd with
``--isolation=sandbox`` it is the larger of the host process and its guest.  Where the
sum matters, :class:`TreeSampler` polls the proportional set size (PSS, which splits
shared pages between the processes that map them) of the whole process tree.  A run
that lasts longer than a second is also watched by :class:`WaitSampler`, which notes
where the tree's threads sleep in the kernel, so that a run that stalls says on what.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

MiB = 1 << 20
GiB = 1 << 30

Argv = tuple[str, ...]
Log = Callable[[str], None]


def human(n: int) -> str:
    """``n`` bytes in the largest unit that divides it: ``1 GiB``, ``512 B``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Sample:
    """One run of a case."""

    wall: float  # seconds, spawn to reap, summed over the case's steps
    cpu: float  # user + system seconds of the children (and their reaped children)
    max_rss: int  # bytes: the largest ru_maxrss among the steps
    tree_pss: int | None  # bytes: sampled peak PSS of the whole tree, when asked for
    stderr_tail: str  # the last lines of the last step's stderr
    # Where the tree's threads were while the run lasted past WaitSampler.AFTER: the
    # most seen first, each with its share of the looks (see WaitSampler).
    waits: tuple[tuple[str, float], ...] = ()

    @property
    def waited(self) -> bool:
        """Long and mostly off the CPU: a run that waited on something, not worked."""
        return self.wall >= WAITED_WALL and self.cpu <= self.wall * WAITED_CPU_SHARE


class CommandFailed(RuntimeError):
    """A measured command exited with a non-zero status."""

    def __init__(self, argv: Argv, status: int, stderr: str) -> None:
        self.argv = argv
        self.status = status
        self.stderr = stderr
        shown = " ".join(argv)
        super().__init__(f"{shown}: exit {status}: {stderr.strip()[-500:]}")


class _TreeWatcher:
    """Looks at a process tree from a thread: every ``interval`` seconds from ``AFTER``
    seconds into the run until the run ends (:meth:`look`, in the subclasses)."""

    AFTER = 0.0

    def __init__(self, pid: int, interval: float) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        name = f"{type(self).__name__}-{pid}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        if self._stop.wait(self.AFTER):
            return
        while not self._stop.is_set():
            self.look()
            self._stop.wait(self._interval)

    def look(self) -> None:
        raise NotImplementedError


class TreeSampler(_TreeWatcher):
    """Polls the summed PSS of a process and all its descendants in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(pid, interval)
        self.peak = 0

    def look(self) -> None:
        total = sum(_pss(pid) for pid in _tree(self._pid))
        self.peak = max(self.peak, total)


# A run "waited" when it took at least this long with at most this share of it on a CPU
# (the sum over its processes).  A durable copy on a slow disk waits too: on the disk,
# which its waits then show.
WAITED_WALL = 2.0
WAITED_CPU_SHARE = 0.25


class WaitSampler(_TreeWatcher):
    """Where the threads of a process tree are, looked at every ``interval`` seconds from
    ``AFTER`` seconds into the run: each thread's state and what it sleeps in.

    The sleep is the top of the thread's kernel stack (``/proc/PID/task/TID/stack``,
    readable by root) or, without it, its ``wchan``.  A run that stalled for seconds
    with its CPU idle (docs/performance.md, "ninth round") then names what it waited
    on.  Nothing is read during a run's first second, which most runs never pass, so the
    short rows are not disturbed."""

    AFTER = 1.0
    FRAMES = 4  # of the kernel stack, innermost first

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(pid, interval)
        self._seen: dict[str, int] = {}
        self._looks = 0

    def look(self) -> None:
        """Note once where every thread of the tree is; a look that finds the tree gone
        (the run ending meanwhile) does not count."""
        found = False
        for pid in _tree(self._pid):
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    where = _thread_state(f"/proc/{pid}/task/{tid}", self.FRAMES)
                    if where is not None:
                        self._seen[where] = self._seen.get(where, 0) + 1
                        found = True
        self._looks += found

    def summary(self, top: int = 4) -> tuple[tuple[str, float], ...]:
        """The ``top`` most seen places, each with the share of looks it was seen in
        (a place two threads sleep in at once can pass 1.0)."""
        if not self._looks:
            return ()
        ranked = sorted(self._seen.items(), key=lambda item: -item[1])[:top]
        return tuple((where, count / self._looks) for where, count in ranked)


def _thread_state(task: str, frames: int) -> str | None:
    """``comm state: where``, for the thread whose ``/proc`` directory is ``task``; None
    once it has exited.  ``where`` is the innermost kernel frames, or the ``wchan``."""
    try:
        stat = Path(f"{task}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.find("(") + 1 : stat.rfind(")")]
    state = stat[stat.rfind(")") + 2 :][:1]
    if state in ("Z", "X"):  # exited, not yet reaped
        return None
    if state == "R":
        return f"{comm} R: on a CPU"
    where = ""
    with contextlib.suppress(OSError):
        names = [
            line.split("] ", 1)[-1].split("+", 1)[0]
            for line in Path(f"{task}/stack").read_text().splitlines()
        ]
        where = " < ".join(name for name in names[:frames] if name)
    if not where:
        with contextlib.suppress(OSError):
            wchan = Path(f"{task}/wchan").read_text().strip()
            where = wchan if wchan not in ("", "0") else ""
    return f"{comm} {state}: {where or '?'}"


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from ``/proc/PID/task/TID/children``."""
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                    todo.extend(int(child) for child in text.split())
    return found


def _pss(pid: int) -> int:
    """Proportional set size in bytes, 0 when the process is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (OSError, ValueError):
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


# The spawner: one request per line on stdin (argv, env, stderr path), and for each two
# lines on stdout: the child's pid as soon as it runs, then how it ended.  It imports
# nothing it does not need, to stay small (its size is the floor of every peak RSS).
_SPAWNER = """
import json, os, sys, time
out = sys.stdout
for line in sys.stdin:
    argv, env, stderr_path = json.loads(line)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
    ]
    started = time.perf_counter()
    try:
        pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions)
    except OSError as exc:
        out.write(json.dumps({"errno": exc.errno, "error": exc.strerror}) + "\\n")
        out.flush()
        continue
    out.write(json.dumps({"pid": pid}) + "\\n")
    out.flush()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    out.write(json.dumps({
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "max_rss": usage.ru_maxrss * 1024,
        "code": os.waitstatus_to_exitcode(status),
    }) + "\\n")
    out.flush()
"""


class Spawner:
    """A small process that starts and reaps the measured commands (see the module's
    docstring for why); one command at a time."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SPAWNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        """End the spawner: its loop ends with its input."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.close()
        self._process.wait()
        self._process.stdout.close()

    def _answer(self) -> dict[str, object]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the bench's spawner exited")
        answer: dict[str, object] = json.loads(line)
        return answer

    def run(
        self, argv: Argv, env: dict[str, str], stderr_path: Path, *, sample_tree: bool
    ) -> tuple[int, Sample]:
        """Run ``argv`` to its end: its exit code, and its measurements (no stderr tail),
        with the tree's peak PSS sampled while it runs where ``sample_tree``."""
        assert self._process.stdin is not None
        with self._lock:
            self._process.stdin.write(json.dumps([list(argv), env, str(stderr_path)]) + "\n")
            self._process.stdin.flush()
            first = self._answer()
            if "errno" in first:  # as posix_spawnp raised it in the spawner
                raise OSError(first["errno"], first["error"], argv[0])
            pid = first["pid"]
            assert isinstance(pid, int)
            sampler = TreeSampler(pid) if sample_tree else None
            with sampler or contextlib.nullcontext(), WaitSampler(pid) as waits:
                end = self._answer()
        wall, cpu, rss, code = end["wall"], end["cpu"], end["max_rss"], end["code"]
        assert isinstance(wall, float) and isinstance(cpu, float)
        assert isinstance(rss, int) and isinstance(code, int)
        peak = None if sampler is None else sampler.peak
        return code, Sample(wall, cpu, rss, peak, "", waits.summary())


_spawner: Spawner | None = None


def spawner() -> Spawner:
    """The bench's spawner, started on first use."""
    global _spawner
    if _spawner is None:
        _spawner = Spawner()
    return _spawner


def run_once(
    steps: Sequence[Argv],
    *,
    stderr_path: Path,
    sample_tree: bool = False,
    env: dict[str, str] | None = None,
) -> Sample:
    """Run ``steps`` one after the other; fail on the first non-zero exit."""
    wall = cpu = 0.0
    max_rss = 0
    tree_peak: int | None = 0 if sample_tree else None
    tail = ""
    waits: list[tuple[str, float]] = []
    for argv in steps:
        code, step = spawner().run(
            argv, env or dict(os.environ), stderr_path, sample_tree=sample_tree
        )
        if step.tree_pss is not None:
            assert tree_peak is not None
            tree_peak = max(tree_peak, step.tree_pss)
        wall += step.wall
        cpu += step.cpu
        max_rss = max(max_rss, step.max_rss)
        waits += step.waits
        tail = _tail(stderr_path)
        if code != 0:
            raise CommandFailed(argv, code, tail)
    return Sample(wall, cpu, max_rss, tree_peak, tail, tuple(waits))


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


@dataclass
class Result:
    """All runs of one case, and what the tables show of them."""

    section: str
    table: str
    tool: str
    case: str
    nbytes: int  # bytes of the window, for MiB/s
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(s.wall for s in self.samples)

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.median if self.median > 0 else float("inf")

    @property
    def cpu(self) -> float:
        return statistics.median(s.cpu for s in self.samples)

    @property
    def max_rss(self) -> int:
        return max(s.max_rss for s in self.samples)

    @property
    def tree_pss(self) -> int | None:
        values = [s.tree_pss for s in self.samples if s.tree_pss is not None]
        return max(values) if values else None

    def as_json(self) -> dict[str, object]:
        return {
            "section": self.section,
            "table": self.table,
            "tool": self.tool,
            "case": self.case,
            "nbytes": self.nbytes,
            "error": self.error,
            "note": self.note,
            "extra": self.extra,
            "walls": [s.wall for s in self.samples],
            "cpus": [s.cpu for s in self.samples],
            "max_rss": [s.max_rss for s in self.samples],
            "tree_pss": [s.tree_pss for s in self.samples],
            "waits": [[list(w) for w in s.waits] for s in self.samples],
        }


Hook = Callable[[Sample], None]


@dataclass
class Case:
    """A command (or a short sequence of commands) to time, and what to do around it.

    ``output`` is deleted before and after every run (and the page cache's dirty data
    flushed before it) so one run's writeback does not land in the next.  ``check``
    runs after the first run, before the output is deleted, and returns an error text
    if the output is wrong: speed of a wrong copy is not reported.
    """

    result: Result
    steps: tuple[Argv, ...]
    outputs: tuple[Path, ...] = ()
    check: Callable[[], str | None] | None = None
    sample_tree: bool = False
    runs: int | None = None  # fixed number of runs for this case (else the suite's)
    after: Hook | None = None  # sees every sample, e.g. to parse aiodd's progress


def find(results: Sequence[Result], tool: str, case: str) -> Result:
    for r in results:
        if r.tool == tool and r.case == case:
            return r
    raise KeyError((tool, case))


# Inputs up to this size are read before a group's first round (Bench.run); a bigger
# one (the memory rows' sparse GiBs) would fill the page cache with its holes' zeros.
WARM_LIMIT = 2 * GiB


def named_inputs(cases: Sequence[Case], limit: int = WARM_LIMIT) -> list[Path]:
    """The files the cases' command lines name to read, once each, in order: every
    argument (``if=`` aside) that is an existing regular file of at most ``limit``
    bytes, and not one of the case's outputs.  A chain's lower layers, which only its
    top names, are not among them."""
    found: dict[Path, None] = {}
    for case in cases:
        for step in case.steps:
            for arg in step:
                path = Path(arg.removeprefix("if="))
                if not path.is_absolute() or path in case.outputs or path in found:
                    continue
                with contextlib.suppress(OSError):
                    st = path.stat()
                    if stat.S_ISREG(st.st_mode) and st.st_size <= limit:
                        found[path] = None
    return list(found)


def read_through(path: Path, chunk: int = 8 * MiB) -> None:
    """Read ``path`` once, so that the page cache holds it."""
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def clear(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
