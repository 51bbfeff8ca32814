"""Front answers from imdsd's cache (sans-IO), at the caller's api-version.

:meth:`CacheAnswers.answer` serves ``/metadata/versions``, ``/metadata/instance[/...]``,
``/metadata/scheduledevents`` and ``/metadata/loadbalancer`` GETs from the current snapshot,
or returns None when the cache cannot give exactly what IMDS would (nothing cached yet, the
api-version imdsd polls with is unknown, the caller's api-version is not one IMDS lists for
the endpoint or is newer than the polled one, an older one and a field of unknown age in what
was asked for (:meth:`imdsd.front.shaping.Shaped.exact`), the load balancer's 404): the
request is then forwarded. Route filtering and ``format`` are IMDS's
(:mod:`imdsd.filtering`, JSON on a leaf refused). Restricted paths apply by the caller's uid
and gid (:class:`imdsd.api.access.AccessPolicy`): 403 below a restricted path, redacted above.

IMDS's lasting refusals of such reads (an api-version it does not serve, the load balancer's
404) are remembered while they hold (:meth:`CacheAnswers.learn`), so an agent repeating one
spends no more of the budget.

Every cached answer carries ``X-Imdsd-Source: cache``, ``X-Imdsd-Revision``,
``X-Imdsd-Fetched-At`` (when fetched in this run) and ``X-Imdsd-Stale``; a stale answer (the
endpoint's polls are failing) is the last good document, served stale-if-error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from imdsd.api.access import Access, AccessPolicy, Peer
from imdsd.api.context import ApiContext, Freshness
from imdsd.api.context import Endpoint as ContextEndpoint
from imdsd.filtering import FilterError, parse_format, render, resolve
from imdsd.front.rules import JSON_TYPE, LOADBALANCER_MIN, Endpoint, Routed, error_body
from imdsd.front.shaping import Shaped, events_at, instance_at
from imdsd.timestamps import format_timestamp
from imdsd.upstream.versions import GENERAL_VERSIONS, SCHEDULED_EVENTS_VERSIONS

MAX_MEMO = 1024
MAX_LEARNED = 64


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete front answer; ``result`` is its metrics label."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...]
    result: str


def _meta(revision: int, fresh: Freshness) -> tuple[tuple[str, str], ...]:
    headers = [("x-imdsd-source", "cache"), ("x-imdsd-revision", str(revision))]
    if fresh.fetched_at is not None:
        headers.append(("x-imdsd-fetched-at", format_timestamp(fresh.fetched_at)))
    headers.append(("x-imdsd-stale", "true" if fresh.stale else "false"))
    return tuple(headers)


class CacheAnswers:
    """Builds front answers from an :class:`ApiContext` (see the module docstring).

    ``polled`` returns the api-version each endpoint is polled with (``VersionBook.chosen``);
    ``policy`` returns the current access policy (it changes on reload).
    """

    def __init__(
        self,
        ctx: ApiContext,
        polled: Callable[[], Mapping[Any, str]],
        policy: Callable[[], AccessPolicy],
    ) -> None:
        self.ctx = ctx
        self.polled = polled
        self.policy = policy
        self._memo: dict[Any, Any] = {}
        self._memo_key: Any = None
        self._learned: dict[tuple[str, str], tuple[Any, Answer]] = {}

    def learn(self, request: Routed, answer: Answer) -> None:
        """Remember IMDS's refusal of a forwarded read of a cached endpoint, when it will
        refuse the same way until something imdsd sees changes:

        - a ``400`` naming ``newest-versions`` (an api-version IMDS does not serve for the
          endpoint), while IMDS's version list stays the same;
        - the load balancer's ``404`` while imdsd's own polls find none.
        """
        version = request.api_version
        if request.method != "GET" or version is None or request.forwarded:
            return
        if answer.status == 400 and b'"newest-versions"' in answer.body:
            key, token = (request.endpoint.value, version), self._versions_token()
        elif request.endpoint is Endpoint.LOADBALANCER and answer.status == 404:
            if not self._loadbalancer_absent():
                return
            key, token = ("loadbalancer-absent", version), True
        else:
            return
        if len(self._learned) >= MAX_LEARNED:
            self._learned.clear()
        headers = (("x-imdsd-source", "cache"),)
        self._learned[key] = (
            token,
            Answer(answer.status, answer.body, answer.content_type, headers, "cached"),
        )

    def learned(self, request: Routed) -> Answer | None:
        """A refusal remembered by :meth:`learn` that still holds, else None."""
        version = request.api_version
        if request.method != "GET" or version is None or request.forwarded:
            return None
        found = self._learned.get((request.endpoint.value, version))
        if found is not None and found[0] == self._versions_token():
            return found[1]
        found = self._learned.get(("loadbalancer-absent", version))
        if request.endpoint is Endpoint.LOADBALANCER and found and self._loadbalancer_absent():
            return found[1]
        return None

    def _versions_token(self) -> Any:
        return tuple(self.ctx.versions() or ())

    def _loadbalancer_absent(self) -> bool:
        snapshot = self.ctx.snapshot
        return snapshot is not None and snapshot.loadbalancer_absent

    def known_versions(self) -> Sequence[str]:
        """The api-versions IMDS lists (imdsd's own list when it has not said)."""
        return tuple(self.ctx.versions() or GENERAL_VERSIONS)

    def answer(self, request: Routed, peer: Peer | None) -> Answer | None:
        """The cached answer to a GET of a cached endpoint, or None to forward it.

        A read at or below a restricted path by a peer not allowed to see it is refused here
        (403), whether or not the cache could answer it, so it never reaches IMDS.
        """
        if request.method != "GET":
            return None
        if request.endpoint is Endpoint.INSTANCE:
            return self._instance(request, peer)
        snapshot = self.ctx.snapshot
        if snapshot is None:
            return None
        match request.endpoint:
            case Endpoint.VERSIONS:
                return self._versions()
            case Endpoint.SCHEDULED_EVENTS:
                return self._document(
                    "scheduled_events", snapshot.scheduled_events_raw, request, events_at
                )
            case Endpoint.LOADBALANCER:
                if snapshot.loadbalancer_absent:
                    return None
                return self._document(
                    "loadbalancer", snapshot.loadbalancer_raw, request, _same_document
                )
        return None

    def _versions(self) -> Answer | None:
        versions = self.ctx.versions()
        if versions is None:
            return None
        fresh = Freshness(None, False)
        body = msgspec.json.encode({"apiVersions": list(versions)})
        return Answer(200, body, JSON_TYPE, _meta(self.ctx.revision, fresh), "cached")

    def _version_ok(self, endpoint: str, version: str, polled: str) -> bool:
        if version > polled:
            return False
        if endpoint == "scheduled_events":
            return version in SCHEDULED_EVENTS_VERSIONS
        if endpoint == "loadbalancer" and version < LOADBALANCER_MIN:
            return False
        return version in self.known_versions()

    def _memo_for(self, key: Any) -> dict[Any, Any]:
        """Rendered bodies and shaped documents for one document, revision and policy."""
        if key != self._memo_key or len(self._memo) >= MAX_MEMO:
            self._memo = {}
            self._memo_key = key
        return self._memo

    def _instance(self, request: Routed, peer: Peer | None) -> Answer | None:
        policy = self.policy()
        access = instance_access(policy, request.segments, peer)
        if access == "deny":
            return _forbidden(request.segments)
        snapshot = self.ctx.snapshot
        raw = snapshot.instance_raw if snapshot is not None else None
        polled = self.polled().get("instance")
        version = request.api_version
        fresh = self.ctx.freshness("instance")
        if raw is None or fresh.fetched_at is None or version is None or polled is None:
            return None
        if not self._version_ok("instance", version, polled):
            return None
        meta = _meta(self.ctx.revision, fresh)
        memo = self._memo_for((id(raw), polled, self.ctx.revision, id(policy)))
        fmt = request.query.get("format")
        key = (version, tuple(request.segments), fmt, access)
        if key not in memo:
            memo[key] = self._render(
                memo,
                raw,
                version=version,
                polled=polled,
                access=access,
                segments=request.segments,
                fmt=fmt,
            )
        rendered: tuple[int, bytes, str] | None = memo[key]
        if rendered is None:
            return None
        status, body, content_type = rendered
        return Answer(status, body, content_type, meta, "stale" if fresh.stale else "cached")

    def _render(
        self,
        memo: dict[Any, Any],
        raw: Any,
        *,
        version: str,
        polled: str,
        access: str,
        segments: list[str],
        fmt: str | None,
    ) -> tuple[int, bytes, str] | None:
        """Status, body and content type of one instance read (None: not exact, forward)."""
        doc_key = ("document", version, access)
        if doc_key not in memo:
            shaped = instance_at(raw, version, polled)
            if shaped is not None and access == "filtered":
                redacted = self.policy().redact_instance(shaped.document)
                shaped = Shaped(redacted, shaped.unknown)
            memo[doc_key] = shaped
        shaped = memo[doc_key]
        if shaped is None or not shaped.exact(segments, listing=fmt == "text"):
            return None
        try:
            body, content_type = render(
                resolve(shaped.document, segments), parse_format(fmt), leaf_json_allowed=False
            )
        except FilterError as exc:
            return exc.status, error_body(str(exc)), JSON_TYPE
        return 200, body, content_type

    def _document(
        self,
        endpoint: ContextEndpoint,
        raw: dict[str, Any] | None,
        request: Routed,
        shape: Callable[[Any, str, str], Any | None],
    ) -> Answer | None:
        polled = self.polled().get(endpoint)
        fresh = self.ctx.freshness(endpoint)
        version = request.api_version
        if raw is None or fresh.fetched_at is None or version is None or polled is None:
            return None
        if not self._version_ok(endpoint, version, polled):
            return None
        shaped = shape(raw, version, polled)
        if shaped is None:
            return None
        result = "stale" if fresh.stale else "cached"
        body = msgspec.json.encode(shaped)
        return Answer(200, body, JSON_TYPE, _meta(self.ctx.revision, fresh), result)


_STRICTNESS: dict[Access, int] = {"allow": 0, "filtered": 1, "deny": 2}


@functools.lru_cache(maxsize=8)
def _folded(restricted: tuple[str, ...]) -> AccessPolicy:
    return AccessPolicy([path.lower() for path in restricted])


def instance_access(policy: AccessPolicy, segments: Sequence[str], peer: Peer | None) -> Access:
    """``policy``'s verdict on an instance read, also matching the path loosely.

    The front forwards some reads to IMDS; should IMDS match keys without regard to case, or
    drop ``;parameters`` from a segment as some servers do, ``compute/USERDATA`` and
    ``compute/userData;x`` must not get past a restriction of ``compute/userData``.
    """
    level = policy.level(peer)
    exact = policy.instance_access(segments, level)
    if exact == "deny" or level == "full":
        return exact
    loose = _folded(tuple("/".join(path) for path in policy.restricted)).instance_access(
        [segment.partition(";")[0].lower() for segment in segments], "redacted"
    )
    return max(exact, loose, key=_STRICTNESS.__getitem__)


def redact_forwarded(
    policy: AccessPolicy, request: Routed, peer: Peer | None, answer: Answer
) -> Answer:
    """IMDS's answer to a forwarded instance read, without what ``peer`` may not see.

    Applies when the read is above a restricted path (the cache would have served it
    redacted): restricted fields below the read path are removed from a JSON answer and
    their names from a ``format=text`` listing. A body that cannot be redacted is refused.
    """
    if request.endpoint is not Endpoint.INSTANCE or answer.status != 200:
        return answer
    segments = request.segments
    if instance_access(policy, segments, peer) != "filtered":
        return answer
    folded = [segment.lower() for segment in segments]
    below = [
        path[len(segments) :]
        for path in policy.restricted
        if len(path) > len(segments) and [p.lower() for p in path[: len(segments)]] == folded
    ]
    if answer.content_type.startswith("text/plain"):
        hidden = {path[0] for path in below}
        lines = answer.body.decode("utf-8", "replace").split("\n")
        body = "\n".join(line for line in lines if line.rstrip("/") not in hidden).encode()
    else:
        try:
            document = msgspec.json.decode(answer.body)
        except msgspec.DecodeError:
            return _forbidden(segments)
        inner = AccessPolicy(["/".join(path) for path in below])
        body = msgspec.json.encode(inner.redact_instance(document))
    return Answer(200, body, answer.content_type, answer.headers, answer.result)


def _forbidden(segments: Sequence[str]) -> Answer:
    body = error_body(f"Forbidden. {'/'.join(segments)} is restricted")
    return Answer(403, body, JSON_TYPE, (("x-imdsd-source", "front"),), "refused")


def _same_document(document: Any, api_version: str, polled: str) -> Any:
    """The load balancer document: no field is known to differ between its versions."""
    return document
