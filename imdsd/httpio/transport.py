"""The trio side of the adapter: a stream's bytes in and out, with write deadlines.

:class:`Transport` maps trio's and the OS's errors to :class:`PeerClosed` and
:class:`Deadline`; it knows nothing of HTTP.
"""

from __future__ import annotations

import os
import select
import socket

import trio
import trio.lowlevel

from imdsd.httpio.errors import Deadline, PeerClosed

RECV_SIZE = 65536
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Transport:
    """One trio stream: read, write (within ``write_timeout`` when set), close with a drain."""

    __slots__ = ("stream", "write_timeout")

    def __init__(self, stream: trio.abc.Stream, write_timeout: float | None = None) -> None:
        self.stream = stream
        self.write_timeout = write_timeout

    async def receive(self) -> bytes:
        """The next bytes from the peer; b"" once it closed or reset the connection."""
        try:
            return bytes(await self.stream.receive_some(RECV_SIZE))
        except _GONE:
            return b""

    def send_nowait(self, data: bytes) -> bytes:
        """Write as much of ``data`` as a socket takes without waiting; returns the rest.

        Streams that are not sockets take nothing here. Raises PeerClosed.
        """
        stream = self.stream
        if not isinstance(stream, trio.SocketStream):
            return data
        try:
            sent = os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            return data
        except OSError as exc:
            raise PeerClosed(str(exc) or type(exc).__name__) from exc
        return data[sent:]

    async def send(self, data: bytes) -> None:
        """Write ``data`` in full, within ``write_timeout`` when one is set.

        On a socket the bytes are first written without waiting, and a deadline is armed
        only for what the socket does not take at once: a peer that reads costs no timer, a
        peer that stops reading gets Deadline. Raises PeerClosed when the peer is gone.
        """
        stream = self.stream
        try:
            if self.write_timeout is None:
                await stream.send_all(data)
                return
            if isinstance(stream, trio.SocketStream):
                await trio.lowlevel.checkpoint_if_cancelled()
                data = self.send_nowait(data)
                if not data:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return
            with trio.fail_after(self.write_timeout):
                await stream.send_all(data)
        except trio.TooSlowError as exc:
            raise Deadline(f"peer read nothing for {self.write_timeout:g}s") from exc
        except _GONE as exc:
            raise PeerClosed(str(exc) or type(exc).__name__) from exc

    def readable_now(self) -> bool:
        """True when the peer has sent something or closed (a closed socket counts too).

        ``poll``, not ``select``: a descriptor above 1023 is as good as any other.
        """
        stream = self.stream
        if not isinstance(stream, trio.SocketStream):
            return False
        try:
            poller = select.poll()
            poller.register(stream.socket.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # closed: fileno() is -1
            return True

    async def close(self, drain_timeout: float) -> None:
        """Half-close, read for up to ``drain_timeout`` until the peer closes, then close.

        Reading what the peer still sends keeps the close from becoming a reset that could
        destroy the last answer before the peer has read it.
        """
        stream = self.stream
        try:
            if isinstance(stream, trio.SocketStream):
                try:
                    stream.socket.shutdown(socket.SHUT_WR)
                except OSError:
                    return
                with trio.move_on_after(drain_timeout):
                    while await stream.receive_some(RECV_SIZE):
                        pass
        except _GONE:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def aclose(self) -> None:
        """Close at once."""
        await trio.aclose_forcefully(self.stream)
