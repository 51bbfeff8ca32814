"""Tests for imdsd.logs: JSON and console output, level filtering, reconfiguration."""

from __future__ import annotations

import datetime
import io
import json
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from imdsd.logs import configure_logging


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _boom() -> None:
    raise RuntimeError("boom")


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("fmt", ["json", "auto"])
def test_json_lines_when_asked_or_not_a_tty(fmt: str) -> None:
    out = io.StringIO()
    configure_logging("info", fmt, stream=out)
    structlog.get_logger().info("poll done", revision=7, path="/metadata/instance")
    [line] = _lines(out)
    record = json.loads(line)
    assert list(record) == ["timestamp", "level", "event", "revision", "path"]
    assert record["level"] == "info"
    assert record["event"] == "poll done"
    assert record["revision"] == 7
    assert record["timestamp"].endswith("Z")
    stamp = datetime.datetime.fromisoformat(record["timestamp"])
    assert stamp.utcoffset() == datetime.timedelta(0)


def test_json_exception_is_one_line() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        _boom()
    except RuntimeError:
        structlog.get_logger().exception("failed")
    [line] = _lines(out)
    record = json.loads(line)
    assert record["level"] == "error"
    assert "RuntimeError: boom" in record["exception"]


@pytest.mark.parametrize(("fmt", "stream"), [("console", io.StringIO()), ("auto", _Tty())])
def test_console_when_asked_or_on_a_tty(fmt: str, stream: io.StringIO) -> None:
    configure_logging("info", fmt, stream=stream)
    structlog.get_logger().warning("disk attached", lun=3)
    [line] = _lines(stream)
    assert "disk attached" in line
    assert "lun" in line
    assert "warn" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_console_colours_only_on_a_tty() -> None:
    plain = io.StringIO()
    configure_logging("info", "console", stream=plain)
    structlog.get_logger().info("hello")
    assert "\x1b[" not in plain.getvalue()
    tty = _Tty()
    configure_logging("info", "console", stream=tty)
    structlog.get_logger().info("hello")
    assert "\x1b[" in tty.getvalue()


def test_level_filtering() -> None:
    out = io.StringIO()
    configure_logging("warning", "json", stream=out)
    log = structlog.get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [json.loads(line)["event"] for line in _lines(out)] == ["w", "e"]


def test_reconfigure_changes_level_of_existing_loggers() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("imdsd.poller").bind(task="poll")
    log.debug("hidden")
    log.info("shown")
    configure_logging("debug", "json", stream=out)
    log.debug("now shown")
    configure_logging("error", "json", stream=out)
    log.info("hidden again")
    records = [json.loads(line) for line in _lines(out)]
    assert [r["event"] for r in records] == ["shown", "now shown"]
    assert all(r["task"] == "poll" for r in records)


def test_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    structlog.get_logger().info("to stderr")
    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err)["event"] == "to stderr"


def test_contextvars_are_included() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    with structlog.contextvars.bound_contextvars(peer_uid=1000):
        structlog.get_logger().info("request")
    assert json.loads(out.getvalue())["peer_uid"] == 1000


def test_capture_logs_works_after_configuration() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger()
    log.info("before")
    with capture_logs() as captured:
        log.info("captured", key="value")
    assert captured == [{"event": "captured", "key": "value", "log_level": "info"}]
    assert [json.loads(line)["event"] for line in _lines(out)] == ["before"]


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "json"), ("info", "xml")])
def test_rejects_unknown_level_or_format(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(level, fmt, stream=io.StringIO())
