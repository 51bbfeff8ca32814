"""Tests for imdsd.config: defaults, every kind of error, durations, rendering, check-config."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imdsd import configfile
from imdsd.commands import check_config_command
from imdsd.config import (
    Config,
    ConfigError,
    FrontConfig,
    HookConfig,
    HooksConfig,
    ImdsConfig,
    LogConfig,
    MetricsConfig,
    PollConfig,
    ServerConfig,
    StateConfig,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    render_toml,
)
from imdsd.frames import KINDS

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "conf" / "imdsd.toml"
SRC = "/etc/imdsd/test.toml"
HOOK = '[[hook]]\nname = "h"\non = ["tags"]\ncommand = ["/bin/true"]\n'


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{SRC}: ")
    return message


# --- defaults -------------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    cfg = parse_config("", SRC)
    assert cfg == Config()
    assert cfg.imds == ImdsConfig("http://169.254.169.254", "auto", 2.0, 2.0, 10.0)
    assert cfg.poll == PollConfig(10.0, 1.0, 60.0)
    assert cfg.server.socket == "/run/imdsd/imdsd.sock"
    assert cfg.server.socket_mode == 0o660
    assert cfg.server.socket_group == "imdsd"
    assert cfg.server.max_connections == 2048
    assert cfg.server.heartbeat == 15.0
    assert cfg.server.restricted_paths == ["compute/userData", "compute/customData"]
    assert cfg.server.restricted_allow_uids == [0]
    assert cfg.server.restricted_allow_gids == []
    assert cfg.state == StateConfig("/var/lib/imdsd", 4096)
    assert cfg.hooks == HooksConfig("/etc/imdsd/hooks.d", 4)
    assert cfg.hook == []
    assert cfg.log == LogConfig("info", "auto")


def test_hook_defaults_and_partial_sections() -> None:
    cfg = parse_config(HOOK + '[imds]\nread_timeout = "1m30s"\n', SRC)
    assert cfg.hook == [HookConfig("h", ["tags"], ["/bin/true"], 60.0, 1.0, 3, "")]
    assert cfg.imds.read_timeout == 90.0
    assert cfg.imds.connect_timeout == 2.0
    assert cfg.poll == PollConfig()


def test_accepted_values() -> None:
    cfg = parse_config(
        """
        [imds]
        endpoint = "http://127.0.0.1:8169/"
        api_version = "2021-02-01"
        max_requests_per_second = 4
        [poll]
        instance = "1s"
        scheduled_events = "0s"
        loadbalancer = "0s"
        [server]
        socket_mode = "600"
        socket_group = ""
        restricted_paths = []
        restricted_allow_gids = [4, 27]
        [[hook]]
        name = "a.b_c-1"
        on = ["disks", "network"]
        command = ["/x", ""]
        debounce = "0s"
        retries = 0
        user = "nobody"
        [log]
        level = "debug"
        format = "json"
        """,
        SRC,
    )
    assert cfg.imds.endpoint == "http://127.0.0.1:8169"
    assert cfg.imds.api_version == "2021-02-01"
    assert cfg.imds.max_requests_per_second == 4.0
    assert isinstance(cfg.imds.max_requests_per_second, float)
    assert (cfg.poll.instance, cfg.poll.scheduled_events, cfg.poll.loadbalancer) == (1, 0, 0)
    assert cfg.server.socket_mode == 0o600
    assert cfg.server.restricted_paths == []
    assert cfg.server.restricted_allow_gids == [4, 27]
    assert cfg.hook[0].on == ["disks", "network"]
    assert (cfg.hook[0].debounce, cfg.hook[0].retries, cfg.hook[0].user) == (0, 0, "nobody")
    assert cfg.log == LogConfig("debug", "json")


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.imds = ImdsConfig()  # type: ignore[misc]


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys, at every level
        ("colour = 1", "colour = 1: unknown key"),
        ("[imds]\nendpont = 'http://x'", 'imds.endpont = "http://x": unknown key (did you mean'),
        ("[telemetry]\nport = 1", "telemetry = {port = 1}: unknown key"),
        (HOOK + "timeot = '2s'", 'hook[0].timeot = "2s": unknown key (did you mean "timeout"?)'),
        (HOOK + HOOK.replace('"h"', '"g"') + "x = 1", "hook[1].x = 1: unknown key"),
        # wrong types
        ("[imds]\nmax_requests_per_second = '2'", 'max_requests_per_second = "2": expected a num'),
        ("[server]\nmax_connections = 1.5", "server.max_connections = 1.5: expected an integer"),
        ("[server]\nmax_connections = true", "server.max_connections = true: expected an integer"),
        ("[log]\nlevel = 1", "log.level = 1: expected a string"),
        ("imds = 'x'", 'imds = "x": expected a table'),
        ("[server]\nrestricted_paths = 'compute/x'", 'restricted_paths = "compute/x": expected an'),
        (
            "[server]\nrestricted_allow_uids = ['root']",
            'restricted_allow_uids[0] = "root": expected',
        ),
        (
            "[server]\nsocket_mode = 0o660",
            "server.socket_mode = 432: expected an octal mode string",
        ),
        ("[server]\nsocket_mode = '0680'", 'server.socket_mode = "0680": expected an octal mode'),
        ("[hook]\nname = 'h'", 'hook = {name = "h"}: expected an array of tables ([[hook]])'),
        (
            HOOK.replace('["/bin/true"]', '"/bin/true"'),
            'hook[0].command = "/bin/true": expected an',
        ),
        (HOOK.replace('["tags"]', '"tags"'), 'hook[0].on = "tags": expected an array'),
        # bad durations
        ("[poll]\ninstance = 10", 'poll.instance = 10: expected a duration string like "10s"'),
        ("[poll]\ninstance = '10'", 'poll.instance = "10": invalid duration'),
        ("[poll]\ninstance = '-5s'", 'poll.instance = "-5s": invalid duration: negative'),
        ("[poll]\ninstance = '2d'", 'poll.instance = "2d": invalid duration'),
        (
            "[imds]\nread_timeout = '1s1m'",
            'imds.read_timeout = "1s1m": invalid duration: each unit',
        ),
        (HOOK + "timeout = '5 s'", 'hook[0].timeout = "5 s": invalid duration'),
        # out of range
        (
            "[imds]\nmax_requests_per_second = 5",
            "max_requests_per_second = 5: must be > 0 and <= 4",
        ),
        (
            "[imds]\nmax_requests_per_second = 0",
            "max_requests_per_second = 0: must be > 0 and <= 4",
        ),
        ("[imds]\nmax_requests_per_second = nan", "max_requests_per_second = nan: must be > 0"),
        ("[imds]\nconnect_timeout = '0s'", 'imds.connect_timeout = "0s": must be greater than 0s'),
        ("[poll]\ninstance = '500ms'", 'poll.instance = "500ms": must be at least 1s'),
        ("[server]\nmax_connections = 0", "server.max_connections = 0: must be >= 1"),
        ("[server]\nheartbeat = '0ms'", 'server.heartbeat = "0ms": must be greater than 0s'),
        ("[server]\nheartbeat = '31s'", 'server.heartbeat = "31s": must be at most 30s'),
        ("[state]\nhistory_bytes = 1024", "state.history_bytes = 1024: must be >= 65536"),
        ("[metrics]\nlisten = '9469'", 'metrics.listen = "9469": expected "" (off) or'),
        ("[metrics]\nlisten = '127.0.0.1:0'", 'metrics.listen = "127.0.0.1:0": expected'),
        ("[metrics]\nlisten = '::1:80'", 'metrics.listen = "::1:80": expected "HOST:PORT"'),
        ("[front]\nlisten = '[::1:80'", 'front.listen = "[::1:80": expected "[IPv6]:PORT"'),
        ("[front]\nredirect = 'yes'", 'front.redirect = "yes": expected true or false'),
        ("[front]\nqueue_timeout = '2m'", 'front.queue_timeout = "2m": must be at most 1m'),
        ("[server]\nrestricted_allow_uids = [-1]", "restricted_allow_uids[0] = -1: must be >= 0"),
        ("[state]\nhistory = 0", "state.history = 0: must be >= 1"),
        ("[hooks]\nmax_parallel = 0", "hooks.max_parallel = 0: must be >= 1"),
        (HOOK + "retries = -1", "hook[0].retries = -1: must be >= 0"),
        (HOOK + "timeout = '0s'", 'hook[0].timeout = "0s": must be greater than 0s'),
        ("[log]\nlevel = 'trace'", 'log.level = "trace": expected one of debug, info, warning'),
        ("[log]\nformat = 'xml'", 'log.format = "xml": expected one of auto, console, json'),
        ("[imds]\napi_version = 'latest'", 'imds.api_version = "latest": expected "auto" or a'),
        ("[imds]\napi_version = '2021-02-30'", 'imds.api_version = "2021-02-30": expected'),
        ("[state]\ndirectory = 'var/lib'", 'state.directory = "var/lib": expected an absolute'),
        ("[server]\nsocket = '/" + "s" * 107 + "'", 'server.socket = "/sss'),
        ("[server]\nrestricted_paths = ['/metadata/instance/compute/userData']", "paths[0] = "),
        ("[server]\nrestricted_paths = ['metadata/instance/compute']", "restricted_paths[0] = "),
        ("[server]\nrestricted_paths = ['compute//userData']", "restricted_paths[0] = "),
        ("[server]\nrestricted_paths = ['']", 'server.restricted_paths[0] = "": expected a path'),
        ("[server]\nrestricted_paths = ['a', 'a']", 'restricted_paths[1] = "a": duplicate item'),
        # bad endpoints
        ("[imds]\nendpoint = 'https://169.254.169.254'", 'endpoint = "https://169.254.169.254"'),
        ("[imds]\nendpoint = 'http://x/metadata'", 'endpoint = "http://x/metadata": must not'),
        ("[imds]\nendpoint = 'http://x?a=1'", 'imds.endpoint = "http://x?a=1": must not have a'),
        ("[imds]\nendpoint = 'http://'", 'imds.endpoint = "http://": expected "http://host"'),
        ("[imds]\nendpoint = '169.254.169.254'", 'endpoint = "169.254.169.254": must start with'),
        ("[imds]\nendpoint = 'http://u:p@x'", 'imds.endpoint = "http://u:p@x": expected "http://'),
        ("[imds]\nendpoint = 'http://x:99999'", 'imds.endpoint = "http://x:99999": invalid URL'),
        # hooks
        (HOOK + HOOK, 'hook[1].name = "h": duplicate name (also hook[0])'),
        (HOOK.replace('"tags"', '"tag"'), 'hook[0].on[0] = "tag": expected one of tags, disks'),
        (HOOK.replace('["tags"]', "[]"), "hook[0].on = []: must not be empty"),
        (HOOK.replace('["tags"]', '["tags", "tags"]'), 'hook[0].on[1] = "tags": duplicate item'),
        (HOOK.replace('["/bin/true"]', "[]"), "hook[0].command = []: must not be empty"),
        (HOOK.replace('["/bin/true"]', '["", "x"]'), 'command = ["", "x"]: the program (first'),
        (HOOK.replace('["/bin/true"]', "[1]"), "hook[0].command[0] = 1: expected a string"),
        (HOOK.replace('"h"', '"../x"'), 'hook[0].name = "../x": expected a non-empty name'),
        (HOOK.replace('"h"', '""'), 'hook[0].name = "": expected a non-empty name'),
        (HOOK.replace('"h"', '".hidden"'), 'hook[0].name = ".hidden": expected a non-empty'),
        ('[[hook]]\non = ["tags"]\ncommand = ["x"]', "hook[0].name: required key is missing"),
        ('[[hook]]\nname = "a"\non = ["tags"]', "hook[0].command: required key is missing"),
        ("[[hook]]", "hook[0].name: required key is missing"),
        # invalid TOML
        ("[imds\n", "invalid TOML: "),
        ("a = 1\na = 2", "invalid TOML: "),
    ],
)
def test_errors_name_file_key_and_value(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_error_value_is_shortened_and_error_carries_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"[state]\ndirectory = '{'x' * 500}'", SRC)
    assert len(str(info.value)) < 200
    assert "..." in str(info.value)
    assert info.value.source == SRC
    assert info.value.key == "state.directory"


def test_error_value_with_newline_stays_on_one_line() -> None:
    assert 'log.level = "a\\nb": expected one of' in error_of('[log]\nlevel = "a\\nb"')


# --- loading files --------------------------------------------------------------------------


def test_load_missing_default_file_gives_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(configfile, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert load_config(None) == Config()


def test_load_default_file_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "imdsd.toml"
    path.write_text("[state]\nhistory = 7\n")
    monkeypatch.setattr(configfile, "DEFAULT_CONFIG", str(path))
    assert load_config(None).state.history == 7


def test_load_explicit_file(tmp_path: Path) -> None:
    path = tmp_path / "imdsd.toml"
    path.write_text('[log]\nlevel = "error"\n')
    assert load_config(str(path)).log.level == "error"


def test_load_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read: no such file"):
        load_config(path)


def test_load_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read: ") as info:
        load_config(str(tmp_path))
    assert str(info.value).startswith(str(tmp_path))


def test_load_invalid_utf8_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[log]\nlevel = "\xff"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid UTF-8 \(line 2\)"):
        load_config(str(path))


def test_load_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[imds]\nendpoint = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: .*line 2"):
        load_config(str(path))


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h2m3s4ms", 3723.004),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("0.25ms", 0.00025),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "10", "-1s", "1", "s", "1d", "1us", "1S", " 1s", "1s ", "1e3s", ".5s", "1.s",
             "1s1s", "30s1m", "1m1h", "1ms1s", "+1s", "1_000s", "1,5s", "inf", "nans"],
)  # fmt: skip
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        parse_duration(text)


def test_parse_duration_too_large() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * 400 + "h")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "500ms"),
        (10, "10s"),
        (0, "0s"),
        (60, "1m"),
        (90, "1m30s"),
        (3600, "1h"),
        (3661, "1h1m1s"),
        (1.5, "1.5s"),
        (60.5, "1m500ms"),
        (0.0001, "0.0001s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_format_duration_rejects(seconds: float) -> None:
    with pytest.raises(ValueError, match="cannot format"):
        format_duration(seconds)


@settings(deadline=None)
@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# --- rendering ------------------------------------------------------------------------------


def test_render_defaults_has_every_key_and_round_trips() -> None:
    text = render_toml(Config())
    data = tomllib.loads(text)
    assert data["poll"] == {"instance": "10s", "scheduled_events": "1s", "loadbalancer": "1m"}
    assert data["server"]["socket_mode"] == "0660"
    assert data["imds"]["connect_timeout"] == "2s"
    assert "hook" not in data
    assert set(data) == {"imds", "poll", "server", "state", "hooks", "log", "metrics", "front"}
    for section, table in data.items():
        expected = msgspec.structs.fields(getattr(Config(), section))
        assert set(table) == {f.name for f in expected}
    assert parse_config(text, "rendered") == Config()


def test_render_round_trips_hooks_and_awkward_strings() -> None:
    cfg = Config(
        server=ServerConfig(socket_group='we"ird\\group\t\x7f\x01é', socket_mode=0o7),
        hook=[
            HookConfig("a", ["tags"], ["/bin/echo", 'say "hi"', "\n"], 0.5, 0.0, 0, "nobody"),
            HookConfig("b", list(KINDS), ["x"], 3600.001),
        ],
    )
    text = render_toml(cfg)
    assert '[[hook]]\nname = "a"' in text
    assert 'socket_mode = "0007"' in text
    assert parse_config(text, "rendered") == cfg


_name = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True)
_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_path = _text.map(lambda s: "/" + s)
_seconds = st.floats(min_value=0, max_value=1e7)
_positive = st.floats(min_value=0, max_value=1e7, exclude_min=True)
_ids = st.lists(st.integers(0, 2**32 - 2), max_size=3)
_segment = st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True)
_restricted = st.lists(_segment, min_size=1, max_size=3).map("/".join)

_listens = st.sampled_from(["", "127.0.0.1:9469", "[::1]:8169", "localhost:1", "0.0.0.0:65535"])
_front_listens = st.sampled_from(
    ["", "127.0.0.1:169", "[::1]:8169", "localhost:1", "127.9.0.1:65535"]
)


def _front(listen: str, redirect: bool, queue_timeout: float, token_cache: bool) -> FrontConfig:
    redirect = redirect and (not listen or int(listen.rpartition(":")[2]) < 1024)
    return FrontConfig(listen, redirect, queue_timeout, token_cache)


_configs = st.builds(
    Config,
    imds=st.builds(
        ImdsConfig,
        endpoint=st.sampled_from(
            ["http://169.254.169.254", "http://127.0.0.1:8169", "http://[::1]"]
        ),
        api_version=st.one_of(st.just("auto"), st.dates().map(lambda d: d.isoformat())),
        max_requests_per_second=st.floats(min_value=0, max_value=4, exclude_min=True),
        connect_timeout=_positive,
        read_timeout=_positive,
    ),
    poll=st.builds(
        PollConfig,
        instance=st.floats(min_value=1, max_value=1e7),
        scheduled_events=_seconds,
        loadbalancer=_seconds,
    ),
    server=st.builds(
        ServerConfig,
        socket=_path,
        socket_mode=st.integers(0, 0o7777),
        socket_group=_text,
        max_connections=st.integers(1, 2**40),
        heartbeat=st.floats(min_value=0.001, max_value=30),
        restricted_paths=st.lists(_restricted.filter(lambda p: p != "metadata"), unique=True),
        restricted_allow_uids=_ids,
        restricted_allow_gids=_ids,
    ),
    state=st.builds(
        StateConfig,
        directory=_path,
        history=st.integers(1, 10**6),
        history_bytes=st.integers(65536, 2**40),
    ),
    hooks=st.builds(HooksConfig, directory=_path, max_parallel=st.integers(1, 64)),
    hook=st.lists(
        st.builds(
            HookConfig,
            name=_name,
            on=st.lists(st.sampled_from(KINDS), min_size=1, unique=True),
            command=st.tuples(_text.filter(bool), st.lists(_text, max_size=3)).map(
                lambda t: [t[0], *t[1]]
            ),
            timeout=_positive,
            debounce=_seconds,
            retries=st.integers(0, 100),
            user=_text,
        ),
        max_size=3,
        unique_by=lambda h: h.name,
    ),
    log=st.builds(
        LogConfig,
        level=st.sampled_from(["debug", "info", "warning", "error"]),
        format=st.sampled_from(["auto", "console", "json"]),
    ),
    metrics=st.builds(MetricsConfig, listen=_listens),
    front=st.builds(
        _front,
        listen=_front_listens,
        redirect=st.booleans(),
        queue_timeout=st.floats(min_value=0.001, max_value=60),
        token_cache=st.booleans(),
    ),
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs)
def test_render_round_trip_generated(cfg: Config) -> None:
    assert parse_config(render_toml(cfg), "rendered") == cfg


# --- the shipped example file ---------------------------------------------------------------


def test_shipped_config_is_the_defaults_with_every_key() -> None:
    text = SHIPPED.read_text()
    assert parse_config(text, str(SHIPPED)) == Config()
    assert set(tomllib.loads(text)) == set(tomllib.loads(render_toml(Config())))
    for section, table in tomllib.loads(text).items():
        assert set(table) == set(tomllib.loads(render_toml(Config()))[section]), section


def test_shipped_config_comments_every_key() -> None:
    for line in SHIPPED.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            assert " # " in line, line


def test_shipped_hook_example_is_valid_once_uncommented() -> None:
    lines = SHIPPED.read_text().splitlines()
    start = lines.index("# [[hook]]")
    example = [line.removeprefix("# ") for line in lines[start:] if line.startswith("# ")]
    cfg = parse_config("\n".join(example), "example")
    assert cfg.hook == [
        HookConfig("remount", ["disks"], ["/usr/local/sbin/remount-data-disks", "--all"])
    ]
    fields = {f.name for f in msgspec.structs.fields(HookConfig)}
    assert set(tomllib.loads("\n".join(example))["hook"][0]) == fields


# --- check-config ---------------------------------------------------------------------------


def test_check_config_prints_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "imdsd.toml"
    path.write_text(HOOK + "[poll]\ninstance = '90s'\n")
    assert check_config_command(argparse.Namespace(config=str(path))) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert 'instance = "1m30s"' in out
    assert parse_config(out, "stdout") == load_config(str(path))


def test_check_config_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(configfile, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert check_config_command(argparse.Namespace(config=None)) == 0
    assert capsys.readouterr().out == render_toml(Config())


def test_check_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[imds]\nmax_requests_per_second = 10\n")
    assert check_config_command(argparse.Namespace(config=str(path))) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"imdsd: {path}: imds.max_requests_per_second = 10: must be > 0 and <= 4\n"


# --- [front] listen: loopback only, and a port only root can bind with the redirect ------------


@settings(deadline=None)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(1, 65535))
def test_front_listen_is_loopback_only(address: object, port: int) -> None:
    """A front reachable from the network would hand managed-identity tokens to it."""
    host = f"[{address}]" if ":" in str(address) else str(address)
    text = f'[front]\nlisten = "{host}:{port}"\n'
    loopback = str(address).startswith("127.") or str(address) == "::1"
    if loopback:
        assert parse_config(text, SRC).front.listen == f"{host}:{port}"
    else:
        with pytest.raises(ConfigError) as info:
            parse_config(text, SRC)
        assert str(info.value) == (
            f'{SRC}: front.listen = "{host}:{port}": must be a loopback address like '
            '"127.0.0.1:169" (127.0.0.0/8, [::1] or localhost): '
            "IMDS is never reachable from the network"
        )


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "[::]", "example.com", "10.0.0.4", "[::ffff:127.0.0.1]"]
)
def test_front_listen_refuses_wildcards_and_names(host: str) -> None:
    with pytest.raises(ConfigError, match=r'front.listen = ".*": must be a loopback address'):
        parse_config(f'[front]\nlisten = "{host}:169"\n', SRC)
    assert parse_config('[front]\nlisten = "LocalHost:169"\n', SRC).front.listen


@settings(deadline=None)
@given(st.integers(1, 65535), st.sampled_from(["127.0.0.1", "[::1]", "localhost"]))
def test_front_redirect_needs_a_port_only_root_can_bind(port: int, host: str) -> None:
    """Else any user who binds the port first (or while imdsd is down) gets the agents'
    IMDS traffic through the redirect."""
    listen = f"{host}:{port}"
    assert parse_config(f'[front]\nlisten = "{listen}"\n', SRC).front.listen == listen
    text = f'[front]\nlisten = "{listen}"\nredirect = true\n'
    if port < 1024:
        assert parse_config(text, SRC).front.redirect
    else:
        with pytest.raises(ConfigError) as info:
            parse_config(text, SRC)
        assert str(info.value) == (
            f'{SRC}: front.listen = "{listen}": with redirect = true the port must be below '
            '1024 (only root can bind it), like "127.0.0.1:169"'
        )
    assert parse_config("[front]\nredirect = true\n", SRC).front.redirect  # socket activation


def test_check_config_front_redirect_on_a_user_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "front.toml"
    path.write_text('[front]\nlisten = "127.0.0.1:8169"\nredirect = true\n')
    assert check_config_command(argparse.Namespace(config=str(path))) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f'imdsd: {path}: front.listen = "127.0.0.1:8169": with redirect')


def test_check_config_missing_explicit_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "absent.toml"
    assert check_config_command(argparse.Namespace(config=str(path))) == 78
    assert capsys.readouterr().err == f"imdsd: {path}: cannot read: no such file\n"


def test_check_config_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[poll]\ninstance = "fast"\n')
    result = subprocess.run(
        [sys.executable, "-m", "imdsd", "check-config", "-c", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f'imdsd: {path}: poll.instance = "fast": invalid duration')
    assert "Traceback" not in result.stderr
