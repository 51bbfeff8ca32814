"""The ``front`` bench phase (root only): unmodified agents through imdsd's front and redirect.

In a network namespace of its own (``169.254.169.254`` on its ``lo``, nothing leaves it), the
emulator listens on port 80 with IMDS's limits (5 requests/s; identity 20/s and 5 in flight,
each token taking ``IDENTITY_LATENCY``) and imdsd runs with ``[front] listen`` and
``redirect = true``. Load (bench/front_load.py): 50 agents polling instance metadata every
second (their phases spread over the second) plus 10 processes each asking for a new token
every second, all at the IMDS address.
Run once through imdsd, then, after imdsd stopped (SIGTERM: the rules go), the same load
straight to the emulator. Figures: upstream 429s both ways, p50/p99 of answers from imdsd's
cache (against the same agents' latency direct, the load's own floor), identity answers within
``queue_timeout``, imdsd's CPU per front request, and the load processes' own CPU.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from benchkit import cpu_seconds, percentile, python, request, wait_until
from report import fmt

IMDS = "169.254.169.254"
FRONT_PORT = 169  # below 1024: with redirect = true only root may bind the front
AGENTS = 50
TOKEN_PROCESSES = 10
QUEUE_TIMEOUT = 5.0
IDENTITY_LATENCY = 0.05
BENCH = os.path.dirname(os.path.abspath(__file__))
_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def skip_reason() -> str | None:
    """Why the phase cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespace and nftables rules)"
    for program in ("ip", "nft", "curl"):
        if shutil.which(program, path=_PATH) is None:
            return f"needs {program!r} (packages iproute2, nftables, curl)"
    return None


class Namespace:
    """One throwaway network namespace with the IMDS address on ``lo``."""

    def __init__(self) -> None:
        self.name = f"imdsd-bench-{secrets.token_hex(4)}"
        self.ip = shutil.which("ip", path=_PATH) or "ip"

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside the namespace."""
        return [self.ip, "netns", "exec", self.name, *command]

    def run(self, command: Sequence[str], timeout: float = 60.0) -> str:
        """Run to completion inside; stdout, RuntimeError on failure."""
        done = subprocess.run(
            self.argv(command), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.returncode} {done.stderr[-400:]}")
        return done.stdout

    def control(self, method: str, path: str, body: Any = None) -> Any:
        """The emulator's control API (``127.0.0.1:80``, which the redirect leaves alone)."""
        data = ["--data", json.dumps(body)] if body is not None else []
        url = f"http://127.0.0.1/_emulator/{path}"
        return json.loads(self.run(["curl", "-s", "-X", method, *data, url]))


@contextmanager
def namespace() -> Iterator[Namespace]:
    """Create the namespace; kill what runs in it and delete it afterwards."""
    ns = Namespace()
    subprocess.run([ns.ip, "netns", "add", ns.name], check=True)
    try:
        ns.run([ns.ip, "link", "set", "lo", "up"])
        ns.run([ns.ip, "addr", "add", f"{IMDS}/32", "dev", "lo"])
        yield ns
    finally:
        pids = subprocess.run(
            [ns.ip, "netns", "pids", ns.name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.2)
        subprocess.run([ns.ip, "netns", "delete", ns.name], check=False)


def _load(bench: Any, ns: Namespace, seconds: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the agents and token processes together; (agents' result, token results)."""
    start_at = time.time() + 1.0
    common = ["--duration", str(seconds), "--start-at", str(start_at)]
    script = os.path.join(BENCH, "front_load.py")
    roles = [["--role", "agents", "--agents", str(AGENTS)]]
    roles += [["--role", "tokens"]] * TOKEN_PROCESSES
    procs = [
        subprocess.Popen(
            ns.argv([python(), script, *role, *common]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=bench.env,
        )
        for role in roles
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"front_load failed: {err.decode()[-400:]}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results[0], results[1:]


def _front_requests(sock: str) -> int:
    health = json.loads(request(sock, "GET", "/v1/health")[2])
    return int(sum(health["front"]["requests"].values()))


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for result in results:
        for status, count in result["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    latency = [v for r in results for v in r["latency_ms"]]
    ok = [v for r in results for v in r["ok_ms"]]
    errors = sum(r["errors"] for r in results)
    cpu = sum(r["cpu_seconds"] for r in results)
    return {
        "statuses": statuses,
        "latency_ms": latency,
        "ok_ms": ok,
        "errors": errors,
        "cpu_seconds": cpu,
    }


def run_phase(rows: list[tuple[str, str, str]], bench: Any, seconds: float) -> None:
    """The phase (see the module docstring); fills ``rows`` and ``bench.fig``."""
    reason = skip_reason()
    if reason is not None:
        rows.append(("front", "skipped", reason))
        return
    fig = bench.fig
    with namespace() as ns:
        argv = [python(), "-m", "imdsd", "emulate", "--listen", "0.0.0.0:80", "--rate-limit", "5"]
        emulator = bench.ws.start("front-emulator", ns.argv(argv), stdout_pipe=True, env=bench.env)
        emulator.read_line(30.0)
        ns.control("POST", "rules", {"identity_latency": IDENTITY_LATENCY})
        extra = (
            f'[front]\nlisten = "127.0.0.1:{FRONT_PORT}"\nredirect = true\n'
            f'queue_timeout = "{QUEUE_TIMEOUT:g}s"\n'
        )
        cfg, sock = bench.config("front", (IMDS, 80), extra)
        imdsd = [python(), "-m", "imdsd"]
        daemon = bench.ws.start("front-daemon", ns.argv([*imdsd, "run", "-c", cfg]), env=bench.env)

        def redirect_active() -> bool:
            if not daemon.alive():
                raise RuntimeError(f"imdsd exited\n{daemon.log_tail()}")
            probe = ns.argv([*imdsd, "redirect", "status", "-c", cfg])
            done = subprocess.run(probe, capture_output=True, env=bench.env, check=False)
            return done.returncode == 0

        wait_until(redirect_active, 60.0, "imdsd to install the redirect")
        time.sleep(2.0)  # the first fetches settle
        ns.control("DELETE", "stats")
        front0, cpu0, t0 = _front_requests(sock), cpu_seconds(daemon.pid), time.monotonic()
        agents, tokens = _load(bench, ns, seconds)
        front1, cpu1, t1 = _front_requests(sock), cpu_seconds(daemon.pid), time.monotonic()
        via = ns.control("GET", "stats")
        bench.ws.stop(daemon)
        if "imdsd" in ns.run(["nft", "list", "ruleset"]):
            raise RuntimeError("the redirect is still installed after imdsd stopped")
        time.sleep(1.5)  # a fresh rate-limit window
        ns.control("DELETE", "stats")
        direct_agents, direct_tokens = _load(bench, ns, seconds)
        direct = ns.control("GET", "stats")
    _figures(
        fig,
        rows,
        upstream=(via, direct),
        agents=agents,
        tokens=_merge(tokens),
        work=(front1 - front0, cpu1 - cpu0),
    )
    merged_direct = _merge([direct_agents, *direct_tokens])
    floor = direct_agents["latency_ms"]
    tokens_direct = _merge(direct_tokens)
    rows.append(
        (
            "same load direct",
            f"{merged_direct['statuses']}",
            f"agents and tokens without imdsd ({seconds:g} s): what they got from IMDS. The "
            f"agents' reads took p50 {percentile(floor, 50):.2f} ms, p99 "
            f"{percentile(floor, 99):.2f} ms (the load's own floor; the emulator answered "
            f"{direct_agents['statuses']}); token requests {tokens_direct['statuses']}, p50 "
            f"{percentile(tokens_direct['latency_ms'], 50):.1f} ms",
        )
    )
    latency = f"emulator identity latency {IDENTITY_LATENCY * 1000:g} ms"
    load = f"{AGENTS} agents at 1/s (phases spread over the second) + {TOKEN_PROCESSES} token"
    rows.append(("window", f"{t1 - t0:.0f} s", f"{load} processes at 1/s; {latency}"))
    load_cpu = agents["cpu_seconds"] + _merge(tokens)["cpu_seconds"]
    rows.append(
        (
            "load processes' CPU",
            f"{100.0 * load_cpu / max(1e-9, t1 - t0):.1f} %",
            f"of one core through imdsd ({load_cpu:.2f} s: agents "
            f"{agents['cpu_seconds']:.2f} s, token processes "
            f"{_merge(tokens)['cpu_seconds']:.2f} s), start-up included; imdsd "
            f"{100.0 * (cpu1 - cpu0) / max(1e-9, t1 - t0):.1f} %",
        )
    )


def in_time_count(ok_ms: list[float], queue_timeout: float) -> int:
    """How many 200 answers (their latencies in ms) came within ``queue_timeout`` seconds."""
    return sum(1 for ms in ok_ms if ms <= queue_timeout * 1000.0)


def _figures(
    fig: dict[str, float],
    rows: list[tuple[str, str, str]],
    *,
    upstream: tuple[dict[str, Any], dict[str, Any]],
    agents: dict[str, Any],
    tokens: dict[str, Any],
    work: tuple[int, float],
) -> None:
    """Figures and rows from the emulator's stats (via imdsd, direct) and the load results."""
    via, direct = upstream
    front_requests, cpu = work
    fig["front_upstream_429"] = via["by_status"].get("429", 0)
    fig["front_direct_429"] = direct["by_status"].get("429", 0)
    rows.append(
        (
            "front_upstream_429",
            fmt("front_upstream_429", fig["front_upstream_429"]),
            f"429s IMDS gave imdsd ({via['total']} upstream requests, peak "
            f"{via['peak_rps']}/s); the same load direct: {fig['front_direct_429']:.0f} 429s of "
            f"{direct['total']} requests",
        )
    )
    cached = agents["latency_ms"]
    fig["front_cached_p50_ms"] = percentile(cached, 50)
    fig["front_cached_p99_ms"] = percentile(cached, 99)
    rows.append(
        (
            "front_cached_p50_ms / p99",
            f"{fig['front_cached_p50_ms']:.2f} / {fig['front_cached_p99_ms']:.2f}",
            f"{len(cached)} instance reads by the agents (fresh TCP connection each, through "
            f"the redirect); statuses {agents['statuses']}, sources {agents['sources']}",
        )
    )
    total = sum(tokens["statuses"].values()) + tokens["errors"]
    in_time = in_time_count(tokens["ok_ms"], QUEUE_TIMEOUT)
    fig["front_identity_in_time_pct"] = 100.0 * in_time / max(1, total)
    rows.append(
        (
            "front_identity_in_time_pct",
            fmt("front_identity_in_time_pct", fig["front_identity_in_time_pct"]),
            f"token requests answered 200 within queue_timeout {QUEUE_TIMEOUT:g} s; statuses "
            f"{tokens['statuses']}, p50 {percentile(tokens['latency_ms'], 50):.1f} ms, p99 "
            f"{percentile(tokens['latency_ms'], 99):.1f} ms",
        )
    )
    fig["front_cpu_us_per_request"] = 1e6 * cpu / max(1, front_requests)
    rows.append(
        (
            "front_cpu_us_per_request",
            fmt("front_cpu_us_per_request", fig["front_cpu_us_per_request"]),
            f"imdsd CPU {cpu:.2f} s over {front_requests} front requests (polling included)",
        )
    )
