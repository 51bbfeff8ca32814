"""The IMDS client: one object for the daemon, the pollers and the IMDS front.

:class:`ImdsClient` puts the pieces of :mod:`imdsd.upstream` together:

- :mod:`.pool`: one marked keep-alive connection per lane, straight to the endpoint (no
  proxy), timeouts and the 1 MiB answer cap; trio/h11 failures become :mod:`.errors`;
- :mod:`.sender`: imdsd's own requests (:mod:`.messages`: headers, target) within the budget;
- :mod:`.retrying`: :meth:`ImdsClient.fetch`'s retry loop, at the api-versions
  :mod:`.negotiate` picks;
- :mod:`.report`: request counts, fetch times and :meth:`ImdsClient.status`.

:meth:`ImdsClient.forward` sends an agent's request as it came (the IMDS front).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Final

import msgspec
import trio

from imdsd.config import ImdsConfig
from imdsd.upstream.budget import Budget
from imdsd.upstream.budget_core import Priority
from imdsd.upstream.errors import (
    ConnectError,
    GaveUp,
    ProtocolError,
    Reset,
    Timeout,
    TooLarge,
    TransportError,
    UpstreamError,
)
from imdsd.upstream.messages import (
    USER_AGENT,
    Fetched,
    Outbound,
    UpstreamResponse,
    build_target,
    own_headers,
)
from imdsd.upstream.negotiate import Negotiator
from imdsd.upstream.pool import MAX_BODY, Acquire, Pool
from imdsd.upstream.report import RequestMetrics, client_status
from imdsd.upstream.retry import DEFAULT_POLICY, Random, RetryPolicy
from imdsd.upstream.retrying import PRIORITY, Observer, Retrier
from imdsd.upstream.sender import Sender
from imdsd.upstream.versions import Endpoint, VersionBook

__all__ = [
    "APPROVE_DEADLINE",
    "MAX_BODY",
    "PRIORITY",
    "USER_AGENT",
    "ConnectError",
    "Fetched",
    "GaveUp",
    "ImdsClient",
    "Observer",
    "ProtocolError",
    "RequestMetrics",
    "Reset",
    "Timeout",
    "TooLarge",
    "TransportError",
    "UpstreamError",
    "UpstreamResponse",
    "build_target",
]

APPROVE_DEADLINE: Final = 30.0


class ImdsClient:
    """Talks to IMDS through ``budget``; the rules it keeps are in the modules named above.

    ``pool`` replaces the connections to ``config.endpoint`` (tests of the IMDS front).
    """

    def __init__(
        self,
        config: ImdsConfig,
        budget: Budget,
        *,
        rng: Random | None = None,
        max_body: int = MAX_BODY,
        metrics: RequestMetrics | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.pool = pool if pool is not None else Pool(config, max_body=max_body, metrics=metrics)
        self.config = config
        self.budget = budget
        self.versions = VersionBook(config.api_version)
        self.metrics = metrics
        self._sender = Sender(self.pool, budget)
        self._negotiator = Negotiator(self.versions, self._sender)
        self._retrier = Retrier(
            self._sender, self._negotiator, rng if rng is not None else random.Random()
        )

    def reseed(self, rng: Random) -> None:
        """Draw retry jitter from ``rng`` from now on (tests make it reproducible)."""
        self._retrier = dataclasses.replace(self._retrier, rng=rng)

    # ------------------------------------------------------------------ raw requests

    async def get(
        self,
        path: str,
        query: Mapping[str, str] | None = None,
        *,
        priority: int = Priority.NORMAL,
        timeout: float | None = None,
        lane: str | None = None,
    ) -> UpstreamResponse:
        """One GET (no retries) within the budget; raises :class:`TransportError`."""
        return await self._sender.send(
            "GET", path, query, b"", priority=priority, timeout=timeout, lane=lane
        )

    async def post(
        self,
        path: str,
        query: Mapping[str, str] | None,
        body: bytes,
        *,
        priority: int = Priority.URGENT,
        timeout: float | None = None,
        lane: str | None = None,
    ) -> UpstreamResponse:
        """One POST with a JSON body (no retries) within the budget."""
        return await self._sender.send(
            "POST", path, query, body, priority=priority, timeout=timeout, lane=lane
        )

    def headers(self, method: str) -> list[tuple[str, str]]:
        """The headers of one request (a fresh client request id each time)."""
        return [("Host", self.pool.host_header), *own_headers(method)]

    async def forward(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        acquire: Acquire,
        lane: str,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send an agent's request as it came (the IMDS front), no retries.

        ``target`` and ``headers`` go as given (the caller's ``Host`` is replaced by the
        endpoint's; nothing is added); ``acquire`` takes the slot instead of the budget,
        after the connection is open, as for imdsd's own requests.
        """
        sent = [(k, v) for k, v in headers if k.lower() != "host"]
        out = Outbound(method, target, sent, body, timeout)
        return await self.pool.exchange(lane, out, acquire, same_slot=True)

    async def aclose(self) -> None:
        """Close every open connection (also when the caller is being cancelled)."""
        await self.pool.aclose()

    @property
    def open_connections(self) -> int:
        """How many keep-alive connections are open."""
        return self.pool.open_connections

    # ------------------------------------------------------------------ versioned requests

    async def fetch(
        self,
        endpoint: Endpoint,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        observer: Observer | None = None,
    ) -> Fetched:
        """GET ``endpoint`` at the negotiated api-version, retrying per ``policy``.

        ``observer`` sees every failed attempt with the decision taken. Raises
        :class:`GaveUp` when the policy gives up (a non-retryable answer, a refused
        version with nothing left to try, or the policy's deadline).
        """
        started = trio.current_time()
        fetched = await self._retrier.run(
            endpoint,
            "GET",
            priority=priority,
            timeout=timeout,
            policy=policy,
            observer=observer,
            lane=endpoint,
        )
        if self.metrics is not None:
            self.metrics.observe_fetch(endpoint, trio.current_time() - started)
        return fetched

    async def approve(
        self, event_ids: Sequence[str], *, deadline: float = APPROVE_DEADLINE
    ) -> None:
        """Approve scheduled events early (``POST {"StartRequests": [...]}``).

        Retried per policy for at most ``deadline`` seconds; raises :class:`GaveUp`.
        """
        if not event_ids:
            raise ValueError("no event ids to approve")
        body = msgspec.json.encode({"StartRequests": [{"EventId": e} for e in event_ids]})
        policy = RetryPolicy(deadline=deadline, interval=1.0)
        await self._retrier.run(
            "scheduled_events",
            "POST",
            body=body,
            priority=Priority.URGENT,
            policy=policy,
            lane="approve",
        )

    async def probe_versions(self, priority: int = Priority.NORMAL) -> list[str] | None:
        """One request for ``/metadata/versions``; None (logged) when it fails."""
        return await self._negotiator.probe(priority)

    def status(self) -> dict[str, object]:
        """Budget use, api-versions and upstream connections, JSON-ready (for status)."""
        return client_status(self.budget, self.versions, self.pool.sent, self.open_connections)
