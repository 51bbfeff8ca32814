"""The front bench phase's figures (bench/front.py), from fabricated load results."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import front


def _load(statuses: dict[str, int], latency: list[float], ok: list[float]) -> dict[str, Any]:
    return {
        "statuses": statuses,
        "sources": {},
        "latency_ms": latency,
        "ok_ms": ok,
        "errors": 0,
        "cpu_seconds": 0.0,
    }


def test_identity_in_time_counts_only_200s_that_came_in_time() -> None:
    # five tokens answered 200 after queue_timeout, five refused at once: none in time
    late = [front.QUEUE_TIMEOUT * 1000 + 500.0] * 5
    tokens = _load({"200": 5, "429": 5}, late + [3.0] * 5, late)
    fig: dict[str, float] = {}
    stats = {"by_status": {}, "total": 0, "peak_rps": 0}
    agents = _load({"200": 2}, [1.0, 2.0], [1.0, 2.0])
    front._figures(fig, [], upstream=(stats, stats), agents=agents, tokens=tokens, work=(12, 0.012))
    assert fig["front_identity_in_time_pct"] == 0.0
    assert math.isclose(fig["front_cpu_us_per_request"], 1000.0)


def test_in_time_count() -> None:
    assert front.in_time_count([10.0, 5000.0, 5000.1], 5.0) == 2
    assert front.in_time_count([], 5.0) == 0
