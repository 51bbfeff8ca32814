"""The client commands of the CLI: ``imdsd get``, ``watch``, ``status`` and ``check-config``.

``imdsd get`` is called in loops by hook scripts and shells, so this module imports only the
standard-library socket client at the top; what ``watch``, ``status`` and ``check-config``
need beyond it (msgspec, frames, the configuration schema) is imported when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

from imdsd.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_UNREACHABLE, fail
from imdsd.configfile import ConfigError, configured_socket
from imdsd.socketapi import ApiError, DaemonUnreachable, error_message, read_target, request

if TYPE_CHECKING:
    from imdsd.frames import Change, Frame


class _UsageError(Exception):
    """Bad command-line input detected after argument parsing."""


def resolve_socket(args: argparse.Namespace) -> str:
    """``--socket``, else ``$IMDSD_SOCKET``, else the configured socket."""
    if getattr(args, "socket", None):
        return str(args.socket)
    if os.environ.get("IMDSD_SOCKET"):
        return os.environ["IMDSD_SOCKET"]
    return configured_socket(getattr(args, "config", None))


def _guarded(run: Any, args: argparse.Namespace) -> int:
    try:
        result: int = run(args)
        return result
    except DaemonUnreachable as exc:
        return fail(f"{exc} (is imdsd running? set --socket or IMDSD_SOCKET)", EXIT_UNREACHABLE)
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except ApiError as exc:
        return fail(str(exc), EXIT_FAILURE)
    except _UsageError as exc:
        return fail(str(exc), 2)
    except BrokenPipeError:
        return EXIT_OK


def _get(args: argparse.Namespace) -> int:
    status, _, body = request(resolve_socket(args), "GET", read_target(args.path, args.format), 10)
    if status >= 400:
        return fail(f"{args.path or 'instance'}: HTTP {status}: {error_message(body)}", 1)
    text = body.decode("utf-8")
    if args.format == "json" and sys.stdout.isatty():
        import msgspec

        text = msgspec.json.format(body, indent=2).decode("utf-8")
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def get_command(args: argparse.Namespace) -> int:
    """``imdsd get [PATH] [--format json|text]``: read from the daemon's cache."""
    return _guarded(_get, args)


def _short(value: Any, limit: int = 60) -> str:
    import msgspec

    if value is None:
        return "-"
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_change(revision: int, at: str, change: Change) -> str:
    """One readable line for one change."""
    if change.op == "modified":
        fields = ",".join(change.fields or [])
        detail = f"{_short(change.old)} -> {_short(change.new)}"
        if change.kind in ("disks", "network", "scheduled_events", "loadbalancer") and fields:
            detail = f"({fields})"
    elif change.op in ("added", "attached"):
        detail = _short(change.new)
    else:
        detail = _short(change.old)
    return f"r{revision} {at} {change.kind} {change.op} {change.key} {detail}"


def write_human(frame: Frame, out: TextIO) -> None:
    """Print ``frame`` as one readable line per change (a summary line for a state frame)."""
    from imdsd.frames import ChangeFrame, StateFrame

    if isinstance(frame, StateFrame):
        out.write(f"r{frame.revision} state loaded; watching for changes\n")
    elif isinstance(frame, ChangeFrame):
        for change in frame.changes:
            out.write(describe_change(frame.revision, frame.at, change) + "\n")
    out.flush()


def _parse_kinds(text: str | None) -> list[str] | None:
    from imdsd.frames import KINDS

    if not text:
        return None
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise _UsageError(f"--kinds: unknown kind {unknown[0]!r} (known: {', '.join(KINDS)})")
    return kinds


def _watch(args: argparse.Namespace) -> int:
    from imdsd.client import Client
    from imdsd.frames import encode_line

    kinds = _parse_kinds(args.kinds)
    client = Client(resolve_socket(args))
    client.health()  # fail fast with exit 3 when the daemon is not there at all
    raw = args.json or not sys.stdout.isatty()
    for frame in client.watch(since=args.since, kinds=kinds):
        if raw:
            sys.stdout.buffer.write(encode_line(frame))
            sys.stdout.buffer.flush()
        else:
            write_human(frame, sys.stdout)
    return EXIT_OK


def watch_command(args: argparse.Namespace) -> int:
    """``imdsd watch``: stream changes, resuming by itself after disconnects."""
    return _guarded(_watch, args)


def format_status(health: dict[str, Any]) -> str:
    """A human summary of the ``/v1/health`` document."""
    lines = [f"status: {health.get('status', 'unknown')}"]
    for key in ("revision", "fetched_at", "stale", "api_version", "watchers", "connections"):
        if key in health:
            lines.append(f"{key}: {_short(health[key], 80)}")
    budget = health.get("budget")
    if isinstance(budget, dict):
        lines.append("budget: " + ", ".join(f"{k}={_short(v)}" for k, v in budget.items()))
    upstream = health.get("upstream")
    if isinstance(upstream, dict):
        lines.append("upstream:")
        for endpoint, info in upstream.items():
            if isinstance(info, dict):
                state = info.get("state", "?")
                rest = ", ".join(f"{k}={_short(v, 40)}" for k, v in info.items() if k != "state")
                lines.append(f"  {endpoint}: {state} ({rest})")
    hooks = health.get("hooks")
    if isinstance(hooks, dict) and hooks:
        lines.append("hooks:")
        for name, info in hooks.items():
            if isinstance(info, dict):
                lines.append(
                    f"  {name}: " + ", ".join(f"{k}={_short(v, 40)}" for k, v in info.items())
                )
    return "\n".join(lines) + "\n"


def _status(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    import msgspec

    from imdsd.client import Client
    from imdsd.status_view import render_status

    health = Client(resolve_socket(args)).health()
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(health), indent=2).decode() + "\n")
    elif sys.stdout.isatty():
        colour = not os.environ.get("NO_COLOR")
        sys.stdout.write(render_status(health, datetime.now(UTC), colour=colour))
    else:
        sys.stdout.write(format_status(health))
    return EXIT_OK if health.get("status") in ("ok", "degraded") else EXIT_FAILURE


def status_command(args: argparse.Namespace) -> int:
    """``imdsd status [--json]``: health, revision, upstream state, budget, watchers, hooks."""
    return _guarded(_status, args)


def check_config_command(args: argparse.Namespace) -> int:
    """``imdsd check-config [-c FILE]``: print the effective config, or one error line (78).

    Restricted paths that can match no instance key are warned about on stderr (exit 0).
    """
    from imdsd.config import load_config, render_toml
    from imdsd.instance_paths import restricted_path_problems

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    sys.stdout.write(render_toml(cfg))
    for problem in restricted_path_problems(cfg.server.restricted_paths):
        sys.stderr.write(f"imdsd: warning: {problem}\n")
    return EXIT_OK
