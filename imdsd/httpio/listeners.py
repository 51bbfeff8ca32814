"""Listening sockets for :class:`.server.HttpServer`, and serving on them.

A unix socket (:func:`unix_listener`), a ``HOST:PORT`` setting (:func:`open_tcp_setting`), or
sockets already listening, inherited from systemd (:func:`adopt`). :class:`HttpService` is the
``serve`` every server of the daemon shares. Failures raise :class:`ListenError`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from imdsd.httpio.server import HttpServer


class ListenError(Exception):
    """A listening socket could not be set up; the message names the setting and the cause."""


def unix_listener(
    path: str, mode: int | None = None, *, backlog: int = 1024
) -> trio.SocketListener:
    """Bind a unix stream socket at ``path`` (removing a stale socket file) and listen."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def listener_from_socket(sock: socket.socket) -> trio.SocketListener:
    """Wrap an already listening stdlib socket (e.g. inherited from systemd)."""
    sock.setblocking(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def adopt(sockets: Sequence[socket.socket]) -> list[trio.SocketListener]:
    """Wrap inherited listening stream sockets (systemd socket activation)."""
    listeners = []
    for sock in sockets:
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as exc:
            raise ListenError(f"inherited fd {sock.fileno()} is not usable: {exc}") from None
        if sock.type != socket.SOCK_STREAM or not listening:
            raise ListenError(f"inherited fd {sock.fileno()} is not a listening stream socket")
        listeners.append(listener_from_socket(sock))
    return listeners


def split_address(listen: str) -> tuple[str, int]:
    """``("127.0.0.1", 9469)`` for ``"127.0.0.1:9469"``; brackets dropped from ``[::1]:9469``."""
    host, _, port = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


async def open_tcp_setting(
    setting: str, listen: str, inherited: Sequence[socket.socket] = ()
) -> list[trio.SocketListener]:
    """The ``inherited`` sockets if any, else ``listen`` (``HOST:PORT``) bound; ``""``: none.

    Raises :class:`ListenError` with a one-line message naming ``setting`` (e.g.
    ``"metrics.listen"``).
    """
    if inherited:
        return adopt(inherited)
    if not listen:
        return []
    host, port = split_address(listen)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ListenError(f"{setting}: cannot listen on {listen}: {reason}") from None


def addresses(listeners: Sequence[trio.SocketListener]) -> list[str]:
    """``host:port`` (or the path) of each listener, for the log and status."""
    out = []
    for listener in listeners:
        name = listener.socket.getsockname()
        if listener.socket.family == socket.AF_INET6:
            out.append(f"[{name[0]}]:{name[1]}")
        elif isinstance(name, tuple):
            out.append(f"{name[0]}:{name[1]}")
        else:
            out.append(str(name))
    return out


class HttpService:
    """A server whose connections the :class:`HttpServer` at ``self.http`` serves.

    ``listening`` names the listeners (:func:`addresses`) once :meth:`serve` runs.
    """

    http: HttpServer
    listening: Sequence[str] = ()

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; ``started`` once accepting (use with ``nursery.start``)."""
        self.listening = addresses(listeners)
        await self.http.serve(listeners, task_status=task_status)
