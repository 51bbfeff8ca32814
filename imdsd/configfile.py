"""Reading the configuration file, and the one key client commands need (import-light).

:func:`read_table` turns a file into a TOML table with one-line :class:`ConfigError` messages;
:mod:`imdsd.config` validates the whole table against its schema. :func:`configured_socket`
reads only ``server.socket``, so that ``imdsd get`` and the other client commands start
without loading the schema (``imdsd check-config`` validates everything).
"""

from __future__ import annotations

import tomllib
from typing import Any

from imdsd.cli import DEFAULT_CONFIG
from imdsd.socketapi import DEFAULT_SOCKET


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming the file, key and value."""

    def __init__(self, source: str, message: str, key: str | None = None) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source}: {message}")


def read_text(path: str | None) -> tuple[str, str | None]:
    """The file's name and text; the text is None when ``path`` is None and the default file
    does not exist (built-in defaults apply)."""
    source = DEFAULT_CONFIG if path is None else path
    try:
        with open(source, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        if path is None:
            return source, None
        raise ConfigError(source, "cannot read: no such file") from None
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror or exc}") from None
    try:
        return source, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(source, f"not valid UTF-8 (line {line})") from None


def parse_table(text: str, source: str) -> dict[str, Any]:
    """The TOML table of ``text``; a syntax error is a :class:`ConfigError` naming the line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"invalid TOML: {exc}") from None


def configured_socket(path: str | None) -> str:
    """``server.socket`` of the configuration file ``path`` (None: the default file)."""
    source, text = read_text(path)
    if text is None:
        return DEFAULT_SOCKET
    server = parse_table(text, source).get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(source, "server: expected a table ([server])", "server")
    socket = server.get("socket", DEFAULT_SOCKET)
    if not isinstance(socket, str) or not socket.startswith("/"):
        raise ConfigError(
            source, f"server.socket = {socket!r}: expected an absolute path", "server.socket"
        )
    return socket
