"""Reads of the cached IMDS documents (sans-IO): ``/metadata/instance`` with its path and
format filtering and restricted paths, ``/metadata/scheduledevents``, ``/metadata/loadbalancer``
and ``/metadata/versions``, each answered from its :class:`~imdsd.api.replies.Slot`.

``/metadata/instance`` answers 503 until the instance document is known;
``/metadata/scheduledevents`` and ``/metadata/loadbalancer`` are served as soon as their own
document is known. ``/metadata/versions`` carries the freshness of the whole state
(:func:`state_freshness`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from imdsd.api.access import AccessPolicy, Peer
from imdsd.api.context import ENDPOINTS, ApiContext, Endpoint, Freshness
from imdsd.api.params import Query, json_only, single
from imdsd.api.replies import (
    JSON_TYPE,
    Reply,
    ReplyCache,
    Slot,
    error,
    meta_headers,
    validated,
    validated_json,
)
from imdsd.filtering import FilterError, parse_format, render, split_path
from imdsd.filtering import resolve as resolve_path
from imdsd.upstream.versions import GENERAL_VERSIONS

INSTANCE = "/metadata/instance"
_encoder = msgspec.json.Encoder()


def is_instance(path: str) -> bool:
    """True for ``/metadata/instance`` and the paths below it."""
    return path == INSTANCE or path.startswith(INSTANCE + "/")


def state_freshness(ctx: ApiContext) -> Freshness:
    """The freshness of the whole state: the *oldest* fetch time among the enabled endpoints
    (every part is at least that fresh), stale when any of them is stale."""
    times: list[float] = []
    stale = False
    for endpoint in ENDPOINTS:
        fresh = ctx.freshness(endpoint)
        if not fresh.enabled:
            continue
        stale = stale or fresh.stale
        if fresh.fetched_at is not None:
            times.append(fresh.fetched_at)
    return Freshness(min(times) if times else None, stale)


class DocumentReads:
    """Answers reads of the cached documents from ``cache`` under ``policy``."""

    def __init__(self, ctx: ApiContext, policy: AccessPolicy, cache: ReplyCache) -> None:
        self.ctx = ctx
        self.policy = policy
        self.cache = cache
        self._versions: tuple[str, ...] = ()

    def instance(self, rest: str, query: Query, inm: str | None, peer: Peer | None) -> Reply:
        """``GET /metadata/instance[/<key-or-index>...][?format=json|text]``."""
        slot, reply = self.instance_read(rest, query, peer)
        return slot.answer(reply, inm) if slot else reply

    def instance_read(
        self, rest: str, query: Query, peer: Peer | None
    ) -> tuple[Slot | None, Reply]:
        """The slot and full reply of an instance read; no slot for an error reply."""
        params = single(query, ("format",))
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
        slot = self.cache.slot(
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

    def _document(
        self,
        endpoint: Endpoint,
        path: str,
        raw: dict[str, Any] | None,
        query: Query,
        inm: str | None,
    ) -> Reply:
        json_only(query, path)
        fresh = self.ctx.freshness(endpoint)
        if self.ctx.snapshot is None:
            return error(503, "no snapshot yet: imdsd is starting")
        if raw is None:
            if not fresh.enabled:
                return error(404, f"{path} is not polled (poll.{endpoint} is 0s)")
            return error(503, f"{path} has not been fetched yet")
        slot = self.cache.slot(endpoint, raw, self.ctx.revision, fresh)
        reply = slot.entries.get(None)
        if reply is None:
            reply = slot.keep(None, validated_json(raw, slot.meta))
        return slot.answer(reply, inm)

    def scheduled_events(self, query: Query, inm: str | None, peer: Peer | None) -> Reply:
        """``GET /metadata/scheduledevents``."""
        snapshot = self.ctx.snapshot
        raw = snapshot.scheduled_events_raw if snapshot else None
        return self._document("scheduled_events", "/metadata/scheduledevents", raw, query, inm)

    def loadbalancer(self, query: Query, inm: str | None, peer: Peer | None) -> Reply:
        """``GET /metadata/loadbalancer``; 404 when IMDS said the VM has none."""
        snapshot = self.ctx.snapshot
        if snapshot is not None and snapshot.loadbalancer_absent:
            json_only(query, "/metadata/loadbalancer")
            meta = meta_headers(self.ctx.revision, self.ctx.freshness("loadbalancer"))
            body = _encoder.encode(
                {"error": "this VM has no Standard Load Balancer (IMDS answered 404)"}
            )
            return validated(404, [(b"content-type", JSON_TYPE)], body, meta)
        raw = snapshot.loadbalancer_raw if snapshot else None
        return self._document("loadbalancer", "/metadata/loadbalancer", raw, query, inm)

    def versions(self, query: Query, inm: str | None, peer: Peer | None) -> Reply:
        """``GET /metadata/versions``: upstream's list if known, else the versions imdsd knows."""
        json_only(query, "/metadata/versions")
        known = self.ctx.versions()
        versions = tuple(known) if known else GENERAL_VERSIONS
        if versions != self._versions:
            self._versions = versions
        fresh = state_freshness(self.ctx)
        slot = self.cache.slot("versions", self._versions, self.ctx.revision, fresh)
        reply = slot.entries.get(None)
        if reply is None:
            reply = slot.keep(None, validated_json({"apiVersions": list(versions)}, slot.meta))
        return slot.answer(reply, inm)
