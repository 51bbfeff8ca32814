"""Talking to IMDS: request budget, retry policy, api-versions (sans-IO) and the client shell."""

from imdsd.upstream.budget import Budget, BudgetCore, Priority
from imdsd.upstream.client import (
    ConnectError,
    Fetched,
    GaveUp,
    ImdsClient,
    ProtocolError,
    Reset,
    Timeout,
    TooLarge,
    TransportError,
    UpstreamError,
    UpstreamResponse,
)
from imdsd.upstream.retry import Outcome, RetryPolicy, decide
from imdsd.upstream.versions import Endpoint, VersionBook, negotiate

__all__ = [
    "Budget",
    "BudgetCore",
    "ConnectError",
    "Endpoint",
    "Fetched",
    "GaveUp",
    "ImdsClient",
    "Outcome",
    "Priority",
    "ProtocolError",
    "Reset",
    "RetryPolicy",
    "Timeout",
    "TooLarge",
    "TransportError",
    "UpstreamError",
    "UpstreamResponse",
    "VersionBook",
    "decide",
    "negotiate",
]
