"""Signals and the graceful stop of ``imdsd run``.

SIGHUP reloads (:mod:`imdsd.daemon_reload`); SIGTERM and SIGINT stop: ``STOPPING=1``, the
redirect removed first (agents go straight to IMDS), pollers cancelled, watch streams ended
with a final bookmark, then the API closed, running hooks waited for, the state persisted.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Final

import structlog
import trio

if TYPE_CHECKING:
    from imdsd.daemon import Daemon

log = structlog.get_logger("imdsd.daemon")

HOOK_SHUTDOWN_DEADLINE: Final = 3.0
WATCHERS_DRAIN: Final = 1.0
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

_outside_trio: list[int] = []


def _remember(signum: int, frame: object) -> None:
    _outside_trio.append(signum)


def remember_stop_signals() -> None:
    """Before ``trio.run``: SIGTERM and SIGINT outside :func:`handle_signals` are remembered,
    not fatal. One that comes before trio listens stops the daemon as soon as it runs; one
    that comes after trio stopped listening (imdsd is already stopping, e.g. a second
    SIGTERM) changes nothing, so the exit stays 0 instead of death by signal."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _remember)


def ignore_stop_signals() -> None:
    """After the daemon stopped: ignore SIGTERM and SIGINT until the process exits (Python's
    finalization resets handlers written in Python to the default, which would make a late
    second SIGTERM a death by signal instead of exit 0)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


async def handle_signals(daemon: Daemon) -> None:
    """Reload on SIGHUP, stop on SIGTERM or SIGINT, until cancelled."""
    with trio.open_signal_receiver(signal.SIGHUP, *STOP_SIGNALS) as signals:
        if _outside_trio:
            log.info("signal received", signal=signal.Signals(_outside_trio[0]).name)
            daemon.stop()
        async for signum in signals:
            if signum == signal.SIGHUP:
                await daemon.reload()
            else:
                log.info("signal received", signal=signal.Signals(signum).name)
                daemon.stop()


async def shutdown(daemon: Daemon, api_scope: trio.CancelScope) -> None:
    """Stop gracefully; ``api_scope`` is cancelled once the watch streams have ended."""
    daemon.notifier.stopping("stopping")
    log.info("stopping", revision=daemon.keeper.revision)
    await daemon.redirect.remove()  # before the front stops: agents go straight to IMDS
    daemon.cancel_pollers()
    daemon.keeper.broadcaster.close()  # watch streams end with a final bookmark
    with trio.move_on_after(WATCHERS_DRAIN):
        await daemon.api.watchers.wait_none_open()
    api_scope.cancel()
    clean = await daemon.hooks.shutdown(HOOK_SHUTDOWN_DEADLINE)
    saved = await daemon.keeper.flush()
    await daemon.client.aclose()
    log.info("stopped", hooks_clean=clean, state_saved=saved)
