"""The front's startup in an in-process daemon: what happens when it cannot (or must not) listen.

A front that cannot listen is not fatal: the daemon serves everything else, reports
``degraded`` with the reason and never installs the redirect (fail-open). Stale rules are
cleared before anything is bound, so a failed start never leaves agents sent to a port that
someone else may hold. nft is replaced by a recorder (tests/test_redirect_daemon.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from daemon_support import emulator, write_config
from test_front_server import MD, call
from test_redirect_daemon import Nft

from imdsd import httpio
from imdsd.config import load_config, parse_config
from imdsd.daemon import Daemon

UNITS = Path(__file__).resolve().parent.parent / "systemd"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="binding a port below 1024 (as the redirect requires) needs root"
)


class OrderedNft(Nft):
    """Also records, at each ``remove``, whether the API socket was bound already."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, api_socket: Path) -> None:
        super().__init__(monkeypatch)
        self.api_socket = api_socket

    def remove(self) -> None:
        super().remove()
        if self.api_socket.exists():
            self.calls.append("(after the API socket was bound)")


@asynccontextmanager
async def started(
    tmp: Path, extra: str, inherited: list[socket.socket] | None = None
) -> AsyncIterator[Daemon]:
    """A daemon polling an emulator with ``extra`` config, once READY and upstream ``ok``."""
    async with emulator(rate_limit=0) as emu:
        config = write_config(tmp, emu.url, extra)
        daemon = Daemon(load_config(str(config)), str(config), front_inherited=inherited or [])
        async with trio.open_nursery() as nursery:
            with trio.fail_after(20):
                await nursery.start(daemon.run)
                while daemon.board.status(trio.current_time()) != "ok":
                    await trio.sleep(0.02)
            yield daemon
            daemon.stop()


async def api_health(daemon: Daemon) -> dict[str, Any]:
    """``GET /v1/health`` over the daemon's unix socket: the socket API still serves."""
    assert daemon.probe_path is not None
    conn = httpio.ClientConnection(await httpio.open_unix(daemon.probe_path, 5))
    try:
        response = await conn.request("GET", "/v1/health", [("Host", "imdsd")], b"", timeout=10)
    finally:
        await conn.aclose()
    assert response.status == 200
    health: dict[str, Any] = msgspec.json.decode(response.body)
    return health


def privileged_free_port() -> tuple[socket.socket, int]:
    """A socket holding a free loopback port below 1024 (as root), and the port."""
    for port in range(1023, 600, -1):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen(1)
        return sock, port
    pytest.skip("no free port below 1024 on 127.0.0.1")


@needs_root
async def test_a_taken_front_port_is_not_fatal_and_stale_rules_go_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the front's port: imdsd still serves its socket API and hooks,
    reports ``degraded`` with the reason, and agents reach IMDS directly: the stale rules
    (of an instance killed outside systemd) were removed before anything was bound, and no
    rules are installed."""
    nft = OrderedNft(monkeypatch, tmp_path / "imdsd.sock")
    squatter, port = privileged_free_port()
    with squatter:
        extra = f'[front]\nlisten = "127.0.0.1:{port}"\nredirect = true\n'
        async with started(tmp_path, extra) as daemon:
            health = await api_health(daemon)
    assert nft.calls == ["remove"]
    error = f"front.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert health["status"] == "degraded"
    assert health["reason"] == error
    assert health["front"]["error"] == error
    assert health["front"]["listen"] == []
    assert health["redirect"]["installed"] is False


async def test_a_taken_front_port_without_the_redirect_is_not_fatal(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        async with started(tmp_path, f'[front]\nlisten = "127.0.0.1:{port}"\n') as daemon:
            health = await api_health(daemon)
            assert daemon.keeper.snapshot is not None
    assert health["status"] == "degraded"
    assert health["reason"].startswith(f"front.listen: cannot listen on 127.0.0.1:{port}: ")
    assert "redirect" not in health or health["redirect"]["enabled"] is False


async def test_a_passed_front_socket_off_loopback_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Socket activation on 0.0.0.0 would hand managed-identity tokens to the network."""
    nft = Nft(monkeypatch)
    wildcard = socket.socket()
    wildcard.bind(("0.0.0.0", 0))
    wildcard.listen(1)
    port = wildcard.getsockname()[1]
    try:
        async with started(tmp_path, "[front]\nredirect = true\n", [wildcard]) as daemon:
            health = await api_health(daemon)
            closed = wildcard.fileno() == -1
    finally:
        wildcard.close()
    assert closed
    error = (
        f"front: refused the socket passed on 0.0.0.0:{port}: not a loopback address "
        "(IMDS is never reachable from the network)"
    )
    assert (health["status"], health["reason"]) == ("degraded", error)
    assert nft.calls == ["remove"]


async def test_a_passed_front_socket_on_a_user_port_is_served_not_redirected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nft = Nft(monkeypatch)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    async with started(tmp_path, "[front]\nredirect = true\n", [listener]) as daemon:
        answer = await call(port, "GET", "/metadata/instance?api-version=2021-02-01", [MD])
        health = await api_health(daemon)
    assert answer.status == 200
    assert nft.calls == ["remove"]
    assert health["status"] == "degraded"
    assert health["reason"] == (
        f"redirect install: refused: the front listens on 127.0.0.1:{port}, a port any user "
        "can bind; use a port below 1024 (only root can bind it)"
    )
    assert health["front"]["error"] is None


def test_example_front_socket_is_one_the_redirect_accepts() -> None:
    """The shipped socket example binds what ``[front] listen`` with the redirect allows."""
    example = (UNITS / "imdsd-front.socket").read_text()
    assert "FileDescriptorName=front\n" in example
    [listen] = [line.split("=", 1)[1] for line in example.splitlines() if line.startswith("Listen")]
    text = f'[front]\nlisten = "{listen}"\nredirect = true\n'
    assert parse_config(text, "imdsd-front.socket").front.listen == listen


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_example_front_socket_verifies_with_its_drop_in(tmp_path: Path) -> None:
    example = (UNITS / "imdsd-front.socket").read_text()
    service = (UNITS / "imdsd.service").read_text().replace("/usr/bin/imdsd", sys.executable)
    (tmp_path / "imdsd.service").write_text(service)
    (tmp_path / "imdsd.socket").write_text((UNITS / "imdsd.socket").read_text())
    (tmp_path / "imdsd-front.socket").write_text(example)
    [printf] = [line for line in example.splitlines() if "printf '" in line]
    drop_in = printf.split("printf '", 1)[1].split("'", 1)[0].replace("\\n", "\n")
    assert "Sockets=imdsd.socket imdsd-front.socket\n" in drop_in
    (tmp_path / "imdsd.service.d").mkdir()
    (tmp_path / "imdsd.service.d" / "front-socket.conf").write_text(drop_in)
    done = subprocess.run(
        ["systemd-analyze", "--no-pager", "verify", "imdsd-front.socket", "imdsd.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.stdout + done.stderr).strip() == ""
    assert done.returncode == 0
