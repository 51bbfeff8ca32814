"""HTTP/1.1 conformance of both servers built on httpio: the API (unix socket) and the emulator.

One table of exchanges, each run against both servers on raw bytes and read back with a
small parser of its own (not h11, the library under test): HEAD, 304, absolute-form targets,
HTTP/1.0 with and without keep-alive, ``Expect: 100-continue`` and pipelining. Then the same
with real curl where it is installed.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
from emulator_support import start_emulator
from test_api_support import running_api, started_context

LEAF = "/metadata/instance/compute/vmSize"
API_VERSION = "2021-02-01"
SERVERS = ["api", "emulator"]
SENDS_ETAG = {"api": True, "emulator": False}  # IMDS sends no ETag, so neither does its emulator
ETAG_SERVERS = [kind for kind in SERVERS if SENDS_ETAG[kind]]
NO_ETAG_SERVERS = [kind for kind in SERVERS if not SENDS_ETAG[kind]]


@dataclass
class Server:
    """One server under test: how to reach it and what a cached read looks like there."""

    name: str
    connect: Callable[[], Awaitable[trio.SocketStream]]
    target: str  # a small read, answered 200 with ``value``
    value: bytes
    header_lines: bytes  # request header lines every request needs
    etag: bool  # whether reads carry an ETag (IMDS sends none)
    curl: list[str] = field(default_factory=list)  # curl options to reach it
    base: str = ""  # URL prefix for curl

    def request(self, method: str, target: str | None = None, extra: bytes = b"") -> bytes:
        """An HTTP/1.1 request head for ``target`` (default: the small read)."""
        line = f"{method} {target or self.target} HTTP/1.1\r\n".encode()
        return line + b"host: imdsd\r\n" + self.header_lines + extra + b"\r\n"


@asynccontextmanager
async def serving(kind: str, tmp_path: Path) -> AsyncIterator[Server]:
    """The API server (in-process, unix socket) or the emulator (TCP), as a Server."""
    if kind == "api":
        async with running_api(tmp_path, started_context()) as (path, _):
            yield Server(
                "api",
                partial(trio.open_unix_socket, path),
                LEAF + "?format=text",
                b"Standard_A3",
                b"",
                etag=SENDS_ETAG[kind],
                curl=["--unix-socket", path],
                base="http://imdsd",
            )
        return
    async with trio.open_nursery() as nursery:
        emulator = await start_emulator(nursery)
        yield Server(
            "emulator",
            partial(trio.open_tcp_stream, emulator.host, emulator.port),
            f"{LEAF}?api-version={API_VERSION}&format=text",
            b"Standard_A3",
            b"metadata: true\r\n",
            etag=SENDS_ETAG[kind],
            curl=["-H", "Metadata: true"],
            base=emulator.url,
        )
        nursery.cancel_scope.cancel()


@dataclass
class Reply:
    """One parsed response."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` or None."""
        return next((v for k, v in self.headers if k == name), None)


class Reader:
    """Reads responses off one connection, framing them as RFC 9112 says (not with h11)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.eof = False

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            self.eof = True
        self.buffer += chunk

    async def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if self.eof:
                raise AssertionError(f"connection closed before {marker!r}: {self.buffer!r}")
            await self._fill()
        part, _, self.buffer = self.buffer.partition(marker)
        return part

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if self.eof:
                raise AssertionError(f"connection closed {size - len(self.buffer)} bytes short")
            await self._fill()
        part, self.buffer = self.buffer[:size], self.buffer[size:]
        return part

    async def reply(self, method: str = "GET") -> Reply:
        """The next response to a ``method`` request."""
        head = (await self._until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, status, *_ = head[0].split(" ", 2)
        assert version == "HTTP/1.1", head[0]
        headers = [
            (k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in head[1:])
        ]
        reply = Reply(int(status), headers, b"")
        if method == "HEAD" or reply.status in (204, 304) or reply.status < 200:
            return reply
        if reply.header("transfer-encoding") == "chunked":
            while size := int((await self._until(b"\r\n")).split(b";")[0], 16):
                reply.body += await self._exactly(size)
                assert await self._exactly(2) == b"\r\n"
            assert await self._until(b"\r\n") == b""
        elif (length := reply.header("content-length")) is not None:
            reply.body = await self._exactly(int(length))
        else:
            while not self.eof:
                await self._fill()
            reply.body, self.buffer = self.buffer, b""
        return reply

    async def closed(self) -> bool:
        """True when the server closes the connection with nothing more sent."""
        while not self.eof:
            await self._fill()
        return self.buffer == b""


@asynccontextmanager
async def connection(server: Server) -> AsyncIterator[tuple[trio.SocketStream, Reader]]:
    """A fresh connection and its reader, all bounded by 10 s."""
    stream = await server.connect()
    try:
        with trio.fail_after(10):
            yield stream, Reader(stream)
    finally:
        await stream.aclose()


@pytest.mark.parametrize("kind", SERVERS)
async def test_head_is_answered_as_get_without_a_body(kind: str, tmp_path: Path) -> None:
    async with serving(kind, tmp_path) as server, connection(server) as (stream, reader):
        await stream.send_all(server.request("HEAD") + server.request("GET"))
        head = await reader.reply("HEAD")
        get = await reader.reply("GET")
        assert (head.status, get.status, get.body) == (200, 200, server.value)
        assert head.header("content-length") == str(len(get.body))
        assert head.header("content-type") == get.header("content-type")
        assert head.header("etag") == get.header("etag")
        await stream.send_all(server.request("HEAD", "/no/such/path"))
        missing = await reader.reply("HEAD")
        assert missing.status == 404
        await stream.send_all(server.request("GET"))  # the connection is still in step
        assert (await reader.reply()).body == server.value


@pytest.mark.parametrize("kind", ETAG_SERVERS)
async def test_304_has_no_body_and_no_content_length(kind: str, tmp_path: Path) -> None:
    async with serving(kind, tmp_path) as server, connection(server) as (stream, reader):
        await stream.send_all(server.request("GET"))
        first = await reader.reply()
        etag = first.header("etag")
        assert first.status == 200
        assert etag
        inm = f"if-none-match: {etag}\r\n".encode()
        await stream.send_all(server.request("GET", extra=inm) + server.request("HEAD", extra=inm))
        for method in ("GET", "HEAD"):
            cached = await reader.reply(method)
            assert cached.status == 304
            assert cached.header("content-length") is None
            assert cached.header("transfer-encoding") is None
            assert cached.header("etag") == etag
        await stream.send_all(server.request("GET"))  # nothing was left on the wire
        assert (await reader.reply()).body == server.value


@pytest.mark.parametrize("kind", NO_ETAG_SERVERS)
async def test_without_etags_if_none_match_gets_the_full_answer(kind: str, tmp_path: Path) -> None:
    async with serving(kind, tmp_path) as server, connection(server) as (stream, reader):
        for tag in ('"0"', "*"):
            inm = f"if-none-match: {tag}\r\n".encode()
            await stream.send_all(server.request("GET", extra=inm))
            reply = await reader.reply()
            assert (reply.status, reply.body, reply.header("etag")) == (200, server.value, None)


@pytest.mark.parametrize("kind", SERVERS)
async def test_absolute_form_target_is_accepted(kind: str, tmp_path: Path) -> None:
    async with serving(kind, tmp_path) as server, connection(server) as (stream, reader):
        for prefix in ("http://imdsd", "HTTP://imdsd:80", "http://169.254.169.254"):
            await stream.send_all(server.request("GET", prefix + server.target))
            reply = await reader.reply()
            assert (reply.status, reply.body) == (200, server.value), prefix


@pytest.mark.parametrize("kind", SERVERS)
@pytest.mark.parametrize("keep_alive", [False, True])
async def test_http_1_0(kind: str, keep_alive: bool, tmp_path: Path) -> None:
    async with serving(kind, tmp_path) as server, connection(server) as (stream, reader):
        extra = b"connection: keep-alive\r\n" if keep_alive else b""
        request = server.request("GET", extra=extra).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        await stream.send_all(request)
        reply = await reader.reply()
        assert (reply.status, reply.body) == (200, server.value)
        assert reply.header("transfer-encoding") is None  # no chunking to a 1.0 client
        # h11 keeps no HTTP/1.0 connection alive: it says so and closes after the answer
        assert reply.header("connection") == "close"
        assert await reader.closed()


@pytest.mark.parametrize("kind", SERVERS)
async def test_expect_100_continue(kind: str, tmp_path: Path) -> None:
    async with serving(kind, tmp_path) as server, connection(server) as (stream, reader):
        extra = b"content-type: application/json\r\ncontent-length: 2\r\nexpect: 100-continue\r\n"
        await stream.send_all(server.request("POST", extra=extra))
        interim = await reader.reply()
        assert interim.status == 100  # before the body is sent
        await stream.send_all(b"{}")
        final = await reader.reply("POST")
        assert final.status == 405  # the read is GET only; the body was read in full
        await stream.send_all(server.request("GET", extra=b"expect: 100-continue\r\n"))
        reply = await reader.reply()  # no body to wait for: the answer comes at once
        assert (reply.status, reply.body) == (200, server.value)


@pytest.mark.parametrize("kind", SERVERS)
async def test_pipelined_requests_are_answered_in_order(kind: str, tmp_path: Path) -> None:
    async with serving(kind, tmp_path) as server, connection(server) as (stream, reader):
        other = server.target.replace("vmSize", "location")
        await stream.send_all(
            server.request("GET")
            + server.request("GET", other)
            + server.request("HEAD")
            + server.request("GET", "/no/such/path")
            + server.request("GET")
        )
        replies = [await reader.reply(m) for m in ("GET", "GET", "HEAD", "GET", "GET")]
        assert [r.status for r in replies] == [200, 200, 200, 404, 200]
        assert [replies[0].body, replies[1].body, replies[4].body] == [
            server.value,
            b"westus",
            server.value,
        ]


# ------------------------------------------------------------------ real curl

CURL = shutil.which("curl")


async def curl(server: Server, *args: str) -> tuple[int, str]:
    """Run curl against ``server`` (``-sS -i``, at most 10 s); its exit code and output."""
    assert CURL is not None
    with trio.fail_after(20):
        done = await trio.run_process(
            [CURL, "-sS", "-i", "--max-time", "10", *server.curl, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, (done.stdout + done.stderr).decode("latin-1")


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("kind", SERVERS)
async def test_curl(kind: str, tmp_path: Path) -> None:
    async with serving(kind, tmp_path) as server:
        url = server.base + server.target
        code, first = await curl(server, url)
        assert code == 0, first
        assert first.startswith("HTTP/1.1 200")
        assert first.endswith("\r\n\r\nStandard_A3")
        code, out = await curl(server, "-I", url)
        assert code == 0, out  # was 52 (empty reply): a body was sent to HEAD
        assert out.startswith("HTTP/1.1 200")
        assert "content-length: 11\r\n" in out.lower()
        code, out = await curl(server, "--http1.0", url)
        assert code == 0, out
        assert out.endswith("Standard_A3")
        code, out = await curl(server, "--request-target", url, server.base + "/")
        assert code == 0, out
        assert out.endswith("Standard_A3")
        code, out = await curl(
            server, "--expect100-timeout", "30", "-H", "Expect: 100-continue", "-d", "{}", url
        )
        assert code == 0, out
        assert "HTTP/1.1 100 Continue" in out
        assert "HTTP/1.1 405" in out
        if server.etag:
            etag = next(line for line in first.splitlines() if line.lower().startswith("etag:"))
            code, out = await curl(server, "-H", "If-None-Match: " + etag.split(":", 1)[1], url)
            assert code == 0, out
            assert out.startswith("HTTP/1.1 304")
            assert "content-length" not in out.lower()


@pytest.mark.parametrize(
    ("target", "content_type"),
    [
        ("/v1/watch", "application/x-ndjson"),
        ("/v1/events?since=0&wait=60s", "application/json"),
    ],
)
async def test_head_of_a_stream_or_long_poll_answers_at_once(
    target: str, content_type: str, tmp_path: Path
) -> None:
    async with serving("api", tmp_path) as server, connection(server) as (stream, reader):
        await stream.send_all(server.request("HEAD", target) + server.request("GET"))
        head = await reader.reply("HEAD")
        assert head.status == 200
        assert (head.header("content-type") or "").startswith(content_type)
        assert (await reader.reply()).body == server.value
