"""What the socket API and the front see of the running daemon: :class:`DaemonContext`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from imdsd.api.context import Endpoint, Freshness
from imdsd.broadcast import Subscription
from imdsd.frames import ChangeFrame, GoneFrame
from imdsd.model import Snapshot
from imdsd.upstream.client import GaveUp

if TYPE_CHECKING:
    from imdsd.daemon import Daemon


class DaemonContext:
    """What the socket API sees of the daemon (implements :class:`imdsd.api.context.ApiContext`)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @property
    def snapshot(self) -> Snapshot | None:
        """The current snapshot."""
        return self._daemon.keeper.snapshot

    @property
    def revision(self) -> int:
        """The current revision."""
        return self._daemon.keeper.revision

    def freshness(self, endpoint: Endpoint) -> Freshness:
        """Fetch time and staleness of one endpoint."""
        daemon = self._daemon
        health = daemon.board.endpoints.get(endpoint)
        if health is None:
            return Freshness(daemon.keeper.fetched_at.get(endpoint), False, enabled=False)
        stale = health.state(trio.current_time()) == "stale"
        return Freshness(daemon.keeper.fetched_at.get(endpoint), stale)

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        """Change frames after ``since``."""
        return self._daemon.keeper.frames_since(since)

    def subscribe(self, max_pending: int, after: int) -> Subscription:
        """A live subscription to new frames."""
        return self._daemon.keeper.subscribe(max_pending, after)

    def health(self) -> Mapping[str, Any]:
        """Health, revision, upstream state, budget, watchers and hooks, as JSON."""
        return self._daemon.health()

    def hook_status(self) -> Sequence[Any]:
        """One record per hook."""
        return self._daemon.hooks.status()

    def versions(self) -> Sequence[str] | None:
        """The api-versions upstream said it supports."""
        return self._daemon.client.versions.available

    async def approve(self, event_id: str) -> tuple[int, bytes]:
        """Approve a scheduled event upstream, within the budget.

        A transport failure after the retries (no HTTP answer at all) raises; an HTTP error
        answer is reported with its status.
        """
        try:
            await self._daemon.client.approve([event_id])
        except GaveUp as exc:
            if exc.status is None:
                raise
            return exc.status, msgspec.json.encode({"error": exc.reason})
        return 200, msgspec.json.encode({"approved": event_id})
