"""Query parameters of the local API, checked (sans-IO): a bad one is a :class:`BadRequest`
whose message names it, answered 400."""

from __future__ import annotations

import re
from collections.abc import Sequence

from imdsd.durations import parse_duration
from imdsd.frames import KINDS

Query = Sequence[tuple[str, str]]

DEFAULT_WAIT = 30.0
MAX_WAIT = 300.0


class BadRequest(ValueError):
    """A query parameter is malformed; the message names it."""


def single(query: Query, names: Sequence[str]) -> dict[str, str]:
    """The values of ``names`` in ``query``; a repeated one is a BadRequest."""
    found: dict[str, str] = {}
    for key, value in query:
        if key in names:
            if key in found:
                raise BadRequest(f"query parameter {key!r} given more than once")
            found[key] = value
    return found


def json_only(query: Query, path: str) -> None:
    """Refuse a ``format`` other than ``json`` on ``path``."""
    fmt = single(query, ("format",)).get("format")
    if fmt not in (None, "json"):
        raise BadRequest(f"format={fmt!r} is not supported on {path}; only json")


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
