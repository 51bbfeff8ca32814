"""The upstream connections: one keep-alive connection per lane, marked, to the endpoint.

- Plain HTTP straight to the configured endpoint: a TCP connection is opened to its host
  and port, so ``HTTP_PROXY``, ``http_proxy``, ``ALL_PROXY`` and ``NO_PROXY`` play no part.
  The socket carries imdsd's mark (:mod:`imdsd.netmark`), so the IMDS redirect lets it through.
- One keep-alive connection per lane (by default one per endpoint, so the slow first
  Scheduled Events call never holds up the instance document), reopened when the server
  closes it or after any error. The connection is made *before* a slot is taken and the
  request is sent right after, so request starts keep the budget's spacing.
- ``connect_timeout`` bounds connecting, ``read_timeout`` (or a per-request timeout) the
  whole exchange; answers over ``max_body`` (1 MiB) are refused and their connection dropped.
- trio/h11 failures become :class:`~imdsd.upstream.errors.TransportError` subclasses here.
- An answer carrying an ``X-Imdsd-*`` header came from an imdsd front, not IMDS (the
  redirect caught this connection): it is :class:`~imdsd.upstream.errors.ThroughFront`,
  never data, and the change into and out of that state is logged once each.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog
import trio

from imdsd import httpio
from imdsd.config import ImdsConfig
from imdsd.netmark import open_marked_tcp
from imdsd.upstream.errors import (
    LOOP_MESSAGE,
    ConnectError,
    ProtocolError,
    Reset,
    ThroughFront,
    Timeout,
    TooLarge,
    TransportError,
)
from imdsd.upstream.messages import Outbound, UpstreamResponse
from imdsd.upstream.report import RequestMetrics

MAX_BODY: Final = 1 << 20
FRONT_HEADER_PREFIX: Final = b"x-imdsd-"

log = structlog.get_logger("imdsd.upstream")

Acquire = Callable[[], Awaitable[None]]
"""Waits for the slot a request may start in (the budget's, or the IMDS front's)."""

_ERRORS: Final[dict[type[httpio.HttpIOError], type[TransportError]]] = {
    httpio.ConnectFailed: ConnectError,
    httpio.Deadline: Timeout,
    httpio.PeerClosed: Reset,
    httpio.ProtocolViolation: ProtocolError,
    httpio.BodyTooLarge: TooLarge,
}


def from_front(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True when an answer carries an ``X-Imdsd-*`` header: an imdsd front sent it."""
    return any(name.lower().startswith(FRONT_HEADER_PREFIX) for name, _ in headers)


def mapped(exc: httpio.HttpIOError) -> TransportError:
    """The :class:`TransportError` an httpio failure stands for."""
    for source, target in _ERRORS.items():
        if isinstance(exc, source):
            return target(str(exc))
    return Reset(str(exc))


class Pool:
    """The connections to ``config.endpoint``, one per lane; see the module docstring."""

    def __init__(
        self,
        config: ImdsConfig,
        *,
        max_body: int = MAX_BODY,
        metrics: RequestMetrics | None = None,
    ) -> None:
        url = urllib.parse.urlsplit(config.endpoint)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"IMDS endpoint must be http://host[:port], got {config.endpoint!r}")
        self.host = url.hostname
        self.port = url.port or 80
        self.host_header = url.netloc
        self.config = config
        self.max_body = max_body
        self.metrics = metrics
        self.sent = 0
        self._connections: dict[str, httpio.ClientConnection] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.looped = False

    async def exchange(
        self, lane: str, out: Outbound, acquire: Acquire, *, same_slot: bool = False
    ) -> UpstreamResponse:
        """Send ``out`` on ``lane`` once ``acquire`` gives a slot; one answer or an error.

        A connection the server closed while we waited for the slot is reopened; that slot
        is spent and another acquired, unless ``same_slot`` (the IMDS front's slots are its
        callers'). Raises :class:`TransportError` when no complete answer came.
        """
        lock = self._locks.setdefault(lane, trio.Lock())
        async with lock:
            conn = await self._ready(lane, acquire, same_slot=same_slot)
            self.sent += 1
            try:
                response = await conn.request(
                    out.method,
                    out.target,
                    [("Host", self.host_header), *out.headers],
                    out.body,
                    timeout=self.config.read_timeout if out.timeout is None else out.timeout,
                )
            except httpio.HttpIOError as exc:
                self._count(lane, None)
                await self._drop(lane)
                raise mapped(exc) from exc
            if from_front(response.headers):
                self._count(lane, None)
                await self._drop(lane)
                self._loop_state(lane, looped=True)
                raise ThroughFront()
            self._loop_state(lane, looped=False)
            self._count(lane, response.status)
            if not conn.reusable:
                await self._drop(lane)
        return UpstreamResponse(
            response.status,
            tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers),
            response.body,
        )

    async def _ready(
        self, lane: str, acquire: Acquire, *, same_slot: bool
    ) -> httpio.ClientConnection:
        conn = await self._connection(lane)
        await acquire()
        while not conn.reusable:
            # closed by the server while we waited for the slot
            await self._drop(lane)
            conn = await self._connection(lane)
            if same_slot:
                break
            await acquire()  # the slot waited for is spent
        return conn

    def _loop_state(self, lane: str, *, looped: bool) -> None:
        if looped == self.looped:
            return
        self.looped = looped
        if looped:
            log.error("upstream loop", lane=lane, endpoint=self.host_header, error=LOOP_MESSAGE)
        else:
            log.info("upstream loop gone: IMDS answers directly", lane=lane)

    def _count(self, lane: str, status: int | None) -> None:
        if self.metrics is not None:
            self.metrics.upstream_request(lane, status)

    async def _connection(self, lane: str) -> httpio.ClientConnection:
        conn = self._connections.get(lane)
        if conn is not None and conn.reusable:
            return conn
        if conn is not None:
            await self._drop(lane)
        try:
            stream = await open_marked_tcp(self.host, self.port, self.config.connect_timeout)
        except httpio.HttpIOError as exc:
            raise mapped(exc) from exc
        conn = httpio.ClientConnection(stream, max_body=self.max_body)
        self._connections[lane] = conn
        return conn

    async def _drop(self, lane: str) -> None:
        conn = self._connections.pop(lane, None)
        if conn is not None:
            await conn.aclose()

    async def aclose(self) -> None:
        """Close every open connection (also when the caller is being cancelled)."""
        with trio.CancelScope(shield=True):
            for lane in list(self._connections):
                await self._drop(lane)

    @property
    def open_connections(self) -> int:
        """How many keep-alive connections are open."""
        return len(self._connections)
