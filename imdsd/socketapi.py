"""The imdsd socket API at its lightest: errors, read targets and one request (stdlib only).

``imdsd get`` needs nothing more, so it starts about as fast as ``imdsd --version``;
:mod:`imdsd.client` builds the full blocking client on it (frames, watch, backoff).
"""

from __future__ import annotations

import json
import os
import socket
from urllib.parse import quote, urlencode

from imdsd import __version__

DEFAULT_SOCKET = "/run/imdsd/imdsd.sock"
HEADERS: list[tuple[str, str]] = [("host", "imdsd"), ("user-agent", f"imdsd-client/{__version__}")]


class ImdsdError(Exception):
    """Base of the errors this library raises."""


class DaemonUnreachable(ImdsdError):
    """The daemon's socket could not be reached."""

    def __init__(self, socket_path: str, reason: str) -> None:
        super().__init__(f"imdsd is not reachable at {socket_path}: {reason}")
        self.socket_path = socket_path


class ApiError(ImdsdError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def socket_path(explicit: str | None = None) -> str:
    """The socket to use: ``explicit``, else ``$IMDSD_SOCKET``, else the default path."""
    return explicit or os.environ.get("IMDSD_SOCKET") or DEFAULT_SOCKET


def read_target(path: str, fmt: str) -> str:
    """The request target for reading instance ``path`` (like ``compute/tags``) in ``fmt``."""
    clean = path.strip("/")
    if clean.startswith("metadata/"):
        base = "/" + clean
    else:
        base = "/metadata/instance" + ("/" + clean if clean else "")
    return quote(base) + "?" + urlencode({"format": fmt})


def error_message(body: bytes) -> str:
    """The ``error`` field of a JSON error body, or the body itself."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "(empty answer)"
    message = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(message, str):
        return message
    return body.decode("utf-8", "replace").strip()


MAX_ANSWER = 64 << 20
"""The largest answer :func:`request` reads (the whole instance document is a few kB)."""


class _BadAnswer(Exception):
    """The daemon's answer is not a complete HTTP/1.1 response."""


def request(
    socket_path: str, method: str, target: str, timeout: float
) -> tuple[int, dict[str, str], bytes]:
    """Send one request to the daemon at ``socket_path``; status, headers (lower-case names)
    and body. Raises :class:`DaemonUnreachable` when the socket or the exchange fails.

    One request per connection (``Connection: close``): the answer ends where the daemon
    closes, and its body is framed by ``Content-Length`` or chunked encoding, so this needs
    no HTTP library (``http.client`` alone would double ``imdsd get``'s start-up time).
    """
    head = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in HEADERS)]
    head.append("connection: close")
    if method not in ("GET", "HEAD"):
        head.append("content-length: 0")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            answer = _read_to_end(sock)
        return parse_answer(answer, head_only=method == "HEAD")
    except (OSError, _BadAnswer) as exc:
        raise DaemonUnreachable(socket_path, str(exc) or type(exc).__name__) from exc


def _read_to_end(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := sock.recv(65536):
        size += len(chunk)
        if size > MAX_ANSWER:
            raise _BadAnswer(f"answer larger than {MAX_ANSWER} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_answer(data: bytes, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a complete HTTP/1.1 answer read until the peer closed
    (informational 1xx answers before it are skipped)."""
    while True:
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            raise _BadAnswer("the answer ended before its headers did")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, code = status_line.partition(" ")
        status_text = code.partition(" ")[0]
        if not version.startswith("HTTP/1.") or not (
            status_text.isdigit() and len(status_text) == 3
        ):
            raise _BadAnswer(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise _BadAnswer(f"malformed header line: {line[:80]!r}")
            headers[name.lower()] = value.strip()
        status = int(status_text)
        if 100 <= status < 200:
            data = rest
            continue
        if head_only or status in (204, 304):
            return status, headers, b""
        return status, headers, _body(headers, rest)


def _body(headers: dict[str, str], rest: bytes) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _unchunk(rest)
    length = headers.get("content-length")
    if length is None:
        return rest
    if not length.isdigit() or len(rest) < int(length):
        raise _BadAnswer(f"the body ended before its content-length ({length})")
    return rest[: int(length)]


def _unchunk(data: bytes) -> bytes:
    body: list[bytes] = []
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        size_text = data[position:line_end].split(b";")[0].strip() if line_end >= 0 else b""
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadAnswer("malformed chunk size") from None
        start = line_end + 2
        if size == 0:
            return b"".join(body)
        if len(data) < start + size + 2 or data[start + size : start + size + 2] != b"\r\n":
            raise _BadAnswer("the answer ended inside a chunk")
        body.append(data[start : start + size])
        position = start + size + 2
