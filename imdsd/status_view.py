"""``imdsd status`` on a terminal: the ``/v1/health`` document as a summary read at a glance.

One line each for the daemon (status, revision, last change), the budget, the state on disk
and the clients; one line per upstream endpoint and per hook; the busiest callers of the IMDS
front when there are any. Pure formatting: :func:`render_status` takes the document and the
current time and returns text (with ANSI colours when asked), so it is tested without a
daemon. Missing or odd fields are shown as ``-`` rather than failing. Every string of the
document (command names of the front's callers, hook names, errors from hooks and IMDS) is
shown with its non-printable characters escaped (:func:`imdsd.printable.printable`), so none
of them can drive the reader's terminal; the only escape sequences are the colours added here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from imdsd.printable import printable

GOOD = frozenset({"ok"})
WARN = frozenset({"degraded", "starting", "absent", "running"})
PLAIN = frozenset({"idle"})
_COLOURS = {"good": "32", "warn": "33", "bad": "31", "dim": "2", "bold": "1"}
CALLERS_SHOWN = 5


class _Style:
    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def paint(self, text: str, style: str) -> str:
        if not self.colour:
            return text
        return f"\033[{_COLOURS[style]}m{text}\033[0m"

    def state(self, word: str) -> str:
        if word in PLAIN:
            return word
        kind = "good" if word in GOOD else "warn" if word in WARN else "bad"
        return self.paint(word, kind)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def ago(value: Any, now: datetime) -> str:
    """``"12s ago"``, ``"3m ago"``, ``"2h ago"``, ``"4d ago"`` for an RFC 3339 time; else ``-``."""
    at = _parse_time(value) if not isinstance(value, int | float) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        at = datetime.fromtimestamp(value, UTC)
    if at is None:
        return "-"
    seconds = max(0, int((now - at).total_seconds()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    return f"{value:.3g}s" if value < 60 or value % 60 else f"{value / 60:g}m"


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list) else []


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows with the columns padded to line up (ANSI codes do not count as width)."""
    if not rows:
        return []
    plain = [[_strip(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in plain if i < len(r)) for i in range(max(map(len, rows)))]
    lines = []
    for row, bare in zip(rows, plain, strict=True):
        cells = [c + " " * (widths[i] - len(bare[i])) for i, c in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _strip(text: str) -> str:
    out, skipping = [], False
    for char in text:
        if char == "\033":
            skipping = True
        elif skipping and char == "m":
            skipping = False
        elif not skipping:
            out.append(char)
    return "".join(out)


def _headline(doc: Mapping[str, Any], s: _Style, now: datetime) -> list[str]:
    status = str(doc.get("status", "unknown"))
    line = f"{s.paint('imdsd', 'bold')} {doc.get('version', '')}".rstrip()
    line += f"  {s.state(status)}  revision {doc.get('revision', '-')}"
    if doc.get("oldest") is not None:
        line += s.paint(f" (history from {doc['oldest']})", "dim")
    lines = [line]
    if doc.get("reason"):
        lines.append(f"  {s.paint(str(doc['reason']), 'warn')}")
    change = _dict(doc.get("last_change"))
    if change:
        kinds = ", ".join(str(k) for k in _list(change.get("kinds"))) or "-"
        lines.append(
            f"last change  r{change.get('revision', '?')} {ago(change.get('at'), now)}: {kinds}"
        )
    else:
        lines.append("last change  - (none since start)")
    return lines


def _upstream(doc: Mapping[str, Any], s: _Style, now: datetime) -> list[str]:
    upstream = _dict(doc.get("upstream"))
    versions = _dict(doc.get("api_version"))
    rows = []
    for name, raw in upstream.items():
        info = _dict(raw)
        state = str(info.get("state", "?"))
        if info.get("absent"):
            state = "absent" if state == "ok" else state
        row = [
            str(name),
            s.state(state),
            f"good {ago(info.get('last_success'), now)}",
            f"every {_seconds(info.get('interval'))}",
            f"api {versions.get(name, '-')}",
        ]
        counts = _dict(info.get("failures"))
        seen = ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, int) and v)
        row.append(s.paint(f"failures: {seen}", "dim") if seen else "")
        failing = info.get("consecutive_failures") or 0
        if failing:
            error = str(info.get("last_error") or "?")
            row.append(s.paint(f"{failing} failing in a row: {error}", "bad"))
        rows.append(row)
    return ["upstream", *_table(rows)] if rows else ["upstream  - (not polling)"]


def _budget(doc: Mapping[str, Any], s: _Style) -> str:
    budget = _dict(doc.get("budget"))
    rate, used = budget.get("rate"), budget.get("in_use")
    if not isinstance(rate, int | float) or not isinstance(used, int | float) or rate <= 0:
        return "budget       -"
    share = min(used / rate, 1.0)
    bar = "#" * round(share * 10) + "." * (10 - round(share * 10))
    painted = s.paint(bar, "bad" if share >= 1 else "warn" if share >= 0.8 else "good")
    line = f"budget       [{painted}] {used:g} of {rate:g} req/s in use"
    line += f", {budget.get('waiting', 0)} waiting"
    if doc.get("requests_sent") is not None:
        line += f", {doc['requests_sent']} requests sent"
    return line


def _state(doc: Mapping[str, Any], s: _Style, now: datetime) -> str:
    save = _dict(doc.get("state_save"))
    failures = save.get("failures", doc.get("state_save_failures", 0)) or 0
    if save and not save.get("ok", True):
        unsaved = save.get("unsaved_revisions")
        text = f"NOT SAVED: {save.get('last_error') or '?'} ({failures} failures"
        text += f", {unsaved} revisions unsaved)" if unsaved else ")"
        return f"state        {s.paint(text, 'bad')}"
    saved = f"saved {ago(save['last_saved_at'], now)}" if save.get("last_saved_at") else "ok"
    return f"state        {saved}" + (f", {failures} failures so far" if failures else "")


def _hooks(doc: Mapping[str, Any], s: _Style, now: datetime) -> list[str]:
    hooks = doc.get("hooks")
    records = list(hooks.values()) if isinstance(hooks, Mapping) else _list(hooks)
    rows = []
    for raw in records:
        hook = _dict(raw)
        last = _dict(hook.get("last_run"))
        result = "running" if hook.get("running") else str(last.get("result") or "idle")
        row = [str(hook.get("name", "?")), s.state(result)]
        if last:
            exit_code = last.get("exit_code")
            row.append(
                f"{ago(last.get('at'), now)}, exit {'-' if exit_code is None else exit_code},"
                f" {_seconds(last.get('duration'))}"
            )
        else:
            row.append("never run")
        row.append(f"delivered r{hook.get('delivered_revision', '?')}")
        extra = []
        if hook.get("pending_revisions"):
            extra.append(f"{hook['pending_revisions']} pending")
        if hook.get("retry_in") is not None:
            failed = hook.get("failures", 0)
            extra.append(f"retry in {_seconds(hook['retry_in'])} ({failed} failed)")
        if extra:
            row.append(s.paint(", ".join(extra), "warn"))
        rows.append(row)
    return ["hooks", *_table(rows)] if rows else ["hooks        - (none configured)"]


def _callers(doc: Mapping[str, Any]) -> list[str]:
    rows = []
    for raw in _list(doc.get("callers"))[:CALLERS_SHOWN]:
        caller = _dict(raw)
        pid = caller.get("pid")
        rows.append(
            [
                f"uid {caller.get('uid', '?')}",
                f"pid {'-' if pid is None else pid}",
                str(caller.get("command") or "?"),
                f"{caller.get('requests', 0)} requests",
                f"{caller.get('cached', 0)} cached, {caller.get('forwarded', 0)} forwarded,"
                f" {caller.get('queued', 0)} queued, {caller.get('refused', 0)} refused",
            ]
        )
    return ["top callers (IMDS front)", *_table(rows)] if rows else []


def _printable(value: Any) -> Any:
    """``value`` with every string in it (keys too) made :func:`printable`."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, Mapping):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(item) for item in value]
    return value


def render_status(doc: Mapping[str, Any], now: datetime, *, colour: bool = False) -> str:
    """The status summary for a terminal; ``now`` is the wall clock (aware)."""
    doc = _printable(doc)
    s = _Style(colour)
    lines = _headline(doc, s, now)
    lines += _upstream(doc, s, now)
    lines.append(_budget(doc, s))
    lines.append(_state(doc, s, now))
    lines.append(
        f"clients      {doc.get('watchers', 0)} watchers, {doc.get('connections', 0)} connections"
    )
    lines += _hooks(doc, s, now)
    lines += _callers(doc)
    return "\n".join(lines) + "\n"
