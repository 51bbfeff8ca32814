"""The request/retry loop of a versioned request: attempt, decide, renegotiate, wait.

Each attempt is one request at the negotiated api-version; a failed one becomes an
:class:`~imdsd.upstream.retry.Outcome` and :func:`~imdsd.upstream.retry.decide` says what
next. A refused api-version switches to another (at most ``MAX_VERSION_SWITCHES`` times a
request) without counting as a failure to wait for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from imdsd.model import DocumentError, decode_error
from imdsd.upstream.budget_core import Priority
from imdsd.upstream.errors import GaveUp, TransportError
from imdsd.upstream.messages import Fetched, UpstreamResponse
from imdsd.upstream.negotiate import Negotiator
from imdsd.upstream.retry import (
    DEFAULT_POLICY,
    Decision,
    FallbackVersion,
    GiveUp,
    Outcome,
    Random,
    Retry,
    RetryPolicy,
    decide,
    parse_retry_after,
)
from imdsd.upstream.sender import Sender
from imdsd.upstream.versions import PATHS, Endpoint, NoCommonVersion

MAX_VERSION_SWITCHES: Final = 3

PRIORITY: Final[dict[Endpoint, Priority]] = {
    "scheduled_events": Priority.URGENT,
    "instance": Priority.NORMAL,
    "loadbalancer": Priority.LOW,
}

Observer = Callable[[Outcome, Decision], None]


def _error_message(body: bytes) -> str:
    try:
        return decode_error(body).error[:200]
    except DocumentError:
        return ""


def _newest_versions(body: bytes) -> tuple[str, ...]:
    try:
        return tuple(v for v in decode_error(body).newest_versions if isinstance(v, str))
    except DocumentError:
        return ()


@dataclass(frozen=True, slots=True)
class Retrier:
    """Runs versioned requests through ``sender`` at ``negotiator``'s versions, retrying."""

    sender: Sender
    negotiator: Negotiator
    rng: Random

    async def run(
        self,
        endpoint: Endpoint,
        method: str,
        *,
        lane: str,
        body: bytes = b"",
        priority: int | None = None,
        timeout: float | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        observer: Observer | None = None,
    ) -> Fetched:
        """``method`` ``endpoint`` until it succeeds; raises :class:`GaveUp` when the policy
        gives up. ``observer`` sees every failed attempt with the decision taken."""
        priority = PRIORITY[endpoint] if priority is None else priority
        attempt = 0
        first_failure = 0.0
        switches = 0
        while True:
            try:
                version = await self.negotiator.version_for(endpoint, priority)
            except NoCommonVersion as exc:
                outcome = Outcome(endpoint, status=400, message=str(exc))
                if observer is not None:
                    observer(outcome, GiveUp(str(exc)))
                raise GaveUp(endpoint, outcome, str(exc)) from exc
            outcome, response = await self._attempt(
                endpoint, method, version, body=body, priority=priority, timeout=timeout, lane=lane
            )
            if response is not None and outcome.ok:
                return Fetched(endpoint, version, response)
            now = trio.current_time()
            attempt += 1
            if attempt == 1:
                first_failure = now
            decision = decide(outcome, attempt, first_failure, now, self.rng, policy=policy)
            if isinstance(decision, FallbackVersion):
                offered = decision.newest_versions
                if switches < MAX_VERSION_SWITCHES and self.negotiator.refused(
                    endpoint, version, offered
                ):
                    switches += 1
                    continue
                decision = GiveUp(
                    f"api-version {version} refused; the endpoint offers {', '.join(offered)}"
                )
            if observer is not None:
                observer(outcome, decision)
            if isinstance(decision, GiveUp):
                raise GaveUp(endpoint, outcome, decision.reason)
            if isinstance(decision, Retry):
                await trio.sleep(decision.delay)

    async def _attempt(
        self,
        endpoint: Endpoint,
        method: str,
        version: str,
        *,
        body: bytes,
        priority: int,
        timeout: float | None,
        lane: str,
    ) -> tuple[Outcome, UpstreamResponse | None]:
        query = {"api-version": version}
        try:
            response = await self.sender.send(
                method, PATHS[endpoint], query, body, priority=priority, timeout=timeout, lane=lane
            )
        except TransportError as exc:
            return Outcome(endpoint, error=exc.kind, message=str(exc)), None
        status = response.status
        if 200 <= status < 300:
            return Outcome(endpoint, status=status), response
        retry_after = parse_retry_after(
            response.header("retry-after"), date=response.header("date"), wall_now=time.time()
        )
        return (
            Outcome(
                endpoint,
                status=status,
                retry_after=retry_after,
                newest_versions=_newest_versions(response.body) if status == 400 else (),
                message=_error_message(response.body),
            ),
            response,
        )
