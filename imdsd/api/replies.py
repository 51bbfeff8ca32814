"""Replies and the cache of replies built once per document, revision and freshness (sans-IO).

Every cached read carries ``ETag``, ``X-Imdsd-Revision``, ``X-Imdsd-Fetched-At`` (omitted when
the document was never fetched in this run, e.g. restored from disk) and ``X-Imdsd-Stale``;
``If-None-Match`` naming the reply's ETag (strong or ``W/``, in a list, or ``*``) gives 304.
The ETag is a strong validator: a short BLAKE2b of the exact body, computed once when the
reply is built, so the same ETag always means the same bytes, even when a document changes
without a new revision (reordered tags, fields from another api-version, a section that went
missing).

Each endpoint has a :class:`Slot` holding the replies built for its current document,
revision and freshness; :class:`ReplyCache` replaces a slot when any of those change.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from imdsd.api.access import Level
from imdsd.api.context import Freshness
from imdsd.timestamps import format_timestamp

Headers = list[tuple[bytes, bytes]]

JSON_TYPE = b"application/json; charset=utf-8"
MAX_CACHED = 1024
MAX_TARGET_KEPT = 512  # longer targets are answered but not remembered (bounded memory)
_encoder = msgspec.json.Encoder()


class Reply:
    """A complete response: status, headers (without Content-Length) and body.

    A cached read (:func:`validated`) also has its ``etag`` and the 304 answering it.
    """

    __slots__ = ("body", "etag", "headers", "not_modified", "status")

    def __init__(self, status: int, headers: Headers, body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.etag: str | None = None
        self.not_modified: Reply | None = None

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:60]!r})"


def error(status: int, message: str, headers: Headers | None = None, **extra: Any) -> Reply:
    """A JSON error reply ``{"error": message, **extra}``."""
    body = _encoder.encode({"error": message, **extra})
    return Reply(status, [(b"content-type", JSON_TYPE), *(headers or [])], body)


def json_reply(status: int, value: Any, headers: Headers | None = None) -> Reply:
    """A JSON reply."""
    return Reply(status, [(b"content-type", JSON_TYPE), *(headers or [])], _encoder.encode(value))


def body_etag(body: bytes) -> bytes:
    """The strong ETag of ``body`` (quoted): 20 hex digits of its BLAKE2b."""
    return b'"%s"' % hashlib.blake2b(body, digest_size=10).hexdigest().encode()


def validated(status: int, headers: Headers, body: bytes, meta: Headers) -> Reply:
    """A cached-read reply with the ETag of ``body`` and its 304 built once, now."""
    etag = body_etag(body)
    reply = Reply(status, [*headers, (b"etag", etag), *meta], body)
    reply.etag = etag.decode()
    reply.not_modified = Reply(304, [(b"etag", etag), *meta])
    return reply


def validated_json(value: Any, meta: Headers) -> Reply:
    """A cached-read 200 reply with ``value`` as JSON."""
    return validated(200, [(b"content-type", JSON_TYPE)], _encoder.encode(value), meta)


def etag_matches(header: str | None, etag: str) -> bool:
    """True when an ``If-None-Match`` value names ``etag`` (strong or ``W/``) or is ``*``."""
    if header is None:
        return False
    for item in header.split(","):
        tag = item.strip()
        if tag == "*":
            return True
        tag = tag.removeprefix("W/")
        if tag == etag:
            return True
    return False


def meta_headers(revision: int, fresh: Freshness) -> Headers:
    """The ``X-Imdsd-Revision``, ``-Fetched-At`` and ``-Stale`` headers of a cached read."""
    headers = [(b"x-imdsd-revision", b"%d" % revision)]
    if fresh.fetched_at is not None:
        headers.append((b"x-imdsd-fetched-at", format_timestamp(fresh.fetched_at).encode()))
    headers.append((b"x-imdsd-stale", b"true" if fresh.stale else b"false"))
    return headers


class Slot:
    """Replies built for one document at one revision and freshness."""

    __slots__ = ("doc", "entries", "fresh", "meta", "redacted", "revision")

    def __init__(self, doc: object, revision: int, fresh: Freshness) -> None:
        self.doc = doc
        self.revision = revision
        self.fresh = fresh
        self.meta = meta_headers(revision, fresh)
        self.entries: dict[Any, Reply] = {}
        self.redacted: Any = None

    def matches(self, doc: object, revision: int, fresh: Freshness) -> bool:
        """True while this slot holds ``doc`` (the same object) at ``revision`` and ``fresh``."""
        return self.doc is doc and self.revision == revision and self.fresh == fresh

    def answer(self, reply: Reply, inm: str | None) -> Reply:
        """``reply``, or its 304 when ``If-None-Match`` names its ETag."""
        if reply.not_modified is not None and reply.etag is not None:
            return reply.not_modified if etag_matches(inm, reply.etag) else reply
        return reply

    def keep(self, key: Any, reply: Reply) -> Reply:
        """Remember ``reply`` under ``key`` (up to :data:`MAX_CACHED` of them); returns it."""
        if len(self.entries) < MAX_CACHED:
            self.entries[key] = reply
        return reply


class ReplyCache:
    """The current slot of each endpoint, and instance reads found again by raw target.

    ``by_target`` maps (raw request target, access level) to the instance slot and reply it
    was answered with; it is emptied whenever the instance slot is replaced.
    """

    __slots__ = ("by_target", "slots")

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        self.by_target: dict[tuple[str, Level], tuple[Slot, Reply]] = {}

    def slot(self, name: str, doc: object, revision: int, fresh: Freshness) -> Slot:
        """The slot of ``name`` for ``doc`` at ``revision`` and ``fresh``, new if it changed."""
        slot = self.slots.get(name)
        if slot is None or not slot.matches(doc, revision, fresh):
            slot = self.slots[name] = Slot(doc, revision, fresh)
            if name == "instance":
                self.by_target.clear()
        return slot

    def remember(self, target: str, level: Level, slot: Slot, reply: Reply) -> None:
        """Keep an instance read by its raw target (short targets, bounded in number)."""
        if len(target) <= MAX_TARGET_KEPT:
            if len(self.by_target) >= MAX_CACHED:
                self.by_target.clear()
            self.by_target[(target, level)] = (slot, reply)

    def clear(self) -> None:
        """Drop every slot and remembered target."""
        self.slots.clear()
        self.by_target.clear()
