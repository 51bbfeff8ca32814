"""Fair waiting for upstream capacity (sans-IO): a per-caller fair queue and identity limits.

:class:`FairQueue` orders waiting forwarded requests so that every caller gets its turn:
callers take turns round-robin, each caller's own requests go first-come first-served, so
one agent flooding IMDS paths delays itself, not the others. Only the head of the queue
competes for capacity (imdsd's request budget, or :class:`IdentityLimits`).

:class:`IdentityLimits` keeps forwarded managed-identity requests within IMDS's limits for
that category: at most ``rate`` (20) starts in any 1-second window (with a small margin, as
the budget does) and at most ``concurrency`` (5) requests in flight.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Hashable

WINDOW = 1.0
MARGIN = 0.05


class FairQueue:
    """Waiting requests by caller, served round-robin across callers."""

    def __init__(self) -> None:
        self._seq = itertools.count()
        self._callers: OrderedDict[Hashable, deque[int]] = OrderedDict()
        self._owner: dict[int, Hashable] = {}

    def enqueue(self, caller: Hashable) -> int:
        """Add one request of ``caller``; returns its ticket."""
        ticket = next(self._seq)
        self._callers.setdefault(caller, deque()).append(ticket)
        self._owner[ticket] = caller
        return ticket

    def head(self) -> int | None:
        """The ticket whose turn it is, or None when nobody waits."""
        for tickets in self._callers.values():
            return tickets[0]
        return None

    def remove(self, ticket: int) -> None:
        """Take ``ticket`` out (served or given up); its caller moves to the back of the line."""
        caller = self._owner.pop(ticket, None)
        if caller is None:
            return
        tickets = self._callers[caller]
        served = tickets[0] == ticket
        tickets.remove(ticket)
        if not tickets:
            del self._callers[caller]
        elif served:
            self._callers.move_to_end(caller)

    def waiting(self, caller: Hashable | None = None) -> int:
        """How many requests wait (of ``caller`` only, when given)."""
        if caller is None:
            return len(self._owner)
        return len(self._callers.get(caller, ()))

    def __len__(self) -> int:
        return len(self._owner)


class IdentityLimits:
    """IMDS's managed-identity limits: ``rate`` starts per second, ``concurrency`` in flight."""

    def __init__(self, rate: int = 20, concurrency: int = 5, *, margin: float = MARGIN) -> None:
        if rate < 1 or concurrency < 1:
            raise ValueError("identity rate and concurrency must be at least 1")
        self.rate = rate
        self.concurrency = concurrency
        self.margin = margin
        self.active = 0
        self._starts: deque[float] = deque(maxlen=rate)

    def next_start(self, now: float) -> float:
        """When the next request may start by the rate rule (``inf``: wait for a finish)."""
        if self.active >= self.concurrency:
            return math.inf
        if len(self._starts) == self.rate:
            return max(now, self._starts[0] + WINDOW + self.margin)
        return now

    def try_start(self, now: float) -> bool:
        """Start one request at ``now`` if both limits allow it."""
        if self.next_start(now) > now:
            return False
        self._starts.append(now)
        self.active += 1
        return True

    def finish(self) -> None:
        """One started request is done."""
        if self.active <= 0:
            raise ValueError("finish() without a started request")
        self.active -= 1
