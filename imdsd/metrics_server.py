"""The optional TCP listener for Prometheus: ``GET /metrics`` (and ``HEAD``), nothing else.

``[metrics] listen = "HOST:PORT"`` binds it (:func:`open_metrics_listeners`), or systemd
passes a socket named ``metrics`` (``FileDescriptorName=metrics``, socket activation). It
serves the same text as the unix socket's ``/metrics`` through the project's one HTTP
adapter, :class:`imdsd.httpio.HttpServer`: any other path is 404, any other method 405.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Final

import msgspec
import trio

from imdsd.api.metrics import CONTENT_TYPE, Metrics
from imdsd.httpio import HttpServer, Request, Responder, ServerLimits
from imdsd.httpio.listeners import HttpService, open_tcp_setting

FD_NAME: Final = "metrics"
PATH: Final = "/metrics"
MAX_CONNECTIONS: Final = 64
LIMITS: Final = ServerLimits(
    max_head=8192, max_body=0, idle_timeout=60.0, request_timeout=10.0, drain_timeout=1.0
)
_JSON: Final = b"application/json"
_ALLOW: Final = (b"allow", b"GET, HEAD")


async def open_metrics_listeners(
    listen: str, inherited: Sequence[socket.socket] = ()
) -> list[trio.SocketListener]:
    """The inherited ``metrics`` sockets if any, else ``listen`` bound (``""``: none).

    Raises :class:`imdsd.httpio.listeners.ListenError` with a one-line message.
    """
    return await open_tcp_setting("metrics.listen", listen, inherited)


def _error(message: str) -> bytes:
    return msgspec.json.encode({"error": message})


class MetricsServer(HttpService):
    """Answers Prometheus scrapes with ``metrics.render()``."""

    def __init__(self, metrics: Metrics, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.metrics = metrics
        self.http = HttpServer(self.handle, LIMITS, max_connections=max_connections)

    async def handle(self, request: Request, responder: Responder) -> None:
        """One request: the metrics text, or a JSON error."""
        if request.path != PATH:
            await responder.send(404, [(b"content-type", _JSON)], _error("only /metrics here"))
        elif request.method not in ("GET", "HEAD"):
            body = _error(f"{request.method} is not allowed on /metrics")
            await responder.send(405, [(b"content-type", _JSON), _ALLOW], body)
        else:
            await responder.send(200, [(b"content-type", CONTENT_TYPE)], self.metrics.render())
