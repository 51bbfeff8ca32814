"""IMDS request rules for the front (sans-IO): refuse as IMDS would, or say where to answer from.

:func:`check` applies IMDS's rules in IMDS's order (the emulator's order, see
:mod:`imdsd.emulator.rules`) and returns either a :class:`Refusal` (status, IMDS's JSON body,
headers) or a :class:`Routed` request:

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
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

import msgspec

from imdsd.filtering import split_path
from imdsd.upstream.versions import SCHEDULED_EVENTS_VERSIONS

NO_METADATA_HEADER = "Bad request. Required metadata header not specified"
FORWARDED_FOR = "Bad request. X-Forwarded-For header is not allowed"
NO_API_VERSION = (
    "Bad request. api-version was not specified in the request. "
    "For more information refer to aka.ms/azureimds"
)
TOO_MANY_REQUESTS = "Too many requests"
SERVICE_ERROR = "Internal server error"
LOADBALANCER_MIN = "2020-10-01"
JSON_TYPE = "application/json; charset=utf-8"


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

    @property
    def forwarded(self) -> bool:
        """True when only IMDS can answer (not a cached endpoint, or an approval POST)."""
        return self.endpoint not in CACHED or self.method != "GET"


def error_body(message: str, **extra: object) -> bytes:
    """IMDS's JSON error body ``{"error": message, ...}``."""
    return msgspec.json.encode({"error": message, **extra})


def refusal(rule: str, status: int, message: str, **extra: object) -> Refusal:
    """A :class:`Refusal` with IMDS's JSON error body."""
    return Refusal(rule, status, error_body(message, **extra))


def origin_form(target: str) -> str:
    """``/path?query`` from an origin-form or absolute-form (``http://host/path``) target."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else "/"
    return target


def classify(path: str) -> tuple[Endpoint, list[str]]:
    """The endpoint of a percent-decoded path and its route segments (instance only)."""
    segments = split_path(path)
    if segments[:2] == ["metadata", "instance"]:
        return Endpoint.INSTANCE, segments[2:]
    fixed = _FIXED.get(tuple(segments))
    if fixed is not None:
        return fixed, []
    if segments[:2] == ["metadata", "identity"]:
        return Endpoint.IDENTITY, []
    return Endpoint.OTHER, []


def newest_versions(endpoint: Endpoint, available: Iterable[str], count: int = 3) -> list[str]:
    """The ``count`` newest api-versions IMDS names for ``endpoint`` in a 400."""
    if endpoint is Endpoint.SCHEDULED_EVENTS:
        return list(SCHEDULED_EVENTS_VERSIONS[:count])
    floor = LOADBALANCER_MIN if endpoint is Endpoint.LOADBALANCER else ""
    return sorted((v for v in set(available) if v >= floor), reverse=True)[:count]


def first_duplicate(pairs: Sequence[tuple[str, str]]) -> str | None:
    """The first query parameter name that appears twice, or None."""
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            return name
        seen.add(name)
    return None


def check(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    available: Sequence[str],
) -> Routed | Refusal:
    """Apply IMDS's rules to one request (``available``: the api-versions IMDS lists)."""
    raw_path, _, raw_query = origin_form(target).partition("?")
    lowered = [(name.lower(), value) for name, value in headers]
    if not any(name == "metadata" and value.strip().lower() == "true" for name, value in lowered):
        return refusal("metadata_header", 400, NO_METADATA_HEADER)
    if any(name == "x-forwarded-for" for name, _ in lowered):
        return refusal("forwarded_for", 400, FORWARDED_FOR)
    pairs = parse_qsl(raw_query, keep_blank_values=True)
    duplicate = first_duplicate(pairs)
    if duplicate is not None:
        return refusal(
            "duplicate_params", 400, f"Bad request. Duplicate query parameter {duplicate!r}"
        )
    endpoint, segments = classify(unquote(raw_path))
    if method == "HEAD" and endpoint in CACHED:
        method = "GET"  # the HTTP server leaves the body out
    query = dict(pairs)
    routed = Routed(endpoint, method, segments, query.get("api-version"), query)
    if endpoint not in CACHED:
        return routed
    allowed = ("GET", "POST") if endpoint is Endpoint.SCHEDULED_EVENTS else ("GET",)
    if method not in allowed:
        refused = refusal("method", 405, f"Method {method} not allowed")
        return Refusal(refused.rule, refused.status, refused.body, (("allow", ", ".join(allowed)),))
    if endpoint is not Endpoint.VERSIONS and routed.api_version is None:
        return refusal(
            "api_version",
            400,
            NO_API_VERSION,
            **{"newest-versions": newest_versions(endpoint, available)},
        )
    return routed
