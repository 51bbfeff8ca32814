"""Retry policy for IMDS requests (sans-IO): what to do after each attempt.

:func:`decide` maps one attempt's :class:`Outcome` to :class:`Success`, :class:`Retry`,
:class:`FallbackVersion` or :class:`GiveUp`:

- 2xx: success.
- 400 whose body names ``newest-versions``: switch api-version (the caller negotiates).
- 410, and 404 on ``/metadata/instance`` (the VM is still being provisioned): jittered backoff
  capped at ``gone_cap`` for ``gone_window`` (70 s), then one retry per poll interval.
- 429: jittered backoff from ``throttle_base``; 500, 502, 503, 504 and every 3xx: jittered
  backoff from ``base`` (a redirect is never followed: IMDS does not send one, so it is a
  fault of whatever answers in its place, and is retried like a server error). A
  ``Retry-After`` (capped at ``retry_after_max``) is a floor: the delay is the larger of it
  and the backoff, so a ``Retry-After: 0`` storm still backs off (the IMDS limit
  is shared by every process on the VM).
- connection refused or failed, timeouts, resets, protocol errors and oversized answers:
  jittered exponential backoff from ``base``.
- anything else (other 4xx and 404 elsewhere, 501, ...): give up.

Backoff is "equal jitter": half of ``min(cap, base * factor**(attempt-1))`` fixed, the other
half random, so it never collapses to zero and never exceeds the cap. Retried requests still
go through the request budget; a delay here is a minimum, never a permission to burst.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal, Protocol

ErrorKind = Literal["connect", "timeout", "reset", "protocol", "too_large"]
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})


def is_redirect(status: int | None) -> bool:
    """True for a 3xx answer (never followed; retried like a server error)."""
    return status is not None and 300 <= status < 400


class Random(Protocol):
    """The part of :class:`random.Random` the policy uses (seedable in tests)."""

    def uniform(self, a: float, b: float) -> float:
        """A random float in ``[a, b]``."""
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt produced: an HTTP status, or a transport error kind.

    ``endpoint`` is the path key (``instance``, ``scheduled_events``, ``loadbalancer``,
    ``versions``, ``approve``). ``retry_after`` is already resolved to seconds.
    """

    endpoint: str
    status: int | None = None
    error: ErrorKind | None = None
    retry_after: float | None = None
    newest_versions: tuple[str, ...] = ()
    message: str = ""

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        """A short human description, e.g. ``"HTTP 429"`` or ``"timeout: no answer"``."""
        head = f"HTTP {self.status}" if self.status is not None else self.error or "error"
        return f"{head}: {self.message}" if self.message else head


@dataclass(frozen=True, slots=True)
class Success:
    """The attempt succeeded."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay`` seconds (and a budget slot)."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Do not retry this request; ``reason`` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class FallbackVersion:
    """The api-version was refused; ``newest_versions`` are the ones the endpoint offers."""

    newest_versions: tuple[str, ...]


Decision = Success | Retry | GiveUp | FallbackVersion


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Tunables of :func:`decide`; ``interval`` is the poll interval of the caller.

    ``deadline`` (seconds since the first failure) makes every retryable failure a give-up
    once passed; ``None`` retries forever (pollers never stop).
    """

    base: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    throttle_base: float = 1.0
    gone_window: float = 70.0
    gone_cap: float = 5.0
    retry_after_max: float = 120.0
    interval: float = 10.0
    deadline: float | None = None


DEFAULT_POLICY = RetryPolicy()


def backoff(attempt: int, rng: Random, *, base: float, factor: float, cap: float) -> float:
    """Equal-jitter exponential backoff for the ``attempt``-th consecutive failure (1-based)."""
    exponent = min(max(attempt, 1) - 1, 64)
    ceiling = min(cap, base * factor**exponent)
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


def decide(
    outcome: Outcome,
    attempt: int,
    first_failure_at: float,
    now: float,
    rng: Random,
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Decision:
    """What to do after an attempt.

    ``attempt`` counts consecutive failures including this one (1-based) and
    ``first_failure_at`` is when the first of them happened (same clock as ``now``).
    """
    if outcome.ok:
        return Success()
    status = outcome.status
    if status == 400 and outcome.newest_versions:
        return FallbackVersion(outcome.newest_versions)
    elapsed = max(0.0, now - first_failure_at)
    what = outcome.describe()
    if policy.deadline is not None and elapsed >= policy.deadline and _retryable(outcome):
        return GiveUp(f"{what} (still failing after {elapsed:.0f}s)")

    def exponential(base: float, cap: float) -> float:
        return backoff(attempt, rng, base=base, factor=policy.factor, cap=cap)

    if status == 410 or (status == 404 and outcome.endpoint == "instance"):
        if elapsed < policy.gone_window:
            return Retry(exponential(policy.base, policy.gone_cap), what)
        return Retry(max(policy.interval, policy.gone_cap), what)
    if is_redirect(status):
        return Retry(exponential(policy.base, policy.cap), f"{what} (redirects are not followed)")
    if status == 429 or status in RETRYABLE_STATUS:
        base = policy.throttle_base if status == 429 else policy.base
        delay = exponential(base, policy.cap)
        if outcome.retry_after is None:
            return Retry(delay, what)
        asked = _clamp(outcome.retry_after, policy.retry_after_max)
        return Retry(max(asked, delay), f"{what} (Retry-After {asked:g}s)")
    if status is None and outcome.error is not None:
        return Retry(exponential(policy.base, policy.cap), what)
    return GiveUp(what)


def _retryable(outcome: Outcome) -> bool:
    status = outcome.status
    if status is None:
        return outcome.error is not None
    return (
        status in (410, 429)
        or status in RETRYABLE_STATUS
        or is_redirect(status)
        or (status == 404 and outcome.endpoint == "instance")
    )


def _clamp(delay: float, limit: float) -> float:
    if math.isnan(delay):
        return 0.0
    return min(max(delay, 0.0), limit)


def parse_retry_after(value: str | None, *, date: str | None, wall_now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP date).

    An HTTP date is measured against the response's ``Date`` header when it has a valid
    one (immune to local clock skew), else against ``wall_now`` (unix time). Unparseable
    values give ``None``; dates in the past give ``0``.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    target = _http_date(text)
    if target is None:
        return None
    reference = _http_date(date) if date else None
    base = reference if reference is not None else wall_now
    return max(0.0, target - base)


def _http_date(text: str) -> float | None:
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def classify(outcome: Outcome) -> Literal["throttled", "service", "unreachable", "rejected"]:
    """The health class of a failed outcome, as WALinuxAgent separates them.

    ``throttled``: 429. ``service``: 410, 5xx, 3xx, provisioning 404, broken HTTP and
    oversized answers. ``unreachable``: connect errors, timeouts, resets. ``rejected``: other 4xx.
    """
    status = outcome.status
    if status is None:
        return "service" if outcome.error in ("protocol", "too_large") else "unreachable"
    if status == 429:
        return "throttled"
    if (
        status == 410
        or status >= 500
        or is_redirect(status)
        or (status == 404 and outcome.endpoint == "instance")
    ):
        return "service"
    return "rejected"
