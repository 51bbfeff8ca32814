"""``imdsd demo [--duration S]``: emulator + daemon + an example hook, narrated.

In a fresh temporary directory the demo starts the IMDS emulator in-process (ephemeral port),
writes a daemon configuration and an example hook script, and starts ``imdsd run`` as a
subprocess (its own session, so a Ctrl-C reaches only the demo; its log goes to
``daemon.log``). Once the daemon is ready it plays the scenario shipped in the package
(``imdsd/emulator/data/demo-scenario.toml``), step by step against the emulator, and prints
one timeline line per scenario step, per change seen on the watch stream, per hook run and per
upstream health change (the throttling burst shows up there). With ``--duration`` the
scenario's timeline is compressed (up to 4x) so that all of it fits. At the end (``--duration``
elapsed, or SIGINT/SIGTERM) it stops the daemon with SIGTERM, prints a summary and removes the
directory. Exit codes: 0 success, 1 when the daemon failed (or the emulator could not start),
2 for a bad ``--duration``.

Scenario times count from the moment the daemon is ready rather than from the emulator's
start, so the daemon's start-up time never swallows the first steps into its first snapshot.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Final, TextIO

import msgspec
import trio

from imdsd.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from imdsd.client import AsyncClient, ImdsdError
from imdsd.emulator.faults import FaultError
from imdsd.emulator.scenario import Scenario, ScenarioError, Step, apply_action, demo_scenario
from imdsd.emulator.scenario import dry_run as dry_run_scenario
from imdsd.emulator.server import Emulator, EmulatorConfig
from imdsd.emulator.state import StateError
from imdsd.frames import KINDS, Change, ChangeFrame, StateFrame
from imdsd.logs import configure_logging

HOOK_NAME: Final = "demo-hook"
MAX_SPEED: Final = 4.0
TAIL: Final = 3.0  # seconds kept after the last step for its change and hook run to show up
READY_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
SOCKET_PATH_MAX: Final = 100
_UNSET_ENV: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "IMDSD_SOCKET",
)

HOOK_SCRIPT: Final = '''\
"""imdsd demo hook: append a one-line summary of the change frame on stdin to a log file."""

import json
import os
import sys

frame = json.load(sys.stdin)
changes = "; ".join(f"{c['kind']} {c['op']} {c['key']}" for c in frame["changes"])
revision = os.environ.get("IMDSD_REVISION", "?")
line = f"revision {revision} [{os.environ.get('IMDSD_KINDS', '')}]: {changes}"
with open(sys.argv[1], "a", encoding="utf-8") as log:
    log.write(line + "\\n")
print(line)
'''

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


# --------------------------------------------------------------------------- pure helpers


def validate_duration(value: float | None) -> str | None:
    """The problem with ``--duration`` (None when it is fine: absent, or finite and > 0)."""
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        return f"--duration must be a number of seconds > 0, got {value!r}"
    return None


def speed_for(scenario_length: float, remaining: float | None) -> float:
    """How much to compress the scenario so it ends within ``remaining`` seconds.

    1 without a time limit or when it fits; at most :data:`MAX_SPEED`.
    """
    if remaining is None or scenario_length <= 0:
        return 1.0
    if remaining <= 0:
        return MAX_SPEED
    return min(MAX_SPEED, max(1.0, scenario_length / remaining))


def scaled(scenario: Scenario, speed: float) -> Scenario:
    """``scenario`` with every step's ``at`` divided by ``speed``."""
    if speed == 1.0:
        return scenario
    steps = tuple(replace(step, at=step.at / speed) for step in scenario.steps)
    return replace(scenario, steps=steps)


def _toml(value: str | list[str]) -> str:
    """A TOML string or array of strings (JSON escapes are valid TOML basic-string escapes)."""
    return json.dumps(value)


def daemon_config_text(endpoint: str, workdir: str, hook_command: list[str]) -> str:
    """The daemon configuration of the demo: lively polling, everything inside ``workdir``."""
    return f"""\
# Written by `imdsd demo`.
[imds]
endpoint = {_toml(endpoint)}

[poll]
instance = "1s"
scheduled_events = "1s"
loadbalancer = "60s"

[server]
socket = {_toml(os.path.join(workdir, "imdsd.sock"))}
socket_group = ""
heartbeat = "5s"

[state]
directory = {_toml(os.path.join(workdir, "state"))}

[hooks]
directory = {_toml(os.path.join(workdir, "hooks.d"))}

[[hook]]
name = {_toml(HOOK_NAME)}
on = {_toml(list(KINDS))}
command = {_toml(hook_command)}
timeout = "10s"
debounce = "0s"
retries = 1

[log]
level = "info"
format = "json"
"""


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


# --------------------------------------------------------------------------- the trio shell


@dataclass
class Workspace:
    """The files of one demo run inside its temporary directory."""

    root: str

    @property
    def socket(self) -> str:
        """The daemon's socket."""
        return os.path.join(self.root, "imdsd.sock")

    @property
    def config(self) -> str:
        """The daemon's configuration file."""
        return os.path.join(self.root, "imdsd.toml")

    @property
    def hook(self) -> str:
        """The example hook script."""
        return os.path.join(self.root, "demo-hook.py")

    @property
    def hook_log(self) -> str:
        """Where the example hook appends its summaries."""
        return os.path.join(self.root, "demo-hook.log")

    @property
    def daemon_log(self) -> str:
        """The daemon's captured stdout and stderr."""
        return os.path.join(self.root, "daemon.log")

    def write(self, endpoint: str) -> None:
        """Write the hook script and the daemon configuration, create the directories."""
        os.makedirs(os.path.join(self.root, "state"), exist_ok=True)
        os.makedirs(os.path.join(self.root, "hooks.d"), exist_ok=True)
        Path(self.hook).write_text(HOOK_SCRIPT, encoding="utf-8")
        command = [sys.executable, self.hook, self.hook_log]
        Path(self.config).write_text(
            daemon_config_text(endpoint, self.root, command), encoding="utf-8"
        )

    def hook_log_lines(self) -> int:
        """How many runs the hook logged."""
        try:
            return len(Path(self.hook_log).read_text(encoding="utf-8").splitlines())
        except OSError:
            return 0


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    """A fresh temporary directory (short enough for a unix socket path), removed at the end."""
    root = tempfile.mkdtemp(prefix="imdsd-demo-")
    if len(os.path.join(root, "imdsd.sock")) > SOCKET_PATH_MAX:
        os.rmdir(root)
        root = tempfile.mkdtemp(prefix="imdsd-demo-", dir="/tmp")
    try:
        yield Workspace(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def daemon_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment: no systemd hand-over variables, imdsd importable."""
    env = {k: v for k, v in environ.items() if k not in _UNSET_ENV}
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class Demo:
    """One run of the demo: emulator, daemon process, watch stream and timeline."""

    def __init__(
        self, ws: Workspace, duration: float | None, out: TextIO, daemon_log: BinaryIO
    ) -> None:
        self.ws = ws
        self.daemon_log = daemon_log
        self.duration = duration
        self.out = out
        self.timeline = Timeline(Palette(use_colour(out, os.environ)))
        self.scenario = demo_scenario()
        self.emulator = Emulator(EmulatorConfig(port=0))
        dry_run_scenario(self.scenario, self.emulator.state)
        self.t0 = 0.0
        self.proc: trio.Process | None = None
        self.state_seen = trio.Event()
        self.out_closed = False

    def now(self) -> float:
        """Seconds since the demo started."""
        return trio.current_time() - self.t0

    def emit(self, line: str | None) -> None:
        """Print one timeline line (output is dropped once the reader went away)."""
        if line is None or self.out_closed:
            return
        try:
            print(line, file=self.out, flush=True)
        except BrokenPipeError:
            self.out_closed = True
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())

    async def run(self) -> int:
        """Run the whole demo; returns the exit code."""
        self.t0 = trio.current_time()
        failure: str | None = None
        stats: dict[str, Any] = {}
        exit_text, stopped_ok = "was not started", False
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                host, port = await nursery.start(self.emulator.serve)
                endpoint = f"http://{host}:{port}"
                self.ws.write(endpoint)
                self.emit(
                    f"imdsd demo in {self.ws.root}: emulator {endpoint}, "
                    f"daemon socket {self.ws.socket}"
                )
                self.proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "imdsd", "run", "-c", self.ws.config],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=daemon_env(os.environ),
                    start_new_session=True,
                )
                pumped = trio.Event()
                try:
                    self.emit(self.timeline.note(self.now(), "daemon", f"pid {self.proc.pid}"))
                    nursery.start_soon(self._pump_log, pumped)
                    failure = await self._main_phase(signals)
                    stats = self.emulator.state.stats.as_dict()
                finally:
                    with trio.CancelScope(shield=True):
                        exit_text, stopped_ok = await self._stop_daemon()
                        with trio.move_on_after(STOP_TIMEOUT):
                            await pumped.wait()
                nursery.cancel_scope.cancel()
        summary = self.timeline.summary(self.now(), stats, self.ws.hook_log_lines(), exit_text)
        self.emit("\n".join(summary))
        if failure is not None:
            self.emit(f"imdsd demo: the daemon failed: {failure}")
            self._show_log_tail()
        return EXIT_OK if failure is None and stopped_ok else EXIT_FAILURE

    async def _main_phase(self, signals: AsyncIterator[int]) -> str | None:
        """Wait for the daemon, play the scenario and show the timeline until the end.

        Returns what went wrong with the daemon, or None.
        """
        died: list[str] = []
        async with trio.open_nursery() as inner:

            async def until_end() -> None:
                left = math.inf if self.duration is None else self.duration - self.now()
                with trio.move_on_after(max(0.0, left)):
                    async for signum in signals:
                        self.emit(
                            self.timeline.note(
                                self.now(), "demo", f"{signal.Signals(signum).name}, finishing"
                            )
                        )
                        break
                inner.cancel_scope.cancel()

            async def daemon_exit() -> None:
                assert self.proc is not None
                code = await self.proc.wait()
                died.append(f"it exited with code {code}")
                inner.cancel_scope.cancel()

            inner.start_soon(until_end)
            inner.start_soon(daemon_exit)
            if not await self._wait_ready():
                died.append(f"it was not ready after {READY_TIMEOUT:g}s")
                inner.cancel_scope.cancel()
                return died[0]
            inner.start_soon(self._watch)
            await self.state_seen.wait()
            remaining = None if self.duration is None else self.duration - self.now() - TAIL
            speed = speed_for(self.scenario.duration, remaining)
            how = "" if speed == 1.0 else f", played at {speed:.1f}x to fit --duration"
            self.emit(
                self.timeline.note(
                    self.now(),
                    "scenario",
                    f"{self.scenario.name!r}: {len(self.scenario.steps)} steps over "
                    f"{self.scenario.duration:g}s{how}",
                    "dim",
                )
            )
            inner.start_soon(self._play, scaled(self.scenario, speed), trio.current_time())
        return died[0] if died else None

    async def _wait_ready(self) -> bool:
        """Wait until the daemon's health says it serves a snapshot; False after a timeout."""
        async with AsyncClient(self.ws.socket, timeout=2.0) as client:
            with trio.move_on_after(READY_TIMEOUT):
                while True:
                    try:
                        response = await client.request("GET", "/v1/health")
                    except ImdsdError:
                        response = None
                    if response is not None and response.status == 200:
                        return True
                    await trio.sleep(0.1)
        return False

    async def _watch(self) -> None:
        """Print the state frame, then one line per change of every change frame."""
        async with AsyncClient(self.ws.socket) as client:
            frames = client.watch(retry_delay=0.2)
            try:
                async for frame in frames:
                    if isinstance(frame, StateFrame):
                        if not self.state_seen.is_set():
                            self.emit(self.timeline.state(self.now(), frame))
                            self.state_seen.set()
                    elif isinstance(frame, ChangeFrame):
                        for line in self.timeline.changes(self.now(), frame):
                            self.emit(line)
            finally:
                await frames.aclose()

    async def _play(self, scenario: Scenario, start: float) -> None:
        """Apply each scenario step to the emulator at its time."""
        state = self.emulator.state
        for step in scenario.steps:
            await trio.sleep_until(start + step.at)
            try:
                apply_action(state, step.action, step.params, now_wall=self.emulator.now_wall())
            except (StateError, FaultError) as exc:
                text = f"{describe_step(step)}: failed: {exc}"
                self.emit(self.timeline.note(self.now(), "scenario", text, "red"))
                continue
            self.emit(self.timeline.step(self.now(), step))
        self.emit(self.timeline.note(self.now(), "scenario", "finished", "dim"))

    async def _pump_log(self, done: trio.Event) -> None:
        """Copy the daemon's output to ``daemon.log`` and show the interesting events."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        log_file = self.daemon_log
        pending = b""
        try:
            while chunk := await self.proc.stdout.receive_some(65536):
                log_file.write(chunk)
                log_file.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._log_line(line)
            if pending:
                self._log_line(pending)
        finally:
            done.set()

    def _log_line(self, line: bytes) -> None:
        if not line.strip():
            return
        event = parse_log_line(line)
        if event is None:
            text = line.decode("utf-8", "replace").rstrip()
            self.emit(self.timeline.note(self.now(), "daemon", text, "red"))
        else:
            self.emit(self.timeline.log_event(self.now(), event))

    async def _stop_daemon(self) -> tuple[str, bool]:
        """SIGTERM, wait; returns how it ended and whether that was a clean exit 0."""
        proc = self.proc
        assert proc is not None
        if proc.returncode is not None:
            return f"had already exited with code {proc.returncode}", False
        self.emit(self.timeline.note(self.now(), "daemon", "sending SIGTERM"))
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            code = await proc.wait()
            if code == 0:
                return "stopped with SIGTERM, exit 0", True
            return f"stopped with SIGTERM, exit code {code} (expected 0)", False
        proc.kill()
        await proc.wait()
        return f"did not stop within {STOP_TIMEOUT:g}s of SIGTERM; killed", False

    def _show_log_tail(self, lines: int = 20) -> None:
        try:
            tail = Path(self.ws.daemon_log).read_text("utf-8", "replace").splitlines()[-lines:]
        except OSError:
            return
        self.emit("last lines of the daemon log:")
        for line in tail:
            self.emit(f"  {line}")


def demo_command(args: argparse.Namespace) -> int:
    """``imdsd demo [--duration S]``: returns the exit code."""
    duration: float | None = args.duration
    problem = validate_duration(duration)
    if problem is not None:
        print(f"imdsd demo: {problem}", file=sys.stderr)
        return EXIT_USAGE
    with (
        workspace() as ws,
        open(os.path.join(ws.root, "emulator.log"), "w", encoding="utf-8") as emulator_log,
        open(ws.daemon_log, "wb") as daemon_log,
    ):
        configure_logging("info", "json", stream=emulator_log)
        try:
            demo = Demo(ws, duration, sys.stdout, daemon_log)
        except ScenarioError as exc:
            print(f"imdsd demo: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            return trio.run(demo.run)
        except OSError as exc:
            print(f"imdsd demo: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
