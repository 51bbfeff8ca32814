"""Sans-IO tests of emulator faults and statistics (imdsd.emulator.faults, .stats)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imdsd.emulator.faults import Fault, FaultError, FaultQueue, parse_fault
from imdsd.emulator.stats import SlidingCount, Stats, peak_in_window

# ------------------------------------------------------------------------------ parse


def test_parse_the_contract_examples() -> None:
    assert parse_fault({"status": 410, "count": 5}) == Fault(count=5, status=410)
    assert parse_fault({"delay": "3s", "count": 2}) == Fault(count=2, delay=3.0)
    assert parse_fault({"reset": True, "count": 1}) == Fault(reset=True)
    assert parse_fault({"body": "not json", "count": 1}) == Fault(body=b"not json")


def test_parse_other_actions_and_keys() -> None:
    assert parse_fault({"oversize": 2_000_000}) == Fault(oversize=2_000_000)
    assert parse_fault({"truncate": True, "path": "/metadata/instance"}) == Fault(
        truncate=True, path="/metadata/instance"
    )
    assert parse_fault({"status": 429, "retry_after": 2}).retry_after == "2"
    assert parse_fault({"delay": 0.25, "status": 500}) == Fault(delay=0.25, status=500)
    assert parse_fault({"status": 503, "body": "{}"}) == Fault(status=503, body=b"{}")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], "a fault must be an object, got list"),
        ({}, "a fault needs one of status, body, reset, oversize, truncate, delay"),
        ({"count": 2}, "a fault needs one of"),
        ({"status": 410, "colour": 1}, "unknown fault key 'colour'"),
        ({"status": 99}, "status must be an integer from 200 to 599, got 99"),
        ({"status": "410"}, "status must be an integer"),
        ({"status": 410, "count": 0}, "count must be an integer from 1"),
        ({"status": 410, "count": True}, "count must be an integer"),
        ({"status": 410, "path": "metadata"}, "path must be a string starting with '/'"),
        ({"delay": "3 seconds"}, "delay '3 seconds'"),
        ({"delay": -1}, "delay must be from 0 to 3600 seconds"),
        ({"delay": "2h"}, "delay must be at most 1h"),
        ({"delay": True}, "delay must be a duration"),
        ({"reset": False}, "reset must be true, got False"),
        ({"truncate": 1}, "truncate must be true"),
        ({"body": 5}, "body must be a string"),
        ({"oversize": 1}, "oversize must be an integer from 16"),
        ({"retry_after": 3, "body": "x"}, "retry_after needs a status"),
        ({"status": 429, "retry_after": ""}, "retry_after must be seconds or an HTTP date"),
        ({"reset": True, "status": 500}, "a fault takes one action, got reset and status/body"),
        ({"oversize": 100, "truncate": True}, "got oversize and truncate"),
    ],
)
def test_parse_errors_name_the_key(spec: Any, message: str) -> None:
    with pytest.raises(FaultError) as info:
        parse_fault(spec)
    assert message in str(info.value)


def test_describe_lists_set_keys() -> None:
    assert parse_fault({"status": 429, "retry_after": 1, "count": 3}).describe() == {
        "count": 3,
        "path": "/metadata",
        "status": 429,
        "retry_after": "1",
    }
    assert parse_fault({"delay": "1s", "reset": True}).describe() == {
        "count": 1,
        "path": "/metadata",
        "delay": 1.0,
        "reset": True,
    }
    assert parse_fault({"body": "x"}).describe()["body"] == "x"
    assert parse_fault({"oversize": 64}).describe()["oversize"] == 64
    assert parse_fault({"truncate": True}).describe()["truncate"] is True


# ------------------------------------------------------------------------------ queue


def test_queue_takes_in_order_and_counts_down() -> None:
    queue = FaultQueue()
    queue.add(parse_fault({"status": 410, "count": 2}))
    queue.add(parse_fault({"status": 500}))
    taken = [queue.take("/metadata/instance") for _ in range(4)]
    assert [f.status if f else None for f in taken] == [410, 410, 500, None]
    assert len(queue) == 0


def test_queue_path_prefix_targets_one_endpoint() -> None:
    queue = FaultQueue()
    queue.add(parse_fault({"status": 429, "path": "/metadata/scheduledevents"}))
    assert queue.take("/metadata/instance") is None
    assert queue.take("/metadata/scheduledevents") is not None
    assert queue.take("/metadata/scheduledevents") is None


def test_queue_clear_and_pending() -> None:
    queue = FaultQueue()
    queue.add(parse_fault({"status": 410, "count": 3}))
    queue.take("/metadata/instance")
    assert queue.pending() == [{"count": 2, "path": "/metadata", "status": 410}]
    assert queue.clear() == 1
    assert queue.pending() == []


# ------------------------------------------------------------------------------ stats


def test_peak_in_window_examples() -> None:
    assert peak_in_window([]) == 0
    assert peak_in_window([0.0]) == 1
    assert peak_in_window([0.0, 0.5, 0.99, 1.0]) == 3  # 0.0 has left the window at 1.0
    assert peak_in_window([0.0, 0.1, 0.2, 5.0, 5.0, 5.0, 5.0]) == 4
    assert peak_in_window([3.0, 1.0, 2.5, 2.9], window=1.0) == 3


def brute_peak(times: list[float]) -> int:
    return max((sum(1 for u in times if t - 1.0 < u <= t) for t in times), default=0)


@given(st.lists(st.floats(0, 20, allow_nan=False).map(lambda x: round(x, 2)), max_size=40))
def test_peak_in_window_matches_brute_force(times: list[float]) -> None:
    assert peak_in_window(times) == brute_peak(times)


@given(st.lists(st.floats(0, 20, allow_nan=False).map(lambda x: round(x, 2)), max_size=40))
def test_stats_peak_rps_equals_peak_in_window(times: list[float]) -> None:
    stats = Stats()
    for now in sorted(times):
        stats.arrived("/metadata/instance", now)
    assert stats.peak_rps == peak_in_window(times)
    assert stats.total == len(times)


def test_sliding_count() -> None:
    window = SlidingCount(1.0)
    assert [window.add(t) for t in (0.0, 0.2, 0.4)] == [1, 2, 3]
    assert window.count(1.1) == 2
    assert window.count(1.5) == 0


def test_stats_counts_by_path_and_status() -> None:
    stats = Stats()
    stats.arrived("/metadata/instance", 0.0)
    stats.answered("/metadata/instance", 200)
    stats.arrived("/metadata/instance", 0.1)
    stats.answered("/metadata/instance", 429)
    stats.arrived("/metadata/versions", 2.0)
    stats.answered("/metadata/versions", "reset")
    assert stats.as_dict() == {
        "total": 3,
        "by_path": {"/metadata/instance": 2, "/metadata/versions": 1},
        "by_status": {"200": 1, "429": 1, "reset": 1},
        "by_path_status": {
            "/metadata/instance": {"200": 1, "429": 1},
            "/metadata/versions": {"reset": 1},
        },
        "peak_rps": 2,
    }
