"""File descriptors for ``server.max_connections``: the plan (pure) and the rlimit shell.

Every accepted connection holds one descriptor, so the daemon needs, besides its
connections, a reserve for everything else it opens:

- ``BASE_RESERVE`` (64): stdio, the log, trio's epoll and wakeup fds, the listening sockets,
  the upstream keep-alive connections (one per lane), the state directory's files while
  saving, the systemd notify socket and the short-lived connection of the watchdog probe;
- ``HOOK_RESERVE`` (4) per hook that may run at once (``hooks.max_parallel``): stdout and
  stderr pipes, a pidfd and the ``/proc`` scans of the hook's process tree;
- the connection caps of the optional TCP listeners that are enabled (front, metrics).

At start (:func:`ensure_fd_limit`) the soft ``RLIMIT_NOFILE`` is raised to what is needed,
up to the hard limit; when even the hard limit cannot carry it the daemon refuses to start
with one line naming ``server.max_connections``, the limit and the fix (exit 78), instead of
failing later with "too many open files" while clients wait. Connections over
``max_connections`` are answered 503 and closed at once, so the reserve is never eaten into.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

BASE_RESERVE: Final = 64
HOOK_RESERVE: Final = 4
UNLIMITED: Final = resource.RLIM_INFINITY


class FdLimitError(ValueError):
    """``max_connections`` cannot be carried by the hard file descriptor limit."""


@dataclass(frozen=True, slots=True)
class FdPlan:
    """What the daemon needs (``needed``) and the soft limit to set (``soft``, unchanged or
    raised; ``raised`` says which), given the limits it found (``was``, ``hard``)."""

    needed: int
    was: int
    soft: int
    hard: int

    @property
    def raised(self) -> bool:
        """True when the soft limit must be raised."""
        return self.soft != self.was


def reserve(max_parallel_hooks: int, listeners: Mapping[str, int] | None = None) -> int:
    """Descriptors kept back from ``max_connections`` (see the module docstring)."""
    return BASE_RESERVE + HOOK_RESERVE * max_parallel_hooks + sum((listeners or {}).values())


def _fits(limit: int, needed: int) -> bool:
    return limit == UNLIMITED or limit >= needed


def plan_fd_limit(max_connections: int, reserved: int, soft: int, hard: int) -> FdPlan:
    """The soft limit for ``max_connections`` connections plus ``reserved`` descriptors.

    The soft limit is never lowered; it is raised to exactly what is needed (not to the hard
    limit, so hooks inherit no more than necessary). Raises :class:`FdLimitError` when the
    hard limit is too low.
    """
    needed = max_connections + reserved
    if _fits(soft, needed):
        return FdPlan(needed, soft, soft, hard)
    if _fits(hard, needed):
        return FdPlan(needed, soft, needed, hard)
    most = hard - reserved
    fix = (
        f"lower server.max_connections to at most {most} or raise LimitNOFILE="
        if most >= 1
        else "raise LimitNOFILE="
    )
    raise FdLimitError(
        f"server.max_connections = {max_connections} needs {needed} file descriptors "
        f"({reserved} more are reserved for upstream, state and hooks), but the hard "
        f"RLIMIT_NOFILE is {hard}: {fix} (systemd unit) or ulimit -Hn"
    )


def ensure_fd_limit(max_connections: int, reserved: int) -> FdPlan:
    """Raise this process's soft ``RLIMIT_NOFILE`` as :func:`plan_fd_limit` says.

    Raises :class:`FdLimitError` when the limit cannot carry ``max_connections``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = plan_fd_limit(max_connections, reserved, soft, hard)
    if plan.raised:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan.soft, hard))
        except (OSError, ValueError) as exc:
            raise FdLimitError(
                f"server.max_connections = {max_connections} needs {plan.needed} file "
                f"descriptors but the soft RLIMIT_NOFILE {soft} could not be raised: {exc}"
            ) from None
    return plan
