"""The ``imdsd`` command line (CONTRACT section 1): parses arguments and dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from imdsd import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_CONFIG = 78
DEFAULT_CONFIG = "/etc/imdsd/imdsd.toml"

# command name -> "module:function"; each function takes the parsed arguments, returns an exit code.
_HANDLERS = {
    "run": "imdsd.daemon_command:run_command",
    "check-config": "imdsd.commands:check_config_command",
    "get": "imdsd.commands:get_command",
    "watch": "imdsd.commands:watch_command",
    "status": "imdsd.commands:status_command",
    "emulate": "imdsd.emulator.cli:emulate_command",
    "demo": "imdsd.demo:demo_command",
    "redirect": "imdsd.redirect_command:redirect_command",
}


def fail(message: str, code: int) -> int:
    """Print one ``imdsd: message`` line on stderr (no traceback) and return ``code``."""
    sys.stderr.write(f"imdsd: {message}\n")
    return code


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="FILE",
        help=f"configuration file (default {DEFAULT_CONFIG}; a missing default means defaults)",
    )


def _add_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        default=None,
        metavar="S",
        help="daemon socket (default: $IMDSD_SOCKET, else the configured socket)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for every ``imdsd`` command."""
    parser = argparse.ArgumentParser(prog="imdsd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"imdsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    _add_config(run)

    check = sub.add_parser("check-config", help="validate and print the effective configuration")
    _add_config(check)

    get = sub.add_parser("get", help="read from the daemon's cache")
    get.add_argument(
        "path",
        nargs="?",
        default="",
        metavar="PATH",
        help="like compute/tags or network/interface/0 (default: whole instance)",
    )
    get.add_argument("--format", choices=("json", "text"), default="json")
    _add_socket(get)
    _add_config(get)

    watch = sub.add_parser("watch", help="stream changes")
    watch.add_argument("--since", type=int, default=None, metavar="REV")
    watch.add_argument("--kinds", default=None, metavar="K,...")
    watch.add_argument("--json", action="store_true", help="print raw NDJSON frames")
    _add_socket(watch)
    _add_config(watch)

    status = sub.add_parser("status", help="health, revision, upstream state, watchers, hooks")
    status.add_argument("--json", action="store_true")
    _add_socket(status)
    _add_config(status)

    emulate = sub.add_parser("emulate", help="run the IMDS emulator")
    emulate.add_argument("--listen", default="127.0.0.1:8169", metavar="HOST:PORT")
    emulate.add_argument("--profile", choices=("azure", "azurestack"), default="azure")
    emulate.add_argument("--scenario", default=None, metavar="FILE")
    emulate.add_argument(
        "--rate-limit",
        type=float,
        default=5.0,
        metavar="N",
        help="requests per second before 429 (0 disables)",
    )

    demo = sub.add_parser("demo", help="emulator + daemon + example hook, scripted scenario")
    demo.add_argument("--duration", type=float, default=None, metavar="SECONDS")

    redirect = sub.add_parser("redirect", help="install, remove or show the IMDS redirect")
    redirect.add_argument("action", choices=("install", "remove", "status"))
    redirect.add_argument("--json", action="store_true", help="status as JSON")
    redirect.add_argument(
        "--force", action="store_true", help="install even when nothing answers at the front"
    )
    _add_config(redirect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imdsd`` console script."""
    args = build_parser().parse_args(argv)
    module_name, _, function_name = _HANDLERS[args.command].partition(":")
    handler: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(module_name), function_name
    )
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
