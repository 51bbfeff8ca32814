"""Pollers: fetch each IMDS document on its interval and hand good ones to a sink (trio shell).

- instance every ``poll.instance``; scheduled events every ``poll.scheduled_events`` (the
  first call may take up to 2 minutes, so it gets a 130 s read timeout); load balancer every
  ``poll.loadbalancer``, where a 404 means "no Standard Load Balancer": the sink is told, and
  the endpoint is re-probed hourly. ``0`` disables scheduled events or the load balancer.
- A document that does not validate (not JSON, wrong shape, truncated, too big) is a fetch
  error, never a new snapshot: the sink keeps the last good one.
- Scheduled events are handed over whole; filtering on ``Resources`` is the diff's job.
- A document the sink fails to take (the keeper raised) is a failed poll of class
  ``internal``: health is never ``ok`` over it, and it is fetched and offered again next
  round. Its error is logged with a traceback once per distinct error, not once per poll.
- Every failed attempt and every success feeds :mod:`imdsd.health`; state changes are
  logged once each. Nothing upstream does can end a poller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec
import structlog
import trio

from imdsd.config import Config
from imdsd.health import EndpointHealth, HealthBoard, Transition
from imdsd.model import (
    DocumentError,
    Instance,
    LoadBalancer,
    ScheduledEvents,
    Snapshot,
    parse_instance,
    parse_loadbalancer,
    parse_scheduled_events,
)
from imdsd.upstream.client import GaveUp, ImdsClient
from imdsd.upstream.retry import Decision, Outcome, RetryPolicy, classify
from imdsd.upstream.versions import Endpoint

log = structlog.get_logger("imdsd.poller")

ABSENT_REPROBE: Final = 3600.0
FIRST_SCHEDULED_EVENTS_TIMEOUT: Final = 130.0
REJECTED_PAUSE: Final = 60.0
HEALTH_CHECK_EVERY: Final = 1.0


class SnapshotSink(Protocol):
    """Receives every good document (typed and as the raw JSON object)."""

    async def instance(self, doc: Instance, raw: dict[str, Any]) -> None:
        """A new instance document."""

    async def scheduled_events(self, doc: ScheduledEvents, raw: dict[str, Any]) -> None:
        """A new scheduled events document (all events, unfiltered)."""

    async def loadbalancer(self, doc: LoadBalancer, raw: dict[str, Any]) -> None:
        """A new load balancer document."""

    async def loadbalancer_absent(self) -> None:
        """IMDS answered 404: this VM is not behind a Standard Load Balancer."""


class SnapshotHolder:
    """An in-memory :class:`SnapshotSink` keeping the latest :class:`Snapshot`."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.snapshot = snapshot if snapshot is not None else Snapshot()
        self.updates = 0
        self._changed = trio.Event()

    def _set(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.updates += 1
        self._changed.set()
        self._changed = trio.Event()

    async def instance(self, doc: Instance, raw: dict[str, Any]) -> None:
        """Keep this instance document."""
        self._set(msgspec.structs.replace(self.snapshot, instance=doc, instance_raw=raw))

    async def scheduled_events(self, doc: ScheduledEvents, raw: dict[str, Any]) -> None:
        """Keep this scheduled events document."""
        self._set(
            msgspec.structs.replace(self.snapshot, scheduled_events=doc, scheduled_events_raw=raw)
        )

    async def loadbalancer(self, doc: LoadBalancer, raw: dict[str, Any]) -> None:
        """Keep this load balancer document."""
        self._set(
            msgspec.structs.replace(
                self.snapshot, loadbalancer=doc, loadbalancer_raw=raw, loadbalancer_absent=False
            )
        )

    async def loadbalancer_absent(self) -> None:
        """Record that there is no load balancer."""
        self._set(self.snapshot.with_loadbalancer_absent())

    async def wait_for(self, predicate: Callable[[Snapshot], bool]) -> Snapshot:
        """Wait until ``predicate(snapshot)`` holds; returns that snapshot."""
        while not predicate(self.snapshot):
            await self._changed.wait()
        return self.snapshot


def log_transition(change: Transition) -> None:
    """One log line for one health state change."""
    fields: dict[str, Any] = {
        "endpoint": change.endpoint,
        "old": change.old,
        "new": change.new,
        "consecutive_failures": change.consecutive_failures,
    }
    if change.new in ("degraded", "stale"):
        log.warning("upstream state changed", error=change.error, **fields)
    else:
        log.info("upstream state changed", **fields)


def _note(change: Transition | None) -> None:
    if change is not None:
        log_transition(change)


@dataclass(frozen=True, slots=True)
class PollSpec:
    """What one poller fetches, how often, and its read timeout until the first success."""

    endpoint: Endpoint
    interval: float
    first_timeout: float | None = None

    @property
    def grace(self) -> float:
        """Extra startup allowance before health calls the endpoint stale."""
        return self.first_timeout or 0.0


def poll_specs(config: Config) -> list[PollSpec]:
    """The enabled pollers of ``config`` (a ``0`` interval disables one)."""
    specs = [PollSpec("instance", config.poll.instance)]
    if config.poll.scheduled_events > 0:
        specs.append(
            PollSpec(
                "scheduled_events",
                config.poll.scheduled_events,
                first_timeout=max(FIRST_SCHEDULED_EVENTS_TIMEOUT, config.imds.read_timeout),
            )
        )
    if config.poll.loadbalancer > 0:
        specs.append(PollSpec("loadbalancer", config.poll.loadbalancer))
    return specs


Deliver = Callable[[bytes], Awaitable[None]]


def _deliverer(endpoint: Endpoint, sink: SnapshotSink) -> Deliver:
    """Decode a body (raising DocumentError) and hand it to the sink's matching method."""

    async def instance(body: bytes) -> None:
        doc, raw = parse_instance(body)
        await _to_sink(sink.instance(doc, raw))

    async def scheduled_events(body: bytes) -> None:
        doc, raw = parse_scheduled_events(body)
        await _to_sink(sink.scheduled_events(doc, raw))

    async def loadbalancer(body: bytes) -> None:
        doc, raw = parse_loadbalancer(body)
        await _to_sink(sink.loadbalancer(doc, raw))

    table: dict[Endpoint, Deliver] = {
        "instance": instance,
        "scheduled_events": scheduled_events,
        "loadbalancer": loadbalancer,
    }
    return table[endpoint]


class ApplyFailed(Exception):
    """The sink raised while taking a good document; ``__cause__`` is its exception."""


async def _to_sink(call: Awaitable[None]) -> None:
    """Await a sink call; a :class:`DocumentError` passes, anything else is ApplyFailed."""
    try:
        await call
    except DocumentError:
        raise
    except Exception as exc:
        raise ApplyFailed(f"{type(exc).__name__}: {exc}"[:300]) from exc


class Poller:
    """Polls one endpoint forever; :meth:`poll_once` is one round (for tests)."""

    def __init__(
        self, spec: PollSpec, client: ImdsClient, sink: SnapshotSink, health: EndpointHealth
    ) -> None:
        self.spec = spec
        self.client = client
        self.sink = sink
        self.health = health
        # backoff never outlasts a poll interval, so recovery comes within one interval
        self.policy = RetryPolicy(interval=spec.interval, cap=min(RetryPolicy().cap, spec.interval))
        self.succeeded = False
        self._deliver = _deliverer(spec.endpoint, sink)
        self._internal_error: str | None = None

    def _internal(self, now: float, event: str, error: str, exc: Exception) -> None:
        """An ``internal`` failure; its traceback is logged once per distinct error."""
        if error != self._internal_error:
            self._internal_error = error
            log.error(event, endpoint=self.spec.endpoint, exc_info=exc)
        _note(self.health.record_failure(now, "internal", error))

    def _apply_failed(self, now: float, exc: ApplyFailed) -> None:
        self._internal(now, "snapshot consumer failed", f"apply failed: {exc}", exc)

    def _succeeded(self, now: float, *, absent: bool = False) -> None:
        self.succeeded = True
        self._internal_error = None
        _note(self.health.record_success(now, absent=absent))

    def _observe(self, outcome: Outcome, decision: Decision) -> None:
        del decision
        if self.spec.endpoint == "loadbalancer" and outcome.status == 404:
            return  # "no load balancer" is an answer, not a failure
        now = trio.current_time()
        _note(self.health.record_failure(now, classify(outcome), outcome.describe()))

    async def poll_once(self) -> float:
        """Fetch, validate and deliver once; returns the seconds to wait before the next round.

        After a success the next round starts ``interval`` after this one started; after a
        failure that the retry policy gave up on, ``interval`` (or longer) after it ended.
        """
        spec = self.spec
        started = trio.current_time()
        timeout = None if self.succeeded else spec.first_timeout
        try:
            fetched = await self.client.fetch(
                spec.endpoint, timeout=timeout, policy=self.policy, observer=self._observe
            )
        except GaveUp as exc:
            now = trio.current_time()
            if spec.endpoint == "loadbalancer" and exc.status == 404:
                try:
                    await _to_sink(self.sink.loadbalancer_absent())
                except ApplyFailed as failure:
                    self._apply_failed(now, failure)
                    return spec.interval
                self._succeeded(now, absent=True)
                return ABSENT_REPROBE
            log.debug("poll gave up", endpoint=spec.endpoint, reason=exc.reason)
            if classify(exc.outcome) == "rejected":
                return max(spec.interval, REJECTED_PAUSE)
            return spec.interval
        now = trio.current_time()
        try:
            await self._deliver(fetched.body)
        except DocumentError as exc:
            _note(self.health.record_failure(now, "invalid", str(exc)))
            return spec.interval
        except ApplyFailed as exc:
            self._apply_failed(now, exc)
            return spec.interval
        self._succeeded(now)
        return max(0.0, started + spec.interval - now)

    async def run(self) -> None:
        """Poll until cancelled; never raises otherwise."""
        while True:
            try:
                wait = await self.poll_once()
            except Exception as exc:
                error = f"internal: {type(exc).__name__}: {exc}"[:300]
                self._internal(trio.current_time(), "poller failed; retrying", error, exc)
                wait = self.spec.interval
            await trio.sleep(wait)


async def watch_health(board: HealthBoard, every: float = HEALTH_CHECK_EVERY) -> None:
    """Log transitions caused by time alone (a document turning stale), forever."""
    while True:
        await trio.sleep(every)
        for change in board.check(trio.current_time()):
            log_transition(change)


async def run_pollers(
    config: Config,
    client: ImdsClient,
    sink: SnapshotSink,
    board: HealthBoard,
    *,
    task_status: trio.TaskStatus[list[Poller]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start every enabled poller and the health watcher; runs until cancelled.

    ``task_status.started`` gets the pollers once they are running.
    """
    now = trio.current_time()
    pollers = []
    for spec in poll_specs(config):
        health = board.add(
            spec.endpoint, spec.interval, now, grace=spec.grace, absent_interval=ABSENT_REPROBE
        )
        pollers.append(Poller(spec, client, sink, health))
    log.info(
        "pollers starting",
        endpoints={p.spec.endpoint: p.spec.interval for p in pollers},
        budget=client.budget.rate,
        api_version=client.config.api_version,
    )
    async with trio.open_nursery() as nursery:
        for poller in pollers:
            nursery.start_soon(poller.run)
        nursery.start_soon(watch_health, board)
        task_status.started(pollers)
