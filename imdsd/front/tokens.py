"""Managed-identity token cache (sans-IO): one answer per exact query, until near expiry.

A ``200`` answer of ``/metadata/identity/oauth2/token`` is kept under its exact request
target (path and query as sent: resource, client_id/object_id/msi_res_id, api-version) and
served to any caller asking the same target until ``REFRESH_BEFORE`` (5 minutes) before its
``expires_on``, the margin the Azure SDKs themselves refresh at. A kept answer is served with
its ``expires_in`` counting down (seconds left until ``expires_on``, in the type IMDS used), as
IMDS does for the tokens it caches: clients that compute the expiry from ``expires_in`` must
not believe an old token fresh. Answers without a readable ``expires_on``, or expiring
within the margin already, are not kept. At most ``capacity``
targets are kept (expired entries first, then the oldest go).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import msgspec

REFRESH_BEFORE = 300.0


@dataclass(frozen=True, slots=True)
class CachedToken:
    """A kept token answer: its headers and body as IMDS sent them, and when it expires."""

    headers: tuple[tuple[str, str], ...]
    body: bytes
    expires_on: float

    def body_at(self, now_wall: float) -> bytes:
        """The body with ``expires_in`` set to the seconds left at ``now_wall``."""
        try:
            doc = msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            return self.body
        if not isinstance(doc, dict) or "expires_in" not in doc:
            return self.body
        left = max(0, int(self.expires_on - now_wall))
        doc["expires_in"] = str(left) if isinstance(doc["expires_in"], str) else left
        return msgspec.json.encode(doc)


def expires_on(body: bytes) -> float | None:
    """``expires_on`` of a token answer (epoch seconds, a number or a numeric string)."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    value = doc.get("expires_on") if isinstance(doc, dict) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


class TokenCache:
    """Token answers by exact target (see the module docstring)."""

    def __init__(self, capacity: int = 256, refresh_before: float = REFRESH_BEFORE) -> None:
        self.capacity = capacity
        self.refresh_before = refresh_before
        self._entries: OrderedDict[str, CachedToken] = OrderedDict()
        self.hits = 0

    def get(self, target: str, now_wall: float) -> CachedToken | None:
        """The kept answer for ``target`` while it is good, else None (and it is dropped)."""
        entry = self._entries.get(target)
        if entry is None:
            return None
        if now_wall >= entry.expires_on - self.refresh_before:
            del self._entries[target]
            return None
        self.hits += 1
        return entry

    def put(
        self,
        target: str,
        status: int,
        headers: tuple[tuple[str, str], ...],
        body: bytes,
        now_wall: float,
    ) -> bool:
        """Keep a ``200`` answer for ``target``; True when it was kept."""
        if status != 200 or self.capacity < 1:
            return False
        expiry = expires_on(body)
        if expiry is None or now_wall >= expiry - self.refresh_before:
            return False
        self._entries.pop(target, None)
        if len(self._entries) >= self.capacity:
            self._evict(now_wall)
        self._entries[target] = CachedToken(headers, body, expiry)
        return True

    def _evict(self, now_wall: float) -> None:
        margin = self.refresh_before
        for key in [k for k, e in self._entries.items() if now_wall >= e.expires_on - margin]:
            del self._entries[key]
        while self._entries and len(self._entries) >= self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
