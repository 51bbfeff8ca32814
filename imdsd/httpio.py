"""The one trio <-> h11 adapter, shared by the emulator, the socket server and the IMDS client.

Server side: :func:`serve_connection` runs HTTP/1.1 on one accepted stream (keep-alive,
pipelining, per-request deadlines, header and body limits) and calls a handler with a
:class:`Request` and a :class:`Responder`; :class:`IdleConnections` closes connections left
idle. :class:`HttpServer` accepts on listeners, caps the number of connections and runs both.
Client side: :class:`ClientConnection` sends requests on one keep-alive connection. trio and
h11 errors are mapped to :class:`HttpIOError` subclasses at this boundary; a peer resetting the
connection never escapes a connection's task.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import select
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import h11
import msgspec
import structlog
import trio

from imdsd import __version__

log = structlog.get_logger("imdsd.httpio")

Headers = list[tuple[bytes, bytes]]
RECV_SIZE = 65536
MAX_INFORMATIONAL = 10  # 1xx responses a client accepts before the final one


class HttpIOError(Exception):
    """Base of every error this adapter raises."""


class PeerClosed(HttpIOError):
    """The peer closed or reset the connection."""


class ProtocolViolation(HttpIOError):
    """The peer broke HTTP/1.1; ``status`` is the response a server should give."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Deadline(HttpIOError):
    """An operation did not finish within its deadline."""


class BodyTooLarge(HttpIOError):
    """A message body exceeded the configured limit."""


class ConnectFailed(HttpIOError):
    """A connection could not be opened (refused, unreachable, timed out)."""


def find_header(headers: Sequence[tuple[bytes, bytes]], name: str) -> str | None:
    """The first value of header ``name`` (case-insensitive) in h11-style headers, or None."""
    wanted = name.lower().encode("latin-1")
    for key, value in headers:
        if key == wanted:
            return value.decode("latin-1")
    return None


_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def origin_form(target: str) -> str:
    """``target`` in origin form: ``http://host/a?b`` -> ``/a?b`` (others as they are)."""
    found = _ABSOLUTE_FORM.match(target)
    if found is None:
        return target
    rest = target[found.end() :]
    return rest if rest.startswith("/") else "/" + rest


class Request:
    """One HTTP request as the server received it (body read in full).

    ``target`` is in origin form (``/path?query``) even when the client sent the absolute
    form (``http://host/path?query``).
    """

    __slots__ = ("_path", "_query", "body", "headers", "method", "peer", "target")

    def __init__(
        self, method: str, target: str, headers: Headers, body: bytes, peer: Any = None
    ) -> None:
        self.peer = peer
        self.method = method
        self.target = target if target[:1] == "/" else origin_form(target)
        self.headers = headers
        self.body = body
        self._path: str | None = None
        self._query: list[tuple[str, str]] | None = None

    @property
    def path(self) -> str:
        """The target's path, percent-decoded."""
        if self._path is None:
            self._path = unquote(self.target.partition("?")[0])
        return self._path

    @property
    def raw_query(self) -> str:
        """The target's query string as sent (after ``?``; empty when there is none)."""
        return self.target.partition("?")[2]

    @property
    def query(self) -> list[tuple[str, str]]:
        """Query parameters in order, duplicates kept, percent-decoded."""
        if self._query is None:
            self._query = parse_qsl(self.raw_query, keep_blank_values=True)
        return self._query

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        for key, value in self.query:
            if key == name:
                return value
        return None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        return find_header(self.headers, name)


class Response:
    """One HTTP response as the client received it."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        return find_header(self.headers, name)


class _Wire:
    """An h11 connection bound to a trio stream: send, receive events, close."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        role: Any,
        max_head: int,
        write_timeout: float | None = None,
    ) -> None:
        self.stream = stream
        self.conn = h11.Connection(role, max_incomplete_event_size=max_head)
        self.write_timeout = write_timeout

    async def send(self, event: h11.Event) -> None:
        """Send one event; on any failure h11 learns the connection is unusable."""
        try:
            data = self.conn.send(event)
        except h11.LocalProtocolError as exc:
            self.conn.send_failed()
            raise ProtocolViolation(f"local protocol error: {exc}", 500) from exc
        if data:
            await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        """Write raw bytes produced by h11, within ``write_timeout`` when one is set.

        On a socket the bytes are first written without waiting, and a deadline is armed
        only for what the socket does not take at once: a peer that reads costs no timer, a
        peer that stops reading gets Deadline.
        """
        stream = self.stream
        try:
            if self.write_timeout is None:
                await stream.send_all(data)
                return
            if isinstance(stream, trio.SocketStream):
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    sent = os.write(stream.socket.fileno(), data)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return
                data = data[sent:]
            with trio.fail_after(self.write_timeout):
                await stream.send_all(data)
        except trio.TooSlowError as exc:
            self.conn.send_failed()
            raise Deadline(f"peer read nothing for {self.write_timeout:g}s") from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.conn.send_failed()
            raise PeerClosed(str(exc) or type(exc).__name__) from exc

    async def receive_into_h11(self) -> None:
        """Read once from the stream and feed h11 (b"" on EOF or reset)."""
        try:
            data = bytes(await self.stream.receive_some(RECV_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        try:
            self.conn.receive_data(data)
        except RuntimeError as exc:  # data after EOF was already signalled
            raise PeerClosed(str(exc)) from exc

    async def next_event(self, deadline: float | None = None) -> Any:
        """The next h11 event, reading from the stream as needed (by ``deadline`` if given).

        A deadline scope is opened only when a read has to wait, so a request that is
        already buffered costs none (trio.TooSlowError when the deadline passes). A client
        waiting for ``100 Continue`` is sent one before its body is read.
        """
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self.conn.trailing_data[1]:  # the peer closed in the middle of a message
                    raise PeerClosed(f"peer closed the connection: {exc}") from exc
                raise ProtocolViolation(str(exc), exc.error_status_hint) from exc
            if event is h11.NEED_DATA:
                if self.conn.they_are_waiting_for_100_continue:
                    await self.send(
                        h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                    )
                if deadline is None:
                    await self.receive_into_h11()
                else:
                    with trio.fail_at(deadline):
                        await self.receive_into_h11()
                continue
            return event

    async def final_response(self) -> h11.Response:
        """The response to the request just sent, after at most ``MAX_INFORMATIONAL`` 1xx.

        More informational responses than that is a ProtocolViolation: a peer flooding them
        would otherwise keep the client busy for as long as it likes.
        """
        for _ in range(MAX_INFORMATIONAL + 1):
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise PeerClosed("server closed the connection before answering")
            if not isinstance(event, h11.InformationalResponse):
                raise ProtocolViolation(f"expected a response, got {type(event).__name__}")
        raise ProtocolViolation(f"more than {MAX_INFORMATIONAL} informational (1xx) responses")

    def has_buffered_data(self) -> bool:
        """True when bytes of a next message are already buffered (pipelining)."""
        data, closed = self.conn.trailing_data
        return bool(data) or closed

    async def read_body(self, limit: int, deadline: float | None = None) -> bytes:
        """Read Data events until EndOfMessage; more than ``limit`` bytes is BodyTooLarge."""
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self.next_event(deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise BodyTooLarge(f"body larger than {limit} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise PeerClosed("connection closed in the middle of a body")
            else:
                raise ProtocolViolation(f"unexpected {type(event).__name__} in a body")

    async def close(self, drain_timeout: float) -> None:
        """Half-close, read briefly until the peer closes, then close for good."""
        sock_stream = self.stream
        try:
            if isinstance(sock_stream, trio.SocketStream):
                try:
                    sock_stream.socket.shutdown(socket.SHUT_WR)
                except OSError:
                    return
                with trio.move_on_after(drain_timeout):
                    while await sock_stream.receive_some(RECV_SIZE):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(sock_stream)


_date_cache: tuple[int, bytes] = (0, b"")


_REASONS: dict[int, bytes] = {status.value: status.phrase.encode() for status in HTTPStatus}


def _reason(status: int) -> bytes:
    """The standard reason phrase of ``status`` (empty when unknown)."""
    return _REASONS.get(status, b"")


def http_date() -> bytes:
    """The current date in IMF-fixdate form, computed at most once a second."""
    global _date_cache  # noqa: PLW0603 - a one-entry cache on a hot path
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


_HEAD_CACHE_SIZE = 256
_head_cache: dict[tuple[Any, ...], h11.Response] = {}


_NO_BODY = (204, 304)  # statuses whose responses carry neither a body nor Content-Length


class Responder:
    """Sends the response to one request: in full with :meth:`send`, or streamed.

    To a HEAD request (``head_only``) the same head is sent, the body never: handlers answer
    HEAD as they answer GET. A 204 or 304 carries no body and no ``Content-Length``.
    """

    def __init__(self, wire: _Wire, server_header: bytes) -> None:
        self._wire = wire
        self._server = server_header
        self.started = False
        self.close_after = False
        self.head_only = False

    def _head(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> h11.Response:
        full = [(b"server", self._server), (b"date", http_date()), *headers]
        if self.close_after:
            full.append((b"connection", b"close"))
        return h11.Response(status_code=status, headers=full, reason=_reason(status))

    async def send(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes = b""
    ) -> None:
        """Send a complete response with a Content-Length.

        The validated response head is reused for identical heads within the same second
        (the ``Date`` header's resolution), so cached replies skip h11's header validation.
        """
        self.started = True
        key = (status, tuple(headers), len(body), self.close_after, self._server, http_date())
        head = _head_cache.get(key)
        if head is None:
            if status in _NO_BODY:
                head = self._head(status, headers)
            else:
                head = self._head(status, [*headers, (b"content-length", b"%d" % len(body))])
            if len(_head_cache) >= _HEAD_CACHE_SIZE or (
                _head_cache and next(iter(_head_cache))[5] != key[5]
            ):
                _head_cache.clear()
            _head_cache[key] = head
        conn = self._wire.conn
        try:
            data = conn.send(head) or b""
            if body and not self.head_only and status not in _NO_BODY:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            conn.send_failed()
            raise ProtocolViolation(f"local protocol error: {exc}", 500) from exc
        await self._wire.send_bytes(data)

    async def start(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Start a streamed (chunked) response; follow with :meth:`write` and :meth:`end`."""
        self.started = True
        await self._wire.send(self._head(status, [*headers, (b"transfer-encoding", b"chunked")]))

    async def write(self, data: bytes) -> None:
        """Send one chunk of a streamed response (nothing to a HEAD request)."""
        if data and not self.head_only:
            await self._wire.send(h11.Data(data=data))

    def write_nowait(self, data: bytes) -> bytes:
        """Send one chunk of a streamed response without waiting, as far as the socket takes it.

        Returns the bytes still to send (b"" when all went out); pass them to
        :meth:`write_rest`. The chunk is framed here: h11 keeps no state for body chunks, so
        this is the same as :meth:`write` minus the await and a copy, for fan-out to many
        streams. Raises PeerClosed when the peer is gone.
        """
        if not data or self.head_only:
            return b""
        framed = b"%x\r\n%b\r\n" % (len(data), data)
        stream = self._wire.stream
        if not isinstance(stream, trio.SocketStream):
            return framed
        try:
            sent = os.write(stream.socket.fileno(), framed)
        except BlockingIOError:
            return framed
        except OSError as exc:
            self._wire.conn.send_failed()
            raise PeerClosed(str(exc)) from exc
        return framed[sent:]

    async def write_rest(self, rest: bytes) -> None:
        """Send what :meth:`write_nowait` could not."""
        if rest:
            await self._wire.send_bytes(rest)

    async def end(self) -> None:
        """Finish a streamed response."""
        await self._wire.send(h11.EndOfMessage())

    async def wait_peer_closed(self, max_buffered: int = 65536) -> None:
        """Return once the peer has closed (or flooded us); for long streamed responses.

        Call it from a separate task while streaming: nothing else reads the connection then.
        Pipelined bytes are kept for h11 up to ``max_buffered``.
        """
        wire = self._wire
        while True:
            try:
                data = bytes(await wire.stream.receive_some(RECV_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            try:
                wire.conn.receive_data(data)
            except RuntimeError:
                return
            if len(wire.conn.trailing_data[0]) > max_buffered:
                return


Handler = Callable[[Request, Responder], Awaitable[None]]


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


def json_error(message: str) -> bytes:
    """The JSON error body ``{"error": message}``."""
    return msgspec.json.encode({"error": message})


_STATUS_FOR: dict[type[HttpIOError], int] = {BodyTooLarge: 413, Deadline: 408}


async def _send_error(wire: _Wire, responder: Responder, status: int, message: str) -> None:
    """Send an error response if our state still allows one; never raises."""
    if wire.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or responder.started:
        return
    responder.close_after = True
    with contextlib.suppress(HttpIOError):
        await responder.send(status, [(b"content-type", b"application/json")], json_error(message))


REJECT_LINGER = 0.25  # seconds a rejected connection may take to be answered and closed


async def _reject(wire: _Wire, responder: Responder, status: int, limits: ServerLimits) -> None:
    """Answer ``status`` without reading a request, and close within ``REJECT_LINGER``.

    The answer is written, then our side shut down; what the peer sends meanwhile is read
    (so its request does not turn the close into a reset that could destroy the answer).
    """
    linger = min(REJECT_LINGER, limits.drain_timeout)
    try:
        with trio.move_on_after(linger):
            await _send_error(wire, responder, status, "too many connections")
    finally:
        with trio.CancelScope(shield=True):
            await wire.close(linger)


class _Waiting:
    """One connection as :class:`IdleConnections` sees it: since when it waits, and its scope."""

    __slots__ = ("scope", "since")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.since: float | None = None


class IdleConnections:
    """Closes keep-alive connections that wait longer than ``timeout`` for their next request.

    A deadline scope per request would cost trio a deadline registered and removed each time
    (about a sixth of a cached read); instead a connection notes when it starts waiting and
    :meth:`run` sweeps every ``timeout / 4`` (at most 5 s), so an idle connection is closed
    between ``timeout`` and ``1.25 * timeout``. A request that arrives as its connection is
    swept is not run: the connection closes without an answer, as with any server's idle
    close (clients retry such requests on a fresh connection).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._entries: set[_Waiting] = set()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[_Waiting]:
        """Track one connection while the block runs; enter the entry's ``scope`` around it."""
        entry = _Waiting()
        self._entries.add(entry)
        try:
            yield entry
        finally:
            self._entries.discard(entry)

    def sweep(self, now: float) -> int:
        """Cancel the connections waiting since ``timeout`` or longer; how many there were."""
        closed = 0
        for entry in self._entries:
            since = entry.since
            if since is not None and now - since >= self.timeout and not entry.scope.cancel_called:
                entry.scope.cancel()
                closed += 1
        return closed

    async def run(self) -> None:
        """Sweep until cancelled."""
        period = min(max(self.timeout / 4, 0.01), 5.0)
        while True:
            await trio.sleep(period)
            self.sweep(trio.current_time())


async def _read_request(
    wire: _Wire, limits: ServerLimits, peer: Any, waiting: _Waiting
) -> Request | None:
    """Wait (tracked as idle) for the next request, then read it in full (request deadline)."""
    if not wire.has_buffered_data():
        waiting.since = trio.current_time()
        await wire.receive_into_h11()
        waiting.since = None
        if waiting.scope.cancel_called:  # swept after the bytes came, before this task ran
            return None
    deadline = trio.current_time() + limits.request_timeout
    try:
        event = await wire.next_event(deadline)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise ProtocolViolation(f"expected a request, got {type(event).__name__}")
        head_size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if head_size > limits.max_head:
            raise ProtocolViolation("request header fields too large", 431)
        if wire.conn.they_are_waiting_for_100_continue:  # refuse a body before it is sent
            declared = find_header(event.headers, "content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
                raise BodyTooLarge(f"body larger than {limits.max_body} bytes")
        body = await wire.read_body(limits.max_body, deadline)
    except trio.TooSlowError as exc:
        raise Deadline("request not received in time") from exc
    return Request(
        event.method.decode("ascii", "replace"),
        event.target.decode("ascii", "replace"),
        list(event.headers),
        body,
        peer,
    )


async def serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    limits: ServerLimits,
    idle: IdleConnections,
    *,
    server_header: bytes = b"imdsd/" + __version__.encode(),
    reject_status: int | None = None,
    peer: Any = None,
) -> None:
    """Serve HTTP/1.1 on one stream until the peer leaves; never raises (but Cancelled).

    ``idle`` closes the connection when it waits too long for a request (its :meth:`run
    <IdleConnections.run>` must be running). With ``reject_status`` the connection is answered
    with that status at once, without waiting for a request, and closed (connections beyond
    ``max_connections``). ``peer`` is attached to every request as ``request.peer``.
    """
    wire = _Wire(stream, h11.SERVER, limits.max_head, limits.write_timeout)
    if reject_status is not None:
        await _reject(wire, Responder(wire, server_header), reject_status, limits)
        return
    with idle.tracking() as waiting, waiting.scope:
        try:
            while True:
                responder = Responder(wire, server_header)
                try:
                    request = await _read_request(wire, limits, peer, waiting)
                    if request is None:
                        break
                    responder.head_only = request.method == "HEAD"
                    await handler(request, responder)
                except PeerClosed:
                    break
                except HttpIOError as exc:
                    status = getattr(exc, "status", None) or _STATUS_FOR.get(type(exc), 400)
                    await _send_error(wire, responder, status, str(exc))
                    break
                except Exception:
                    log.exception("request handler failed")
                    await _send_error(wire, responder, 500, "internal error")
                    break
                if wire.conn.our_state is h11.MUST_CLOSE or responder.close_after:
                    break
                try:
                    wire.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    # the handler did not read or answer the request completely
                    break
        finally:
            with trio.CancelScope(shield=True):
                await wire.close(limits.drain_timeout)


class HttpServer:
    """Accepts connections on listeners and serves each with :func:`serve_connection`.

    Beyond ``max_connections`` open connections, a new one is answered ``503`` at once and
    closed (within :data:`REJECT_LINGER`). ``active`` counts the connections being served
    (never more than ``max_connections``), ``rejected`` those turned away. ``peer_info`` is
    called once per accepted stream; its result reaches the handler as ``request.peer``.
    """

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        *,
        max_connections: int = 2048,
        server_header: bytes = b"imdsd/" + __version__.encode(),
        peer_info: Callable[[trio.abc.Stream], Any] | None = None,
    ) -> None:
        self.handler = handler
        self.peer_info = peer_info
        self.limits = limits or ServerLimits()
        self.max_connections = max_connections
        self.server_header = server_header
        self.idle = IdleConnections(self.limits.idle_timeout)
        self.active = 0
        self.accepted = 0
        self.rejected = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted stream (idle connections are closed only while :meth:`serve` runs)."""
        self.accepted += 1
        if self.active >= self.max_connections:
            self.rejected += 1
            await serve_connection(
                stream,
                self.handler,
                self.limits,
                self.idle,
                server_header=self.server_header,
                reject_status=503,
            )
            return
        self.active += 1
        try:
            await serve_connection(
                stream,
                self.handler,
                self.limits,
                self.idle,
                server_header=self.server_header,
                peer=self.peer_info(stream) if self.peer_info else None,
            )
        finally:
            self.active -= 1

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until cancelled, then close them; ``started`` once accepting.

        Open connections are served until they end or the caller's scope is cancelled.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.idle.run)
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    log.warning("accept failed, pausing", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self.handle, stream)


def unix_listener(
    path: str, mode: int | None = None, *, backlog: int = 1024
) -> trio.SocketListener:
    """Bind a unix stream socket at ``path`` (removing a stale socket file) and listen."""
    import stat

    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def listener_from_socket(sock: socket.socket) -> trio.SocketListener:
    """Wrap an already listening stdlib socket (e.g. inherited from systemd)."""
    sock.setblocking(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


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


class ClientConnection:
    """One keep-alive HTTP/1.1 client connection; create a new one when not reusable."""

    def __init__(self, stream: trio.abc.Stream, *, max_body: int = 1 << 20) -> None:
        self._wire = _Wire(stream, h11.CLIENT, 65536)
        self.max_body = max_body

    @property
    def reusable(self) -> bool:
        """True when another request may be sent on this connection."""
        conn = self._wire.conn
        return conn.our_state is h11.IDLE and conn.their_state is h11.IDLE and not self._eof()

    def _eof(self) -> bool:
        """True when the idle peer has closed (or sent something unexpected).

        ``poll``, not ``select``: a descriptor above 1023 is as good as any other.
        """
        stream = self._wire.stream
        if not isinstance(stream, trio.SocketStream):
            return False
        try:
            poller = select.poll()
            poller.register(stream.socket.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # closed: fileno() is -1
            return True

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
        wire = self._wire
        all_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            all_headers.append((b"content-length", str(len(body)).encode()))
        try:
            with trio.fail_after(timeout):
                await wire.send(h11.Request(method=method, target=target, headers=all_headers))
                if body:
                    await wire.send(h11.Data(data=body))
                await wire.send(h11.EndOfMessage())
                event = await wire.final_response()
                resp_body = await wire.read_body(self.max_body)
        except trio.TooSlowError as exc:
            await self.aclose()
            raise Deadline(f"no complete answer within {timeout:g}s") from exc
        except HttpIOError:
            await self.aclose()
            raise
        if wire.conn.our_state is h11.DONE and wire.conn.their_state is h11.DONE:
            wire.conn.start_next_cycle()
        return Response(
            event.status_code,
            event.reason.decode("latin-1"),
            list(event.headers),
            resp_body,
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
        wire = self._wire
        all_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        try:
            with trio.fail_after(head_timeout):
                await wire.send(h11.Request(method=method, target=target, headers=all_headers))
                await wire.send(h11.EndOfMessage())
                event = await wire.final_response()
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
                item = await wire.next_event()
                if isinstance(item, h11.Data):
                    buffer.extend(item.data)
                elif isinstance(item, h11.EndOfMessage):
                    done = True
                else:
                    raise PeerClosed("stream ended without a final chunk")

        return head, next_line

    async def aclose(self) -> None:
        """Close the connection at once."""
        await trio.aclose_forcefully(self._wire.stream)
