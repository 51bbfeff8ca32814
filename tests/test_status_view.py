"""``imdsd status`` on a TTY: the summary rendered from a /v1/health document."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_support import daemon, emulator, write_config
from hypothesis import given
from hypothesis import strategies as st

from imdsd import commands
from imdsd.status_view import ago, render_status


def words(text: str) -> list[str]:
    """The words of ``text`` (column padding ignored)."""
    return text.split()


NOW = datetime(2026, 12, 1, 6, 40, 0, tzinfo=UTC)


def health(**changes: Any) -> dict[str, Any]:
    """A /v1/health document as the daemon writes it (from a real run), then ``changes``."""
    doc: dict[str, Any] = {
        "status": "degraded",
        "version": "0.1.0",
        "revision": 12,
        "oldest": 3,
        "upstream": {
            "instance": {
                "state": "ok",
                "interval": 10.0,
                "absent": False,
                "last_success": "2026-12-01T06:39:55.000Z",
                "last_error": None,
                "consecutive_failures": 0,
                "failures": {"throttled": 2, "service": 0},
            },
            "scheduled_events": {
                "state": "degraded",
                "interval": 1.0,
                "absent": False,
                "last_success": "2026-12-01T06:39:30.000Z",
                "last_error": "HTTP 500 from IMDS",
                "consecutive_failures": 3,
                "failures": {"service": 3},
            },
        },
        "api_version": {"instance": "2023-11-15", "scheduled_events": "2020-07-01"},
        "budget": {"rate": 2.0, "in_use": 1, "waiting": 0, "granted": 99},
        "requests_sent": 120,
        "watchers": 3,
        "connections": 5,
        "state_save": {
            "ok": True,
            "last_error": None,
            "failures": 0,
            "last_saved_at": NOW.timestamp() - 4,
            "unsaved_revisions": 0,
        },
        "last_change": {
            "revision": 12,
            "at": "2026-12-01T06:37:00.000Z",
            "kinds": ["disks", "tags"],
        },
        "hooks": {
            "mount": {
                "name": "mount",
                "running": False,
                "delivered_revision": 12,
                "pending_revisions": 0,
                "failures": 0,
                "retry_in": None,
                "last_run": {
                    "at": "2026-12-01T06:37:01.000Z",
                    "result": "ok",
                    "exit_code": 0,
                    "duration": 0.123,
                },
            },
            "notify": {
                "name": "notify",
                "running": False,
                "delivered_revision": 11,
                "pending_revisions": 1,
                "failures": 2,
                "retry_in": 4.0,
                "last_run": {
                    "at": "2026-12-01T06:39:50.000Z",
                    "result": "failed",
                    "exit_code": 1,
                    "duration": 2.5,
                },
            },
            "fresh": {"name": "fresh", "running": False, "delivered_revision": 0, "last_run": None},
        },
    }
    doc.update(changes)
    return doc


def test_summary_at_a_glance() -> None:
    text = render_status(health(), NOW)
    lines = text.splitlines()
    assert lines[0] == "imdsd 0.1.0  degraded  revision 12 (history from 3)"
    assert lines[1] == "last change  r12 3m ago: disks, tags"
    assert lines[2] == "upstream"
    assert lines[3].split() == (
        words("instance ok good 5s ago every 10s api 2023-11-15 failures: throttled 2")
    )
    assert "scheduled_events  degraded  good 30s ago" in lines[4]
    assert lines[4].endswith("3 failing in a row: HTTP 500 from IMDS")
    assert lines[5] == "budget       [#####.....] 1 of 2 req/s in use, 0 waiting, 120 requests sent"
    assert lines[6] == "state        saved 4s ago"
    assert lines[7] == "clients      3 watchers, 5 connections"
    assert lines[8] == "hooks"
    assert lines[9].split() == words("mount ok 2m ago, exit 0, 123ms delivered r12")
    assert lines[10].split()[:2] == ["notify", "failed"]
    assert lines[10].endswith("1 pending, retry in 4s (2 failed)")
    assert lines[11].split() == words("fresh idle never run delivered r0")
    assert len(lines) == 12  # no callers: no callers section
    # columns line up
    assert lines[3].index("good") == lines[4].index("good")
    assert (
        lines[9].index("delivered") == lines[10].index("delivered") == lines[11].index("delivered")
    )


def test_callers_state_failures_and_reason() -> None:
    callers = [
        {
            "uid": 0,
            "pid": 812,
            "command": "waagent",
            "requests": 120,
            "cached": 100,
            "forwarded": 18,
            "queued": 2,
            "refused": 0,
        },
        {
            "uid": 1000,
            "pid": None,
            "command": "curl",
            "requests": 3,
            "cached": 3,
            "forwarded": 0,
            "queued": 0,
            "refused": 0,
        },
    ] + [{"uid": n, "command": f"c{n}", "requests": 1} for n in range(10)]
    doc = health(
        callers=callers,
        reason="state not saved: [Errno 28] No space left on device",
        state_save={
            "ok": False,
            "last_error": "[Errno 28] No space left on device",
            "failures": 7,
            "last_saved_at": None,
            "unsaved_revisions": 2,
        },
        last_change=None,
    )
    lines = render_status(doc, NOW).splitlines()
    assert lines[1] == "  state not saved: [Errno 28] No space left on device"
    assert "last change  - (none since start)" in lines
    assert (
        "state        NOT SAVED: [Errno 28] No space left on device (7 failures, 2 revisions"
        " unsaved)" in lines
    )
    start = lines.index("top callers (IMDS front)")
    shown = lines[start + 1 :]
    assert len(shown) == 5
    assert shown[0].split() == (
        words("uid 0 pid 812 waagent 120 requests 100 cached, 18 forwarded, 2 queued, 0 refused")
    )
    assert shown[1].split()[:5] == ["uid", "1000", "pid", "-", "curl"]


def test_colour_marks_states_and_is_off_by_default() -> None:
    plain = render_status(health(), NOW)
    assert "\033[" not in plain
    coloured = render_status(health(), NOW, colour=True)
    assert "\033[33mdegraded\033[0m" in coloured
    assert "\033[32mok\033[0m" in coloured
    assert "\033[31mfailed\033[0m" in coloured
    assert [len(line) for line in plain.splitlines()] != [
        len(line) for line in coloured.splitlines()
    ]
    assert plain.count("\n") == coloured.count("\n")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    )
)
def test_any_odd_document_renders_without_failing(value: Any) -> None:
    keys = ["status", "upstream", "budget", "hooks", "callers", "state_save", "last_change"]
    for doc in ({"x": value}, {key: value for key in keys}, health(upstream={"instance": value})):
        assert render_status(doc, NOW).endswith("\n")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("2026-12-01T06:39:59.000Z", "1s ago"),
        ("2026-12-01T06:38:00Z", "2m ago"),
        ("2026-11-30T06:40:00+00:00", "1d ago"),
        ("2026-12-01T03:40:00", "3h ago"),
        (NOW.timestamp() - 7, "7s ago"),
        ("2026-12-01T07:00:00Z", "0s ago"),
        ("yesterday", "-"),
        (None, "-"),
        (True, "-"),
    ],
)
def test_ago(value: Any, text: str) -> None:
    assert ago(value, NOW) == text


class _Tty(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("tty", "as_json"), [(True, False), (False, False), (True, True)])
def test_status_command_uses_the_view_only_on_a_tty(
    monkeypatch: pytest.MonkeyPatch, tty: bool, as_json: bool
) -> None:
    class FakeClient:
        def __init__(self, socket: str) -> None:
            self.socket = socket

        def health(self) -> dict[str, Any]:
            return health()

    out = _Tty(tty)
    monkeypatch.setattr("imdsd.client.Client", FakeClient)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("NO_COLOR", "1")  # https://no-color.org
    args = argparse.Namespace(socket="/x.sock", config=None, json=as_json)
    assert commands.status_command(args) == 0  # degraded still answers
    if as_json:
        assert json.loads(out.getvalue()) == health()
    elif tty:
        lines = out.getvalue().splitlines()
        assert lines[0] == "imdsd 0.1.0  degraded  revision 12 (history from 3)"  # no colour
        assert "hooks" in lines
    else:
        assert out.getvalue() == commands.format_status(health())


def test_status_on_a_tty_is_coloured_unless_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeClient:
        def __init__(self, socket: str) -> None:
            self.socket = socket

        def health(self) -> dict[str, Any]:
            return health()

    out = _Tty(True)
    monkeypatch.setattr("imdsd.client.Client", FakeClient)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.delenv("NO_COLOR", raising=False)
    commands.status_command(argparse.Namespace(socket="/x.sock", config=None, json=False))
    assert "\033[33mdegraded\033[0m" in out.getvalue()


async def test_a_real_daemon_reports_its_last_change(tmp_path: Path) -> None:
    async with emulator(port=0) as emu:
        async with daemon(write_config(tmp_path, emu.url)) as proc:
            await proc.wait_ready()
            before = json.loads((await proc.get("/v1/health")).body)
            await emu.action(action="set_tag", name="role", value="db")
            with trio.fail_after(15):
                while (doc := json.loads((await proc.get("/v1/health")).body))[
                    "revision"
                ] == before["revision"]:
                    await trio.sleep(0.05)
            change = doc["last_change"]
            assert change["revision"] == doc["revision"]
            assert "tags" in change["kinds"]
            assert ago(change["at"], datetime.now(UTC)) != "-"
            text = render_status(doc, datetime.now(UTC))
            assert f"last change  r{doc['revision']} " in text
            assert await proc.stop() == 0
        async with daemon(write_config(tmp_path, emu.url)) as proc:  # from the saved history
            await proc.wait_ready()
            again = json.loads((await proc.get("/v1/health")).body)
            assert again["last_change"]["revision"] >= change["revision"]
            assert await proc.stop() == 0


SGR = re.compile("\033\\[[0-9;]*m")
HOSTILE = "\033[2J\033]0;owned\007\r\u202eevil\x9b"


def _poisoned(value: Any, text: str) -> Any:
    """``value`` with ``text`` appended to every string in it, and to the upstream names."""
    if isinstance(value, str):
        return value + text
    if isinstance(value, dict):
        out = {k: _poisoned(v, text) for k, v in value.items()}
        if isinstance(out.get("upstream"), dict):
            out["upstream"] = {k + text: v for k, v in out["upstream"].items()}
        return out
    if isinstance(value, list):
        return [_poisoned(item, text) for item in value]
    return value


def _assert_inert(out: str) -> None:
    """Nothing but our colours and line ends may act on a terminal."""
    for line in SGR.sub("", out).split("\n"):
        assert line.isprintable(), repr(line)


CALLER = {"uid": 65534, "pid": 4242, "command": "curl", "requests": 3, "cached": 1,
          "forwarded": 1, "queued": 0, "refused": 1}  # fmt: skip


@pytest.mark.parametrize("colour", [False, True])
def test_strings_from_callers_hooks_and_the_daemon_cannot_drive_the_terminal(
    colour: bool,
) -> None:
    doc = health(callers=[CALLER], reason="starting")
    doc["state_save"].update(ok=False, last_error="disk full")
    out = render_status(_poisoned(doc, HOSTILE), NOW, colour=colour)
    _assert_inert(out)
    shown = "\\x1b[2J\\x1b]0;owned\\x07\\x0d\\u202eevil\\x9b"
    for where in ("curl", "notify", "HTTP 500 from IMDS", "starting", "scheduled_events", "full"):
        assert where + shown in out


@given(st.text())
def test_no_string_in_the_document_reaches_the_terminal_raw(text: str) -> None:
    doc = _poisoned(health(callers=[CALLER], reason="why"), text)
    _assert_inert(render_status(doc, NOW, colour=True))
