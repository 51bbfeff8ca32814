"""A hook's process tree, read from ``/proc`` (sync, Linux).

``setsid`` takes a process out of the hook's process group, so a group kill misses it, but not
out of its tree: its parent is still one of the hook's processes. :class:`ProcessTree`
remembers every process it has seen below the hook, by pid and start time (a reused pid is
never taken for one of them), so it can signal each of them even after their parents exited
and they were reparented. What it cannot find is a process whose whole chain of parents up to
a known process exited between two looks (a fast double fork): reparented away from the hook,
nothing in ``/proc`` links it to the hook any more. :func:`become_subreaper` makes such
orphans children of the daemon instead of init; :meth:`ProcessTree.below` finds them there
(they are in sessions other than the daemon's), so they can still be killed and reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from typing import NamedTuple

PR_SET_CHILD_SUBREAPER = 36

Identity = tuple[int, int]
"""A process as (pid, start time in clock ticks since boot)."""


class _Stat(NamedTuple):
    state: bytes
    ppid: int
    session: int
    start: int


def _stat(pid: int) -> _Stat | None:
    """What ``/proc/<pid>/stat`` says, or None when ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        return None
    return _Stat(fields[0], int(fields[1]), int(fields[3]), int(fields[19]))


def children(pid: int) -> list[int]:
    """The children of ``pid`` (of all its threads); [] when it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found += [int(child) for child in f.read().split()]
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue
            return _children_by_scan(pid)  # kernel without CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return found


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat.ppid == pid:
            found.append(int(entry.name))
    return found


class ProcessTree:
    """Every process seen below ``root`` (root excluded) since it started.

    Call :meth:`observe` often while the hook runs: each call adds the current descendants of
    the root and of every known process still alive.
    """

    def __init__(self, root: int | None) -> None:
        self.root = root
        self.known: set[Identity] = set()

    @classmethod
    def below(cls, pid: int) -> ProcessTree:
        """The processes now below ``pid`` outside its session, followed from there on.

        Processes ``pid`` starts later are not taken in, and neither are children in its own
        session: hook processes run in sessions of their own, and nothing below them can ever
        join ``pid``'s session again, so what is left is exactly what hooks started.
        """
        tree = cls(None)
        session = os.getsid(pid)
        for child in children(pid):
            stat = _stat(child)
            if stat is not None and stat.session != session:
                tree.known.add((child, stat.start))
        tree.observe()
        return tree

    def observe(self) -> None:
        """Add the processes now below the root or below a known live process.

        Known processes that are gone (or whose pid was reused) are forgotten.
        """
        queue = [] if self.root is None else [self.root]
        for pid, start in list(self.known):
            stat = _stat(pid)
            if stat is None or stat.start != start:
                self.known.discard((pid, start))
            elif stat.state not in (b"Z", b"X"):
                queue.append(pid)
        seen = set(queue)
        while queue:
            for child in children(queue.pop()):
                if child in seen:
                    continue
                seen.add(child)
                stat = _stat(child)
                if stat is not None:
                    self.known.add((child, stat.start))
                    queue.append(child)

    def live(self) -> list[int]:
        """Known processes still running (zombies and reused pids excluded)."""
        out = []
        for pid, start in self.known:
            stat = _stat(pid)
            if stat is not None and stat.start == start and stat.state not in (b"Z", b"X"):
                out.append(pid)
        return sorted(out)

    def signal(self, sig: signal.Signals) -> int:
        """Send ``sig`` to every known live process; returns how many were signalled."""
        sent = 0
        for pid in self.live():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                sent += 1
        return sent

    def reap(self) -> None:
        """Collect known processes that ended as children of this process (a subreaper)."""
        me = os.getpid()
        for pid, start in list(self.known):
            stat = _stat(pid)
            if stat is None:
                self.known.discard((pid, start))
            elif stat.start == start and stat.ppid == me and stat.state in (b"Z", b"X"):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux); True on success."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
