"""Configuration (CONTRACT section 2): TOML in, typed frozen structs out, TOML back.

Every struct field carries its default and, through ``Annotated``, the rule that checks and
converts its TOML value. One small walker applies the rules, so every error names the file,
the dotted key (``imds.max_requests_per_second``, ``hook[0].timeout``) and the bad value.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import ipaddress
import math
import re
import sys
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Annotated, Any, get_args, get_origin

import msgspec

from imdsd.cli import DEFAULT_CONFIG, EXIT_CONFIG, EXIT_OK
from imdsd.frames import KINDS
from imdsd.logs import FORMATS, LEVELS


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming the file, key and value."""

    def __init__(self, source: str, message: str, key: str | None = None) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source}: {message}")


_NO_VALUE: Any = object()


class _Invalid(ValueError):
    """Raised while checking: what is wrong, and (when known) the key and the bad value.

    Rules raise it with only ``problem`` (or with a ``key`` suffix like ``[2]`` and the bad
    item); the walker fills in the full key and the value.
    """

    def __init__(self, problem: str, key: str = "", value: Any = _NO_VALUE) -> None:
        super().__init__(problem)
        self.problem = problem
        self.key = key
        self.value = value

    def message(self) -> str:
        """``key = value: problem``, or ``key: problem`` when there is no value."""
        if self.value is _NO_VALUE:
            return f"{self.key}: {self.problem}"
        return f"{self.key} = {_show(self.value)}: {self.problem}"


# ---------------------------------------------------------------------------------------------
# Durations


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS: dict[str, Fraction] = {
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
}
_DURATION_HINT = 'expected a number and a unit (ms, s, m, h) like "500ms", "10s" or "1m30s"'


def parse_duration(text: str) -> float:
    """Parse ``"500ms"``, ``"10s"``, ``"2m"``, ``"1h"`` or combinations like ``"1m30s"``.

    Units appear at most once, largest first. Returns seconds; raises ``ValueError`` for
    negative values, bare numbers, unknown units and anything else.
    """
    if text.startswith("-"):
        raise ValueError("negative durations are not allowed")
    total = Fraction(0)
    pos = 0
    last_unit = -1
    order = list(_UNITS)
    for match in _DURATION_PART.finditer(text):
        unit = order.index(match[2])
        if match.start() != pos:
            break
        if unit <= last_unit:
            raise ValueError('each unit at most once, largest first, like "1h30m"')
        total += Fraction(match[1]) * _UNITS[match[2]]
        pos, last_unit = match.end(), unit
    if pos == 0 or pos != len(text):
        raise ValueError(_DURATION_HINT)
    try:
        return float(total)
    except OverflowError:
        raise ValueError("duration is too large") from None


def _decimal(value: Fraction) -> str:
    """Exact decimal notation of a fraction whose denominator divides a power of ten."""
    places = 0
    while (value * 10**places).denominator != 1:
        places += 1
    digits = str(value.numerator * 10**places // value.denominator)
    if places == 0:
        return digits
    digits = digits.rjust(places + 1, "0")
    return f"{digits[:-places]}.{digits[-places:]}"


def format_duration(seconds: float) -> str:
    """Render seconds the way :func:`parse_duration` reads them: ``0.5`` -> ``"500ms"``.

    Uses whole hours and minutes, then seconds (or milliseconds when below one second), so
    ``parse_duration(format_duration(x)) == x`` for every finite ``x >= 0``.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    value = Fraction(repr(float(seconds)))
    hours, rest = divmod(value, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h"] if hours else []
    if minutes:
        parts.append(f"{minutes}m")
    if secs and secs < 1 and (secs * 1000).denominator == 1:
        parts.append(f"{secs * 1000}ms")
    elif secs or not parts:
        parts.append(f"{_decimal(secs)}s")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Rules: check and convert one TOML value, and render it back


def _toml_str(text: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_value(value: object) -> str:
    """Render a plain value (as produced by tomllib or stored in a config) as inline TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return repr(value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _show(value: object, limit: int = 60) -> str:
    """The value as the user would have written it, shortened to keep messages one line."""
    text = _toml_value(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Rule:
    """Checks a TOML value and converts it to its typed form; renders the typed form back."""

    def parse(self, value: object) -> Any:
        raise NotImplementedError

    def render(self, value: Any) -> str:
        return _toml_value(value)


class _Str(_Rule):
    """A string, optionally one of ``choices`` or passed through a checking function."""

    def __init__(
        self, choices: tuple[str, ...] = (), check: Callable[[str], str] | None = None
    ) -> None:
        self.choices = choices
        self.check = check

    def parse(self, value: object) -> str:
        if not isinstance(value, str):
            raise _Invalid("expected a string")
        if self.choices and value not in self.choices:
            raise _Invalid(f"expected one of {', '.join(self.choices)}")
        return self.check(value) if self.check else value


class _Float(_Rule):
    """A finite number (TOML integer or float) within ``gt`` < value <= ``le``."""

    def __init__(self, gt: float, le: float) -> None:
        self.gt = gt
        self.le = le

    def parse(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid("expected a number")
        if not (math.isfinite(value) and self.gt < value <= self.le):
            raise _Invalid(f"must be > {self.gt:g} and <= {self.le:g}")
        return float(value)


class _Int(_Rule):
    """An integer (not a boolean) within ``ge`` <= value <= ``le``."""

    def __init__(self, ge: int, le: int | None = None) -> None:
        self.ge = ge
        self.le = le

    def parse(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("expected an integer")
        if value < self.ge:
            raise _Invalid(f"must be >= {self.ge}")
        if self.le is not None and value > self.le:
            raise _Invalid(f"must be <= {self.le}")
        return value


class _Duration(_Rule):
    """A duration string; ``positive`` requires > 0 (else 0 is allowed), ``floor`` a minimum."""

    def __init__(
        self, positive: bool = True, floor: float = 0.0, ceiling: float | None = None
    ) -> None:
        self.positive = positive
        self.floor = floor
        self.ceiling = ceiling

    def parse(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, str):
            hint = f' like "{value}s"' if isinstance(value, int | float) else ""
            raise _Invalid(f"expected a duration string{hint}")
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Invalid(f"invalid duration: {exc}") from None
        if self.positive and seconds <= 0:
            raise _Invalid("must be greater than 0s")
        if seconds < self.floor:
            raise _Invalid(f"must be at least {format_duration(self.floor)}")
        if self.ceiling is not None and seconds > self.ceiling:
            raise _Invalid(f"must be at most {format_duration(self.ceiling)}")
        return seconds

    def render(self, value: Any) -> str:
        return _toml_str(format_duration(value))


class _Bool(_Rule):
    """A TOML boolean."""

    def parse(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise _Invalid("expected true or false")
        return value

    def render(self, value: Any) -> str:
        return "true" if value else "false"


class _Mode(_Rule):
    """A file mode as an octal string like ``"0660"``."""

    def parse(self, value: object) -> int:
        if not isinstance(value, str) or not re.fullmatch(r"[0-7]{3,4}", value):
            raise _Invalid('expected an octal mode string like "0660"')
        return int(value, 8)

    def render(self, value: Any) -> str:
        return _toml_str(f"{value:04o}")


class _List(_Rule):
    """An array whose items follow ``item``; optionally non-empty and without duplicates."""

    def __init__(self, item: _Rule, non_empty: bool = False, unique: bool = False) -> None:
        self.item = item
        self.non_empty = non_empty
        self.unique = unique

    def parse(self, value: object) -> list[Any]:
        if not isinstance(value, list):
            raise _Invalid("expected an array")
        if self.non_empty and not value:
            raise _Invalid("must not be empty")
        out: list[Any] = []
        for index, item in enumerate(value):
            try:
                parsed = self.item.parse(item)
            except _Invalid as exc:
                raise _Invalid(exc.problem, f"[{index}]", item) from None
            if self.unique and parsed in out:
                raise _Invalid("duplicate item", f"[{index}]", item)
            out.append(parsed)
        return out

    def render(self, value: Any) -> str:
        return "[" + ", ".join(self.item.render(v) for v in value) + "]"


# ---------------------------------------------------------------------------------------------
# Checks for individual string values


def _endpoint(value: str) -> str:
    """``http://host[:port]`` with an optional trailing ``/``, which is dropped."""
    try:
        url = urllib.parse.urlsplit(value)
        port = url.port
    except ValueError as exc:
        raise _Invalid(f"invalid URL: {exc}") from None
    if url.scheme != "http":
        raise _Invalid('must start with "http://" (IMDS is plain HTTP)')
    if not url.hostname or url.username is not None or url.password is not None:
        raise _Invalid('expected "http://host" or "http://host:port"')
    if url.path not in ("", "/") or url.query or url.fragment or value.endswith(("?", "#")):
        raise _Invalid('must not have a path, query or fragment (expected "http://host[:port]")')
    if port == 0:
        raise _Invalid("port must be 1-65535")
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
        raise _Invalid('expected "auto" or a version date like "2021-02-01"')
    return value


def _listen(value: str) -> str:
    """``""`` (off) or a TCP address ``HOST:PORT``; an IPv6 host is written ``[::1]:PORT``."""
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _Invalid('expected "" (off) or "HOST:PORT" like "127.0.0.1:9469"')
    if host.startswith("["):
        if not host.endswith("]") or not _is_ip(host[1:-1], version=6):
            raise _Invalid('expected "[IPv6]:PORT" like "[::1]:9469"')
    elif ":" in host or not (_is_ip(host, version=4) or re.fullmatch(r"[A-Za-z0-9.-]+", host)):
        raise _Invalid('expected "HOST:PORT" (IPv6 hosts in brackets, like "[::1]:9469")')
    return value


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _abs_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise _Invalid("expected an absolute path")
    return value


def _socket_path(value: str) -> str:
    _abs_path(value)
    if len(value.encode()) > 107:
        raise _Invalid("too long for a unix socket path (at most 107 bytes)")
    return value


def _restricted_path(value: str) -> str:
    """A relative IMDS instance path like ``compute/userData``."""
    parts = value.split("/")
    if value.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _Invalid('expected a path below /metadata/instance like "compute/userData"')
    if parts[0] == "metadata":
        raise _Invalid('expected a path below /metadata/instance like "compute/userData"')
    return value


def _hook_name(value: str) -> str:
    """Safe as a file name: letters, digits, ``_.-``, not starting with ``.`` or ``-``."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", value):
        raise _Invalid(
            "expected a non-empty name of letters, digits, '_', '.' and '-' "
            "(not starting with '.' or '-', at most 128 characters)"
        )
    return value


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise _Invalid("must not contain NUL")
    return value


class _Command(_List):
    """A non-empty argv list whose first item (the program) is non-empty."""

    def __init__(self) -> None:
        super().__init__(_Str(check=_no_nul), non_empty=True)

    def parse(self, value: object) -> list[Any]:
        argv = super().parse(value)
        if not argv[0]:
            raise _Invalid("the program (first item) must not be empty")
        return argv


# ---------------------------------------------------------------------------------------------
# The typed configuration


_POSITIVE = _Duration()
_ZERO_DISABLES = _Duration(positive=False)


class ImdsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[imds]``: where and how fast to talk to the instance metadata service."""

    endpoint: Annotated[str, _Str(check=_endpoint)] = "http://169.254.169.254"
    api_version: Annotated[str, _Str(check=_api_version)] = "auto"
    max_requests_per_second: Annotated[float, _Float(gt=0, le=4)] = 2.0
    connect_timeout: Annotated[float, _POSITIVE] = 2.0
    read_timeout: Annotated[float, _POSITIVE] = 10.0


class PollConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[poll]``: poll intervals in seconds; 0 disables the optional documents."""

    instance: Annotated[float, _Duration(floor=1.0)] = 10.0
    scheduled_events: Annotated[float, _ZERO_DISABLES] = 1.0
    loadbalancer: Annotated[float, _ZERO_DISABLES] = 60.0


def _default_restricted() -> list[str]:
    return ["compute/userData", "compute/customData"]


def _default_uids() -> list[int]:
    return [0]


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[server]``: the local unix socket API and who may read restricted paths."""

    socket: Annotated[str, _Str(check=_socket_path)] = "/run/imdsd/imdsd.sock"
    socket_mode: Annotated[int, _Mode()] = 0o660
    socket_group: Annotated[str, _Str(check=_no_nul)] = "imdsd"
    max_connections: Annotated[int, _Int(ge=1)] = 2048
    heartbeat: Annotated[float, _Duration(ceiling=30.0)] = 15.0
    restricted_paths: Annotated[list[str], _List(_Str(check=_restricted_path), unique=True)] = (
        msgspec.field(default_factory=_default_restricted)
    )
    restricted_allow_uids: Annotated[list[int], _List(_Int(ge=0, le=2**32 - 2))] = msgspec.field(
        default_factory=_default_uids
    )
    restricted_allow_gids: Annotated[list[int], _List(_Int(ge=0, le=2**32 - 2))] = msgspec.field(
        default_factory=list
    )


class StateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[state]``: where state is persisted and how many revisions are kept."""

    directory: Annotated[str, _Str(check=_abs_path)] = "/var/lib/imdsd"
    history: Annotated[int, _Int(ge=1)] = 4096
    history_bytes: Annotated[int, _Int(ge=65536)] = 16 * 1024 * 1024


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[metrics]``: an optional TCP listener serving ``GET /metrics`` only."""

    listen: Annotated[str, _Str(check=_listen)] = ""


class FrontConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[front]``: the optional IMDS-compatible TCP front for unmodified agents."""

    listen: Annotated[str, _Str(check=_listen)] = ""
    redirect: Annotated[bool, _Bool()] = False
    queue_timeout: Annotated[float, _Duration(ceiling=60.0)] = 5.0
    token_cache: Annotated[bool, _Bool()] = True


class HooksConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[hooks]``: the hook directory and how many hooks run at once."""

    directory: Annotated[str, _Str(check=_abs_path)] = "/etc/imdsd/hooks.d"
    max_parallel: Annotated[int, _Int(ge=1)] = 4


class HookConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[hook]]``: run ``command`` when changes of kinds ``on`` happen."""

    name: Annotated[str, _Str(check=_hook_name)]
    on: Annotated[list[str], _List(_Str(choices=KINDS), non_empty=True, unique=True)]
    command: Annotated[list[str], _Command()]
    timeout: Annotated[float, _POSITIVE] = 60.0
    debounce: Annotated[float, _ZERO_DISABLES] = 1.0
    retries: Annotated[int, _Int(ge=0)] = 3
    user: Annotated[str, _Str(check=_no_nul)] = ""


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[log]``: log level and format (``auto`` = console on a TTY, JSON otherwise)."""

    level: Annotated[str, _Str(choices=tuple(LEVELS))] = "info"
    format: Annotated[str, _Str(choices=FORMATS)] = "auto"


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
# The walker


def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _rule_of(tp: Any) -> _Rule | None:
    if get_origin(tp) is Annotated:
        return next((m for m in get_args(tp)[1:] if isinstance(m, _Rule)), None)
    return None


def _build(cls: type[msgspec.Struct], table: Mapping[str, Any], path: str) -> Any:
    """Build ``cls`` from a TOML table, raising ``_Invalid`` with the dotted key."""
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    for key, value in table.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise _Invalid(f"unknown key{hint}", f"{path}{key}", value)
    values: dict[str, Any] = {}
    for name, info in fields.items():
        key = f"{path}{name}"
        if name not in table:
            if info.required:
                raise _Invalid("required key is missing", key)
            continue
        value = table[name]
        sub = _struct_of(info.type)
        if sub is not None:
            if not isinstance(value, dict):
                raise _Invalid(f"expected a table ([{key}])", key, value)
            values[name] = _build(sub, value, f"{key}.")
        elif get_origin(info.type) is list and _struct_of(get_args(info.type)[0]):
            values[name] = _build_list(get_args(info.type)[0], value, key)
        else:
            rule = _rule_of(info.type)
            assert rule is not None, f"no rule for {cls.__name__}.{name}"
            try:
                values[name] = rule.parse(value)
            except _Invalid as exc:
                bad = value if exc.value is _NO_VALUE else exc.value
                raise _Invalid(exc.problem, key + exc.key, bad) from None
    return cls(**values)


def _build_list(cls: type[msgspec.Struct], value: object, key: str) -> list[Any]:
    """Build an array of tables (``[[hook]]``); entries must have unique names."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _Invalid(f"expected an array of tables ([[{key}]])", key, value)
    out = [_build(cls, entry, f"{key}[{i}].") for i, entry in enumerate(value)]
    seen: dict[str, int] = {}
    for index, entry in enumerate(out):
        name = getattr(entry, "name", None)
        if isinstance(name, str):
            if name in seen:
                raise _Invalid(
                    f"duplicate name (also {key}[{seen[name]}])", f"{key}[{index}].name", name
                )
            seen[name] = index
    return out


def parse_config(text: str, source: str) -> Config:
    """Parse and validate TOML ``text``; ``source`` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, f"invalid TOML: {exc}") from None
    try:
        config: Config = _build(Config, data, "")
    except _Invalid as exc:
        raise ConfigError(source, exc.message(), exc.key) from None
    return config


def load_config(path: str | None) -> Config:
    """Load the configuration file ``path`` (None: the default file, defaults if it is missing)."""
    source = DEFAULT_CONFIG if path is None else path
    try:
        with open(source, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(source, "cannot read: no such file") from None
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(source, f"not valid UTF-8 (line {line})") from None
    return parse_config(text, source)


# ---------------------------------------------------------------------------------------------
# Rendering and the check-config command


def _render_table(obj: msgspec.Struct) -> list[str]:
    lines = []
    for info in msgspec.structs.fields(obj):
        rule = _rule_of(info.type)
        assert rule is not None
        lines.append(f"{info.name} = {rule.render(getattr(obj, info.name))}")
    return lines


def render_toml(cfg: Config) -> str:
    """The effective configuration as TOML with every key; ``parse_config`` reads it back."""
    blocks: list[list[str]] = []
    for info in msgspec.structs.fields(cfg):
        value = getattr(cfg, info.name)
        if isinstance(value, list):
            blocks.extend([f"[[{info.name}]]", *_render_table(entry)] for entry in value)
        else:
            blocks.append([f"[{info.name}]", *_render_table(value)])
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def check_config_command(args: argparse.Namespace) -> int:
    """``imdsd check-config [-c FILE]``: print the effective config, or one error line (78)."""
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"imdsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(render_toml(cfg))
    return EXIT_OK
