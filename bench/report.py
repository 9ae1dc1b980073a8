"""Tables and floors, rendered as markdown."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.measure import MiB, Result


@dataclass
class Floor:
    """A target the project set (or, with ``informative``, a comparison shown for honesty).

    ``group`` names what the floor measures (the section it belongs to: "raw → raw",
    "input formats", "output formats", "isolation").
    """

    group: str
    name: str
    measured: str
    limit: str
    passed: bool | None  # None: not evaluated (a run failed)
    informative: bool = False

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "n/a"
        word = "pass" if self.passed else "FAIL"
        return f"({word})" if self.informative else f"**{word}**"


Column = tuple[str, Callable[[Result], str]]


@dataclass
class Table:
    title: str
    results: list[Result]
    intro: str = ""
    pss: bool = False  # show the sampled tree PSS column
    extra: list[Column] = field(default_factory=list)


@dataclass
class Section:
    name: str
    title: str
    preamble: list[str] = field(default_factory=list)  # markdown blocks before the tables
    tables: list[Table] = field(default_factory=list)
    appendix: list[str] = field(default_factory=list)  # markdown blocks after the tables
    floors: list[Floor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def ratio_floor(
    group: str,
    name: str,
    a: Result,
    b: Result,
    limit: float,
    *,
    informative: bool = False,
) -> Floor:
    """``a``'s median time must be at most ``limit`` times ``b``'s."""
    if not (a.ok and b.ok):
        return Floor(group, name, "a run failed", f"≤ {limit:g}x", None, informative)
    ratio = a.median / b.median
    best_a, best_b = min(x.wall for x in a.samples), min(x.wall for x in b.samples)
    measured = f"{a.median:.3f} s vs {b.median:.3f} s = **{ratio:.2f}x**"
    if len(a.samples) > 1 or len(b.samples) > 1:
        measured += f" (best runs: {best_a:.3f} vs {best_b:.3f} = {best_a / best_b:.2f}x)"
    return Floor(group, name, measured, f"≤ {limit:g}x", ratio <= limit, informative)


def rss_floor(group: str, name: str, result: Result, limit_mib: float) -> Floor:
    if not result.ok:
        return Floor(group, name, "the run failed", f"< {limit_mib:g} MiB", None)
    rss = result.max_rss / MiB
    measured = f"{rss:.1f} MiB"
    peak = rss
    if result.tree_pss is not None:
        pss = result.tree_pss / MiB
        measured += f" (tree PSS {pss:.1f} MiB)"
        peak = max(peak, pss)
    return Floor(group, name, measured, f"< {limit_mib:g} MiB", peak < limit_mib)


def _fmt_seconds(x: float) -> str:
    return f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def render_table(table: Table) -> str:
    head = ["tool", "case", "n", "median s", "min-max s", "MiB/s", "CPU s", "peak RSS MiB"]
    if table.pss:
        head.append("tree PSS MiB")
    head += [name for name, _ in table.extra]
    lines = [f"#### {table.title}", ""]
    if table.intro:
        lines += [table.intro, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.results:
        if not r.ok:
            cells = [r.tool, r.case, str(len(r.samples)), f"error: {r.error}"]
            cells += [""] * (len(head) - len(cells))
        else:
            walls = [s.wall for s in r.samples]
            cells = [
                r.tool,
                r.case,
                str(len(r.samples)),
                _fmt_seconds(r.median),
                f"{_fmt_seconds(min(walls))}-{_fmt_seconds(max(walls))}",
                _fmt_rate(r.mib_s),
                f"{r.cpu:.2f}",
                f"{r.max_rss / MiB:.1f}",
            ]
            if table.pss:
                pss = r.tree_pss
                cells.append("" if pss is None else f"{pss / MiB:.1f}")
            cells += [fn(r) for _, fn in table.extra]
        if r.note:
            cells[1] += f" ({r.note})"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_floors(floors: Sequence[Floor]) -> str:
    lines = [
        "| group | floor | measured | limit | result |",
        "|---|---|---|---|---|",
    ]
    for f in floors:
        name = f"{f.name} *(informative)*" if f.informative else f.name
        lines.append(f"| {f.group} | {name} | {f.measured} | {f.limit} | {f.verdict} |")
    return "\n".join(lines) + "\n"


def render_section(section: Section) -> str:
    parts = [f"### {section.title}", ""]
    for block in section.preamble:
        parts += [block, ""]
    for table in section.tables:
        parts += [render_table(table), ""]
    for block in section.appendix:
        parts += [block, ""]
    if section.floors:
        parts += ["#### Floors", "", render_floors(section.floors), ""]
    for note in section.notes:
        parts += [f"- {note}"]
    if section.notes:
        parts.append("")
    return "\n".join(parts)
