"""Coalescing several change frames into the one frame a hook run receives (pure).

Changes to the same ``(kind, key)`` fold into one: the first ``old`` and the last ``new`` are
kept, and the op follows from whether the thing existed before the first change and after the
last one. ``added`` then ``removed`` is nothing; ``removed`` then ``added`` is ``modified``
(or nothing when the value came back unchanged); ``added`` then ``modified`` is ``added``;
``modified`` twice is ``modified`` with the fields unioned, or nothing when the value is back
where it started.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from imdsd.frames import Change, ChangeFrame, Kind, only_kinds

_APPEARS = frozenset({"added", "attached"})
_DISAPPEARS = frozenset({"removed", "detached"})


@dataclass(frozen=True)
class _Net:
    """The net effect so far of the changes to one key."""

    kind: Kind
    key: str
    existed: bool
    exists: bool
    old: Any
    new: Any
    appear_op: str | None
    disappear_op: str | None
    fields: tuple[str, ...]


def _start(change: Change) -> _Net:
    return _Net(
        kind=change.kind,
        key=change.key,
        existed=change.op not in _APPEARS,
        exists=change.op not in _DISAPPEARS,
        old=change.old,
        new=change.new,
        appear_op=change.op if change.op in _APPEARS else None,
        disappear_op=change.op if change.op in _DISAPPEARS else None,
        fields=tuple(change.fields or ()),
    )


def _fold(net: _Net, change: Change) -> _Net:
    later = _start(change)
    return _Net(
        kind=net.kind,
        key=net.key,
        existed=net.existed,
        exists=later.exists,
        old=net.old,
        new=later.new,
        appear_op=net.appear_op or later.appear_op,
        disappear_op=later.disappear_op or net.disappear_op,
        fields=net.fields + tuple(f for f in later.fields if f not in net.fields),
    )


def _changed_fields(old: Any, new: Any) -> list[str]:
    """Top-level keys whose values differ, when both sides are objects."""
    if isinstance(old, dict) and isinstance(new, dict):
        return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return []


def _result(net: _Net) -> Change | None:
    if not net.existed and not net.exists:
        return None
    if not net.existed:
        return Change(
            kind=net.kind, op=net.appear_op or "added", key=net.key, old=None, new=net.new
        )
    if not net.exists:
        op = net.disappear_op or "removed"
        return Change(kind=net.kind, op=op, key=net.key, old=net.old, new=None)
    if net.old == net.new:
        return None
    fields = list(net.fields)
    if net.appear_op or net.disappear_op:
        fields += [f for f in _changed_fields(net.old, net.new) if f not in fields]
    return Change(
        kind=net.kind, op="modified", key=net.key, old=net.old, new=net.new, fields=fields
    )


def merge_changes(changes: Iterable[Change]) -> list[Change]:
    """Fold changes (oldest first) per ``(kind, key)``, in order of each key's first change."""
    nets: dict[tuple[str, str], _Net] = {}
    for change in changes:
        slot = (change.kind, change.key)
        current = nets.get(slot)
        nets[slot] = _start(change) if current is None else _fold(current, change)
    return [c for c in map(_result, nets.values()) if c is not None]


def coalesce(frames: Sequence[ChangeFrame], kinds: frozenset[str]) -> ChangeFrame | None:
    """One frame holding the net changes of ``kinds`` in ``frames``; None if nothing is left.

    A single relevant frame is passed through unchanged (restricted to ``kinds``). Several are
    merged into a frame with ``revision`` and ``at`` of the last one and ``covers`` set to the
    first and last revision merged.
    """
    relevant = [f for f in (only_kinds(f, kinds) for f in frames) if f is not None and f.changes]
    if not relevant:
        return None
    if len(relevant) == 1:
        return relevant[0]
    merged = merge_changes(c for f in relevant for c in f.changes)
    if not merged:
        return None
    last = relevant[-1]
    return ChangeFrame(
        revision=last.revision,
        at=last.at,
        changes=merged,
        covers=[relevant[0].revision, last.revision],
    )


def has_changes(frames: Sequence[ChangeFrame], kinds: frozenset[str]) -> bool:
    """True if any frame holds a change of one of ``kinds``."""
    return any(c.kind in kinds for f in frames for c in f.changes)


def count_relevant(frames: Sequence[ChangeFrame], kinds: frozenset[str]) -> int:
    """How many frames hold a change of one of ``kinds``."""
    return sum(1 for f in frames if any(c.kind in kinds for c in f.changes))
