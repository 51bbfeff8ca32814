"""``imdsd redirect install|remove|status [-c FILE]``: manage the IMDS redirect by hand.

- ``install`` redirects to the configured ``[front] listen``; it refuses when nothing answers
  there (agents would lose IMDS) unless ``--force`` is given.
- ``remove`` deletes the rules (exit 0 when they were already absent); the unit runs it as
  ``ExecStopPost=`` so a crashed daemon never leaves agents cut off from IMDS.
- ``status`` prints whether the rules are active and where they send IMDS traffic. Exit 0
  active and the front answers, 3 inactive (agents reach IMDS directly), 1 active while
  nothing answers at the target (agents are cut off: run ``imdsd redirect remove``).
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from imdsd import redirect
from imdsd.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_UNREACHABLE, fail
from imdsd.config import ConfigError, load_config


def _configured_target(args: argparse.Namespace) -> tuple[str, int]:
    return redirect.front_target(load_config(args.config).front.listen)


def _install(args: argparse.Namespace) -> int:
    target = _configured_target(args)
    if not args.force and not redirect.front_answers(target):
        return fail(
            f"nothing answers at {target[0]}:{target[1]} ([front] listen): start imdsd with "
            "the front first (or use --force); the rules were not installed",
            EXIT_FAILURE,
        )
    state = redirect.install(f"{target[0]}:{target[1]}")
    print(state.describe())
    return EXIT_OK


def _remove(_args: argparse.Namespace) -> int:
    redirect.remove()
    print(f"removed (table {redirect.FAMILY} {redirect.TABLE} is absent)")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    state = redirect.status()
    answering = redirect.front_answers(state.target) if state.target else None
    if args.json:
        sys.stdout.write(msgspec.json.encode(redirect.state_json(state, answering)).decode())
        sys.stdout.write("\n")
    else:
        print(state.describe())
        if state.active and not answering:
            print("warning: nothing answers at the target; agents cannot reach IMDS")
        if state.active and state.target is not None:
            try:
                configured = _configured_target(args)
            except (ConfigError, redirect.RedirectError):
                configured = None
            if configured is not None and configured != state.target:
                print(f"note: the configuration says {configured[0]}:{configured[1]}")
    if not state.active:
        return EXIT_UNREACHABLE
    return EXIT_OK if answering else EXIT_FAILURE


_ACTIONS = {"install": _install, "remove": _remove, "status": _status}


def redirect_command(args: argparse.Namespace) -> int:
    """``imdsd redirect install|remove|status``: see the module docstring."""
    try:
        return _ACTIONS[args.action](args)
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except redirect.RedirectError as exc:
        return fail(str(exc), EXIT_FAILURE)
