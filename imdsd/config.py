"""Configuration (CONTRACT section 2): the schema, and TOML in and out (sans-IO).

Every struct field carries its default and, through ``Annotated``, the rule
(:mod:`imdsd.configrules`) that checks and converts its TOML value, so every error names the
file, the dotted key (``imds.max_requests_per_second``, ``hook[0].timeout``) and the bad value.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import urllib.parse
from typing import Annotated, Any

import msgspec

from imdsd.configfile import ConfigError, parse_table, read_text
from imdsd.configrules import (
    Bool,
    Duration,
    Float,
    Int,
    Invalid,
    List,
    Mode,
    Str,
    build,
    render_table,
)
from imdsd.durations import format_duration, parse_duration
from imdsd.frames import KINDS

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "render_toml",
]

LOG_LEVELS: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40}
"""``log.level`` names and their numeric (stdlib ``logging``) levels."""
LOG_FORMATS: tuple[str, ...] = ("auto", "console", "json")
"""``log.format`` choices; ``auto`` is console on a TTY, JSON otherwise."""


# ---------------------------------------------------------------------------------------------
# Checks for individual string values


def _endpoint(value: str) -> str:
    """``http://host[:port]`` with an optional trailing ``/``, which is dropped."""
    try:
        url = urllib.parse.urlsplit(value)
        port = url.port
    except ValueError as exc:
        raise Invalid(f"invalid URL: {exc}") from None
    if url.scheme != "http":
        raise Invalid('must start with "http://" (IMDS is plain HTTP)')
    if not url.hostname or url.username is not None or url.password is not None:
        raise Invalid('expected "http://host" or "http://host:port"')
    if url.path not in ("", "/") or url.query or url.fragment or value.endswith(("?", "#")):
        raise Invalid('must not have a path, query or fragment (expected "http://host[:port]")')
    if port == 0:
        raise Invalid("port must be 1-65535")
    return value.removesuffix("/")


def _api_version(value: str) -> str:
    """``auto`` or a ``YYYY-MM-DD`` date."""
    if value == "auto":
        return value
    try:
        valid = bool(
            re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) and datetime.date.fromisoformat(value)
        )
    except ValueError:
        valid = False
    if not valid:
        raise Invalid('expected "auto" or a version date like "2021-02-01"')
    return value


def _listen(value: str) -> str:
    """``""`` (off) or a TCP address ``HOST:PORT``; an IPv6 host is written ``[::1]:PORT``."""
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise Invalid('expected "" (off) or "HOST:PORT" like "127.0.0.1:9469"')
    if host.startswith("["):
        if not host.endswith("]") or not _is_ip(host[1:-1], version=6):
            raise Invalid('expected "[IPv6]:PORT" like "[::1]:9469"')
    elif ":" in host or not (_is_ip(host, version=4) or re.fullmatch(r"[A-Za-z0-9.-]+", host)):
        raise Invalid('expected "HOST:PORT" (IPv6 hosts in brackets, like "[::1]:9469")')
    return value


LOOPBACK_HINT = (
    'must be a loopback address like "127.0.0.1:169" (127.0.0.0/8, [::1] or localhost): '
    "IMDS is never reachable from the network"
)


def listen_is_loopback(listen: str) -> bool:
    """Whether a valid ``HOST:PORT`` names only this machine: ``127.0.0.0/8``, ``[::1]`` or
    ``localhost``."""
    host = listen.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _front_listen(value: str) -> str:
    """``_listen``, and loopback only: IMDS (and so the front, which hands out managed-identity
    tokens) is reachable from the VM itself, never from the network."""
    _listen(value)
    if value and not listen_is_loopback(value):
        raise Invalid(LOOPBACK_HINT)
    return value


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _abs_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise Invalid("expected an absolute path")
    return value


def _socket_path(value: str) -> str:
    _abs_path(value)
    if len(value.encode()) > 107:
        raise Invalid("too long for a unix socket path (at most 107 bytes)")
    return value


def _restricted_path(value: str) -> str:
    """A relative IMDS instance path like ``compute/userData``."""
    parts = value.split("/")
    if value.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise Invalid('expected a path below /metadata/instance like "compute/userData"')
    if parts[0] == "metadata":
        raise Invalid('expected a path below /metadata/instance like "compute/userData"')
    return value


def _hook_name(value: str) -> str:
    """Safe as a file name: letters, digits, ``_.-``, not starting with ``.`` or ``-``."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", value):
        raise Invalid(
            "expected a non-empty name of letters, digits, '_', '.' and '-' "
            "(not starting with '.' or '-', at most 128 characters)"
        )
    return value


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise Invalid("must not contain NUL")
    return value


class _Command(List):
    """A non-empty argv list whose first item (the program) is non-empty."""

    def __init__(self) -> None:
        super().__init__(Str(check=_no_nul), non_empty=True)

    def parse(self, value: object) -> list[Any]:
        argv = super().parse(value)
        if not argv[0]:
            raise Invalid("the program (first item) must not be empty")
        return argv


# ---------------------------------------------------------------------------------------------
# The typed configuration


_POSITIVE = Duration()
_ZERO_DISABLES = Duration(positive=False)


class ImdsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[imds]``: where and how fast to talk to the instance metadata service."""

    endpoint: Annotated[str, Str(check=_endpoint)] = "http://169.254.169.254"
    api_version: Annotated[str, Str(check=_api_version)] = "auto"
    max_requests_per_second: Annotated[float, Float(gt=0, le=4)] = 2.0
    connect_timeout: Annotated[float, _POSITIVE] = 2.0
    read_timeout: Annotated[float, _POSITIVE] = 10.0


class PollConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[poll]``: poll intervals in seconds; 0 disables the optional documents."""

    instance: Annotated[float, Duration(floor=1.0)] = 10.0
    scheduled_events: Annotated[float, _ZERO_DISABLES] = 1.0
    loadbalancer: Annotated[float, _ZERO_DISABLES] = 60.0


def _default_restricted() -> list[str]:
    return ["compute/userData", "compute/customData"]


def _default_uids() -> list[int]:
    return [0]


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[server]``: the local unix socket API and who may read restricted paths."""

    socket: Annotated[str, Str(check=_socket_path)] = "/run/imdsd/imdsd.sock"
    socket_mode: Annotated[int, Mode()] = 0o660
    socket_group: Annotated[str, Str(check=_no_nul)] = "imdsd"
    max_connections: Annotated[int, Int(ge=1)] = 2048
    heartbeat: Annotated[float, Duration(ceiling=30.0)] = 15.0
    restricted_paths: Annotated[list[str], List(Str(check=_restricted_path), unique=True)] = (
        msgspec.field(default_factory=_default_restricted)
    )
    restricted_allow_uids: Annotated[list[int], List(Int(ge=0, le=2**32 - 2))] = msgspec.field(
        default_factory=_default_uids
    )
    restricted_allow_gids: Annotated[list[int], List(Int(ge=0, le=2**32 - 2))] = msgspec.field(
        default_factory=list
    )


class StateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[state]``: where state is persisted and how many revisions are kept."""

    directory: Annotated[str, Str(check=_abs_path)] = "/var/lib/imdsd"
    history: Annotated[int, Int(ge=1)] = 4096
    history_bytes: Annotated[int, Int(ge=65536)] = 16 * 1024 * 1024


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[metrics]``: an optional TCP listener serving ``GET /metrics`` only."""

    listen: Annotated[str, Str(check=_listen)] = ""


class FrontConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[front]``: the optional IMDS-compatible TCP front for unmodified agents."""

    listen: Annotated[str, Str(check=_front_listen)] = ""
    redirect: Annotated[bool, Bool()] = False
    queue_timeout: Annotated[float, Duration(ceiling=60.0)] = 5.0
    token_cache: Annotated[bool, Bool()] = True

    def __post_init__(self) -> None:
        """With ``redirect``, the port must be one only root can bind: else any local user who
        binds it first (or while imdsd is down) would receive every agent's IMDS traffic."""
        if self.redirect and self.listen and not port_is_privileged(self.listen):
            raise Invalid(
                "with redirect = true the port must be below 1024 (only root can bind it), "
                'like "127.0.0.1:169"',
                "front.listen",
                self.listen,
            )


PRIVILEGED_PORTS = 1024
"""Ports below this only root (CAP_NET_BIND_SERVICE) can bind."""


def port_is_privileged(listen: str) -> bool:
    """Whether the port of a valid ``HOST:PORT`` is one only root can bind."""
    return int(listen.rpartition(":")[2]) < PRIVILEGED_PORTS


class HooksConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[hooks]``: the hook directory and how many hooks run at once."""

    directory: Annotated[str, Str(check=_abs_path)] = "/etc/imdsd/hooks.d"
    max_parallel: Annotated[int, Int(ge=1)] = 4


class HookConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[hook]]``: run ``command`` when changes of kinds ``on`` happen."""

    name: Annotated[str, Str(check=_hook_name)]
    on: Annotated[list[str], List(Str(choices=KINDS), non_empty=True, unique=True)]
    command: Annotated[list[str], _Command()]
    timeout: Annotated[float, _POSITIVE] = 60.0
    debounce: Annotated[float, _ZERO_DISABLES] = 1.0
    retries: Annotated[int, Int(ge=0)] = 3
    user: Annotated[str, Str(check=_no_nul)] = ""


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[log]``: log level and format (``auto`` = console on a TTY, JSON otherwise)."""

    level: Annotated[str, Str(choices=tuple(LOG_LEVELS))] = "info"
    format: Annotated[str, Str(choices=LOG_FORMATS)] = "auto"


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole configuration; ``Config()`` is the built-in default."""

    imds: ImdsConfig = msgspec.field(default_factory=ImdsConfig)
    poll: PollConfig = msgspec.field(default_factory=PollConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    hooks: HooksConfig = msgspec.field(default_factory=HooksConfig)
    hook: list[HookConfig] = msgspec.field(default_factory=list)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    front: FrontConfig = msgspec.field(default_factory=FrontConfig)


# ---------------------------------------------------------------------------------------------
# Reading


def parse_config(text: str, source: str) -> Config:
    """Parse and validate TOML ``text``; ``source`` names the file in error messages."""
    data = parse_table(text, source)
    try:
        config: Config = build(Config, data, "")
    except Invalid as exc:
        raise ConfigError(source, exc.message(), exc.key) from None
    return config


def load_config(path: str | None) -> Config:
    """Load the configuration file ``path`` (None: the default file, defaults if it is missing)."""
    source, text = read_text(path)
    return Config() if text is None else parse_config(text, source)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_toml(cfg: Config) -> str:
    """The effective configuration as TOML with every key; ``parse_config`` reads it back."""
    blocks: list[list[str]] = []
    for info in msgspec.structs.fields(cfg):
        value = getattr(cfg, info.name)
        if isinstance(value, list):
            blocks.extend([f"[[{info.name}]]", *render_table(entry)] for entry in value)
        else:
            blocks.append([f"[{info.name}]", *render_table(value)])
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"
