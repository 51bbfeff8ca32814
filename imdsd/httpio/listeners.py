"""Listening sockets for :class:`.server.HttpServer`: a unix socket, or one already listening."""

from __future__ import annotations

import contextlib
import os
import socket
import stat

import trio


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
