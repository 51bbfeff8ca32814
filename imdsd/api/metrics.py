"""Prometheus metrics: a small registry the daemon updates, rendered in the text format.

Every family is always exposed (with ``# HELP`` and ``# TYPE``), and every label takes values
from a bounded set: upstream ``endpoint`` is one of :data:`UPSTREAM_ENDPOINTS` (anything else
counts as ``other``), status ``class`` is ``2xx``/``4xx``/``5xx`` or ``error`` (no answer, or
any other status), ``kind`` is one of the change kinds, ``hook`` is a configured hook name
and hook ``result`` is ``ok``/``failed``/``timeout``; front ``result`` is one of
:data:`FRONT_RESULTS`.

Counters are pushed (``metrics.upstream_request("instance", 200)``); gauges read a value set
with :meth:`Gauge.set` or a function given to :meth:`Gauge.track`; hook counters are pulled
from a :class:`HookCountersSource` (``imdsd.hooks.stats.HookMetrics``) at render time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from imdsd.frames import KINDS, Change

UPSTREAM_ENDPOINTS: tuple[str, ...] = (
    "instance",
    "scheduled_events",
    "loadbalancer",
    "versions",
    "approve",
    "other",
)
STATUS_CLASSES: tuple[str, ...] = ("2xx", "4xx", "5xx", "error")
FRONT_RESULTS: tuple[str, ...] = ("cached", "stale", "forwarded", "refused", "throttled", "error")
FETCH_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class HookCounters(Protocol):
    """The counters of one hook (``imdsd.hooks.stats.HookCounters``)."""

    @property
    def runs(self) -> int:
        """Every attempt, retries included."""

    @property
    def failures(self) -> int:
        """Attempts that exited non-zero or could not start."""

    @property
    def timeouts(self) -> int:
        """Attempts killed for running too long."""

    @property
    def give_ups(self) -> int:
        """Deliveries abandoned after the last retry."""

    @property
    def duration_sum(self) -> float:
        """Seconds spent in all attempts."""

    @property
    def duration_count(self) -> int:
        """Attempts whose duration is in ``duration_sum``."""


class HookCountersSource(Protocol):
    """Anything with a ``hooks`` mapping of hook name to :class:`HookCounters`."""

    @property
    def hooks(self) -> Mapping[str, HookCounters]:
        """Counters per hook name."""


def status_class(status: int | None) -> str:
    """The ``class`` label of an upstream answer (None: no answer at all)."""
    if status is not None:
        if 200 <= status < 300:
            return "2xx"
        if 400 <= status < 500:
            return "4xx"
        if 500 <= status < 600:
            return "5xx"
    return "error"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{name}="{_label(value)}"' for name, value in pairs)
    return "{" + inner + "}" if inner else ""


class Gauge:
    """A value set directly or read from a function at render time."""

    def __init__(self) -> None:
        self._value = 0.0
        self._source: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        """Set the value (and stop tracking a function)."""
        self._value = value
        self._source = None

    def track(self, source: Callable[[], float]) -> None:
        """Read the value from ``source()`` whenever it is needed."""
        self._source = source

    def value(self) -> float:
        """The current value."""
        return self._source() if self._source is not None else self._value


class Histogram:
    """Cumulative bucket counts, sum and count of observations."""

    def __init__(self, buckets: tuple[float, ...] = FETCH_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.count += 1


class Metrics:
    """The daemon's metrics; render with :meth:`render`."""

    def __init__(self, hooks: HookCountersSource | None = None) -> None:
        self.hooks = hooks
        self.upstream_requests = {
            (endpoint, cls): 0 for endpoint in UPSTREAM_ENDPOINTS for cls in STATUS_CLASSES
        }
        self.upstream_throttled = 0
        self.fetch_duration = {endpoint: Histogram() for endpoint in UPSTREAM_ENDPOINTS}
        self.changes = dict.fromkeys(KINDS, 0)
        self.watch_overflows = 0
        self.budget_in_use = Gauge()
        self.budget_rate = Gauge()
        self.budget_waiting = Gauge()
        self.upstream_freshness: Callable[[], Mapping[str, tuple[bool, float | None]]] | None = None
        self.revision = Gauge()
        self.state_save_failures = Gauge()
        self.state_saved = Gauge()
        self.state_last_save = Gauge()
        self.watchers = Gauge()
        self.connections = Gauge()
        self.front_requests: dict[str, int] = dict.fromkeys(FRONT_RESULTS, 0)
        self.front_waiting = Gauge()

    @staticmethod
    def _endpoint(endpoint: str) -> str:
        return endpoint if endpoint in UPSTREAM_ENDPOINTS else "other"

    def upstream_request(self, endpoint: str, status: int | None) -> None:
        """Count one upstream request and its answer (None: no answer, e.g. a timeout)."""
        key = (self._endpoint(endpoint), status_class(status))
        self.upstream_requests[key] += 1
        if status == 429:
            self.upstream_throttled += 1

    def observe_fetch(self, endpoint: str, seconds: float) -> None:
        """Record how long one fetch of ``endpoint`` took (retries and waits included)."""
        self.fetch_duration[self._endpoint(endpoint)].observe(seconds)

    def count_changes(self, changes: Iterable[Change]) -> None:
        """Count published changes by kind."""
        for change in changes:
            if change.kind in self.changes:
                self.changes[change.kind] += 1

    def watch_overflow(self) -> None:
        """Count one watcher closed with an overflow frame."""
        self.watch_overflows += 1

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every family."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def sample(name: str, value: float, *labels: tuple[str, str]) -> None:
            out.append(f"{name}{_labels(labels)} {_number(value)}")

        family(
            "imdsd_upstream_requests_total",
            "counter",
            "Requests sent to IMDS by endpoint and answer class (error: no answer).",
        )
        for (endpoint, cls), count in self.upstream_requests.items():
            sample("imdsd_upstream_requests_total", count, ("endpoint", endpoint), ("class", cls))
        family("imdsd_upstream_throttled_total", "counter", "IMDS answers 429 (throttled).")
        sample("imdsd_upstream_throttled_total", self.upstream_throttled)
        family("imdsd_budget_in_use", "gauge", "Upstream requests sent within the last second.")
        sample("imdsd_budget_in_use", self.budget_in_use.value())
        family("imdsd_budget_rate", "gauge", "Upstream requests allowed per second (the budget).")
        sample("imdsd_budget_rate", self.budget_rate.value())
        family("imdsd_budget_waiting", "gauge", "Upstream requests waiting for the budget now.")
        sample("imdsd_budget_waiting", self.budget_waiting.value())
        freshness = dict(self.upstream_freshness()) if self.upstream_freshness else {}
        family(
            "imdsd_upstream_stale",
            "gauge",
            "1 when an enabled endpoint's data is stale (no good fetch for 3 poll intervals).",
        )
        for endpoint, (stale, _age) in freshness.items():
            sample("imdsd_upstream_stale", int(stale), ("endpoint", self._endpoint(endpoint)))
        family(
            "imdsd_data_age_seconds",
            "gauge",
            "Seconds since the last good fetch of an enabled endpoint (absent before the first).",
        )
        for endpoint, (_stale, age) in freshness.items():
            if age is not None:
                sample("imdsd_data_age_seconds", age, ("endpoint", self._endpoint(endpoint)))
        family(
            "imdsd_fetch_duration_seconds",
            "histogram",
            "Time to fetch one IMDS document, retries included, by endpoint.",
        )
        for endpoint, hist in self.fetch_duration.items():
            name = "imdsd_fetch_duration_seconds"
            for bound, count in zip(hist.buckets, hist.counts, strict=True):
                sample(f"{name}_bucket", count, ("endpoint", endpoint), ("le", _number(bound)))
            sample(f"{name}_bucket", hist.count, ("endpoint", endpoint), ("le", "+Inf"))
            sample(f"{name}_sum", hist.total, ("endpoint", endpoint))
            sample(f"{name}_count", hist.count, ("endpoint", endpoint))
        family("imdsd_revision", "gauge", "Current revision of the cached state.")
        sample("imdsd_revision", self.revision.value())
        family("imdsd_state_save_failures_total", "counter", "State saves that failed (retried).")
        sample("imdsd_state_save_failures_total", self.state_save_failures.value())
        family("imdsd_state_saved", "gauge", "1 when the last state save succeeded, else 0.")
        sample("imdsd_state_saved", self.state_saved.value())
        family(
            "imdsd_state_last_save_timestamp_seconds",
            "gauge",
            "Unix time of the last successful state save (0: none since start).",
        )
        sample("imdsd_state_last_save_timestamp_seconds", self.state_last_save.value())
        family("imdsd_changes_total", "counter", "Changes published, by kind.")
        for kind, count in self.changes.items():
            sample("imdsd_changes_total", count, ("kind", kind))
        family("imdsd_watchers", "gauge", "Open watch streams and long polls.")
        sample("imdsd_watchers", self.watchers.value())
        family(
            "imdsd_watch_overflows_total",
            "counter",
            "Watchers closed with an overflow frame because they fell behind.",
        )
        sample("imdsd_watch_overflows_total", self.watch_overflows)
        family("imdsd_connections", "gauge", "Open connections to the local API socket.")
        sample("imdsd_connections", self.connections.value())
        family("imdsd_front_requests_total", "counter", "IMDS front requests by how answered.")
        for result in FRONT_RESULTS:
            count = self.front_requests.get(result, 0)
            sample("imdsd_front_requests_total", count, ("result", result))
        family("imdsd_front_waiting", "gauge", "Front requests waiting for upstream capacity.")
        sample("imdsd_front_waiting", self.front_waiting.value())
        self._render_hooks(family, sample)
        return ("\n".join(out) + "\n").encode()

    def _render_hooks(
        self,
        family: Callable[[str, str, str], None],
        sample: Callable[..., None],
    ) -> None:
        hooks = dict(self.hooks.hooks) if self.hooks is not None else {}
        family("imdsd_hook_runs_total", "counter", "Hook attempts by result (ok/failed/timeout).")
        for name, c in hooks.items():
            ok = max(c.runs - c.failures - c.timeouts, 0)
            for result, count in (("ok", ok), ("failed", c.failures), ("timeout", c.timeouts)):
                sample("imdsd_hook_runs_total", count, ("hook", name), ("result", result))
        family(
            "imdsd_hook_failures_total",
            "counter",
            "Hook deliveries given up after the last retry.",
        )
        for name, c in hooks.items():
            sample("imdsd_hook_failures_total", c.give_ups, ("hook", name))
        family("imdsd_hook_duration_seconds", "summary", "Time hook attempts took.")
        for name, c in hooks.items():
            sample("imdsd_hook_duration_seconds_sum", c.duration_sum, ("hook", name))
            sample("imdsd_hook_duration_seconds_count", c.duration_count, ("hook", name))
