"""Hooks under resource exhaustion and escape attempts: retried, never lost, never leaked."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_support import daemon, emulator, write_config
from structlog.testing import capture_logs
from test_hooks_dispatcher import Recorder, _dispatcher, running, until
from test_hooks_support import FakeLedger, tag

from imdsd.hooks import runner
from imdsd.hooks.model import Hook
from imdsd.hooks.schedule import HookSchedule, Outcome
from imdsd.hooks.tree import ProcessTree


class _FailingSpawn:
    """Makes the first ``times`` process starts fail with ``code``, like a full fd table."""

    def __init__(self, times: int, code: int = errno.EMFILE) -> None:
        self.times = times
        self.code = code
        self.calls = 0
        self.real = trio.lowlevel.open_process

    async def __call__(self, *args: Any, **kwargs: Any) -> trio.Process:
        self.calls += 1
        if self.calls <= self.times:
            raise OSError(self.code, "Too many open files")
        return await self.real(*args, **kwargs)


async def test_a_hook_that_cannot_be_spawned_is_retried_not_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(tmp_path)
    spawn = _FailingSpawn(times=5)
    monkeypatch.setattr(trio.lowlevel, "open_process", spawn)
    ledger = FakeLedger()
    dispatcher = _dispatcher([rec.hook(retries=1)], ledger, backoff_base=0.01)
    with capture_logs() as logs:
        async with running(dispatcher):
            ledger.append(tag("added", "a", new="1"))
            await until(lambda: ledger.delivered("h") == 1)
    assert spawn.calls == 6
    [run] = rec.runs()
    assert run["frame"]["revision"] == 1
    assert not [e for e in logs if e["event"] == "hook gave up"]
    deferred = [e for e in logs if e.get("result") == "not-started"]
    assert len(deferred) == 5
    assert all("Too many open files" in e["error"] for e in deferred)
    assert dispatcher.metrics.hooks["h"].give_ups == 0


async def test_a_hook_that_fails_to_start_for_good_is_still_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawn = _FailingSpawn(times=100, code=errno.ENOENT)
    monkeypatch.setattr(trio.lowlevel, "open_process", spawn)
    ledger = FakeLedger()
    rec = Recorder(tmp_path)
    with capture_logs() as logs:
        async with running(_dispatcher([rec.hook(retries=1)], ledger, backoff_base=0.01)):
            ledger.append(tag("added", "a", new="1"))
            await until(lambda: ledger.delivered("h") == 1)
    assert spawn.calls == 2
    assert [e["event"] for e in logs if e.get("hook") == "h"][-1] == "hook gave up"


def test_deferred_starts_back_off_without_using_up_attempts() -> None:
    ledger = FakeLedger()
    hook = Hook(name="h", kinds=frozenset({"tags"}), command=("/bin/true",), retries=0)
    schedule = HookSchedule(hook, ledger, backoff_base=1.0, backoff_cap=8.0)
    ledger.append(tag("added", "a", new="1"))
    now = 0.0
    delays = []
    for _ in range(6):
        schedule.next_action(now)
        delivery = schedule.start(now)
        assert delivery.attempt == 1
        verdict = schedule.finished(now, Outcome.NOT_STARTED)
        assert verdict.result == "not-started"
        assert verdict.retry_at is not None
        delays.append(verdict.retry_at - now)
        now = verdict.retry_at
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert schedule.delivered == 0
    schedule.start(now)
    assert schedule.finished(now, Outcome.FAILED).result == "gave-up"  # retries=0


ESCAPER = """#!/bin/sh
trap 'echo term >> {marks}; {on_term}' TERM
for i in $(seq 20); do
    setsid sleep 1000 &
    echo $! >> {pids}
done
sleep 1000 &
wait
"""


def _escaper(tmp_path: Path, on_term: str = "exit 0") -> tuple[str, Path, Path]:
    """A hook starting 20 ``setsid sleep`` children; it runs ``on_term`` on SIGTERM."""
    pids, marks = tmp_path / "pids", tmp_path / "marks"
    script = tmp_path / "escaper"
    script.write_text(ESCAPER.format(pids=pids, marks=marks, on_term=on_term))
    script.chmod(0o755)
    return str(script), pids, marks


def _pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.fixture
def pidfiles() -> Iterator[list[Path]]:
    """Files listing ``sleep 1000`` processes a test started: whatever is left is killed."""
    files: list[Path] = []
    yield files
    for path in files:
        for pid in _pids(path):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == b"sleep\x001000\x00":
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes, as in containers, is dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _session(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2 :].split()[3])


async def test_children_that_call_setsid_are_killed_at_timeout(
    tmp_path: Path, pidfiles: list[Path]
) -> None:
    script, pids, marks = _escaper(tmp_path)
    pidfiles.append(pids)
    ledger = FakeLedger()
    hook = Hook(name="h", kinds=frozenset({"tags"}), command=(script,), timeout=3.0, retries=0)
    escaped: list[int] = []
    async with running(_dispatcher([hook], ledger, kill_grace=0.5)):
        ledger.append(tag("added", "a", new="1"))
        await until(lambda: len(_pids(pids)) == 20)
        escaped = _pids(pids)
        await until(lambda: all(_session(pid) == pid for pid in escaped))  # out of the group
        await until(lambda: ledger.delivered("h") == 1)
        assert [pid for pid in escaped if _alive(pid)] == []
    assert marks.read_text() == "term\n"  # SIGTERM first


async def test_shutdown_terms_then_kills_a_running_hook_and_all_its_escaped_children(
    tmp_path: Path, pidfiles: list[Path]
) -> None:
    script, pids, marks = _escaper(tmp_path, on_term="sleep 1000")
    pidfiles.append(pids)
    ledger = FakeLedger()
    hook = Hook(name="h", kinds=frozenset({"tags"}), command=(script,), timeout=60.0)
    dispatcher = _dispatcher([hook], ledger, kill_grace=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        ledger.append(tag("added", "a", new="1"))
        await until(lambda: len(_pids(pids)) == 20)
        with trio.fail_after(0.1 + 3 * 0.5 + 3.0):  # the whole shutdown is bounded
            assert not await dispatcher.shutdown(0.1)
    assert marks.read_text() == "term\n"  # asked to stop first, then killed (it ignored it)
    assert [pid for pid in _pids(pids) if _alive(pid)] == []
    assert ledger.delivered("h") == 0  # undelivered: it runs again after the next start


SUBREAPER = """
import os, subprocess, sys, time, trio
from imdsd.hooks.runner import sweep_orphans
from imdsd.hooks.tree import become_subreaper

assert become_subreaper()
pidfile = sys.argv[1]
# a double fork: the middle process exits at once, the grandchild is orphaned
helper = subprocess.Popen(["sleep", "1000"])  # in our session: not a hook's, spared
hook = f"(setsid sleep 1000 & echo $! > {pidfile}) &"  # runs in a session of its own
subprocess.run(["/bin/sh", "-c", hook], check=True, start_new_session=True)
while True:  # until the grandchild is an orphan, adopted by this process
    try:
        with open(pidfile) as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                break
    except (OSError, ValueError):
        pass
    time.sleep(0.01)
found = trio.run(sweep_orphans, 0.5)
assert helper.poll() is None
helper.kill()
helper.wait()
print(found)
"""


def test_a_subreaper_daemon_kills_leftovers_that_escaped_the_tree(
    tmp_path: Path, pidfiles: list[Path]
) -> None:
    pidfile = tmp_path / "pid"
    pidfiles.append(pidfile)
    done = subprocess.run(
        [sys.executable, "-c", SUBREAPER, str(pidfile)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert int(done.stdout.split()[-1]) == 1, done.stderr
    [pid] = _pids(pidfile)
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped by the subreaper


async def test_the_daemon_kills_and_reaps_what_a_hook_double_forked(
    tmp_path: Path, pidfiles: list[Path]
) -> None:
    pidfile = tmp_path / "escaped"
    pidfiles.append(pidfile)
    hook = tmp_path / "double-fork"
    hook.write_text(f"#!/bin/sh\n(setsid sleep 1000 & echo $! > {pidfile}) &\nwait\n")
    hook.chmod(0o755)
    extra = f'[[hook]]\nname = "df"\non = ["tags"]\ncommand = ["{hook}"]\ndebounce = "0s"\n'
    async with emulator() as emu:
        config = write_config(tmp_path, emu.endpoint, extra)
        async with daemon(config) as proc:
            await proc.wait_ready()
            await emu.action(action="set_tag", name="escape", value="1")
            await until(lambda: len(_pids(pidfile)) == 1)
            [pid] = _pids(pidfile)
            await until(lambda: not os.path.exists(f"/proc/{pid}"))  # killed and reaped
            assert await proc.stop() == 0
    events = proc.log_events()
    finished = [e for e in events if e.get("event") == "hook finished" and e["hook"] == "df"]
    swept = [e for e in events if e.get("event") == "hook leftovers killed"]
    assert finished[0].get("leftovers_killed") or swept, events


async def test_the_wait_for_a_hook_that_survives_sigkill_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As if the process were stuck in the kernel: no signal reaches it, the wait still ends."""
    monkeypatch.setattr(runner, "_signal_group", lambda pgid, sig: None)
    monkeypatch.setattr(ProcessTree, "signal", lambda self, sig: 0)
    started: list[trio.Process] = []
    real_open = trio.lowlevel.open_process

    async def remember(*args: Any, **kwargs: Any) -> trio.Process:
        proc = await real_open(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(trio.lowlevel, "open_process", remember)
    try:
        with capture_logs() as logs, trio.fail_after(0.2 + 6 * 0.2 + 2.0):
            result = await runner.run_hook_process(
                ["/bin/sleep", "1000"], b"", {}, timeout=0.2, kill_grace=0.2
            )
        assert result.timed_out
        [survived] = [e for e in logs if e["event"] == "hook processes survive SIGKILL"]
        assert survived["pid"] == started[0].pid
    finally:
        monkeypatch.undo()
        for proc in started:
            proc.kill()
            await proc.wait()
