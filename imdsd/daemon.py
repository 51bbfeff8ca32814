"""The composition root of ``imdsd run``: builds every part from the config and runs them.

Lifecycle (systemd ``Type=notify``): load the persisted state, listen (or adopt the sockets
systemd passed), start the pollers, the socket API and the hooks; ``READY=1`` once a snapshot
is available and the socket serves. ``WATCHDOG=1`` at half of ``WATCHDOG_USEC`` while the
pollers run and the socket answers a self-probe. SIGHUP reloads the configuration
(``RELOADING=1`` ... ``READY=1``) without dropping watchers, keeping the old configuration
when the new one is invalid. SIGTERM/SIGINT: ``STOPPING=1``, stop accepting, end watch streams
with a final bookmark, wait for running hooks, persist, exit 0.

The steps live beside it: :mod:`.daemon_command` (``imdsd run``), :mod:`.daemon_context`
(what the API and the front see), :mod:`.daemon_reload`, :mod:`.daemon_stop` (signals and
the graceful stop) and :mod:`.daemon_watchdog` (``STATUS=``, ``WATCHDOG=1``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
import trio

from imdsd import __version__
from imdsd.api.metrics import Metrics
from imdsd.api.server import ApiServer, open_listeners
from imdsd.config import Config, ServerConfig
from imdsd.daemon_context import DaemonContext
from imdsd.daemon_reload import reload, warn_restricted_paths
from imdsd.daemon_stop import handle_signals, shutdown
from imdsd.daemon_watchdog import report_status, watchdog
from imdsd.fdlimit import FdLimitError, ensure_fd_limit, reserve
from imdsd.frames import ChangeFrame
from imdsd.front.server import MAX_CONNECTIONS as FRONT_MAX_CONNECTIONS
from imdsd.front.server import FrontServer, open_front_listeners
from imdsd.health import HealthBoard, daemon_status
from imdsd.hooks.dispatcher import HookDispatcher
from imdsd.hooks.sources import load_hooks
from imdsd.httpio.listeners import ListenError
from imdsd.keeper import StateKeeper
from imdsd.metrics_server import MAX_CONNECTIONS as METRICS_MAX_CONNECTIONS
from imdsd.metrics_server import MetricsServer, open_metrics_listeners
from imdsd.poller import run_pollers
from imdsd.redirect_daemon import RedirectControl
from imdsd.systemd import Notifier
from imdsd.timestamps import format_timestamp
from imdsd.upstream.budget import Budget
from imdsd.upstream.client import ImdsClient

log = structlog.get_logger("imdsd.daemon")


class Daemon:
    """Every part of ``imdsd run``, built from one configuration."""

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        *,
        notifier: Notifier | None = None,
        inherited: Sequence[socket.socket] = (),
        metrics_inherited: Sequence[socket.socket] = (),
        front_inherited: Sequence[socket.socket] = (),
    ) -> None:
        self.config = config
        self.config_path = config_path
        warn_restricted_paths(config)
        self.notifier = notifier or Notifier(None)
        self.inherited = list(inherited)
        self.metrics_inherited = list(metrics_inherited)
        self.front_inherited = list(front_inherited)
        state = config.state
        self.keeper = StateKeeper.load(state.directory, state.history, state.history_bytes)
        self.board = HealthBoard()
        self.budget = Budget(config.imds.max_requests_per_second)
        self.metrics = Metrics()
        self.client = ImdsClient(config.imds, self.budget, metrics=self.metrics)
        self.hooks = HookDispatcher(
            load_hooks(config),
            self.keeper,
            self.keeper.wait_for_revision,
            config.server.socket,
            config.hooks.max_parallel,
        )
        self.metrics.hooks = self.hooks.metrics
        self.metrics.revision.track(lambda: self.keeper.revision)
        self.metrics.state_save_failures.track(lambda: self.keeper.save_failures)
        self.metrics.state_saved.track(lambda: float(self.keeper.save_error is None))
        self.metrics.state_last_save.track(lambda: self.keeper.saved_at or 0.0)
        self.metrics.budget_in_use.track(lambda: self.budget.in_use())  # noqa: PLW0108 - rebound on reload
        self.metrics.budget_rate.track(lambda: self.budget.rate)
        self.metrics.budget_waiting.track(lambda: self.budget.waiting)
        self.metrics.upstream_freshness = self.freshness
        self.keeper.listeners.append(lambda frame: self.metrics.count_changes(frame.changes))
        recent = self.keeper.frames_since(max(self.keeper.revision - 1, 0))
        self.last_change = (
            _change_summary(recent[-1]) if isinstance(recent, list) and recent else None
        )
        self.keeper.listeners.append(self._note_change)
        self.api = ApiServer(DaemonContext(self), config.server, self.metrics)
        self.hooks.policy = self.api.policy  # hooks see what the socket shows their uid
        self.keeper.listeners.append(self.api.deliver)
        self.metrics_server = MetricsServer(self.metrics)
        self.front: FrontServer | None = None
        if config.front.listen or self.front_inherited:
            self.front = FrontServer(
                DaemonContext(self),
                config.front,
                client=lambda: self.client,
                budget=lambda: self.budget,
                policy=lambda: self.api.policy,
                metrics=self.metrics,
            )
        self.redirect = RedirectControl(config.front.redirect and self.front is not None)
        self.front_listeners: Sequence[trio.SocketListener] = ()
        self.front_error: str | None = None  # the front could not listen: degraded, no redirect
        self.serving = False
        self.pollers_alive = False
        self._pollers_scope = trio.CancelScope()
        self._stop = trio.Event()
        self.probe_path: str | None = None  # the API's unix socket, for the watchdog's probe

    # -- health ------------------------------------------------------------------------

    def freshness(self) -> dict[str, tuple[bool, float | None]]:
        """Per enabled endpoint: stale or not, and seconds since its last good fetch."""
        now = trio.current_time()
        return {
            name: (
                h.state(now) == "stale",
                None if h.last_success is None else now - h.last_success,
            )
            for name, h in self.board.endpoints.items()
        }

    def health(self) -> dict[str, Any]:
        """The ``/v1/health`` and ``imdsd status`` document."""
        now = trio.current_time()
        doc = self.board.to_json(now, time.time())
        status, reason = daemon_status(
            doc["status"],
            serving_state=self.keeper.snapshot is not None,
            save_error=self.keeper.save_error,
            front_error=self.front_error or self.redirect.problem(),
        )
        doc.update(
            status=status,
            version=__version__,
            revision=self.keeper.revision,
            oldest=self.keeper.store.oldest,
            fetched_at={k: format_timestamp(v) for k, v in self.keeper.fetched_at.items()},
            watchers=self.api.watchers.active,
            connections=self.api.http.active,
            state_save_failures=self.keeper.save_failures,
            state_save=self.keeper.save_status(),
            last_change=self.last_change,
            hooks={s.name: msgspec.to_builtins(s) for s in self.hooks.status()},
        )
        doc.update(self.client.status())
        if reason is not None:
            doc["reason"] = reason
        if self.front is not None:
            doc.update(front=self.front.status(), callers=self.front.callers())
            doc["front"]["error"] = self.front_error
            doc.update(redirect=self.redirect.status())
        return doc

    def _note_change(self, frame: ChangeFrame) -> None:
        self.last_change = _change_summary(frame)

    def status_line(self) -> str:
        """A one-line human status for systemd's ``STATUS=``."""
        status = self.board.status(trio.current_time())
        return (
            f"revision {self.keeper.revision}, upstream {status}, "
            f"{self.api.watchers.active} watchers, budget {self.budget.rate:g} req/s"
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`stop`); ``started`` once READY."""
        await self.redirect.clear_stale()  # first: stale rules must not outlive a failed start
        listeners = open_listeners(self.config.server, self.inherited)
        metrics_listeners = await open_metrics_listeners(
            self.config.metrics.listen, self.metrics_inherited
        )
        front_listeners = await self._open_front()
        self.front_listeners = front_listeners
        self.probe_path = _unix_path(listeners[0].socket)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_signals, self)
            nursery.start_soon(self.keeper.run_saver)
            api_scope = trio.CancelScope()
            await nursery.start(self._run_api, listeners, api_scope)
            if metrics_listeners:
                await nursery.start(self.metrics_server.serve, metrics_listeners)
                log.info("metrics listening", addresses=self.metrics_server.listening)
            if self.front is not None and front_listeners:
                await nursery.start(self.front.serve, front_listeners)
                log.info("front listening", addresses=self.front.listening)
            await nursery.start(self.hooks.run)
            nursery.start_soon(self._run_pollers)
            if await self._ready_or_stopped():
                log.info("ready", revision=self.keeper.revision, socket=self.probe_path)
                self.notifier.ready(self.status_line())
                if self.front_error is None:
                    await self.redirect.install(front_listeners)
                task_status.started()
                nursery.start_soon(report_status, self)
                if self.notifier.watchdog_interval:
                    nursery.start_soon(watchdog, self, self.notifier.watchdog_interval)
                await self._stop.wait()
            await shutdown(self, api_scope)
            nursery.cancel_scope.cancel()

    async def _open_front(self) -> list[trio.SocketListener]:
        """The front's listeners; a front that cannot listen is not fatal: logged, reported
        (``degraded``) and never redirected to, while everything else is served."""
        if self.front is None:
            return []
        try:
            return await open_front_listeners(self.config.front.listen, self.front_inherited)
        except ListenError as exc:
            self.front_error = str(exc)
            log.error("front not serving; agents reach IMDS directly", error=str(exc))
            return []

    async def _ready_or_stopped(self) -> bool:
        """Wait for the first snapshot or a stop request; True when ready."""
        async with trio.open_nursery() as race:

            async def until(event: trio.Event) -> None:
                await event.wait()
                race.cancel_scope.cancel()

            race.start_soon(until, self.keeper.ready)
            race.start_soon(until, self._stop)
        return self.keeper.ready.is_set() and not self._stop.is_set()

    def stop(self) -> None:
        """Ask the daemon to stop gracefully."""
        self._stop.set()

    async def _run_api(
        self,
        listeners: Sequence[trio.SocketListener],
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            self.serving = True
            try:
                await self.api.serve(listeners, task_status=task_status)
            finally:
                self.serving = False

    def cancel_pollers(self) -> None:
        """Cancel the pollers; :meth:`run` starts them again (with the current client) unless
        the daemon is stopping."""
        self._pollers_scope.cancel()

    async def _run_pollers(self) -> None:
        while not self._stop.is_set():
            self._pollers_scope = trio.CancelScope()
            with self._pollers_scope:
                self.pollers_alive = True
                try:
                    self.board = HealthBoard()
                    await run_pollers(self.config, self.client, self.keeper, self.board)
                finally:
                    self.pollers_alive = False

    async def reload(self) -> bool:
        """Re-read the configuration and apply it; keep the old one when it is invalid."""
        return await reload(self)

    def _carried(self, new: Config, running: int) -> ServerConfig:
        """``new.server``, unless the descriptor limit cannot carry its ``max_connections``:
        then (logged) the same section with the running ``max_connections``."""
        front = self.front is not None
        metrics = bool(new.metrics.listen or self.metrics_inherited)
        try:
            ensure_fd_limit(new.server.max_connections, fd_reserve(new, front, metrics))
        except FdLimitError as exc:
            log.error("max_connections not changed", error=str(exc), kept=running)
            return msgspec.structs.replace(new.server, max_connections=running)
        return new.server


def _change_summary(frame: ChangeFrame) -> dict[str, Any]:
    """``{"revision", "at", "kinds"}`` of a change frame, for ``imdsd status``."""
    kinds = sorted({change.kind for change in frame.changes})
    return {"revision": frame.revision, "at": frame.at, "kinds": kinds}


def _unix_path(sock: Any) -> str | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    return name if isinstance(name, str) and name else None


def fd_reserve(config: Config, front: bool, metrics: bool) -> int:
    """Descriptors kept apart from ``server.max_connections`` (see :mod:`imdsd.fdlimit`)."""
    listeners = {"front": FRONT_MAX_CONNECTIONS if front else 0}
    listeners["metrics"] = METRICS_MAX_CONNECTIONS if metrics else 0
    return reserve(config.hooks.max_parallel, listeners)
