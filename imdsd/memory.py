"""What a snapshot remembers of the sections its documents lack (sans-IO, no clock).

Every field and section of an IMDS document is optional: an absent one is unknown, not
empty. :func:`carry` gives each new snapshot a memory, per endpoint (``*_known``), of the last
known value of every object member its document lacks, so the diff can compare a section
that comes back with the last document that had it (see :mod:`imdsd.changes`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from imdsd.depth import MAX_DEPTH
from imdsd.model import Snapshot

__all__ = ["ENDPOINTS", "FREE_FORM", "TAGS", "carry", "known_document", "raw_document"]

Raw = dict[str, Any]
ENDPOINTS = ("instance", "scheduled_events", "loadbalancer")
FREE_FORM = frozenset({"encryptionSettings"})  # blobs taken whole, never merged
TAGS = frozenset({"tags", "tagsList"})  # two views of one section


def carry(previous: Snapshot, new: Snapshot) -> Snapshot:
    """``new`` with a memory of the last known value of every section it lacks.

    Each ``*_known`` becomes ``new``'s raw document with every object member it lacks, at
    any depth, filled in from ``previous``'s memory (or raw document); ``tags`` and
    ``tagsList`` are one section, remembered as the newest document that had either. None
    when nothing is missing. ``diff(carry(a, b), carry(b, c))`` thus compares a section that
    comes back with the last document that had it, so a change made while it was missing is
    reported once. A load balancer 404 forgets (it is explicit: no load balancer).
    """
    memory = {
        f"{endpoint}_known": _remember(
            known_document(previous, endpoint), getattr(new, f"{endpoint}_raw")
        )
        for endpoint in ENDPOINTS
    }
    if new.loadbalancer_absent:
        memory["loadbalancer_known"] = None
    if all(getattr(new, name) == value for name, value in memory.items()):
        return new
    return msgspec.structs.replace(new, **memory)


def raw_document(snapshot: Snapshot, endpoint: str) -> Raw | None:
    """An endpoint's document as IMDS sent it (None: unknown).

    Built from the typed model for a snapshot that has no raw form.
    """
    typed = getattr(snapshot, endpoint)
    if typed is None:
        return None
    raw: Raw | None = getattr(snapshot, f"{endpoint}_raw")
    if raw is None:
        raw = msgspec.to_builtins(typed)
    return raw


def known_document(snapshot: Snapshot, endpoint: str) -> Raw | None:
    """The document with the memory of its absent sections: the old side of a diff."""
    known: Raw | None = getattr(snapshot, f"{endpoint}_known")
    if known is not None and getattr(snapshot, endpoint) is not None:
        return known
    return raw_document(snapshot, endpoint)


def _remember(known: Raw | None, raw: Raw | None) -> Raw | None:
    """``raw`` with the members it lacks taken from ``known``; None when it lacks none."""
    if known is None or raw is None:
        return None
    merged, filled = _fill(known, raw, 1)
    return merged if filled else None


def _fill(known: Raw, raw: Raw, depth: int) -> tuple[Raw, bool]:
    out = dict(raw)
    filled = False
    has_tags = not TAGS.isdisjoint(raw)
    for key, value in known.items():
        if key not in raw:
            if not (has_tags and key in TAGS):
                out[key] = value
                filled = True
            continue
        inner = raw[key]
        if (
            isinstance(value, dict)
            and isinstance(inner, dict)
            and key not in FREE_FORM
            and depth < MAX_DEPTH
        ):
            merged, deeper = _fill(value, inner, depth + 1)
            if deeper:
                out[key] = merged
                filled = True
    return out, filled
