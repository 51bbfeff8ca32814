"""Checks of the values written into the emulated VM's documents (sans-IO).

A refused value raises :class:`StateError`, whose ``status`` is the HTTP status to answer
(400 bad input, 404 unknown thing, 409 conflict) and whose message names what is wrong.
"""

from __future__ import annotations

from typing import Any


class StateError(ValueError):
    """An operation on the emulated VM was refused; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def text(value: Any, what: str, *, empty: bool = False) -> str:
    """``value`` when it is a string (non-empty unless ``empty``); StateError naming ``what``."""
    if not isinstance(value, str) or (not empty and not value):
        kind = "a string" if empty else "a non-empty string"
        raise StateError(f"{what} must be {kind}, got {value!r}")
    return value


def json_kind(value: Any) -> str:
    """The JSON name of ``value``'s type: object, array, string, boolean, null or number."""
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else "number"
    )
