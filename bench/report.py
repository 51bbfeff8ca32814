"""Output of the benchmark: the table, the goals, the RESULT line, RESULTS.md and a chart."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# key -> (printed format, goal description, check)
GOALS: dict[str, tuple[str, Callable[[Mapping[str, float]], bool]]] = {
    "query_vs_bare": (">= 0.9", lambda f: f["query_vs_bare"] >= 0.9),
    "fanout_p99_ms": ("<= 50", lambda f: f["fanout_p99_ms"] <= 50),
    "via_imdsd_429": (
        "== 0 while direct_429 > 0",
        lambda f: f["via_imdsd_429"] == 0 and f["direct_429"] > 0,
    ),
    "idle_cpu_pct": ("<= 0.5", lambda f: f["idle_cpu_pct"] <= 0.5),
    "rss_mb_1000_watchers": ("<= 60", lambda f: f["rss_mb_1000_watchers"] <= 60),
    "change_to_hook_ms": ("<= 100", lambda f: f["change_to_hook_ms"] <= 100),
    "front_upstream_429": (
        "== 0 while front_direct_429 > 0",
        lambda f: f["front_upstream_429"] == 0 and f["front_direct_429"] > 0,
    ),
}

RESULT_KEYS = (
    "query_rps",
    "bare_h11_rps",
    "query_vs_bare",
    "nginx_rps",
    "query_vs_nginx",
    "query_p99_ms",
    "fanout_p50_ms",
    "fanout_p99_ms",
    "direct_429",
    "via_imdsd_429",
    "upstream_rps_via_imdsd",
    "idle_cpu_pct",
    "rss_mb_idle",
    "rss_mb_1000_watchers",
    "change_to_hook_ms",
    "front_upstream_429",
    "front_direct_429",
    "front_cached_p50_ms",
    "front_cached_p99_ms",
    "front_identity_in_time_pct",
    "front_cpu_us_per_request",
)
# the front keys only when the (root-only) front phase ran
OPTIONAL_KEYS = frozenset(
    {"nginx_rps", "query_vs_nginx", *(k for k in RESULT_KEYS if k.startswith("front_"))}
)
_DECIMALS = {
    "query_rps": 0,
    "bare_h11_rps": 0,
    "nginx_rps": 0,
    "query_vs_bare": 3,
    "query_vs_nginx": 3,
    "direct_429": 0,
    "via_imdsd_429": 0,
    "upstream_rps_via_imdsd": 2,
    "idle_cpu_pct": 2,
    "rss_mb_idle": 1,
    "rss_mb_1000_watchers": 1,
    "front_upstream_429": 0,
    "front_direct_429": 0,
    "front_identity_in_time_pct": 1,
    "front_cpu_us_per_request": 0,
}


def fmt(key: str, value: float) -> str:
    """A figure as printed in the table and the RESULT line."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    decimals = _DECIMALS.get(key, 2)
    if decimals == 0:
        return str(round(value))
    return f"{value:.{decimals}f}"


@dataclass
class Report:
    """Figures (RESULT keys), table rows per section, notes, chart series."""

    figures: dict[str, float] = field(default_factory=dict)
    sections: list[tuple[str, list[tuple[str, str, str]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def section(self, title: str) -> list[tuple[str, str, str]]:
        """A new table section; append (what, value, detail) rows to it."""
        rows: list[tuple[str, str, str]] = []
        self.sections.append((title, rows))
        return rows

    def verdict(self, key: str) -> str:
        """PASS, FAIL or n/a for a goal key."""
        if key not in GOALS:
            return ""
        try:
            return "PASS" if GOALS[key][1](self.figures) else "FAIL"
        except (KeyError, TypeError):
            return "n/a"

    def goal_rows(self) -> list[tuple[str, str, str, str]]:
        """(key, value, goal, verdict) for every goal."""
        return [
            (key, fmt(key, self.figures.get(key, math.nan)), goal, self.verdict(key))
            for key, (goal, _check) in GOALS.items()
        ]

    def result_line(self) -> str:
        """``RESULT key=value ...`` (optional nginx keys only when measured)."""
        parts = []
        for key in RESULT_KEYS:
            if key in OPTIONAL_KEYS and key not in self.figures:
                continue
            parts.append(f"{key}={fmt(key, self.figures.get(key, math.nan))}")
        return "RESULT " + " ".join(parts)

    def text(self) -> str:
        """The readable table for the terminal."""
        lines: list[str] = []
        for title, rows in self.sections:
            lines.append(f"\n== {title}")
            width = max((len(r[0]) for r in rows), default=10)
            for what, value, detail in rows:
                lines.append(f"  {what:<{width}}  {value:>12}  {detail}")
        lines.append("\n== Goals")
        for key, value, goal, verdict in self.goal_rows():
            lines.append(f"  {key:<22} {value:>10}  goal {goal:<26} {verdict}")
        if self.notes:
            lines.append("\n== Notes")
            lines.extend(f"  - {note}" for note in self.notes)
        return "\n".join(lines)

    def markdown(self, machine: Mapping[str, str], header: Sequence[str], chart: str | None) -> str:
        """RESULTS.md."""
        out = ["# imdsd benchmark results", ""]
        out.extend(header)
        out += ["", "## Machine", "", "| | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in machine.items()]
        out += ["", "## Goals", "", "| figure | value | goal | verdict |", "|---|---:|---|---|"]
        out += [f"| `{k}` | {v} | {g} | **{r}** |" for k, v, g, r in self.goal_rows()]
        for title, rows in self.sections:
            out += ["", f"## {title}", "", "| what | value | detail |", "|---|---:|---|"]
            out += [f"| {w} | {v} | {d} |" for w, v, d in rows]
        if self.notes:
            out += ["", "## Notes", ""]
            out += [f"- {note}" for note in self.notes]
        if chart:
            out += ["", "## Latency distributions", "", f"![latency distributions]({chart})"]
        out += ["", "## RESULT line", "", "```", self.result_line(), "```", ""]
        return "\n".join(out)


def write_chart(series: Mapping[str, Sequence[float]], path: str) -> bool:
    """A PNG of the latency distributions (CDFs) if matplotlib is importable; True if written."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return False
    groups = [
        ("query latency (16 connections)", [k for k in series if k.startswith("query ")]),
        ("change -> watcher (1000 watchers)", [k for k in series if k.startswith("fanout")]),
        ("change -> hook start", [k for k in series if k.startswith("hook")]),
    ]
    groups = [(title, keys) for title, keys in groups if keys]
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], groups, strict=True):
        for key in keys:
            values = sorted(series[key])
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.plot(values, ys, label=key.split(" ", 1)[-1] if " " in key else key)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction")
        if title.startswith("query"):
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
