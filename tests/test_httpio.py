"""The trio <-> h11 adapter, both roles, over real unix sockets."""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from imdsd.httpio import (
    MAX_INFORMATIONAL,
    BodyTooLarge,
    ClientConnection,
    ConnectFailed,
    Deadline,
    HttpServer,
    IdleConnections,
    PeerClosed,
    ProtocolViolation,
    Request,
    Responder,
    Response,
    ServerLimits,
    open_tcp,
    open_unix,
    serve_connection,
    unix_listener,
)


async def echo(request: Request, responder: Responder) -> None:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/slow":
        await trio.sleep(0.5)
    if request.path == "/big":
        await responder.send(200, [(b"content-type", b"text/plain")], b"x" * 65536)
        return
    if request.path == "/stream":
        await responder.start(200, [(b"content-type", b"application/x-ndjson")])
        for i in range(3):
            await responder.write(b'{"n":%d}\n' % i)
        await responder.end()
        return
    body = f"{request.method} {request.path} {request.query} {len(request.body)}".encode()
    await responder.send(200, [(b"content-type", b"text/plain")], body)


@asynccontextmanager
async def connected(path: str, **kwargs: int) -> AsyncIterator[ClientConnection]:
    client = ClientConnection(await open_unix(path, 1), **kwargs)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def running(
    tmp_path: Path, limits: ServerLimits | None = None, max_connections: int = 100
) -> AsyncIterator[tuple[str, HttpServer]]:
    path = str(tmp_path / "s.sock")
    server = HttpServer(echo, limits, max_connections=max_connections)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [unix_listener(path, 0o660)])
        yield path, server
        nursery.cancel_scope.cancel()


async def raw_exchange(path: str, payload: bytes) -> bytes:
    """Send ``payload`` and read until the server closes (which each caller expects it to)."""
    stream = await trio.open_unix_socket(path)
    await stream.send_all(payload)
    received = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return received


async def test_keep_alive_and_query(tmp_path: Path) -> None:
    async with running(tmp_path) as (path, server), connected(path) as client:
        first = await client.request("GET", "/a%20b?x=1&x=2", [("host", "t")])
        assert first.status == 200
        assert first.reason == "OK"
        assert first.body == b"GET /a b [('x', '1'), ('x', '2')] 0"
        assert client.reusable
        second = await client.request("POST", "/p", [("host", "t")], b"12345")
        assert second.body.endswith(b" 5")
        assert first.header("server") == second.header("Server")
        assert server.accepted == 1


async def test_pipelined_requests_answered_in_order(tmp_path: Path) -> None:
    async with running(tmp_path) as (path, _):
        two = (
            b"GET /one HTTP/1.1\r\nhost: t\r\n\r\n"
            b"GET /two HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
        )
        data = await raw_exchange(path, two)
        assert data.count(b"HTTP/1.1 200") == 2
        assert data.index(b"/one") < data.index(b"/two")


async def test_oversized_head_is_431(tmp_path: Path) -> None:
    async with running(tmp_path, ServerLimits(max_head=1024)) as (path, _):
        big = b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 4096 + b"\r\n\r\n"
        data = await raw_exchange(path, big)
        assert data.startswith(b"HTTP/1.1 431")
        assert b"connection: close" in data.lower()
        dribbled = b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 70000
        assert (await raw_exchange(path, dribbled)).startswith(b"HTTP/1.1 431")


async def test_oversized_body_is_413(tmp_path: Path) -> None:
    async with running(tmp_path, ServerLimits(max_body=10)) as (path, _):
        req = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n" + b"x" * 100
        data = await raw_exchange(path, req)
        assert data.startswith(b"HTTP/1.1 413")


async def test_garbage_is_400_and_server_survives(tmp_path: Path) -> None:
    async with running(tmp_path) as (path, _):
        data = await raw_exchange(path, b"\x00\x01 not http at all\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400")
        async with connected(path) as client:
            assert (await client.request("GET", "/", [("host", "t")])).status == 200


async def test_slow_request_gets_408(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limits = ServerLimits(request_timeout=0.2, idle_timeout=5)
    async with running(tmp_path, limits) as (path, _):
        start = trio.current_time()
        data = await raw_exchange(path, b"GET / HTTP/1.1\r\nhost:")
        assert data.startswith(b"HTTP/1.1 408")
        assert 0.2 <= trio.current_time() - start < 0.21


async def test_idle_connection_is_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path, ServerLimits(idle_timeout=0.2)) as (path, _):
        await trio.sleep(0.01)  # out of step with the sweeper, which started with the server
        start = trio.current_time()
        stream = await trio.open_unix_socket(path)
        with trio.fail_after(2):
            assert await stream.receive_some(10) == b""
        assert 0.2 <= trio.current_time() - start <= 0.25 + 1e-9  # timeout .. 1.25 x timeout
        await stream.aclose()


async def test_idle_sweep_cancels_only_connections_waiting_too_long() -> None:
    idle = IdleConnections(10.0)
    with idle.tracking() as waiting, idle.tracking() as busy, idle.tracking() as recent:
        waiting.since = 100.0
        busy.since = None
        recent.since = 105.0
        assert idle.sweep(109.9) == 0
        assert idle.sweep(110.0) == 1
        assert waiting.scope.cancel_called
        assert not busy.scope.cancel_called
        assert not recent.scope.cancel_called
        assert idle.sweep(111.0) == 0  # already cancelled
        assert idle.sweep(115.0) == 1
    with idle.tracking() as later:
        later.since = 200.0
    assert idle.sweep(1000.0) == 0  # no longer tracked


async def test_idle_timeout_spares_a_request_being_answered(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        running(tmp_path, ServerLimits(idle_timeout=0.1)) as (path, _),
        connected(path) as client,
    ):
        response = await client.request("GET", "/slow", [("host", "t")])
        assert response.status == 200
        assert (await client.request("GET", "/", [("host", "t")])).status == 200
        start = trio.current_time()
        with trio.fail_after(2):
            while client.reusable:
                await trio.sleep(0.001)
        assert 0.1 <= trio.current_time() - start <= 0.125 + 0.001 + 1e-9


class _SweptOnArrival(trio.abc.Stream):
    """A stream whose request arrives just as the idle sweeper closes its connection."""

    def __init__(self, idle: IdleConnections) -> None:
        self.idle = idle
        self.arrived = False
        self.sent = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.arrived:
            return b""
        self.arrived = True
        self.idle.sweep(trio.current_time() + 3600)  # after the bytes, before the task runs
        return b"POST /approve HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n"

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_request_arriving_as_its_connection_is_swept_is_not_run() -> None:
    idle = IdleConnections(60.0)
    stream = _SweptOnArrival(idle)
    ran: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        ran.append(request.target)
        await responder.send(200, [], b"done")

    with trio.fail_after(5):
        await serve_connection(stream, handler, ServerLimits(), idle)
    assert ran == []
    assert stream.sent == b""


async def test_handler_error_is_500(tmp_path: Path) -> None:
    async with running(tmp_path) as (path, _), connected(path) as client:
        response = await client.request("GET", "/boom", [("host", "t")])
        assert response.status == 500
        assert response.body == b'{"error":"internal error"}'
        assert not client.reusable


async def test_reset_mid_response_does_not_escape(tmp_path: Path) -> None:
    async with running(tmp_path) as (path, server):
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            sock.sendall(b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n")
            sock.close()
        async with connected(path) as client:
            assert (await client.request("GET", "/", [("host", "t")])).status == 200
            with trio.fail_after(2):
                while server.active > 1:
                    await trio.sleep(0.01)


async def test_connections_beyond_limit_get_503(tmp_path: Path) -> None:
    async with (
        running(tmp_path, max_connections=2) as (path, server),
        connected(path) as first,
        connected(path) as second,
    ):
        for conn in (first, second):
            assert (await conn.request("GET", "/", [("host", "t")])).status == 200
        async with connected(path) as extra:
            assert (await extra.request("GET", "/", [("host", "t")])).status == 503
        assert server.rejected == 1
        assert (await first.request("GET", "/", [("host", "t")])).status == 200


async def test_silent_connections_beyond_the_limit_get_503_and_close_at_once(
    tmp_path: Path,
) -> None:
    peak = 0

    async def sample(server: HttpServer) -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.active)
            await trio.lowlevel.checkpoint()

    async def silent_client(path: str, answers: list[bytes]) -> None:
        stream = await trio.open_unix_socket(path)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        answers.append(received)
        await stream.aclose()

    limits = ServerLimits(idle_timeout=3600, request_timeout=3600)
    async with running(tmp_path, limits, max_connections=2) as (path, server):
        held = [ClientConnection(await open_unix(path, 1)) for _ in range(2)]
        for client in held:
            assert (await client.request("GET", "/", [("host", "t")])).status == 200
        answers: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample, server)
            with trio.fail_after(20):
                async with trio.open_nursery() as clients:
                    for _ in range(200):
                        clients.start_soon(silent_client, path, answers)
            nursery.cancel_scope.cancel()
        assert len(answers) == 200
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert b"\r\nconnection: close\r\n" in answer
            assert answer.endswith(b'{"error":"too many connections"}')
        assert peak <= 2
        assert (server.active, server.rejected) == (2, 200)
        for client in held:
            assert (await client.request("GET", "/", [("host", "t")])).status == 200
            await client.aclose()


async def test_clients_that_never_read_are_closed_and_free_their_slots(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limits = ServerLimits(idle_timeout=3600, request_timeout=3600, write_timeout=5)
    pipelined = b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n" * 2000

    async def never_reads(path: str, closed: trio.Event) -> None:
        stream = await trio.open_unix_socket(path)
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(pipelined)
        await closed.wait()
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(1 << 20):  # the answers that fit, then the close
                pass
        await stream.aclose()

    async with running(tmp_path, limits, max_connections=2) as (path, server):
        closed = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(never_reads, path, closed)
            while server.active < 2:
                await trio.sleep(0.01)
            assert (await get_once(path)).status == 503
            start = trio.current_time()
            with trio.fail_after(60):
                while server.active:
                    await trio.sleep(0.1)
            assert 5 <= trio.current_time() - start <= 10
            closed.set()
        assert (await get_once(path)).status == 200


async def get_once(path: str) -> Response:
    """One GET / on a fresh connection."""
    async with connected(path) as client:
        return await client.request("GET", "/", [("host", "t")], timeout=5)


async def test_streamed_lines(tmp_path: Path) -> None:
    async with running(tmp_path) as (path, _), connected(path) as client:
        head, next_line = await client.stream_lines("GET", "/stream", [("host", "t")])
        assert head.status == 200
        lines = [await next_line() for _ in range(4)]
        assert lines == [b'{"n":0}', b'{"n":1}', b'{"n":2}', None]


async def test_wait_peer_closed_returns_when_client_leaves(tmp_path: Path) -> None:
    gone = trio.Event()

    async def hold(request: Request, responder: Responder) -> None:
        await responder.start(200, [])
        await responder.wait_peer_closed()
        gone.set()

    path = str(tmp_path / "h.sock")
    server = HttpServer(hold)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [unix_listener(path)])
        async with connected(path) as client:
            head, _ = await client.stream_lines("GET", "/", [("host", "t")])
            assert head.status == 200
        with trio.fail_after(2):
            await gone.wait()
        nursery.cancel_scope.cancel()


async def test_client_body_cap_and_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def big(request: Request, responder: Responder) -> None:
        if request.path == "/slow":
            await trio.sleep(5)
        await responder.send(200, [], b"x" * 2000)

    path = str(tmp_path / "b.sock")
    server = HttpServer(big)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [unix_listener(path)])
        async with connected(path, max_body=1000) as client:
            with pytest.raises(BodyTooLarge):
                await client.request("GET", "/", [("host", "t")])
            assert not client.reusable
        async with connected(path) as client:
            start = trio.current_time()
            with pytest.raises(Deadline):
                await client.request("GET", "/slow", [("host", "t")], timeout=0.1)
            assert 0.1 <= trio.current_time() - start < 0.11
        nursery.cancel_scope.cancel()


async def test_client_notices_server_close_between_requests(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        running(tmp_path, ServerLimits(idle_timeout=0.1)) as (path, _),
        connected(path) as client,
    ):
        assert (await client.request("GET", "/", [("host", "t")])).status == 200
        assert client.reusable
        await trio.sleep(0.125 + 1e-6)  # the idle sweeper has closed it by now (mock time)
        assert not client.reusable


async def test_server_closing_before_answering_is_peer_closed(tmp_path: Path) -> None:
    path = str(tmp_path / "close.sock")
    listener = unix_listener(path)
    async with trio.open_nursery() as nursery:

        async def close_after_reading() -> None:
            stream = await listener.accept()
            await stream.receive_some(65536)
            await stream.aclose()

        nursery.start_soon(close_after_reading)
        async with connected(path) as client:
            with pytest.raises(PeerClosed):
                await client.request("GET", "/", [("host", "t")])
    await listener.aclose()


async def test_connect_failures(tmp_path: Path) -> None:
    with pytest.raises(ConnectFailed):
        await open_unix(str(tmp_path / "missing.sock"), 1)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(ConnectFailed):
        await open_tcp("127.0.0.1", port, 1)


async def test_unix_listener_replaces_stale_socket_and_sets_mode(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    listener = unix_listener(path, 0o600)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        await listener.aclose()


def _stream_above_fd_1023(path: str) -> trio.SocketStream:
    """A connected unix socket whose descriptor is above 1023 (out of ``select``'s reach)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        if hard != resource.RLIM_INFINITY and hard < 2048:
            pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) allows no descriptor above 1023")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    plain.connect(path)
    high = fcntl.fcntl(plain.fileno(), fcntl.F_DUPFD_CLOEXEC, 1100)
    plain.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=high)
    sock.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def test_client_on_a_descriptor_above_1023_stays_reusable(tmp_path: Path) -> None:
    async with running(tmp_path, ServerLimits(idle_timeout=3600)) as (path, server):
        client = ClientConnection(_stream_above_fd_1023(path))
        try:
            for _ in range(3):
                assert (await client.request("GET", "/", [("host", "t")])).status == 200
                assert client.reusable
            assert server.accepted == 1
        finally:
            await client.aclose()
        assert not client.reusable


async def _informational_server(
    count: int | None, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer one request with ``count`` 1xx responses (None: endless) and then a 200."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(f"{listeners[0].socket.getsockname()[1]}")
    stream = await listeners[0].accept()
    await stream.receive_some(65536)
    sent = 0
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while count is None or sent < count:
            batch = 100 if count is None else min(100, count - sent)
            await stream.send_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" * batch)
            sent += batch
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.receive_some(65536)
    await stream.aclose()
    await listeners[0].aclose()


@pytest.mark.parametrize("streamed", [False, True])
async def test_client_refuses_a_flood_of_informational_responses(streamed: bool) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_informational_server, None)
        client = ClientConnection(await open_tcp("127.0.0.1", int(port), 2))
        send = client.stream_lines if streamed else client.request
        with trio.fail_after(10), pytest.raises(ProtocolViolation, match="informational"):
            await send("GET", "/", [("host", "t")])
        assert not client.reusable
        await client.aclose()


async def test_client_skips_a_few_informational_responses() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_informational_server, MAX_INFORMATIONAL)
        client = ClientConnection(await open_tcp("127.0.0.1", int(port), 2))
        response = await client.request("GET", "/", [("host", "t")], timeout=10)
        assert (response.status, response.body) == (200, b"ok")
        await client.aclose()


async def test_a_body_declared_too_large_is_refused_before_100_continue(tmp_path: Path) -> None:
    async with running(tmp_path, ServerLimits(max_body=10)) as (path, _):
        head = b"POST / HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 11\r\n\r\n"
        data = await raw_exchange(path, head)
        assert data.startswith(b"HTTP/1.1 413 ")
        assert b"100 Continue" not in data
        stream = await trio.open_unix_socket(path)
        await stream.send_all(head.replace(b": 11", b": 10"))
        with trio.fail_after(5):
            assert await stream.receive_some(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send_all(b"x" * 10)
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 OK\r\n")
        await stream.aclose()
