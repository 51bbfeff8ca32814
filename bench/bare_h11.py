"""The stack's ceiling: a minimal trio + h11 server answering every request with fixed bytes.

The h11 example-style loop with no routing, no limits and no deadlines: read events, answer
each request with the given status, headers and body (plus ``Server``, a per-second cached
``Date`` and ``Content-Length``), keep the connection alive. Listens on a unix socket, prints
``listening`` once it accepts, runs until SIGTERM/SIGINT.

    python bench/bare_h11.py --unix /tmp/bare.sock --body-file body.bin \
        --header 'content-type: text/plain; charset=utf-8'
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from email.utils import formatdate

import h11
import trio

Headers = list[tuple[bytes, bytes]]
_date: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    global _date  # noqa: PLW0603 - one-entry cache, as in the real server
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date[1]


async def serve_one(stream: trio.SocketStream, headers: Headers, body: bytes) -> None:
    """Serve one connection until the peer closes it."""
    conn = h11.Connection(h11.SERVER)
    length = str(len(body)).encode()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Request):
                full = [
                    (b"server", b"bare-h11"),
                    (b"date", _http_date()),
                    *headers,
                    (b"content-length", length),
                ]
                data = conn.send(h11.Response(status_code=200, headers=full)) or b""
                data += conn.send(h11.Data(data=body)) or b""
                data += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(data)
            elif isinstance(event, h11.ConnectionClosed):
                return
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            elif conn.our_state is h11.MUST_CLOSE:
                return
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def main_async(path: str, headers: Headers, body: bytes) -> None:
    """Listen on ``path`` and serve until cancelled."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(1024)
    listener = trio.SocketListener(sock)

    async def handler(stream: trio.SocketStream) -> None:
        await serve_one(stream, headers, body)

    print("listening", flush=True)
    await trio.serve_listeners(handler, [listener])


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unix", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--header", action="append", default=[], help="'name: value'")
    args = parser.parse_args(argv)
    with open(args.body_file, "rb") as f:
        body = f.read()
    headers: Headers = []
    for item in args.header:
        name, _, value = item.partition(":")
        headers.append((name.strip().lower().encode(), value.strip().encode("latin-1")))
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main_async, args.unix, headers, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
