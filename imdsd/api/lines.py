"""Encoded NDJSON frame lines, built once per revision and reused by every watcher (sans-IO).

A change frame is filtered by the watcher's ``kinds`` and redacted for its access level, so
the cache key is ``(revision, kinds, level)``; with 500 watchers sharing a filter, a new
revision is encoded once, not 500 times. Revisions are never reused, so a key never goes
stale; the cache keeps the most recently used ``size`` entries.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from imdsd.api.access import AccessPolicy, Level
from imdsd.frames import (
    BookmarkFrame,
    ChangeFrame,
    GoneFrame,
    OverflowFrame,
    encode_line,
    only_kinds,
)

Key = tuple[int, frozenset[str] | None, Level]


class FrameLines:
    """LRU cache of encoded change-frame lines; ``encoded`` counts actual encodings."""

    def __init__(self, policy: AccessPolicy, size: int = 1024) -> None:
        self.policy = policy
        self.size = size
        self.encoded = 0
        self._lines: collections.OrderedDict[Key, bytes | None] = collections.OrderedDict()

    def reset(self, policy: AccessPolicy) -> None:
        """Use ``policy`` from now on and drop every cached line."""
        self.policy = policy
        self._lines.clear()

    def line(self, frame: ChangeFrame, kinds: frozenset[str] | None, level: Level) -> bytes | None:
        """``frame`` as a line for this filter and level; None when no change matches."""
        key = (frame.revision, kinds, level)
        try:
            line = self._lines[key]
        except KeyError:
            pass
        else:
            self._lines.move_to_end(key)
            return line
        kept = only_kinds(frame, kinds)
        if kept is not None and level == "redacted":
            kept = self.policy.redact_frame(kept)
        line = None if kept is None else encode_line(kept)
        self.encoded += 1
        self._lines[key] = line
        if len(self._lines) > self.size:
            self._lines.popitem(last=False)
        return line


def bookmark_line(revision: int) -> bytes:
    """A bookmark frame line."""
    return encode_line(BookmarkFrame(revision=revision))


def gone_line(oldest: int) -> bytes:
    """A gone frame line."""
    return encode_line(GoneFrame(oldest=oldest))


def overflow_line(revision: int) -> bytes:
    """An overflow frame line."""
    return encode_line(OverflowFrame(revision=revision))


def events_body(revision: int, lines: Iterable[bytes]) -> bytes:
    """The long-poll answer ``{"revision": R, "frames": [...]}`` built from frame lines."""
    frames = b",".join(line.rstrip(b"\n") for line in lines)
    return b'{"revision":%d,"frames":[%s]}' % (revision, frames)
