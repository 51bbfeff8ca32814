"""Helpers for the resilience suite: an in-process daemon next to an in-process emulator,
a sampler of what the daemon serves while upstream misbehaves, resuming watchers that
follow the daemon across restarts, and never-reading watch clients."""

from __future__ import annotations

import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio
from daemon_support import emulator
from emulator_support import Emulator

from imdsd.config import Config, HooksConfig, ImdsConfig, PollConfig, ServerConfig, StateConfig
from imdsd.daemon import Daemon
from imdsd.frames import BookmarkFrame, ChangeFrame, StateFrame, decode_frame
from imdsd.httpio import ClientConnection, HttpIOError, Response, open_unix

BIG_COUNT = 1_000_000
"""A fault count no test uses up: the fault lasts until the test clears it."""

T = TypeVar("T")


async def run_inline(fn: Callable[..., T], *args: Any, **_options: Any) -> T:
    """Stand-in for ``trio.to_thread.run_sync`` that runs ``fn`` in the trio thread.

    Under an autojumping MockClock a worker thread (the state saver) leaves every task
    blocked, so virtual time would leap ahead by whole poll intervals while the disk works.
    """
    await trio.lowlevel.checkpoint()
    return fn(*args)


def slow_inline(delay: float) -> Callable[..., Awaitable[Any]]:
    """Like :func:`run_inline`, after ``delay`` seconds (a slow disk, in trio time)."""

    async def run(fn: Callable[..., T], *args: Any, **_options: Any) -> T:
        await trio.sleep(delay)
        return fn(*args)

    return run


async def request(
    socket_path: str, target: str, timeout: float = 10, max_body: int = 1 << 20
) -> Response:
    """One GET on a daemon's socket."""
    conn = ClientConnection(await open_unix(socket_path, 5), max_body=max_body)
    try:
        return await conn.request("GET", target, [("host", "imdsd")], timeout=timeout)
    finally:
        await conn.aclose()


def metric(text: bytes, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus text exposition."""
    for line in text.decode().splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"no sample {name} in /metrics")


@dataclass
class Running:
    """A daemon and its emulator running inside the test's trio run."""

    daemon: Daemon
    emu: Emulator
    socket: str

    async def get(self, target: str) -> Response:
        """One request on the daemon's socket."""
        return await request(self.socket, target)

    async def get_json(self, target: str) -> Any:
        """The decoded JSON body of one request."""
        return msgspec.json.decode((await self.get(target)).body)

    async def faults(self, specs: list[dict[str, Any]]) -> None:
        """Queue fault specs on the emulator, in order."""
        reply = await self.emu.call("POST", "/_emulator/faults", specs)
        assert reply.status == 201, reply.body

    async def clear_faults(self) -> None:
        """Drop every queued fault."""
        reply = await self.emu.call("DELETE", "/_emulator/faults")
        assert reply.status == 200, reply.body

    async def stats(self) -> dict[str, Any]:
        """The emulator's request statistics."""
        stats: dict[str, Any] = msgspec.json.decode(
            (await self.emu.call("GET", "/_emulator/stats")).body
        )
        return stats

    async def next_instance_poll(self) -> None:
        """Wait until the instance poller has had one more success."""
        health = self.daemon.board.endpoints["instance"]
        seen = health.successes
        while health.successes == seen:
            await trio.sleep(0.01)


def daemon_config(tmp: Path, endpoint: str, *, instance: float, rate: float) -> Config:
    """A config for an in-process daemon with its socket and state in ``tmp``."""
    return Config(
        imds=ImdsConfig(endpoint=endpoint, max_requests_per_second=rate),
        poll=PollConfig(instance=instance, scheduled_events=1.0, loadbalancer=60.0),
        server=ServerConfig(socket=str(tmp / "imdsd.sock"), socket_group="", heartbeat=5.0),
        state=StateConfig(directory=str(tmp / "state")),
        hooks=HooksConfig(directory=str(tmp / "hooks.d")),
    )


@asynccontextmanager
async def running(
    tmp: Path, *, instance: float = 10.0, rate: float = 2.0, seed: int = 1
) -> AsyncIterator[Running]:
    """An emulator and a ready :class:`Daemon` (retry jitter seeded) for the block.

    The daemon is stopped gracefully at the end, also when the block fails, so that its
    upstream connections are closed.
    """
    async with emulator() as emu, trio.open_nursery() as nursery:
        config = daemon_config(tmp, emu.endpoint, instance=instance, rate=rate)
        daemon = Daemon(config, None)
        daemon.client.reseed(random.Random(seed))
        stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await daemon.run(task_status=task_status)
            finally:
                stopped.set()

        await nursery.start(run)
        try:
            yield Running(daemon, emu, config.server.socket)
        finally:
            daemon.stop()
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await stopped.wait()


@dataclass(frozen=True)
class Sample:
    """What the daemon served at one moment."""

    at: float
    status: int
    tags: str
    revision: str | None
    stale: str | None
    health: str
    instance: str


@dataclass
class Sampler:
    """Reads the tags and the health through the daemon's socket every ``every`` seconds."""

    run: Running
    every: float
    samples: list[Sample] = field(default_factory=list)

    async def sample(self) -> Sample:
        """Take one sample now."""
        reply = await self.run.get("/metadata/instance/compute/tags?format=text")
        health = await self.run.get_json("/v1/health")
        sample = Sample(
            at=trio.current_time(),
            status=reply.status,
            tags=reply.body.decode(),
            revision=reply.header("x-imdsd-revision"),
            stale=reply.header("x-imdsd-stale"),
            health=health["status"],
            instance=health["upstream"]["instance"]["state"],
        )
        self.samples.append(sample)
        return sample

    async def run_forever(self) -> None:
        """Sample until cancelled."""
        while True:
            await self.sample()
            await trio.sleep(self.every)


ChangeKey = tuple[str, str, str]


@dataclass
class Follower:
    """A consumer that follows the daemon across restarts, resuming with ``since``.

    ``revisions`` lists every change frame's revision in the order received; receiving a
    revision that is not above the previous one fails at once. ``changes`` counts
    ``(kind, op, key)`` over every frame received. Connection failures, broken streams and
    ``503`` (starting, stopping) make it retry shortly; ``reconnects`` counts them.
    """

    name: str
    since: int = 0
    revisions: list[int] = field(default_factory=list)
    changes: Counter[ChangeKey] = field(default_factory=Counter)
    reconnects: int = 0

    def take(self, revision: int, changes: list[ChangeKey]) -> None:
        """Record one change frame."""
        if self.revisions and revision <= self.revisions[-1]:
            raise AssertionError(
                f"{self.name}: revision {revision} after {self.revisions[-1]} "
                f"(seen: {self.revisions})"
            )
        if revision <= self.since:
            raise AssertionError(f"{self.name}: revision {revision} not after since={self.since}")
        self.revisions.append(revision)
        self.changes.update(changes)
        self.since = revision

    async def long_poll(self, socket_path: str) -> None:
        """Follow with ``/v1/events?since=`` long polls, forever."""
        while True:
            try:
                reply = await request(
                    socket_path, f"/v1/events?since={self.since}&wait=2s", timeout=5
                )
            except HttpIOError:
                self.reconnects += 1
                await trio.sleep(0.05)
                continue
            if reply.status == 503:  # starting or stopping: come back later
                self.reconnects += 1
                await trio.sleep(0.05)
                continue
            assert reply.status == 200, (self.name, reply.status, reply.body)
            body = msgspec.json.decode(reply.body)
            for frame in body["frames"]:
                changes = [(c["kind"], c["op"], c["key"]) for c in frame["changes"]]
                self.take(frame["revision"], changes)
            if body["revision"] < self.since:
                raise AssertionError(f"{self.name}: long poll went back to {body['revision']}")
            self.since = body["revision"]

    async def stream(self, socket_path: str) -> None:
        """Follow with ``/v1/watch?since=`` streams, reconnecting forever."""
        while True:
            try:
                conn = ClientConnection(await open_unix(socket_path, 5))
            except HttpIOError:
                await trio.sleep(0.05)
                continue
            try:
                await self._stream_once(conn)
            except HttpIOError:
                pass
            finally:
                await conn.aclose()
            self.reconnects += 1
            await trio.sleep(0.05)

    async def _stream_once(self, conn: ClientConnection) -> None:
        head, next_line = await conn.stream_lines(
            "GET", f"/v1/watch?since={self.since}", [("host", "imdsd")]
        )
        if head.status == 503:  # starting or stopping: come back later
            return
        assert head.status == 200, (self.name, head.status)
        while (line := await next_line()) is not None:
            frame = decode_frame(line)
            if isinstance(frame, ChangeFrame):
                self.take(frame.revision, [(c.kind, c.op, c.key) for c in frame.changes])
            elif isinstance(frame, BookmarkFrame):
                if frame.revision < self.since:
                    raise AssertionError(f"{self.name}: bookmark went back to {frame.revision}")
                self.since = frame.revision
            else:
                raise AssertionError(f"{self.name}: unexpected frame {line!r}")  # noqa: TRY004


def stalled_watcher(socket_path: str) -> socket.socket:
    """A watch client that sends ``GET /v1/watch`` and then never reads.

    Its receive buffer is made as small as the kernel allows (for a unix stream socket the
    bytes in flight are charged to the daemon's send buffer anyway).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(socket_path)
    sock.sendall(b"GET /v1/watch HTTP/1.1\r\nhost: imdsd\r\n\r\n")
    return sock


def drain_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything ``sock`` still holds; raises ``TimeoutError`` unless the peer closed it."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def vm_rss_kib(pid: int) -> int:
    """``VmRSS`` of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class FastWatcher:
    """A watch client that reads every frame as soon as it arrives.

    ``revisions`` are the change frames' revisions in order; ``latencies`` the seconds from
    each frame's ``at`` (when the daemon stored the revision) to its arrival here.
    """

    revisions: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    state_revision: int = 0

    async def run(
        self, socket_path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch until the stream ends; ``started`` once the state frame arrived."""
        conn = ClientConnection(await open_unix(socket_path, 5))
        try:
            head, next_line = await conn.stream_lines("GET", "/v1/watch", [("host", "imdsd")])
            assert head.status == 200, head.status
            first = await next_line()
            assert first is not None
            state = decode_frame(first)
            assert isinstance(state, StateFrame), first[:200]
            self.state_revision = state.revision
            task_status.started()
            while (line := await next_line()) is not None:
                frame = decode_frame(line)
                if isinstance(frame, ChangeFrame):
                    at = datetime.fromisoformat(frame.at).timestamp()
                    self.latencies.append(time.time() - at)
                    self.revisions.append(frame.revision)
        finally:
            await conn.aclose()
