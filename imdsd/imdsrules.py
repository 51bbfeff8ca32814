"""IMDS's request rules and their messages (sans-IO), shared by the emulator and the front.

IMDS judges a request in this order; :mod:`imdsd.emulator.rules` (which answers as IMDS) and
:mod:`imdsd.front.rules` (which refuses as IMDS would before answering from its cache or
forwarding) both apply these rules in it, each with its own routing in between:

1. ``Metadata: true`` is required (case-insensitive value) -> 400;
2. an ``X-Forwarded-For`` header -> 400;
3. a query parameter given twice -> 400;
4. GET only, plus POST on ``/metadata/scheduledevents`` -> 405 with ``Allow``;
5. an ``api-version`` is required (except on ``/metadata/versions``) and must be one the
   endpoint knows -> 400 with the endpoint's newest versions (``newest-versions``).

Each check returns a :class:`Rejection` (status, IMDS's JSON body, headers) or passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

NO_METADATA_HEADER = "Bad request. Required metadata header not specified"
FORWARDED_FOR = "Bad request. X-Forwarded-For header is not allowed"
NO_API_VERSION = (
    "Bad request. api-version was not specified in the request. "
    "For more information refer to aka.ms/azureimds"
)
TOO_MANY_REQUESTS = "Too many requests"
NOT_FOUND = "Not found"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request IMDS refuses: ``rule`` names the rule, the rest is the answer."""

    rule: str
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


def first_duplicate(pairs: Sequence[tuple[str, str]]) -> str | None:
    """The first query parameter name that appears twice, or None."""
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            return name
        seen.add(name)
    return None


def check_headers_and_query(
    headers: Iterable[tuple[str, str]],
    raw_query: str,
    *,
    metadata_header: bool = True,
    forwarded_for: bool = True,
    duplicate_params: bool = True,
) -> Rejection | list[tuple[str, str]]:
    """Rules 1 to 3 (each can be switched off); the query's name/value pairs when they pass."""
    lowered = [(name.lower(), value) for name, value in headers]
    if metadata_header and not any(
        name == "metadata" and value.strip().lower() == "true" for name, value in lowered
    ):
        return Rejection("metadata_header", 400, {"error": NO_METADATA_HEADER})
    if forwarded_for and any(name == "x-forwarded-for" for name, _ in lowered):
        return Rejection("forwarded_for", 400, {"error": FORWARDED_FOR})
    pairs = parse_qsl(raw_query, keep_blank_values=True)
    duplicate = first_duplicate(pairs)
    if duplicate_params and duplicate is not None:
        message = f"Bad request. Duplicate query parameter {duplicate!r}"
        return Rejection("duplicate_params", 400, {"error": message})
    return pairs


def allowed_methods(scheduled_events: bool) -> tuple[str, ...]:
    """The methods an endpoint takes: GET, and POST on scheduled events (approvals)."""
    return ("GET", "POST") if scheduled_events else ("GET",)


def check_method(method: str, allowed: Sequence[str]) -> Rejection | None:
    """Rule 4: a 405 naming the ``allowed`` methods, or None when ``method`` is one."""
    if method in allowed:
        return None
    body = {"error": f"Method {method} not allowed"}
    return Rejection("method", 405, body, (("allow", ", ".join(allowed)),))


def api_version_rejection(api_version: str | None, path: str, newest: list[str]) -> Rejection:
    """Rule 5: the 400 for a missing or unknown ``api_version`` on ``path`` (``newest``: the
    versions to suggest, newest first)."""
    message = (
        NO_API_VERSION
        if api_version is None
        else f"Bad request. api-version {api_version!r} is not supported for {path}. "
        "For more information refer to aka.ms/azureimds"
    )
    return Rejection("api_version", 400, {"error": message, "newest-versions": newest})
