"""Documents as IMDS gives them at an older api-version (sans-IO).

imdsd polls each endpoint at one api-version (the *polled* version). A caller asking for an
older version gets the cached document without the fields IMDS added after that version
(the table of field ages is :mod:`imdsd.imdsfields`, which the emulator serves from too); a
caller asking for a newer version cannot be answered exactly and is forwarded instead
(:func:`instance_at` returns None).

A field the table does not know (IMDS added it, its first version is unknown) makes only the
reads that would show it inexact (:meth:`Shaped.exact`): reads of the field or below it, and
reads of the nodes above it, whose JSON holds it; a ``format=text`` listing shows only the
names of its node's children, so of those listings only the field's parent's shows it. Every
other read at an older version is still answered from the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imdsd.imdsfields import EVENT_FIELDS, INSTANCE_FIELDS, strip_newer, unknown_paths


def _folded(segments: Sequence[str]) -> tuple[str, ...]:
    return tuple(segment.lower() for segment in segments)


@dataclass(frozen=True, slots=True)
class Shaped:
    """The instance document at one api-version and the paths of its fields of unknown age.

    ``unknown`` holds the paths in lower case: reads are compared without regard to case, so
    a spelling IMDS might match too is never answered from the cache.
    """

    document: Any
    unknown: tuple[tuple[str, ...], ...] = ()

    def exact(self, segments: Sequence[str], *, listing: bool) -> bool:
        """Whether reading ``segments`` from :attr:`document` gives what IMDS would.

        Not when a field of unknown age is at or above the path read (IMDS may not have it
        at this version), nor below it, where ``listing`` (``format=text``) limits "below"
        to the node's own children.
        """
        path = _folded(segments)
        depth = len(path)
        for field in self.unknown:
            if path[: len(field)] == field:
                return False
            if field[:depth] == path and (not listing or len(field) == depth + 1):
                return False
        return True


def instance_at(document: Any, api_version: str, polled: str) -> Shaped | None:
    """The instance document as IMDS gives it at ``api_version``; None when never exact.

    ``document`` was fetched at ``polled``. Newer than ``polled`` is never exact; at
    ``polled`` every read is; older, a read is unless it would show a field of unknown age
    that survives the shaping (:meth:`Shaped.exact`).
    """
    if api_version == polled:
        return Shaped(document)
    if api_version > polled:
        return None
    shaped = strip_newer(document, INSTANCE_FIELDS, api_version)
    return Shaped(shaped, tuple(_folded(path) for path in unknown_paths(shaped)))


def events_at(document: Any, api_version: str, polled: str) -> Any | None:
    """The scheduled events document at ``api_version`` (None when not exact)."""
    if api_version == polled:
        return document
    if api_version > polled or not isinstance(document, dict):
        return None
    shaped = dict(document)
    events = document.get("Events")
    if isinstance(events, list):
        shaped["Events"] = [strip_newer(event, EVENT_FIELDS, api_version) for event in events]
    return shaped
