"""Requests and responses as the adapter hands them out, and the small pieces of HTTP they use.

Sans-IO: nothing here reads, writes or waits.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import msgspec

Headers = list[tuple[bytes, bytes]]


def find_header(headers: Sequence[tuple[bytes, bytes]], name: str) -> str | None:
    """The first value of header ``name`` (case-insensitive) in h11-style headers, or None."""
    wanted = name.lower().encode("latin-1")
    for key, value in headers:
        if key == wanted:
            return value.decode("latin-1")
    return None


_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def origin_form(target: str) -> str:
    """``target`` in origin form: ``http://host/a?b`` -> ``/a?b`` (others as they are)."""
    found = _ABSOLUTE_FORM.match(target)
    if found is None:
        return target
    rest = target[found.end() :]
    return rest if rest.startswith("/") else "/" + rest


class Request:
    """One HTTP request as the server received it (body read in full).

    ``target`` is in origin form (``/path?query``) even when the client sent the absolute
    form (``http://host/path?query``).
    """

    __slots__ = ("_path", "_query", "body", "headers", "method", "peer", "target")

    def __init__(
        self, method: str, target: str, headers: Headers, body: bytes, peer: Any = None
    ) -> None:
        self.peer = peer
        self.method = method
        self.target = target if target[:1] == "/" else origin_form(target)
        self.headers = headers
        self.body = body
        self._path: str | None = None
        self._query: list[tuple[str, str]] | None = None

    @property
    def path(self) -> str:
        """The target's path, percent-decoded."""
        if self._path is None:
            self._path = unquote(self.target.partition("?")[0])
        return self._path

    @property
    def raw_query(self) -> str:
        """The target's query string as sent (after ``?``; empty when there is none)."""
        return self.target.partition("?")[2]

    @property
    def query(self) -> list[tuple[str, str]]:
        """Query parameters in order, duplicates kept, percent-decoded."""
        if self._query is None:
            self._query = parse_qsl(self.raw_query, keep_blank_values=True)
        return self._query

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        for key, value in self.query:
            if key == name:
                return value
        return None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        return find_header(self.headers, name)


class Response:
    """One HTTP response as the client received it."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: Headers, body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        return find_header(self.headers, name)


_REASONS: dict[int, bytes] = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (empty when unknown)."""
    return _REASONS.get(status, b"")


_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The current date in IMF-fixdate form, computed at most once a second."""
    global _date_cache  # noqa: PLW0603 - a one-entry cache on a hot path
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


def json_error(message: str) -> bytes:
    """The JSON error body ``{"error": message}``."""
    return msgspec.json.encode({"error": message})
