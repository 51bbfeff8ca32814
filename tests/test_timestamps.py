"""The one RFC 3339 formatter, as a property over every representable aware datetime."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imdsd.timestamps import format_timestamp, now_timestamp

RFC3339_MS_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")

aware = st.builds(
    lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))),
    st.datetimes(
        min_value=datetime(1, 1, 2),  # leaves room for any offset to stay within 1..9999
        max_value=datetime(9999, 12, 30),
    ),
    st.integers(min_value=-1439, max_value=1439),
)


@given(aware)
def test_any_aware_datetime_gives_the_same_moment_in_utc_truncated_to_milliseconds(
    moment: datetime,
) -> None:
    text = format_timestamp(moment)
    assert RFC3339_MS_UTC.fullmatch(text), text
    back = datetime.fromisoformat(text.replace("Z", "+00:00"))
    expected = moment.astimezone(UTC)
    assert back == expected.replace(microsecond=expected.microsecond // 1000 * 1000)


@given(st.floats(min_value=0, max_value=253_402_300_799, allow_nan=False))
def test_unix_times_and_their_datetimes_format_alike(unix: float) -> None:
    assert format_timestamp(unix) == format_timestamp(datetime.fromtimestamp(unix, UTC))


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValueError, match="has no timezone"):
        format_timestamp(datetime(2024, 1, 1))


def test_now_is_the_wall_clock() -> None:
    before = format_timestamp(time.time() - 0.001)
    stamp = now_timestamp()
    after = format_timestamp(time.time())
    assert before <= stamp <= after
