"""Request -> response for the local API (sans-IO): CONTRACT section 3.

:meth:`Router.route` answers every plain read with a :class:`~imdsd.api.replies.Reply`; the
three routes that need I/O come back as a call for the trio shell to carry out:
:class:`WatchCall` (``/v1/watch``), :class:`EventsCall` (``/v1/events``) and
:class:`ApproveCall`. The router only dispatches: the cached documents are read in
:mod:`imdsd.api.reads`, imdsd's own endpoints answered in :mod:`imdsd.api.v1`, replies and
their cache (ETags, 304, revision headers) built in :mod:`imdsd.api.replies` and query
parameters checked in :mod:`imdsd.api.params`.

:meth:`Router.route_target` finds a read of the instance document answered before by its raw
target and the peer's access level, without parsing, while its slot is current.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import parse_qsl, unquote

from imdsd.api.access import AccessPolicy, Level, Peer
from imdsd.api.context import ApiContext
from imdsd.api.metrics import Metrics
from imdsd.api.params import (
    DEFAULT_WAIT,
    MAX_WAIT,
    BadRequest,
    Query,
    parse_kinds,
    parse_revision,
    parse_wait,
)
from imdsd.api.reads import INSTANCE, DocumentReads, is_instance
from imdsd.api.replies import (
    JSON_TYPE,
    Headers,
    Reply,
    ReplyCache,
    Slot,
    body_etag,
    error,
    etag_matches,
    json_reply,
    validated,
)
from imdsd.api.v1 import ApproveCall, EventsCall, Outcome, OwnApi, WatchCall

__all__ = [
    "DEFAULT_WAIT",
    "INSTANCE",
    "JSON_TYPE",
    "MAX_WAIT",
    "ApproveCall",
    "BadRequest",
    "EventsCall",
    "Headers",
    "Outcome",
    "Reply",
    "Router",
    "WatchCall",
    "body_etag",
    "error",
    "etag_matches",
    "json_reply",
    "parse_kinds",
    "parse_revision",
    "parse_wait",
    "validated",
]

_APPROVE = re.compile(r"^/v1/scheduled-events/([^/]+)/approve/?$")
_Get = Callable[[Query, str | None, Peer | None], Outcome]
_ALLOW_GET = [(b"allow", b"GET")]
_ALLOW_POST = [(b"allow", b"POST")]


class Router:
    """Answers requests from an :class:`ApiContext` under an :class:`AccessPolicy`.

    ``live`` returns the numbers only the shell knows (``watchers``, ``connections``) for
    ``/v1/health``.
    """

    def __init__(
        self,
        ctx: ApiContext,
        policy: AccessPolicy,
        metrics: Metrics,
        *,
        max_wait: float = MAX_WAIT,
        live: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.policy = policy
        self.metrics = metrics
        self.cache = ReplyCache()
        self._slots = self.cache.slots
        self._by_target = self.cache.by_target
        self.reads = DocumentReads(ctx, policy, self.cache)
        self.own = OwnApi(ctx, policy, metrics, self.cache, max_wait=max_wait, live=live)
        metrics.revision.track(lambda: ctx.revision)
        self._gets: dict[str, _Get] = {
            "/metadata/scheduledevents": self.reads.scheduled_events,
            "/metadata/loadbalancer": self.reads.loadbalancer,
            "/metadata/versions": self.reads.versions,
            "/v1/state": self.own.state,
            "/v1/watch": self.own.watch,
            "/v1/events": self.own.events,
            "/v1/health": self.own.health,
            "/metrics": self.own.metrics_text,
        }

    def reset(self, policy: AccessPolicy) -> None:
        """Use ``policy`` from now on and drop every cached reply."""
        self.policy = self.reads.policy = self.own.policy = policy
        self.cache.clear()

    def state_line(self, level: Level) -> tuple[int, bytes] | None:
        """The watch state frame line (with newline) for ``level`` (None: no snapshot)."""
        return self.own.state_line(level)

    def route_target(
        self, method: str, target: str, if_none_match: str | None = None, peer: Peer | None = None
    ) -> Outcome:
        """:meth:`route` for a raw request target (``/path?query``, percent-encoded).

        A read of the instance document answered before is found again by its raw target and
        the peer's access level, and answered without parsing while its slot is current.
        """
        level = self.policy.level(peer)
        known = self._by_target.get((target, level))
        if known is not None and method == "GET" and self._instance_slot_current(known[0]):
            hit, reply = known
            return hit.answer(reply, if_none_match)
        raw_path, _, raw_query = target.partition("?")
        path = unquote(raw_path)
        query = parse_qsl(raw_query, keep_blank_values=True)
        if method != "GET" or not is_instance(path):
            return self.route(method, path, query, if_none_match, peer)
        try:
            slot, reply = self.reads.instance_read(path[len(INSTANCE) :], query, peer)
        except BadRequest as exc:
            return error(400, str(exc))
        if slot is None:
            return reply
        self.cache.remember(target, level, slot, reply)
        return slot.answer(reply, if_none_match)

    def _instance_slot_current(self, slot: Slot) -> bool:
        """True while ``slot`` holds the current instance document, revision and freshness."""
        snapshot = self.ctx.snapshot
        return (
            snapshot is not None
            and self._slots.get("instance") is slot
            and slot.matches(
                snapshot.instance_raw, self.ctx.revision, self.ctx.freshness("instance")
            )
        )

    def route(
        self,
        method: str,
        path: str,
        query: Query,
        if_none_match: str | None = None,
        peer: Peer | None = None,
    ) -> Outcome:
        """Answer one request (``path`` percent-decoded, ``query`` in order)."""
        try:
            return self._route(method, path, query, if_none_match, peer)
        except BadRequest as exc:
            return error(400, str(exc))

    def _route(
        self, method: str, path: str, query: Query, inm: str | None, peer: Peer | None
    ) -> Outcome:
        if is_instance(path):
            if method != "GET":
                return error(405, f"{method} is not allowed on {INSTANCE}", _ALLOW_GET)
            return self.reads.instance(path[len(INSTANCE) :], query, inm, peer)
        approve = _APPROVE.match(path)
        if approve:
            if method != "POST":
                return error(405, f"{method} is not allowed here; use POST", _ALLOW_POST)
            return self.own.approve(approve.group(1), peer)
        name = path.rstrip("/") if len(path) > 1 else path
        handler = self._gets.get(name)
        if handler is None:
            return error(404, f"no such path: {path}")
        if method != "GET":
            return error(405, f"{method} is not allowed on {name}", _ALLOW_GET)
        return handler(query, inm, peer)
