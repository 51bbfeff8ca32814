"""imdsd's own requests, one at a time: target, headers and a slot of the budget."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from imdsd.upstream.budget import Budget
from imdsd.upstream.messages import Outbound, UpstreamResponse, build_target, own_headers
from imdsd.upstream.pool import Pool


@dataclass(frozen=True, slots=True)
class Sender:
    """Sends one of imdsd's own requests on ``pool`` within ``budget`` (no retries)."""

    pool: Pool
    budget: Budget

    async def send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: bytes,
        *,
        priority: int,
        timeout: float | None,
        lane: str | None,
    ) -> UpstreamResponse:
        """``method path?query`` on ``lane`` (default: the path); raises ``TransportError``."""
        out = Outbound(method, build_target(path, query), own_headers(method), body, timeout)
        return await self.pool.exchange(lane or path, out, lambda: self.budget.acquire(priority))
