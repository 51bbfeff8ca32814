"""Revisions, watch-resume history and hook delivery marks (sans-IO).

The store holds the current snapshot and turns each new snapshot into at most one
:class:`~imdsd.frames.ChangeFrame`. Revision rules:

- The revision only grows and is never reused, also across restarts (the persisted state,
  or the revision high-water mark when the state was lost, is the starting point).
- The first snapshot (no current snapshot: first start, or the persisted snapshot was lost)
  is a *baseline*: it takes ``revision + 1`` so that ETags and state frames have a revision,
  but it produces no change frame. Nothing before a baseline can be resumed from.
- After that, a snapshot with no changes creates no revision; one with changes creates
  exactly one revision and one frame holding all its changes.

``oldest`` is the oldest revision a watch can resume from: ``frames_since(oldest)`` returns
every frame after it, anything older is :class:`~imdsd.frames.GoneFrame` ``(oldest)``.
``gaps`` are revision ranges ``(low, high]`` that were never published (the revision mark was
raised, then the daemon died before the record holding them was written; see
:func:`imdsd.persist.apply_mark`): no correct client can resume from inside one, so that is
gone too, while the history around them stays whole.

Publishing: with ``publish_on_save`` (the daemon's store) a new revision is *published* --
visible through :attr:`Store.published_revision`, :attr:`Store.published_snapshot` and
:meth:`Store.published_since` -- only once a save holding it succeeded: the shell takes a
:meth:`Store.begin_save` ticket, saves its state, and :meth:`Store.saved` then publishes the
ticket's revision and returns the change frames to broadcast. Without it every apply is
published at once (for tests and tools that do not persist).

History is bounded by count (``history``) and by the encoded size of the kept frames
(``history_bytes``); the oldest frames go first and :attr:`Store.oldest` moves up.

Persistence bookkeeping: every change to what :meth:`Store.to_state` returns bumps
:attr:`Store.generation`. The shell saves ``to_state()`` and then calls
:meth:`Store.mark_saved` with the generation it read before saving; :attr:`Store.dirty` and
:attr:`Store.must_save` then tell whether another save is needed.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec

from imdsd.frames import Change, ChangeFrame, GoneFrame
from imdsd.model import Snapshot
from imdsd.timestamps import format_timestamp

S = TypeVar("S", bound=msgspec.Struct)

DiffFunction = Callable[[S, S], list[Change]]
SnapshotRule = Callable[[S, S], bool]
CarryFunction = Callable[[S, S], S]

_frame_encoder = msgspec.json.Encoder()


def document_appeared(old: Snapshot, new: Snapshot) -> bool:
    """True when ``new`` holds a document readers could not see in ``old`` (or a load
    balancer became absent): such a snapshot takes a revision even without changes."""
    return (
        (old.instance is None and new.instance is not None)
        or (old.scheduled_events is None and new.scheduled_events is not None)
        or (old.loadbalancer is None and new.loadbalancer is not None)
        or (old.loadbalancer_absent != new.loadbalancer_absent and new.loadbalancer is None)
    )


class PersistedState(msgspec.Struct, Generic[S], frozen=True, kw_only=True):
    """Everything the store keeps across restarts; validated on construction and decoding.

    ``oldest`` is the oldest revision a watch can resume from, ``history`` the kept change
    frames (strictly increasing revisions in ``(oldest, revision]``), ``hooks`` the last
    revision delivered to each hook, ``gaps`` the never-published ranges ``(low, high]``
    (increasing, below ``revision``) that a resume cannot start from.
    """

    revision: int = 0
    oldest: int = 0
    snapshot: S | None = None
    history: list[ChangeFrame] = msgspec.field(default_factory=list)
    hooks: dict[str, int] = msgspec.field(default_factory=dict)
    gaps: list[tuple[int, int]] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.revision < 0:
            raise ValueError(f"revision {self.revision} is negative")
        if not 0 <= self.oldest <= self.revision:
            raise ValueError(f"oldest {self.oldest} is not within 0..revision {self.revision}")
        previous = self.oldest
        for frame in self.history:
            if not previous < frame.revision <= self.revision:
                raise ValueError(
                    f"history frame revision {frame.revision} is not within "
                    f"{previous + 1}..{self.revision}"
                )
            previous = frame.revision
        for name, delivered in self.hooks.items():
            if not 0 <= delivered <= self.revision:
                raise ValueError(
                    f"hook {name!r} delivered revision {delivered} is not within 0..{self.revision}"
                )
        previous = 0
        for low, high in self.gaps:
            if not previous <= low < high < self.revision:
                raise ValueError(f"gap ({low}, {high}] is not within {previous}..{self.revision}")
            previous = high


@dataclass(frozen=True, slots=True)
class SaveTicket(Generic[S]):
    """What one save writes: the state as of ``generation`` (see :meth:`Store.begin_save`)."""

    generation: int
    state: PersistedState[S]


class Store(Generic[S]):
    """Current snapshot, revision counter, bounded change history and hook delivery marks.

    ``diff(old, new)`` lists the changes between two snapshots of ``snapshot_type``;
    ``history`` is how many change frames are kept for watch resume and ``history_bytes``
    (None: no limit) how many bytes their JSON may take. ``state`` restores a previously
    persisted state (see :func:`imdsd.statelog.StateLog.load`); frames beyond the limits are
    dropped, oldest first. ``carry(previous, new)`` (optional) prepares each new snapshot
    before it is diffed; ``appeared(old, new)`` (optional) says when a snapshot without
    changes still holds something new to readers. ``publish_on_save``: see the module doc.
    """

    def __init__(
        self,
        *,
        diff: DiffFunction[S],
        snapshot_type: type[S],
        history: int,
        history_bytes: int | None = None,
        state: PersistedState[S] | None = None,
        carry: CarryFunction[S] | None = None,
        appeared: SnapshotRule[S] | None = None,
        publish_on_save: bool = False,
    ) -> None:
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        if history_bytes is not None and history_bytes < 0:
            raise ValueError(f"history_bytes must be >= 0, got {history_bytes}")
        if state is None:
            state = PersistedState()
        if state.snapshot is not None and not isinstance(state.snapshot, snapshot_type):
            raise TypeError(
                f"persisted snapshot is a {type(state.snapshot).__name__}, "
                f"expected {snapshot_type.__name__}"
            )
        self._diff = diff
        self._carry = carry
        self._appeared = appeared
        self.snapshot_type = snapshot_type
        self._snapshot: S | None = state.snapshot
        self._revision = state.revision
        self._oldest = state.oldest
        self._history = history
        self._history_bytes = history_bytes
        self._frames: collections.deque[ChangeFrame] = collections.deque()
        self._sizes: collections.deque[int] = collections.deque()
        self._bytes = 0
        self._gaps = list(state.gaps)
        self._prune_gaps()
        for frame in state.history:
            self._keep(frame)
        self._hooks: dict[str, int] = dict(state.hooks)
        self._generation = 0
        self._critical_generation = 0
        self._saved_generation = 0
        self._publish_on_save = publish_on_save
        self._published: tuple[int, S | None] = (self._revision, self._snapshot)
        self._pending: list[ChangeFrame] = []

    @property
    def snapshot(self) -> S | None:
        """The current (applied, maybe not yet published) snapshot, None before the first."""
        return self._snapshot

    @property
    def revision(self) -> int:
        """The current (applied, maybe not yet published) revision; 0 in a fresh store."""
        return self._revision

    @property
    def published_revision(self) -> int:
        """The revision readers, watchers and hooks see."""
        return self._published[0]

    @property
    def published_snapshot(self) -> S | None:
        """The snapshot readers see (None before the first one is published)."""
        return self._published[1]

    @property
    def publish_on_save(self) -> bool:
        """True when revisions are published by :meth:`saved`, not by :meth:`apply`."""
        return self._publish_on_save

    @property
    def unpublished(self) -> int:
        """How many revisions are applied but not yet published (not yet saved)."""
        return self._revision - self._published[0]

    @property
    def oldest(self) -> int:
        """The oldest revision ``frames_since`` can resume from."""
        return self._oldest

    @property
    def history_size(self) -> int:
        """Number of change frames currently kept."""
        return len(self._frames)

    @property
    def history_bytes(self) -> int:
        """Encoded size of the change frames currently kept."""
        return self._bytes

    @property
    def history_limit(self) -> int:
        """Maximum number of change frames kept."""
        return self._history

    def update(self, fields: Mapping[str, Any], now: datetime | float) -> bool:
        """Replace some fields of the current snapshot; True when anything changed.

        The usual poll -- every field equal to the current snapshot's -- changes nothing and
        skips the diff. Otherwise the new snapshot is applied (see :meth:`apply`); a document
        that ``appeared`` takes a revision even without changes.
        """
        current = self._snapshot
        if current is not None and all(
            getattr(current, name) == value for name, value in fields.items()
        ):
            return False
        new = msgspec.structs.replace(current or self.snapshot_type(), **fields)
        appeared = self._appeared
        before = self._generation
        fresh = current is not None and appeared is not None and appeared(current, new)
        self.apply(new, now, new_content=fresh)
        return self._generation != before

    def apply(
        self, snapshot: S, now: datetime | float, *, new_content: bool = False
    ) -> ChangeFrame | None:
        """Make ``snapshot`` current; return the change frame of the new revision, if any.

        A baseline (no current snapshot) takes a new revision but returns None; a snapshot
        without changes keeps the revision and returns None, unless ``new_content`` says it
        holds something readers could not see before (e.g. a document that appeared for the
        first time): then it takes a revision without a frame, so ETags stay truthful.
        """
        if not isinstance(snapshot, self.snapshot_type):
            raise TypeError(
                f"snapshot is a {type(snapshot).__name__}, expected {self.snapshot_type.__name__}"
            )
        frame = self._apply(snapshot, format_timestamp(now), new_content)
        if not self._publish_on_save:
            self._published = (self._revision, self._snapshot)
        return frame

    def _apply(self, snapshot: S, at: str, new_content: bool) -> ChangeFrame | None:
        previous = self._snapshot
        if previous is None:
            self._snapshot = snapshot
            self._revision += 1
            self._oldest = self._revision
            self._clear_history()
            self._prune_gaps()
            self._pending.clear()
            # A baseline has no changes to deliver: hooks are up to date with it.
            for hook in self._hooks:
                self._hooks[hook] = self._revision
            self._changed(critical=True)
            return None
        if self._carry is not None:
            snapshot = self._carry(previous, snapshot)
        changes = self._diff(previous, snapshot)
        self._snapshot = snapshot
        if not changes:
            if new_content:
                self._revision += 1
                self._changed(critical=True)
            elif snapshot != previous:
                self._changed(critical=False)
                if not self.unpublished:  # same revision, nothing pending: show it at once
                    self._published = (self._revision, snapshot)
            return None
        self._revision += 1
        frame = ChangeFrame(revision=self._revision, at=at, changes=list(changes))
        self._keep(frame)
        self._changed(critical=True)
        if self._publish_on_save:
            self._pending.append(frame)
        return frame

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        """Change frames with revision > ``since``, oldest first.

        ``since`` below :attr:`oldest` (history no longer complete), above the current
        revision (a client that saw a revision this store never had, e.g. after state loss)
        or inside a never-published gap gives ``GoneFrame(oldest)``.
        """
        in_gap = any(low < since <= high for low, high in self._gaps)
        if in_gap or not self._oldest <= since <= self._revision:
            return GoneFrame(oldest=self._oldest)
        found: list[ChangeFrame] = []
        for frame in reversed(self._frames):
            if frame.revision <= since:
                break
            found.append(frame)
        found.reverse()
        return found

    def published_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        """Like :meth:`frames_since`, for the published revisions only."""
        limit = self._published[0]
        if since > limit:
            return GoneFrame(oldest=self._oldest)
        found = self.frames_since(since)
        if isinstance(found, GoneFrame) or not found or found[-1].revision <= limit:
            return found
        return [frame for frame in found if frame.revision <= limit]

    def begin_save(self) -> SaveTicket[S]:
        """A ticket holding the state to save now; pass it to :meth:`saved` once on disk."""
        return SaveTicket(self._generation, self.to_state())

    def saved(self, ticket: SaveTicket[S]) -> list[ChangeFrame]:
        """Record that ``ticket``'s state is on disk and publish it.

        Returns the change frames this publishes (none without ``publish_on_save``: each
        apply published its own frame), oldest first.
        """
        self.mark_saved(ticket.generation)
        revision = ticket.state.revision
        if revision < self._published[0]:
            return []
        if revision == self._revision:
            self._published = (revision, self._snapshot)
        elif revision > self._published[0]:
            self._published = (revision, ticket.state.snapshot)
        done = [frame for frame in self._pending if frame.revision <= revision]
        del self._pending[: len(done)]
        return done

    def delivered(self, hook: str) -> int | None:
        """The last revision delivered to ``hook``, None if never marked."""
        return self._hooks.get(hook)

    @property
    def hooks(self) -> Mapping[str, int]:
        """A copy of the delivered revision of every known hook."""
        return dict(self._hooks)

    def mark_delivered(self, hook: str, revision: int) -> bool:
        """Record that ``hook`` has seen everything up to ``revision``; True if that changed.

        Marks only move forward: a lower revision than the recorded one is ignored.
        """
        if not 0 <= revision <= self._revision:
            raise ValueError(
                f"hook {hook!r}: delivered revision {revision} is not within 0..{self._revision}"
            )
        current = self._hooks.get(hook)
        if current is not None and current >= revision:
            return False
        self._hooks[hook] = revision
        self._changed(critical=True)
        return True

    def forget_hooks(self, keep: Iterable[str]) -> bool:
        """Drop the delivery marks of every hook not in ``keep``; True if any was dropped."""
        kept = set(keep)
        gone = [name for name in self._hooks if name not in kept]
        for name in gone:
            del self._hooks[name]
        if gone:
            self._changed(critical=True)
        return bool(gone)

    @property
    def generation(self) -> int:
        """Counter bumped by every change to the persisted state."""
        return self._generation

    @property
    def dirty(self) -> bool:
        """True when something changed since the last :meth:`mark_saved`."""
        return self._generation > self._saved_generation

    @property
    def must_save(self) -> bool:
        """True when a revision or hook mark is unsaved (not just a snapshot-only update).

        Snapshot-only updates may be saved lazily; these should be saved promptly.
        """
        return self._critical_generation > self._saved_generation

    def mark_saved(self, generation: int) -> None:
        """Record that the state as of ``generation`` (read before saving) is on disk."""
        if generation > self._generation:
            raise ValueError(f"generation {generation} is ahead of {self._generation}")
        self._saved_generation = max(self._saved_generation, generation)

    def to_state(self) -> PersistedState[S]:
        """An immutable copy of everything to persist (safe to encode in another thread)."""
        return PersistedState(
            revision=self._revision,
            oldest=self._oldest,
            snapshot=self._snapshot,
            history=list(self._frames),
            hooks=dict(self._hooks),
            gaps=list(self._gaps),
        )

    def _keep(self, frame: ChangeFrame) -> None:
        size = len(_frame_encoder.encode(frame))
        self._frames.append(frame)
        self._sizes.append(size)
        self._bytes += size
        limit = self._history_bytes
        while self._frames and (
            len(self._frames) > self._history or (limit is not None and self._bytes > limit)
        ):
            self._oldest = self._frames.popleft().revision
            self._bytes -= self._sizes.popleft()
        self._prune_gaps()

    def _prune_gaps(self) -> None:
        """Forget gaps wholly below :attr:`oldest` (resumes there are gone anyway)."""
        while self._gaps and self._gaps[0][1] < self._oldest:
            del self._gaps[0]

    def _clear_history(self) -> None:
        self._frames.clear()
        self._sizes.clear()
        self._bytes = 0

    def _changed(self, *, critical: bool) -> None:
        self._generation += 1
        if critical:
            self._critical_generation = self._generation
