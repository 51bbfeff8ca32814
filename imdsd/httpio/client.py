"""The client side: :class:`ClientConnection` sends requests on one keep-alive connection."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import h11
import trio

from imdsd.httpio.errors import (
    BodyTooLarge,
    ConnectFailed,
    Deadline,
    HttpIOError,
    PeerClosed,
    ProtocolViolation,
)
from imdsd.httpio.messages import Response
from imdsd.httpio.transport import Transport

MAX_INFORMATIONAL = 10  # 1xx responses a client accepts before the final one
MAX_HEAD = 65536


async def open_tcp(host: str, port: int, timeout: float) -> trio.SocketStream:
    """Open a TCP connection within ``timeout`` seconds; failures are ConnectFailed."""
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError as exc:
        raise ConnectFailed(f"connect to {host}:{port} timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise ConnectFailed(f"connect to {host}:{port} failed: {exc}") from exc


async def open_unix(path: str, timeout: float) -> trio.SocketStream:
    """Open a unix socket connection within ``timeout`` seconds; failures are ConnectFailed."""
    try:
        with trio.fail_after(timeout):
            return await trio.open_unix_socket(path)
    except trio.TooSlowError as exc:
        raise ConnectFailed(f"connect to {path} timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise ConnectFailed(f"connect to {path} failed: {exc}") from exc


def _encoded(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class ClientConnection:
    """One keep-alive HTTP/1.1 client connection; create a new one when not reusable."""

    def __init__(self, stream: trio.abc.Stream, *, max_body: int = 1 << 20) -> None:
        self._io = Transport(stream)
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.max_body = max_body

    @property
    def reusable(self) -> bool:
        """True when another request may be sent on this connection.

        Not once the idle server has closed (or sent something unasked).
        """
        conn = self._conn
        return (
            conn.our_state is h11.IDLE
            and conn.their_state is h11.IDLE
            and not self._io.readable_now()
        )

    async def _send(self, event: h11.Event) -> None:
        try:
            data = self._conn.send(event)
            if data:
                await self._io.send(data)
        except h11.LocalProtocolError as exc:
            self._conn.send_failed()
            raise ProtocolViolation(f"local protocol error: {exc}", 500) from exc
        except HttpIOError:
            self._conn.send_failed()
            raise

    async def _send_request(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        await self._send(h11.Request(method=method, target=target, headers=headers))
        if body:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _next_event(self) -> Any:
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.trailing_data[1]:  # the server closed in the middle of a message
                    raise PeerClosed(f"peer closed the connection: {exc}") from exc
                raise ProtocolViolation(str(exc), exc.error_status_hint) from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                conn.receive_data(await self._io.receive())
            except RuntimeError as exc:  # data after EOF was already signalled
                raise PeerClosed(str(exc)) from exc

    async def _final_response(self) -> h11.Response:
        """The response to the request just sent, after at most ``MAX_INFORMATIONAL`` 1xx.

        More informational responses than that is a ProtocolViolation: a server flooding
        them would otherwise keep the client busy for as long as it likes.
        """
        for _ in range(MAX_INFORMATIONAL + 1):
            event = await self._next_event()
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise PeerClosed("server closed the connection before answering")
            if not isinstance(event, h11.InformationalResponse):
                raise ProtocolViolation(f"expected a response, got {type(event).__name__}")
        raise ProtocolViolation(f"more than {MAX_INFORMATIONAL} informational (1xx) responses")

    async def _read_body(self) -> bytes:
        """Data events until EndOfMessage; more than ``max_body`` bytes is BodyTooLarge."""
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    raise BodyTooLarge(f"body larger than {self.max_body} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise PeerClosed("connection closed in the middle of a body")
            else:
                raise ProtocolViolation(f"unexpected {type(event).__name__} in a body")

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
        *,
        timeout: float = math.inf,
    ) -> Response:
        """Send one request and read the whole response within ``timeout`` seconds.

        Raises PeerClosed, ProtocolViolation, Deadline or BodyTooLarge; after any of them the
        connection is not reusable.
        """
        all_headers = _encoded(headers)
        if body or method in ("POST", "PUT", "PATCH"):
            all_headers.append((b"content-length", b"%d" % len(body)))
        try:
            with trio.fail_after(timeout):
                await self._send_request(method, target, all_headers, body)
                event = await self._final_response()
                resp_body = await self._read_body()
        except trio.TooSlowError as exc:
            await self.aclose()
            raise Deadline(f"no complete answer within {timeout:g}s") from exc
        except HttpIOError:
            await self.aclose()
            raise
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        return Response(
            event.status_code, event.reason.decode("latin-1"), list(event.headers), resp_body
        )

    async def stream_lines(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        *,
        head_timeout: float = 10.0,
        max_line: int = 1 << 20,
    ) -> tuple[Response, Callable[[], Awaitable[bytes | None]]]:
        """Send a request whose answer is a line stream; returns the head and a line reader.

        The reader returns each complete line (without the newline) and None at the end.
        """
        try:
            with trio.fail_after(head_timeout):
                await self._send_request(method, target, _encoded(headers), b"")
                event = await self._final_response()
        except trio.TooSlowError as exc:
            await self.aclose()
            raise Deadline(f"no answer within {head_timeout:g}s") from exc
        except HttpIOError:
            await self.aclose()
            raise
        head = Response(event.status_code, event.reason.decode("latin-1"), list(event.headers), b"")
        buffer = bytearray()
        done = False

        async def next_line() -> bytes | None:
            nonlocal done
            while True:
                index = buffer.find(b"\n")
                if index >= 0:
                    line = bytes(buffer[:index])
                    del buffer[: index + 1]
                    return line
                if done:
                    return None
                if len(buffer) > max_line:
                    raise BodyTooLarge(f"line longer than {max_line} bytes")
                item = await self._next_event()
                if isinstance(item, h11.Data):
                    buffer.extend(item.data)
                elif isinstance(item, h11.EndOfMessage):
                    done = True
                else:
                    raise PeerClosed("stream ended without a final chunk")

        return head, next_line

    async def aclose(self) -> None:
        """Close the connection at once."""
        await self._io.aclose()
