"""Change and frame shapes of CONTRACT sections 3 and 4, shared by the store, API and hooks."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Kind = Literal["tags", "disks", "network", "scheduled_events", "compute", "loadbalancer"]
KINDS: tuple[Kind, ...] = (
    "tags",
    "disks",
    "network",
    "scheduled_events",
    "compute",
    "loadbalancer",
)


class Change(msgspec.Struct, frozen=True, omit_defaults=True):
    """One change: what kind, what happened, to which key, old and new values.

    ``fields`` lists the changed sub-fields and is present only on ``modified``.
    ``old`` and ``new`` are always present (``null`` when there is nothing).
    """

    kind: Kind
    op: str
    key: str
    old: Any
    new: Any
    fields: list[str] | None = None


class StateFrame(msgspec.Struct, frozen=True, tag="state", tag_field="type"):
    """The whole current state at ``revision``; the first frame of a watch without ``since``."""

    revision: int
    state: dict[str, Any]


class ChangeFrame(msgspec.Struct, frozen=True, tag="change", tag_field="type", omit_defaults=True):
    """All changes of one revision (or, for a coalesced hook run, of several).

    ``covers`` is set only on coalesced hook frames: the first and last revision merged.
    """

    revision: int
    at: str
    changes: list[Change]
    covers: list[int] | None = None


class BookmarkFrame(msgspec.Struct, frozen=True, tag="bookmark", tag_field="type"):
    """Heartbeat on a watch stream: nothing happened up to ``revision``."""

    revision: int


class GoneFrame(msgspec.Struct, frozen=True, tag="gone", tag_field="type"):
    """The requested ``since`` is older than the kept history; ``oldest`` is the oldest kept."""

    oldest: int


class OverflowFrame(msgspec.Struct, frozen=True, tag="overflow", tag_field="type"):
    """This watcher fell too far behind; resume with ``since=revision``."""

    revision: int


Frame = StateFrame | ChangeFrame | BookmarkFrame | GoneFrame | OverflowFrame

_encoder = msgspec.json.Encoder()
_frame_decoder = msgspec.json.Decoder(Frame)


def encode_line(frame: Frame) -> bytes:
    """Encode a frame as one NDJSON line (with the trailing newline)."""
    return _encoder.encode(frame) + b"\n"


def decode_frame(line: bytes) -> Frame:
    """Decode one NDJSON line into a frame; raises ``msgspec.ValidationError``/``DecodeError``."""
    frame: Frame = _frame_decoder.decode(line)
    return frame


def only_kinds(frame: ChangeFrame, kinds: frozenset[str] | None) -> ChangeFrame | None:
    """Return ``frame`` restricted to ``kinds`` (all when None), or None if nothing is left."""
    if kinds is None:
        return frame
    kept = [c for c in frame.changes if c.kind in kinds]
    if not kept:
        return None
    if len(kept) == len(frame.changes):
        return frame
    return msgspec.structs.replace(frame, changes=kept)
