"""The trio flavour of the imdsd consumer library (see :mod:`imdsd.client` for the blocking one).

::

    async with AsyncClient() as client, aclosing(client.watch(since=41)) as frames:
        async for frame in frames:
            ...

It resumes, backs off, logs and skips unknown frame types exactly as :class:`imdsd.client.Client`
does, sharing its :class:`~imdsd.client.WatchCursor` and :class:`~imdsd.client.Backoff`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable
from types import TracebackType
from typing import Any

import msgspec
import trio

from imdsd import httpio
from imdsd.client import (
    HEADERS,
    MAX_RETRY_DELAY,
    ApiError,
    Backoff,
    DaemonUnreachable,
    WatchCursor,
    decode_read,
    error_message,
    read_target,
    retrying,
    socket_path,
    watch_refused,
)
from imdsd.frames import Frame


class AsyncClient:
    """trio client of the imdsd socket API; use as ``async with AsyncClient() as c``."""

    def __init__(self, socket: str | None = None, *, timeout: float = 10.0) -> None:
        self.socket = socket_path(socket)
        self.timeout = timeout
        self._conn: httpio.ClientConnection | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the kept-alive connection."""
        if self._conn is not None:
            await self._conn.aclose()
            self._conn = None

    async def _connect(self) -> httpio.ClientConnection:
        try:
            return httpio.ClientConnection(await httpio.open_unix(self.socket, self.timeout))
        except httpio.ConnectFailed as exc:
            raise DaemonUnreachable(self.socket, str(exc)) from exc

    async def request(self, method: str, target: str) -> httpio.Response:
        """Send one request on the kept-alive connection (reconnecting when needed)."""
        if self._conn is None or not self._conn.reusable:
            await self.aclose()
            self._conn = await self._connect()
        try:
            return await self._conn.request(method, target, HEADERS, timeout=self.timeout)
        except httpio.HttpIOError as exc:
            self._conn = None
            raise DaemonUnreachable(self.socket, str(exc)) from exc

    async def _ok(self, method: str, target: str) -> bytes:
        response = await self.request(method, target)
        if response.status >= 400:
            raise ApiError(response.status, error_message(response.body))
        return response.body

    async def get(self, path: str = "", *, format: str = "json") -> Any:
        """Read ``path`` of the cached instance; JSON decoded, or text."""
        return decode_read(await self._ok("GET", read_target(path, format)), format)

    async def state(self) -> dict[str, Any]:
        """The whole current state (``/v1/state``)."""
        result: dict[str, Any] = msgspec.json.decode(await self._ok("GET", "/v1/state"))
        return result

    async def watch(
        self,
        since: int | None = None,
        kinds: Iterable[str] | None = None,
        *,
        retry_delay: float = 1.0,
        max_delay: float = MAX_RETRY_DELAY,
        read_timeout: float = 60.0,
    ) -> AsyncGenerator[Frame, None]:
        """Yield state and change frames forever, reconnecting and resuming as needed.

        Raises :class:`ApiError` when the daemon refuses the watch with a 4xx status.
        """
        cursor = WatchCursor(since, kinds)
        backoff = Backoff(retry_delay, max_delay)
        while True:
            reason = "the stream ended"
            try:
                conn = await self._connect()
            except DaemonUnreachable as exc:
                reason = str(exc)
            else:
                try:
                    head, next_line = await conn.stream_lines("GET", cursor.target(), HEADERS)
                    if head.status != 200:
                        message = f"watch refused with HTTP {head.status}"
                        error = watch_refused(head.status, message)
                        if error is not None:
                            raise error
                        reason = message
                    else:
                        while True:
                            with trio.fail_after(read_timeout):
                                line = await next_line()
                            if line is None:
                                break
                            frame = cursor.decode(line)
                            if frame is not None and cursor.accept(frame):
                                backoff.reset()
                                yield frame
                except trio.TooSlowError:
                    reason = f"nothing received for {read_timeout:g} s"
                except (httpio.HttpIOError, msgspec.DecodeError) as exc:
                    reason = str(exc) or type(exc).__name__
                finally:
                    await conn.aclose()
            delay = backoff.next()
            retrying(self.socket, reason, delay)
            await trio.sleep(delay)
