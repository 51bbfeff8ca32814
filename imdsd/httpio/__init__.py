"""The one trio <-> h11 adapter, shared by the emulator, the socket server and the IMDS client.

- :mod:`.errors`: :class:`HttpIOError` and its subclasses; trio and h11 errors are mapped to
  them at this boundary, and a peer resetting the connection never escapes a connection's task.
- :mod:`.messages`: :class:`Request` and :class:`Response` (sans-IO).
- :mod:`.protocol`: :class:`ServerProtocol`, one server connection's HTTP/1.1 without I/O
  (limits, HEAD, 304, error responses, keep-alive), and :class:`ServerLimits`.
- :mod:`.transport`: a trio stream's bytes in and out, every write under a deadline.
- :mod:`.connection`: :func:`serve_connection` and :class:`Responder`, the trio shell of one
  connection; :mod:`.idle`: :class:`IdleConnections`, one sweeper for idle keep-alives.
- :mod:`.server`: :class:`HttpServer`, accepting on listeners with ``max_connections``;
  :mod:`.listeners`: :func:`unix_listener`, :func:`listener_from_socket`.
- :mod:`.client`: :class:`ClientConnection`, :func:`open_tcp`, :func:`open_unix`.
"""

from __future__ import annotations

from imdsd.httpio.client import MAX_INFORMATIONAL, ClientConnection, open_tcp, open_unix
from imdsd.httpio.connection import REJECT_LINGER, Handler, Responder, serve_connection
from imdsd.httpio.errors import (
    BodyTooLarge,
    ConnectFailed,
    Deadline,
    HttpIOError,
    PeerClosed,
    ProtocolViolation,
    error_status,
)
from imdsd.httpio.idle import IdleConnections
from imdsd.httpio.listeners import listener_from_socket, unix_listener
from imdsd.httpio.messages import (
    Headers,
    Request,
    Response,
    find_header,
    http_date,
    json_error,
    origin_form,
)
from imdsd.httpio.protocol import NEED_DATA, ServerLimits, ServerProtocol
from imdsd.httpio.server import HttpServer
from imdsd.httpio.transport import RECV_SIZE, Transport

__all__ = [
    "MAX_INFORMATIONAL",
    "NEED_DATA",
    "RECV_SIZE",
    "REJECT_LINGER",
    "BodyTooLarge",
    "ClientConnection",
    "ConnectFailed",
    "Deadline",
    "Handler",
    "Headers",
    "HttpIOError",
    "HttpServer",
    "IdleConnections",
    "PeerClosed",
    "ProtocolViolation",
    "Request",
    "Responder",
    "Response",
    "ServerLimits",
    "ServerProtocol",
    "Transport",
    "error_status",
    "find_header",
    "http_date",
    "json_error",
    "listener_from_socket",
    "open_tcp",
    "open_unix",
    "origin_form",
    "serve_connection",
    "unix_listener",
]
