"""Consumer library for the imdsd socket API: the blocking client (standard library and msgspec
only, so scripts and the ``imdsd get/watch/status`` commands start fast) and what the trio
flavour (:mod:`imdsd.aclient`) shares with it.

Sync::

    from imdsd.client import Client

    client = Client()                      # $IMDSD_SOCKET or /run/imdsd/imdsd.sock
    print(client.get("compute/vmSize", format="text"))
    for frame in client.watch(kinds=["tags", "disks"]):
        ...                                # StateFrame first, then ChangeFrames

trio (:mod:`imdsd.aclient`)::

    async with AsyncClient() as client, aclosing(client.watch(since=41)) as frames:
        async for frame in frames:
            ...

``watch`` resumes by itself after a disconnect or an overflow (from the last revision it saw)
and re-lists after ``gone`` (a fresh StateFrame follows, so the consumer can resynchronise).
Reconnections back off exponentially with jitter (``retry_delay`` doubling up to
``max_delay``, reset once a frame arrives) and each failure is logged on the standard
``logging`` logger ``imdsd.client``. Frame types this library does not know (from a newer
daemon) are skipped, with one warning per type. A 4xx answer to the watch request raises
:class:`ApiError`; 5xx and 429 answers are retried.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlencode

import msgspec

from imdsd.frames import (
    BookmarkFrame,
    ChangeFrame,
    Frame,
    GoneFrame,
    OverflowFrame,
    StateFrame,
    decode_frame,
)
from imdsd.socketapi import (
    DEFAULT_SOCKET,
    HEADERS,
    ApiError,
    DaemonUnreachable,
    ImdsdError,
    error_message,
    read_target,
    request,
    socket_path,
)

__all__ = [
    "DEFAULT_SOCKET",
    "HEADERS",
    "MAX_RETRY_DELAY",
    "ApiError",
    "Backoff",
    "Client",
    "DaemonUnreachable",
    "ImdsdError",
    "WatchCursor",
    "decode_read",
    "error_message",
    "read_target",
    "retrying",
    "socket_path",
    "watch_refused",
]

MAX_RETRY_DELAY = 30.0
log = logging.getLogger("imdsd.client")


def decode_read(body: bytes, fmt: str) -> Any:
    """A read's body as the caller asked for it: text, or decoded JSON."""
    if fmt == "text":
        return body.decode("utf-8")
    return msgspec.json.decode(body)


class Backoff:
    """Delays between reconnections: ``initial`` doubling per failure up to ``cap``, jittered.

    Each delay is drawn uniformly from the upper half of its step (``step/2 .. step``), so
    many clients dropped at once do not reconnect in lockstep. :meth:`reset` after progress.
    """

    def __init__(
        self, initial: float, cap: float, *, rng: Callable[[], float] = random.random
    ) -> None:
        self.initial = initial
        self.cap = max(cap, initial)
        self.failures = 0
        self._rng = rng

    def next(self) -> float:
        """The delay before the next attempt (and count one more failure)."""
        step = min(self.cap, self.initial * 2 ** min(self.failures, 32))
        self.failures += 1
        return float(step / 2 + self._rng() * step / 2)

    def reset(self) -> None:
        """Start again from ``initial`` (a connection made progress)."""
        self.failures = 0


class WatchCursor:
    """Sans-IO resume logic of a watch: which URL to open next, what to do with each frame."""

    def __init__(self, since: int | None, kinds: Iterable[str] | None) -> None:
        self.since = since
        self.kinds = sorted(set(kinds)) if kinds else None
        self.unknown_types: set[str] = set()

    def target(self) -> str:
        """The request target of the next connection."""
        query: dict[str, str] = {}
        if self.since is not None:
            query["since"] = str(self.since)
        if self.kinds:
            query["kinds"] = ",".join(self.kinds)
        return "/v1/watch" + ("?" + urlencode(query) if query else "")

    def decode(self, line: bytes) -> Frame | None:
        """The frame on ``line``; None for a blank line or a frame type not known here.

        An unknown type (a newer daemon) is skipped with one warning per type; a malformed
        frame of a known type raises ``msgspec.DecodeError`` (the caller reconnects).
        """
        if not line.strip():
            return None
        try:
            return decode_frame(line)
        except msgspec.ValidationError:
            kind = _frame_type(line)
            if kind is None or kind in _KNOWN_TYPES:
                raise
            if kind not in self.unknown_types:
                self.unknown_types.add(kind)
                log.warning("imdsd watch: skipping frames of unknown type %r", kind)
            return None

    def accept(self, frame: Frame) -> bool:
        """Record ``frame``; True when it should reach the consumer.

        Bookmarks advance the resume point silently. Overflow resumes from its revision; gone
        re-lists (the next connection starts with a state frame). Both end the connection.
        """
        if isinstance(frame, StateFrame | ChangeFrame):
            self.since = frame.revision
            return True
        if isinstance(frame, BookmarkFrame):
            self.since = frame.revision
            return False
        if isinstance(frame, OverflowFrame):
            self.since = frame.revision
            return False
        if isinstance(frame, GoneFrame):
            self.since = None
            return False
        return False


_KNOWN_TYPES = frozenset({"state", "change", "bookmark", "gone", "overflow"})


def _frame_type(line: bytes) -> str | None:
    """The ``type`` of a JSON object line, or None when it is not one."""
    try:
        decoded = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    kind = decoded.get("type") if isinstance(decoded, dict) else None
    return kind if isinstance(kind, str) else None


def watch_refused(status: int, message: str) -> ApiError | None:
    """The error to raise for a watch answered ``status``, or None to retry (5xx, 429)."""
    if status >= 500 or status == 429:
        return None
    return ApiError(status, message)


def retrying(socket_path: str, reason: str, delay: float) -> None:
    """Log that a watch failed for ``reason`` and reconnects after ``delay`` seconds."""
    log.warning("imdsd watch on %s: %s; reconnecting in %.1f s", socket_path, reason, delay)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("imdsd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Blocking client of the imdsd socket API (standard library only, no trio needed)."""

    def __init__(self, socket: str | None = None, *, timeout: float = 10.0) -> None:
        self.socket = socket_path(socket)
        self.timeout = timeout

    def request(self, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
        """Send one request; returns status, headers (lower-case names) and body."""
        return request(self.socket, method, target, self.timeout)

    def _ok(self, method: str, target: str) -> bytes:
        status, _, body = self.request(method, target)
        if status >= 400:
            raise ApiError(status, error_message(body))
        return body

    def get(self, path: str = "", *, format: str = "json") -> Any:
        """Read ``path`` of the cached instance (``compute/tags``); JSON decoded, or text."""
        return decode_read(self._ok("GET", read_target(path, format)), format)

    def state(self) -> dict[str, Any]:
        """The whole current state (``/v1/state``)."""
        result: dict[str, Any] = msgspec.json.decode(self._ok("GET", "/v1/state"))
        return result

    def health(self) -> dict[str, Any]:
        """The daemon's health (``/v1/health``), also while it is starting."""
        _, _, body = self.request("GET", "/v1/health")
        result: dict[str, Any] = msgspec.json.decode(body)
        return result

    def approve(self, event_id: str) -> dict[str, Any]:
        """Approve scheduled event ``event_id`` upstream (needs an allowed uid or gid)."""
        body = self._ok("POST", f"/v1/scheduled-events/{quote(event_id, safe='')}/approve")
        result: dict[str, Any] = msgspec.json.decode(body)
        return result

    def watch(
        self,
        since: int | None = None,
        kinds: Iterable[str] | None = None,
        *,
        retry_delay: float = 1.0,
        max_delay: float = MAX_RETRY_DELAY,
        read_timeout: float = 60.0,
    ) -> Iterator[Frame]:
        """Yield state and change frames forever, reconnecting and resuming as needed.

        Raises :class:`ApiError` when the daemon refuses the watch with a 4xx status.
        """
        cursor = WatchCursor(since, kinds)
        backoff = Backoff(retry_delay, max_delay)
        while True:
            conn = _UnixHTTPConnection(self.socket, read_timeout)
            reason = "the stream ended"
            try:
                conn.request("GET", cursor.target(), headers=dict(HEADERS))
                reply = conn.getresponse()
                if reply.status != 200:
                    message = error_message(reply.read())
                    error = watch_refused(reply.status, message)
                    if error is not None:
                        raise error
                    reason = f"HTTP {reply.status}: {message}"
                else:
                    while line := reply.readline():
                        frame = cursor.decode(line)
                        if frame is not None and cursor.accept(frame):
                            backoff.reset()
                            yield frame
            except (OSError, http.client.HTTPException, msgspec.DecodeError) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                conn.close()
            delay = backoff.next()
            retrying(self.socket, reason, delay)
            time.sleep(delay)
