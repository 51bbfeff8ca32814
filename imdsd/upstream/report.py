"""What the upstream client reports: request counts and fetch times, and its status.

Every request sent is counted in the optional :class:`RequestMetrics` by lane
(``instance``, ``scheduled_events``, ``loadbalancer``, ``versions``, ``approve``; raw calls
count under their path) and answer status (``None`` when no answer came); every document
:meth:`~imdsd.upstream.client.ImdsClient.fetch` gets records its duration, budget waits and
retries included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from imdsd.upstream.budget import Budget
    from imdsd.upstream.versions import VersionBook


class RequestMetrics(Protocol):
    """Where the client counts requests and fetch times (:class:`imdsd.api.metrics.Metrics`)."""

    def upstream_request(self, endpoint: str, status: int | None) -> None:
        """One request sent on lane ``endpoint``; ``status`` None when no answer came."""

    def observe_fetch(self, endpoint: str, seconds: float) -> None:
        """One document of ``endpoint`` fetched in ``seconds`` (retries included)."""


def client_status(
    budget: Budget, versions: VersionBook, sent: int, connections: int
) -> dict[str, object]:
    """Budget use, api-versions and upstream connections, JSON-ready (for status)."""
    return {
        "budget": {
            "rate": budget.rate,
            "in_use": budget.in_use(),
            "waiting": budget.waiting,
            "granted": budget.core.granted,
        },
        "api_version": dict(versions.chosen()),
        "requests_sent": sent,
        "upstream_connections": connections,
    }
