"""The hook dispatcher end to end: a fake ledger, real scripts, real processes."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing
from structlog.testing import capture_logs
from test_hooks_support import FakeLedger, change, tag

from imdsd.frames import ChangeFrame, GoneFrame
from imdsd.hooks.dispatcher import HookDispatcher
from imdsd.hooks.model import Hook
from imdsd.hooks.sources import scan_directory

SOCKET = "/run/imdsd/test.sock"

RECORDER = """#!{python}
import json, os, sys, time
runs = {runs!r}
start = time.time()
frame = json.loads(sys.stdin.readline())
record = {{"argv": sys.argv[1:], "frame": frame, "start": start,
          "env": {{k: v for k, v in os.environ.items() if k.startswith("IMDSD_")}}}}
with open(runs, "a") as f:
    f.write(json.dumps(record) + "\\n")
if os.path.exists({slow!r}):
    time.sleep({sleep})
with open(runs + ".end", "a") as f:
    f.write(json.dumps(time.time()) + "\\n")
with open(runs) as f:
    count = sum(1 for _ in f)
sys.exit({exit_code} if count <= {fail_times} else 0)
"""


class Recorder:
    """A hook script that records each run (argv, frame, IMDSD_* env, start/end times)."""

    def __init__(
        self,
        directory: Path,
        name: str = "hook",
        *,
        sleep: float = 0.0,
        exit_code: int = 1,
        fail_times: int = 0,
    ) -> None:
        self.runs_file = directory / f"{name}.runs"
        self.slow_flag = directory / f"{name}.slow"
        self.path = directory / name
        self.path.write_text(
            RECORDER.format(
                python=sys.executable,
                runs=str(self.runs_file),
                slow=str(self.slow_flag),
                sleep=sleep,
                exit_code=exit_code,
                fail_times=fail_times,
            )
        )
        self.path.chmod(0o755)
        if sleep:
            self.slow_flag.touch()

    def runs(self) -> list[dict[str, Any]]:
        if not self.runs_file.exists():
            return []
        return [json.loads(line) for line in self.runs_file.read_text().splitlines()]

    def ends(self) -> list[float]:
        end = self.runs_file.with_name(self.runs_file.name + ".end")
        if not end.exists():
            return []
        return [float(line) for line in end.read_text().splitlines()]

    def hook(self, name: str = "h", kinds: str = "tags", **options: Any) -> Hook:
        options.setdefault("debounce", 0.0)
        return Hook(
            name=name,
            kinds=frozenset(kinds.split(",")),
            command=(str(self.path), *options.pop("args", ())),
            **options,
        )


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` (files written by child processes) until it holds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def _dispatcher(
    hooks: Sequence[Hook], ledger: FakeLedger, max_parallel: int = 4, **options: Any
) -> HookDispatcher:
    options.setdefault("kill_grace", 0.3)
    options.setdefault("backoff_base", 0.05)
    return HookDispatcher(hooks, ledger, ledger.wait_for_revision, SOCKET, max_parallel, **options)


async def idle_status(dispatcher: HookDispatcher) -> dict[str, tuple[bool, int, int, bool]]:
    """Each hook's (running, delivered, pending, retry due) once every task waits.

    A run that is due has started by then (its task waits on the process), so "not running,
    nothing pending, no retry" means nothing more runs until a new revision is stored.
    """
    await trio.testing.wait_all_tasks_blocked()
    return {
        s.name: (s.running, s.delivered_revision, s.pending_revisions, s.retry_in is not None)
        for s in dispatcher.status()
    }


@asynccontextmanager
async def running(dispatcher: HookDispatcher) -> AsyncIterator[HookDispatcher]:
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        yield dispatcher
        await dispatcher.shutdown(5)


async def test_delivers_a_change_to_config_and_directory_hooks(tmp_path: Path) -> None:
    config_rec = Recorder(tmp_path, "configured")
    (tmp_path / "hooks.d" / "tags.d").mkdir(parents=True)
    dir_rec = Recorder(tmp_path / "hooks.d" / "tags.d", "10-record")
    [dir_hook] = scan_directory(str(tmp_path / "hooks.d"), euid=0, debounce=0.0)
    config_hook = config_rec.hook("configured", args=("--all", "$(id)"))
    ledger = FakeLedger()
    dispatcher = _dispatcher([config_hook, dir_hook], ledger)
    async with running(dispatcher):
        ledger.append(tag("added", "env", new="prod"), change("disks", "attached", "lun:0"))
        await until(lambda: len(config_rec.ends()) == 1 and len(dir_rec.ends()) == 1)
        await until(lambda: ledger.delivered("10-record") == 1 == ledger.delivered("configured"))
        status = {s.name: s for s in dispatcher.status()}
    [configured], [directory] = config_rec.runs(), dir_rec.runs()
    assert configured["argv"] == ["--all", "$(id)"]
    assert directory["argv"] == ["tags", "1"]
    expected_frame = {
        "type": "change",
        "revision": 1,
        "at": "2024-01-01T00:00:01Z",
        "changes": [{"kind": "tags", "op": "added", "key": "env", "old": None, "new": "prod"}],
    }
    assert configured["frame"] == directory["frame"] == expected_frame
    assert configured["env"] == {
        "IMDSD_REVISION": "1",
        "IMDSD_KINDS": "tags",
        "IMDSD_SOCKET": SOCKET,
    }
    last = status["10-record"].last_run
    assert last is not None
    assert (last.result, last.exit_code) == ("ok", 0)
    assert status["10-record"].source == str(dir_rec.path)
    assert (status["configured"].delivered_revision, status["configured"].pending_revisions) == (
        1,
        0,
    )
    counters = dispatcher.metrics.hooks["configured"]
    assert (counters.runs, counters.failures, counters.duration_count) == (1, 0, 1)
    assert counters.duration_sum > 0


async def test_a_new_hook_gets_no_history(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    ledger = FakeLedger()
    ledger.append(tag("added", "old", new="1"))
    ledger.append(tag("added", "older", new="1"))
    async with running(_dispatcher([rec.hook()], ledger)) as dispatcher:
        assert await idle_status(dispatcher) == {"h": (False, 2, 0, False)}
        assert rec.runs() == []
        ledger.append(tag("added", "new", new="1"))
        await until(lambda: ledger.delivered("h") == 3)
    [run] = rec.runs()
    assert [c["key"] for c in run["frame"]["changes"]] == ["new"]


async def test_a_burst_during_a_slow_run_is_coalesced_into_one_next_run(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, sleep=0.5)
    ledger = FakeLedger()
    dispatcher = _dispatcher([rec.hook(debounce=0.05)], ledger)
    async with running(dispatcher):
        ledger.append(tag("added", "a", new="1"))
        await until(lambda: len(rec.runs()) == 1)
        ledger.append(tag("added", "x", new="1"))
        ledger.append(tag("removed", "x", old="1"))
        ledger.append(tag("added", "y", new="1"))
        ledger.append(tag("modified", "y", "1", "2"))
        ledger.append(change("disks", "attached", "lun:0"))
        [status] = dispatcher.status()
        assert status.running
        assert status.pending_revisions == 5
        await until(lambda: len(rec.ends()) == 2)
        await until(lambda: ledger.delivered("h") == 6)
        assert await idle_status(dispatcher) == {"h": (False, 6, 0, False)}
    first, second = rec.runs()
    assert first["frame"]["revision"] == 1
    assert second["frame"] == {
        "type": "change",
        "revision": 5,
        "at": "2024-01-01T00:00:05Z",
        "changes": [{"kind": "tags", "op": "added", "key": "y", "old": None, "new": "2"}],
        "covers": [2, 5],
    }
    assert second["env"]["IMDSD_REVISION"] == "5"


async def test_failures_are_retried_then_given_up(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, exit_code=1, fail_times=99)
    ledger = FakeLedger()
    dispatcher = _dispatcher([rec.hook(retries=2)], ledger)
    with capture_logs() as logs:
        async with running(dispatcher):
            ledger.append(tag("added", "a", new="1"))
            await until(lambda: ledger.delivered("h") == 1)
            [status] = dispatcher.status()
            ledger.append(tag("added", "b", new="1"))
            await until(lambda: len(rec.runs()) == 4)
    assert [r["frame"]["revision"] for r in rec.runs()] == [1, 1, 1, 2]
    runs = [e for e in logs if e["event"] in ("hook failed", "hook gave up")]
    assert [(e["event"], e["attempt"]) for e in runs[:3]] == [
        ("hook failed", 1),
        ("hook failed", 2),
        ("hook gave up", 3),
    ]
    assert runs[0]["exit_code"] == 1
    assert runs[0]["retry_in"] > 0
    assert runs[2]["log_level"] == "error"
    assert status.last_run is not None
    assert (status.last_run.result, status.last_run.exit_code) == ("gave-up", 1)
    counters = dispatcher.metrics.hooks["h"]
    assert (counters.runs, counters.failures, counters.give_ups) == (4, 4, 1)


async def test_a_retry_carries_the_changes_stored_during_the_backoff(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, exit_code=2, fail_times=1)
    ledger = FakeLedger()
    dispatcher = _dispatcher([rec.hook(retries=3)], ledger, backoff_base=0.5)
    async with running(dispatcher):
        ledger.append(tag("added", "a", new="1"))
        await until(lambda: len(rec.ends()) == 1)
        await until(lambda: dispatcher.status()[0].failures == 1)
        assert dispatcher.status()[0].retry_in is not None
        ledger.append(tag("added", "b", new="2"))
        await until(lambda: ledger.delivered("h") == 2)
    first, retry = rec.runs()
    assert first["frame"]["revision"] == 1
    assert retry["frame"]["covers"] == [1, 2]
    assert [c["key"] for c in retry["frame"]["changes"]] == ["a", "b"]


async def test_timeouts_are_counted_and_retried(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, sleep=30)
    ledger = FakeLedger()
    dispatcher = _dispatcher([rec.hook(timeout=0.3, retries=1)], ledger, kill_grace=0.2)
    with capture_logs() as logs:
        async with running(dispatcher):
            ledger.append(tag("added", "a", new="1"))
            await until(lambda: ledger.delivered("h") == 1)
    assert len(rec.runs()) == 2
    assert rec.ends() == []
    assert [e["result"] for e in logs if e["event"] in ("hook failed", "hook gave up")] == [
        "timeout",
        "timeout",
    ]
    counters = dispatcher.metrics.hooks["h"]
    assert (counters.timeouts, counters.failures, counters.give_ups) == (2, 0, 1)


async def test_no_more_than_max_parallel_hooks_run_at_once(tmp_path: Path) -> None:
    recs = [Recorder(tmp_path, f"hook{i}", sleep=0.4) for i in range(3)]
    ledger = FakeLedger()
    hooks = [rec.hook(f"h{i}") for i, rec in enumerate(recs)]
    async with running(_dispatcher(hooks, ledger, max_parallel=2)):
        ledger.append(tag("added", "a", new="1"))
        await until(lambda: all(len(r.ends()) == 1 for r in recs))
    spans = [(r.runs()[0]["start"], r.ends()[0]) for r in recs]
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap == 2


async def test_pending_changes_are_delivered_after_a_restart(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, sleep=30)
    ledger = FakeLedger()
    first = _dispatcher([rec.hook()], ledger)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        ledger.append(tag("added", "a", new="1"))
        await until(lambda: len(rec.runs()) == 1)
        assert not await first.shutdown(0.1)
    assert ledger.delivered("h") == 0
    restarted = FakeLedger.load(ledger.dump())
    restarted.append(tag("added", "b", new="2"))
    rec.slow_flag.unlink()
    async with running(_dispatcher([rec.hook()], restarted)):
        await until(lambda: restarted.delivered("h") == 2)
    killed, delivered = rec.runs()
    assert killed["frame"]["revision"] == 1
    assert delivered["frame"]["covers"] == [1, 2]
    assert len(rec.ends()) == 1


async def test_shutdown_waits_for_running_hooks(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, sleep=0.3)
    ledger = FakeLedger()
    dispatcher = _dispatcher([rec.hook()], ledger)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        ledger.append(tag("added", "a", new="1"))
        await until(lambda: len(rec.runs()) == 1)
        assert await dispatcher.shutdown(5)
        ledger.append(tag("added", "b", new="1"))
    assert ledger.delivered("h") == 1
    assert len(rec.ends()) == 1


async def test_changes_that_cancel_out_or_do_not_match_advance_without_a_run(
    tmp_path: Path,
) -> None:
    rec = Recorder(tmp_path)
    ledger = FakeLedger()
    hooks = [rec.hook("tags-hook", debounce=0.3), rec.hook("disks-hook", kinds="disks")]
    async with running(_dispatcher(hooks, ledger)):
        ledger.append(tag("added", "a", new="1"))
        ledger.append(tag("removed", "a", old="1"))
        await until(lambda: ledger.delivered("tags-hook") == 2)
        await until(lambda: ledger.delivered("disks-hook") == 2)
    assert rec.runs() == []


async def test_missing_history_is_warned_about_and_the_rest_delivered(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    ledger = FakeLedger(history=2)
    ledger.mark_delivered("h", 0)
    for key in "abcd":
        ledger.append(tag("added", key, new="1"))
    with capture_logs() as logs:
        async with running(_dispatcher([rec.hook()], ledger)):
            await until(lambda: ledger.delivered("h") == 4)
    [run] = rec.runs()
    assert [c["key"] for c in run["frame"]["changes"]] == ["c", "d"]
    [warning] = [e for e in logs if e["event"] == "hook history incomplete"]
    assert (warning["log_level"], warning["oldest"]) == ("warning", 2)


async def test_replacing_hooks_keeps_unchanged_state_and_drops_removed(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    ledger = FakeLedger()
    dispatcher = _dispatcher([rec.hook("a"), rec.hook("b")], ledger)
    async with running(dispatcher):
        ledger.append(tag("added", "k", new="1"))
        await until(lambda: ledger.delivered("a") == 1 == ledger.delivered("b"))
        ledger.append(tag("added", "missed-by-c", new="1"))
        await until(lambda: ledger.delivered("a") == 2 == ledger.delivered("b"))
        dispatcher.replace_hooks([rec.hook("a"), rec.hook("b", args=("v2",)), rec.hook("c")])
        status = {s.name: s for s in dispatcher.status()}
        assert status["a"].last_run is not None
        assert status["b"].last_run is not None
        assert status["c"].last_run is None
        assert status["c"].delivered_revision == 2
        ledger.append(tag("added", "k2", new="1"))
        await until(lambda: all(ledger.delivered(n) == 3 for n in "abc"))
        dispatcher.replace_hooks([rec.hook("a")])
        assert [h.name for h in dispatcher.hooks] == ["a"]
        assert set(ledger.marks) == {"a"}
        ledger.append(tag("added", "k3", new="1"))
        await until(lambda: ledger.delivered("a") == 4)
        assert await idle_status(dispatcher) == {"a": (False, 4, 0, False)}
    argvs = [(r["argv"], r["frame"]["revision"]) for r in rec.runs()]
    assert sorted(argvs) == sorted(
        [([], 1), ([], 1), ([], 2), ([], 2), ([], 3), (["v2"], 3), ([], 3), ([], 4)]
    )
    assert dispatcher.metrics.hooks["a"].runs == 4
    assert dispatcher.metrics.hooks["b"].runs == 3


async def test_a_hook_removed_while_running_finishes_unrecorded(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, sleep=0.3)
    ledger = FakeLedger()
    dispatcher = _dispatcher([rec.hook()], ledger)
    async with running(dispatcher):
        ledger.append(tag("added", "a", new="1"))
        await until(lambda: len(rec.runs()) == 1)
        dispatcher.replace_hooks([])
        await until(lambda: dispatcher.status() == [])
    assert len(rec.ends()) == 1
    assert ledger.delivered("h") is None


async def test_a_directory_hook_made_unsafe_after_loading_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tags.d").mkdir()
    rec = Recorder(tmp_path / "tags.d", "10-a")
    [hook] = scan_directory(str(tmp_path), euid=0, debounce=0.0, retries=0)
    rec.path.chmod(0o777)
    ledger = FakeLedger()
    with capture_logs() as logs:
        async with running(_dispatcher([hook], ledger)):
            ledger.append(tag("added", "a", new="1"))
            await until(lambda: ledger.delivered("10-a") == 1)
    assert rec.runs() == []
    [gave_up] = [e for e in logs if e["event"] == "hook gave up"]
    assert "writable by group or others" in gave_up["error"]


async def test_hook_starts_soon_after_a_change_is_stored(tmp_path: Path) -> None:
    stamps = tmp_path / "stamps"
    script = tmp_path / "stamp"
    script.write_text(f"#!/bin/sh\ndate +%s.%N >> {stamps}\n")
    script.chmod(0o755)
    ledger = FakeLedger()
    hook = Hook(name="h", kinds=frozenset({"tags"}), command=(str(script),), debounce=0.0)
    latencies = []

    def stamped() -> list[str]:
        return stamps.read_text().split() if stamps.exists() else []

    async with running(_dispatcher([hook], ledger)):
        for i in range(1, 21):
            stored = time.time()
            ledger.append(tag("added", f"k{i}", new="1"))
            await until(lambda: len(stamped()) == ledger.revision)
            latencies.append(float(stamped()[-1]) - stored)
            await until(lambda: ledger.delivered("h") == ledger.revision)
    assert statistics.median(latencies) < 0.25


class _FlakyLedger(FakeLedger):
    """Raises once from frames_since, as a buggy store might."""

    failures = 1

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        if self.failures and self.revision:
            self.failures -= 1
            raise RuntimeError("store bug")
        return super().frames_since(since)


async def test_an_unexpected_error_is_logged_and_the_hook_carries_on(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    ledger = _FlakyLedger()
    with capture_logs() as logs:
        async with running(_dispatcher([rec.hook()], ledger)):
            ledger.append(tag("added", "a", new="1"))
            await until(lambda: ledger.delivered("h") == 1)
    assert len(rec.runs()) == 1
    [error] = [e for e in logs if e["event"] == "hook worker error"]
    assert (error["log_level"], error["hook"]) == ("error", "h")
