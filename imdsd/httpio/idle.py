"""Closing keep-alive connections left idle, with one sweeper instead of a timer per request."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio


class _Waiting:
    """One connection as :class:`IdleConnections` sees it: since when it waits, and its scope."""

    __slots__ = ("scope", "since")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.since: float | None = None


class IdleConnections:
    """Closes keep-alive connections that wait longer than ``timeout`` for their next request.

    A deadline scope per request would cost trio a deadline registered and removed each time
    (about a sixth of a cached read); instead a connection notes when it starts waiting and
    :meth:`run` sweeps every ``timeout / 4`` (at most 5 s), so an idle connection is closed
    between ``timeout`` and ``1.25 * timeout``. A request that arrives as its connection is
    swept is not run: the connection closes without an answer, as with any server's idle
    close (clients retry such requests on a fresh connection).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._entries: set[_Waiting] = set()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[_Waiting]:
        """Track one connection while the block runs; enter the entry's ``scope`` around it."""
        entry = _Waiting()
        self._entries.add(entry)
        try:
            yield entry
        finally:
            self._entries.discard(entry)

    def sweep(self, now: float) -> int:
        """Cancel the connections waiting since ``timeout`` or longer; how many there were."""
        closed = 0
        for entry in self._entries:
            since = entry.since
            if since is not None and now - since >= self.timeout and not entry.scope.cancel_called:
                entry.scope.cancel()
                closed += 1
        return closed

    async def run(self) -> None:
        """Sweep until cancelled."""
        period = min(max(self.timeout / 4, 0.01), 5.0)
        while True:
            await trio.sleep(period)
            self.sweep(trio.current_time())
