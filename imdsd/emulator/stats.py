"""Request statistics of the emulator (sans-IO): counts by path and status, peak requests/s.

Times are whatever monotonic clock the caller passes in (the server uses
``trio.current_time()``), so every figure is a pure function of the times given.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from typing import Any


def peak_in_window(times: Iterable[float], window: float = 1.0) -> int:
    """The largest number of ``times`` inside any half-open window ``(t - window, t]``."""
    ordered = sorted(times)
    peak = 0
    start = 0
    for end, now in enumerate(ordered):
        while ordered[start] <= now - window:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


class SlidingCount:
    """Counts events in the last ``window`` seconds; arrivals must come in time order."""

    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self._times: deque[float] = deque()

    def count(self, now: float) -> int:
        """How many recorded events lie in ``(now - window, now]``."""
        times = self._times
        while times and times[0] <= now - self.window:
            times.popleft()
        return len(times)

    def add(self, now: float) -> int:
        """Record one event at ``now``; returns the count in the window including it."""
        self.count(now)
        self._times.append(now)
        return len(self._times)


class Stats:
    """Counts of emulated IMDS requests: total, by path, by status, peak per second.

    A request is counted by path when it arrives (:meth:`arrived`) and by status when it is
    answered (:meth:`answered`); a connection reset fault counts under status ``"reset"``.
    """

    def __init__(self) -> None:
        self.total = 0
        self.by_path: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.by_path_status: dict[str, Counter[str]] = {}
        self.peak_rps = 0
        self._window = SlidingCount(1.0)

    def arrived(self, path: str, now: float) -> None:
        """Count one request for ``path`` arriving at ``now``."""
        self.total += 1
        self.by_path[path] += 1
        self.peak_rps = max(self.peak_rps, self._window.add(now))

    def answered(self, path: str, status: int | str) -> None:
        """Count the answer (an HTTP status, or ``"reset"``) given to a request for ``path``."""
        key = str(status)
        self.by_status[key] += 1
        self.by_path_status.setdefault(path, Counter())[key] += 1

    def as_dict(self) -> dict[str, Any]:
        """The statistics as a JSON-ready dict (GET /_emulator/stats)."""
        return {
            "total": self.total,
            "by_path": dict(self.by_path),
            "by_status": dict(self.by_status),
            "by_path_status": {path: dict(c) for path, c in self.by_path_status.items()},
            "peak_rps": self.peak_rps,
        }
