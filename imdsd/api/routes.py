"""Request -> response for the local API (sans-IO): CONTRACT section 3.

:meth:`Router.route` answers every plain read with a :class:`Reply`; the three routes that
need I/O come back as a call for the trio shell to carry out: :class:`WatchCall`
(``/v1/watch``), :class:`EventsCall` (``/v1/events``) and :class:`ApproveCall`.

Reads of the cached documents are serialised once: each endpoint has a slot holding the
replies built for its current document, revision and freshness, keyed by (path, format,
access level); the slot is replaced when any of those change. Every cached read carries
``ETag``, ``X-Imdsd-Revision``, ``X-Imdsd-Fetched-At`` (omitted when the document was never
fetched in this run, e.g. restored from disk) and ``X-Imdsd-Stale``; ``If-None-Match`` naming
the reply's ETag (strong or ``W/``, in a list, or ``*``) gives 304. The ETag is a strong
validator: a short BLAKE2b of the exact body, computed once when the reply is built, so the
same ETag always means the same bytes, even when a document changes without a new revision
(reordered tags, fields from another api-version, a section that went missing).

``/v1/state``'s ``fetched_at`` is the *oldest* fetch time among the documents it holds (every
part is at least that fresh) and ``stale`` is true when any enabled endpoint is stale. The
same applies to the headers of ``/v1/state`` and ``/metadata/versions``.

imdsd is *starting* until the instance document is known: ``/metadata/instance``,
``/v1/state``, ``/v1/watch`` and ``/v1/events`` answer 503 and ``/v1/health`` says
``starting``. ``/metadata/scheduledevents`` and ``/metadata/loadbalancer`` are served as soon
as their own document is known.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote

import msgspec

from imdsd.api.access import AccessPolicy, Level, Peer
from imdsd.api.context import ENDPOINTS, ApiContext, Endpoint, Freshness
from imdsd.api.metrics import CONTENT_TYPE as METRICS_TYPE
from imdsd.api.metrics import Metrics
from imdsd.durations import parse_duration
from imdsd.filtering import FilterError, parse_format, render, split_path
from imdsd.filtering import resolve as resolve_path
from imdsd.frames import KINDS
from imdsd.timestamps import format_timestamp
from imdsd.upstream.versions import GENERAL_VERSIONS

Headers = list[tuple[bytes, bytes]]

JSON_TYPE = b"application/json; charset=utf-8"
DEFAULT_WAIT = 30.0
MAX_WAIT = 300.0
MAX_CACHED = 1024
MAX_TARGET_KEPT = 512  # longer targets are answered but not remembered (bounded memory)
INSTANCE = "/metadata/instance"
_APPROVE = re.compile(r"^/v1/scheduled-events/([^/]+)/approve/?$")
_encoder = msgspec.json.Encoder()


class Reply:
    """A complete response: status, headers (without Content-Length) and body.

    A cached read (:func:`validated`) also has its ``etag`` and the 304 answering it.
    """

    __slots__ = ("body", "etag", "headers", "not_modified", "status")

    def __init__(self, status: int, headers: Headers, body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.etag: str | None = None
        self.not_modified: Reply | None = None

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:60]!r})"


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


class BadRequest(ValueError):
    """A query parameter is malformed; the message names it."""


def error(status: int, message: str, headers: Headers | None = None, **extra: Any) -> Reply:
    """A JSON error reply ``{"error": message, **extra}``."""
    body = _encoder.encode({"error": message, **extra})
    return Reply(status, [(b"content-type", JSON_TYPE), *(headers or [])], body)


def json_reply(status: int, value: Any, headers: Headers | None = None) -> Reply:
    """A JSON reply."""
    return Reply(status, [(b"content-type", JSON_TYPE), *(headers or [])], _encoder.encode(value))


def body_etag(body: bytes) -> bytes:
    """The strong ETag of ``body`` (quoted): 20 hex digits of its BLAKE2b."""
    return b'"%s"' % hashlib.blake2b(body, digest_size=10).hexdigest().encode()


def validated(status: int, headers: Headers, body: bytes, meta: Headers) -> Reply:
    """A cached-read reply with the ETag of ``body`` and its 304 built once, now."""
    etag = body_etag(body)
    reply = Reply(status, [*headers, (b"etag", etag), *meta], body)
    reply.etag = etag.decode()
    reply.not_modified = Reply(304, [(b"etag", etag), *meta])
    return reply


def etag_matches(header: str | None, etag: str) -> bool:
    """True when an ``If-None-Match`` value names ``etag`` (strong or ``W/``) or is ``*``."""
    if header is None:
        return False
    for item in header.split(","):
        tag = item.strip()
        if tag == "*":
            return True
        tag = tag.removeprefix("W/")
        if tag == etag:
            return True
    return False


def parse_kinds(value: str | None) -> frozenset[str] | None:
    """``"tags,disks"`` -> the kinds; None (no filter) when absent or naming every kind."""
    if value is None:
        return None
    kinds = [k.strip() for k in value.split(",")]
    if not any(kinds):
        raise BadRequest("kinds is empty; expected a comma list of " + ", ".join(KINDS))
    for kind in kinds:
        if kind not in KINDS:
            raise BadRequest(f"unknown kind {kind!r} in kinds; known: {', '.join(KINDS)}")
    chosen = frozenset(kinds)
    return None if chosen == frozenset(KINDS) else chosen


def parse_revision(name: str, value: str) -> int:
    """A non-negative decimal revision."""
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise BadRequest(f"{name}={value!r} is not a revision (a non-negative integer)")
    return int(value)


def parse_wait(value: str | None, default: float = DEFAULT_WAIT, cap: float = MAX_WAIT) -> float:
    """``wait`` as a duration (``"30s"``, ``"500ms"``) or plain seconds, capped at ``cap``."""
    if value is None:
        return default
    try:
        seconds = float(value) if re.fullmatch(r"\d+(\.\d+)?", value) else parse_duration(value)
    except ValueError as exc:
        raise BadRequest(f"wait={value!r}: {exc}") from None
    return min(seconds, cap)


def _single(query: Sequence[tuple[str, str]], names: Sequence[str]) -> dict[str, str]:
    """The values of ``names`` in ``query``; a repeated one is a BadRequest."""
    found: dict[str, str] = {}
    for key, value in query:
        if key in names:
            if key in found:
                raise BadRequest(f"query parameter {key!r} given more than once")
            found[key] = value
    return found


def _validated_json(value: Any, meta: Headers) -> Reply:
    return validated(200, [(b"content-type", JSON_TYPE)], _encoder.encode(value), meta)


def _is_instance(path: str) -> bool:
    return path == INSTANCE or path.startswith(INSTANCE + "/")


def _meta(revision: int, fresh: Freshness) -> Headers:
    headers = [(b"x-imdsd-revision", b"%d" % revision)]
    if fresh.fetched_at is not None:
        headers.append((b"x-imdsd-fetched-at", format_timestamp(fresh.fetched_at).encode()))
    headers.append((b"x-imdsd-stale", b"true" if fresh.stale else b"false"))
    return headers


class _Slot:
    """Replies built for one document at one revision and freshness."""

    __slots__ = ("doc", "entries", "fresh", "meta", "redacted", "revision")

    def __init__(self, doc: object, revision: int, fresh: Freshness) -> None:
        self.doc = doc
        self.revision = revision
        self.fresh = fresh
        self.meta = _meta(revision, fresh)
        self.entries: dict[Any, Reply] = {}
        self.redacted: Any = None

    def matches(self, doc: object, revision: int, fresh: Freshness) -> bool:
        return self.doc is doc and self.revision == revision and self.fresh == fresh

    def answer(self, reply: Reply, inm: str | None) -> Reply:
        """``reply``, or its 304 when ``If-None-Match`` names its ETag."""
        if reply.not_modified is not None and reply.etag is not None:
            return reply.not_modified if etag_matches(inm, reply.etag) else reply
        return reply

    def keep(self, key: Any, reply: Reply) -> Reply:
        if len(self.entries) < MAX_CACHED:
            self.entries[key] = reply
        return reply


_Get = Callable[[Sequence[tuple[str, str]], str | None, Peer | None], Outcome]
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
        self.max_wait = max_wait
        self.live = live or dict
        self._slots: dict[str, _Slot] = {}
        self._by_target: dict[tuple[str, Level], tuple[_Slot, Reply]] = {}
        metrics.revision.track(lambda: ctx.revision)
        self._versions: tuple[str, ...] = ()
        self._gets: dict[str, _Get] = {
            "/metadata/scheduledevents": self.scheduled_events,
            "/metadata/loadbalancer": self.loadbalancer,
            "/metadata/versions": self.versions,
            "/v1/state": self.state,
            "/v1/watch": self.watch,
            "/v1/events": self.events,
            "/v1/health": self.health,
            "/metrics": self.metrics_text,
        }

    def reset(self, policy: AccessPolicy) -> None:
        """Use ``policy`` from now on and drop every cached reply."""
        self.policy = policy
        self._slots.clear()
        self._by_target.clear()

    # ------------------------------------------------------------------ dispatch

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
        if method != "GET" or not _is_instance(path):
            return self.route(method, path, query, if_none_match, peer)
        try:
            slot, reply = self._instance_read(path[len(INSTANCE) :], query, peer)
        except BadRequest as exc:
            return error(400, str(exc))
        if slot is None:
            return reply
        if len(target) <= MAX_TARGET_KEPT:
            if len(self._by_target) >= MAX_CACHED:
                self._by_target.clear()
            self._by_target[(target, level)] = (slot, reply)
        return slot.answer(reply, if_none_match)

    def route(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        if_none_match: str | None = None,
        peer: Peer | None = None,
    ) -> Outcome:
        """Answer one request (``path`` percent-decoded, ``query`` in order)."""
        try:
            return self._route(method, path, query, if_none_match, peer)
        except BadRequest as exc:
            return error(400, str(exc))

    def _route(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        inm: str | None,
        peer: Peer | None,
    ) -> Outcome:
        if _is_instance(path):
            if method != "GET":
                return error(405, f"{method} is not allowed on {INSTANCE}", _ALLOW_GET)
            return self.instance(path[len(INSTANCE) :], query, inm, peer)
        approve = _APPROVE.match(path)
        if approve:
            if method != "POST":
                return error(405, f"{method} is not allowed here; use POST", _ALLOW_POST)
            return self.approve(approve.group(1), peer)
        name = path.rstrip("/") if len(path) > 1 else path
        handler = self._gets.get(name)
        if handler is None:
            return error(404, f"no such path: {path}")
        if method != "GET":
            return error(405, f"{method} is not allowed on {name}", _ALLOW_GET)
        return handler(query, inm, peer)

    # ------------------------------------------------------------------ cached reads

    def _slot(self, name: str, doc: object, revision: int, fresh: Freshness) -> _Slot:
        slot = self._slots.get(name)
        if slot is None or not slot.matches(doc, revision, fresh):
            slot = self._slots[name] = _Slot(doc, revision, fresh)
            if name == "instance":
                self._by_target.clear()
        return slot

    def _instance_slot_current(self, slot: _Slot) -> bool:
        """True while ``slot`` holds the current instance document, revision and freshness."""
        snapshot = self.ctx.snapshot
        return (
            snapshot is not None
            and self._slots.get("instance") is slot
            and slot.matches(
                snapshot.instance_raw, self.ctx.revision, self.ctx.freshness("instance")
            )
        )

    def _fresh(self) -> Freshness:
        """The freshness of the whole state (see the module docstring)."""
        times: list[float] = []
        stale = False
        for endpoint in ENDPOINTS:
            fresh = self.ctx.freshness(endpoint)
            if not fresh.enabled:
                continue
            stale = stale or fresh.stale
            if fresh.fetched_at is not None:
                times.append(fresh.fetched_at)
        return Freshness(min(times) if times else None, stale)

    def instance(
        self, rest: str, query: Sequence[tuple[str, str]], inm: str | None, peer: Peer | None
    ) -> Reply:
        """``GET /metadata/instance[/<key-or-index>...][?format=json|text]``."""
        slot, reply = self._instance_read(rest, query, peer)
        return slot.answer(reply, inm) if slot else reply

    def _instance_read(
        self, rest: str, query: Sequence[tuple[str, str]], peer: Peer | None
    ) -> tuple[_Slot | None, Reply]:
        """The slot and full reply of an instance read; no slot for an error reply."""
        params = _single(query, ("format",))
        try:
            fmt = parse_format(params.get("format"))
        except FilterError as exc:
            return None, error(exc.status, str(exc))
        snapshot = self.ctx.snapshot
        if snapshot is None or snapshot.instance_raw is None:
            return None, error(503, "no instance document yet: imdsd is starting")
        segments = split_path(rest)
        level = self.policy.level(peer)
        access = self.policy.instance_access(segments, level)
        if access == "deny":
            who = f"uid {peer.uid} gid {peer.gid}" if peer else "this peer"
            return None, error(403, f"{'/'.join(segments)} is restricted; {who} may not read it")
        slot = self._slot(
            "instance", snapshot.instance_raw, self.ctx.revision, self.ctx.freshness("instance")
        )
        variant = "full" if access == "allow" else "redacted"
        key = (tuple(segments), fmt, variant)
        reply = slot.entries.get(key)
        if reply is None:
            doc: Any = snapshot.instance_raw
            if variant == "redacted":
                if slot.redacted is None:
                    slot.redacted = self.policy.redact_instance(doc)
                doc = slot.redacted
            try:
                body, ctype = render(resolve_path(doc, segments), fmt, leaf_json_allowed=True)
            except FilterError as exc:
                return None, error(exc.status, str(exc))
            reply = slot.keep(
                key, validated(200, [(b"content-type", ctype.encode())], body, slot.meta)
            )
        return slot, reply

    def _json_only(self, query: Sequence[tuple[str, str]], path: str) -> None:
        fmt = _single(query, ("format",)).get("format")
        if fmt not in (None, "json"):
            raise BadRequest(f"format={fmt!r} is not supported on {path}; only json")

    def _document(
        self,
        endpoint: Endpoint,
        path: str,
        raw: dict[str, Any] | None,
        query: Sequence[tuple[str, str]],
        inm: str | None,
    ) -> Reply:
        self._json_only(query, path)
        fresh = self.ctx.freshness(endpoint)
        if self.ctx.snapshot is None:
            return error(503, "no snapshot yet: imdsd is starting")
        if raw is None:
            if not fresh.enabled:
                return error(404, f"{path} is not polled (poll.{endpoint} is 0s)")
            return error(503, f"{path} has not been fetched yet")
        slot = self._slot(endpoint, raw, self.ctx.revision, fresh)
        reply = slot.entries.get(None)
        if reply is None:
            reply = slot.keep(None, _validated_json(raw, slot.meta))
        return slot.answer(reply, inm)

    def scheduled_events(
        self, query: Sequence[tuple[str, str]], inm: str | None, peer: Peer | None
    ) -> Reply:
        """``GET /metadata/scheduledevents``."""
        snapshot = self.ctx.snapshot
        raw = snapshot.scheduled_events_raw if snapshot else None
        return self._document("scheduled_events", "/metadata/scheduledevents", raw, query, inm)

    def loadbalancer(
        self, query: Sequence[tuple[str, str]], inm: str | None, peer: Peer | None
    ) -> Reply:
        """``GET /metadata/loadbalancer``; 404 when IMDS said the VM has none."""
        snapshot = self.ctx.snapshot
        if snapshot is not None and snapshot.loadbalancer_absent:
            self._json_only(query, "/metadata/loadbalancer")
            meta = _meta(self.ctx.revision, self.ctx.freshness("loadbalancer"))
            body = _encoder.encode(
                {"error": "this VM has no Standard Load Balancer (IMDS answered 404)"}
            )
            return validated(404, [(b"content-type", JSON_TYPE)], body, meta)
        raw = snapshot.loadbalancer_raw if snapshot else None
        return self._document("loadbalancer", "/metadata/loadbalancer", raw, query, inm)

    def versions(
        self, query: Sequence[tuple[str, str]], inm: str | None, peer: Peer | None
    ) -> Reply:
        """``GET /metadata/versions``: upstream's list if known, else the versions imdsd knows."""
        self._json_only(query, "/metadata/versions")
        known = self.ctx.versions()
        versions = tuple(known) if known else GENERAL_VERSIONS
        if versions != self._versions:
            self._versions = versions
        slot = self._slot("versions", self._versions, self.ctx.revision, self._fresh())
        reply = slot.entries.get(None)
        if reply is None:
            reply = slot.keep(None, _validated_json({"apiVersions": list(versions)}, slot.meta))
        return slot.answer(reply, inm)

    # ------------------------------------------------------------------ imdsd's own API

    def _ready(self) -> bool:
        """True once the instance document is known (before that, imdsd is starting)."""
        snapshot = self.ctx.snapshot
        return snapshot is not None and snapshot.instance_raw is not None

    def _state_slot(self) -> _Slot | None:
        snapshot = self.ctx.snapshot
        if snapshot is None or snapshot.instance_raw is None:
            return None
        return self._slot("state", snapshot, self.ctx.revision, self._fresh())

    def _state_reply(self, slot: _Slot, level: Level) -> Reply:
        key = ("state", level)
        reply = slot.entries.get(key)
        if reply is None:
            reply = slot.keep(key, _validated_json(self._state_document(slot, level), slot.meta))
        return reply

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

    def _state_document(self, slot: _Slot, level: Level) -> dict[str, Any]:
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

    def state(self, query: Sequence[tuple[str, str]], inm: str | None, peer: Peer | None) -> Reply:
        """``GET /v1/state``."""
        slot = self._state_slot()
        if slot is None:
            return error(503, "no instance document yet: imdsd is starting")
        reply = self._state_reply(slot, self.policy.level(peer))
        return slot.answer(reply, inm)

    def health(self, query: Sequence[tuple[str, str]], inm: str | None, peer: Peer | None) -> Reply:
        """``GET /v1/health``: 200 ok/degraded, 503 starting."""
        details = dict(self.ctx.health())
        status = details.pop("status", "ok")
        if status == "starting" or not self._ready():
            return json_reply(503, {"status": "starting"})  # CONTRACT 3, exactly
        body: dict[str, Any] = {"status": status, **details}
        body.setdefault("revision", self.ctx.revision)
        for name, value in self.live().items():
            body.setdefault(name, value)
        body.setdefault("hooks", list(self.ctx.hook_status()))
        return json_reply(200, body)

    def metrics_text(
        self, query: Sequence[tuple[str, str]], inm: str | None, peer: Peer | None
    ) -> Reply:
        """``GET /metrics``."""
        return Reply(200, [(b"content-type", METRICS_TYPE)], self.metrics.render())

    def watch(
        self, query: Sequence[tuple[str, str]], inm: str | None, peer: Peer | None
    ) -> Outcome:
        """``GET /v1/watch[?since=REV][&kinds=...]``."""
        params = _single(query, ("since", "kinds"))
        since = params.get("since")
        call = WatchCall(
            None if since is None else parse_revision("since", since),
            parse_kinds(params.get("kinds")),
            self.policy.level(peer),
        )
        if not self._ready():
            return error(503, "no instance document yet: imdsd is starting")
        return call

    def events(
        self, query: Sequence[tuple[str, str]], inm: str | None, peer: Peer | None
    ) -> Outcome:
        """``GET /v1/events?since=REV[&kinds=...][&wait=30s]``."""
        params = _single(query, ("since", "kinds", "wait"))
        if "since" not in params:
            raise BadRequest("since is required, e.g. /v1/events?since=42")
        call = EventsCall(
            parse_revision("since", params["since"]),
            parse_kinds(params.get("kinds")),
            parse_wait(params.get("wait"), cap=self.max_wait),
            self.policy.level(peer),
        )
        if not self._ready():
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
