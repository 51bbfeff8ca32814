"""Prometheus exposition: every family present, bounded labels, hook counters pulled."""

from __future__ import annotations

import re

from imdsd.api.metrics import Metrics, status_class
from imdsd.frames import Change
from imdsd.hooks.stats import HookCounters, HookMetrics

FAMILIES = {
    "imdsd_upstream_requests_total": "counter",
    "imdsd_upstream_throttled_total": "counter",
    "imdsd_budget_in_use": "gauge",
    "imdsd_fetch_duration_seconds": "histogram",
    "imdsd_revision": "gauge",
    "imdsd_changes_total": "counter",
    "imdsd_watchers": "gauge",
    "imdsd_watch_overflows_total": "counter",
    "imdsd_connections": "gauge",
    "imdsd_hook_runs_total": "counter",
    "imdsd_hook_failures_total": "counter",
    "imdsd_hook_duration_seconds": "summary",
}
SAMPLE = re.compile(r'^[a-z_]+(\{([a-z]+="[^"\\\n]*(\\.[^"\\\n]*)*",?)*\})? [-+0-9.eInfNa]+$')


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_every_family_is_always_present() -> None:
    text = Metrics().render().decode()
    for name, kind in FAMILIES.items():
        assert f"# HELP {name} " in text
        assert f"# TYPE {name} {kind}\n" in text
    for line in text.splitlines():
        assert line.startswith("#") or SAMPLE.match(line), line
    values = samples(text)
    assert values['imdsd_upstream_requests_total{endpoint="instance",class="5xx"}'] == 0
    assert values['imdsd_changes_total{kind="loadbalancer"}'] == 0
    assert text.endswith("\n")


def test_counters_histograms_and_gauges() -> None:
    metrics = Metrics()
    metrics.upstream_request("instance", 200)
    metrics.upstream_request("instance", 429)
    metrics.upstream_request("scheduled_events", None)
    metrics.upstream_request("/some/odd/path", 503)
    metrics.observe_fetch("instance", 0.03)
    metrics.observe_fetch("instance", 20.0)
    metrics.count_changes([Change("tags", "added", "a", None, "1")] * 2)
    metrics.watch_overflow()
    metrics.budget_in_use.set(2)
    metrics.watchers.track(lambda: 7)
    values = samples(metrics.render().decode())
    assert values['imdsd_upstream_requests_total{endpoint="instance",class="2xx"}'] == 1
    assert values['imdsd_upstream_requests_total{endpoint="instance",class="4xx"}'] == 1
    assert values['imdsd_upstream_requests_total{endpoint="scheduled_events",class="error"}'] == 1
    assert values['imdsd_upstream_requests_total{endpoint="other",class="5xx"}'] == 1
    assert values["imdsd_upstream_throttled_total"] == 1
    bucket = 'imdsd_fetch_duration_seconds_bucket{endpoint="instance",le="%s"}'
    assert values[bucket % "0.025"] == 0
    assert values[bucket % "0.05"] == 1
    assert values[bucket % "10"] == 1
    assert values[bucket % "+Inf"] == 2
    assert values['imdsd_fetch_duration_seconds_count{endpoint="instance"}'] == 2
    assert values['imdsd_fetch_duration_seconds_sum{endpoint="instance"}'] == 20.03
    assert values['imdsd_changes_total{kind="tags"}'] == 2
    assert values["imdsd_watch_overflows_total"] == 1
    assert values["imdsd_budget_in_use"] == 2
    assert values["imdsd_watchers"] == 7
    labels = {line.split("{")[0] for line in values if "endpoint=" in line}
    assert len([k for k in values if k.startswith("imdsd_upstream_requests_total")]) == 24
    assert labels == {
        "imdsd_upstream_requests_total",
        "imdsd_fetch_duration_seconds_bucket",
        "imdsd_fetch_duration_seconds_sum",
        "imdsd_fetch_duration_seconds_count",
    }


def test_hook_counters_are_pulled() -> None:
    source = HookMetrics({"remount": HookCounters(runs=5, failures=1, timeouts=1, give_ups=1)})
    metrics = Metrics(hooks=source)
    source.hooks['we"ird'] = HookCounters(runs=1, duration_sum=0.5, duration_count=1)
    values = samples(metrics.render().decode())
    assert values['imdsd_hook_runs_total{hook="remount",result="ok"}'] == 3
    assert values['imdsd_hook_runs_total{hook="remount",result="failed"}'] == 1
    assert values['imdsd_hook_runs_total{hook="remount",result="timeout"}'] == 1
    assert values['imdsd_hook_failures_total{hook="remount"}'] == 1
    assert values['imdsd_hook_duration_seconds_sum{hook="we\\"ird"}'] == 0.5
    assert values['imdsd_hook_duration_seconds_count{hook="we\\"ird"}'] == 1


def test_status_class() -> None:
    assert [status_class(s) for s in (200, 204, 304, 404, 429, 500, 599, None, 99)] == [
        "2xx",
        "2xx",
        "error",
        "4xx",
        "4xx",
        "5xx",
        "5xx",
        "error",
        "error",
    ]


def test_real_hook_metrics_fit() -> None:
    hooks = HookMetrics()
    hooks.of("remount").runs += 2
    values = samples(Metrics(hooks=hooks).render().decode())
    assert values['imdsd_hook_runs_total{hook="remount",result="ok"}'] == 2
