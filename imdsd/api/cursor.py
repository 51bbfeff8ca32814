"""The server side of the watch protocol (sans-IO): what one watch stream or long poll writes.

:class:`ServerCursor` is the counterpart of :class:`imdsd.client.WatchCursor`. It keeps
``last``, the newest revision the stream has covered (sent, or skipped because no change
matched its kinds), and decides every line: the opening (a state frame, the frames after
``since``, or ``gone`` when the history no longer reaches back to ``since``), each change
frame at most once and in order, the bookmark of a heartbeat or a shutdown, and the overflow
frame naming the revision to resume from. The trio shell (:mod:`imdsd.api.watch`) only
receives frames, writes what the cursor returns and ends the stream when told.

A client that resumes from the revision of the last frame it saw (change, bookmark or
overflow) gets every matching change exactly once, in order; one whose revision is no longer
in the history gets ``gone`` and then, re-listing, a fresh state frame.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from imdsd.api.access import Level
from imdsd.api.lines import FrameLines, bookmark_line, gone_line, overflow_line
from imdsd.api.v1 import WatchCall
from imdsd.frames import ChangeFrame, GoneFrame


class History(Protocol):
    """The current revision and the kept change frames (``ApiContext``, ``Store``)."""

    @property
    def revision(self) -> int:
        """The current revision."""

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        """Change frames after ``since``, oldest first; gone when not all are kept."""


class ServerCursor:
    """Where one stream stands: ``last`` revision covered, its ``kinds`` and access ``level``."""

    __slots__ = ("kinds", "last", "level", "lines")

    def __init__(
        self, lines: FrameLines, kinds: frozenset[str] | None, level: Level, last: int
    ) -> None:
        self.lines = lines
        self.kinds = kinds
        self.level = level
        self.last = last

    def take(self, frame: ChangeFrame) -> bytes | None:
        """The line to write for ``frame`` and cover it; None when already covered (its
        revision is not after ``last``) or when none of its changes matches ``kinds``."""
        if frame.revision <= self.last:
            return None
        self.last = frame.revision
        return self.lines.line(frame, self.kinds, self.level)

    def replay(self, history: History) -> list[bytes] | GoneFrame:
        """The lines of the kept frames after ``last`` (covering them); gone when not kept."""
        found = history.frames_since(self.last)
        if isinstance(found, GoneFrame):
            return found
        return [line for frame in found if (line := self.take(frame)) is not None]

    def take_now(self, frame: ChangeFrame, pending: int, received: int) -> bytes | None:
        """:meth:`take` for a frame written the moment it is published, past the queue: its
        line, ``b""`` when covered with nothing to write, None when it must wait its turn.

        Only a frame new to this stream, and only when the subscription holds no frame
        (``pending``) and none was taken from it that is not yet covered (``received``, the
        revision of the last frame taken): lines stay in order and none is skipped.
        """
        last = self.last
        if frame.revision <= last or pending or received > last:
            return None
        self.last = frame.revision
        return self.lines.line(frame, self.kinds, self.level) or b""

    def caught_up(self, history: History, pending: int = 0) -> int:
        """``last``, or the current revision when no frame lies between them.

        Revisions without a change frame (a document that appeared, content that changed
        with no reported change) move the revision too: a bookmark or an empty long-poll
        answer names the current one once nothing is pending, so a resume starts there.
        """
        current = history.revision
        if current <= self.last or pending:
            return self.last
        found = history.frames_since(self.last)
        return current if isinstance(found, list) and not found else self.last

    def bookmark(self, history: History, pending: int = 0) -> bytes:
        """The bookmark line of a heartbeat or a shutdown (covering the revisions it names)."""
        self.last = self.caught_up(history, pending)
        return bookmark_line(self.last)

    def overflow(self) -> bytes:
        """The overflow line: the stream fell behind; resume after ``last``."""
        return overflow_line(self.last)


class Opening(NamedTuple):
    """How a watch stream starts: its first lines, and the cursor that follows them (None:
    the stream ends after them, which are a gone frame)."""

    first: list[bytes]
    cursor: ServerCursor | None


def open_stream(
    call: WatchCall,
    lines: FrameLines,
    history: History,
    state: Callable[[Level], tuple[int, bytes] | None],
) -> Opening | None:
    """The start of the ``/v1/watch`` stream ``call``; None when there is no state yet.

    Without ``since`` it opens with the state frame ``state(level)`` (its revision and line);
    with it, with the lines of the kept frames after ``since``, or ``gone`` when the history
    no longer holds them all (or never had ``since``).
    """
    if call.since is None:
        found = state(call.level)
        if found is None:
            return None
        revision, line = found
        return Opening([line], ServerCursor(lines, call.kinds, call.level, revision))
    cursor = ServerCursor(lines, call.kinds, call.level, call.since)
    replayed = cursor.replay(history)
    if isinstance(replayed, GoneFrame):
        return Opening([gone_line(replayed.oldest)], None)
    return Opening(replayed, cursor)
