"""api-version negotiation glue: the :class:`VersionBook`'s decisions, with the probe sent.

The rules are in :mod:`imdsd.upstream.versions`; this sends the ``/metadata/versions`` probe
whenever the book needs it (one probe at a time, by whichever request needs it first) and
logs each refused version the book moves an endpoint away from.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
import trio

from imdsd.model import DocumentError, decode_versions
from imdsd.upstream.budget_core import Priority
from imdsd.upstream.errors import TransportError
from imdsd.upstream.sender import Sender
from imdsd.upstream.versions import VERSIONS_PATH, Endpoint, VersionBook

log = structlog.get_logger("imdsd.upstream")


class Negotiator:
    """Picks the api-version of each request from ``book``, probing through ``sender``."""

    def __init__(self, book: VersionBook, sender: Sender) -> None:
        self.book = book
        self.sender = sender
        self._probe_lock = trio.Lock()

    async def version_for(self, endpoint: Endpoint, priority: int) -> str:
        """The api-version for ``endpoint``, probing first if needed; may raise NoCommonVersion."""
        while True:
            if self.book.needs_probe:
                async with self._probe_lock:
                    if self.book.needs_probe:
                        self.book.learn(await self.probe(priority))
            version = self.book.version_for(endpoint)
            if version is not None:
                return version

    def refused(self, endpoint: Endpoint, version: str, offered: Sequence[str]) -> bool:
        """``version`` was refused offering ``offered``: True (logged) when another is to be
        tried, False when nothing better is left."""
        if not self.book.rejected(endpoint, version, offered):
            return False
        log.info(
            "api-version refused, renegotiating",
            endpoint=endpoint,
            refused=version,
            offered=list(offered),
        )
        return True

    async def probe(self, priority: int = Priority.NORMAL) -> list[str] | None:
        """One request for ``/metadata/versions``; None (logged) when it fails."""
        try:
            response = await self.sender.send(
                "GET", VERSIONS_PATH, None, b"", priority=priority, timeout=None, lane="versions"
            )
        except TransportError as exc:
            log.warning("api-version probe failed", error=str(exc))
            return None
        if response.status != 200:
            log.warning("api-version probe failed", status=response.status)
            return None
        try:
            available = decode_versions(response.body).api_versions
        except DocumentError as exc:
            log.warning("api-version probe failed", error=str(exc))
            return None
        log.info("api-versions learned", newest=max(available, default=None))
        return available
