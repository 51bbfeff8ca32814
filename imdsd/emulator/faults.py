"""Injected faults of the emulator (sans-IO): parsing, the queue, and picking one per request.

A fault spec is a JSON object (control API) or TOML table (scenario) with one action:

- ``{"status": 410}``: answer that status with an IMDS-like JSON body ``{"error": ...}``
  (``"retry_after": 3`` adds a ``Retry-After`` header; ``"body": "..."`` replaces the body);
- ``{"body": "not json"}``: answer 200 with that body;
- ``{"reset": true}``: abort the TCP connection without answering;
- ``{"oversize": 2000000}``: answer 200 with a valid JSON body of that many bytes;
- ``{"truncate": true}``: announce the normal answer, send half of its body, then close;
- ``{"delay": "3s"}``: wait, then answer normally (or apply the other action given with it).

Common keys: ``count`` (how many requests it hits, default 1) and ``path`` (a path prefix the
request must start with, default ``/metadata``). Faults hit requests in the order they were
added; the control API under ``/_emulator/`` is never hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imdsd.durations import parse_duration

_KEYS = ("status", "count", "path", "delay", "reset", "body", "oversize", "truncate", "retry_after")


class FaultError(ValueError):
    """A fault spec is malformed; the message names the key."""


@dataclass
class Fault:
    """One queued fault; ``count`` is how many more requests it will hit."""

    count: int = 1
    path: str = "/metadata"
    delay: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    body: bytes | None = None
    reset: bool = False
    oversize: int | None = None
    truncate: bool = False

    def matches(self, path: str) -> bool:
        """True when this fault applies to a request for ``path``."""
        return path.startswith(self.path)

    def describe(self) -> dict[str, Any]:
        """The fault as a JSON-ready dict (only the keys that are set)."""
        out: dict[str, Any] = {"count": self.count, "path": self.path}
        if self.delay:
            out["delay"] = self.delay
        if self.status is not None:
            out["status"] = self.status
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        if self.body is not None:
            out["body"] = self.body.decode("utf-8", "replace")
        if self.reset:
            out["reset"] = True
        if self.oversize is not None:
            out["oversize"] = self.oversize
        if self.truncate:
            out["truncate"] = True
        return out


def _int(spec: dict[str, Any], key: str, low: int, high: int) -> int:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FaultError(f"{key} must be an integer from {low} to {high}, got {value!r}")
    return value


def _true(spec: dict[str, Any], key: str) -> bool:
    if spec[key] is not True:
        raise FaultError(f"{key} must be true, got {spec[key]!r}")
    return True


def _delay(value: Any) -> float:
    if isinstance(value, bool):
        raise FaultError(f'delay must be a duration like "3s" or seconds, got {value!r}')
    if isinstance(value, int | float):
        if value < 0 or value > 3600:
            raise FaultError(f"delay must be from 0 to 3600 seconds, got {value!r}")
        return float(value)
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise FaultError(f"delay {value!r}: {exc}") from None
        if seconds > 3600:
            raise FaultError(f"delay must be at most 1h, got {value!r}")
        return seconds
    raise FaultError(f'delay must be a duration like "3s" or seconds, got {value!r}')


def parse_fault(spec: Any) -> Fault:
    """Validate a fault spec (see the module docstring); raises :class:`FaultError`."""
    if not isinstance(spec, dict):
        raise FaultError(f"a fault must be an object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_KEYS))
    if unknown:
        raise FaultError(f"unknown fault key {unknown[0]!r}; known keys: {', '.join(_KEYS)}")
    fault = Fault()
    if "count" in spec:
        fault.count = _int(spec, "count", 1, 1_000_000)
    if "path" in spec:
        path = spec["path"]
        if not isinstance(path, str) or not path.startswith("/"):
            raise FaultError(f"path must be a string starting with '/', got {path!r}")
        fault.path = path
    if "delay" in spec:
        fault.delay = _delay(spec["delay"])
    if "status" in spec:
        fault.status = _int(spec, "status", 200, 599)
    if "retry_after" in spec:
        if "status" not in spec:
            raise FaultError("retry_after needs a status")
        value = spec["retry_after"]
        if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
            raise FaultError(f"retry_after must be seconds or an HTTP date, got {value!r}")
        fault.retry_after = str(value)
    if "body" in spec:
        if not isinstance(spec["body"], str):
            raise FaultError(f"body must be a string, got {spec['body']!r}")
        fault.body = spec["body"].encode()
    if "reset" in spec:
        fault.reset = _true(spec, "reset")
    if "oversize" in spec:
        fault.oversize = _int(spec, "oversize", 16, 1 << 30)
    if "truncate" in spec:
        fault.truncate = _true(spec, "truncate")
    actions = [k for k in ("reset", "oversize", "truncate") if k in spec]
    if "status" in spec or "body" in spec:
        actions.append("status/body")
    if len(actions) > 1:
        raise FaultError(f"a fault takes one action, got {' and '.join(actions)}")
    if not actions and "delay" not in spec:
        raise FaultError("a fault needs one of status, body, reset, oversize, truncate, delay")
    return fault


class FaultQueue:
    """Faults waiting to hit requests, in the order they were added."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        """Queue ``fault`` behind the ones already waiting."""
        self._faults.append(fault)

    def clear(self) -> int:
        """Drop every waiting fault; returns how many there were."""
        dropped = len(self._faults)
        self._faults.clear()
        return dropped

    def take(self, path: str) -> Fault | None:
        """The first fault matching ``path``, using up one of its count; None if none."""
        for index, fault in enumerate(self._faults):
            if fault.matches(path):
                fault.count -= 1
                if fault.count == 0:
                    del self._faults[index]
                return fault
        return None

    def pending(self) -> list[dict[str, Any]]:
        """The waiting faults, described (GET /_emulator/state)."""
        return [fault.describe() for fault in self._faults]

    def __len__(self) -> int:
        return len(self._faults)
