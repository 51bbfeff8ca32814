"""What the graceful stop waits for: the last open watch stream, as an event (no polling)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from test_api_support import running_api, started_context

from imdsd.httpio import ClientConnection, open_unix


async def test_wait_none_open_wakes_when_the_last_watch_stream_closes(tmp_path: Path) -> None:
    async with running_api(tmp_path, started_context()) as (path, api), trio.open_nursery() as n:
        await api.watchers.wait_none_open()  # nothing open: at once
        conns = [ClientConnection(await open_unix(path, 5)) for _ in range(2)]
        for conn in conns:
            head, next_line = await conn.stream_lines("GET", "/v1/watch", [("host", "imdsd")])
            assert head.status == 200
            assert await next_line() is not None  # the state frame: the stream is open
        assert api.watchers.active == 2
        woke = trio.Event()

        async def wait() -> None:
            await api.watchers.wait_none_open()
            woke.set()

        n.start_soon(wait)
        await conns[0].aclose()
        with trio.fail_after(5):
            while api.watchers.active != 1:  # the server saw the first peer leave
                await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        await conns[1].aclose()
        with trio.fail_after(5):
            await woke.wait()
        assert api.watchers.active == 0
        await api.watchers.wait_none_open()  # and again: nothing open
