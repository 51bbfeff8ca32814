"""Logging setup: structlog to stderr, JSON lines for machines, console lines for people."""

from __future__ import annotations

import sys
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FORMATS: tuple[str, ...] = ("auto", "console", "json")


class _LevelFilter:
    """Drops events below ``threshold``.

    Filtering here rather than with ``make_filtering_bound_logger`` matters: a bound logger
    keeps the wrapper class it was created with, but shares the processor chain, so only a
    processor lets a new level reach loggers bound before a reload.
    """

    def __init__(self) -> None:
        self.threshold = LEVELS["info"]

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        if LEVELS.get(event_dict.get("level", ""), 50) < self.threshold:
            raise structlog.DropEvent
        return event_dict


_level_filter = _LevelFilter()


def _leading_keys(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Put ``timestamp``, ``level`` and ``event`` first so JSON lines read well."""
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    return {**head, **event_dict}


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for the whole process; safe to call again (e.g. on SIGHUP).

    ``level`` is one of :data:`LEVELS`; ``fmt`` is ``json``, ``console`` or ``auto`` (console
    when ``stream`` is a TTY, JSON otherwise). Logs go to ``stream``, by default stderr.
    A new level also applies to loggers created or bound before the call, and
    ``structlog.testing.capture_logs`` works in tests.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}, expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}, expected one of {', '.join(FORMATS)}")
    out = sys.stderr if stream is None else stream
    tty = out.isatty()
    _level_filter.threshold = LEVELS[level]
    processors: list[Processor] = [
        structlog.processors.add_log_level,
        _level_filter,
        structlog.contextvars.merge_contextvars,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json" or (fmt == "auto" and not tty):
        processors += [
            structlog.processors.format_exc_info,
            _leading_keys,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=tty))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS["debug"]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
