"""Retry policy: a table of outcomes and what decide() does with them."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from imdsd.upstream.retry import (
    Decision,
    FallbackVersion,
    GiveUp,
    Outcome,
    Retry,
    RetryPolicy,
    Success,
    backoff,
    classify,
    decide,
    parse_retry_after,
)

POLICY = RetryPolicy(interval=10.0)


def run(outcome: Outcome, attempt: int = 1, elapsed: float = 0.0, seed: int = 1) -> Decision:
    return decide(outcome, attempt, 1000.0, 1000.0 + elapsed, random.Random(seed), policy=POLICY)


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (Outcome("instance", status=200), Success),
        (Outcome("instance", status=204), Success),
        (Outcome("instance", status=410), Retry),
        (Outcome("instance", status=404), Retry),
        (Outcome("loadbalancer", status=404), GiveUp),
        (Outcome("scheduled_events", status=404), GiveUp),
        (Outcome("instance", status=429), Retry),
        (Outcome("instance", status=500), Retry),
        (Outcome("instance", status=502), Retry),
        (Outcome("instance", status=503), Retry),
        (Outcome("instance", status=504), Retry),
        (Outcome("instance", status=501), GiveUp),
        (Outcome("instance", status=400), GiveUp),
        (Outcome("instance", status=400, newest_versions=("2020-10-01",)), FallbackVersion),
        (Outcome("instance", status=401), GiveUp),
        (Outcome("instance", status=403), GiveUp),
        (Outcome("instance", status=405), GiveUp),
        (Outcome("instance", status=302), Retry),
        (Outcome("instance", error="connect"), Retry),
        (Outcome("instance", error="timeout"), Retry),
        (Outcome("instance", error="reset"), Retry),
        (Outcome("instance", error="protocol"), Retry),
        (Outcome("instance", error="too_large"), Retry),
    ],
)
def test_decision_kinds(outcome: Outcome, expected: type) -> None:
    assert isinstance(run(outcome), expected)


def test_fallback_carries_versions() -> None:
    decision = run(Outcome("instance", status=400, newest_versions=("2021-05-01", "2021-03-01")))
    assert decision == FallbackVersion(("2021-05-01", "2021-03-01"))


@pytest.mark.parametrize("status", [410, 404])
def test_gone_is_retried_quickly_for_70s_then_at_the_poll_interval(status: int) -> None:
    outcome = Outcome("instance", status=status)
    clock = 0.0
    attempt = 0
    while True:
        attempt += 1
        decision = run(outcome, attempt, clock, seed=attempt)
        assert isinstance(decision, Retry)
        if clock >= 70.0:
            assert decision.delay == 10.0
            break
        assert 0 < decision.delay <= POLICY.gone_cap
        clock += decision.delay
    assert attempt > 14  # many fast retries within the window, never a give-up
    for later in (75.0, 600.0, 86400.0):
        decision = run(outcome, attempt + 1, later)
        assert decision == Retry(10.0, "HTTP " + str(status))


def test_backoff_grows_with_jitter_and_cap() -> None:
    rng = random.Random(7)
    for attempt in range(1, 30):
        ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(20):
            delay = backoff(attempt, rng, base=0.5, factor=2.0, cap=30.0)
            assert ceiling / 2 <= delay <= ceiling
    assert backoff(10_000, rng, base=0.5, factor=2.0, cap=30.0) <= 30.0


def test_backoff_is_jittered() -> None:
    delays = {backoff(4, random.Random(seed), base=0.5, factor=2.0, cap=30.0) for seed in range(20)}
    assert len(delays) == 20


def test_server_errors_never_give_up_without_deadline() -> None:
    decision = run(Outcome("instance", status=500), attempt=500, elapsed=86400.0)
    assert isinstance(decision, Retry)
    assert decision.delay <= 30.0


def test_deadline_gives_up_retryable_failures() -> None:
    policy = RetryPolicy(deadline=30.0)
    for outcome in [
        Outcome("approve", status=500),
        Outcome("approve", status=429, retry_after=5),
        Outcome("approve", error="timeout"),
        Outcome("instance", status=410),
    ]:
        before = decide(outcome, 3, 0.0, 29.0, random.Random(1), policy=policy)
        after = decide(outcome, 3, 0.0, 30.0, random.Random(1), policy=policy)
        assert isinstance(before, Retry)
        assert isinstance(after, GiveUp)
        assert "still failing after 30s" in after.reason


REDIRECTS = [300, 301, 302, 303, 304, 305, 307, 308, 399]


@pytest.mark.parametrize("endpoint", ["instance", "scheduled_events", "loadbalancer", "approve"])
@pytest.mark.parametrize("status", REDIRECTS)
def test_every_3xx_is_a_service_error_with_the_usual_backoff(endpoint: str, status: int) -> None:
    """Never followed, never a long pause: retried like a 500, with its backoff and cap."""
    outcome = Outcome(endpoint, status=status)
    assert classify(outcome) == "service"
    for attempt in (1, 2, 5, 40):
        decision = run(outcome, attempt=attempt, elapsed=3600.0, seed=attempt)
        like_500 = run(Outcome(endpoint, status=500), attempt=attempt, elapsed=3600.0, seed=attempt)
        assert isinstance(decision, Retry)
        assert isinstance(like_500, Retry)
        assert decision.delay == like_500.delay
        assert "not followed" in decision.reason
    policy = RetryPolicy(deadline=30.0)
    assert isinstance(decide(outcome, 3, 0.0, 29.0, random.Random(1), policy=policy), Retry)
    assert isinstance(decide(outcome, 3, 0.0, 30.0, random.Random(1), policy=policy), GiveUp)


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (429, 7.0, 7.0),
        (429, 100000.0, 120.0),
        (503, 3.0, 3.0),
        (500, 2.0, 2.0),
    ],
)
def test_retry_after_is_honoured(status: int, retry_after: float, expected: float) -> None:
    decision = run(Outcome("instance", status=status, retry_after=retry_after), attempt=1)
    assert isinstance(decision, Retry)
    assert decision.delay == expected
    assert "Retry-After" in decision.reason


def test_retry_after_is_a_floor_not_a_licence_to_hammer() -> None:
    first = run(Outcome("instance", status=429, retry_after=0.0), attempt=1)
    ninth = run(Outcome("instance", status=429, retry_after=7.0), attempt=9)
    assert isinstance(first, Retry)
    assert isinstance(ninth, Retry)
    assert 0.5 <= first.delay <= 1.0
    assert 15.0 <= ninth.delay <= 30.0


def test_429_without_retry_after_backs_off_from_one_second() -> None:
    first = run(Outcome("instance", status=429), attempt=1)
    fifth = run(Outcome("instance", status=429), attempt=5)
    assert isinstance(first, Retry)
    assert isinstance(fifth, Retry)
    assert 0.5 <= first.delay <= 1.0
    assert 8.0 <= fifth.delay <= 16.0


@pytest.mark.parametrize(
    ("value", "date", "expected"),
    [
        (None, None, None),
        ("", None, None),
        ("120", None, 120.0),
        (" 5 ", None, 5.0),
        ("1.5", None, 1.5),
        ("-3", None, None),
        ("nan", None, None),
        ("soon", None, None),
        (formatdate(1_000_030, usegmt=True), None, 30.0),
        (formatdate(999_000, usegmt=True), None, 0.0),
        # measured against the server's Date header when present
        (formatdate(5_000_010, usegmt=True), formatdate(5_000_000, usegmt=True), 10.0),
        (formatdate(5_000_010, usegmt=True), "garbage", 4_000_010.0),
    ],
)
def test_parse_retry_after(value: str | None, date: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, date=date, wall_now=1_000_000.0) == expected


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (Outcome("instance", status=429), "throttled"),
        (Outcome("instance", status=410), "service"),
        (Outcome("instance", status=500), "service"),
        (Outcome("instance", status=503), "service"),
        (Outcome("instance", status=404), "service"),
        (Outcome("loadbalancer", status=404), "rejected"),
        (Outcome("instance", status=403), "rejected"),
        (Outcome("instance", error="connect"), "unreachable"),
        (Outcome("instance", error="timeout"), "unreachable"),
        (Outcome("instance", error="reset"), "unreachable"),
        (Outcome("instance", error="protocol"), "service"),
        (Outcome("instance", error="too_large"), "service"),
    ],
)
def test_classify(outcome: Outcome, expected: str) -> None:
    assert classify(outcome) == expected


def test_describe() -> None:
    assert Outcome("instance", status=429).describe() == "HTTP 429"
    assert Outcome("instance", error="timeout", message="no answer").describe() == (
        "timeout: no answer"
    )
