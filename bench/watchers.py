"""Many ``/v1/watch`` streams in one process: records when each change frame reaches each one.

Opens ``--count`` connections to the daemon's socket, each ``GET <target>``, and reads every
stream in one epoll loop (raw sockets, chunked decoding by hand). The receive time of a frame
is ``time.time()`` taken right after the ``recv`` that completed it, compared with the frame's
``at`` (the wall clock time the daemon's store applied the change).

Line protocol with the parent on stdout: ``ready N`` once every stream has its first frame,
``done R`` once every stream has received revision R. On ``quit`` (stdin) it prints one
JSON object (latencies per revision and overall, errors) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time

from benchkit import parse_rfc3339, summarize, thin


class _Stream:
    __slots__ = ("buf", "chunk_left", "crlf_left", "first", "head_done", "lines", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.lines = bytearray()
        self.head_done = False
        self.chunk_left = 0
        self.crlf_left = 0
        self.first = False

    def feed(self, data: bytes) -> list[bytes] | None:
        """Decode received bytes; returns the complete lines, None when the stream ended."""
        if self.head_done and not self.buf and not self.chunk_left and not self.crlf_left:
            # fast path: exactly one whole chunk holding whole lines (what imdsd sends)
            end = data.find(b"\r\n")
            if 0 < end <= 8:
                start = end + 2
                size = int(data[:end], 16)
                if size and len(data) == start + size + 2 and data[start + size - 1] == 10:
                    if self.lines:
                        self.lines += data[start : start + size]
                        return self._split()
                    return data[start : start + size - 1].split(b"\n")
        buf = self.buf
        buf += data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return []
            if not buf.startswith(b"HTTP/1.1 200"):
                raise ValueError(bytes(buf[: buf.find(b"\r\n")]).decode("latin-1"))
            del buf[: end + 4]
            self.head_done = True
        while buf:
            if self.crlf_left:
                take = min(self.crlf_left, len(buf))
                del buf[:take]
                self.crlf_left -= take
                continue
            if self.chunk_left:
                take = min(self.chunk_left, len(buf))
                self.lines += buf[:take]
                del buf[:take]
                self.chunk_left -= take
                if not self.chunk_left:
                    self.crlf_left = 2
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                break
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            del buf[: end + 2]
            if size == 0:
                return None
            self.chunk_left = size
        return self._split()

    def _split(self) -> list[bytes]:
        out: list[bytes] = []
        while (index := self.lines.find(b"\n")) >= 0:
            out.append(bytes(self.lines[:index]))
            del self.lines[: index + 1]
        return out


def _change_of(line: bytes, errors: list[str]) -> tuple[int, str] | None:
    """(revision, at) of a change frame line; None for other frames (errors noted)."""
    if not line.startswith(b'{"type":"change"'):
        if line.startswith((b'{"type":"overflow"', b'{"type":"gone"')):
            errors.append(line.decode())
        return None
    frame = json.loads(line)
    return int(frame["revision"]), str(frame["at"])


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unix", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--target", default="/v1/watch?kinds=tags")
    args = parser.parse_args(argv)

    poller = select.epoll()
    request = f"GET {args.target} HTTP/1.1\r\nHost: imdsd\r\n\r\n".encode()
    by_fd: dict[int, _Stream] = {}
    for _ in range(args.count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.unix)
        sock.sendall(request)
        sock.setblocking(False)
        by_fd[sock.fileno()] = _Stream(sock)
        poller.register(sock.fileno(), select.EPOLLIN)
    scratch = memoryview(bytearray(65536))  # recv_into: no big allocation per call
    stdin_fd = sys.stdin.fileno()
    poller.register(stdin_fd, select.EPOLLIN)

    firsts = 0
    errors: list[str] = []
    received: dict[int, list[float]] = {}
    parsed: dict[bytes, tuple[int, str] | None] = {}
    wall = time.time
    running = True
    while running:
        for fd, _ in poller.poll(1.0, 4096):
            if fd == stdin_fd:
                command = sys.stdin.readline().strip()
                if command in ("quit", ""):
                    running = False
                continue
            stream = by_fd[fd]
            try:
                data = scratch[: stream.sock.recv_into(scratch)].tobytes()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                data = b""
                errors.append(str(exc))
            now = wall()
            try:
                lines = stream.feed(data) if data else None
            except ValueError as exc:
                lines = None
                errors.append(f"bad answer: {exc}")
            if lines is None:
                errors.append("stream ended")
                poller.unregister(fd)
                stream.sock.close()
                continue
            for line in lines:
                if not stream.first:
                    stream.first = True
                    firsts += 1
                    if firsts == args.count:
                        print(f"ready {firsts}", flush=True)
                try:
                    info = parsed[line]
                except KeyError:
                    info = parsed[line] = _change_of(line, errors)
                if info is None:
                    continue
                times = received.setdefault(info[0], [])
                times.append(now)
                if len(times) == args.count:
                    print(f"done {info[0]}", flush=True)

    at_of = {rev: at for rev, at in (i for i in parsed.values() if i is not None)}
    latencies: dict[int, list[float]] = {}
    for rev, times in received.items():
        stamp = parse_rfc3339(at_of[rev])
        latencies[rev] = [(t - stamp) * 1000.0 for t in times]
    every = [v for values in latencies.values() for v in values]
    cpu = os.times()
    result = {
        "cpu_seconds": cpu.user + cpu.system,
        "watchers": args.count,
        "ready": firsts,
        "errors": errors[:20],
        "error_count": len(errors),
        "revisions": {
            str(rev): {"received": len(v), "at": at_of[rev], **summarize(v)}
            for rev, v in sorted(latencies.items())
        },
        "all": summarize(every),
        "sample_ms": thin(every, 20000),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
