"""Per-hook scheduling (sans-IO): debounce, coalescing, retries, at-least-once marks."""

from __future__ import annotations

import pytest
from test_hooks_support import FakeLedger, change, tag

from imdsd.hooks.model import Hook
from imdsd.hooks.schedule import (
    IDLE,
    READY,
    HookSchedule,
    Outcome,
    WaitUntil,
    backoff_delay,
)


def _hook(debounce: float = 1.0, retries: int = 2, kinds: str = "tags") -> Hook:
    return Hook(
        name="h",
        kinds=frozenset(kinds.split(",")),
        command=("/bin/true",),
        debounce=debounce,
        retries=retries,
    )


def test_new_hook_starts_at_the_current_revision() -> None:
    ledger = FakeLedger()
    ledger.append(tag("added", "old", new="1"))
    schedule = HookSchedule(_hook(), ledger)
    assert schedule.fresh
    assert ledger.delivered("h") == 1
    assert schedule.next_action(0.0) == IDLE


def test_known_hook_resumes_from_its_mark() -> None:
    ledger = FakeLedger()
    ledger.append(tag("added", "a", new="1"))
    ledger.mark_delivered("h", 0)
    schedule = HookSchedule(_hook(debounce=0.0), ledger)
    assert not schedule.fresh
    assert schedule.next_action(5.0) == READY
    delivery = schedule.start(5.0)
    assert delivery.frame is not None
    assert delivery.frame.revision == 1


def test_debounce_window_opens_with_the_first_change() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=1.0), ledger)
    ledger.append(tag("added", "a", new="1"))
    schedule.revision_advanced(10.0)
    assert schedule.next_action(10.0) == WaitUntil(11.0)
    ledger.append(tag("added", "b", new="1"))
    schedule.revision_advanced(10.5)
    assert schedule.next_action(10.5) == WaitUntil(11.0)
    assert schedule.next_action(11.0) == READY
    delivery = schedule.start(11.0)
    assert delivery.frame is not None
    assert delivery.frame.covers == [1, 2]
    assert [c.key for c in delivery.frame.changes] == ["a", "b"]


def test_revisions_without_the_hooks_kinds_are_passed_at_once() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(kinds="disks"), ledger)
    ledger.append(tag("added", "a", new="1"))
    schedule.revision_advanced(1.0)
    assert schedule.next_action(1.0) == IDLE
    assert schedule.delivered == 1
    assert ledger.delivered("h") == 1


def test_changes_during_a_run_go_into_the_next_run() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=0.5), ledger)
    ledger.append(tag("added", "a", new="1"))
    schedule.revision_advanced(0.0)
    first = schedule.start(0.5)
    assert first.upto == 1
    assert schedule.running
    ledger.append(tag("added", "b", new="1"))
    schedule.revision_advanced(0.7)
    ledger.append(tag("modified", "b", "1", "2"))
    schedule.revision_advanced(0.8)
    assert schedule.next_action(0.9) == IDLE
    verdict = schedule.finished(3.0, Outcome.OK)
    assert verdict.result == "ok"
    assert ledger.delivered("h") == 1
    assert schedule.next_action(3.0) == READY
    second = schedule.start(3.0)
    assert second.frame is not None
    assert second.frame.covers == [2, 3]
    assert [(c.op, c.key, c.new) for c in second.frame.changes] == [("added", "b", "2")]
    schedule.finished(3.1, Outcome.OK)
    assert ledger.delivered("h") == 3
    assert schedule.next_action(3.1) == IDLE


def test_a_change_during_the_run_still_waits_its_debounce() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=2.0), ledger)
    ledger.append(tag("added", "a", new="1"))
    schedule.revision_advanced(0.0)
    schedule.start(2.0)
    ledger.append(tag("added", "b", new="1"))
    schedule.revision_advanced(2.5)
    schedule.finished(3.0, Outcome.OK)
    assert schedule.next_action(3.0) == WaitUntil(4.5)


def test_failures_retry_with_backoff_then_give_up_and_advance() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=0.0, retries=2), ledger)
    ledger.append(tag("added", "a", new="1"))
    schedule.revision_advanced(0.0)
    assert schedule.start(0.0).attempt == 1
    first = schedule.finished(1.0, Outcome.FAILED)
    assert (first.result, first.retry_at) == ("failed", 2.0)
    assert schedule.next_action(1.5) == WaitUntil(2.0)
    assert schedule.next_action(2.0) == READY
    assert schedule.start(2.0).attempt == 2
    second = schedule.finished(2.5, Outcome.TIMEOUT)
    assert (second.result, second.retry_at) == ("timeout", 4.5)
    assert schedule.start(4.5).attempt == 3
    assert ledger.delivered("h") == 0
    last = schedule.finished(5.0, Outcome.FAILED)
    assert (last.result, last.retry_at, last.attempts) == ("gave-up", None, 3)
    assert ledger.delivered("h") == 1
    assert schedule.failures == 0
    assert schedule.next_action(5.0) == IDLE


def test_changes_during_a_backoff_are_merged_into_the_retry() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=0.0), ledger)
    ledger.append(tag("added", "a", new="1"))
    schedule.revision_advanced(0.0)
    schedule.start(0.0)
    schedule.finished(0.1, Outcome.FAILED)
    ledger.append(tag("added", "b", new="2"))
    schedule.revision_advanced(0.5)
    assert schedule.next_action(0.5) == WaitUntil(1.1)
    retry = schedule.start(1.1)
    assert retry.attempt == 2
    assert retry.frame is not None
    assert retry.frame.covers == [1, 2]
    assert retry.upto == 2
    schedule.finished(1.2, Outcome.OK)
    assert ledger.delivered("h") == 2


def test_changes_that_cancel_out_advance_without_a_run() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=1.0), ledger)
    ledger.append(tag("added", "a", new="1"))
    schedule.revision_advanced(0.0)
    ledger.append(tag("removed", "a", old="1"))
    schedule.revision_advanced(0.5)
    assert schedule.next_action(1.0) == READY
    delivery = schedule.start(1.0)
    assert delivery.frame is None
    assert not schedule.running
    assert ledger.delivered("h") == 2


def test_history_too_short_delivers_what_is_left() -> None:
    ledger = FakeLedger(history=2)
    ledger.mark_delivered("h", 0)
    for key in "abcd":
        ledger.append(tag("added", key, new="1"))
    schedule = HookSchedule(_hook(debounce=0.0), ledger)
    assert schedule.pending_revisions() == 2
    assert schedule.next_action(0.0) == READY
    delivery = schedule.start(0.0)
    assert delivery.gone_oldest == 2
    assert delivery.frame is not None
    assert [c.key for c in delivery.frame.changes] == ["c", "d"]
    schedule.finished(0.1, Outcome.OK)
    assert ledger.delivered("h") == 4


def test_a_changed_definition_retries_at_once_with_fresh_attempts() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=0.0, retries=5), ledger, backoff_base=30.0)
    ledger.append(tag("added", "a", new="1"))
    schedule.start(0.0)
    schedule.finished(0.1, Outcome.FAILED)
    assert schedule.next_action(1.0) == WaitUntil(30.1)
    schedule.update(_hook(debounce=0.0, retries=5))
    assert schedule.retry_at is not None
    fixed = Hook(name="h", kinds=frozenset({"tags"}), command=("/bin/echo",), debounce=0.0)
    schedule.update(fixed)
    assert schedule.hook is fixed
    assert schedule.failures == 0
    assert schedule.next_action(1.0) == READY
    assert schedule.start(1.0).attempt == 1


def test_pending_revisions_count_only_the_hooks_kinds() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(kinds="tags,disks"), ledger)
    ledger.append(tag("added", "a", new="1"))
    ledger.append(change("network", "added", "mac:0"))
    ledger.append(change("disks", "attached", "lun:0"))
    assert schedule.pending_revisions() == 2


def test_abandon_keeps_the_changes_pending() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=0.0), ledger)
    ledger.append(tag("added", "a", new="1"))
    schedule.start(0.0)
    schedule.abandon()
    assert not schedule.running
    assert ledger.delivered("h") == 0
    assert schedule.next_action(0.0) == READY
    with pytest.raises(RuntimeError, match="without start"):
        schedule.finished(0.0, Outcome.OK)


def test_remark_restores_a_forgotten_mark() -> None:
    ledger = FakeLedger()
    ledger.append(tag("added", "a", new="1"))
    schedule = HookSchedule(_hook(), ledger)
    ledger.forget_hooks([])
    schedule.remark()
    assert ledger.delivered("h") == 1


@pytest.mark.parametrize(
    ("failures", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0)]
)
def test_backoff_doubles_up_to_a_cap(failures: int, delay: float) -> None:
    assert backoff_delay(failures) == delay


def test_a_mark_moved_by_the_ledger_is_taken_without_a_gone() -> None:
    ledger = FakeLedger()
    hook = Hook("h", frozenset({"tags"}), ("/bin/true",))
    schedule = HookSchedule(hook, ledger)
    ledger.revision = 1  # a baseline: a revision without a frame
    ledger.oldest = 1
    ledger.mark_delivered("h", 1)
    assert schedule.next_action(0.0) == IDLE
    assert schedule.delivered == 1


def test_a_run_limited_to_a_revision_leaves_later_changes_for_the_next_run() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=1.0), ledger)
    for key in "abc":
        ledger.append(tag("added", key, new="1"))
    assert schedule.next_action(0.0) == WaitUntil(1.0)
    delivery = schedule.start(5.0, upto=2)
    assert delivery.frame is not None
    assert (delivery.frame.revision, delivery.frame.covers) == (2, [1, 2])
    assert [c.key for c in delivery.frame.changes] == ["a", "b"]
    assert schedule.finished(5.5, Outcome.OK).result == "ok"
    assert schedule.delivered == 2
    assert schedule.next_action(5.5) == WaitUntil(6.0)  # revision 3's window opened at 5.0
    rest = schedule.start(6.0, upto=9)
    assert rest.frame is not None
    assert [c.key for c in rest.frame.changes] == ["c"]


def test_a_limit_at_or_below_the_delivered_revision_runs_nothing() -> None:
    ledger = FakeLedger()
    schedule = HookSchedule(_hook(debounce=0.0), ledger)
    ledger.append(tag("added", "a", new="1"))
    assert schedule.start(0.0, upto=0).frame is None
    assert schedule.delivered == 0
    assert schedule.next_action(0.0) == READY
