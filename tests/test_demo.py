"""Tests of ``imdsd demo`` (imdsd.demo): the pure helpers, the hook script, and real runs."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from imdsd import demo, demo_view, demo_workspace
from imdsd.config import parse_config
from imdsd.emulator.scenario import demo_scenario
from imdsd.frames import KINDS, Change, ChangeFrame, StateFrame

REPO = Path(__file__).parent.parent
EVENT_ID = "C7061BAC-AFDC-4513-B24B-AA5F13A16123"
PLAIN = demo_view.Palette(enabled=False)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# --------------------------------------------------------------------------- pure helpers


def test_use_colour_only_on_a_tty_without_no_color() -> None:
    assert demo_view.use_colour(_Tty(), {})
    assert not demo_view.use_colour(_Tty(), {"NO_COLOR": "1"})
    assert not demo_view.use_colour(_Tty(), {"TERM": "dumb"})
    assert demo_view.use_colour(_Tty(), {"NO_COLOR": ""})  # empty means unset (no-color.org)
    assert not demo_view.use_colour(io.StringIO(), {})


def test_palette() -> None:
    assert demo_view.Palette(enabled=True)("ok", "green") == "\x1b[32mok\x1b[0m"
    assert demo_view.Palette(enabled=True)("ok", None) == "ok"
    assert PLAIN("ok", "green") == "ok"


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_duration_is_a_usage_error(value: float, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.demo_command(argparse.Namespace(duration=value)) == 2
    err = capsys.readouterr().err
    assert err.startswith("imdsd demo: --duration must be a number of seconds > 0")
    assert err.count("\n") == 1


def test_validate_duration_accepts_none_and_positive() -> None:
    assert demo.validate_duration(None) is None
    assert demo.validate_duration(0.5) is None


@pytest.mark.parametrize(
    ("length", "remaining", "speed"),
    [(30.0, None, 1.0), (30.0, 40.0, 1.0), (30.0, 15.0, 2.0), (30.0, 1.0, 4.0), (30.0, -2.0, 4.0)],
)
def test_speed_for(length: float, remaining: float | None, speed: float) -> None:
    assert demo.speed_for(length, remaining) == speed


def test_scaled_divides_step_times() -> None:
    scenario = demo_scenario()
    fast = demo.scaled(scenario, 2.0)
    assert [s.at for s in fast.steps] == [s.at / 2 for s in scenario.steps]
    assert [s.action for s in fast.steps] == [s.action for s in scenario.steps]
    assert fast.duration == scenario.duration / 2
    assert demo.scaled(scenario, 1.0) is scenario


def test_daemon_config_is_valid_and_lively() -> None:
    text = demo_workspace.daemon_config_text(
        "http://127.0.0.1:4242", "/tmp/imdsd-demo-x", ["/usr/bin/python3", "/tmp/h.py", 'a"b']
    )
    cfg = parse_config(text, "demo.toml")
    assert cfg.imds.endpoint == "http://127.0.0.1:4242"
    assert cfg.poll.instance == 1.0
    assert cfg.poll.scheduled_events == 1.0
    assert cfg.server.socket == "/tmp/imdsd-demo-x/imdsd.sock"
    assert cfg.server.socket_group == ""
    assert cfg.state.directory == "/tmp/imdsd-demo-x/state"
    assert cfg.log.format == "json"
    [hook] = cfg.hook
    assert hook.name == demo_workspace.HOOK_NAME
    assert hook.command == ["/usr/bin/python3", "/tmp/h.py", 'a"b']
    assert sorted(hook.on) == sorted(KINDS)
    assert hook.debounce == 0.0


def test_every_step_of_the_shipped_scenario_has_a_description() -> None:
    scenario = demo_scenario()
    actions = {step.action for step in scenario.steps}
    assert {"set_tag", "remove_tag", "attach_disk", "resize_disk", "add_nic"} <= actions
    assert {"reorder_nics", "add_event", "start_event", "remove_event", "fault"} <= actions
    for step in scenario.steps:
        text = demo_view.describe_step(step)
        assert not text.startswith(step.action), text
    fault = next(s for s in scenario.steps if s.action == "fault")
    assert demo_view.describe_step(fault) == (
        "throttling burst: the next 6 IMDS requests get HTTP 429"
    )
    patch = next(s for s in scenario.steps if s.action == "patch_instance")
    assert demo_view.describe_step(patch) == "patch the instance: compute.vmSize = Standard_D4s_v5"


DISK = {"lun": "1", "name": "data-1", "diskSizeGB": "128", "diskCapacityBytes": "1"}
NIC = {"macAddress": "000D3A112233", "ipv4": {"ipAddress": [{"privateIpAddress": "10.0.0.9"}]}}
EVENT = {"EventId": EVENT_ID, "EventType": "Reboot", "EventStatus": "Scheduled", "NotBefore": ""}


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        (Change("tags", "added", "env", None, "staging"), "staging"),
        (Change("tags", "removed", "env", "prod", None), "was prod"),
        (Change("tags", "modified", "env", "a", "", ["value"]), 'a -> ""'),
        (Change("disks", "attached", "lun:1", None, DISK), "data-1, 128 GB"),
        (Change("disks", "detached", "lun:1", DISK, None), "was data-1, 128 GB"),
        (
            Change(
                "disks",
                "modified",
                "lun:1",
                DISK,
                {**DISK, "diskSizeGB": "256", "diskCapacityBytes": "2", "caching": "x"},
                ["caching", "diskCapacityBytes", "diskSizeGB"],
            ),
            "caching null -> x; diskCapacityBytes 1 -> 2; +1 more",
        ),
        (Change("network", "added", "mac:000D3A112233", None, NIC), "10.0.0.9"),
        (Change("scheduled_events", "added", EVENT_ID, None, EVENT), "Reboot Scheduled"),
        (
            Change(
                "scheduled_events",
                "modified",
                EVENT_ID,
                EVENT,
                {**EVENT, "EventStatus": "Started"},
                ["EventStatus"],
            ),
            "EventStatus Scheduled -> Started",
        ),
        (
            Change("compute", "modified", "vmSize", "A3", "D4s_v5", ["vmSize"]),
            "A3 -> D4s_v5",
        ),
        (Change("loadbalancer", "added", "frontend:1.2.3.4", None, {"a": 1}), '{"a":1}'),
    ],
)
def test_change_detail(change: Change, detail: str) -> None:
    assert demo_view.change_detail(change) == detail


def test_short_key_keeps_short_keys() -> None:
    assert demo_view.short_key("mac:000D3A112233") == "mac:000D3A112233"
    assert demo_view.short_key(EVENT_ID) == "C7061BAC..."


def test_parse_log_line() -> None:
    assert demo_view.parse_log_line(b'{"event": "ready", "level": "info"}') == {
        "event": "ready",
        "level": "info",
    }
    assert demo_view.parse_log_line(b"Traceback (most recent call last):") is None
    assert demo_view.parse_log_line(b"[1, 2]") is None
    assert demo_view.parse_log_line(b'{"level": "info"}') is None


def test_inventory() -> None:
    state: dict[str, Any] = {
        "instance": {
            "compute": {"tagsList": [{"name": "a"}], "storageProfile": {"dataDisks": []}},
            "network": {"interface": [{}, {}]},
        },
        "scheduled_events": {"Events": [{}]},
    }
    assert demo_view.inventory(state) == "1 tag, 0 data disks, 2 NICs, 1 scheduled event"
    assert demo_view.inventory({}) == "0 tags, 0 data disks, 0 NICs, 0 scheduled events"


def test_timeline_changes_and_state() -> None:
    timeline = demo_view.Timeline(PLAIN)
    assert "ready at revision 3" in timeline.state(1.0, StateFrame(3, {}))
    frame = ChangeFrame(
        7,
        "2024-01-01T00:00:00Z",
        [
            Change("tags", "added", "env", None, "x"),
            Change("disks", "attached", "lun:1", None, DISK),
        ],
    )
    lines = timeline.changes(2.25, frame)
    assert len(lines) == 2
    assert re.fullmatch(r" +\+2\.2s  rev 7 +tags +added +env +x", lines[0]), lines[0]
    assert re.search(r"disks +attached +lun:1 +data-1, 128 GB$", lines[1])
    assert timeline.tally.changes == {"tags": 1, "disks": 1}
    assert timeline.tally.revision == 7
    assert timeline.tally.revisions == {7}


def test_timeline_log_events() -> None:
    timeline = demo_view.Timeline(PLAIN)
    ok = timeline.log_event(
        1.0,
        {"event": "hook finished", "level": "info", "hook": "h", "duration": 0.05, "output": "hi"},
    )
    assert ok is not None
    assert ok.endswith("hook      h ok in 0.05s: hi")
    failed = timeline.log_event(
        2.0, {"event": "hook failed", "level": "warning", "hook": "h", "exit_code": 3}
    )
    assert failed is not None
    assert failed.endswith("h failed: exit code 3")
    assert timeline.log_event(3.0, {"event": "hook gave up", "level": "error", "hook": "h"})
    assert (timeline.tally.hook_ok, timeline.tally.hook_failed) == (1, 2)

    start = {"event": "upstream state changed", "endpoint": "instance", "old": "starting"}
    assert timeline.log_event(0.5, {**start, "new": "ok", "level": "info"}) is None
    throttled = timeline.log_event(
        4.0,
        {**start, "old": "ok", "new": "degraded", "level": "warning", "error": "HTTP 429: Too"},
    )
    assert throttled is not None
    assert throttled.endswith("upstream  instance ok -> degraded: HTTP 429: Too")
    assert timeline.log_event(5.0, {**start, "old": "degraded", "new": "stale"})
    assert timeline.tally.health_drops == 1

    assert timeline.log_event(6.0, {"event": "pollers starting", "level": "info"}) is None
    warning = timeline.log_event(6.0, {"event": "hook skipped", "level": "warning", "k": 1})
    assert warning is not None
    assert warning.endswith('daemon    warning: hook skipped {"k":1}')
    stopped = timeline.log_event(
        7.0, {"event": "stopped", "level": "info", "hooks_clean": True, "state_saved": True}
    )
    assert stopped is not None
    assert stopped.endswith("stopped: hooks done, state saved")


def test_summary() -> None:
    timeline = demo_view.Timeline(PLAIN)
    timeline.changes(1.0, ChangeFrame(2, "t", [Change("tags", "added", "a", None, "1")]))
    timeline.changes(2.0, ChangeFrame(3, "t", [Change("network", "added", "m", None, {})]))
    stats = {"total": 40, "by_status": {"200": 34, "429": 6}, "peak_rps": 3}
    lines = timeline.summary(20.04, stats, 0, "stopped with SIGTERM, exit 0")
    assert lines == [
        "summary after 20.0s",
        "  changes   2 in 2 revisions: tags 1, network 1",
        "  hooks     0 runs: 0 ok, 0 failed (0 lines in the hook's log)",
        "  upstream  40 requests to the emulator, 6 answered 429, peak 3 req/s (IMDS allows 5); "
        "health dropped below ok 0 times",
        "  revision  3",
        "  daemon    stopped with SIGTERM, exit 0",
    ]


def test_hook_script(tmp_path: Path) -> None:
    script = tmp_path / "hook.py"
    script.write_text(demo_workspace.HOOK_SCRIPT, encoding="utf-8")
    log = tmp_path / "hook.log"
    frame = {
        "type": "change",
        "revision": 5,
        "at": "2024-01-01T00:00:00Z",
        "changes": [
            {"kind": "tags", "op": "added", "key": "env", "old": None, "new": "x"},
            {"kind": "disks", "op": "attached", "key": "lun:1", "old": None, "new": {}},
        ],
    }
    env = {**os.environ, "IMDSD_REVISION": "5", "IMDSD_KINDS": "tags,disks"}
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(script), str(log)],
            input=json.dumps(frame),
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=True,
        )
        expected = "revision 5 [tags,disks]: tags added env; disks attached lun:1"
        assert done.stdout == expected + "\n"
    assert log.read_text(encoding="utf-8") == f"{expected}\n{expected}\n"


def test_workspace_is_removed_and_short(tmp_path: Path) -> None:
    with demo_workspace.workspace() as ws:
        ws.write("http://127.0.0.1:1")
        root = Path(ws.root)
        assert len(ws.socket) <= demo_workspace.SOCKET_PATH_MAX
        assert (root / "state").is_dir()
        assert (root / "hooks.d").is_dir()
        assert parse_config(Path(ws.config).read_text("utf-8"), ws.config).hook
        assert Path(ws.hook).read_text("utf-8") == demo_workspace.HOOK_SCRIPT
        assert ws.hook_log_lines() == 0
        Path(ws.hook_log).write_text("a\nb\n", encoding="utf-8")
        assert ws.hook_log_lines() == 2
    assert not root.exists()


def test_daemon_env() -> None:
    env = demo_workspace.daemon_env(
        {"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "LISTEN_FDS": "1", "PYTHONPATH": "/a"}
    )
    assert "NOTIFY_SOCKET" not in env
    assert "LISTEN_FDS" not in env
    assert env["PATH"] == "/bin"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO.resolve()), "/a"]


# --------------------------------------------------------------------------- runs


def test_a_daemon_that_dies_fails_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    out = io.StringIO()
    started = time.monotonic()
    with demo_workspace.workspace() as ws, open(ws.daemon_log, "wb") as log:
        code = trio.run(demo.Demo(ws, 10.0, out, log).run)
    assert time.monotonic() - started < 5  # it does not wait for --duration
    text = out.getvalue()
    assert code == 1
    assert "imdsd demo: the daemon failed: it exited with code 1" in text
    assert "daemon    had already exited with code 1" in text
    assert "summary after" in text


def _python_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "IMDSD_SOCKET")}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.slow
def test_demo_duration_20_shows_every_kind_and_hook_runs() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "imdsd", "demo", "--duration", "20"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_python_env(),
        timeout=50,
        check=False,
    )
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert elapsed < 40
    assert "\x1b[" not in out  # not a TTY: no colour
    for pattern in (
        r"rev \d+ +tags +added +env +staging",
        r"rev \d+ +tags +removed +env ",
        r"rev \d+ +disks +attached +lun:1 +demo-data-1, 128 GB",
        r"rev \d+ +disks +modified +lun:1 +diskSizeGB 128 -> 256",
        r"rev \d+ +network +added +mac:000D3A112233 +10\.144\.133\.140",
        r"rev \d+ +scheduled_events +added +C7061BAC\.\.\. +Reboot Scheduled",
        r"rev \d+ +scheduled_events +modified +C7061BAC\.\.\. +.*Started",
        r"rev \d+ +scheduled_events +removed +C7061BAC\.\.\. ",
        r"hook +demo-hook ok in [\d.]+s: revision \d+ \[[a-z_,]*\]: (.*; )?tags added env",
        r"upstream +\w+ ok -> (degraded|stale): HTTP 429",
        r"scenario +throttling burst",
        r"summary after 2\d\.\ds",
        r"changes +\d+ in \d+ revisions: tags \d+, disks \d+, network \d+, scheduled_events \d+",
        r"hooks +\d+ runs: \d+ ok, 0 failed \(\d+ lines in the hook's log\)",
        r"upstream +\d+ requests to the emulator, \d+ answered 429, peak \d+ req/s",
        r"daemon +stopped with SIGTERM, exit 0",
    ):
        assert re.search(pattern, out), f"{pattern!r} not in:\n{out}"
    assert not re.search(r"rev \d+ +network +(modified|removed)", out)  # reordering is no change
    assert len(re.findall(r"hook +demo-hook ok", out)) >= 5
    assert int(re.findall(r"(\d+) answered 429", out)[0]) >= 6
    workdir = re.match(r"imdsd demo in (\S+):", out)
    assert workdir is not None
    assert not Path(workdir.group(1)).exists()


def _read_until(proc: subprocess.Popen[bytes], pattern: str, timeout: float) -> str:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern.encode(), seen):
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not seen in:\n{seen.decode()}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"output ended before {pattern!r}:\n{seen.decode()}"
            seen += chunk
    return seen.decode()


@pytest.mark.slow
def test_demo_without_duration_stops_on_sigint() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imdsd", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=_python_env(),
    )
    try:
        head = _read_until(proc, r"scenario +'demo': 12 steps over \d+s\n", 30)
        assert "played at" not in head  # real time without --duration
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = head + rest.decode()
    assert proc.returncode == 0, out
    assert re.search(r"demo +SIGINT, finishing", out), out
    assert "daemon    stopped with SIGTERM, exit 0" in out
    workdir = re.match(r"imdsd demo in (\S+):", out)
    assert workdir is not None
    assert not Path(workdir.group(1)).exists()
