"""``imdsd emulate``: run the IMDS emulator in the foreground until SIGINT or SIGTERM.

Prints one line on stdout once it listens (``imdsd emulator listening on
http://127.0.0.1:8169 (profile azure)``); logs (scenario steps) go to stderr. Exit codes:
0 after a signal, 2 bad ``--listen`` or ``--rate-limit``, 78 bad scenario file, 1 when it
cannot listen.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys

import trio

from imdsd.emulator.scenario import ScenarioError, load_scenario
from imdsd.emulator.server import Emulator, EmulatorConfig
from imdsd.logs import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8169"``, ``"[::1]:8169"`` or ``":8169"`` (127.0.0.1) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError("expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, like [::1]:8169")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host or "127.0.0.1", int(port_text)


def format_url(host: str, port: int) -> str:
    """``http://host:port`` with IPv6 hosts in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _error(message: str) -> None:
    print(f"imdsd emulate: {message}", file=sys.stderr)


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the first exception of type ``kind`` inside (nested) exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


async def _run(emulator: Emulator) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(emulator.serve)
            url = format_url(host, port)
            print(
                f"imdsd emulator listening on {url} (profile {emulator.profile.name})", flush=True
            )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def emulate_command(args: argparse.Namespace) -> int:
    """Run ``imdsd emulate`` with the parsed arguments; returns the exit code."""
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        _error(f"--listen {args.listen!r}: {exc}")
        return EXIT_USAGE
    rate_limit = float(args.rate_limit)
    if not math.isfinite(rate_limit) or rate_limit < 0:
        _error(f"--rate-limit must be a number >= 0 (0 disables), got {args.rate_limit!r}")
        return EXIT_USAGE
    try:
        scenario = load_scenario(args.scenario) if args.scenario else None
        config = EmulatorConfig(
            host=host, port=port, profile=args.profile, scenario=scenario, rate_limit=rate_limit
        )
        emulator = Emulator(config)
    except (ScenarioError, ValueError) as exc:
        _error(str(exc))
        return EXIT_CONFIG
    configure_logging("info", "auto")
    try:
        trio.run(_run, emulator)
    except BaseException as exc:
        found = _find(exc, OSError)
        if found is None:
            raise
        _error(f"cannot listen on {host}:{port}: {getattr(found, 'strerror', None) or found}")
        return EXIT_FAILURE
    return EXIT_OK
