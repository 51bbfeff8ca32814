"""What the local API needs from the daemon, as a Protocol the composition root implements.

The API never reaches into the poller, the store or the upstream client directly: it reads
the current snapshot and its revision, the freshness of each endpoint, the change history and
live frames, health and hook status, and it asks for a scheduled-event approval. Tests
implement this with in-memory fakes; ``imdsd.daemon`` wires the real objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from imdsd.frames import ChangeFrame, GoneFrame
from imdsd.model import Snapshot
from imdsd.upstream.versions import ENDPOINTS, Endpoint

if TYPE_CHECKING:
    from imdsd.broadcast import Subscription

__all__ = ["ENDPOINTS", "ApiContext", "Endpoint", "Freshness"]


class Freshness(NamedTuple):
    """How fresh one endpoint's cached document is.

    ``fetched_at`` is the unix time of the last successful fetch (None: never, e.g. state
    restored from disk), ``stale`` whether health considers it stale, ``enabled`` False when
    polling of the endpoint is disabled in the configuration.
    """

    fetched_at: float | None
    stale: bool
    enabled: bool = True


class ApiContext(Protocol):
    """The daemon as the API sees it; every method is cheap and never blocks."""

    @property
    def snapshot(self) -> Snapshot | None:
        """The current snapshot; None before the first one (and nothing persisted)."""

    @property
    def revision(self) -> int:
        """The revision of :attr:`snapshot`."""

    def freshness(self, endpoint: Endpoint) -> Freshness:
        """Fetch time and staleness of ``endpoint``'s cached document."""

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        """Change frames after ``since`` (``Store.frames_since``)."""

    def subscribe(self, max_pending: int, after: int) -> Subscription:
        """A live subscription to frames published after ``after`` (``Broadcaster``)."""

    def health(self) -> Mapping[str, Any]:
        """Health as JSON; ``"status"`` is ``starting``, ``ok`` or ``degraded``."""

    def hook_status(self) -> Sequence[Any]:
        """One JSON-encodable record per hook (msgspec structs or dicts)."""

    def versions(self) -> Sequence[str] | None:
        """The api-versions upstream said it supports; None when not known."""

    async def approve(self, event_id: str) -> tuple[int, bytes]:
        """Approve ``event_id`` upstream (StartRequests, within the budget).

        Returns the upstream status and body; raises when upstream could not be asked
        (its message is reported to the caller).
        """
