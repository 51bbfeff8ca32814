"""The hook dispatcher (trio shell): wakes hooks when the revision advances and runs them.

One task per ``[[hook]]`` drives its :class:`HookSchedule`; one task per ``<kind>.d/``
directory (a *lane*) runs that directory's due hooks one after another in lexical order, like
run-parts. A ``trio.CapacityLimiter`` bounds how many hook processes run at once. The only
input is "the ledger's revision advanced": every frame a run receives is computed from the
ledger, never queued.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import structlog
import trio

from imdsd.api.access import AccessPolicy
from imdsd.frames import KINDS, encode_line
from imdsd.hooks.access import frame_for_hook
from imdsd.hooks.ledger import HookLedger, WaitForRevision
from imdsd.hooks.model import Hook
from imdsd.hooks.report import count_run, log_run
from imdsd.hooks.runner import (
    KILL_GRACE,
    OUTPUT_CAP,
    READ_TAIL,
    RunResult,
    hook_environment,
    run_hook_process,
    sweep_orphans,
)
from imdsd.hooks.schedule import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    Delivery,
    HookSchedule,
    Ready,
    Verdict,
    WaitUntil,
)
from imdsd.hooks.sources import check_hook_file
from imdsd.hooks.stats import HookMetrics, HookStatus, LastRun
from imdsd.hooks.workers import Lane, Worker
from imdsd.timestamps import now_timestamp

log = structlog.get_logger("imdsd.hooks")

_SPURIOUS_WAKE_PAUSE = 0.1


class HookDispatcher:
    """Runs ``hooks`` on the changes stored in ``ledger``, at least once each.

    ``wait_for_revision(rev)`` must return once ``ledger.revision > rev``. Hook runs get
    ``IMDSD_SOCKET=socket_path``; at most ``max_parallel`` run at once. Each run's frame is
    redacted by ``policy`` for the uid and gid the hook runs as, as the socket would redact
    it. The other keyword options exist for tests (shorter kill grace and backoff). An
    unexpected error in a hook's task is logged and the hook carries on after
    ``backoff_base`` seconds; it never ends the dispatcher.
    """

    def __init__(
        self,
        hooks: Iterable[Hook],
        ledger: HookLedger,
        wait_for_revision: WaitForRevision,
        socket_path: str,
        max_parallel: int,
        *,
        kill_grace: float = KILL_GRACE,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        output_cap: int = OUTPUT_CAP,
        read_tail: float = READ_TAIL,
        euid: int | None = None,
        policy: AccessPolicy | None = None,
    ) -> None:
        self._ledger = ledger
        self._wait_for_revision = wait_for_revision
        self._socket_path = socket_path
        self._limiter = trio.CapacityLimiter(max_parallel)
        self._kill_grace = kill_grace
        self._backoff = (backoff_base, backoff_cap)
        self._output_cap = output_cap
        self._read_tail = read_tail
        self._euid = os.geteuid() if euid is None else euid
        self._egid = os.getegid()
        self.policy = policy or AccessPolicy()
        """The socket's access policy, applied to each run's frame (replace it on reload)."""
        self.adopt_orphans = False
        """Set when this process is a child subreaper starting no processes but hooks: then
        whatever is below it once no hook runs is a hook's leftover, and is killed."""
        self._sweeping = False
        self._workers: dict[str, Worker] = {}
        self._lanes: dict[str, Lane] = {}
        self._nursery: trio.Nursery | None = None
        self._cancel = trio.CancelScope()
        self._done = trio.Event()
        self._stopping = False
        self._running = 0
        self._run_ended = trio.Event()
        self.metrics = HookMetrics()
        """Counters per hook, for /metrics."""
        self.replace_hooks(hooks)

    @property
    def hooks(self) -> list[Hook]:
        """The current hook definitions."""
        return [w.schedule.hook for w in self._workers.values() if not w.removed]

    def set_max_parallel(self, max_parallel: int) -> None:
        """Change how many hooks may run at once (on reload)."""
        self._limiter.total_tokens = max_parallel

    def replace_hooks(self, hooks: Iterable[Hook]) -> None:
        """Switch to a new hook set (SIGHUP), by name.

        An unchanged hook keeps all its state; a changed one keeps its delivered revision and
        counters, and a pending retry is due again with fresh attempts. A removed hook's
        running process finishes but its delivery is not recorded. Delivery marks of hooks no
        longer configured are dropped from the ledger.
        """
        wanted: dict[str, Hook] = {}
        for hook in hooks:
            if hook.name in wanted:
                log.error("hook skipped", hook=hook.name, reason="duplicate name")
                continue
            wanted[hook.name] = hook
        for name, worker in list(self._workers.items()):
            if name not in wanted and not worker.removed:
                self._remove(worker)
                log.info("hook removed", hook=name)
        for name, hook in wanted.items():
            existing = self._workers.get(name)
            if existing is not None and existing.schedule.hook.directory_kind != (
                hook.directory_kind
            ):
                self._remove(existing)
                existing = None
            if existing is None:
                self._add(hook)
                continue
            worker = self._revive(existing) if existing.removed else existing
            if worker.schedule.hook != hook:
                worker.schedule.update(hook)
                log.info("hook changed", hook=name)
            worker.poke()
        self._ledger.forget_hooks(wanted)

    def _remove(self, worker: Worker) -> None:
        """Stop following ``worker``'s hook; a running process finishes first."""
        worker.removed = True
        name = worker.schedule.hook.name
        if not worker.started or (worker.lane is not None and not worker.schedule.running):
            if self._workers.get(name) is worker:
                del self._workers[name]
        elif worker.lane is None and not worker.schedule.running:
            worker.scope.cancel()

    def _forget_removed(self, worker: Worker) -> None:
        name = worker.schedule.hook.name
        if worker.removed and self._workers.get(name) is worker:
            del self._workers[name]

    def _add(self, hook: Hook) -> None:
        schedule = HookSchedule(
            hook, self._ledger, backoff_base=self._backoff[0], backoff_cap=self._backoff[1]
        )
        kind = hook.directory_kind
        lane = None if kind is None else self._lanes.setdefault(kind, Lane(kind))
        worker = Worker(schedule, lane)
        self._workers[hook.name] = worker
        self.metrics.of(hook.name)
        if schedule.fresh:
            log.info("hook added", hook=hook.name, starts_after=schedule.delivered)
        if self._nursery is not None:
            self._start(worker, self._nursery)

    def _revive(self, worker: Worker) -> Worker:
        """A removed hook that is back before its task ended keeps its schedule."""
        worker.schedule.remark()
        if not worker.scope.cancel_called:
            worker.removed = False
            return worker
        revived = Worker(worker.schedule, worker.lane)
        revived.last_run = worker.last_run
        self._workers[worker.schedule.hook.name] = revived
        if self._nursery is not None:
            self._start(revived, self._nursery)
        return revived

    def _start(self, worker: Worker, nursery: trio.Nursery) -> None:
        if worker.started:
            return
        worker.started = True
        lane = worker.lane
        if lane is None:
            nursery.start_soon(self._serve, worker, name=f"hook {worker.schedule.hook.name}")
        elif not lane.started:
            lane.started = True
            nursery.start_soon(self._serve_lane, lane, name=f"hooks {lane.kind}.d")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dispatch until cancelled or :meth:`shutdown`; ready once every hook is followed."""
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for worker in list(self._workers.values()):
                        self._start(worker, nursery)
                    task_status.started()
                    await self._follow_revisions()
        finally:
            self._nursery = None
            self._done.set()

    async def shutdown(self, timeout: float) -> bool:
        """Start no more runs, wait up to ``timeout`` s for running ones, then kill the rest.

        Returns True when nothing had to be killed. Undelivered changes stay pending in the
        ledger and are delivered after the next start.
        """
        self._stopping = True
        for worker in self._workers.values():
            worker.poke()
        with trio.move_on_after(timeout):
            while self._running:
                await self._run_ended.wait()
        clean = self._running == 0
        if not clean:
            log.warning("hooks killed at shutdown", running=self._running)
        self._cancel.cancel()
        if any(w.started for w in self._workers.values()):
            await self._done.wait()
        if self.adopt_orphans:
            with trio.CancelScope(shield=True):
                clean = not await sweep_orphans(self._kill_grace) and clean
        return clean

    def status(self) -> list[HookStatus]:
        """Each hook's state for ``imdsd status``."""
        try:
            now: float | None = trio.current_time()
        except RuntimeError:
            now = None
        out: list[HookStatus] = []
        for worker in self._workers.values():
            schedule = worker.schedule
            hook = schedule.hook
            retry_at = schedule.retry_at
            out.append(
                HookStatus(
                    name=hook.name,
                    kinds=[k for k in KINDS if k in hook.kinds],
                    source=hook.source,
                    running=schedule.running,
                    delivered_revision=schedule.delivered,
                    pending_revisions=schedule.pending_revisions(),
                    failures=schedule.failures,
                    retry_in=None
                    if retry_at is None or now is None
                    else round(max(0.0, retry_at - now), 3),
                    last_run=worker.last_run,
                )
            )
        return out

    async def _follow_revisions(self) -> None:
        seen = self._ledger.revision
        while True:
            await self._wait_for_revision(seen)
            revision = self._ledger.revision
            if revision == seen:
                log.warning("spurious revision wake-up", revision=revision)
                await trio.sleep(_SPURIOUS_WAKE_PAUSE)
                continue
            seen = revision
            now = trio.current_time()
            for worker in self._workers.values():
                worker.schedule.revision_advanced(now)
                worker.poke()

    async def _serve(self, worker: Worker) -> None:
        with worker.scope:
            while not worker.removed:
                try:
                    await self._step(worker)
                except Exception:
                    worker.schedule.abandon()
                    log.exception("hook worker error", hook=worker.schedule.hook.name)
                    await trio.sleep(self._backoff[0])
        self._forget_removed(worker)

    def _members(self, lane: Lane) -> list[Worker]:
        """The lane's hooks in lexical order of their file names."""
        members = [w for w in self._workers.values() if w.lane is lane and not w.removed]
        return sorted(members, key=lambda w: w.schedule.hook.command[0])

    async def _serve_lane(self, lane: Lane) -> None:
        while True:
            lane.current = None
            try:
                await self._lane_step(lane)
            except Exception:
                worker = lane.current
                if worker is not None:
                    worker.schedule.abandon()
                name = f"{lane.kind}.d" if worker is None else worker.schedule.hook.name
                log.exception("hook worker error", hook=name)
                await trio.sleep(self._backoff[0])

    async def _lane_step(self, lane: Lane) -> None:
        """Run one pass over the lane when a hook is due, else wait for the earliest one.

        A pass starts when one hook is due. Then each hook with changes up to the revision
        stored when the pass began runs after the previous one ended, with those changes
        (later ones go to the next pass), even if its own debounce has not elapsed; a hook
        waiting for a retry is left out. A failed hook does not stop the pass, and is retried
        in a later pass once its own backoff passed.
        """
        lane.wake = trio.Event()
        wait_until = math.inf
        due = False
        for worker in [] if self._stopping else self._members(lane):
            lane.current = worker
            action = worker.schedule.next_action(trio.current_time())
            due = due or isinstance(action, Ready)
            if isinstance(action, WaitUntil):
                wait_until = min(wait_until, action.at)
        if not due:
            lane.current = None
            with trio.move_on_at(wait_until):
                await lane.wake.wait()
            return
        target = self._ledger.revision
        for worker in self._members(lane):
            lane.current = worker
            if self._stopping:
                return
            schedule = worker.schedule
            action = schedule.next_action(trio.current_time())
            debouncing = isinstance(action, WaitUntil) and schedule.retry_at is None
            if schedule.delivered < target and (isinstance(action, Ready) or debouncing):
                await self._deliver(worker, upto=target)
            self._forget_removed(worker)

    async def _step(self, worker: Worker) -> None:
        """Do what the schedule says next: run, wait for a deadline, or wait for a change."""
        worker.wake = trio.Event()
        action = None if self._stopping else worker.schedule.next_action(trio.current_time())
        if isinstance(action, Ready):
            await self._deliver(worker)
        elif isinstance(action, WaitUntil):
            with trio.move_on_at(action.at):
                await worker.wake.wait()
        else:
            await worker.wake.wait()

    async def _deliver(self, worker: Worker, upto: int | None = None) -> None:
        async with self._limiter:
            if self._stopping or worker.removed:
                return
            schedule = worker.schedule
            hook = schedule.hook
            delivery = schedule.start(trio.current_time(), upto)
            if delivery.gone_oldest is not None:
                log.warning(
                    "hook history incomplete",
                    hook=hook.name,
                    oldest=delivery.gone_oldest,
                    detail="changes older than the kept history were not delivered",
                )
            if delivery.frame is None:
                log.debug("hook changes cancelled out", hook=hook.name, upto=delivery.upto)
                return
            self._running += 1
            try:
                result = await self._attempt(hook, delivery)
            except BaseException:
                schedule.abandon()
                raise
            finally:
                self._running -= 1
                self._run_ended.set()
                self._run_ended = trio.Event()
        self._record(worker, hook, delivery, result)
        if self.adopt_orphans and not self._running and not self._sweeping:
            assert self._nursery is not None
            self._sweeping = True
            self._nursery.start_soon(self._sweep)

    async def _sweep(self) -> None:
        try:
            if not self._running:  # checked in the same step sweep_orphans takes its snapshot
                await sweep_orphans(self._kill_grace)
        finally:
            self._sweeping = False

    async def _attempt(self, hook: Hook, delivery: Delivery) -> RunResult:
        assert delivery.frame is not None
        frame = frame_for_hook(delivery.frame, hook.run_as, self.policy, self._euid, self._egid)
        if hook.directory_kind is not None:
            reason = check_hook_file(hook.command[0], self._euid)
            if reason is not None:
                return RunResult(
                    exit_code=None, timed_out=False, duration=0.0, error=f"refused: {reason}"
                )
        return await run_hook_process(
            hook.argv(frame.revision),
            encode_line(frame),
            hook_environment(frame, self._socket_path),
            timeout=hook.timeout,
            run_as=hook.run_as,
            kill_grace=self._kill_grace,
            output_cap=self._output_cap,
            read_tail=self._read_tail,
        )

    def _record(self, worker: Worker, hook: Hook, delivery: Delivery, result: RunResult) -> None:
        counters = self.metrics.of(hook.name)
        outcome = count_run(counters, result)
        if worker.removed:
            worker.schedule.abandon()
            verdict = Verdict(result=outcome.value, attempts=delivery.attempt)
        else:
            verdict = worker.schedule.finished(trio.current_time(), outcome)
        if verdict.result == "gave-up":
            counters.give_ups += 1
        worker.last_run = LastRun(
            at=now_timestamp(),
            result=verdict.result,
            exit_code=result.exit_code,
            duration=round(result.duration, 6),
        )
        log_run(hook, delivery, result, outcome, verdict)
