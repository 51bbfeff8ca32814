"""The write path: fetched documents -> store -> disk -> watchers and hooks (trio shell).

Every good document from a poller goes to the sans-IO :class:`~imdsd.store.Store`, which
decides whether it is new and at which revision. A new revision is saved (one journal record,
see :mod:`imdsd.statelog`) and only then *published* -- to reads, watchers and hooks -- so a
crash or a full disk can never show a consumer a change that a restart would report again, nor
a revision number that could come back with other content. Saving and publishing is one step a
cancel cannot split: it runs shielded, bounded by :data:`SAVE_TIMEOUT` so shutdown cannot hang.

A failed save leaves the last durable revision published; the saver retries with backoff
(:data:`RETRY_FIRST` doubling up to :data:`RETRY_MAX`), health says ``degraded`` and the
metrics count it. Hook delivery marks and snapshot-only updates are saved by the saver.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import structlog
import trio

from imdsd.broadcast import Broadcaster, Subscription
from imdsd.changes import carry, diff
from imdsd.frames import ChangeFrame, GoneFrame
from imdsd.model import Instance, LoadBalancer, ScheduledEvents, Snapshot
from imdsd.persist import PersistError
from imdsd.statelog import StateLog
from imdsd.store import PersistedState, SaveTicket, Store, document_appeared
from imdsd.timestamps import format_timestamp

log = structlog.get_logger("imdsd.keeper")

SAVE_TIMEOUT: Final = 20.0
RETRY_FIRST: Final = 1.0
RETRY_MAX: Final = 60.0
LAZY_SAVE_DELAY: Final = 1.0

FrameListener = Callable[[ChangeFrame], None]
RunSync = Callable[..., Awaitable[Any]]


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking save in a worker thread; a timeout may abandon it (it then finishes
    alone, and the state log's lock keeps the next save behind it)."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def new_store(
    state: PersistedState[Snapshot] | None, history: int, history_bytes: int | None = None
) -> Store[Snapshot]:
    """The daemon's store: publishes a revision once saved, carries absent sections over."""
    return Store(
        diff=diff,
        snapshot_type=Snapshot,
        history=history,
        history_bytes=history_bytes,
        state=state,
        carry=carry,
        appeared=document_appeared,
        publish_on_save=True,
    )


def load_store(directory: str, history: int, history_bytes: int | None = None) -> Store[Snapshot]:
    """Load the persisted state (never fails on bad content) into a new store."""
    return StateKeeper.load(directory, history, history_bytes).store


class StateKeeper:
    """Owns the store's write path; it is the pollers' sink and the hooks' ledger.

    ``statelog`` saves the state (a fresh one compacts on its first save); ``run_sync`` runs
    a blocking save (tests replace it).
    """

    def __init__(
        self,
        store: Store[Snapshot],
        directory: str,
        *,
        statelog: StateLog[Snapshot] | None = None,
        run_sync: RunSync = _in_thread,
    ) -> None:
        if not store.publish_on_save:
            raise ValueError("the keeper's store must publish on save")
        self.store = store
        self.directory = directory
        self.statelog = statelog or StateLog(directory, Snapshot)
        self._run_sync = run_sync
        self.broadcaster = Broadcaster()
        self.fetched_at: dict[str, float] = {}
        self.listeners: list[FrameListener] = []
        self.save_failures = 0
        self.save_error: str | None = None
        self.saved_at: float | None = None
        self.ready = trio.Event()
        self._check_ready()
        self._lock = trio.Lock()
        self._revision_event = trio.Event()
        self._save_wanted = trio.Event()
        self._backoff = 0.0
        self._retry_at = float("-inf")

    @classmethod
    def load(cls, directory: str, history: int, history_bytes: int | None = None) -> StateKeeper:
        """A keeper continuing from the state persisted in ``directory``."""
        statelog = StateLog(directory, Snapshot)
        loaded = statelog.load()
        if loaded.problem:
            log.warning("state discarded", problem=loaded.problem, moved_to=loaded.moved_to)
        store = new_store(loaded.state, history, history_bytes)
        log.info(
            "state loaded",
            directory=directory,
            revision=store.revision,
            snapshot=store.snapshot is not None,
            history=store.history_size,
        )
        return cls(store, directory, statelog=statelog)

    # -- reads -------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        """The published snapshot (None before the first one)."""
        return self.store.published_snapshot

    @property
    def revision(self) -> int:
        """The published revision: always on disk."""
        return self.store.published_revision

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        """Published change frames after ``since``, or gone."""
        return self.store.published_since(since)

    def subscribe(self, max_pending: int, after: int) -> Subscription:
        """A live subscription to frames published after revision ``after``."""
        return self.broadcaster.subscribe(max_pending, after)

    async def wait_for_revision(self, revision: int) -> None:
        """Return once the published revision is above ``revision``."""
        while self.revision <= revision:
            await self._revision_event.wait()

    def save_status(self) -> dict[str, Any]:
        """The saver's state for ``/v1/health``."""
        return {
            "ok": self.save_error is None,
            "last_error": self.save_error,
            "failures": self.save_failures,
            "last_saved_at": None if self.saved_at is None else format_timestamp(self.saved_at),
            "unsaved_revisions": self.store.unpublished,
        }

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
            changed = self.store.update(fields, now)
            self.fetched_at[endpoint] = now
            if not changed:
                return
            self._check_ready()  # a snapshot-only update is published at once
            if not self.store.must_save:
                self._save_wanted.set()
            elif trio.current_time() < self._retry_at:
                self._save_wanted.set()  # saving fails: the saver retries after the backoff
            else:
                await self._commit()

    async def _commit(self) -> bool:
        """Save and publish as one step: shielded from cancellation, bounded in time."""
        with trio.CancelScope(shield=True), trio.move_on_after(SAVE_TIMEOUT):
            return await self._save()
        return False

    async def _save(self) -> bool:
        ticket = self.store.begin_save()
        error = f"saving took over {SAVE_TIMEOUT:g} s"
        ok = False
        try:
            await self._run_sync(self.statelog.save, ticket.state)
            ok = True
        except PersistError as exc:
            error = str(exc)
        except Exception as exc:  # a bug must not stop the saver: logged, retried, shown
            log.exception("state save failed unexpectedly")
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if ok:
                self._saved(ticket)
            else:
                self._failed(error, ticket)
        return ok

    def _saved(self, ticket: SaveTicket[Snapshot]) -> None:
        before = self.revision
        frames = self.store.saved(ticket)
        self.saved_at = time.time()
        if self.save_error is not None:
            log.info("state saved again", revision=ticket.state.revision)
        self.save_error = None
        self._backoff = 0.0
        self._retry_at = float("-inf")
        for frame in frames:
            self._publish(frame)
        if self.revision != before:
            self._wake_revision_waiters()
        self._check_ready()

    def _failed(self, error: str, ticket: SaveTicket[Snapshot]) -> None:
        self.save_failures += 1
        self.save_error = error
        self._backoff = min(max(self._backoff * 2, RETRY_FIRST), RETRY_MAX)
        self._retry_at = trio.current_time() + self._backoff
        log.error(
            "state not saved; will retry",
            error=error,
            revision=ticket.state.revision,
            published=self.revision,
            retry_in=self._backoff,
        )
        self._save_wanted.set()

    def _check_ready(self) -> None:
        snapshot = self.snapshot
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

    async def run_saver(self) -> None:
        """Save (and publish) what is pending until cancelled: unsaved revisions after a
        failure (with backoff), hook marks, snapshot-only updates."""
        while True:
            await self._save_wanted.wait()
            self._save_wanted = trio.Event()
            delay = self._retry_at - trio.current_time()
            if delay > 0:
                await trio.sleep(delay)
            elif not self.store.must_save:
                await trio.sleep(LAZY_SAVE_DELAY)
            async with self._lock:
                if self.store.dirty:
                    await self._commit()

    async def flush(self) -> bool:
        """Save now if anything is unsaved (at shutdown); True when the state is on disk."""
        async with self._lock:
            return not self.store.dirty or await self._commit()
