"""SIGHUP: apply a re-read configuration to the running daemon, or keep the old one.

``RELOADING=1`` ... ``READY=1`` around it. Watchers stay connected; the access policy,
hooks, budget, polling and the front's settings change at once; the settings that need a
restart (:func:`restart_settings`) are logged and keep their running values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from imdsd.config import Config, ConfigError, load_config
from imdsd.hooks.sources import load_hooks
from imdsd.instance_paths import restricted_path_problems
from imdsd.logs import configure_logging
from imdsd.upstream.client import ImdsClient

if TYPE_CHECKING:
    from imdsd.daemon import Daemon

log = structlog.get_logger("imdsd.daemon")


def warn_restricted_paths(config: Config) -> None:
    """Log each ``server.restricted_paths`` entry that can match no instance key."""
    for problem in restricted_path_problems(config.server.restricted_paths):
        log.warning("restricted path protects nothing", problem=problem)


def restart_settings(old: Config, new: Config) -> list[str]:
    """The settings changed from ``old`` to ``new`` that apply only after a restart."""
    keys = [
        f"server.{key}"
        for key in ("socket", "socket_mode", "socket_group")
        if getattr(old.server, key) != getattr(new.server, key)
    ]
    if old.state != new.state:
        keys.append("state")
    if old.metrics != new.metrics:
        keys.append("metrics.listen")
    if old.front.listen != new.front.listen:
        keys.append("front.listen")
    return keys


async def reload(daemon: Daemon) -> bool:
    """Re-read ``daemon.config_path`` and apply it; keep the old one when it is invalid."""
    daemon.notifier.reloading()
    try:
        new = load_config(daemon.config_path)
    except ConfigError as exc:
        log.error("reload failed; keeping the running configuration", error=str(exc))
        daemon.notifier.ready(daemon.status_line())
        return False
    old, daemon.config = daemon.config, new
    configure_logging(new.log.level, new.log.format)
    warn_restricted_paths(new)
    for key in restart_settings(old, new):
        log.warning("setting needs a restart to apply", key=key)
    if daemon.front is not None:
        daemon.front.reconfigure(new.front)
        await daemon.redirect.reconfigure(new.front.redirect, daemon.front_listeners)
    if old.imds != new.imds or old.poll != new.poll:
        old_client = daemon.client
        daemon.budget.set_rate(new.imds.max_requests_per_second)  # the window carries over
        daemon.client = ImdsClient(new.imds, daemon.budget, metrics=daemon.metrics)
        daemon.cancel_pollers()  # they start again with the new client
        await old_client.aclose()
    daemon.api.reconfigure(daemon._carried(new, old.server.max_connections))
    daemon.hooks.policy = daemon.api.policy
    daemon.hooks.replace_hooks(load_hooks(new))
    daemon.hooks.set_max_parallel(new.hooks.max_parallel)
    log.info("configuration reloaded", path=daemon.config_path)
    daemon.notifier.ready(daemon.status_line())
    return True
