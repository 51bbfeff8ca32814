"""IMDS request rules for the front (sans-IO): refuse as IMDS would, or say where to answer from.

:func:`check` applies IMDS's rules (:mod:`imdsd.imdsrules`, shared with the emulator) in
IMDS's order and returns either a :class:`Refusal` (status, IMDS's JSON body, headers) or a
:class:`Routed` request:

1. ``Metadata: true`` is required (case-insensitive value) -> 400;
2. an ``X-Forwarded-For`` header -> 400;
3. a query parameter given twice -> 400;
4. on the endpoints the front answers from its cache (``/metadata/instance[/...]``,
   ``/metadata/versions``, ``/metadata/scheduledevents``, ``/metadata/loadbalancer``): GET only
   (and POST on scheduled events, which is forwarded; HEAD is answered as GET without a
   body, as the emulator does) -> 405 with ``Allow``; an
   ``api-version`` is required except on ``/metadata/versions`` -> 400 with
   ``newest-versions``.

Everything else (identity, attested, unknown paths, an api-version the cache cannot serve)
is IMDS's to judge: it is forwarded and IMDS's own answer is passed on.

Paths are judged in one canonical form: percent-decoded, split into non-empty segments, a
dot segment (``.``, ``..``, also encoded or behind a backslash) refused with IMDS's 404, the
``/metadata/<endpoint>`` prefix matched without regard to case. The access check and the
cache see those segments, and a forwarded request carries the target rebuilt from them
(:attr:`Routed.target`), never the raw one: what is checked is what IMDS is asked.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

import msgspec

from imdsd import imdsrules
from imdsd.filtering import split_path
from imdsd.upstream.versions import SCHEDULED_EVENTS_VERSIONS

TOO_MANY_REQUESTS = imdsrules.TOO_MANY_REQUESTS
SERVICE_ERROR = "Internal server error"
LOADBALANCER_MIN = "2020-10-01"
JSON_TYPE = "application/json; charset=utf-8"
BAD_PATH = "Bad request. The path is not valid UTF-8"
_SEGMENT_SAFE = "!$&'()*+,;=:@"  # RFC 3986 pchar, besides the unreserved characters
_DOTS = frozenset({".", ".."})
_QUOTED = re.compile(r"[^A-Za-z0-9._~!$&'()*+,;=:@-]")  # what quote() would change


class Endpoint(enum.StrEnum):
    """Where a request goes: one of the cached endpoints, identity, or anything else."""

    VERSIONS = "versions"
    INSTANCE = "instance"
    SCHEDULED_EVENTS = "scheduledevents"
    LOADBALANCER = "loadbalancer"
    IDENTITY = "identity"
    OTHER = "other"


CACHED: frozenset[Endpoint] = frozenset(
    {Endpoint.VERSIONS, Endpoint.INSTANCE, Endpoint.SCHEDULED_EVENTS, Endpoint.LOADBALANCER}
)
_FIXED: dict[tuple[str, ...], Endpoint] = {
    ("metadata", "versions"): Endpoint.VERSIONS,
    ("metadata", "scheduledevents"): Endpoint.SCHEDULED_EVENTS,
    ("metadata", "loadbalancer"): Endpoint.LOADBALANCER,
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request IMDS would refuse: ``rule`` names why, the rest is the answer."""

    rule: str
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = JSON_TYPE


@dataclass(frozen=True, slots=True)
class Routed:
    """An accepted request: endpoint, route segments (instance), api-version and query."""

    endpoint: Endpoint
    method: str
    segments: list[str]
    api_version: str | None
    query: dict[str, str] = field(default_factory=dict)
    target: str = ""
    """The canonical origin-form target (the one forwarded): see the module docstring."""

    @property
    def forwarded(self) -> bool:
        """True when only IMDS can answer (not a cached endpoint, or an approval POST)."""
        return self.endpoint not in CACHED or self.method != "GET"


def error_body(message: str, **extra: object) -> bytes:
    """IMDS's JSON error body ``{"error": message, ...}``."""
    return msgspec.json.encode({"error": message, **extra})


def refusal(rejection: imdsrules.Rejection) -> Refusal:
    """The :class:`Refusal` of a :class:`~imdsd.imdsrules.Rejection` (its body encoded)."""
    body = msgspec.json.encode(rejection.body)
    return Refusal(rejection.rule, rejection.status, body, rejection.headers)


def origin_form(target: str) -> str:
    """``/path?query`` from an origin-form or absolute-form (``http://host/path``) target."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"
    return target


def classify(path: str) -> tuple[Endpoint, list[str]]:
    """The endpoint of a percent-decoded path and its route segments (instance only)."""
    return _endpoint(split_path(path))


def _endpoint(segments: list[str]) -> tuple[Endpoint, list[str]]:
    head = tuple(segment.lower() for segment in segments[:2])
    if head == ("metadata", "instance"):
        return Endpoint.INSTANCE, segments[2:]
    if len(segments) == 2 and head in _FIXED:
        return _FIXED[head], []
    if head == ("metadata", "identity"):
        return Endpoint.IDENTITY, []
    return Endpoint.OTHER, []


def canonical_segments(raw_path: str) -> list[str] | Refusal:
    """The decoded, non-empty segments of a raw path, or IMDS's refusal of it (a dot
    segment: 404; bytes that are not UTF-8: 400)."""
    try:
        decoded = unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
    except UnicodeDecodeError:
        return Refusal("path", 400, error_body(BAD_PATH))
    segments = split_path(decoded)
    if "." in decoded:
        for segment in segments:
            if segment in _DOTS or ("\\" in segment and not _DOTS.isdisjoint(segment.split("\\"))):
                return Refusal("path", 404, error_body(imdsrules.NOT_FOUND))
    return segments


def canonical_target(endpoint: Endpoint, segments: list[str], raw_query: str) -> str:
    """The origin-form target rebuilt from checked ``segments`` (a known endpoint's prefix
    in lower case), with the query as it came."""
    if endpoint is not Endpoint.OTHER:
        segments = [segment.lower() for segment in segments[:2]] + segments[2:]
    path = "/" + "/".join(
        quote(segment, safe=_SEGMENT_SAFE) if _QUOTED.search(segment) else segment
        for segment in segments
    )
    return f"{path}?{raw_query}" if raw_query else path


def newest_versions(endpoint: Endpoint, available: Iterable[str], count: int = 3) -> list[str]:
    """The ``count`` newest api-versions IMDS names for ``endpoint`` in a 400."""
    if endpoint is Endpoint.SCHEDULED_EVENTS:
        return list(SCHEDULED_EVENTS_VERSIONS[:count])
    floor = LOADBALANCER_MIN if endpoint is Endpoint.LOADBALANCER else ""
    return sorted((v for v in set(available) if v >= floor), reverse=True)[:count]


def check(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    available: Sequence[str],
) -> Routed | Refusal:
    """Apply IMDS's rules to one request (``available``: the api-versions IMDS lists)."""
    raw_path, _, raw_query = origin_form(target).partition("?")
    pairs = imdsrules.check_headers_and_query(headers, raw_query)
    if isinstance(pairs, imdsrules.Rejection):
        return refusal(pairs)
    canonical = canonical_segments(raw_path)
    if isinstance(canonical, Refusal):
        return canonical
    endpoint, segments = _endpoint(canonical)
    if method == "HEAD" and endpoint in CACHED:
        method = "GET"  # the HTTP server leaves the body out
    query = dict(pairs)
    target = canonical_target(endpoint, canonical, raw_query)
    routed = Routed(endpoint, method, segments, query.get("api-version"), query, target)
    if endpoint not in CACHED:
        return routed
    allowed = imdsrules.allowed_methods(endpoint is Endpoint.SCHEDULED_EVENTS)
    refused = imdsrules.check_method(method, allowed)
    if refused is not None:
        return refusal(refused)
    if endpoint is not Endpoint.VERSIONS and routed.api_version is None:
        newest = newest_versions(endpoint, available)
        where = f"/metadata/{endpoint.value}"
        return refusal(imdsrules.api_version_rejection(None, where, newest))
    return routed
