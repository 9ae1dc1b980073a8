"""Throughput against bs: aiodd flat, qemu-img dd climbing."""

from __future__ import annotations

from pathlib import Path

from bench.measure import Result, human
from bench.raw import BS_SWEEP

_BYTES = {"512": 512, "4K": 4 << 10, "64K": 64 << 10, "1M": 1 << 20, "4M": 4 << 20}


def plot_throughput(results: list[Result], path: Path) -> None:
    """Lines for the sweep (and aiodd's runs on the big input), flat lines for
    qemu-img convert and coreutils dd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in results if r.table == "sweep" and r.ok]
    main = [r for r in results if r.table == "main" and r.ok]
    size = human(sweep[0].nbytes) if sweep else "?"
    big = human(main[0].nbytes) if main else "?"
    fig, ax = plt.subplots(figsize=(11, 5.5))
    series = (
        ("aiodd (sandbox)", sweep, size, "o-", "tab:blue"),
        ("aiodd (inline)", sweep, size, "s-", "tab:cyan"),
        ("aiodd (sandbox)", main, big, "o--", "tab:purple"),
        ("aiodd (inline)", main, big, "s--", "tab:pink"),
        ("qemu-img dd", sweep, size, "^-", "tab:red"),
    )
    for tool, rows, label_size, style, color in series:
        points = [
            (_BYTES[bs], r.mib_s)
            for bs in BS_SWEEP
            for r in rows
            if r.tool == tool and r.case == f"bs={bs}"
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style, color=color, label=f"{tool}, {label_size}")
    flat = (
        ("qemu-img convert", "-O raw", "tab:green", "-"),
        ("qemu-img convert + sync", "-O raw, then sync FILE", "tab:green", ":"),
        ("coreutils dd", "bs=4M", "tab:gray", "-"),
        ("coreutils dd", "bs=4M conv=fsync", "tab:gray", ":"),
    )
    for tool, case, color, style in flat:
        for r in main:
            if r.tool == tool and r.case == case:
                ax.axhline(r.mib_s, color=color, linestyle=style, label=f"{tool} {case}, {big}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([_BYTES[bs] for bs in BS_SWEEP], list(BS_SWEEP))
    ax.set_xlabel("bs")
    ax.set_ylabel("MiB/s (median, log scale)")
    ax.set_title("Random raw → raw: throughput against bs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
