"""The upstream request budget's trio shell: waiters sleep until :class:`BudgetCore` grants.

The rules (the window, the spacing, priorities and promotion) live in
:mod:`imdsd.upstream.budget_core`; :class:`BudgetCore` and :class:`Priority` are
importable from here too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from imdsd.upstream.budget_core import BudgetCore, Priority

__all__ = ["Budget", "BudgetCore", "Priority"]


class Budget:
    """The trio shell around :class:`BudgetCore`: ``async with budget.slot(priority):``."""

    def __init__(self, rate: float) -> None:
        self.core = BudgetCore(rate)
        self._events: dict[int, trio.Event] = {}

    @asynccontextmanager
    async def slot(self, priority: int = Priority.NORMAL) -> AsyncIterator[None]:
        """Wait for a request slot (the start is recorded on entry), then run the body."""
        await self.acquire(priority)
        yield

    async def acquire(self, priority: int = Priority.NORMAL) -> None:
        """Wait until this caller may start one request, and record the start."""
        core = self.core
        ticket = core.enqueue(priority, trio.current_time())
        granted = False
        try:
            while True:
                event = self._events[ticket] = trio.Event()
                now = trio.current_time()
                if core.grant(ticket, now):
                    granted = True
                    break
                if core.head(now) == ticket:
                    with trio.move_on_at(core.next_slot(now)):
                        await event.wait()
                else:
                    self._wake_head(now)  # the head may have changed by promotion
                    with trio.move_on_at(core.next_promotion(now)):
                        await event.wait()
        finally:
            if not granted:
                core.cancel(ticket)
            del self._events[ticket]
            self._wake_head(trio.current_time())
        await trio.lowlevel.checkpoint()

    def set_rate(self, rate: float) -> None:
        """Apply a new rate (a reload) without forgetting the starts of the last second."""
        self.core.set_rate(rate)
        self._wake_head(trio.current_time())

    def _wake_head(self, now: float) -> None:
        head = self.core.head(now)
        if head is not None:
            event = self._events.get(head)
            if event is not None:
                event.set()

    def in_use(self) -> int:
        """Requests started in the last second (for status and metrics)."""
        return self.core.in_use(trio.current_time())

    @property
    def rate(self) -> float:
        """The configured rate, requests per second."""
        return self.core.rate

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return self.core.waiting
