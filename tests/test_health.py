"""Health state machine: states, transitions (only on change), counters and JSON."""

from __future__ import annotations

import pytest

from imdsd.health import EndpointHealth, HealthBoard, Status, Transition, daemon_status


def fresh(interval: float = 10.0, grace: float = 0.0) -> EndpointHealth:
    return EndpointHealth("instance", interval, 100.0, grace=grace)


@pytest.mark.parametrize(
    ("steps", "now", "expected"),
    [
        ([], 100.0, "starting"),
        ([], 130.0, "starting"),
        ([], 130.1, "stale"),
        ([("fail", 101.0)], 102.0, "degraded"),
        ([("fail", 101.0)], 131.0, "stale"),
        ([("ok", 101.0)], 102.0, "ok"),
        ([("ok", 101.0)], 131.0, "ok"),
        ([("ok", 101.0)], 131.1, "stale"),
        ([("ok", 101.0), ("fail", 111.0)], 112.0, "degraded"),
        ([("ok", 101.0), ("fail", 111.0), ("fail", 140.0)], 140.0, "stale"),
        ([("ok", 101.0), ("fail", 111.0), ("ok", 121.0)], 122.0, "ok"),
        ([("absent", 101.0)], 3000.0, "ok"),
        ([("absent", 101.0)], 101.0 + 3 * 3600 + 1, "stale"),
    ],
)
def test_state_table(steps: list[tuple[str, float]], now: float, expected: str) -> None:
    health = fresh()
    for what, at in steps:
        if what == "fail":
            health.record_failure(at, "service", "HTTP 500")
        else:
            health.record_success(at, absent=what == "absent")
    assert health.state(now) == expected


def test_grace_delays_staleness_before_the_first_success() -> None:
    health = EndpointHealth("scheduled_events", 1.0, 0.0, grace=130.0)
    assert health.state(100.0) == "starting"
    assert health.state(133.5) == "stale"
    health.record_success(120.0)
    assert health.state(122.0) == "ok"
    assert health.state(123.5) == "stale"


def test_transitions_only_on_change() -> None:
    health = fresh()
    assert health.record_success(101.0) == Transition("instance", "starting", "ok", None, 0)
    assert health.record_success(111.0) is None
    first = health.record_failure(112.0, "throttled", "HTTP 429")
    assert first == Transition("instance", "ok", "degraded", "HTTP 429", 1)
    for at in range(113, 140):
        assert health.record_failure(float(at), "throttled", "HTTP 429") is None
    assert health.check(141.5) == Transition("instance", "degraded", "stale", "HTTP 429", 28)
    assert health.check(142.0) is None
    assert health.record_success(150.0) == Transition("instance", "stale", "ok", "HTTP 429", 0)


def test_failures_are_counted_by_class() -> None:
    health = fresh()
    health.record_failure(101.0, "throttled", "HTTP 429")
    health.record_failure(102.0, "throttled", "HTTP 429")
    health.record_failure(103.0, "service", "HTTP 410")
    health.record_failure(104.0, "unreachable", "timeout")
    health.record_failure(105.0, "invalid", "invalid instance document")
    health.record_failure(106.0, "internal", "apply failed: RecursionError")
    assert health.failures == {
        "throttled": 2,
        "service": 1,
        "unreachable": 1,
        "rejected": 0,
        "invalid": 1,
        "internal": 1,
    }
    assert health.consecutive_failures == 6
    assert health.last_error == "apply failed: RecursionError"


def test_json_view() -> None:
    health = fresh()
    health.record_success(101.0)
    health.record_failure(105.0, "service", "HTTP 500")
    view = health.to_json(110.0, wall_now=1_700_000_010.0)
    assert view == {
        "state": "degraded",
        "interval": 10.0,
        "absent": False,
        "last_success": "2023-11-14T22:13:21.000Z",
        "age_seconds": 9.0,
        "last_error": "HTTP 500",
        "last_error_at": "2023-11-14T22:13:25.000Z",
        "consecutive_failures": 1,
        "successes": 1,
        "failures": {
            "throttled": 0,
            "service": 1,
            "unreachable": 0,
            "rejected": 0,
            "invalid": 0,
            "internal": 0,
        },
    }


def test_board_status_and_time_driven_transitions() -> None:
    board = HealthBoard()
    board.add("instance", 10.0, 0.0)
    board.add("scheduled_events", 1.0, 0.0, grace=130.0)
    assert board.status(1.0) == "starting"
    board["instance"].record_success(1.0)
    assert board.status(2.0) == "degraded"  # scheduled events still starting
    board["scheduled_events"].record_success(2.0)
    assert board.status(2.5) == "ok"
    assert board.check(3.0) == []
    changes = board.check(20.0)
    assert [(c.endpoint, c.old, c.new) for c in changes] == [("scheduled_events", "ok", "stale")]
    assert board.check(20.0) == []
    view = board.to_json(20.0, 1_700_000_000.0)
    assert view["status"] == "degraded"
    assert set(view["upstream"]) == {"instance", "scheduled_events"}
    assert view["upstream"]["scheduled_events"]["state"] == "stale"


@pytest.mark.parametrize(
    ("upstream", "serving_state", "save_error", "expected"),
    [
        ("starting", False, None, ("starting", None)),
        ("starting", True, None, ("degraded", None)),  # persisted state served, upstream not yet
        ("starting", True, "disk full", ("degraded", None)),
        ("starting", False, "disk full", ("starting", None)),
        ("ok", True, None, ("ok", None)),
        ("ok", True, "disk full", ("degraded", "state not saved: disk full")),
        ("ok", False, "disk full", ("degraded", "state not saved: disk full")),
        ("degraded", True, None, ("degraded", None)),
        ("degraded", True, "disk full", ("degraded", None)),
    ],
)
def test_daemon_status_table(
    upstream: Status, serving_state: bool, save_error: str | None, expected: tuple[str, str | None]
) -> None:
    assert daemon_status(upstream, serving_state=serving_state, save_error=save_error) == expected
