"""A throwaway network namespace with an IMDS address, for tests that need root.

``with netns() as ns:`` creates ``imdsd-test-<random>``, brings up its ``lo`` and puts
``169.254.169.254/32`` on it, so that inside the namespace the IMDS address is local and
nothing can leave for the real IMDS. Processes run inside with ``ns.run`` / ``ns.spawn``
(``ip netns exec``); on exit every process still in the namespace is killed and the namespace
deleted. Tests that use it are skipped, with the reason, unless :func:`skip_reason` is None.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

IMDS = "169.254.169.254"
VENV_BIN = Path(sys.executable).parent
IMDSD = str(VENV_BIN / "imdsd")
SYSTEM_PYTHON = "/usr/bin/python3"
_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":" + _SBIN)


def skip_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (creates a network namespace and nftables rules)"
    for program, package in (("ip", "iproute2"), ("nft", "nftables")):
        if _which(program) is None:
            return f"needs the {program!r} program (Debian package {package})"
    return None


needs_netns = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


class Netns:
    """One network namespace; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ip = _which("ip") or "ip"

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` wrapped to run inside the namespace."""
        return [self.ip, "netns", "exec", self.name, *command]

    def run(
        self, command: Sequence[str], *, timeout: float = 30.0, check: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the namespace to completion, capturing text output."""
        done = subprocess.run(
            self.argv(command), capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {done.returncode}: {done.stdout}{done.stderr}"
            )
        return done

    def spawn(self, command: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``command`` inside the namespace in the background."""
        return subprocess.Popen(self.argv(command), **kw)

    def python(self, code: str, *, python: str = sys.executable, timeout: float = 30.0) -> str:
        """Run Python ``code`` inside the namespace; its stdout (AssertionError on failure)."""
        return self.run([python, "-c", code], timeout=timeout, check=True).stdout

    def ruleset(self) -> str:
        """``nft list ruleset`` inside the namespace."""
        return self.run(["nft", "list", "ruleset"], check=True).stdout

    def pids(self) -> list[int]:
        """The processes currently inside the namespace."""
        out = subprocess.run(
            [self.ip, "netns", "pids", self.name], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def wait_tcp(self, host: str, port: int, timeout: float = 15.0) -> None:
        """Wait until something accepts TCP connections at ``host:port`` in the namespace."""
        code = (
            "import socket,sys,time\n"
            f"end=time.monotonic()+{timeout}\n"
            "while True:\n"
            "    try:\n"
            f"        socket.create_connection(({host!r},{port}),timeout=1).close(); break\n"
            "    except OSError:\n"
            "        if time.monotonic()>end: sys.exit('nothing listens')\n"
            "        time.sleep(0.05)\n"
        )
        self.python(code, timeout=timeout + 5)


def _delete(ns: Netns) -> None:
    for pid in ns.pids():
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while ns.pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    subprocess.run([ns.ip, "netns", "delete", ns.name], capture_output=True, check=False)


@contextmanager
def netns() -> Iterator[Netns]:
    """A fresh namespace with ``lo`` up and the IMDS address on it; deleted afterwards."""
    ns = Netns(f"imdsd-test-{secrets.token_hex(4)}")
    subprocess.run([ns.ip, "netns", "add", ns.name], check=True, capture_output=True)
    try:
        ns.run([ns.ip, "link", "set", "lo", "up"], check=True)
        ns.run([ns.ip, "addr", "add", f"{IMDS}/32", "dev", "lo"], check=True)
        yield ns
    finally:
        _delete(ns)


def free_port() -> int:
    """A port number for a listener inside a fresh namespace (nothing else runs there)."""
    return 20000 + secrets.randbelow(20000)
