"""The upstream request budget's sans-IO core: a sliding-window limit with priority.

Guarantee, for a rate ``N`` (``imds.max_requests_per_second``, 0 < N <= 4, may be fractional):

1. any 1-second window, closed at both ends, holds at most ``C = max(1, floor(N))`` request
   starts, so never more than ``N`` when ``N >= 1``: each start waits until the ``C``-th
   previous start is more than 1 s old, by ``margin`` (50 ms). The margin makes windows that
   align exactly on two starts count ``C``, and absorbs the jitter between our start and the
   server's arrival time (IMDS counts arrivals): with a 1 ms margin the emulator, sharing our
   event loop in real time, saw 3 arrivals in one window for ``N = 2``; with 50 ms it sees 2.
   The price is a long-run rate of ``C / (1 + margin)`` (1.9/s for ``N = 2``);
2. consecutive starts are at least ``1/N`` seconds apart, so requests are spread evenly and
   never burst (for ``N < 1`` this is the whole rule: one request per ``1/N`` seconds).

A spacing of ``1/N`` alone would allow ``ceil(N)`` starts in a half-open window and ``N+1``
in a closed one (starts at 0, 0.5 and 1.0 for ``N = 2``), and a log of start times alone
allows bursts of ``C`` back-to-back requests; together they give both properties.

A new rate (a reload) keeps the start log: :meth:`BudgetCore.set_rate` applies the new
rules to the starts already made, so no window spanning a reload holds more than the larger
of the two budgets (a fresh budget would have allowed the old rate plus the new one).

Waiters are granted in priority order (lower value first, FIFO within a priority), so
scheduled events go before the instance document, which goes before the load balancer; a
waiter that has waited ``PROMOTE_AFTER`` (3 s) is promoted to urgent, so nobody starves when
the pollers together want more than the budget.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from enum import IntEnum

WINDOW = 1.0
MARGIN = 0.05
PROMOTE_AFTER = 3.0


class Priority(IntEnum):
    """Who goes first when requests compete for the budget (lower first)."""

    URGENT = 0
    NORMAL = 1
    LOW = 2


class BudgetCore:
    """Sans-IO budget: start log, spacing rule and the priority queue of waiters.

    A waiter that has waited ``promote_after`` seconds counts as :attr:`Priority.URGENT`
    (first come, first served among urgent ones), so a busy high-priority poller can delay
    the others but never starve them.
    """

    def __init__(
        self, rate: float, *, margin: float = MARGIN, promote_after: float = PROMOTE_AFTER
    ) -> None:
        self.margin = margin
        self.promote_after = promote_after
        self._starts: deque[float] = deque()
        self.set_rate(rate)
        self._seq = itertools.count()
        self._waiting: dict[int, tuple[int, float]] = {}
        self.granted = 0

    def set_rate(self, rate: float) -> None:
        """Change the rate, keeping the log of recent starts (the window carries over)."""
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"request rate must be a positive number, got {rate!r}")
        self.rate = rate
        self.spacing = 1.0 / rate
        self.per_window = max(1, math.floor(rate))
        self._starts = deque(self._starts, maxlen=self.per_window)

    def next_slot(self, now: float) -> float:
        """The earliest time, not before ``now``, at which the next request may start."""
        slot = now
        if self._starts:
            slot = max(slot, self._starts[-1] + self.spacing)
            if len(self._starts) == self.per_window:
                slot = max(slot, self._starts[0] + WINDOW + self.margin)
        return slot

    def commit(self, now: float) -> None:
        """Record a request start at ``now``; it must not be earlier than :meth:`next_slot`."""
        if now < self.next_slot(now):
            raise ValueError(
                f"request start at {now} is before the next slot {self.next_slot(now)}"
            )
        self._starts.append(now)
        self.granted += 1

    def in_use(self, now: float) -> int:
        """Requests started in the last second, ``(now - 1, now]``."""
        return sum(1 for start in self._starts if now - WINDOW < start <= now)

    def enqueue(self, priority: int, now: float) -> int:
        """Add a waiter arriving at ``now``; returns its ticket."""
        ticket = next(self._seq)
        self._waiting[ticket] = (priority, now)
        return ticket

    def head(self, now: float) -> int | None:
        """The ticket to be served next at ``now``, or None when nobody waits."""
        best: tuple[int, int] | None = None
        for ticket, (priority, since) in self._waiting.items():
            promoted = now - since >= self.promote_after
            key = (Priority.URGENT if promoted else priority, ticket)
            if best is None or key < best:
                best = key
        return None if best is None else best[1]

    def next_promotion(self, now: float) -> float:
        """When the next waiter gets promoted (``inf`` when none will)."""
        times = [
            since + self.promote_after
            for priority, since in self._waiting.values()
            if priority > Priority.URGENT and since + self.promote_after > now
        ]
        return min(times, default=math.inf)

    def grant(self, ticket: int, now: float) -> bool:
        """Give ``ticket`` its slot at ``now`` if it is first in line and the slot is due."""
        if self.head(now) != ticket or self.next_slot(now) > now:
            return False
        del self._waiting[ticket]
        self.commit(now)
        return True

    def cancel(self, ticket: int) -> None:
        """Remove a waiter that gave up (cancelled) without a slot."""
        self._waiting.pop(ticket, None)

    @property
    def waiting(self) -> int:
        """How many requests wait for a slot."""
        return len(self._waiting)
