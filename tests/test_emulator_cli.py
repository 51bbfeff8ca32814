"""Tests of ``imdsd emulate`` (imdsd.emulator.cli): arguments, errors, a real process."""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from imdsd.emulator.cli import emulate_command, format_url, parse_listen

REPO = Path(__file__).parent.parent


def args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "profile": "azure",
        "scenario": None,
        "rate_limit": 5.0,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8169", ("127.0.0.1", 8169)),
        (":8169", ("127.0.0.1", 8169)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8169", "expected HOST:PORT"),
        ("127.0.0.1:http", "port must be a number"),
        ("127.0.0.1:70000", "port must be a number from 0 to 65535"),
        ("::1:8169", "IPv6 address in brackets"),
    ],
)
def test_parse_listen_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(text)


def test_format_url() -> None:
    assert format_url("127.0.0.1", 80) == "http://127.0.0.1:80"
    assert format_url("::1", 80) == "http://[::1]:80"


def test_bad_listen_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert emulate_command(args(listen="nowhere")) == 2
    err = capsys.readouterr().err
    assert err == "imdsd emulate: --listen 'nowhere': expected HOST:PORT\n"


def test_bad_rate_limit_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert emulate_command(args(rate_limit=-1.0)) == 2
    assert "--rate-limit must be a number >= 0" in capsys.readouterr().err


def test_missing_scenario_file_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert emulate_command(args(scenario=str(missing))) == 78
    err = capsys.readouterr().err
    assert err.startswith(f"imdsd emulate: {missing}: cannot read scenario")
    assert err.count("\n") == 1


def test_invalid_scenario_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[step]]\nat = "1s"\nset_tag = { name = "a" }\n')
    assert emulate_command(args(scenario=str(bad))) == 78
    assert capsys.readouterr().err == (
        f"imdsd emulate: {bad}: step 1 (at 1s): set_tag: missing key 'value'\n"
    )


def test_impossible_scenario_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[step]]\nat = "1s"\nremove_nic = { mac = "00-00-00-00-00-01" }\n')
    assert emulate_command(args(scenario=str(bad))) == 78
    assert "step 1 (at 1s): remove_nic: no NIC with mac 000000000001" in capsys.readouterr().err


def run_emulator(*extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imdsd", "emulate", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_runs_prints_where_it_listens_and_stops_on_signal(stop: signal.Signals) -> None:
    proc = run_emulator("--listen", "127.0.0.1:0", "--scenario", "conf/scenario-demo.toml")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        prefix = "imdsd emulator listening on http://127.0.0.1:"
        assert line.startswith(prefix), line
        assert line.endswith(" (profile azure)\n")
        port = int(line[len(prefix) :].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metadata/versions", headers={"Metadata": "true"})
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["apiVersions"][-1] == "2023-11-15"
        conn.close()
        proc.send_signal(stop)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def test_port_in_use_exits_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_emulator("--listen", f"127.0.0.1:{port}", "--profile", "azurestack")
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert out == ""
    assert err.startswith(f"imdsd emulate: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1
