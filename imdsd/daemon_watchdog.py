"""What ``imdsd run`` tells systemd while it runs: ``STATUS=`` and ``WATCHDOG=1``.

The watchdog pings every ``interval`` (half of ``WATCHDOG_USEC``) only while the pollers run,
the API serves and its socket answers a ``/v1/health`` self-probe; otherwise the ping is
withheld (and logged), so systemd restarts a daemon that hangs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import structlog
import trio

from imdsd.httpio import ClientConnection, HttpIOError, open_unix

if TYPE_CHECKING:
    from imdsd.daemon import Daemon

log = structlog.get_logger("imdsd.daemon")

STATUS_EVERY: Final = 10.0
PROBE_TIMEOUT: Final = 5.0


async def report_status(daemon: Daemon) -> None:
    """``STATUS=`` at each new revision, and at least every :data:`STATUS_EVERY` seconds."""
    while True:
        daemon.notifier.status(daemon.status_line())
        with trio.move_on_after(STATUS_EVERY):
            await daemon.keeper.wait_for_revision(daemon.keeper.revision)


async def probe_socket(path: str) -> bool:
    """True when the unix socket at ``path`` answers ``/v1/health`` within a few seconds."""
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            conn = ClientConnection(await open_unix(path, PROBE_TIMEOUT))
            try:
                reply = await conn.request("GET", "/v1/health", [("host", "imdsd")])
            finally:
                await conn.aclose()
    except (HttpIOError, trio.TooSlowError):
        return False
    return reply.status in (200, 503)


async def watchdog(daemon: Daemon, interval: float) -> None:
    """``WATCHDOG=1`` every ``interval`` seconds while the daemon is healthy, until cancelled."""
    while True:
        if daemon.pollers_alive and daemon.serving and await _answers(daemon):
            daemon.notifier.watchdog()
        else:
            log.warning("watchdog withheld", pollers=daemon.pollers_alive, serving=daemon.serving)
        await trio.sleep(interval)


async def _answers(daemon: Daemon) -> bool:
    """The self-probe; an inherited socket that is not a unix path is trusted while serving."""
    return daemon.probe_path is None or await probe_socket(daemon.probe_path)
