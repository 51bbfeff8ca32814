"""Tests for imdsd.broadcast: fan-out, overflow, closing, never blocking."""

from __future__ import annotations

import inspect

import pytest
import trio
import trio.testing

from imdsd.broadcast import Broadcaster, Overflowed, Subscription
from imdsd.frames import ChangeFrame


def frame(revision: int) -> ChangeFrame:
    return ChangeFrame(revision=revision, at="2024-01-01T00:00:00.000Z", changes=[])


async def collect(subscription: Subscription, count: int, into: list[int]) -> None:
    for _ in range(count):
        into.append((await subscription.receive()).revision)


async def test_many_subscribers_all_receive_every_frame_in_order() -> None:
    broadcaster = Broadcaster()
    received: list[list[int]] = [[] for _ in range(25)]
    async with trio.open_nursery() as nursery:
        for into in received:
            subscription = broadcaster.subscribe(max_pending=100)
            nursery.start_soon(collect, subscription, 60, into)
        await trio.testing.wait_all_tasks_blocked()
        assert broadcaster.subscribers == 25
        for revision in range(1, 31):
            broadcaster.publish(frame(revision))
            await trio.testing.wait_all_tasks_blocked()
        for revision in range(31, 61):  # a burst without yielding in between
            broadcaster.publish(frame(revision))
    assert received == [list(range(1, 61))] * 25
    assert broadcaster.published == 60


async def test_slow_subscriber_overflows_while_fast_ones_keep_up() -> None:
    broadcaster = Broadcaster()
    fast_received: list[int] = []
    slow = broadcaster.subscribe(max_pending=3)
    async with trio.open_nursery() as nursery:
        fast = broadcaster.subscribe(max_pending=3)
        nursery.start_soon(collect, fast, 10, fast_received)
        await trio.testing.wait_all_tasks_blocked()
        broadcaster.publish(frame(1))
        assert (await slow.receive()).revision == 1
        for revision in range(2, 5):
            broadcaster.publish(frame(revision))
            await trio.testing.wait_all_tasks_blocked()
        assert slow.pending == 3
        assert broadcaster.subscribers == 2
        broadcaster.publish(frame(5))  # a fourth pending frame is one too many for `slow`
        assert broadcaster.subscribers == 1
        assert slow.pending == 0, "an overflowed subscriber's frames are released at once"
        for revision in range(6, 11):
            broadcaster.publish(frame(revision))
            await trio.testing.wait_all_tasks_blocked()
    assert fast_received == list(range(1, 11))
    with pytest.raises(Overflowed) as info:
        await slow.receive()
    assert info.value.revision == 1
    assert "resume after revision 1" in str(info.value)
    with pytest.raises(Overflowed):
        slow.receive_nowait()
    assert broadcaster.overflows == 1


async def test_waiting_receiver_is_woken_by_overflow() -> None:
    broadcaster = Broadcaster()
    subscription = broadcaster.subscribe(max_pending=1, after=7)
    broadcaster.publish(frame(8))
    broadcaster.publish(frame(9))
    with pytest.raises(Overflowed) as info:
        await subscription.receive()
    assert info.value.revision == 7, "nothing delivered: resume from where it subscribed"


async def test_frames_up_to_after_are_skipped() -> None:
    broadcaster = Broadcaster()
    subscription = broadcaster.subscribe(max_pending=1, after=5)
    for revision in (4, 5, 6, 6):
        broadcaster.publish(frame(revision))
    assert subscription.pending == 1
    assert (await subscription.receive()).revision == 6
    assert subscription.revision == 6


async def test_advance_counts_frames_received_by_other_means() -> None:
    broadcaster = Broadcaster()
    subscription = broadcaster.subscribe(max_pending=4)
    assert subscription.advance(2)
    for revision in (1, 2):
        broadcaster.publish(frame(revision))
    assert subscription.pending == 0
    broadcaster.publish(frame(3))
    assert not subscription.advance(4)  # frame 3 is still pending: order is kept
    broadcaster.publish(frame(4))
    assert [(await subscription.receive()).revision for _ in range(2)] == [3, 4]
    assert subscription.advance(4)
    assert subscription.revision == 4


async def test_closed_subscriptions_are_removed() -> None:
    broadcaster = Broadcaster()
    with broadcaster.subscribe(max_pending=4) as subscription:
        broadcaster.publish(frame(1))
        assert broadcaster.subscribers == 1
    assert broadcaster.subscribers == 0
    assert subscription.pending == 0
    with pytest.raises(trio.ClosedResourceError):
        await subscription.receive()
    subscription.close()
    broadcaster.publish(frame(2))
    assert broadcaster.subscribers == 0


async def test_closing_wakes_a_waiting_receiver() -> None:
    broadcaster = Broadcaster()
    subscription = broadcaster.subscribe(max_pending=4)
    async with trio.open_nursery() as nursery:

        async def receive_expecting_close() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await subscription.receive()

        nursery.start_soon(receive_expecting_close)
        await trio.testing.wait_all_tasks_blocked()
        subscription.close()


def test_publish_is_synchronous_and_bounded() -> None:
    assert not inspect.iscoroutinefunction(Broadcaster.publish)
    broadcaster = Broadcaster()
    broadcaster.publish(frame(1))  # no subscribers, no trio run needed
    idle = broadcaster.subscribe(max_pending=10)
    for revision in range(2, 10_002):
        broadcaster.publish(frame(revision))
        assert idle.pending <= 10
    assert broadcaster.subscribers == 0
    assert broadcaster.published == 10_001
    with pytest.raises(Overflowed) as info:
        idle.receive_nowait()
    assert info.value.revision == 0


async def test_receive_waits_for_a_publish() -> None:
    broadcaster = Broadcaster()
    subscription = broadcaster.subscribe(max_pending=4)
    received: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, subscription, 1, received)
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        with pytest.raises(trio.WouldBlock):
            subscription.receive_nowait()
        broadcaster.publish(frame(1))
    assert received == [1]


async def test_cancelled_receive_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    broadcaster = Broadcaster()
    subscription = broadcaster.subscribe(max_pending=4)
    with trio.move_on_after(5) as scope:
        await subscription.receive()
    assert scope.cancelled_caught
    broadcaster.publish(frame(1))
    with trio.CancelScope() as cancelled:
        cancelled.cancel()
        await subscription.receive()
    assert subscription.pending == 1, "a receive cancelled before it starts takes nothing"
    assert (await subscription.receive()).revision == 1


async def test_closed_broadcaster_drains_then_ends() -> None:
    broadcaster = Broadcaster()
    draining = broadcaster.subscribe(max_pending=4)
    waiting = broadcaster.subscribe(max_pending=4)
    waited: list[int] = []

    async def receive_all() -> None:
        waited.extend([f.revision async for f in waiting])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_all)
        await trio.testing.wait_all_tasks_blocked()
        broadcaster.publish(frame(1))
        broadcaster.publish(frame(2))
        await trio.testing.wait_all_tasks_blocked()
        broadcaster.close()
    assert waited == [1, 2]
    assert broadcaster.closed
    assert [f.revision async for f in draining] == [1, 2]
    with pytest.raises(trio.EndOfChannel):
        await draining.receive()
    with pytest.raises(trio.ClosedResourceError):
        broadcaster.publish(frame(3))
    with pytest.raises(trio.ClosedResourceError):
        broadcaster.subscribe(max_pending=4)


def test_max_pending_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pending must be >= 1, got 0"):
        Broadcaster().subscribe(max_pending=0)
