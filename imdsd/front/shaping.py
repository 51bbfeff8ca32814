"""Documents as IMDS gives them at an older api-version (sans-IO).

imdsd polls each endpoint at one api-version (the *polled* version). A caller asking for an
older version gets the cached document without the fields IMDS added after that version
(the table of field ages is :mod:`imdsd.imdsfields`, which the emulator serves from too); a
caller asking for a newer version, or an older one when the document holds a field the table
does not know (so its first version is unknown), cannot be answered exactly and is forwarded
instead (:func:`instance_at` returns None).
"""

from __future__ import annotations

from typing import Any

from imdsd.imdsfields import EVENT_FIELDS, INSTANCE_FIELDS, strip_newer, unknown_fields


def instance_at(document: Any, api_version: str, polled: str) -> Any | None:
    """The instance document as IMDS gives it at ``api_version``; None when not exact.

    ``document`` was fetched at ``polled``. Newer than ``polled`` is never exact; older is
    exact unless the document holds a field of unknown age.
    """
    if api_version == polled:
        return document
    if api_version > polled or unknown_fields(document):
        return None
    return strip_newer(document, INSTANCE_FIELDS, api_version)


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
