"""Serving one accepted connection: the trio shell around :class:`.protocol.ServerProtocol`.

:func:`serve_connection` reads (idle time tracked by :class:`.idle.IdleConnections`, the rest
of a request under ``request_timeout``), calls the handler with a :class:`Request` and a
:class:`Responder`, writes (every write within ``write_timeout``) and closes. What to answer
and whether to keep the connection is the protocol's business.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
import trio

from imdsd.httpio.errors import Deadline, HttpIOError, PeerClosed, error_status
from imdsd.httpio.idle import IdleConnections, _Waiting
from imdsd.httpio.messages import Request
from imdsd.httpio.protocol import (
    DEFAULT_SERVER_HEADER,
    NEED_DATA,
    ServerLimits,
    ServerProtocol,
)
from imdsd.httpio.transport import Transport

log = structlog.get_logger("imdsd.httpio")

REJECT_LINGER = 0.25  # seconds a rejected connection may take to be answered and closed


class Responder:
    """Sends the response to one request: in full with :meth:`send`, or streamed.

    To a HEAD request (``head_only``) the same head is sent, the body never: handlers answer
    HEAD as they answer GET. A 204 or 304 carries no body and no ``Content-Length``. Set
    ``close_after`` to close the connection once the response is sent.
    """

    __slots__ = ("_io", "_protocol")

    def __init__(self, protocol: ServerProtocol, transport: Transport) -> None:
        self._protocol = protocol
        self._io = transport

    @property
    def started(self) -> bool:
        """True once a response has begun."""
        return self._protocol.started

    @property
    def head_only(self) -> bool:
        """True when the request is HEAD (no body is sent)."""
        return self._protocol.head_only

    @property
    def close_after(self) -> bool:
        """True when the connection closes after this response."""
        return self._protocol.close_after

    @close_after.setter
    def close_after(self, value: bool) -> None:
        self._protocol.close_after = value

    async def _write(self, data: bytes) -> None:
        try:
            await self._io.send(data)
        except HttpIOError:
            self._protocol.send_failed()
            raise

    async def send(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes = b""
    ) -> None:
        """Send a complete response with a Content-Length."""
        await self._write(self._protocol.response(status, headers, body))

    async def start(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Start a streamed (chunked) response; follow with :meth:`write` and :meth:`end`."""
        await self._write(self._protocol.start(status, headers))

    async def write(self, data: bytes) -> None:
        """Send one chunk of a streamed response (nothing to a HEAD request)."""
        framed = self._protocol.chunk(data)
        if framed:
            await self._write(framed)

    def write_nowait(self, data: bytes) -> bytes:
        """Send one chunk of a streamed response without waiting, as far as the socket takes it.

        Returns the bytes still to send (b"" when all went out); pass them to
        :meth:`write_rest`. For fan-out to many streams. Raises PeerClosed when the peer is
        gone.
        """
        framed = self._protocol.chunk(data)
        if not framed:
            return b""
        try:
            return self._io.send_nowait(framed)
        except PeerClosed:
            self._protocol.send_failed()
            raise

    async def write_rest(self, rest: bytes) -> None:
        """Send what :meth:`write_nowait` could not."""
        if rest:
            await self._write(rest)

    async def end(self) -> None:
        """Finish a streamed response."""
        await self._write(self._protocol.end())

    async def send_error(self, status: int, message: str) -> None:
        """Send a JSON error that closes the connection, if no response has started yet;
        never raises (a peer that is gone gets nothing)."""
        data = self._protocol.error_response(status, message)
        if data:
            with contextlib.suppress(HttpIOError):
                await self._write(data)

    async def wait_peer_closed(self, max_buffered: int = 65536) -> None:
        """Return once the peer has closed (or flooded us); for long streamed responses.

        Call it from a separate task while streaming: nothing else reads the connection then.
        Pipelined bytes are kept for the next request up to ``max_buffered``.
        """
        protocol = self._protocol
        while data := await self._io.receive():
            try:
                protocol.receive_data(data)
            except PeerClosed:
                return
            if protocol.buffered_size() > max_buffered:
                return


Handler = Callable[[Request, Responder], Awaitable[None]]


async def _next_request(
    protocol: ServerProtocol,
    transport: Transport,
    limits: ServerLimits,
    peer: Any,
    waiting: _Waiting,
) -> Request | None:
    """Wait (tracked as idle) for the next request, then read it in full (request deadline)."""
    if not protocol.has_buffered_data():
        waiting.since = trio.current_time()
        data = await transport.receive()
        waiting.since = None
        if waiting.scope.cancel_called:  # swept after the bytes came, before this task ran
            return None
        protocol.receive_data(data)
    request = protocol.next_request(peer)
    if request is not NEED_DATA:
        return request
    deadline = trio.current_time() + limits.request_timeout
    while request is NEED_DATA:
        interim = protocol.interim()
        try:
            with trio.fail_at(deadline):
                if interim:
                    await transport.send(interim)
                data = await transport.receive()
        except trio.TooSlowError as exc:
            raise Deadline("request not received in time") from exc
        protocol.receive_data(data)
        request = protocol.next_request(peer)
    return request


async def serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    limits: ServerLimits,
    idle: IdleConnections,
    *,
    server_header: bytes = DEFAULT_SERVER_HEADER,
    reject_status: int | None = None,
    peer: Any = None,
) -> None:
    """Serve HTTP/1.1 on one stream until the peer leaves; never raises (but Cancelled).

    ``idle`` closes the connection when it waits too long for a request (its :meth:`run
    <IdleConnections.run>` must be running). With ``reject_status`` the connection is answered
    with that status at once, without waiting for a request, and closed (connections beyond
    ``max_connections``). ``peer`` is attached to every request as ``request.peer``.
    """
    transport = Transport(stream, limits.write_timeout)
    protocol = ServerProtocol(limits, server_header)
    responder = Responder(protocol, transport)
    if reject_status is not None:
        await _reject(responder, transport, reject_status, min(REJECT_LINGER, limits.drain_timeout))
        return
    with idle.tracking() as waiting, waiting.scope:
        try:
            while True:
                try:
                    request = await _next_request(protocol, transport, limits, peer, waiting)
                    if request is None:
                        break
                    await handler(request, responder)
                except PeerClosed:
                    break
                except HttpIOError as exc:
                    await responder.send_error(error_status(exc), str(exc))
                    break
                except Exception:
                    log.exception("request handler failed")
                    await responder.send_error(500, "internal error")
                    break
                if not protocol.next_cycle():
                    break
        finally:
            with trio.CancelScope(shield=True):
                await transport.close(limits.drain_timeout)


async def _reject(responder: Responder, transport: Transport, status: int, linger: float) -> None:
    """Answer ``status`` without reading a request, and close within ``linger`` seconds."""
    try:
        with trio.move_on_after(linger):
            await responder.send_error(status, "too many connections")
    finally:
        with trio.CancelScope(shield=True):
            await transport.close(linger)
