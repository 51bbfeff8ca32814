"""Forwarding front requests to IMDS (trio shell): fair queue, capacity, token cache.

A forwarded request waits in its :class:`Gate`'s fair queue (per caller, round-robin) for
its turn and a free upstream connection (a *lane*), then for capacity: imdsd's request budget
(shared with the pollers at normal priority, so scheduled events polls go first; an approval
of scheduled events is urgent, like imdsd's own) or, for ``/metadata/identity``, IMDS's
identity limits (20/s, 5 concurrent). If that takes longer than ``queue_timeout`` the caller
gets IMDS's own ``429``. The request then goes upstream as
it came (method, target, headers, body; nothing added, no proxy) and IMDS's answer is passed
on with ``X-Imdsd-Source: upstream``. No answer at all (IMDS unreachable, timed out) gives
IMDS's ``500``, with ``X-Imdsd-Error`` saying why. With the token cache on, requests for a
token being fetched wait for that answer instead of each asking IMDS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Final, NamedTuple

import trio

from imdsd.front.cache import Answer
from imdsd.front.forward import FairQueue, IdentityLimits
from imdsd.front.rules import (
    JSON_TYPE,
    SERVICE_ERROR,
    TOO_MANY_REQUESTS,
    Endpoint,
    Routed,
    error_body,
)
from imdsd.front.tokens import TokenCache
from imdsd.upstream.budget import Budget, Priority
from imdsd.upstream.client import ImdsClient, TransportError, UpstreamResponse

TOKEN_PATH: Final = "/metadata/identity/oauth2/token"
GENERAL_LANES: Final = 4
_DROP_REQUEST: Final = frozenset(
    {"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length",
     "proxy-connection", "proxy-authorization", "trailer"}
)  # fmt: skip
_DROP_RESPONSE: Final = frozenset(
    {"content-length", "content-type", "transfer-encoding", "connection", "keep-alive", "date",
     "server", "trailer"}
)  # fmt: skip


class _Outgoing(NamedTuple):
    identity: bool
    caller: Hashable
    method: str
    target: str
    headers: Sequence[tuple[str, str]]
    body: bytes
    priority: Priority


class QueueTimeout(Exception):
    """No turn or capacity within ``queue_timeout``."""


class Gate:
    """A fair queue of forwarded requests in front of a set of upstream lanes."""

    def __init__(self, lanes: Sequence[str]) -> None:
        self.queue = FairQueue()
        self.free = list(lanes)
        self._changed = trio.Event()

    def notify(self) -> None:
        """Wake every waiter to look again."""
        self._changed.set()
        self._changed = trio.Event()

    def ready(self, ticket: int) -> bool:
        """True when ``ticket`` is first in line and a lane is free."""
        return self.queue.head() == ticket and bool(self.free)

    async def wait_turn(self, ticket: int, deadline: float) -> str:
        """Wait until ``ticket``'s turn with a free lane (by ``deadline``); take the lane."""
        while not self.ready(ticket):
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()
            if trio.current_time() >= deadline and not self.ready(ticket):
                raise QueueTimeout
        return self.free.pop()

    def done(self, ticket: int, lane: str | None) -> None:
        """Leave the queue (and give the lane back)."""
        self.queue.remove(ticket)
        if lane is not None:
            self.free.append(lane)
        self.notify()


def _passed_headers(response: UpstreamResponse, method: str) -> tuple[tuple[str, str], ...]:
    """IMDS's end-to-end headers; to a HEAD, its ``Content-Length`` too (the body it would
    have sent is not there to be measured)."""
    drop = _DROP_RESPONSE - {"content-length"} if method == "HEAD" else _DROP_RESPONSE
    kept = [(k.lower(), v) for k, v in response.headers if k.lower() not in drop]
    return (*kept, ("x-imdsd-source", "upstream"))


class Relay:
    """Forwards front requests (see the module docstring).

    ``client`` and ``budget`` are called per request (the daemon replaces them on reload).
    ``on_queued`` is told when a request had to wait for its turn or for capacity.
    """

    def __init__(
        self,
        client: Callable[[], ImdsClient],
        budget: Callable[[], Budget],
        *,
        queue_timeout: float,
        token_cache: bool,
        identity: IdentityLimits | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.budget = budget
        self.queue_timeout = queue_timeout
        self.token_cache = token_cache
        self.wall = wall
        self.tokens = TokenCache()
        self.identity = identity or IdentityLimits()
        self.general = Gate([f"front-{i}" for i in range(GENERAL_LANES)])
        self.identity_gate = Gate([f"identity-{i}" for i in range(self.identity.concurrency)])
        self._identity_changed = trio.Event()
        self._fetching: dict[str, trio.Event] = {}

    @property
    def waiting(self) -> int:
        """Forwarded requests waiting for their turn or capacity now."""
        return len(self.general.queue) + len(self.identity_gate.queue)

    async def forward(
        self,
        request: Routed,
        *,
        caller: Hashable,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        on_queued: Callable[[], None],
    ) -> Answer:
        """Answer ``request`` from IMDS, from the token cache, or with 429/500."""
        identity = request.endpoint is Endpoint.IDENTITY
        token = identity and self.token_cache and request.method == "GET"
        token = token and target.partition("?")[0] == TOKEN_PATH
        deadline = trio.current_time() + self.queue_timeout
        sent = [(k, v) for k, v in headers if k.lower() not in _DROP_REQUEST]
        approval = request.endpoint is Endpoint.SCHEDULED_EVENTS and request.method == "POST"
        priority = Priority.URGENT if approval else Priority.NORMAL
        outgoing = _Outgoing(identity, caller, request.method, target, sent, body, priority)
        try:
            if token:
                kept = await self._shared_token(target, deadline)
                if kept is not None:
                    return kept
            response = await self._fetch(outgoing, deadline, on_queued, token=token)
        except QueueTimeout:
            queue = (("x-imdsd-source", "queue"),)
            return Answer(429, error_body(TOO_MANY_REQUESTS), JSON_TYPE, queue, "throttled")
        except TransportError as exc:
            reason = str(exc).replace("\r", " ").replace("\n", " ")[:200]
            failed = (("x-imdsd-source", "upstream"), ("x-imdsd-error", reason))
            return Answer(500, error_body(SERVICE_ERROR), JSON_TYPE, failed, "error")
        content_type = response.header("content-type") or JSON_TYPE
        result = "throttled" if response.status == 429 else "forwarded"
        return Answer(
            response.status,
            response.body,
            content_type,
            _passed_headers(response, request.method),
            result,
        )

    async def _shared_token(self, target: str, deadline: float) -> Answer | None:
        """A kept token for ``target``, waiting (by ``deadline``) for one being fetched;
        None when there is none to wait for."""
        while True:
            kept = self.tokens.get(target, self.wall())
            if kept is not None:
                return _token_answer(kept.headers, kept.body_at(self.wall()))
            fetching = self._fetching.get(target)
            if fetching is None:
                return None
            if trio.current_time() >= deadline:
                raise QueueTimeout
            with trio.move_on_at(deadline):
                await fetching.wait()

    async def _fetch(
        self, out: _Outgoing, deadline: float, on_queued: Callable[[], None], *, token: bool
    ) -> UpstreamResponse:
        """Send ``out``; a token answer is kept, and others asking for it meanwhile wait."""
        if not token:
            return await self._send(out, deadline, on_queued)
        fetching = self._fetching[out.target] = trio.Event()
        try:
            response = await self._send(out, deadline, on_queued)
            self.tokens.put(
                out.target, response.status, response.headers, response.body, self.wall()
            )
            return response
        finally:
            del self._fetching[out.target]
            fetching.set()

    async def _send(
        self, out: _Outgoing, deadline: float, on_queued: Callable[[], None]
    ) -> UpstreamResponse:
        identity = out.identity
        gate = self.identity_gate if identity else self.general
        ticket = gate.queue.enqueue(out.caller)
        lane: str | None = None
        started = False
        queued = not gate.ready(ticket)

        async def capacity() -> None:
            nonlocal started, queued
            if identity:
                await self._identity_slot(deadline, queued, on_queued)
                started = True
            else:
                budget = self.budget()
                now = trio.current_time()
                if not queued and (budget.waiting or budget.core.next_slot(now) > now):
                    queued = True
                    on_queued()
                with trio.move_on_at(deadline):
                    await budget.acquire(out.priority)
                    started = True
                if not started:
                    raise QueueTimeout
            gate.done(ticket, None)

        try:
            if queued:
                on_queued()
            lane = await gate.wait_turn(ticket, deadline)
            return await self.client().forward(
                out.method, out.target, out.headers, out.body, acquire=capacity, lane=lane
            )
        finally:
            gate.done(ticket, lane)
            if identity and started:
                self.identity.finish()
                self._identity_changed.set()
                self._identity_changed = trio.Event()

    async def _identity_slot(
        self, deadline: float, queued: bool, on_queued: Callable[[], None]
    ) -> None:
        limits = self.identity
        while True:
            now = trio.current_time()
            if limits.try_start(now):
                return
            if now >= deadline:
                raise QueueTimeout
            if not queued:
                queued = True
                on_queued()
            changed = self._identity_changed
            with trio.move_on_at(min(deadline, limits.next_start(now))):
                await changed.wait()


def _token_answer(headers: tuple[tuple[str, str], ...], body: bytes) -> Answer:
    content_type = JSON_TYPE
    kept: list[tuple[str, str]] = []
    for name, value in headers:
        if name.lower() == "content-type":
            content_type = value
        elif name.lower() not in _DROP_RESPONSE:
            kept.append((name.lower(), value))
    return Answer(200, body, content_type, (*kept, ("x-imdsd-source", "token-cache")), "cached")
