"""The consumer library and the client commands, against a scripted fake daemon."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio

from imdsd.aclient import AsyncClient
from imdsd.client import ApiError, Client, DaemonUnreachable, WatchCursor, read_target
from imdsd.commands import describe_change, format_status, get_command, status_command
from imdsd.frames import (
    BookmarkFrame,
    Change,
    ChangeFrame,
    Frame,
    GoneFrame,
    OverflowFrame,
    StateFrame,
    encode_line,
)
from imdsd.httpio import HttpServer, Request, Responder, unix_listener

AT = "2026-11-22T00:00:00Z"


def change(rev: int) -> ChangeFrame:
    return ChangeFrame(rev, AT, [Change("tags", "added", f"t{rev}", None, "v")])


# What the fake daemon streams for each successive /v1/watch connection.
SCRIPT: list[list[Frame]] = [
    [StateFrame(5, {}), change(6), BookmarkFrame(6), OverflowFrame(6)],
    [change(7), GoneFrame(10)],
    [StateFrame(12, {}), change(13)],
]


class FakeDaemon:
    def __init__(self) -> None:
        self.targets: list[str] = []
        self.watches = 0

    async def handle(self, request: Request, responder: Responder) -> None:
        self.targets.append(request.target)
        json = [(b"content-type", b"application/json")]
        if request.path == "/metadata/instance/compute/vmSize":
            await responder.send(200, [(b"content-type", b"text/plain")], b"Standard_A3")
        elif request.path == "/metadata/instance":
            await responder.send(200, json, b'{"compute":{"vmSize":"Standard_A3"}}')
        elif request.path == "/v1/health":
            await responder.send(200, json, b'{"status":"ok","revision":5}')
        elif request.path == "/v1/watch":
            frames = SCRIPT[min(self.watches, len(SCRIPT) - 1)]
            self.watches += 1
            await responder.start(200, [(b"content-type", b"application/x-ndjson")])
            for frame in frames:
                await responder.write(encode_line(frame))
            if self.watches >= len(SCRIPT):
                await trio.sleep_forever()
            await responder.end()
        else:
            await responder.send(404, json, b'{"error":"no such path"}')


@asynccontextmanager
async def fake_daemon(tmp_path: Path) -> AsyncIterator[tuple[str, FakeDaemon]]:
    path = str(tmp_path / "imdsd.sock")
    daemon = FakeDaemon()
    async with trio.open_nursery() as nursery:
        await nursery.start(HttpServer(daemon.handle).serve, [unix_listener(path)])
        yield path, daemon
        nursery.cancel_scope.cancel()


def test_read_target() -> None:
    assert read_target("", "json") == "/metadata/instance?format=json"
    assert read_target("/compute/tags", "text") == "/metadata/instance/compute/tags?format=text"
    assert read_target("metadata/scheduledevents", "json").startswith("/metadata/scheduledevents")


def test_watch_cursor_resumes_and_relists() -> None:
    cursor = WatchCursor(None, ["tags", "disks", "tags"])
    assert cursor.target() == "/v1/watch?kinds=disks%2Ctags"
    assert cursor.accept(StateFrame(5, {}))
    assert not cursor.accept(BookmarkFrame(9))
    assert cursor.target() == "/v1/watch?since=9&kinds=disks%2Ctags"
    assert not cursor.accept(OverflowFrame(11))
    assert cursor.since == 11
    assert not cursor.accept(GoneFrame(20))
    assert cursor.since is None


async def test_async_watch_resumes_after_overflow_and_relists_after_gone(tmp_path: Path) -> None:
    async with fake_daemon(tmp_path) as (path, daemon), AsyncClient(path) as client:
        seen: list[int] = []
        with trio.fail_after(5):
            async with aclosing(client.watch(kinds=["tags"], retry_delay=0.01)) as frames:
                async for frame in frames:
                    assert isinstance(frame, StateFrame | ChangeFrame)
                    seen.append(frame.revision)
                    if len(seen) == 5:
                        break
        assert seen == [5, 6, 7, 12, 13]
        watch_targets = [t for t in daemon.targets if t.startswith("/v1/watch")]
        assert watch_targets == [
            "/v1/watch?kinds=tags",
            "/v1/watch?since=6&kinds=tags",
            "/v1/watch?kinds=tags",
        ]


async def test_sync_client_reads_and_watches(tmp_path: Path) -> None:
    async with fake_daemon(tmp_path) as (path, _):
        client = Client(path)

        def work() -> tuple[object, object, list[int]]:
            text = client.get("compute/vmSize", format="text")
            whole = client.get()
            revisions: list[int] = []
            for frame in client.watch(retry_delay=0.01):
                assert isinstance(frame, StateFrame | ChangeFrame)
                revisions.append(frame.revision)
                if len(revisions) == 5:
                    break
            return text, whole, revisions

        text, whole, revisions = await trio.to_thread.run_sync(work)
        assert text == "Standard_A3"
        assert whole == {"compute": {"vmSize": "Standard_A3"}}
        assert revisions == [5, 6, 7, 12, 13]
        with pytest.raises(ApiError) as caught:
            await trio.to_thread.run_sync(lambda: client.get("nope"))
        assert caught.value.status == 404
        assert caught.value.message == "no such path"


def test_unreachable_socket_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sock")
    with pytest.raises(DaemonUnreachable, match=r"none\.sock"):
        Client(missing).get()


def namespace(**values: object) -> argparse.Namespace:
    return argparse.Namespace(**{"config": None, "json": False, **values})


def test_commands_exit_3_when_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "none.sock")
    assert get_command(namespace(socket=missing, path="", format="json")) == 3
    assert status_command(namespace(socket=missing)) == 3
    err = capsys.readouterr().err
    assert err.count("none.sock") == 2
    assert "Traceback" not in err


async def test_get_and_status_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with fake_daemon(tmp_path) as (path, _):
        code = await trio.to_thread.run_sync(
            get_command, namespace(socket=path, path="compute/vmSize", format="text")
        )
        assert code == 0
        assert capsys.readouterr().out == "Standard_A3\n"
        code = await trio.to_thread.run_sync(status_command, namespace(socket=path, json=True))
        assert code == 0
        assert msgspec.json.decode(capsys.readouterr().out) == {"status": "ok", "revision": 5}
        code = await trio.to_thread.run_sync(
            get_command, namespace(socket=path, path="nope", format="json")
        )
        assert code == 1
        assert "no such path" in capsys.readouterr().err


def test_human_lines() -> None:
    line = describe_change(7, AT, Change("tags", "modified", "env", "dev", "prod", ["env"]))
    assert line == f"r7 {AT} tags modified env dev -> prod"
    disk = Change("disks", "modified", "lun:0", {}, {}, ["diskSizeGB"])
    assert describe_change(8, AT, disk).endswith("disks modified lun:0 (diskSizeGB)")
    summary = format_status(
        {"status": "degraded", "revision": 3, "upstream": {"instance": {"state": "stale"}}}
    )
    assert "status: degraded" in summary
    assert "instance: stale" in summary
