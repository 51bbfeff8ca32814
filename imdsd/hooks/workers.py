"""The dispatcher's per-hook and per-directory task state (trio events, no logic)."""

from __future__ import annotations

import trio

from imdsd.hooks.schedule import HookSchedule
from imdsd.hooks.stats import LastRun


class Lane:
    """The hooks of one ``<kind>.d/`` directory, run by one task in lexical order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.wake = trio.Event()
        self.started = False
        self.current: Worker | None = None


class Worker:
    """One hook's state: its schedule, wake-up event, lane (directory hooks) and last run."""

    def __init__(self, schedule: HookSchedule, lane: Lane | None = None) -> None:
        self.schedule = schedule
        self.lane = lane
        self.wake = trio.Event()
        self.scope = trio.CancelScope()
        self.removed = False
        self.started = False
        self.last_run: LastRun | None = None

    def poke(self) -> None:
        """Wake the hook's task (its lane's, for a directory hook)."""
        self.wake.set()
        if self.lane is not None:
            self.lane.wake.set()
