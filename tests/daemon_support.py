"""Helpers to run ``imdsd run`` as a real process against an in-process emulator."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import trio
from emulator_support import Emulator

from imdsd.emulator.server import EmulatorConfig, serve_emulator
from imdsd.httpio import ClientConnection, HttpIOError, Response, open_unix


@asynccontextmanager
async def emulator(**options: Any) -> AsyncIterator[Emulator]:
    """Run an emulator on an ephemeral loopback port for the duration of the block."""
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_emulator, EmulatorConfig(**options))
        yield Emulator(host, port)
        nursery.cancel_scope.cancel()


def write_config(tmp: Path, endpoint: str, extra: str = "", **poll: str) -> Path:
    """A daemon config using ``tmp`` for the socket, state and hooks."""
    polls = {"instance": "1s", "scheduled_events": "1s", "loadbalancer": "0s", **poll}
    poll_lines = "\n".join(f'{k} = "{v}"' for k, v in polls.items())
    path = tmp / "imdsd.toml"
    path.write_text(
        f"""
[imds]
endpoint = "{endpoint}"
max_requests_per_second = 4
[poll]
{poll_lines}
[server]
socket = "{tmp}/imdsd.sock"
socket_group = ""
heartbeat = "1s"
[state]
directory = "{tmp}/state"
[hooks]
directory = "{tmp}/hooks.d"
[log]
level = "debug"
format = "json"
{extra}
"""
    )
    return path


class DaemonProcess:
    """An ``imdsd run`` child process with its log file."""

    def __init__(self, process: trio.Process, socket_path: str, log: Path) -> None:
        self.process = process
        self.socket = socket_path
        self.log = log

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        events = []
        for line in self.log.read_text().splitlines():
            try:
                events.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                continue
        return events

    async def get(self, target: str) -> Response:
        """One request on the daemon's socket."""
        conn = ClientConnection(await open_unix(self.socket, 5))
        try:
            return await conn.request("GET", target, [("host", "imdsd")], timeout=10)
        finally:
            await conn.aclose()

    async def wait_ready(self, timeout: float = 15) -> None:
        """Wait until ``/v1/state`` answers 200."""
        with trio.fail_after(timeout):
            while True:
                try:
                    if (await self.get("/v1/state")).status == 200:
                        return
                except HttpIOError:
                    pass
                if self.process.returncode is not None:
                    raise AssertionError(f"imdsd run exited: {self.log.read_text()[-2000:]}")
                await trio.sleep(0.05)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon."""
        self.process.send_signal(signum)

    async def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.returncode is None:
            self.signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def daemon(
    config: Path,
    env: Mapping[str, str] | None = None,
    argv_prefix: list[str] | None = None,
    log_path: Path | None = None,
) -> AsyncIterator[DaemonProcess]:
    """Run ``imdsd run -c config`` for the duration of the block (killed at the end).

    Its stdout and stderr go to ``log_path`` (by default a new file next to ``config``).
    """
    log = log_path or config.parent / f"imdsd-{os.urandom(3).hex()}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    full_env.update(env or {})
    argv = [*(argv_prefix or []), sys.executable, "-m", "imdsd", "run", "-c", str(config)]
    with log.open("wb") as sink:
        process = await trio.lowlevel.open_process(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=full_env
        )
    socket_path = str(config.parent / "imdsd.sock")
    try:
        yield DaemonProcess(process, socket_path, log)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


class NotifySocket:
    """A datagram socket standing in for systemd's ``NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[tuple[float, str]] = []

    async def bind(self) -> None:
        """Bind the socket at its path."""
        await self.sock.bind(self.path)

    async def collect(self) -> None:
        """Record every message with its arrival time, until cancelled."""
        while True:
            data = await self.sock.recv(4096)
            self.messages.append((trio.current_time(), data.decode()))

    def lines(self) -> list[str]:
        """Every ``KEY=VALUE`` line received, in order."""
        return [line for _, message in self.messages for line in message.split("\n") if line]

    async def wait_for(self, line: str, timeout: float = 15, count: int = 1) -> None:
        """Wait until ``line`` has been received ``count`` times."""
        with trio.fail_after(timeout):
            while self.lines().count(line) < count:
                await trio.sleep(0.02)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def python_hook(path: Path, body: str) -> Path:
    """Write an executable Python hook script (runs with this interpreter)."""
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path
