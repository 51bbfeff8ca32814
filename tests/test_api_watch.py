"""Watch streams and long polls over a real unix socket."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import trio
import trio.lowlevel
from test_api_support import (
    FakeContext,
    full_snapshot,
    get,
    running_api,
    server_config,
    started_context,
)

from imdsd.api.access import REDACTED
from imdsd.api.cursor import ServerCursor
from imdsd.api.server import ApiServer
from imdsd.api.watch import _Parked
from imdsd.httpio import ClientConnection, Responder, Response, open_unix

NextFrame = Callable[[], Awaitable[dict[str, Any] | None]]


@asynccontextmanager
async def watching(path: str, target: str) -> AsyncIterator[tuple[Response, NextFrame]]:
    client = ClientConnection(await open_unix(path, 2))
    head, next_line = await client.stream_lines("GET", target, [("host", "i")])

    async def next_frame() -> dict[str, Any] | None:
        with trio.fail_after(10):
            line = await next_line()
        return None if line is None else dict(json.loads(line))

    try:
        yield head, next_frame
    finally:
        await client.aclose()


def set_compute(ctx: FakeContext, **fields: str) -> int:
    snapshot = ctx.snapshot
    assert snapshot is not None
    assert snapshot.instance_raw is not None
    doc = copy.deepcopy(snapshot.instance_raw)
    doc["compute"].update(fields)
    frame = ctx.apply(snapshot.with_instance(doc))
    assert frame is not None
    return frame.revision


def longer_than(items: list[int], size: int) -> Callable[[], bool]:
    return lambda: len(items) > size


async def wait_for(condition: Callable[[], bool], timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


async def test_state_frame_then_changes(tmp_path: Path) -> None:
    ctx = started_context()
    async with (
        running_api(tmp_path, ctx) as (path, api),
        watching(path, "/v1/watch") as (
            head,
            next_frame,
        ),
    ):
        assert head.status == 200
        assert head.header("content-type") == "application/x-ndjson"
        assert head.header("transfer-encoding") == "chunked"
        state = await next_frame()
        assert state is not None
        assert state["type"] == "state"
        assert state["revision"] == 1
        assert state["state"]["revision"] == 1
        assert state["state"]["instance"]["compute"]["vmSize"] == "Standard_A3"
        assert api.watchers.active == 1
        ctx.tag("env", "prod")
        change = await next_frame()
        assert change is not None
        assert change["type"] == "change"
        assert change["revision"] == 2
        assert change["changes"] == [
            {"kind": "tags", "op": "added", "key": "env", "old": None, "new": "prod"}
        ]
        assert change["at"].endswith("Z")


async def test_since_replays_history_then_follows(tmp_path: Path) -> None:
    ctx = started_context()
    for i in range(3):
        ctx.tag("n", str(i))
    async with (
        running_api(tmp_path, ctx) as (path, _),
        watching(path, "/v1/watch?since=2") as (_, next_frame),
    ):
        replayed = [await next_frame(), await next_frame()]
        assert [f["revision"] for f in replayed if f] == [3, 4]
        ctx.tag("n", "live")
        live = await next_frame()
        assert live is not None
        assert live["revision"] == 5
        assert live["changes"][0]["new"] == "live"


async def test_kinds_filter_skips_revisions(tmp_path: Path) -> None:
    ctx = started_context()
    async with (
        running_api(tmp_path, ctx) as (path, _),
        watching(path, "/v1/watch?since=1&kinds=compute") as (_, next_frame),
    ):
        ctx.tag("env", "prod")
        revision = set_compute(ctx, vmSize="Standard_D4")
        frame = await next_frame()
        assert frame is not None
        assert frame["revision"] == revision == 3
        assert [c["kind"] for c in frame["changes"]] == ["compute"]


async def test_bookmarks_every_heartbeat(tmp_path: Path) -> None:
    ctx = started_context()
    async with (
        running_api(tmp_path, ctx, heartbeat=0.05) as (path, _),
        watching(path, "/v1/watch?kinds=disks") as (_, next_frame),
    ):
        assert (await next_frame() or {})["type"] == "state"
        assert await next_frame() == {"type": "bookmark", "revision": 1}
        ctx.tag("env", "prod")
        frame = await next_frame()
        while frame == {"type": "bookmark", "revision": 1}:
            frame = await next_frame()
        assert frame == {"type": "bookmark", "revision": 2}


async def test_gone_when_history_is_too_short(tmp_path: Path) -> None:
    ctx = FakeContext(history=2)
    ctx.apply(full_snapshot())
    for i in range(4):
        ctx.tag("n", str(i))
    async with running_api(tmp_path, ctx) as (path, _):
        for since in (1, 99):
            async with watching(path, f"/v1/watch?since={since}") as (head, next_frame):
                assert head.status == 200
                assert await next_frame() == {"type": "gone", "oldest": 3}
                assert await next_frame() is None
        async with watching(path, "/v1/watch?since=3") as (_, next_frame):
            assert [(await next_frame() or {})["revision"] for _ in range(2)] == [4, 5]


async def test_departed_watchers_are_dropped_promptly(tmp_path: Path) -> None:
    ctx = started_context()
    async with running_api(tmp_path, ctx, heartbeat=60) as (path, api):
        for _ in range(3):
            async with watching(path, "/v1/watch") as (_, next_frame):
                await next_frame()
                assert api.watchers.active == 1
            await wait_for(lambda: api.watchers.active == 0, timeout=2)
        assert ctx.broadcaster.subscribers == 0


async def test_watch_ends_when_the_broadcaster_closes(tmp_path: Path) -> None:
    ctx = started_context()
    async with (
        running_api(tmp_path, ctx) as (path, _),
        watching(path, "/v1/watch") as (
            _,
            next_frame,
        ),
    ):
        await next_frame()
        ctx.tag("env", "prod")
        ctx.broadcaster.close()
        assert (await next_frame() or {})["revision"] == 2
        assert await next_frame() == {"type": "bookmark", "revision": 2}
        assert await next_frame() is None


async def test_unprivileged_watchers_get_redacted_frames(tmp_path: Path) -> None:
    ctx = started_context()
    async with (
        running_api(tmp_path, ctx, restricted_allow_uids=[], restricted_allow_gids=[]) as (
            path,
            api,
        ),
        watching(path, "/v1/watch") as (_, next_frame),
    ):
        state = await next_frame()
        assert state is not None
        assert "userData" not in state["state"]["instance"]["compute"]
        set_compute(ctx, userData="bmV3", vmSize="Standard_D4")
        frame = await next_frame()
        assert frame is not None
        by_key = {c["key"]: c for c in frame["changes"]}
        assert by_key["userData"]["old"] == REDACTED
        assert by_key["userData"]["new"] == REDACTED
        assert by_key["vmSize"]["new"] == "Standard_D4"
        response = await get(path, f"/v1/events?since={frame['revision'] - 1}")
        assert REDACTED in response.body.decode()
        assert b"bmV3" not in response.body
        assert api.lines.encoded == 1


async def test_five_hundred_watchers_all_receive_a_change(tmp_path: Path) -> None:
    ctx = started_context()
    count = 500
    received: list[int] = []
    ready = 0
    async with running_api(tmp_path, ctx) as (path, api):

        async def watcher() -> None:
            nonlocal ready
            async with watching(path, "/v1/watch") as (_, next_frame):
                assert (await next_frame() or {})["type"] == "state"
                ready += 1
                frame = await next_frame()
                assert frame is not None
                received.append(frame["revision"])

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(watcher)
                await wait_for(lambda: ready == count, timeout=30)
                assert api.watchers.active == count
                encoded_before = api.lines.encoded
                started = time.perf_counter()
                ctx.tag("env", "prod")
                await wait_for(lambda: len(received) == count, timeout=30)
                elapsed = time.perf_counter() - started
        assert received == [2] * count
        assert api.lines.encoded == encoded_before + 1
        assert elapsed < 10


async def test_overflow_for_a_watcher_that_never_reads(tmp_path: Path) -> None:
    ctx = started_context()
    frames = 120
    big = "x" * 8000
    async with running_api(tmp_path, ctx, max_pending=4) as (path, api):
        slow = await trio.open_unix_socket(path)
        await slow.send_all(b"GET /v1/watch?since=1 HTTP/1.1\r\nhost: i\r\n\r\n")
        await wait_for(lambda: api.watchers.active == 1)
        got: list[int] = []
        async with watching(path, "/v1/watch?since=1") as (_, next_frame):

            async def keep_up() -> None:
                while len(got) < frames:
                    frame = await next_frame()
                    assert frame is not None
                    got.append(frame["revision"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_up)
                for i in range(frames):
                    ctx.tag("big", f"{i}{big}")
                    await wait_for(longer_than(got, i))
        assert got == list(range(2, frames + 2))
        await wait_for(lambda: ctx.broadcaster.subscribers == 0)
        data = b""
        with trio.fail_after(5):
            while chunk := await slow.receive_some(1 << 20):
                data += chunk
        await slow.aclose()
        assert api.metrics.watch_overflows == 1
        lines = [json.loads(line) for line in data.split(b"\r\n") if line.startswith(b"{")]
        assert lines[-1]["type"] == "overflow"
        delivered = [line["revision"] for line in lines[:-1]]
        assert delivered == list(range(2, 2 + len(delivered)))
        assert len(delivered) < frames
        assert lines[-1]["revision"] == delivered[-1]
        await wait_for(lambda: api.watchers.active == 0)


async def test_stuck_watcher_is_closed_after_the_write_timeout(tmp_path: Path) -> None:
    ctx = started_context()
    async with running_api(tmp_path, ctx, max_pending=4, write_timeout=0.2) as (path, api):
        stuck = await trio.open_unix_socket(path)
        await stuck.send_all(b"GET /v1/watch?since=1 HTTP/1.1\r\nhost: i\r\n\r\n")
        await wait_for(lambda: api.watchers.active == 1)
        for i in range(100):
            ctx.tag("big", f"{i}" + "y" * 8000)
            await trio.sleep(0.001)
        await wait_for(lambda: api.watchers.active == 0)
        assert ctx.broadcaster.subscribers == 0
        await stuck.aclose()


# ------------------------------------------------------------------ long poll


async def test_long_poll_answers_at_once_when_there_are_changes(tmp_path: Path) -> None:
    ctx = started_context()
    ctx.tag("a", "1")
    set_compute(ctx, vmSize="Standard_D4")
    async with running_api(tmp_path, ctx) as (path, _):
        response = await get(path, "/v1/events?since=1&wait=60s")
        assert response.status == 200
        answer = json.loads(response.body)
        assert answer["revision"] == 3
        assert [f["revision"] for f in answer["frames"]] == [2, 3]
        assert all(f["type"] == "change" for f in answer["frames"])
        filtered = json.loads((await get(path, "/v1/events?since=1&kinds=compute")).body)
        assert [f["revision"] for f in filtered["frames"]] == [3]


async def test_long_poll_waits_for_a_matching_change(tmp_path: Path) -> None:
    ctx = started_context()
    async with running_api(tmp_path, ctx) as (path, _):
        result: list[Response] = []

        async def poll() -> None:
            result.append(await get(path, "/v1/events?since=1&kinds=compute&wait=30s"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await trio.sleep(0.05)
            ctx.tag("a", "1")
            await trio.sleep(0.05)
            assert not result
            set_compute(ctx, vmSize="Standard_D4")
        answer = json.loads(result[0].body)
        assert answer["revision"] == 3
        assert [f["revision"] for f in answer["frames"]] == [3]


async def test_long_poll_times_out_empty(tmp_path: Path) -> None:
    ctx = started_context()
    async with running_api(tmp_path, ctx) as (path, _):
        started = time.perf_counter()
        response = await get(path, "/v1/events?since=1&wait=100ms")
        assert time.perf_counter() - started >= 0.09
        assert json.loads(response.body) == {"revision": 1, "frames": []}
        ctx.tag("a", "1")
        skipped = json.loads((await get(path, "/v1/events?since=1&kinds=disks&wait=0")).body)
        assert skipped == {"revision": 2, "frames": []}


async def test_long_poll_gone_is_410(tmp_path: Path) -> None:
    ctx = FakeContext(history=1)
    ctx.apply(full_snapshot())
    ctx.tag("a", "1")
    ctx.tag("a", "2")
    async with running_api(tmp_path, ctx) as (path, _):
        response = await get(path, "/v1/events?since=1")
        assert response.status == 410
        answer = json.loads(response.body)
        assert answer["oldest"] == 2
        assert "oldest" in answer["error"]


async def test_departed_long_poll_is_dropped(tmp_path: Path) -> None:
    ctx = started_context()
    async with running_api(tmp_path, ctx) as (path, api):
        client = ClientConnection(await open_unix(path, 2))
        async with trio.open_nursery() as nursery:

            async def poll() -> None:
                await client.request("GET", "/v1/events?since=1&wait=60s", [("host", "i")])

            nursery.start_soon(poll)
            await wait_for(lambda: api.watchers.active == 1)
            nursery.cancel_scope.cancel()
        await client.aclose()
        await wait_for(lambda: api.watchers.active == 0, timeout=2)


def test_server_tracks_gauges(tmp_path: Path) -> None:
    api = ApiServer(started_context(), server_config(tmp_path / "x.sock"))
    api.watchers.active = 3
    text = api.metrics.render().decode()
    assert "\nimdsd_watchers 3\n" in text
    assert "\nimdsd_revision 1\n" in text
    assert "\nimdsd_connections 0\n" in text


async def test_direct_fan_out_delivers_each_revision_once_in_order(tmp_path: Path) -> None:
    """Frames written at publish time (no task switch) are neither lost nor repeated."""
    ctx = started_context()
    async with running_api(tmp_path, ctx, heartbeat=60) as (path, api), trio.open_nursery() as n:
        received: list[list[int]] = [[] for _ in range(40)]
        ready = trio.Semaphore(0)

        async def follow(index: int) -> None:
            async with watching(path, "/v1/watch?kinds=tags") as (_, next_frame):
                await next_frame()  # state
                ready.release()
                while len(received[index]) < 30:
                    frame = await next_frame()
                    assert frame is not None
                    received[index].append(frame["revision"])

        for index in range(40):
            n.start_soon(follow, index)
        for _ in range(40):
            await ready.acquire()
        await wait_for(lambda: len(api.watchers._parked) == 40, timeout=5)
        published = []
        for i in range(30):
            published.append(ctx.tag("burst", str(i)).revision)
            if i % 3 == 0:
                await trio.lowlevel.checkpoint()  # some frames find tasks parked, some not
    assert all(seen == published for seen in received)


async def test_deliver_leaves_a_frame_taken_but_not_yet_written_to_the_task(
    tmp_path: Path,
) -> None:
    """A watcher that took frame N from its queue (not yet written) must not get N+1 first."""
    ctx = started_context()
    api = ApiServer(ctx, server_config(tmp_path / "w.sock"))
    written: list[bytes] = []

    class Recorder:
        def write_nowait(self, data: bytes) -> bytes:
            written.append(data)
            return b""

    subscription = ctx.subscribe(16, ctx.revision)
    cursor = ServerCursor(api.lines, None, "full", ctx.revision)
    parked = _Parked(cast(Responder, Recorder()), subscription, cursor)
    taken = ctx.tag("a", "1")  # queued while the watcher was not parked
    assert subscription.receive_nowait() is taken  # the task took it; its write is to come
    api.watchers._parked[id(parked)] = parked
    ctx.listeners.append(api.deliver)
    ctx.tag("b", "2")
    assert written == []
    assert parked.cursor.last == taken.revision - 1
    assert subscription.pending == 1  # the newer frame waits for the task, in order


async def test_parked_watchers_written_directly_are_not_woken(tmp_path: Path) -> None:
    """A frame written at publish time is counted as received: no queue, no task wake-up."""
    ctx = started_context()
    async with (
        running_api(tmp_path, ctx, heartbeat=60) as (path, api),
        watching(path, "/v1/watch") as (_, all_frames),
        watching(path, "/v1/watch?kinds=disks") as (_, disk_frames),
    ):
        await all_frames()  # state
        await disk_frames()  # state
        await wait_for(lambda: len(api.watchers._parked) == 2)
        parked = list(api.watchers._parked.values())
        revision = ctx.tag("env", "prod").revision
        assert [p.subscription.pending for p in parked] == [0, 0]
        assert [p.subscription.revision for p in parked] == [revision, revision]
        frame = await all_frames()
        assert frame is not None
        assert frame["revision"] == revision
        assert len(api.watchers._parked) == 2


# ------------------------------------------------------------------ revisions without a frame


def revision_without_frame(ctx: FakeContext) -> int:
    """Take a revision that has no change frame, as a document appearing does."""
    snapshot = ctx.snapshot
    assert snapshot is not None
    assert snapshot.loadbalancer_raw is not None
    lb = {**snapshot.loadbalancer_raw, "futureField": ctx.revision}
    ctx.clock += 1
    assert ctx.store.apply(snapshot.with_loadbalancer(lb), ctx.clock, new_content=True) is None
    return ctx.revision


async def test_bookmarks_name_the_current_revision_when_nothing_is_pending(
    tmp_path: Path,
) -> None:
    ctx = started_context()
    assert revision_without_frame(ctx) == 2
    async with (
        running_api(tmp_path, ctx, heartbeat=0.05) as (path, _),
        watching(path, "/v1/watch?since=1") as (_, next_frame),
    ):
        assert await next_frame() == {"type": "bookmark", "revision": 2}
        assert revision_without_frame(ctx) == 3
        frame = await next_frame()
        while frame == {"type": "bookmark", "revision": 2}:
            frame = await next_frame()
        assert frame == {"type": "bookmark", "revision": 3}
        ctx.tag("env", "prod")
        frame = await next_frame()
        while frame == {"type": "bookmark", "revision": 3}:
            frame = await next_frame()
        assert frame is not None
        assert (frame["type"], frame["revision"]) == ("change", 4)


async def test_long_poll_answers_the_current_revision_when_nothing_is_pending(
    tmp_path: Path,
) -> None:
    ctx = started_context()
    revision_without_frame(ctx)
    async with running_api(tmp_path, ctx) as (path, _):
        empty = json.loads((await get(path, "/v1/events?since=1&wait=0")).body)
        assert empty == {"revision": 2, "frames": []}
        ctx.tag("a", "1")
        revision_without_frame(ctx)
        answer = json.loads((await get(path, "/v1/events?since=1&wait=0")).body)
        assert answer["revision"] == 4
        assert [f["revision"] for f in answer["frames"]] == [3]
        skipped = json.loads((await get(path, "/v1/events?since=2&kinds=disks&wait=0")).body)
        assert skipped == {"revision": 4, "frames": []}
