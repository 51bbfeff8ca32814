"""The watch protocol between its two sans-IO halves, in memory: the server's
:class:`~imdsd.api.cursor.ServerCursor` (what each stream writes) and the client's
:class:`~imdsd.client.WatchCursor` (what the consumer sees and where it resumes).

The property: over any sequence of published revisions (with changes of the watched kinds,
of other kinds, or none), frames queued or written at publish time, heartbeats, overflows,
shutdowns, lost lines, disconnects and reconnects with ``since``, the consumer sees every
matching change exactly once and in order, or a ``gone`` followed by a fresh state.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_api_support import FakeContext, full_snapshot

from imdsd.api.access import AccessPolicy
from imdsd.api.cursor import Opening, ServerCursor, open_stream
from imdsd.api.lines import FrameLines
from imdsd.api.metrics import Metrics
from imdsd.api.routes import Router, WatchCall
from imdsd.client import WatchCursor
from imdsd.frames import (
    BookmarkFrame,
    ChangeFrame,
    Frame,
    GoneFrame,
    OverflowFrame,
    StateFrame,
    only_kinds,
)

POLICY = AccessPolicy([], [0], [])


# ------------------------------------------------------------------ publishing revisions


def publish(ctx: FakeContext, kind: str, n: int) -> ChangeFrame | None:
    """A new revision: a tag change, a compute change, or one without a change frame."""
    snapshot = ctx.snapshot
    assert snapshot is not None
    assert snapshot.instance_raw is not None
    if kind == "quiet":
        assert snapshot.loadbalancer_raw is not None
        lb = {**snapshot.loadbalancer_raw, "futureField": n}
        ctx.clock += 1
        before = ctx.revision
        assert ctx.store.apply(snapshot.with_loadbalancer(lb), ctx.clock, new_content=True) is None
        assert ctx.revision == before + 1
        return None
    doc = copy.deepcopy(snapshot.instance_raw)
    if kind == "tags":
        doc["compute"]["tags"] = f"n:{n}"
    else:
        doc["compute"]["vmSize"] = f"Standard_D{n}"
    frame = ctx.apply(snapshot.with_instance(doc))
    assert frame is not None
    assert {change.kind for change in frame.changes} == {kind}
    return frame


# ------------------------------------------------------------------ one stream, as run


@dataclass
class Stream:
    """One connection: the server cursor, its subscription's queue, and lines in flight."""

    cursor: ServerCursor
    received: int  # the subscription's revision: the last frame taken from it
    max_pending: int
    queue: collections.deque[ChangeFrame] = field(default_factory=collections.deque)
    held: ChangeFrame | None = None  # taken from the queue, not yet given to the cursor
    overflowed: bool = False
    ended: bool = False
    in_flight: list[bytes] = field(default_factory=list)

    def offer(self, frame: ChangeFrame, *, parked: bool, partial: bool) -> None:
        """A published frame: written at once to a parked stream when the cursor allows,
        else queued (and the subscription overflows past ``max_pending``).

        A ``partial`` write at once leaves the rest of the line to the task (which writes it
        before anything else) and the frame in the queue too, as the subscription is not
        advanced: the task must skip it there.
        """
        if self.ended or self.overflowed:
            return
        line = self.cursor.take_now(frame, len(self.queue), self.received) if parked else None
        if line is not None:
            if line:
                self.in_flight.append(line)
            if not line or not partial:
                self.received = max(self.received, frame.revision)  # Subscription.advance
                return
        if len(self.queue) >= self.max_pending:
            self.overflowed = True
            self.queue.clear()
            return
        self.queue.append(frame)

    def receive(self) -> None:
        """The stream's task takes its next frame (or learns it overflowed), or writes the
        one it took: a frame published in between finds it taken and not yet written."""
        if self.ended:
            return
        if self.held is not None:
            line = self.cursor.take(self.held)
            if line is not None:
                self.in_flight.append(line)
            self.held = None
        elif self.overflowed:
            self.in_flight.append(self.cursor.overflow())
            self.ended = True
            return
        elif self.queue:
            self.held = self.queue.popleft()
            self.received = self.held.revision

    def heartbeat(self, ctx: FakeContext, *, stop: bool) -> None:
        """A bookmark; ``stop``: the daemon is stopping (everything received first)."""
        if self.ended or self.overflowed or self.held or (stop and self.queue):
            return
        self.in_flight.append(self.cursor.bookmark(ctx, len(self.queue)))
        self.ended = stop


# ------------------------------------------------------------------ the consumer's view


@dataclass
class Consumer:
    """The client cursor and what reached the consumer, checked as it arrives."""

    cursor: WatchCursor
    kinds: frozenset[str] | None
    published: list[ChangeFrame]
    seen: int | None = None  # revision of the last state or change the consumer got
    after_gone: bool = False
    states: int = 0
    changes: int = 0
    kinds_of_frames: collections.Counter[str] = field(default_factory=collections.Counter)

    def read(self, line: bytes) -> None:
        frame = self.cursor.decode(line)
        assert frame is not None
        self.kinds_of_frames[type(frame).__name__.removesuffix("Frame").lower()] += 1
        shown = self.cursor.accept(frame)
        assert shown == isinstance(frame, StateFrame | ChangeFrame)
        self.check(frame)

    def check(self, frame: Frame) -> None:
        if isinstance(frame, GoneFrame):
            self.after_gone = True
        elif isinstance(frame, StateFrame):
            assert self.seen is None or self.after_gone, "a state frame without a gone"
            assert self.seen is None or frame.revision >= self.seen
            assert frame.state["revision"] == frame.revision
            self.seen, self.after_gone = frame.revision, False
            self.states += 1
        elif isinstance(frame, ChangeFrame):
            assert not self.after_gone, "a change between gone and the fresh state"
            assert self.seen is not None, "a change before any state or resume point"
            expected = self.next_matching(self.seen)
            assert expected is not None, f"change {frame.revision} was never published"
            assert frame.revision == expected.revision, "a matching change was skipped"
            assert frame.changes == expected.changes
            self.seen = frame.revision
            self.changes += 1
        elif isinstance(frame, BookmarkFrame | OverflowFrame):
            assert self.seen is None or frame.revision >= self.seen

    def next_matching(self, after: int) -> ChangeFrame | None:
        for frame in self.published:
            if frame.revision > after:
                kept = only_kinds(frame, self.kinds)
                if kept is not None:
                    return kept
        return None


# ------------------------------------------------------------------ the world


class World:
    """A daemon's history and router, one client, and its current stream (if any)."""

    def __init__(
        self, history: int, max_pending: int, since: int | None, kinds: list[str] | None
    ) -> None:
        self.ctx = FakeContext(history=history)
        first = self.ctx.apply(full_snapshot())
        self.router = Router(self.ctx, POLICY, Metrics())
        self.lines = FrameLines(POLICY)
        self.max_pending = max_pending
        self.published: list[ChangeFrame] = [] if first is None else [first]
        client = WatchCursor(since, kinds)
        self.consumer = Consumer(client, frozenset(kinds) if kinds else None, self.published)
        if since is not None:
            self.consumer.seen = since  # the consumer saw up to ``since`` before
        self.stream: Stream | None = None
        self.count = 0

    def connect(self) -> None:
        call = self.router.route_target("GET", self.consumer.cursor.target())
        assert isinstance(call, WatchCall), call
        after = self.ctx.revision if call.since is None else call.since
        opening = open_stream(call, self.lines, self.ctx, self.router.state_line)
        assert isinstance(opening, Opening)
        if opening.cursor is None:
            assert [type(f) for f in map(self.consumer.cursor.decode, opening.first)] == [GoneFrame]
            cursor = ServerCursor(self.lines, call.kinds, call.level, after)  # ends unused
        else:
            cursor = opening.cursor
        self.stream = Stream(cursor, after, self.max_pending, in_flight=list(opening.first))
        self.stream.ended = opening.cursor is None

    def step(self, op: str, flag: bool, partial: bool) -> None:
        stream = self.stream
        if op in ("tags", "compute", "quiet"):
            self.count += 1
            frame = publish(self.ctx, op, self.count)
            if frame is not None:
                self.published.append(frame)
                if stream is not None:
                    stream.offer(frame, parked=flag, partial=partial)
        elif op == "connect":
            if stream is None:
                self.connect()
        elif stream is None:
            return
        elif op == "receive":
            stream.receive()
        elif op == "heartbeat":
            stream.heartbeat(self.ctx, stop=flag)
        elif op == "read":
            self.read(stream)
        elif op == "drop":  # the peer leaves; lines in flight are lost (flag: read first)
            if flag:
                self.read(stream)
            self.stream = None

    def read(self, stream: Stream) -> None:
        lines, stream.in_flight = stream.in_flight, []
        for line in lines:
            self.consumer.read(line)
        if stream.ended:
            self.stream = None

    def settle(self) -> None:
        """Reconnect and read until the stream is idle: the consumer must be caught up."""
        for _ in range(5):
            if self.stream is None:
                self.connect()
            stream = self.stream
            assert stream is not None
            while not stream.ended and (stream.queue or stream.overflowed or stream.held):
                stream.receive()
            self.read(stream)
            if self.stream is not None:
                break
        assert self.stream is not None, "the client never caught up"
        assert self.consumer.seen is not None
        assert self.consumer.next_matching(self.consumer.seen) is None, "a change never arrived"


OPS = st.sampled_from(
    [
        *("tags", "tags", "compute", "quiet"),  # publish a revision
        *("connect", "receive", "receive", "heartbeat", "read", "read", "drop"),
    ]
)
KIND_CHOICES = st.sampled_from([None, ["tags"], ["compute"], ["tags", "compute"], ["disks"]])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.integers(1, 6),
    max_pending=st.integers(1, 3),
    since=st.sampled_from([None, None, 0, 1]),
    kinds=KIND_CHOICES,
    ops=st.lists(st.tuples(OPS, st.booleans(), st.booleans()), min_size=5, max_size=80),
)
def test_every_matching_change_once_in_order_or_gone_then_state(
    history: int,
    max_pending: int,
    since: int | None,
    kinds: list[str] | None,
    ops: list[tuple[str, bool, bool]],
) -> None:
    world = World(history, max_pending, since, kinds)
    world.connect()
    for op, flag, partial in ops:
        world.step(op, flag, partial)
    world.settle()
    consumer = world.consumer
    assert consumer.states >= (since is None)
    event(f"changes seen: {min(consumer.changes, 3)}+")
    event(f"states seen: {min(consumer.states, 3)}+")
    for kind in ("gone", "overflow", "bookmark"):
        if consumer.kinds_of_frames[kind]:
            event(f"{kind} frames")


def test_an_overflowed_stream_resumes_where_it_stopped() -> None:
    world = World(history=10, max_pending=1, since=None, kinds=None)
    world.connect()
    world.step("read", flag=False, partial=False)
    for _ in range(3):
        world.step("tags", flag=False, partial=False)  # the watcher is busy: queued
    stream = world.stream
    assert stream is not None
    assert stream.overflowed
    world.step("receive", flag=False, partial=False)
    world.step("read", flag=False, partial=False)
    assert world.stream is None
    assert world.consumer.kinds_of_frames["overflow"] == 1
    assert world.consumer.cursor.since == 1  # the state's revision: nothing was written
    world.settle()
    assert (world.consumer.states, world.consumer.changes) == (1, 3)


def test_a_resume_past_the_kept_history_is_gone_then_a_fresh_state() -> None:
    world = World(history=1, max_pending=4, since=None, kinds=["tags"])
    world.connect()
    world.step("drop", flag=True, partial=False)  # read the state, then leave
    for kind in ("tags", "compute", "tags"):
        world.step(kind, flag=False, partial=False)
    world.settle()
    assert world.consumer.kinds_of_frames["gone"] == 1
    assert (world.consumer.states, world.consumer.changes) == (2, 0)
    assert world.consumer.seen == world.ctx.revision
