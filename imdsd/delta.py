"""Structural deltas between JSON-like values (sans-IO), for the state journal.

A delta turns one value into another and is about as large as what changed, not as the
values themselves:

- ``["=", value]``: replace with ``value``;
- ``["d", {key: delta}, [removed keys]]``: edit an object key by key (only when that keeps
  the new key order);
- ``["l", length, {index: delta}]``: cut or pad a list (padding is ``None``) to ``length``,
  then edit items by index (as strings, JSON object keys);
- ``["s", start, end, text]``: replace ``[start:end]`` of a long string (e.g. IMDS's
  ``compute.tags``, all tags in one string) by ``text``.

:func:`make` never recurses deeper than :data:`MAX_DEPTH`; below it a value is replaced whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

MAX_DEPTH: Final = 64
LONG_STRING: Final = 256

_encode = msgspec.json.Encoder().encode


class DeltaError(ValueError):
    """A delta that does not fit the value it is applied to."""


def make(old: Any, new: Any) -> list[Any] | None:
    """The delta from ``old`` to ``new``, None when they are equal as JSON."""
    if _same(old, new):
        return None
    edit = _make(old, new, 0)
    if edit is None or _encode(apply(old, edit)) != _encode(new):
        # Python's == hid a difference JSON has (1 vs true, key order): replace it whole.
        return ["=", new]
    return edit


def _make(old: Any, new: Any, depth: int) -> list[Any] | None:
    if type(old) is type(new) and old == new:  # fast; make() checks the result as JSON
        return None
    if depth < MAX_DEPTH and isinstance(old, dict) and isinstance(new, dict) and _ordered(old, new):
        edits: dict[str, Any] = {}
        for key, value in new.items():
            if key not in old:
                edits[key] = ["=", value]
                continue
            edit = _make(old[key], value, depth + 1)
            if edit is not None:
                edits[key] = edit
        return ["d", edits, [key for key in old if key not in new]]
    if depth < MAX_DEPTH and isinstance(old, list) and isinstance(new, list):
        items: dict[str, Any] = {}
        differ = [i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b]
        for index in differ:
            edit = _make(old[index], new[index], depth + 1)
            if edit is not None:
                items[str(index)] = edit
        for index in range(len(old), len(new)):
            items[str(index)] = ["=", new[index]]
        return ["l", len(new), items]
    if isinstance(old, str) and isinstance(new, str) and len(new) > LONG_STRING:
        return _splice(old, new)
    return ["=", new]


def _ordered(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when editing ``old`` key by key keeps ``new``'s key order (kept keys in their
    order, added keys after them): the bytes served after a restart stay the same."""
    kept = [key for key in old if key in new]
    return list(new) == kept + [key for key in new if key not in old]


def _splice(old: str, new: str) -> list[Any]:
    start = _common(lambda n: old[:n] == new[:n], min(len(old), len(new)))
    rest = min(len(old), len(new)) - start
    tail = _common(lambda n: old[len(old) - n :] == new[len(new) - n :], rest)
    return ["s", start, len(old) - tail, new[start : len(new) - tail]]


def _common(same: Callable[[int], bool], limit: int) -> int:
    """The largest ``n <= limit`` with ``same(n)`` (monotonic), by bisection."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if same(middle):
            low = middle
        else:
            high = middle - 1
    return low


def apply(value: Any, delta: Any) -> Any:
    """``value`` changed by ``delta`` (``value`` itself is not modified)."""
    if not isinstance(delta, list) or not delta:
        raise DeltaError(f"not a delta: {delta!r:.80}")
    op = delta[0]
    if op == "=" and len(delta) == 2:
        return delta[1]
    if op == "d" and len(delta) == 3 and isinstance(value, dict):
        edits, removed = delta[1], delta[2]
        if not isinstance(edits, dict) or not isinstance(removed, list):
            raise DeltaError("malformed object delta")
        result = {key: item for key, item in value.items() if key not in set(removed)}
        for key, edit in edits.items():
            result[key] = apply(value.get(key), edit) if key in value else _whole(edit)
        return result
    if op == "l" and len(delta) == 3 and isinstance(value, list):
        length, items = delta[1], delta[2]
        if not isinstance(length, int) or length < 0 or not isinstance(items, dict):
            raise DeltaError("malformed list delta")
        result_list = value[:length] + [None] * (length - len(value))
        for key, edit in items.items():
            index = int(key)
            if not 0 <= index < length:
                raise DeltaError(f"list index {index} outside 0..{length - 1}")
            result_list[index] = apply(result_list[index], edit)
        return result_list
    if op == "s" and len(delta) == 4 and isinstance(value, str):
        start, end, text = delta[1], delta[2], delta[3]
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(text, str)):
            raise DeltaError("malformed string delta")
        if not 0 <= start <= end <= len(value):
            raise DeltaError(f"string range {start}..{end} outside 0..{len(value)}")
        return value[:start] + text + value[end:]
    raise DeltaError(f"delta {op!r} does not fit a {type(value).__name__}")


def _whole(delta: Any) -> Any:
    if isinstance(delta, list) and len(delta) == 2 and delta[0] == "=":
        return delta[1]
    raise DeltaError("a new key needs a whole value")


def _same(old: Any, new: Any) -> bool:
    """Equal as JSON, key order included (True == 1 and {a, b} == {b, a} in Python)."""
    if type(old) is not type(new):
        return False
    if isinstance(old, dict | list):
        return bool(_encode(old) == _encode(new))
    return bool(old == new)
