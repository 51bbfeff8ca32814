"""What ``imdsd demo`` shows: colours, and one timeline line per step, change and event.

Pure presentation (no processes, no sockets): :class:`Timeline` turns scenario steps, change
frames and the daemon's JSON log events into lines; :mod:`imdsd.demo` runs the processes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import msgspec

from imdsd.emulator.scenario import Step
from imdsd.frames import KINDS, Change, ChangeFrame, StateFrame

# --------------------------------------------------------------------------- colours

_STYLES: Final = {
    "dim": "2",
    "bold": "1",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}
_KIND_STYLE: Final = {
    "tags": "cyan",
    "disks": "magenta",
    "network": "blue",
    "scheduled_events": "yellow",
    "compute": "green",
    "loadbalancer": "blue",
}
_OP_STYLE: Final = {
    "added": "green",
    "attached": "green",
    "removed": "red",
    "detached": "red",
    "modified": "yellow",
}
_STATE_STYLE: Final = {"ok": "green", "degraded": "yellow", "stale": "red", "starting": "dim"}


def use_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """ANSI colours only on a TTY, and not when ``NO_COLOR`` is set or ``TERM`` is dumb."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except ValueError:  # closed stream
        return False


@dataclass(frozen=True)
class Palette:
    """Paints text with ANSI styles, or leaves it alone when colour is off."""

    enabled: bool

    def __call__(self, text: str, style: str | None) -> str:
        if not self.enabled or style is None:
            return text
        return f"\x1b[{_STYLES[style]}m{text}\x1b[0m"


# --------------------------------------------------------------------------- timeline


def format_offset(seconds: float) -> str:
    """``+12.3s``, right-aligned so timeline columns line up."""
    return f"+{max(0.0, seconds):.1f}s".rjust(7)


def _short(value: Any, width: int = 48) -> str:
    if isinstance(value, str) and value:
        text = value
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "..."


def short_key(key: str, width: int = 20) -> str:
    """``key`` cut to ``width`` characters (long EventIds keep their first 8)."""
    return key if len(key) <= width else key[:8] + "..."


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _leaves(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _lookup(value: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _nic_ip(nic: Any) -> str:
    ip = _lookup(nic, "ipv4.ipAddress.0.privateIpAddress")
    return ip if isinstance(ip, str) else ""


def _disk_text(disk: Any) -> str:
    if not isinstance(disk, dict):
        return _short(disk)
    size = disk.get("diskSizeGB")
    name = disk.get("name")
    parts = [f"{name}" if name else "", f"{size} GB" if size not in (None, "") else ""]
    return ", ".join(p for p in parts if p)


def _event_text(event: Any) -> str:
    if not isinstance(event, dict):
        return _short(event)
    text = f"{event.get('EventType', '?')} {event.get('EventStatus', '?')}"
    not_before = event.get("NotBefore")
    return f"{text}, not before {not_before}" if not_before else text


def change_detail(change: Change) -> str:
    """A short, human description of one change's values."""
    old, new = change.old, change.new
    if change.op == "modified":
        if change.kind in ("tags", "compute"):
            return f"{_short(old, 24)} -> {_short(new, 24)}"
        fields = change.fields or []
        parts = [
            f"{f} {_short(_lookup(old, f), 20)} -> {_short(_lookup(new, f), 20)}"
            for f in fields[:2]
        ]
        if len(fields) > 2:
            parts.append(f"+{len(fields) - 2} more")
        return "; ".join(parts)
    value = new if change.op in ("added", "attached") else old
    prefix = "" if value is new else "was "
    match change.kind:
        case "tags":
            return f"{prefix}{_short(value, 40)}"
        case "disks":
            return f"{prefix}{_disk_text(value)}"
        case "network":
            return f"{prefix}{_nic_ip(value)}"
        case "scheduled_events":
            return f"{prefix}{_event_text(value)}"
    return f"{prefix}{_short(value)}"


def describe_step(step: Step) -> str:
    """What a scenario step does, in words."""
    p = step.params
    match step.action:
        case "set_tag":
            return f"set tag {p['name']}={p['value']}"
        case "remove_tag":
            return f"remove tag {p['name']}"
        case "attach_disk":
            name = f", {p['name']}" if p.get("name") else ""
            return f"attach data disk lun {p['lun']} ({p['size_gb']} GB{name})"
        case "detach_disk":
            return f"detach data disk lun {p['lun']}"
        case "resize_disk":
            return f"resize data disk lun {p['lun']} to {p['size_gb']} GB"
        case "add_nic":
            return f"add NIC {p['mac']} ({p['private_ip']})"
        case "remove_nic":
            return f"remove NIC {p['mac']}"
        case "reorder_nics":
            return "reorder the NICs (not a change: nothing should be reported)"
        case "add_event":
            return f"announce scheduled event {p['type']} {p['id']}"
        case "start_event":
            return f"start scheduled event {p['id']}"
        case "remove_event":
            return f"finish scheduled event {p['id']} (it leaves the list)"
        case "patch_instance":
            edits = [f"{path} = {_short(value, 32)}" for path, value in _leaves(p)]
            return "patch the instance: " + ", ".join(edits)
        case "fault" if "status" in p:
            count = p.get("count", 1)
            return f"throttling burst: the next {count} IMDS requests get HTTP {p['status']}"
    return f"{step.action} {_short(p, 60)}"


def parse_log_line(line: bytes) -> dict[str, Any] | None:
    """A JSON log event of the daemon, or None when the line is not one."""
    try:
        event = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


def inventory(state: Mapping[str, Any]) -> str:
    """``2 tags, 1 data disk, 1 NIC, 0 scheduled events`` of a ``/v1/state`` document."""
    compute = _lookup(state, "instance.compute") or {}
    tags = compute.get("tagsList") if isinstance(compute, dict) else None
    disks = _lookup(compute, "storageProfile.dataDisks")
    nics = _lookup(state, "instance.network.interface")
    events = _lookup(state, "scheduled_events.Events")

    def count(items: Any, noun: str) -> str:
        n = len(items) if isinstance(items, list) else 0
        return f"{n} {noun}{'' if n == 1 else 's'}"

    return ", ".join(
        [
            count(tags, "tag"),
            count(disks, "data disk"),
            count(nics, "NIC"),
            count(events, "scheduled event"),
        ]
    )


@dataclass
class Tally:
    """What the timeline saw, for the summary."""

    changes: Counter[str] = field(default_factory=Counter)
    revisions: set[int] = field(default_factory=set)
    revision: int = 0
    hook_ok: int = 0
    hook_failed: int = 0
    health_drops: int = 0


class Timeline:
    """Turns scenario steps, change frames and daemon log events into timeline lines."""

    def __init__(self, paint: Palette) -> None:
        self.paint = paint
        self.tally = Tally()

    def _line(self, offset: float, label: str, text: str, style: str | None = None) -> str:
        p = self.paint
        return f"{p(format_offset(offset), 'dim')}  {p(label.ljust(9), style)} {text}"

    def note(self, offset: float, label: str, text: str, style: str | None = None) -> str:
        """A free-form line (daemon started, ready, stopping...)."""
        return self._line(offset, label, text, style)

    def step(self, offset: float, step: Step) -> str:
        """The line of a scenario step applied to the emulator."""
        return self._line(offset, "scenario", self.paint(describe_step(step), "dim"), "dim")

    def state(self, offset: float, frame: StateFrame) -> str:
        """The line of the first state frame: what the daemon knows at the start."""
        self.tally.revision = max(self.tally.revision, frame.revision)
        return self._line(
            offset,
            "daemon",
            f"ready at revision {frame.revision}: {inventory(frame.state)}",
            "bold",
        )

    def changes(self, offset: float, frame: ChangeFrame) -> list[str]:
        """One line per change of ``frame``."""
        tally, p = self.tally, self.paint
        tally.revision = max(tally.revision, frame.revision)
        tally.revisions.add(frame.revision)
        lines = []
        for change in frame.changes:
            tally.changes[change.kind] += 1
            text = (
                f"{p(change.kind.ljust(16), _KIND_STYLE.get(change.kind))} "
                f"{p(change.op.ljust(8), _OP_STYLE.get(change.op))} "
                f"{short_key(change.key).ljust(16)} {change_detail(change)}"
            )
            lines.append(self._line(offset, f"rev {frame.revision}", text, "bold"))
        return lines

    def log_event(self, offset: float, event: Mapping[str, Any]) -> str | None:
        """The line for a daemon log event worth showing, else None."""
        name, level = event["event"], event.get("level")
        p = self.paint
        if name == "hook finished":
            self.tally.hook_ok += 1
            output = event.get("output", "")
            text = f"{event.get('hook')} {p('ok', 'green')} in {event.get('duration')}s"
            return self._line(offset, "hook", f"{text}: {output}" if output else text, "green")
        if name in ("hook failed", "hook gave up"):
            self.tally.hook_failed += 1
            why = event.get("error") or f"exit code {event.get('exit_code')}"
            text = f"{event.get('hook')} {p(name.removeprefix('hook '), 'red')}: {why}"
            return self._line(offset, "hook", text, "red")
        if name == "upstream state changed":
            old, new = event.get("old"), event.get("new")
            if old == "starting" and new == "ok":
                return None
            if old in ("ok", "starting") and new in ("degraded", "stale"):
                self.tally.health_drops += 1
            error = event.get("error")
            text = f"{event.get('endpoint')} {old} -> {p(str(new), _STATE_STYLE.get(str(new)))}" + (
                f": {error}" if error else ""
            )
            return self._line(offset, "upstream", text, _STATE_STYLE.get(str(new)))
        if name == "stopped":
            hooks = "hooks done" if event.get("hooks_clean") else "hooks killed"
            saved = "state saved" if event.get("state_saved") else "state NOT saved"
            return self._line(offset, "daemon", f"stopped: {hooks}, {saved}", "bold")
        if level in ("warning", "error", "critical"):
            extra = {k: v for k, v in event.items() if k not in ("timestamp", "level", "event")}
            text = f"{level}: {name}" + (f" {_short(extra, 80)}" if extra else "")
            return self._line(offset, "daemon", text, "red" if level != "warning" else "yellow")
        return None

    def summary(
        self, elapsed: float, stats: Mapping[str, Any], hook_log_lines: int, daemon_exit: str
    ) -> list[str]:
        """The closing summary lines."""
        tally, p = self.tally, self.paint
        by_kind = ", ".join(f"{k} {tally.changes[k]}" for k in KINDS if tally.changes[k])
        total = sum(tally.changes.values())
        by_status = stats.get("by_status", {})
        throttled = by_status.get("429", 0)
        return [
            p(f"summary after {elapsed:.1f}s", "bold"),
            f"  changes   {total} in {len(tally.revisions)} revisions"
            + (f": {by_kind}" if by_kind else ""),
            f"  hooks     {tally.hook_ok + tally.hook_failed} runs: {tally.hook_ok} ok, "
            f"{tally.hook_failed} failed ({hook_log_lines} lines in the hook's log)",
            f"  upstream  {stats.get('total', 0)} requests to the emulator, {throttled} answered "
            f"429, peak {stats.get('peak_rps', 0)} req/s (IMDS allows 5); "
            f"health dropped below ok {tally.health_drops} times",
            f"  revision  {tally.revision}",
            f"  daemon    {daemon_exit}",
        ]
