"""Per-hook scheduling (sans-IO): when a hook runs, what it receives, what a result means.

Nothing is queued per hook. The schedule keeps the hook's delivered revision and computes the
next run's frame from ``ledger.frames_since(delivered)``, so changes that arrive during a run,
a debounce window or a retry backoff simply end up in the next frame. Time is passed in.

Debounce is a window opened by the first undelivered change: the run starts ``debounce``
seconds after it (or when the previous run ends, if later), with everything stored by then.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from imdsd.frames import ChangeFrame, GoneFrame
from imdsd.hooks.ledger import HookLedger
from imdsd.hooks.merge import coalesce, count_relevant, has_changes
from imdsd.hooks.model import Hook

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0


class Outcome(Enum):
    """How one run ended."""

    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    NOT_STARTED = "not-started"
    """The process could not be started for lack of resources (EMFILE ...): retried with
    backoff like a failure, but it does not use up an attempt and is never given up."""


@dataclass(frozen=True)
class Idle:
    """Nothing to do until the revision advances (or the hook is replaced)."""


@dataclass(frozen=True)
class WaitUntil:
    """Nothing to do before ``at`` (a debounce window or a retry backoff)."""

    at: float


@dataclass(frozen=True)
class Ready:
    """A run is due: take a slot, then call :meth:`HookSchedule.start`."""


Action = Idle | WaitUntil | Ready
IDLE = Idle()
READY = Ready()


@dataclass(frozen=True)
class Delivery:
    """What one run delivers.

    ``frame`` is None when the pending changes cancelled out (no run; delivered has already
    advanced). ``upto`` is the revision delivered advances to when the run succeeds or is given
    up. ``gone_oldest`` is set when history no longer reached back to the delivered revision
    and only frames from that revision on were available.
    """

    frame: ChangeFrame | None
    upto: int
    attempt: int
    gone_oldest: int | None = None


@dataclass(frozen=True)
class Verdict:
    """What a finished run means: ``result`` is ok, failed, timeout or gave-up."""

    result: str
    attempts: int
    retry_at: float | None = None


def backoff_delay(failures: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Delay before retry number ``failures`` (1, 2, ...): base, 2*base, 4*base ... <= cap."""
    return float(min(cap, base * 2 ** max(0, failures - 1)))


class HookSchedule:
    """The scheduling state of one hook over a :class:`HookLedger`.

    A hook the ledger has never seen starts at the current revision: it gets no history.
    Changes already pending at construction open their debounce window at the first
    :meth:`next_action`.
    """

    def __init__(
        self,
        hook: Hook,
        ledger: HookLedger,
        *,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        self._hook = hook
        self._ledger = ledger
        self._backoff = (backoff_base, backoff_cap)
        known = ledger.delivered(hook.name)
        self.fresh = known is None
        if known is None or known > ledger.revision:
            known = ledger.revision
            ledger.mark_delivered(hook.name, known)
        self._delivered = known
        self._pending_since: float | None = None
        self._in_flight: Delivery | None = None
        self._failures = 0
        self._stalls = 0
        self._retry_at: float | None = None

    @property
    def hook(self) -> Hook:
        """The current definition (a reload may replace it)."""
        return self._hook

    @property
    def delivered(self) -> int:
        """The last revision delivered (or given up)."""
        return self._delivered

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`finished` / :meth:`abandon`."""
        return self._in_flight is not None

    @property
    def failures(self) -> int:
        """Failed attempts of the delivery being retried (0 when not retrying)."""
        return self._failures

    @property
    def retry_at(self) -> float | None:
        """When the next retry is due, if one is."""
        return self._retry_at

    def update(self, hook: Hook) -> None:
        """Take a changed definition; a pending retry is due again, with fresh attempts."""
        if hook == self._hook:
            return
        self._hook = hook
        self._retry_at = None
        self._failures = 0
        self._stalls = 0

    def remark(self) -> None:
        """Write the delivered revision to the ledger again (after it forgot this hook)."""
        self._ledger.mark_delivered(self._hook.name, self._delivered)

    def _catch_up(self) -> None:
        """Take a delivered mark the ledger moved ahead (a baseline has nothing to deliver)."""
        known = self._ledger.delivered(self._hook.name)
        if known is not None and known > self._delivered:
            self._delivered = known

    def revision_advanced(self, now: float) -> None:
        """Note that the ledger's revision advanced at ``now`` (opens the debounce window)."""
        covered = self._in_flight.upto if self._in_flight is not None else self._delivered
        if self._pending_since is None and self._ledger.revision > covered:
            self._pending_since = now

    def next_action(self, now: float) -> Action:
        """What to do at ``now``; revisions with none of the hook's kinds are passed at once."""
        if self._in_flight is not None:
            return IDLE
        if self._retry_at is not None:
            return READY if now >= self._retry_at else WaitUntil(self._retry_at)
        self._catch_up()
        revision = self._ledger.revision
        if self._delivered >= revision:
            self._pending_since = None
            return IDLE
        frames = self._ledger.frames_since(self._delivered)
        if not isinstance(frames, GoneFrame) and not has_changes(frames, self._hook.kinds):
            self._advance(revision)
            self._pending_since = None
            return IDLE
        if self._pending_since is None:
            self._pending_since = now
        due = self._pending_since + self._hook.debounce
        return READY if now >= due else WaitUntil(due)

    def start(self, now: float, upto: int | None = None) -> Delivery:
        """Begin a run at ``now``: the coalesced frame of every change since delivered.

        ``upto`` stops the frame at that revision (a directory pass gives each of its hooks
        the same changes); later changes stay pending, their window opening at ``now``.
        """
        self._catch_up()
        revision = self._ledger.revision
        upto = revision if upto is None else min(upto, revision)
        frames = self._ledger.frames_since(self._delivered)
        gone: int | None = None
        if isinstance(frames, GoneFrame):
            gone = frames.oldest
            available = self._ledger.frames_since(frames.oldest)
            frames = [] if isinstance(available, GoneFrame) else available
        frames = [f for f in frames if f.revision <= upto]
        self._pending_since = None if upto >= revision else now
        self._retry_at = None
        frame = coalesce(frames, self._hook.kinds)
        delivery = Delivery(frame=frame, upto=upto, attempt=self._failures + 1, gone_oldest=gone)
        if frame is None:
            self._advance(upto)
            self._failures = 0
        else:
            self._in_flight = delivery
        return delivery

    def finished(self, now: float, outcome: Outcome) -> Verdict:
        """Record how the run ended; success or giving up advances delivered."""
        delivery = self._in_flight
        if delivery is None:
            raise RuntimeError(f"hook {self._hook.name!r}: finished() without start()")
        self._in_flight = None
        if outcome is Outcome.OK:
            self._advance(delivery.upto)
            self._failures = self._stalls = 0
            return Verdict(result="ok", attempts=delivery.attempt)
        if outcome is Outcome.NOT_STARTED:
            self._stalls += 1
        else:
            self._failures += 1
        if self._failures > self._hook.retries:
            self._advance(delivery.upto)
            self._failures = self._stalls = 0
            return Verdict(result="gave-up", attempts=delivery.attempt)
        delay = backoff_delay(self._failures + self._stalls, *self._backoff)
        self._retry_at = now + delay
        return Verdict(result=outcome.value, attempts=delivery.attempt, retry_at=self._retry_at)

    def abandon(self) -> None:
        """Forget the run in flight without marking it delivered (removal, shutdown)."""
        self._in_flight = None

    def pending_revisions(self) -> int:
        """How many undelivered revisions hold changes of the hook's kinds."""
        frames = self._ledger.frames_since(self._delivered)
        if isinstance(frames, GoneFrame):
            available = self._ledger.frames_since(frames.oldest)
            frames = [] if isinstance(available, GoneFrame) else available
        return count_relevant(frames, self._hook.kinds)

    def _advance(self, revision: int) -> None:
        if revision > self._delivered:
            self._delivered = revision
            self._ledger.mark_delivered(self._hook.name, revision)
