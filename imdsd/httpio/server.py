"""Accepting connections: :class:`HttpServer` caps how many are served and serves each one."""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

import structlog
import trio

from imdsd.httpio.connection import Handler, serve_connection
from imdsd.httpio.idle import IdleConnections
from imdsd.httpio.protocol import DEFAULT_SERVER_HEADER, ServerLimits

log = structlog.get_logger("imdsd.httpio")


class HttpServer:
    """Accepts connections on listeners and serves each with :func:`serve_connection`.

    Beyond ``max_connections`` open connections, a new one is answered ``503`` at once and
    closed (within :data:`.connection.REJECT_LINGER`). ``active`` counts the connections
    being served (never more than ``max_connections``), ``rejected`` those turned away.
    ``peer_info`` is called once per accepted stream; its result reaches the handler as
    ``request.peer``.
    """

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        *,
        max_connections: int = 2048,
        server_header: bytes = DEFAULT_SERVER_HEADER,
        peer_info: Callable[[trio.abc.Stream], Any] | None = None,
    ) -> None:
        self.handler = handler
        self.peer_info = peer_info
        self.limits = limits or ServerLimits()
        self.max_connections = max_connections
        self.server_header = server_header
        self.idle = IdleConnections(self.limits.idle_timeout)
        self.active = 0
        self.accepted = 0
        self.rejected = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted stream (idle connections are closed only while :meth:`serve` runs)."""
        self.accepted += 1
        if self.active >= self.max_connections:
            self.rejected += 1
            await serve_connection(
                stream,
                self.handler,
                self.limits,
                self.idle,
                server_header=self.server_header,
                reject_status=503,
            )
            return
        self.active += 1
        try:
            await serve_connection(
                stream,
                self.handler,
                self.limits,
                self.idle,
                server_header=self.server_header,
                peer=self.peer_info(stream) if self.peer_info else None,
            )
        finally:
            self.active -= 1

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until cancelled, then close them; ``started`` once accepting.

        Open connections are served until they end or the caller's scope is cancelled.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.idle.run)
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    log.warning("accept failed, pausing", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self.handle, stream)
