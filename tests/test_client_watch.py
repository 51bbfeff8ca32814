"""The client's watch loops: backoff with jitter, a log line per failure, unknown frames skipped."""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from imdsd.aclient import AsyncClient
from imdsd.client import ApiError, Backoff, Client, WatchCursor, watch_refused
from imdsd.frames import Change, ChangeFrame, StateFrame, encode_line

AT = "2026-11-22T00:00:00Z"
NEWER = msgspec.json.encode({"type": "snapshot-v9", "revision": 6, "parts": [1, 2]}) + b"\n"


def change(rev: int) -> bytes:
    return encode_line(ChangeFrame(rev, AT, [Change("tags", "added", f"t{rev}", None, "v")]))


STREAM = [encode_line(StateFrame(5, {})), NEWER, change(6), NEWER, b"\n", change(7)]


class RawDaemon:
    """Just enough HTTP on a unix socket: the first ``drops`` connections are closed at once,
    the next ``refusals`` get ``status``, the others get ``lines`` and stay open."""

    def __init__(self, lines: list[bytes], drops: int = 0, refusals: int = 0) -> None:
        self.lines = lines
        self.drops = drops
        self.refusals = refusals
        self.status = b"503 Service Unavailable"
        self.connected_at: list[float] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connected_at.append(trio.current_time())
        count = len(self.connected_at)
        async with stream:
            if count <= self.drops:
                return
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(4096)
            if count <= self.drops + self.refusals:
                body = b'{"error":"busy"}'
                head = b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n" % (self.status, len(body))
                await stream.send_all(head + body)
                return
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
            await stream.send_all(head + b"connection: close\r\n\r\n" + b"".join(self.lines))
            await trio.sleep_forever()


@asynccontextmanager
async def raw_daemon(tmp_path: Path, daemon: RawDaemon) -> AsyncIterator[str]:
    path = str(tmp_path / "imdsd.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, daemon.handle, [trio.SocketListener(sock)])
        yield path
        nursery.cancel_scope.cancel()


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    low, high = Backoff(1.0, 8.0, rng=lambda: 0.0), Backoff(1.0, 8.0, rng=lambda: 1.0)
    assert [low.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [high.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    high.reset()
    assert high.next() == 1.0
    for _ in range(100):  # no overflow however long the daemon stays away
        assert 4.0 <= low.next() <= 8.0


def test_cursor_skips_unknown_frame_types_once_warned(caplog: pytest.LogCaptureFixture) -> None:
    cursor = WatchCursor(None, None)
    with caplog.at_level(logging.WARNING, logger="imdsd.client"):
        assert cursor.decode(NEWER) is None
        assert cursor.decode(NEWER) is None
        assert cursor.decode(b"\n") is None
    assert [r.getMessage() for r in caplog.records] == [
        "imdsd watch: skipping frames of unknown type 'snapshot-v9'"
    ]
    assert cursor.decode(change(6)) == msgspec.json.decode(change(6), type=ChangeFrame)
    with pytest.raises(msgspec.DecodeError):
        cursor.decode(b'{"type":"change","revision":"six"}\n')  # known type, malformed
    with pytest.raises(msgspec.DecodeError):
        cursor.decode(b"not json\n")


def test_only_server_errors_and_429_are_retried() -> None:
    assert watch_refused(503, "busy") is None
    assert watch_refused(429, "slow down") is None
    refused = watch_refused(400, "unknown kind")
    assert isinstance(refused, ApiError)
    assert refused.status == 400


async def test_async_watch_skips_unknown_frame_types_on_one_connection(tmp_path: Path) -> None:
    daemon = RawDaemon(STREAM)
    async with raw_daemon(tmp_path, daemon) as path, AsyncClient(path) as client:
        seen = []
        with trio.fail_after(5):
            async with aclosing(client.watch(retry_delay=0.01)) as frames:
                async for frame in frames:
                    seen.append(frame.revision)  # type: ignore[union-attr]
                    if len(seen) == 3:
                        break
    assert seen == [5, 6, 7]
    assert len(daemon.connected_at) == 1


async def test_async_watch_backs_off_and_logs_when_connections_drop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = RawDaemon(STREAM, drops=3, refusals=2)
    caplog.set_level(logging.WARNING, logger="imdsd.client")
    async with (
        raw_daemon(tmp_path, daemon) as path,
        AsyncClient(path) as client,
        aclosing(client.watch(retry_delay=1.0, max_delay=8.0)) as frames,
    ):
        first = await frames.__anext__()
    assert isinstance(first, StateFrame)
    at = daemon.connected_at
    gaps = [b - a for a, b in itertools.pairwise(at)]
    steps = [1.0, 2.0, 4.0, 8.0, 8.0]
    assert len(gaps) == len(steps)
    for gap, step in zip(gaps, steps, strict=True):
        assert step / 2 <= gap <= step + 0.01, (gaps, steps)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5
    assert all("reconnecting in" in m for m in messages)
    assert sum("HTTP 503" in m for m in messages) == 2


async def test_async_watch_raises_on_a_client_error(tmp_path: Path) -> None:
    daemon = RawDaemon(STREAM, refusals=1)
    daemon.status = b"400 Bad Request"
    async with raw_daemon(tmp_path, daemon) as path, AsyncClient(path) as client:
        with trio.fail_after(5), pytest.raises(ApiError) as caught:
            async with aclosing(client.watch(retry_delay=0.01)) as frames:
                await frames.__anext__()
    assert caught.value.status == 400


class _Sleeps:
    """Stands in for ``time`` in the blocking client: records sleeps instead of sleeping."""

    def __init__(self, limit: int = 20) -> None:
        self.delays: list[float] = []
        self.limit = limit

    def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) > self.limit:
            raise RuntimeError(f"reconnected {self.limit} times: {self.delays}")


async def test_sync_watch_backs_off_logs_and_skips_unknown_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sleeps = _Sleeps()
    monkeypatch.setattr("imdsd.client.time", sleeps)
    caplog.set_level(logging.WARNING, logger="imdsd.client")
    daemon = RawDaemon(STREAM, drops=2, refusals=2)
    async with raw_daemon(tmp_path, daemon) as path:
        client = Client(path)

        def work() -> list[Any]:
            seen = []
            for frame in client.watch(retry_delay=1.0, max_delay=4.0):
                seen.append(frame.revision)  # type: ignore[union-attr]
                if len(seen) == 3:
                    return seen
            return seen

        with trio.fail_after(10):
            seen = await trio.to_thread.run_sync(work)
    assert seen == [5, 6, 7]
    assert len(daemon.connected_at) == 5
    assert len(sleeps.delays) == 4
    for delay, step in zip(sleeps.delays, [1.0, 2.0, 4.0, 4.0], strict=True):
        assert step / 2 <= delay <= step
    messages = [r.getMessage() for r in caplog.records]
    assert sum("reconnecting in" in m for m in messages) == 4
    assert sum("unknown type 'snapshot-v9'" in m for m in messages) == 1
