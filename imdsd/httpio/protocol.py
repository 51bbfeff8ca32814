"""The server side of one HTTP/1.1 connection without I/O: bytes in, requests and bytes out.

:class:`ServerProtocol` puts the server's policy around an h11 connection: the header and
body limits (431, 413, also before ``100 Continue``), HEAD (the head of the GET answer, no
body), 204 and 304 (no body, no ``Content-Length``), absolute-form targets, error responses
(only while no response has started, and they close the connection) and keep-alive (whether
the connection carries another request). The trio shell (:mod:`.connection`) only moves the
bytes, waits and keeps the deadlines, so all of this is tested without sockets.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Final, Literal

import h11

from imdsd import __version__
from imdsd.httpio.errors import BodyTooLarge, PeerClosed, ProtocolViolation
from imdsd.httpio.messages import Request, find_header, http_date, json_error, reason_phrase

DEFAULT_SERVER_HEADER: Final = b"imdsd/" + __version__.encode()
JSON_HEADERS: Final = ((b"content-type", b"application/json"),)
NO_BODY: Final = (204, 304)  # statuses whose responses carry neither a body nor Content-Length


class ServerLimits:
    """Limits that protect a server from one misbehaving client.

    ``write_timeout`` bounds every write of a response: a peer that does not take the bytes
    in that time (it stopped reading) is closed.
    """

    __slots__ = (
        "drain_timeout",
        "idle_timeout",
        "max_body",
        "max_head",
        "request_timeout",
        "write_timeout",
    )

    def __init__(
        self,
        *,
        max_head: int = 16384,
        max_body: int = 65536,
        idle_timeout: float = 75.0,
        request_timeout: float = 10.0,
        drain_timeout: float = 2.0,
        write_timeout: float = 10.0,
    ) -> None:
        self.max_head = max_head
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.drain_timeout = drain_timeout
        self.write_timeout = write_timeout


class _Need(enum.Enum):
    DATA = "need data"


NEED_DATA: Final = _Need.DATA
"""What :meth:`ServerProtocol.next_request` returns until a request's bytes are all here."""

_HEAD_CACHE_SIZE = 256
_head_cache: dict[tuple[Any, ...], h11.Response] = {}


class ServerProtocol:
    """One server connection's HTTP/1.1 state: feed it bytes, take requests and bytes to send.

    ``started`` (a response began), ``close_after`` (close once it is sent; a handler may set
    it) and ``head_only`` (the request is HEAD) describe the current request.
    """

    __slots__ = (
        "_chunks",
        "_conn",
        "_request",
        "_size",
        "close_after",
        "head_only",
        "limits",
        "server_header",
        "started",
    )

    def __init__(self, limits: ServerLimits, server_header: bytes = DEFAULT_SERVER_HEADER) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        self.limits = limits
        self.server_header = server_header
        self._request: h11.Request | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self.started = False
        self.close_after = False
        self.head_only = False

    # ------------------------------------------------------------------ bytes in

    def receive_data(self, data: bytes) -> None:
        """Take bytes read from the peer (b"" once it has closed or reset)."""
        try:
            self._conn.receive_data(data)
        except RuntimeError as exc:  # data after EOF was already signalled
            raise PeerClosed(str(exc)) from exc

    def has_buffered_data(self) -> bool:
        """True when bytes of a next request (or the peer's close) are already here."""
        data, closed = self._conn.trailing_data
        return bool(data) or closed

    def buffered_size(self) -> int:
        """How many received bytes wait to be parsed."""
        return len(self._conn.trailing_data[0])

    def next_request(self, peer: Any = None) -> Request | Literal[_Need.DATA] | None:
        """The next complete request, NEED_DATA until its bytes are here, or None when the
        peer closed between requests. ``peer`` is attached as ``request.peer``.

        Raises ProtocolViolation (400; 431 for a head over ``max_head``), BodyTooLarge (413;
        at once for a body declared too large by a client waiting for ``100 Continue``) and
        PeerClosed (the peer closed in the middle of a request).
        """
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.trailing_data[1]:  # the peer closed in the middle of a message
                    raise PeerClosed(f"peer closed the connection: {exc}") from exc
                raise ProtocolViolation(str(exc), exc.error_status_hint) from exc
            if event is h11.NEED_DATA:
                return NEED_DATA
            if isinstance(event, h11.Request):
                self._begin(event)
            elif isinstance(event, h11.EndOfMessage):
                return self._complete(peer)
            elif isinstance(event, h11.Data):
                self._size += len(event.data)
                if self._size > self.limits.max_body:
                    raise BodyTooLarge(f"body larger than {self.limits.max_body} bytes")
                self._chunks.append(bytes(event.data))
            elif isinstance(event, h11.ConnectionClosed) and self._request is None:
                return None
            elif isinstance(event, h11.ConnectionClosed):
                raise PeerClosed("connection closed in the middle of a request")
            else:
                raise ProtocolViolation(f"unexpected {type(event).__name__} from the client")

    def _begin(self, event: h11.Request) -> None:
        limits = self.limits
        head_size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if head_size > limits.max_head:
            raise ProtocolViolation("request header fields too large", 431)
        if self._conn.they_are_waiting_for_100_continue:  # refuse a body before it is sent
            declared = find_header(event.headers, "content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
                raise BodyTooLarge(f"body larger than {limits.max_body} bytes")
        self._request = event
        self._chunks = []
        self._size = 0
        self.head_only = event.method == b"HEAD"

    def _complete(self, peer: Any) -> Request:
        event = self._request
        assert event is not None  # h11 sends no EndOfMessage without a Request first
        self._request = None
        return Request(
            event.method.decode("ascii", "replace"),
            event.target.decode("ascii", "replace"),
            list(event.headers),
            b"".join(self._chunks),
            peer,
        )

    def interim(self) -> bytes:
        """``100 Continue`` while the client waits for it before sending its body, else b""."""
        if not self._conn.they_are_waiting_for_100_continue:
            return b""
        return self._send(
            h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        )

    # ------------------------------------------------------------------ bytes out

    def _send(self, event: h11.Event) -> bytes:
        try:
            return self._conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            self._conn.send_failed()
            raise ProtocolViolation(f"local protocol error: {exc}", 500) from exc

    def _head(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> h11.Response:
        full = [(b"server", self.server_header), (b"date", http_date()), *headers]
        if self.close_after:
            full.append((b"connection", b"close"))
        return h11.Response(status_code=status, headers=full, reason=reason_phrase(status))

    def response(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes = b""
    ) -> bytes:
        """A complete response with its ``Content-Length`` (none on a 204 or 304).

        The validated head is reused for identical heads within the same second (the
        ``Date`` header's resolution), so cached replies skip h11's header validation.
        """
        self.started = True
        key = (status, tuple(headers), len(body), self.close_after, self.server_header, http_date())
        head = _head_cache.get(key)
        if head is None:
            if status in NO_BODY:
                head = self._head(status, headers)
            else:
                head = self._head(status, [*headers, (b"content-length", b"%d" % len(body))])
            if len(_head_cache) >= _HEAD_CACHE_SIZE or (
                _head_cache and next(iter(_head_cache))[5] != key[5]
            ):
                _head_cache.clear()
            _head_cache[key] = head
        conn = self._conn
        try:
            data = conn.send(head) or b""
            if body and not self.head_only and status not in NO_BODY:
                data += conn.send(h11.Data(data=body)) or b""
            return data + (conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as exc:
            conn.send_failed()
            raise ProtocolViolation(f"local protocol error: {exc}", 500) from exc

    def start(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        """The head of a streamed (chunked) response; follow with :meth:`chunk` and :meth:`end`."""
        self.started = True
        return self._send(self._head(status, [*headers, (b"transfer-encoding", b"chunked")]))

    def chunk(self, data: bytes) -> bytes:
        """One chunk of a streamed response, framed (b"" for no data, or to a HEAD request)."""
        if not data or self.head_only:
            return b""
        return self._send(h11.Data(data=data))

    def end(self) -> bytes:
        """The end of a streamed response."""
        return self._send(h11.EndOfMessage())

    def error_response(self, status: int, message: str) -> bytes | None:
        """A JSON error response that closes the connection; None once none can be sent
        (a response has started, or the connection is past answering)."""
        if self.started or self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return None
        self.close_after = True
        try:
            return self.response(status, JSON_HEADERS, json_error(message))
        except ProtocolViolation:
            return None

    def send_failed(self) -> None:
        """The bytes given out could not be sent: the connection is done."""
        self._conn.send_failed()

    # ------------------------------------------------------------------ keep-alive

    def next_cycle(self) -> bool:
        """After a response: True when the connection carries another request.

        False when either side asked to close (``Connection: close``, HTTP/1.0, an error
        response, ``close_after``) or the request was not read or answered completely.
        """
        conn = self._conn
        if self.close_after or conn.our_state is h11.MUST_CLOSE:
            return False
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        self.started = False
        self.head_only = False
        return True
