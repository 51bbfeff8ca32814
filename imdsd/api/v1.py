"""imdsd's own endpoints (sans-IO): ``/v1/state``, ``/v1/health``, ``/metrics``, and the checks
of the three routes that need I/O, which come back as a call for the trio shell to carry out:
:class:`WatchCall` (``/v1/watch``), :class:`EventsCall` (``/v1/events``) and
:class:`ApproveCall` (``POST /v1/scheduled-events/<id>/approve``).

imdsd is *starting* until the instance document is known: ``/v1/state``, ``/v1/watch`` and
``/v1/events`` answer 503 and ``/v1/health`` says ``starting``. ``/v1/state``'s ``fetched_at``
and headers carry the freshness of the whole state (:func:`~imdsd.api.reads.state_freshness`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from imdsd.api.access import AccessPolicy, Level, Peer
from imdsd.api.context import ApiContext
from imdsd.api.metrics import CONTENT_TYPE as METRICS_TYPE
from imdsd.api.metrics import Metrics
from imdsd.api.params import (
    MAX_WAIT,
    BadRequest,
    Query,
    parse_kinds,
    parse_revision,
    parse_wait,
    single,
)
from imdsd.api.reads import state_freshness
from imdsd.api.replies import Reply, ReplyCache, Slot, error, json_reply, validated_json
from imdsd.timestamps import format_timestamp


class WatchCall(NamedTuple):
    """``GET /v1/watch``: stream frames after ``since`` (None: start with a state frame)."""

    since: int | None
    kinds: frozenset[str] | None
    level: Level


class EventsCall(NamedTuple):
    """``GET /v1/events``: long poll for change frames after ``since``, up to ``wait`` s."""

    since: int
    kinds: frozenset[str] | None
    wait: float
    level: Level


class ApproveCall(NamedTuple):
    """``POST /v1/scheduled-events/<id>/approve`` by an allowed peer for a known event."""

    event_id: str
    peer: Peer | None


Outcome = Reply | WatchCall | EventsCall | ApproveCall


class OwnApi:
    """Answers imdsd's own endpoints; ``live`` gives the shell's numbers for ``/v1/health``."""

    def __init__(
        self,
        ctx: ApiContext,
        policy: AccessPolicy,
        metrics: Metrics,
        cache: ReplyCache,
        *,
        max_wait: float = MAX_WAIT,
        live: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.policy = policy
        self.metrics = metrics
        self.cache = cache
        self.max_wait = max_wait
        self.live = live or dict

    def ready(self) -> bool:
        """True once the instance document is known (before that, imdsd is starting)."""
        snapshot = self.ctx.snapshot
        return snapshot is not None and snapshot.instance_raw is not None

    def _state_slot(self) -> Slot | None:
        snapshot = self.ctx.snapshot
        if snapshot is None or snapshot.instance_raw is None:
            return None
        return self.cache.slot("state", snapshot, self.ctx.revision, state_freshness(self.ctx))

    def _state_reply(self, slot: Slot, level: Level) -> Reply:
        key = ("state", level)
        reply = slot.entries.get(key)
        if reply is None:
            reply = slot.keep(key, validated_json(self._state_document(slot, level), slot.meta))
        return reply

    def _state_document(self, slot: Slot, level: Level) -> dict[str, Any]:
        snapshot = self.ctx.snapshot
        assert snapshot is not None
        instance = snapshot.instance_raw
        if level == "redacted" and instance is not None:
            instance = self.policy.redact_instance(instance)
        fetched = slot.fresh.fetched_at
        return {
            "revision": slot.revision,
            "fetched_at": None if fetched is None else format_timestamp(fetched),
            "stale": slot.fresh.stale,
            "instance": instance,
            "scheduled_events": snapshot.scheduled_events_raw,
            "loadbalancer": snapshot.loadbalancer_raw,
        }

    def state_body(self, level: Level) -> tuple[int, bytes] | None:
        """The revision and encoded ``/v1/state`` document for ``level`` (None: no snapshot)."""
        slot = self._state_slot()
        if slot is None:
            return None
        return slot.revision, self._state_reply(slot, level).body

    def state_line(self, level: Level) -> tuple[int, bytes] | None:
        """The watch state frame line (with newline) for ``level`` (None: no snapshot)."""
        found = self.state_body(level)
        if found is None:
            return None
        revision, body = found
        return revision, b'{"type":"state","revision":%d,"state":%s}\n' % (revision, body)

    def state(self, query: Query, inm: str | None, peer: Peer | None) -> Reply:
        """``GET /v1/state``."""
        slot = self._state_slot()
        if slot is None:
            return error(503, "no instance document yet: imdsd is starting")
        reply = self._state_reply(slot, self.policy.level(peer))
        return slot.answer(reply, inm)

    def health(self, query: Query, inm: str | None, peer: Peer | None) -> Reply:
        """``GET /v1/health``: 200 ok/degraded, 503 starting."""
        details = dict(self.ctx.health())
        status = details.pop("status", "ok")
        if status == "starting" or not self.ready():
            return json_reply(503, {"status": "starting"})  # CONTRACT 3, exactly
        body: dict[str, Any] = {"status": status, **details}
        body.setdefault("revision", self.ctx.revision)
        for name, value in self.live().items():
            body.setdefault(name, value)
        body.setdefault("hooks", list(self.ctx.hook_status()))
        return json_reply(200, body)

    def metrics_text(self, query: Query, inm: str | None, peer: Peer | None) -> Reply:
        """``GET /metrics``."""
        return Reply(200, [(b"content-type", METRICS_TYPE)], self.metrics.render())

    def watch(self, query: Query, inm: str | None, peer: Peer | None) -> Outcome:
        """``GET /v1/watch[?since=REV][&kinds=...]``."""
        params = single(query, ("since", "kinds"))
        since = params.get("since")
        call = WatchCall(
            None if since is None else parse_revision("since", since),
            parse_kinds(params.get("kinds")),
            self.policy.level(peer),
        )
        if not self.ready():
            return error(503, "no instance document yet: imdsd is starting")
        return call

    def events(self, query: Query, inm: str | None, peer: Peer | None) -> Outcome:
        """``GET /v1/events?since=REV[&kinds=...][&wait=30s]``."""
        params = single(query, ("since", "kinds", "wait"))
        if "since" not in params:
            raise BadRequest("since is required, e.g. /v1/events?since=42")
        call = EventsCall(
            parse_revision("since", params["since"]),
            parse_kinds(params.get("kinds")),
            parse_wait(params.get("wait"), cap=self.max_wait),
            self.policy.level(peer),
        )
        if not self.ready():
            return error(503, "no instance document yet: imdsd is starting")
        return call

    def approve(self, event_id: str, peer: Peer | None) -> Outcome:
        """``POST /v1/scheduled-events/<EventId>/approve``: checks before going upstream."""
        if not self.policy.privileged(peer):
            who = f"uid {peer.uid} gid {peer.gid}" if peer else "this peer"
            return error(403, f"{who} may not approve scheduled events")
        snapshot = self.ctx.snapshot
        if snapshot is None:
            return error(503, "no snapshot yet: imdsd is starting")
        if snapshot.scheduled_events is None:
            return error(404, f"unknown scheduled event {event_id!r}: none fetched yet")
        for event in snapshot.scheduled_events.events:
            if event.event_id.lower() == event_id.lower():
                return ApproveCall(event.event_id, peer)
        return error(404, f"unknown scheduled event {event_id!r} in the current snapshot")
