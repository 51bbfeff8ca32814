"""The one RFC 3339 formatter: UTC, millisecond precision, ``Z`` suffix (sans-IO)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def format_timestamp(now: datetime | float) -> str:
    """RFC 3339 UTC timestamp with millisecond precision and a ``Z`` suffix.

    ``now`` is a timezone-aware datetime or a unix time in seconds; naive datetimes are
    rejected because their zone is unknown. Milliseconds are truncated, never rounded up,
    so a stamp never names a moment later than ``now``.
    """
    if isinstance(now, datetime):
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError(f"timestamp {now.isoformat()} has no timezone")
        moment = now.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(now, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_timestamp() -> str:
    """The wall clock's current time, formatted as :func:`format_timestamp` does."""
    return format_timestamp(time.time())
