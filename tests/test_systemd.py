"""Tests for imdsd.systemd: sd_notify datagrams on a real socket, watchdog, socket activation."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from imdsd.systemd import (
    LISTEN_FDS_START,
    Notifier,
    SystemdError,
    listen_fds,
    notify_address,
    parse_listen_env,
    watchdog_interval,
)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notification socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode().split("\n")


def test_messages_reach_the_notify_socket(receiver: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": receiver.getsockname()}
    notifier = Notifier.from_env(env)
    assert notifier.enabled
    assert notifier.ready()
    assert _received(receiver) == ["READY=1"]
    assert notifier.ready("revision 7")
    assert _received(receiver) == ["READY=1", "STATUS=revision 7"]
    assert notifier.status("revision 8, upstream ok\nwatchers 2")
    assert _received(receiver) == ["STATUS=revision 8, upstream ok watchers 2"]
    assert notifier.watchdog()
    assert _received(receiver) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert _received(receiver) == ["STOPPING=1"]
    assert notifier.stopping("waiting for 1 hook")
    assert _received(receiver) == ["STOPPING=1", "STATUS=waiting for 1 hook"]
    assert notifier.extend_timeout(2.5)
    assert _received(receiver) == ["EXTEND_TIMEOUT_USEC=2500000"]
    notifier.close()
    assert notifier.watchdog()
    assert _received(receiver) == ["WATCHDOG=1"]
    notifier.close()


def test_reloading_carries_the_monotonic_clock(receiver: socket.socket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.getsockname()})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp = _received(receiver)
    assert reloading == "RELOADING=1"
    key, _, value = stamp.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    notifier.close()

    fixed = Notifier(receiver.getsockname(), monotonic_usec=lambda: 1234)
    fixed.reloading()
    assert _received(receiver) == ["RELOADING=1", "MONOTONIC_USEC=1234"]
    fixed.close()


def test_abstract_socket_address() -> None:
    name = f"imdsd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.ready()
        assert sock.recv(100) == b"READY=1"
        notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.reloading()
    assert notifier.watchdog_interval is None


def test_send_failures_do_not_raise_and_are_logged_once(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "absent")})
    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    assert len(logs) == 1
    assert logs[0]["log_level"] == "warning"
    assert "absent" in logs[0]["address"]
    notifier.close()


def test_from_env_unsets_the_variables(receiver: socket.socket) -> None:
    env = {
        "NOTIFY_SOCKET": receiver.getsockname(),
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    notifier = Notifier.from_env(env)
    assert env == {"PATH": "/usr/bin"}
    assert notifier.watchdog_interval == 15.0
    kept = {"NOTIFY_SOCKET": receiver.getsockname(), "WATCHDOG_USEC": "4000000"}
    assert Notifier.from_env(kept, unset_environment=False).watchdog_interval == 2.0
    assert set(kept) == {"NOTIFY_SOCKET", "WATCHDOG_USEC"}


def test_from_env_reads_os_environ(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier.from_env()
    assert "NOTIFY_SOCKET" not in os.environ
    assert notifier.ready()
    assert _received(receiver) == ["READY=1"]
    notifier.close()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NOTIFY_SOCKET": "run/notify"}, "notifications disabled"),
        ({"NOTIFY_SOCKET": "@"}, "notifications disabled"),
        ({"WATCHDOG_USEC": "soon"}, "watchdog setting ignored"),
    ],
)
def test_bad_settings_are_logged_and_ignored(env: dict[str, str], message: str) -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_env(dict(env))
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert [entry["event"] for entry in logs] == [f"systemd {message}"]
    assert repr(next(iter(env.values()))) in logs[0]["error"]


def test_notify_address() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abc") == b"\0abc"
    with pytest.raises(SystemdError, match="vsock:1:2"):
        notify_address("vsock:1:2")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "1"}, 0.0000005),
        ({"WATCHDOG_PID": "4242"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WATCHDOG_USEC": "30s"}, "WATCHDOG_USEC='30s' is not a number"),
        ({"WATCHDOG_USEC": "0"}, "WATCHDOG_USEC='0' must be a positive number"),
        ({"WATCHDOG_USEC": "-5"}, "WATCHDOG_USEC='-5' must be a positive number"),
        ({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "me"}, "WATCHDOG_PID='me' is not a number"),
    ],
)
def test_watchdog_interval_rejects_malformed_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(SystemdError) as caught:
        watchdog_interval(env, pid=4242)
    assert str(caught.value) == message


def test_watchdog_interval_defaults_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"LISTEN_FDS": "1"}, []),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "1"}, [(3, "unknown")]),
        ({"LISTEN_PID": "8", "LISTEN_FDS": "1"}, []),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "api:"}, [(3, "api"), (4, "")]),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "2"}, [(3, "unknown"), (4, "unknown")]),
    ],
)
def test_parse_listen_env(env: dict[str, str], expected: list[tuple[int, str]]) -> None:
    assert parse_listen_env(env, 7) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "LISTEN_PID='x' is not a number"),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "one"}, "LISTEN_FDS='one' is not a number"),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "0"}, "LISTEN_FDS='0' must be a positive number"),
        (
            {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "api"},
            "LISTEN_FDNAMES='api' names 1 sockets, but LISTEN_FDS=2",
        ),
    ],
)
def test_parse_listen_env_rejects_malformed_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(SystemdError) as caught:
        parse_listen_env(env, 7)
    assert str(caught.value) == message


def test_listen_fds_for_another_process_only_unsets() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api"}
    assert listen_fds(env) == []
    assert env == {}
    malformed = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"}
    with pytest.raises(SystemdError, match="LISTEN_FDS='many'"):
        listen_fds(malformed)
    assert malformed == {}


# Runs in the activated process: reports what listen_fds() found, as JSON on stdout.
_REPORT = """
import fcntl, json, os, sys
from imdsd.systemd import listen_fds, SystemdError
try:
    found = listen_fds()
except SystemdError as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(0)
report = {"env": sorted(k for k in os.environ if k.startswith("LISTEN_")), "sockets": []}
for sock, name in found:
    entry = {
        "name": name,
        "fd": sock.fileno(),
        "family": sock.family.name,
        "type": sock.type.name,
        "cloexec": bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        "address": sock.getsockname() if sock.family.name == "AF_UNIX" else None,
    }
    if sock.type.name == "SOCK_STREAM":
        conn, _ = sock.accept()
        conn.sendall(b"hello from " + name.encode())
        conn.close()
    report["sockets"].append(entry)
print(json.dumps(report))
"""

# Moves the passed fds to 3, 4, ... and execs the report with LISTEN_PID set to its own pid,
# the way systemd does.
_LAUNCH = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
if sys.argv[2] != "-":
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execv(sys.executable, [sys.executable, "-c", sys.argv[3]])
"""


def _activate(fds: list[int], names: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCH, ",".join(map(str, fds)), names, _REPORT],
        pass_fds=fds,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_listen_fds_takes_over_passed_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as api,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client,
    ):
        api.bind(path)
        api.listen()
        udp.bind(("127.0.0.1", 0))
        client.connect(path)  # waits in the backlog until the activated process accepts
        client.settimeout(30)
        report = _activate([api.fileno(), udp.fileno()], "api:udp")
        assert client.recv(100) == b"hello from api"
    assert report["env"] == []
    assert report["sockets"] == [
        {
            "name": "api",
            "fd": LISTEN_FDS_START,
            "family": "AF_UNIX",
            "type": "SOCK_STREAM",
            "cloexec": True,
            "address": path,
        },
        {
            "name": "udp",
            "fd": LISTEN_FDS_START + 1,
            "family": "AF_INET",
            "type": "SOCK_DGRAM",
            "cloexec": True,
            "address": None,
        },
    ]


def test_listen_fds_names_default_to_unknown() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        report = _activate([udp.fileno()], "-")
    assert [entry["name"] for entry in report["sockets"]] == ["unknown"]


def test_listen_fds_rejects_a_passed_fd_that_is_not_a_socket() -> None:
    read_end, write_end = os.pipe()
    try:
        report = _activate([read_end], "api")
    finally:
        os.close(read_end)
        os.close(write_end)
    assert report["error"].startswith("passed fd 3 ('api') is not a usable socket:")


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
def test_listen_fds_under_systemd_socket_activate(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    activator = subprocess.Popen(
        [
            "systemd-socket-activate",
            "--listen",
            str(path),
            "--fdname=api",
            sys.executable,
            "-c",
            _REPORT,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(30)
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    assert activator.poll() is None, "systemd-socket-activate exited early"
                    assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
                    time.sleep(0.02)
            assert client.recv(100) == b"hello from api"
        stdout, _ = activator.communicate(timeout=30)
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait()
    report = json.loads(stdout)
    assert report["env"] == []
    [entry] = report["sockets"]
    assert entry["name"] == "api"
    assert entry["fd"] == LISTEN_FDS_START
    assert entry["cloexec"]
    assert entry["address"] == str(path)
