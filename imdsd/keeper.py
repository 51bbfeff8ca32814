"""The write path: fetched documents -> store -> disk -> watchers and hooks (trio shell).

Every good document from a poller is applied to the :class:`~imdsd.store.Store`. A new
revision is written to disk *before* anyone can see it (reads, watchers, hooks all see the
*published* revision), so a crash can never make a change reach a consumer that a restart
would then report again, nor reuse a revision number someone has seen. Snapshot-only updates and
hook delivery marks are saved promptly by a background saver. A failed save is logged and
retried; it never stops the daemon.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import msgspec
import structlog
import trio

from imdsd.broadcast import Broadcaster, Subscription
from imdsd.changes import diff
from imdsd.frames import ChangeFrame, GoneFrame
from imdsd.model import Instance, LoadBalancer, ScheduledEvents, Snapshot
from imdsd.persist import PersistError, load_state, save_state
from imdsd.store import Store

log = structlog.get_logger("imdsd.keeper")

SAVE_RETRY: Final = 5.0
LAZY_SAVE_DELAY: Final = 1.0

FrameListener = Callable[[ChangeFrame], None]


def load_store(directory: str, history: int) -> Store[Snapshot]:
    """Load the persisted state (never fails on bad content) into a store."""
    loaded = load_state(directory, Snapshot)
    if loaded.problem:
        log.warning("state discarded", problem=loaded.problem, moved_to=loaded.moved_to)
    store = Store(diff=diff, snapshot_type=Snapshot, history=history, state=loaded.state)
    log.info(
        "state loaded",
        directory=directory,
        revision=store.revision,
        snapshot=store.snapshot is not None,
        history=store.history_size,
    )
    return store


def _appeared(old: Snapshot, new: Snapshot) -> bool:
    """True when a document readers could not see before is now known (or became absent)."""
    return (
        (old.instance is None and new.instance is not None)
        or (old.scheduled_events is None and new.scheduled_events is not None)
        or (old.loadbalancer is None and new.loadbalancer is not None)
        or (old.loadbalancer_absent != new.loadbalancer_absent and new.loadbalancer is None)
    )


class StateKeeper:
    """Owns the store's write path; it is the pollers' sink and the hooks' ledger."""

    def __init__(self, store: Store[Snapshot], directory: str) -> None:
        self.store = store
        self.directory = directory
        self.broadcaster = Broadcaster()
        self.fetched_at: dict[str, float] = {}
        self.listeners: list[FrameListener] = []
        self.save_failures = 0
        self.ready = trio.Event()
        if store.snapshot is not None and store.snapshot.instance is not None:
            self.ready.set()
        self._published: tuple[int, Snapshot | None] = (store.revision, store.snapshot)
        self._lock = trio.Lock()
        self._revision_event = trio.Event()
        self._save_wanted = trio.Event()

    # -- reads -------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        """The published snapshot (None before the first one)."""
        return self._published[1]

    @property
    def revision(self) -> int:
        """The published revision: on disk, or saving it failed and was logged."""
        return self._published[0]

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        """Published change frames after ``since``, or gone."""
        found = self.store.frames_since(since)
        limit = self._published[0]
        if isinstance(found, GoneFrame) or not found or found[-1].revision <= limit:
            return found
        return [frame for frame in found if frame.revision <= limit]

    def subscribe(self, max_pending: int, after: int) -> Subscription:
        """A live subscription to frames published after revision ``after``."""
        return self.broadcaster.subscribe(max_pending, after)

    async def wait_for_revision(self, revision: int) -> None:
        """Return once the store's revision is above ``revision``."""
        while self.revision <= revision:
            await self._revision_event.wait()

    # -- the pollers' sink -------------------------------------------------------------

    async def instance(self, doc: Instance, raw: dict[str, Any]) -> None:
        """A new instance document."""
        await self._apply("instance", instance=doc, instance_raw=raw)

    async def scheduled_events(self, doc: ScheduledEvents, raw: dict[str, Any]) -> None:
        """A new scheduled events document."""
        await self._apply("scheduled_events", scheduled_events=doc, scheduled_events_raw=raw)

    async def loadbalancer(self, doc: LoadBalancer, raw: dict[str, Any]) -> None:
        """A new load balancer document."""
        await self._apply(
            "loadbalancer", loadbalancer=doc, loadbalancer_raw=raw, loadbalancer_absent=False
        )

    async def loadbalancer_absent(self) -> None:
        """Upstream said 404: no Standard Load Balancer."""
        await self._apply(
            "loadbalancer", loadbalancer=None, loadbalancer_raw=None, loadbalancer_absent=True
        )

    async def _apply(self, endpoint: str, **fields: Any) -> None:
        async with self._lock:
            now = time.time()
            before = self.store.revision
            current = self.store.snapshot or Snapshot()
            if self.store.snapshot is not None and all(
                getattr(current, name) == value for name, value in fields.items()
            ):
                self.fetched_at[endpoint] = now  # the usual poll: nothing new to diff
                return
            new = msgspec.structs.replace(current, **fields)
            frame = self.store.apply(new, now, new_content=_appeared(current, new))
            self.fetched_at[endpoint] = now
            if self.store.revision == before:  # same revision: new content may show at once
                self._published = (before, self.store.snapshot)
            if self.store.must_save:
                await self._save()
            elif self.store.dirty:
                self._save_wanted.set()
            if self.store.revision != before:
                self._published = (self.store.revision, self.store.snapshot)
                if frame is not None:
                    self._publish(frame)
                self._wake_revision_waiters()
            snapshot = self._published[1]
            if snapshot is not None and snapshot.instance is not None:
                self.ready.set()

    def _publish(self, frame: ChangeFrame) -> None:
        log.info(
            "changes",
            revision=frame.revision,
            kinds=sorted({c.kind for c in frame.changes}),
            count=len(frame.changes),
        )
        for listener in self.listeners:  # first: the API writes to parked watchers directly
            try:
                listener(frame)
            except Exception:
                log.exception("frame listener failed")
        self.broadcaster.publish(frame)

    def _wake_revision_waiters(self) -> None:
        self._revision_event.set()
        self._revision_event = trio.Event()

    # -- the hooks' ledger -------------------------------------------------------------

    def delivered(self, hook: str) -> int | None:
        """The last revision delivered to ``hook``."""
        return self.store.delivered(hook)

    def mark_delivered(self, hook: str, revision: int) -> bool:
        """Record a delivery; it is saved promptly by the saver."""
        changed = self.store.mark_delivered(hook, revision)
        if changed:
            self._save_wanted.set()
        return changed

    def forget_hooks(self, keep: Iterable[str]) -> bool:
        """Drop delivery marks of hooks no longer configured."""
        changed = self.store.forget_hooks(keep)
        if changed:
            self._save_wanted.set()
        return changed

    # -- persistence -------------------------------------------------------------------

    async def _save(self) -> bool:
        generation = self.store.generation
        state = self.store.to_state()
        try:
            await trio.to_thread.run_sync(save_state, self.directory, state)
        except (PersistError, OSError) as exc:
            self.save_failures += 1
            log.error("state not saved; will retry", error=str(exc), revision=state.revision)
            self._save_wanted.set()
            return False
        self.store.mark_saved(generation)
        return True

    async def run_saver(self) -> None:
        """Save pending state changes (hook marks, snapshot-only updates) until cancelled."""
        while True:
            await self._save_wanted.wait()
            self._save_wanted = trio.Event()
            if not self.store.must_save:
                await trio.sleep(LAZY_SAVE_DELAY)
            async with self._lock:
                ok = not self.store.dirty or await self._save()
            if not ok:
                await trio.sleep(SAVE_RETRY)

    async def flush(self) -> bool:
        """Save now if anything is unsaved (at shutdown); True when the state is on disk."""
        async with self._lock:
            return not self.store.dirty or await self._save()
