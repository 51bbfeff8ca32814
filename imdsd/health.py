"""Upstream health per endpoint (sans-IO): counters, state machine and JSON view.

States, judged at a time ``now`` with ``stale_after = 3 * interval``:

- ``starting``: nothing fetched yet, no failure yet, and not yet ``stale_after`` (plus the
  endpoint's ``grace``, e.g. the 2-minute first Scheduled Events call) since start;
- ``ok``: the last attempt succeeded and the last good document is recent;
- ``degraded``: the last attempt failed but the last good document is recent (or, before any
  success, failures within the startup allowance);
- ``stale``: the last good document is older than ``stale_after``, or nothing was fetched
  within ``stale_after + grace`` of the start.

While the load balancer is absent (404), its interval is the hourly re-probe interval.
Failures are counted by class as WALinuxAgent does: ``throttled`` (429) apart from
``service`` (410, 5xx, broken answers) and ``unreachable`` (connect errors, timeouts,
resets); ``rejected`` (other 4xx) and ``invalid`` (a document that does not validate) too,
and ``internal``: a good document imdsd failed to apply (a bug or a local fault, never ok).
Recording returns a :class:`Transition` only when the state changed, so the shell logs one
line per change, not one per failed retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from imdsd.timestamps import format_timestamp

State = Literal["starting", "ok", "degraded", "stale"]
Status = Literal["starting", "ok", "degraded"]
FailureClass = Literal["throttled", "service", "unreachable", "rejected", "invalid", "internal"]
FAILURE_CLASSES: tuple[FailureClass, ...] = (
    "throttled",
    "service",
    "unreachable",
    "rejected",
    "invalid",
    "internal",
)
STALE_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class Transition:
    """An endpoint's state changed from ``old`` to ``new``; ``error`` is the last error."""

    endpoint: str
    old: State
    new: State
    error: str | None
    consecutive_failures: int


@dataclass(slots=True)
class EndpointHealth:
    """Health of one upstream endpoint; times are on the caller's monotonic clock."""

    name: str
    interval: float
    started_at: float
    grace: float = 0.0
    absent_interval: float = 3600.0
    last_success: float | None = None
    last_attempt: float | None = None
    last_attempt_ok: bool = False
    last_error: str | None = None
    last_error_at: float | None = None
    consecutive_failures: int = 0
    successes: int = 0
    failures: dict[FailureClass, int] = field(
        default_factory=lambda: dict.fromkeys(FAILURE_CLASSES, 0)
    )
    absent: bool = False
    reported: State = "starting"

    @property
    def stale_after(self) -> float:
        """Age of the last good document beyond which the endpoint is stale."""
        interval = self.absent_interval if self.absent else self.interval
        return STALE_INTERVALS * interval

    def state(self, now: float) -> State:
        """The state at ``now``."""
        if self.last_success is None:
            if now - self.started_at > self.stale_after + self.grace:
                return "stale"
            return "degraded" if self.consecutive_failures else "starting"
        if now - self.last_success > self.stale_after:
            return "stale"
        return "ok" if self.last_attempt_ok else "degraded"

    def record_success(self, now: float, *, absent: bool = False) -> Transition | None:
        """A good document (or, with ``absent``, a 404 meaning "not here") at ``now``."""
        self.last_success = now
        self.last_attempt = now
        self.last_attempt_ok = True
        self.consecutive_failures = 0
        self.successes += 1
        self.absent = absent
        return self.check(now)

    def record_failure(self, now: float, kind: FailureClass, error: str) -> Transition | None:
        """A failed attempt of class ``kind`` at ``now``; ``error`` says what went wrong."""
        self.last_attempt = now
        self.last_attempt_ok = False
        self.last_error = error
        self.last_error_at = now
        self.consecutive_failures += 1
        self.failures[kind] += 1
        return self.check(now)

    def check(self, now: float) -> Transition | None:
        """The transition since the last reported state, if the state changed."""
        new = self.state(now)
        if new == self.reported:
            return None
        old, self.reported = self.reported, new
        return Transition(self.name, old, new, self.last_error, self.consecutive_failures)

    def to_json(self, now: float, wall_now: float) -> dict[str, Any]:
        """A JSON-ready view; ``wall_now`` (unix time) turns clock times into RFC 3339."""

        def wall(at: float | None) -> str | None:
            return None if at is None else format_timestamp(wall_now - (now - at))

        age = None if self.last_success is None else round(now - self.last_success, 3)
        return {
            "state": self.state(now),
            "interval": self.interval,
            "absent": self.absent,
            "last_success": wall(self.last_success),
            "age_seconds": age,
            "last_error": self.last_error,
            "last_error_at": wall(self.last_error_at),
            "consecutive_failures": self.consecutive_failures,
            "successes": self.successes,
            "failures": dict(self.failures),
        }


class HealthBoard:
    """The health of every enabled endpoint, with an overall status."""

    def __init__(self) -> None:
        self.endpoints: dict[str, EndpointHealth] = {}

    def add(
        self,
        name: str,
        interval: float,
        now: float,
        *,
        grace: float = 0.0,
        absent_interval: float = 3600.0,
    ) -> EndpointHealth:
        """Track endpoint ``name`` polled every ``interval`` seconds, starting at ``now``."""
        health = EndpointHealth(name, interval, now, grace=grace, absent_interval=absent_interval)
        self.endpoints[name] = health
        return health

    def __getitem__(self, name: str) -> EndpointHealth:
        return self.endpoints[name]

    def check(self, now: float) -> list[Transition]:
        """Transitions caused by time passing (e.g. a document turning stale)."""
        changes = [health.check(now) for health in self.endpoints.values()]
        return [change for change in changes if change is not None]

    def status(self, now: float) -> Status:
        """``starting`` until the instance document was fetched once, then ``ok`` when every
        endpoint is ok, else ``degraded``."""
        instance = self.endpoints.get("instance")
        if instance is not None and instance.last_success is None:
            return "starting"
        states = [health.state(now) for health in self.endpoints.values()]
        return "ok" if all(state == "ok" for state in states) else "degraded"

    def to_json(self, now: float, wall_now: float) -> dict[str, Any]:
        """``{"status": ..., "upstream": {name: {...}}}`` for ``status --json`` and /v1/health."""
        return {
            "status": self.status(now),
            "upstream": {
                name: health.to_json(now, wall_now) for name, health in self.endpoints.items()
            },
        }


def daemon_status(
    upstream: Status,
    *,
    serving_state: bool,
    save_error: str | None,
    front_error: str | None = None,
) -> tuple[Status, str | None]:
    """The daemon's status, and the reason when it is not the ``upstream`` status.

    Serving a persisted snapshot before upstream answered (``serving_state``) is ``degraded``,
    not ``starting``; ``ok`` upstream is ``degraded`` while the state cannot be saved (then
    the last revision on disk is what a restart would serve), or while the configured front
    or its redirect is not in place (``front_error``: agents reach IMDS directly).
    """
    if serving_state and upstream == "starting":
        return "degraded", None
    if save_error is not None and upstream == "ok":
        return "degraded", f"state not saved: {save_error}"
    if front_error is not None and upstream == "ok":
        return "degraded", front_error
    return upstream, None
