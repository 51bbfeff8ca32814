"""Hooks: run scripts on changes, safely and at least once (CONTRACT section 5).

``load_hooks(config)`` builds the hook list (again on SIGHUP); ``HookDispatcher`` runs them
over the store (a :class:`HookLedger`) whenever its revision advances.
"""

from imdsd.hooks.dispatcher import HookDispatcher
from imdsd.hooks.ledger import HookLedger, WaitForRevision
from imdsd.hooks.merge import coalesce, merge_changes
from imdsd.hooks.model import Hook, RunAs
from imdsd.hooks.runner import RunResult, hook_environment, run_hook_process
from imdsd.hooks.schedule import HookSchedule, Outcome, backoff_delay
from imdsd.hooks.sources import HookUserError, check_hook_file, load_hooks, resolve_user
from imdsd.hooks.stats import HookCounters, HookMetrics, HookStatus, LastRun

__all__ = [
    "Hook",
    "HookCounters",
    "HookDispatcher",
    "HookLedger",
    "HookMetrics",
    "HookSchedule",
    "HookStatus",
    "HookUserError",
    "LastRun",
    "Outcome",
    "RunAs",
    "RunResult",
    "WaitForRevision",
    "backoff_delay",
    "check_hook_file",
    "coalesce",
    "hook_environment",
    "load_hooks",
    "merge_changes",
    "resolve_user",
    "run_hook_process",
]
