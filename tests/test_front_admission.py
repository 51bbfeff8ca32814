"""The front's accept path (FrontHttp): bounded descriptors and per-uid admission."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
import trio.testing

from imdsd.api.access import AccessPolicy
from imdsd.front import server as front_server
from imdsd.front.callers import Caller
from imdsd.front.server import FrontHttp
from imdsd.httpio import Request, Responder


class _Front:
    """What FrontHttp needs of a FrontServer; every caller is uid 65534, looked up only once
    ``looked_up`` is set."""

    def __init__(self) -> None:
        self.looked_up = trio.Event()
        self.throttled_count = 0

    async def handle(self, request: Request, responder: Responder) -> None:
        await responder.send(200, [], b"ok")

    async def caller(self, conn: Any) -> Caller:
        await self.looked_up.wait()
        return Caller(65534, 65534, None, "")

    def policy(self) -> AccessPolicy:
        return AccessPolicy()

    def throttled(self, caller: Caller) -> None:
        self.throttled_count += 1


async def test_the_front_never_holds_more_sockets_than_its_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With lookups stuck, no more than MAX_CONNECTIONS are accepted (the rest wait in the
    backlog); once lookups finish, one uid keeps PER_UID and every other one gets a 429."""
    for name, value in {"MAX_CONNECTIONS": 8, "PER_UID": 3, "RESERVE": 2, "SPARE": 2}.items():
        monkeypatch.setattr(front_server, name, value)
    front = _Front()
    http = FrontHttp(front)  # type: ignore[arg-type]  # the parts of a FrontServer it uses
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, listeners)
        clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(12)]
        with trio.fail_after(10):
            while http.accepted < 8:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert http.accepted == 8
        front.looked_up.set()
        with trio.fail_after(10):
            # all but the admitted three closed (the accept loop holds one for the next)
            while http.room.value != 8 - 3 - 1:
                await trio.sleep(0.01)
        assert (http.accepted, http.active, front.throttled_count) == (12, 3, 9)
        answers = [_received(client) for client in clients]
        assert answers.count(None) == 3
        throttled = [a for a in answers if a is not None]
        assert len(throttled) == 9
        assert all(a.startswith(b"HTTP/1.1 429 ") for a in throttled)
        assert all(a.endswith(b'{"error":"Too many requests"}') for a in throttled)
        for client in clients:
            await client.aclose()
        nursery.cancel_scope.cancel()


def _received(client: trio.SocketStream) -> bytes | None:
    """What the front sent ``client`` so far, None when nothing (it is being served)."""
    try:
        return os.read(client.socket.fileno(), 4096)  # trio's sockets are non-blocking
    except BlockingIOError:
        return None
