"""Logging setup: structlog to stderr, JSON lines for machines, console lines for people.

When stderr is the journal (``$JOURNAL_STREAM``, see :mod:`imdsd.journald`), records go to
journald natively instead: with their syslog priority, a readable ``MESSAGE`` and every
structured key as a searchable ``IMDSD_<KEY>`` field.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from imdsd.config import LOG_FORMATS as FORMATS
from imdsd.config import LOG_LEVELS as LEVELS
from imdsd.journald import (
    JOURNAL_SOCKET,
    PRIORITIES,
    Field,
    JournalSink,
    field_name,
    stderr_is_journal,
)


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


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


def _plain_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, str | int | float) for v in value)


def _logfmt(value: Any) -> str:
    text = ",".join(_text(v) for v in value) if _plain_list(value) else _text(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


def journal_entry(event_dict: EventDict) -> tuple[int, str, list[Field]]:
    """Priority, readable message and ``IMDSD_*`` fields of one record.

    The message is the event and its keys as ``key=value`` (a list as ``a,b``; a traceback
    on the lines after);
    a list of plain values becomes one field per item, so ``IMDSD_KINDS=tags`` matches a
    record with ``kinds=["disks", "tags"]``.
    """
    record = dict(event_dict)
    priority = PRIORITIES.get(str(record.pop("level", "info")), 6)
    record.pop("timestamp", None)
    exception = record.pop("exception", None)
    event = _text(record.pop("event", ""))
    message = " ".join([event, *(f"{key}={_logfmt(value)}" for key, value in record.items())])
    if exception:
        message += "\n" + str(exception)
    fields: list[Field] = [(field_name("event"), event)]
    for key, value in record.items():
        if _plain_list(value):
            fields += [(field_name(key), _text(v)) for v in value]
        else:
            fields.append((field_name(key), _text(value)))
    if exception:
        fields.append((field_name("exception"), str(exception)))
    return priority, message, fields


def _journal_renderer(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> Any:
    return journal_entry(event_dict), {}


class JournalLogger:
    """The wrapped logger on the journal: hands each entry to a :class:`JournalSink`."""

    def __init__(self, sink: JournalSink) -> None:
        self.sink = sink

    def msg(self, priority: int, message: str, fields: list[Field]) -> None:
        """Send one entry."""
        self.sink.send(priority, message, fields)

    log = debug = info = warn = warning = error = critical = exception = msg


class _PriorityPrefix:
    """Prefixes a rendered line with ``<N>`` so journald reads its priority from stderr."""

    def __init__(self, renderer: Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> Any:
        priority = PRIORITIES.get(str(event_dict.get("level", "info")), 6)
        line = self.renderer(logger, method, event_dict)
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
        return f"<{priority}>{text}"


_sinks: dict[str, JournalSink] = {}


def _journal_sink(path: str, fallback: TextIO) -> JournalSink:
    """One sink per socket path, kept across reconfiguration (bound loggers may hold it)."""
    sink = _sinks.get(path)
    if sink is None:
        sink = _sinks[path] = JournalSink(fallback, path)
    sink.fallback = fallback
    return sink


def close_journal() -> None:
    """Close the journal sockets opened so far (tests; a later record reopens them)."""
    for sink in _sinks.values():
        sink.close()


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    journal: str | None = None,
) -> None:
    """Configure structlog for the whole process; safe to call again (e.g. on SIGHUP).

    ``level`` is one of :data:`LEVELS`; ``fmt`` is ``json``, ``console`` or ``auto`` (console
    when ``stream`` is a TTY, JSON otherwise). Logs go to ``stream``, by default stderr.
    When ``stream`` is the default stderr and that is the journal (``$JOURNAL_STREAM``), or
    ``journal`` names a journal socket: with ``auto`` each record goes to the journal socket
    natively (``$IMDSD_JOURNAL_SOCKET`` overrides its path, for tests), falling back to
    ``<N>`` lines on ``stream``; ``json`` and ``console`` lines get the ``<N>`` prefix.
    A new level also applies to loggers created or bound before the call, and
    ``structlog.testing.capture_logs`` works in tests.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}, expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}, expected one of {', '.join(FORMATS)}")
    out = sys.stderr if stream is None else stream
    if journal is None and stream is None and stderr_is_journal():
        journal = os.environ.get("IMDSD_JOURNAL_SOCKET") or JOURNAL_SOCKET
    tty = out.isatty() and journal is None
    _level_filter.threshold = LEVELS[level]
    processors: list[Processor] = [
        structlog.processors.add_log_level,
        _level_filter,
        structlog.contextvars.merge_contextvars,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    factory: Any = structlog.PrintLoggerFactory(file=out)
    if journal is not None and fmt == "auto":
        sink = _journal_sink(journal, out)
        processors += [structlog.processors.format_exc_info, _journal_renderer]
        factory = lambda *_args: JournalLogger(sink)  # noqa: E731
    else:
        if fmt == "json" or (fmt == "auto" and not tty):
            processors += [structlog.processors.format_exc_info, _leading_keys]
            renderer = structlog.processors.JSONRenderer()
        else:
            renderer = structlog.dev.ConsoleRenderer(colors=tty)
        processors.append(_PriorityPrefix(renderer) if journal is not None else renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS["debug"]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
