"""In-process fan-out of change frames to watchers and the hook dispatcher (trio).

``publish`` is synchronous and O(1) per subscriber: it appends the frame to each
subscription's bounded queue and wakes its receiver. A subscription that would hold more
than ``max_pending`` frames is overflowed: its queue is dropped, it is unsubscribed, and its
next ``receive`` raises :class:`Overflowed` naming the revision to resume from. Nothing is
dropped silently.
"""

from __future__ import annotations

import collections
from types import TracebackType

import trio

from imdsd.frames import ChangeFrame


class Overflowed(Exception):
    """The subscriber fell more than ``max_pending`` frames behind; resume after ``revision``."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"subscriber fell behind; resume after revision {revision}")
        self.revision = revision


class Subscription:
    """One subscriber's queue of frames; use as a context manager or call :meth:`close`."""

    def __init__(self, broadcaster: Broadcaster, max_pending: int, after: int) -> None:
        self._broadcaster = broadcaster
        self._max_pending = max_pending
        self._pending: collections.deque[ChangeFrame] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._last = after
        self._overflowed = False
        self._closed = False

    @property
    def revision(self) -> int:
        """The revision of the last frame received (or ``after`` if none yet)."""
        return self._last

    @property
    def pending(self) -> int:
        """Number of frames waiting to be received."""
        return len(self._pending)

    def advance(self, revision: int) -> bool:
        """Count frames up to ``revision`` as received by other means (a direct write).

        Only when nothing is pending: frames are received in order. Publishing such a frame
        then neither queues it nor wakes the receiver. True when advanced.
        """
        if self._pending or self._closed or self._overflowed:
            return False
        self._last = max(self._last, revision)
        return True

    def receive_nowait(self) -> ChangeFrame:
        """Return the next pending frame without waiting.

        Raises :class:`Overflowed` if this subscriber overflowed, ``trio.EndOfChannel`` when
        the broadcaster is closed and everything was received, ``trio.ClosedResourceError``
        after :meth:`close`, and ``trio.WouldBlock`` when nothing is pending.
        """
        if self._closed:
            raise trio.ClosedResourceError("subscription is closed")
        if self._overflowed:
            raise Overflowed(self._last)
        if self._pending:
            frame = self._pending.popleft()
            self._last = frame.revision
            return frame
        if self._broadcaster.closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> ChangeFrame:
        """Wait for and return the next frame (errors as for :meth:`receive_nowait`)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                frame = self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return frame

    def close(self) -> None:
        """Unsubscribe and drop pending frames; a waiting ``receive`` gets ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._broadcaster._discard(self)
        self._lot.unpark_all()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ChangeFrame:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _offer(self, frame: ChangeFrame) -> bool:
        """Queue ``frame``; False (and overflowed) if that would exceed ``max_pending``."""
        newest = self._pending[-1].revision if self._pending else self._last
        if frame.revision <= newest:
            return True
        if len(self._pending) >= self._max_pending:
            self._overflowed = True
            self._pending.clear()
            self._lot.unpark_all()
            return False
        self._pending.append(frame)
        self._lot.unpark_all()
        return True

    def _wake(self) -> None:
        self._lot.unpark_all()


class Broadcaster:
    """Fans each published change frame out to every live subscription."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self._closed = False
        self.published = 0
        self.overflows = 0

    @property
    def subscribers(self) -> int:
        """Number of live subscriptions (for metrics)."""
        return len(self._subscriptions)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def subscribe(self, max_pending: int, after: int = 0) -> Subscription:
        """A new subscription receiving frames published from now on with revision > ``after``.

        ``after`` is also the resume revision reported by :class:`Overflowed` when the
        subscriber overflows before receiving anything.
        """
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if self._closed:
            raise trio.ClosedResourceError("broadcaster is closed")
        subscription = Subscription(self, max_pending, after)
        self._subscriptions.add(subscription)
        return subscription

    def publish(self, frame: ChangeFrame) -> None:
        """Queue ``frame`` for every subscriber; never blocks, overflows laggards."""
        if self._closed:
            raise trio.ClosedResourceError("broadcaster is closed")
        self.published += 1
        overflowed = [s for s in self._subscriptions if not s._offer(frame)]
        for subscription in overflowed:
            self._subscriptions.discard(subscription)
        self.overflows += len(overflowed)

    def close(self) -> None:
        """Stop publishing: receivers drain what is pending, then get ``trio.EndOfChannel``."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription._wake()

    def _discard(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
