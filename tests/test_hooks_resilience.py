"""Hooks under resource exhaustion and escape attempts: retried, never lost, never leaked."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs
from test_hooks_dispatcher import Recorder, _dispatcher, running, until
from test_hooks_support import FakeLedger, tag

from imdsd.hooks.model import Hook
from imdsd.hooks.schedule import HookSchedule, Outcome


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
