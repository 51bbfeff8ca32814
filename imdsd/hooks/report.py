"""What a finished hook run means for the counters, and its log event (one per attempt)."""

from __future__ import annotations

import structlog
import trio

from imdsd.hooks.model import Hook
from imdsd.hooks.runner import RunResult
from imdsd.hooks.schedule import Delivery, Outcome, Verdict
from imdsd.hooks.stats import HookCounters

log = structlog.get_logger("imdsd.hooks")


def count_run(counters: HookCounters, result: RunResult) -> Outcome:
    """Count one attempt in ``counters``; returns what it means for the schedule.

    A start that failed for lack of resources counts as a failure here but is
    :attr:`Outcome.NOT_STARTED` for the schedule (retried without using up an attempt).
    """
    counters.runs += 1
    counters.duration_sum += result.duration
    counters.duration_count += 1
    if result.deferred:
        counters.failures += 1
        return Outcome.NOT_STARTED
    if result.timed_out:
        counters.timeouts += 1
        return Outcome.TIMEOUT
    if not result.ok:
        counters.failures += 1
        return Outcome.FAILED
    return Outcome.OK


def log_run(
    hook: Hook, delivery: Delivery, result: RunResult, outcome: Outcome, verdict: Verdict
) -> None:
    """One log event per attempt, with its output, exit status and duration."""
    frame = delivery.frame
    assert frame is not None
    fields: dict[str, object] = {
        "hook": hook.name,
        "revision": frame.revision,
        "attempt": delivery.attempt,
        "result": outcome.value,
        "exit_code": result.exit_code,
        "duration": round(result.duration, 3),
    }
    if frame.covers is not None:
        fields["covers"] = frame.covers
    if result.output:
        fields["output"] = result.output.decode("utf-8", "replace").rstrip("\n")
    if result.dropped:
        fields["output_dropped"] = result.dropped
    if result.leftovers:
        fields["leftovers_killed"] = True
    if result.error is not None:
        fields["error"] = result.error
    if verdict.result == "gave-up":
        log.error("hook gave up", retries=hook.retries, **fields)
    elif outcome is Outcome.OK:
        log.info("hook finished", **fields)
    else:
        retry_in = None if verdict.retry_at is None else verdict.retry_at - trio.current_time()
        log.warning(
            "hook failed", retry_in=None if retry_in is None else round(retry_in, 3), **fields
        )
