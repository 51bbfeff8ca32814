"""imdsd's own connections to IMDS carry a firewall mark so the redirect never catches them.

The nftables redirect (:mod:`imdsd.redirect`) sends local TCP to ``169.254.169.254:80`` to the
front. imdsd's upstream sockets get ``SO_MARK`` :data:`UPSTREAM_MARK` before they connect, and
the redirect's first rule lets packets of sockets with that mark through untouched: it
matches the socket's mark (``socket mark``), which other nftables rules that rewrite the
packet's mark (policy routing, CONNMARK restore) do not change. The exclusion is per
socket, not per uid: WALinuxAgent runs as root, and so may imdsd, and only imdsd's upstream
connections are exempt (its hooks and every other root process are redirected).

Setting ``SO_MARK`` needs ``CAP_NET_ADMIN``, which installing the redirect needs too. Without
it the connection is opened unmarked (and :data:`marking` says so): harmless, because a
process that cannot set the mark cannot install the rules either.
"""

from __future__ import annotations

import socket
from typing import Final

import trio

from imdsd.httpio import ConnectFailed

UPSTREAM_MARK: Final = 0x1D5D
SO_MARK: Final = getattr(socket, "SO_MARK", 36)


class _Marking:
    """Whether upstream sockets are being marked (False after the kernel refused once)."""

    enabled = True


marking = _Marking()


def mark_socket(sock: trio.socket.SocketType, mark: int = UPSTREAM_MARK) -> bool:
    """Set ``SO_MARK`` on ``sock``; False (and marking switched off) when not permitted."""
    if not marking.enabled:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except PermissionError:
        marking.enabled = False
        return False
    return True


async def open_marked_tcp(host: str, port: int, timeout: float) -> trio.SocketStream:
    """Like :func:`imdsd.httpio.open_tcp`, with the upstream mark set before connecting."""
    try:
        with trio.fail_after(timeout):
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = infos[0]
            sock = trio.socket.socket(family, kind, proto)
            try:
                mark_socket(sock)
                await sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock)
    except trio.TooSlowError as exc:
        raise ConnectFailed(f"connect to {host}:{port} timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise ConnectFailed(f"connect to {host}:{port} failed: {exc}") from exc
