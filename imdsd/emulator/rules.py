"""IMDS request rules (sans-IO): decide whether a request is refused before it is routed.

:meth:`RequestRules.check` takes the method, the raw target, the headers and the current
monotonic time and returns either an :class:`ImdsRequest` (routed, api-version checked) or a
:class:`Rejection` carrying the status and IMDS-like JSON body. Rules, in this order, each
switchable:

1. ``rate_limit``: more than N admitted requests in the last second -> 429 (N = 5 by default;
   ``/metadata/identity`` has its own window, 20/s). Refused requests do not use up the window.
   The identity limit of 5 requests in flight is kept by :attr:`RequestRules.identity_gate`,
   which the shell consults (:mod:`imdsd.emulator.identity`).
2. ``metadata_header``: ``Metadata: true`` (case-insensitive value) required -> 400.
3. ``forwarded_for``: any ``X-Forwarded-For`` header -> 400.
4. ``duplicate_params``: a query parameter name given twice -> 400.
5. unknown path, or an endpoint the profile lacks -> 404 (always on).
6. ``method``: GET only, plus POST on ``/metadata/scheduledevents`` -> 405 with ``Allow``.
7. ``api_version``: required and known for the endpoint, except on ``/metadata/versions`` ->
   400 with ``{"error": ..., "newest-versions": [three newest]}``. Disabled, a missing
   api-version is served as the endpoint's newest.

Rules 2-4, 6 and 7 and their messages are IMDS's own, shared with the front
(:mod:`imdsd.imdsrules`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote

from imdsd.emulator.identity import IdentityGate
from imdsd.emulator.profiles import Endpoint, Profile
from imdsd.emulator.stats import SlidingCount
from imdsd.filtering import split_path
from imdsd.imdsrules import (
    NOT_FOUND,
    TOO_MANY_REQUESTS,
    Rejection,
    allowed_methods,
    api_version_rejection,
    check_headers_and_query,
    check_method,
)

# Numeric settings besides the switches (identity_concurrency: an integer, 0 = unlimited;
# identity_latency: seconds each admitted identity request is held, at most 60).
_NUMBERS = ("identity_rate_limit", "identity_concurrency", "identity_latency")
_ROUTES: dict[tuple[str, ...], Endpoint] = {
    ("metadata", "versions"): Endpoint.VERSIONS,
    ("metadata", "scheduledevents"): Endpoint.SCHEDULED_EVENTS,
    ("metadata", "loadbalancer"): Endpoint.LOADBALANCER,
    ("metadata", "attested", "document"): Endpoint.ATTESTED,
    ("metadata", "identity", "oauth2", "token"): Endpoint.IDENTITY,
}


class RuleError(ValueError):
    """A rule setting is malformed; the message names the key."""


@dataclass
class RuleSwitches:
    """Which rules are enforced; all on by default."""

    rate_limit: bool = True
    metadata_header: bool = True
    forwarded_for: bool = True
    duplicate_params: bool = True
    method: bool = True
    api_version: bool = True


@dataclass(frozen=True)
class ImdsRequest:
    """An accepted request: endpoint, route parameters, api-version and query parameters."""

    endpoint: Endpoint
    path: str
    segments: list[str]
    api_version: str
    query: dict[str, str] = field(default_factory=dict)


def classify(path: str) -> tuple[Endpoint, list[str]] | None:
    """The endpoint and route parameters of a decoded path, or None for an unknown path."""
    segments = split_path(path)
    if segments[:2] == ["metadata", "instance"]:
        return Endpoint.INSTANCE, segments[2:]
    endpoint = _ROUTES.get(tuple(segments))
    return (endpoint, []) if endpoint is not None else None


class RequestRules:
    """The IMDS rules of one emulator: profile, switches and rate-limit windows."""

    def __init__(
        self,
        profile: Profile,
        *,
        switches: RuleSwitches | None = None,
        rate_limit: float = 5.0,
        identity_rate_limit: float = 20.0,
    ) -> None:
        self.profile = profile
        self.switches = switches or RuleSwitches()
        self.rate_limit = rate_limit
        self.identity_rate_limit = identity_rate_limit
        self._window = SlidingCount(1.0)
        self._identity_window = SlidingCount(1.0)
        self.identity_gate = IdentityGate()

    def describe(self) -> dict[str, Any]:
        """The current switches and limits, JSON-ready."""
        out: dict[str, Any] = {f.name: getattr(self.switches, f.name) for f in fields(RuleSwitches)}
        out["rate_limit_per_second"] = self.rate_limit
        out["identity_rate_limit_per_second"] = self.identity_rate_limit
        out.update(self.identity_gate.as_dict())
        return out

    def configure(self, changes: Any) -> None:
        """Apply ``{"metadata_header": false, "rate_limit": 10, ...}`` (POST /_emulator/rules).

        Each switch takes a boolean; ``rate_limit`` also takes a number (requests per second,
        0 disables), ``identity_rate_limit`` a number, ``identity_concurrency`` an integer
        (requests in flight on ``/metadata/identity``, 0 = unlimited) and ``identity_latency``
        seconds (0-60). Validated in full before applying.
        """
        if not isinstance(changes, dict):
            raise RuleError("rules must be an object of switches")
        names = {f.name for f in fields(RuleSwitches)}
        updates: list[tuple[str, Any]] = []
        for key, value in changes.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if key == "identity_rate_limit" and number and value >= 0:
                updates.append(("identity_rate_limit", float(value)))
            elif key == "identity_concurrency" and number and isinstance(value, int) and value >= 0:
                updates.append(("gate:limit", value))
            elif key == "identity_latency" and number and 0 <= value <= 60:
                updates.append(("gate:latency", float(value)))
            elif key == "rate_limit" and number and value >= 0:
                updates.append(("rate_limit", float(value)))
                updates.append(("switch:rate_limit", value > 0))
            elif key in names and isinstance(value, bool):
                updates.append((f"switch:{key}", value))
            elif key in names or key in _NUMBERS:
                raise RuleError(f"rule {key!r} takes a boolean or a number >= 0, got {value!r}")
            else:
                known = ", ".join([*sorted(names), *_NUMBERS])
                raise RuleError(f"unknown rule {key!r}; known rules: {known}")
        for key, value in updates:
            if key.startswith("switch:"):
                setattr(self.switches, key.removeprefix("switch:"), value)
            elif key.startswith("gate:"):
                setattr(self.identity_gate, key.removeprefix("gate:"), value)
            else:
                setattr(self, key, value)

    def _throttled(self, endpoint: Endpoint | None, now: float) -> bool:
        if not self.switches.rate_limit:
            return False
        identity = endpoint is Endpoint.IDENTITY
        limit = self.identity_rate_limit if identity else self.rate_limit
        if limit <= 0:
            return False
        window = self._identity_window if identity else self._window
        if window.count(now) >= limit:
            return True
        window.add(now)
        return False

    def check(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], now: float
    ) -> ImdsRequest | Rejection:
        """Apply the rules to one request (see the module docstring for the order)."""
        raw_path, _, raw_query = target.partition("?")
        path = unquote(raw_path)
        route = classify(path)
        switches = self.switches

        if self._throttled(route[0] if route else None, now):
            return Rejection("rate_limit", 429, {"error": TOO_MANY_REQUESTS})
        pairs = check_headers_and_query(
            headers,
            raw_query,
            metadata_header=switches.metadata_header,
            forwarded_for=switches.forwarded_for,
            duplicate_params=switches.duplicate_params,
        )
        if isinstance(pairs, Rejection):
            return pairs
        if route is None or not self.profile.serves(route[0]):
            return Rejection("not_found", 404, {"error": NOT_FOUND})
        endpoint, segments = route
        allowed = allowed_methods(endpoint is Endpoint.SCHEDULED_EVENTS)
        refused = check_method(method, allowed) if switches.method else None
        if refused is not None:
            return refused
        query = dict(pairs)
        api_version = query.get("api-version")
        known = self.profile.versions_for(endpoint)
        if endpoint is Endpoint.VERSIONS:
            api_version = api_version or ""
        elif not switches.api_version:
            api_version = api_version or known[-1]
        elif api_version is None or api_version not in known:
            where = f"/metadata/{endpoint.value}"
            return api_version_rejection(api_version, where, self.profile.newest_versions(endpoint))
        return ImdsRequest(endpoint, path, segments, api_version, query)
