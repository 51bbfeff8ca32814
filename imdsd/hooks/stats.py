"""Hook metrics (plain counters for /metrics) and status records (for ``imdsd status``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


@dataclass
class HookCounters:
    """Counters of one hook; they only grow while the daemon runs.

    ``runs`` counts every attempt (retries included), ``failures`` the attempts that exited
    non-zero or could not start, ``timeouts`` the ones killed for running too long,
    ``give_ups`` the deliveries abandoned after the last retry.
    """

    runs: int = 0
    failures: int = 0
    timeouts: int = 0
    give_ups: int = 0
    duration_sum: float = 0.0
    duration_count: int = 0


@dataclass
class HookMetrics:
    """Counters per hook name, read by the /metrics endpoint."""

    hooks: dict[str, HookCounters] = field(default_factory=dict)

    def of(self, name: str) -> HookCounters:
        """The counters of ``name``, created at zero on first use."""
        return self.hooks.setdefault(name, HookCounters())


class LastRun(msgspec.Struct, frozen=True):
    """The latest attempt of a hook: when (RFC 3339), result, exit code, seconds taken."""

    at: str
    result: str
    exit_code: int | None
    duration: float


class HookStatus(msgspec.Struct, frozen=True):
    """One hook in ``imdsd status``.

    ``pending_revisions`` counts undelivered revisions with changes of the hook's kinds;
    ``failures`` counts failed attempts of the delivery being retried, ``retry_in`` the
    seconds until its next attempt.
    """

    name: str
    kinds: list[str]
    source: str
    running: bool
    delivered_revision: int
    pending_revisions: int
    failures: int
    retry_in: float | None
    last_run: LastRun | None
