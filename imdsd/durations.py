"""Durations as imdsd's files write them: ``"500ms"``, ``"10s"``, ``"2m"``, ``"1h"``, ``"1m30s"``.

Sans-IO: used by the configuration, the emulator's scenarios and faults, and the API's ``wait``.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS: dict[str, Fraction] = {
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
}
_DURATION_HINT = 'expected a number and a unit (ms, s, m, h) like "500ms", "10s" or "1m30s"'


def parse_duration(text: str) -> float:
    """Parse ``"500ms"``, ``"10s"``, ``"2m"``, ``"1h"`` or combinations like ``"1m30s"``.

    Units appear at most once, largest first. Returns seconds; raises ``ValueError`` for
    negative values, bare numbers, unknown units and anything else.
    """
    if text.startswith("-"):
        raise ValueError("negative durations are not allowed")
    total = Fraction(0)
    pos = 0
    last_unit = -1
    order = list(_UNITS)
    for match in _DURATION_PART.finditer(text):
        unit = order.index(match[2])
        if match.start() != pos:
            break
        if unit <= last_unit:
            raise ValueError('each unit at most once, largest first, like "1h30m"')
        total += Fraction(match[1]) * _UNITS[match[2]]
        pos, last_unit = match.end(), unit
    if pos == 0 or pos != len(text):
        raise ValueError(_DURATION_HINT)
    try:
        return float(total)
    except OverflowError:
        raise ValueError("duration is too large") from None


def _decimal(value: Fraction) -> str:
    """Exact decimal notation of a fraction whose denominator divides a power of ten."""
    places = 0
    while (value * 10**places).denominator != 1:
        places += 1
    digits = str(value.numerator * 10**places // value.denominator)
    if places == 0:
        return digits
    digits = digits.rjust(places + 1, "0")
    return f"{digits[:-places]}.{digits[-places:]}"


def format_duration(seconds: float) -> str:
    """Render seconds the way :func:`parse_duration` reads them: ``0.5`` -> ``"500ms"``.

    Uses whole hours and minutes, then seconds (or milliseconds when below one second), so
    ``parse_duration(format_duration(x)) == x`` for every finite ``x >= 0``.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    value = Fraction(repr(float(seconds)))
    hours, rest = divmod(value, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h"] if hours else []
    if minutes:
        parts.append(f"{minutes}m")
    if secs and secs < 1 and (secs * 1000).denominator == 1:
        parts.append(f"{secs * 1000}ms")
    elif secs or not parts:
        parts.append(f"{_decimal(secs)}s")
    return "".join(parts)
