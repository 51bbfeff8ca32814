"""``imdsd run``: load the configuration, take over systemd's sockets, raise the descriptor
limit, then run :class:`imdsd.daemon.Daemon` until it stops: exit 78 for a configuration
problem, 1 when the daemon cannot listen or read its state, 0 after a graceful stop."""

from __future__ import annotations

import argparse

import structlog
import trio

from imdsd.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, fail
from imdsd.config import ConfigError, load_config
from imdsd.daemon import Daemon, fd_reserve
from imdsd.daemon_stop import ignore_stop_signals, remember_stop_signals
from imdsd.fdlimit import FdLimitError, ensure_fd_limit
from imdsd.front.server import FD_NAME as FRONT_FD_NAME
from imdsd.hooks.tree import become_subreaper
from imdsd.httpio.listeners import ListenError
from imdsd.logs import configure_logging
from imdsd.metrics_server import FD_NAME as METRICS_FD_NAME
from imdsd.persist import PersistError
from imdsd.systemd import Notifier, SystemdError, listen_fds

log = structlog.get_logger("imdsd.daemon")


def run_command(args: argparse.Namespace) -> int:
    """``imdsd run [-c FILE]``: run the daemon in the foreground."""
    remember_stop_signals()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    configure_logging(config.log.level, config.log.format)
    notifier = Notifier.from_env()
    try:
        passed = listen_fds()
        inherited = [sock for sock, name in passed if name not in (METRICS_FD_NAME, FRONT_FD_NAME)]
        front_inherited = [sock for sock, name in passed if name == FRONT_FD_NAME]
        metrics_inherited = [sock for sock, name in passed if name == METRICS_FD_NAME]
    except SystemdError as exc:
        return fail(str(exc), EXIT_CONFIG)
    front = bool(config.front.listen or front_inherited)
    reserved = fd_reserve(config, front, bool(config.metrics.listen or metrics_inherited))
    try:
        fds = ensure_fd_limit(config.server.max_connections, reserved)
    except FdLimitError as exc:
        return fail(str(exc), EXIT_CONFIG)
    log.info("file descriptors", soft_limit=fds.soft, was=fds.was, hard=fds.hard, need=fds.needed)
    try:
        daemon = Daemon(
            config,
            args.config,
            notifier=notifier,
            inherited=inherited,
            metrics_inherited=metrics_inherited,
            front_inherited=front_inherited,
        )
        # orphans of hooks become our children, so the hook runner can find and reap them
        daemon.hooks.adopt_orphans = become_subreaper()
        trio.run(daemon.run)
    except ListenError as exc:
        return fail(str(exc), EXIT_FAILURE)
    except PersistError as exc:
        return fail(str(exc), EXIT_FAILURE)
    finally:
        ignore_stop_signals()
        notifier.close()
    return EXIT_OK
