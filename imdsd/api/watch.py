"""Watch streams (``/v1/watch``) and long polls (``/v1/events``): the trio side of frames.

Each watcher subscribes to live frames *before* it reads the state or replays history (no
await in between), then skips live frames it already sent, so nothing falls into the gap
and nothing is sent twice. Lines come from the shared :class:`~imdsd.api.lines.FrameLines`
cache. A sibling task waits for the peer to leave so dead watchers are dropped at once. A
write that does not complete within ``write_timeout`` (a peer that stopped reading) closes the
stream: its subscription has long overflowed and been dropped by then, so it costs nothing
meanwhile. When the daemon stops (the broadcaster closes), each stream ends with a final
bookmark naming the revision to resume from.

What to write is decided by each stream's :class:`~imdsd.api.cursor.ServerCursor` (sans-IO);
this module receives frames, writes the cursor's lines and ends streams when told.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
import trio

from imdsd.api.context import ApiContext
from imdsd.api.cursor import ServerCursor, open_stream
from imdsd.api.lines import FrameLines, events_body
from imdsd.api.metrics import Metrics
from imdsd.api.routes import JSON_TYPE, EventsCall, Router, WatchCall, error
from imdsd.broadcast import Overflowed, Subscription
from imdsd.frames import ChangeFrame, GoneFrame
from imdsd.httpio import HttpIOError, Responder

log = structlog.get_logger("imdsd.api.watch")

NDJSON_HEADERS = [
    (b"content-type", b"application/x-ndjson"),
    (b"cache-control", b"no-store"),
]
JSON_HEADERS = [(b"content-type", JSON_TYPE), (b"cache-control", b"no-store")]


class _Stuck(Exception):
    """A write did not complete in time."""


class _Parked:
    """A watch stream waiting for its next frame, which :meth:`Watchers.deliver` may write."""

    __slots__ = ("cursor", "failure", "responder", "rest", "subscription")

    def __init__(
        self, responder: Responder, subscription: Subscription, cursor: ServerCursor
    ) -> None:
        self.responder = responder
        self.subscription = subscription
        self.cursor = cursor
        self.rest = b""
        self.failure: HttpIOError | None = None


class Watchers:
    """Serves watch streams and long polls; ``active`` counts the open ones."""

    def __init__(
        self,
        ctx: ApiContext,
        router: Router,
        lines: FrameLines,
        metrics: Metrics,
        *,
        heartbeat: float,
        max_pending: int = 1024,
        write_timeout: float = 10.0,
    ) -> None:
        self.ctx = ctx
        self.router = router
        self.lines = lines
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.max_pending = max_pending
        self.write_timeout = write_timeout
        self.active = 0
        self._none_open = trio.Event()
        self._parked: dict[int, _Parked] = {}

    async def wait_none_open(self) -> None:
        """Return once no watch stream or long poll is open."""
        while self.active:
            await self._none_open.wait()

    async def _guarded(self, responder: Responder, body: Callable[[], Awaitable[None]]) -> bool:
        """Run ``body`` until it ends or the peer leaves; True when the peer left."""
        left = False

        async def watch_peer(scope: trio.CancelScope) -> None:
            nonlocal left
            await responder.wait_peer_closed()
            left = True
            scope.cancel()

        self.active += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_peer, nursery.cancel_scope)
                try:
                    await body()
                except HttpIOError:
                    left = True
                except _Stuck:
                    # the peer stopped reading: no frame can reach it, not even "overflow"
                    log.warning("watcher closed: not reading", write_timeout=self.write_timeout)
                    self.metrics.watch_overflow()
                    left = True
                nursery.cancel_scope.cancel()
        finally:
            self.active -= 1
            if not self.active:
                self._none_open.set()
                self._none_open = trio.Event()
        return left

    async def _write(self, responder: Responder, data: bytes) -> None:
        rest = responder.write_nowait(data)
        if not rest:
            return
        with trio.move_on_after(self.write_timeout) as timer:
            await responder.write_rest(rest)
        if timer.cancelled_caught:
            raise _Stuck

    def _subscribe(self, after: int) -> Subscription | None:
        try:
            return self.ctx.subscribe(self.max_pending, after)
        except trio.ClosedResourceError:
            return None

    # ------------------------------------------------------------------ /v1/watch

    async def stream(self, call: WatchCall, responder: Responder) -> None:
        """Serve one ``/v1/watch`` request until the peer leaves, overflow or shutdown."""
        responder.close_after = True
        after = self.ctx.revision if call.since is None else call.since
        subscription = self._subscribe(after)
        if subscription is None:
            reply = error(503, "imdsd is stopping")
            await responder.send(reply.status, reply.headers, reply.body)
            return
        with subscription:
            opening = open_stream(call, self.lines, self.ctx, self.router.state_line)
            if opening is None:
                reply = error(503, "no instance document yet: imdsd is starting")
                await responder.send(reply.status, reply.headers, reply.body)
                return
            cursor = opening.cursor
            if cursor is None:  # gone
                await responder.start(200, NDJSON_HEADERS)
                for line in opening.first:
                    await responder.write(line)
                await responder.end()
                return
            following: ServerCursor = cursor  # narrowed for the closure

            async def run() -> None:
                await responder.start(200, NDJSON_HEADERS)
                for line in opening.first:
                    await self._write(responder, line)
                await self._follow(responder, subscription, following)

            await self._guarded(responder, run)

    async def _follow(
        self, responder: Responder, subscription: Subscription, cursor: ServerCursor
    ) -> None:
        parked = _Parked(responder, subscription, cursor)
        while True:
            self._parked[id(parked)] = parked
            frame: ChangeFrame | None = None
            overflowed = closed = False
            try:
                with trio.move_on_after(self.heartbeat):
                    frame = await subscription.receive()
            except Overflowed:
                overflowed = True
            except (trio.EndOfChannel, trio.ClosedResourceError):
                closed = True
            finally:
                del self._parked[id(parked)]
            if parked.failure is not None:
                raise parked.failure
            if parked.rest:
                rest, parked.rest = parked.rest, b""
                with trio.move_on_after(self.write_timeout) as stuck:
                    await responder.write_rest(rest)
                if stuck.cancelled_caught:
                    raise _Stuck
            if overflowed:
                self.metrics.watch_overflow()
                await self._write(responder, cursor.overflow())
                await responder.end()
                return
            if frame is None:  # a heartbeat, or the daemon stopping
                await self._write(responder, cursor.bookmark(self.ctx, subscription.pending))
                if closed:
                    await responder.end()
                    return
                continue
            line = cursor.take(frame)
            if line is not None:
                await self._write(responder, line)

    def deliver(self, frame: ChangeFrame) -> None:
        """Write ``frame`` at once to every watcher parked waiting for it (no task switch).

        Called synchronously when a frame is published, before subscriptions are offered it.
        A watcher whose socket takes the whole line (or whose kinds skip the frame) is done:
        its subscription counts the frame as received, so its task is not even woken. The
        rest of a partial write, or a failure, is left to the task, which the subscription
        wakes and which skips frames written here. A watcher with frames still pending in
        its subscription, or one taken from it and not yet written, is left to its task too,
        so lines stay in order and none is skipped. This keeps fan-out
        to thousands of watchers to one non-blocking write each.
        """
        for parked in list(self._parked.values()):
            if parked.rest or parked.failure is not None:
                continue
            subscription = parked.subscription
            line = parked.cursor.take_now(frame, subscription.pending, subscription.revision)
            if line is None:
                continue  # frames queued, or taken and not yet written: the task goes first
            if line:
                try:
                    parked.rest = parked.responder.write_nowait(line)
                except HttpIOError as exc:
                    parked.failure = exc
                    continue
            if not parked.rest:
                subscription.advance(frame.revision)

    # ------------------------------------------------------------------ /v1/events

    async def poll(self, call: EventsCall, responder: Responder) -> None:
        """Serve one ``/v1/events`` long poll."""
        subscription = self._subscribe(call.since)
        if subscription is None:
            reply = error(503, "imdsd is stopping")
            await responder.send(reply.status, reply.headers, reply.body)
            return
        with subscription:
            cursor = ServerCursor(self.lines, call.kinds, call.level, call.since)
            lines = cursor.replay(self.ctx)
            if isinstance(lines, GoneFrame):
                reply = error(
                    410,
                    f"revision {call.since} is not in the kept history; "
                    f"the oldest revision to resume from is {lines.oldest}",
                    oldest=lines.oldest,
                )
                await responder.send(reply.status, reply.headers, reply.body)
                return
            if not lines and call.wait > 0:
                collected: list[bytes] = lines  # filled by wait() (narrowed for the closure)

                async def wait() -> None:
                    with trio.move_on_after(call.wait):
                        await self._wait_for_lines(subscription, cursor, collected)

                if await self._guarded(responder, wait):
                    return
            body = events_body(cursor.caught_up(self.ctx), lines)
            await responder.send(200, JSON_HEADERS, body)

    async def _wait_for_lines(
        self, subscription: Subscription, cursor: ServerCursor, lines: list[bytes]
    ) -> None:
        """Receive live frames until one matches, then take whatever else is pending."""
        while not lines:
            try:
                frame = await subscription.receive()
            except Overflowed:
                more = cursor.replay(self.ctx)
                if not isinstance(more, GoneFrame):
                    lines.extend(more)
                return
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            if (line := cursor.take(frame)) is not None:
                lines.append(line)
        while True:
            try:
                frame = subscription.receive_nowait()
            except (trio.WouldBlock, Overflowed, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if (line := cursor.take(frame)) is not None:
                lines.append(line)
