"""Shared helpers of the benchmark: child processes, /proc sampling, small HTTP, statistics.

Only the standard library: the helpers run in the orchestrator and in the load processes.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation; nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Count, min, p50, p90, p99 and max of ``values``."""
    ordered = sorted(values)
    return {
        "count": float(len(ordered)),
        "min": ordered[0] if ordered else math.nan,
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else math.nan,
    }


def thin(values: Sequence[float], limit: int) -> list[float]:
    """At most ``limit`` values spread evenly over ``values`` (for charts)."""
    if len(values) <= limit:
        return list(values)
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit)]


def parse_rfc3339(text: str) -> float:
    """Unix time of an RFC 3339 timestamp like ``2026-11-22T03:24:39.944Z``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of process ``pid`` in MiB (/proc/<pid>/status)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0
    return out


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine_info() -> dict[str, str]:
    """nproc, CPU model, kernel, Python and library versions."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    for name in ("trio", "h11", "msgspec", "imdsd"):
        try:
            module = __import__(name)
            info[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            info[name] = "missing"
    return info


# ---------------------------------------------------------------------------------- HTTP


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix stream socket."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("imdsd", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        """Connect to the unix socket instead of TCP."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def request(
    where: str | tuple[str, int],
    method: str,
    target: str,
    body: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: ``where`` is a unix socket path or (host, port).

    ``body`` other than bytes/None is sent as JSON. Returns status, lower-cased headers, body.
    """
    conn: http.client.HTTPConnection
    if isinstance(where, str):
        conn = UnixHTTPConnection(where, timeout)
    else:
        conn = http.client.HTTPConnection(where[0], where[1], timeout=timeout)
    payload = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request(method, target, body=payload, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call ``check()`` until it returns a truthy value; RuntimeError naming ``what`` after
    ``timeout`` seconds. Exceptions from ``check`` count as not yet."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            last = exc
        else:
            if value:
                return value
        time.sleep(interval)
    detail = f" (last error: {last})" if last else ""
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}{detail}")


# ---------------------------------------------------------------------------------- processes


class Child:
    """One started process: its Popen, name and log file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: str | None) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its log file."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def read_line(self, timeout: float) -> str:
        """One line of its stdout (a pipe) within ``timeout`` seconds."""
        stream = self.proc.stdout
        assert stream is not None, f"{self.name} has no stdout pipe"
        ready, _, _ = select.select([stream], [], [], timeout)
        if not ready:
            raise RuntimeError(f"{self.name}: no output within {timeout:g}s\n{self.log_tail()}")
        line = stream.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.proc.poll()})\n{self.log_tail()}")
        return line.decode("utf-8", "replace").rstrip("\n")

    def send_line(self, text: str) -> None:
        """Write one line to its stdin (a pipe)."""
        stream = self.proc.stdin
        assert stream is not None, f"{self.name} has no stdin pipe"
        stream.write(text.encode() + b"\n")
        stream.flush()


class Workspace:
    """A temp directory and every process started in it; all cleaned up on exit.

    Children get their own session, so stopping one signals its whole process group.
    Cleanup runs on normal exit, exceptions, Ctrl-C/SIGINT and SIGTERM (a SystemExit).
    """

    def __init__(self, prefix: str = "imdsd-bench-") -> None:
        base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
        self.dir = tempfile.mkdtemp(prefix=prefix, dir=base)
        self.children: list[Child] = []
        self._old_handlers: dict[int, Any] = {}

    def __enter__(self) -> Workspace:
        # SIGINT too: a shell may start a background job with SIGINT ignored
        self._old_handlers = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_exit),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        }
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for child in reversed(self.children):
                self.stop(child)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def path(self, name: str) -> str:
        """A path inside the workspace."""
        return os.path.join(self.dir, name)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin_pipe: bool = False,
        stdout_pipe: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Child:
        """Start ``argv``; stderr (and stdout unless piped) go to ``<name>.log``."""
        log_path = self.path(f"{name}.log")
        log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 5.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
        proc = child.proc
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group
        if child in self.children:
            self.children.remove(child)
        return proc.returncode


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def raised_nofile() -> Iterator[None]:
    """Raise the soft open-files limit to the hard limit (1000 watchers need the fds)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def python() -> str:
    """The interpreter running the benchmark (the project's venv)."""
    return sys.executable


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    """``--unix PATH`` or ``--tcp HOST:PORT``, exactly one of them."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", help="unix socket path")
    where.add_argument("--tcp", help="HOST:PORT")


def parsed_address(args: argparse.Namespace) -> str | tuple[str, int]:
    """The address :func:`add_address_arguments` parsed: a socket path or (host, port)."""
    if args.unix:
        return str(args.unix)
    host, _, port = args.tcp.rpartition(":")
    return host, int(port)
