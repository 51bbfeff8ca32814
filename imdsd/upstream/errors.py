"""The upstream client's errors: what a request can fail with, and a request given up.

Sans-IO: the trio/h11 failures are mapped onto these classes by :mod:`imdsd.upstream.pool`.
"""

from __future__ import annotations

from imdsd.upstream.retry import ErrorKind, Outcome

LOOP_MESSAGE = (
    "IMDS answered through imdsd's own front: the redirect does not exempt imdsd's"
    " upstream traffic (packet mark changed?)"
)


class UpstreamError(Exception):
    """Base of every error of the upstream client."""


class TransportError(UpstreamError):
    """The request got no usable HTTP answer; ``kind`` names the failure class."""

    kind: ErrorKind = "reset"


class ConnectError(TransportError):
    """The connection could not be opened (refused, unreachable, connect timeout)."""

    kind = "connect"


class Timeout(TransportError):
    """No complete answer within the read timeout."""

    kind = "timeout"


class Reset(TransportError):
    """The server closed or reset the connection before a complete answer."""

    kind = "reset"


class ProtocolError(TransportError):
    """The server broke HTTP/1.1."""

    kind = "protocol"


class ThroughFront(ProtocolError):
    """The answer came from an imdsd front (it carries ``X-Imdsd-*`` headers), not from IMDS.

    imdsd's own upstream connection was caught by the redirect and looped into a front
    (its own, or another imdsd's): the answer is imdsd's cache, never IMDS's data.
    """

    def __init__(self, message: str = LOOP_MESSAGE) -> None:
        super().__init__(message)


class TooLarge(TransportError):
    """The answer's body exceeded the size cap (1 MiB)."""

    kind = "too_large"


class GaveUp(UpstreamError):
    """A request was given up by the retry policy; ``outcome`` is its last attempt."""

    def __init__(self, endpoint: str, outcome: Outcome, reason: str) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.outcome = outcome
        self.reason = reason

    @property
    def status(self) -> int | None:
        """The HTTP status of the last attempt, or None for a transport failure."""
        return self.outcome.status
