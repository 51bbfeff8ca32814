"""The errors :mod:`imdsd.httpio` raises, and the status a server answers each with.

trio and h11 errors are mapped to these at the adapter's boundary, so its users catch
:class:`HttpIOError` and nothing else.
"""

from __future__ import annotations


class HttpIOError(Exception):
    """Base of every error this adapter raises."""


class PeerClosed(HttpIOError):
    """The peer closed or reset the connection."""


class ProtocolViolation(HttpIOError):
    """The peer broke HTTP/1.1; ``status`` is the response a server should give."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Deadline(HttpIOError):
    """An operation did not finish within its deadline."""


class BodyTooLarge(HttpIOError):
    """A message body exceeded the configured limit."""


class ConnectFailed(HttpIOError):
    """A connection could not be opened (refused, unreachable, timed out)."""


_STATUS_FOR: dict[type[HttpIOError], int] = {BodyTooLarge: 413, Deadline: 408}


def error_status(exc: HttpIOError) -> int:
    """The status a server answers ``exc`` with (400 unless the error names another)."""
    if isinstance(exc, ProtocolViolation):
        return exc.status
    return _STATUS_FOR.get(type(exc), 400)
