"""A fast HTTP/1.1 load generator: N keep-alive connections, raw sockets, one epoll loop.

Each connection sends one request, reads the whole response (Content-Length framing), records
its latency and sends the next (closed loop, no pipelining). Measures for ``--duration``
seconds after ``--warmup``, then prints one JSON object: requests, errors, requests/s, latency
percentiles, the load generator's own CPU use and its ceiling (requests per CPU second, i.e.
what it could drive with a whole core to itself). Standard library only (and benchkit).

    python bench/loadgen.py --unix /tmp/x.sock --target '/metadata/instance?format=json' \
        --connections 16 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import socket
import sys
import time
from array import array

from benchkit import add_address_arguments, parsed_address

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_HEAD_END = b"\r\n\r\n"
SAMPLE_LIMIT = 20000
RECV_SIZE = 65536


class _Conn:
    __slots__ = ("buf", "sent", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.sent = 0.0


def _connect(address: str | tuple[str, int]) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect(address)
    sock.setblocking(False)
    return sock


def run(
    address: str | tuple[str, int],
    request: bytes,
    connections: int,
    duration: float,
    warmup: float,
) -> dict[str, object]:
    """Drive the load and return the figures (see the module docstring)."""
    sel = selectors.EpollSelector()
    conns: list[_Conn] = []
    for _ in range(connections):
        conn = _Conn(_connect(address))
        conns.append(conn)
        sel.register(conn.sock, selectors.EVENT_READ, conn)
    scratch = bytearray(RECV_SIZE)  # recv_into: no big allocation per call
    scratch_view = memoryview(scratch)
    latencies = array("d")
    statuses: dict[str, int] = {}
    errors = reconnects = 0
    clock = time.perf_counter
    start = clock()
    measure_from = start + warmup
    end = measure_from + duration
    measuring = False
    cpu0 = os.times()
    for conn in conns:
        conn.sent = clock()
        conn.sock.send(request)
    now = clock()
    while now < end:
        if not measuring and now >= measure_from:
            measuring = True
            cpu0 = os.times()
            measure_from = now
        for key, _ in sel.select(0.5):
            conn = key.data
            try:
                size = conn.sock.recv_into(scratch)
                data = scratch_view[:size]
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = scratch_view[:0]
            now = clock()
            if not data:
                errors += 1
                reconnects += 1
                sel.unregister(conn.sock)
                conn.sock.close()
                conn.sock = _connect(address)
                conn.buf.clear()
                sel.register(conn.sock, selectors.EVENT_READ, conn)
                conn.sent = now
                conn.sock.send(request)
                continue
            buf = conn.buf
            buf += data
            head_end = buf.find(_HEAD_END)
            if head_end < 0:
                continue
            match = _CONTENT_LENGTH.search(buf, 0, head_end + 2)
            if match is None:
                raise SystemExit("loadgen: a response without Content-Length")
            total = head_end + 4 + int(match.group(1))
            if len(buf) < total:
                continue
            if measuring:
                latencies.append(now - conn.sent)
                status = buf[9:12].decode("ascii", "replace")
                statuses[status] = statuses.get(status, 0) + 1
            del buf[:total]
            if buf:
                raise SystemExit("loadgen: unexpected bytes after a response")
            conn.sent = now
            conn.sock.send(request)
    cpu1 = os.times()
    elapsed = clock() - measure_from
    for conn in conns:
        conn.sock.close()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    count = len(latencies)
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * q / 100))] * 1000

    step = max(1, count // SAMPLE_LIMIT)
    return {
        "requests": count,
        "seconds": elapsed,
        "rps": count / elapsed if elapsed > 0 else 0.0,
        "statuses": statuses,
        "errors": errors,
        "reconnects": reconnects,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": ordered[-1] * 1000 if ordered else float("nan"),
        "cpu_seconds": cpu,
        "cpu_pct": 100.0 * cpu / elapsed if elapsed > 0 else 0.0,
        "ceiling_rps": count / cpu if cpu > 0 else float("inf"),
        "sample_ms": [v * 1000 for v in latencies[::step]],
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints the JSON result on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_address_arguments(parser)
    parser.add_argument("--target", required=True, help="request target, e.g. /path?q=1")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--header", action="append", default=[], help="extra 'Name: value'")
    args = parser.parse_args(argv)
    head = f"GET {args.target} HTTP/1.1\r\nHost: imdsd\r\n"
    head += "".join(f"{h}\r\n" for h in args.header)
    result = run(
        parsed_address(args),
        (head + "\r\n").encode("latin-1"),
        args.connections,
        args.duration,
        args.warmup,
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
