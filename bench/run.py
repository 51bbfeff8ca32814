"""imdsd benchmark: measure the daemon and its peers side by side in one run.

    .venv/bin/python bench/run.py [--quick] [--with-nginx] [--out bench/RESULTS.md]

Starts everything on loopback and in a temp dir (emulators, two daemons, a bare trio+h11
server, nginx when present, the load processes), prints a table with PASS/FAIL per goal and
ends with one ``RESULT key=value ...`` line. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import front
from benchkit import (
    Child,
    Workspace,
    cpu_seconds,
    loadavg,
    machine_info,
    memory_mb,
    parse_rfc3339,
    percentile,
    python,
    raised_nofile,
    request,
    wait_until,
)
from nginx import find_nginx, install_nginx, start_nginx
from report import Report, fmt, write_chart

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
QUERY = "/metadata/instance/compute/tags?format=text"
WATCHERS = 1000
CONNECTIONS = 16
WARMUP = 0.5
PHASES = frozenset({"idle", "query", "agents", "rss", "fanout", "hooks", "front"})
REPLAYED_HEADERS = ("content-type", "etag", "x-imdsd-revision", "x-imdsd-fetched-at")


@dataclass(frozen=True)
class Plan:
    """How long each part runs."""

    idle: float
    query_seconds: float
    query_rounds: int
    agents: float
    fanout_changes: int
    hook_changes: int
    front: float

    @classmethod
    def make(cls, quick: bool) -> Plan:
        """The quick (< 4 min) or the full plan."""
        if quick:
            return cls(
                idle=20, query_seconds=2.5, query_rounds=4, agents=15, fanout_changes=20,
                hook_changes=10, front=10,
            )  # fmt: skip
        return cls(
            idle=60, query_seconds=8, query_rounds=6, agents=30, fanout_changes=50,
            hook_changes=30, front=30,
        )  # fmt: skip


class Bench:
    """The whole run: owns the workspace's processes and fills the report."""

    def __init__(
        self, ws: Workspace, plan: Plan, with_nginx: bool, wanted: frozenset[str] = PHASES
    ) -> None:
        self.ws = ws
        self.wanted = wanted
        self.plan = plan
        self.with_nginx = with_nginx
        self.report = Report()
        self.fig = self.report.figures
        self.env = {**os.environ, "PYTHONPATH": REPO}

    # -------------------------------------------------------------- processes

    def emulator(self, name: str) -> tuple[Child, tuple[str, int]]:
        """Start ``imdsd emulate`` on an ephemeral loopback port (5 req/s limit on)."""
        argv = [python(), "-m", "imdsd", "emulate", "--listen", "127.0.0.1:0"]
        child = self.ws.start(name, [*argv, "--rate-limit", "5"], stdout_pipe=True, env=self.env)
        line = child.read_line(30.0)
        match = re.search(r"http://([\d.]+):(\d+)", line)
        if not match:
            raise RuntimeError(f"{name}: unexpected first line {line!r}")
        return child, (match.group(1), int(match.group(2)))

    def config(self, name: str, emulator: tuple[str, int], extra: str = "") -> tuple[str, str]:
        """Write a daemon config; returns (config path, socket path)."""
        socket_path = self.ws.path(f"{name}.sock")
        for sub in ("state", "hooks.d"):
            os.makedirs(self.ws.path(f"{name}-{sub}"), exist_ok=True)
        text = f"""
[imds]
endpoint = "http://{emulator[0]}:{emulator[1]}"
[server]
socket = "{socket_path}"
socket_group = ""
[state]
directory = "{self.ws.path(name + "-state")}"
[hooks]
directory = "{self.ws.path(name + "-hooks.d")}"
[log]
level = "info"
format = "json"
{extra}
"""
        path = self.ws.path(f"{name}.toml")
        with open(path, "w") as f:
            f.write(text)
        return path, socket_path

    def daemon(self, name: str, config_path: str, socket_path: str) -> Child:
        """Start ``imdsd run`` and wait until it serves the cached instance."""
        child = self.ws.start(
            name, [python(), "-m", "imdsd", "run", "-c", config_path], env=self.env
        )

        def ready() -> bool:
            if not child.alive():
                raise RuntimeError(f"{name} exited ({child.proc.returncode})\n{child.log_tail()}")
            return request(socket_path, "GET", QUERY, timeout=2.0)[0] == 200

        wait_until(ready, 60.0, f"{name} to serve {QUERY}")
        return child

    def tool(self, name: str, *args: str, timeout: float) -> dict[str, Any]:
        """Run a bench/<name>.py process to completion; its stdout's last line is JSON."""
        done = subprocess.run(
            [python(), os.path.join(BENCH, f"{name}.py"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    # -------------------------------------------------------------- phases

    def run(self) -> Report:
        """Every phase in order; a failing phase is reported and the others still run."""
        self.run_local()
        title = "IMDS front: 50 agents + 10 token processes through the redirect (root)"
        self.phase("front", title, front.run_phase, self, self.plan.front)
        return self.report

    def run_local(self) -> Report:
        """The phases against the local socket, fan-out and hooks."""
        plan = self.plan
        if not self.wanted - {"front"}:
            return self.report
        _e0, e0 = self.emulator("emulator")
        if self.wanted & {"idle", "query", "agents", "rss"}:
            cfg, sock = self.config("daemon", e0)
            d1 = self.daemon("daemon", cfg, sock)
            self.phase("idle", "Idle daemon (default poll intervals)", self.idle, d1, e0)
            self.phase("query", "Cached query throughput", self.query, d1, sock)
            self.phase("agents", "50 agents wanting data no older than 10 s", self.agents, sock, e0)
            self.phase("rss", "Memory with 1000 watchers", self.watchers_rss, d1, sock)
            self.ws.stop(d1)
        if not self.wanted & {"fanout", "hooks"}:
            return self.report
        hook_times = self.ws.path("hook.times")
        script = self.hook_script(hook_times)
        extra = f"""
[poll]
instance = "1s"
scheduled_events = "0s"
loadbalancer = "0s"
[[hook]]
name = "bench"
on = ["compute"]
command = ["{script}"]
debounce = "0s"
timeout = "10s"
retries = 0
"""
        cfg2, sock2 = self.config("fast", e0, extra)
        d2 = self.daemon("fast", cfg2, sock2)
        title = f"Change fan-out to {WATCHERS} watchers"
        self.phase("fanout", title, self.fanout, sock2, e0, plan.fanout_changes, d2)
        self.phase("hooks", "Change to hook start", self.hooks, sock2, e0, script, hook_times)
        self.ws.stop(d2)
        return self.report

    def phase(self, key: str, title: str, func: Any, *args: Any) -> None:
        """Run one phase (if wanted); on failure note the error in its section."""
        if key not in self.wanted:
            return
        print(f"-- {title} ...", flush=True)
        rows = self.report.section(title)
        started = time.monotonic()
        try:
            func(rows, *args)
        except Exception as exc:
            self.report.failed.append(title)
            rows.append(("error", "FAILED", f"{type(exc).__name__}: {exc}".replace("\n", " ")))
            print(f"   failed: {exc}", flush=True)
        print(f"   ({time.monotonic() - started:.0f} s)", flush=True)

    def idle(
        self, rows: list[tuple[str, str, str]], daemon: Child, emulator: tuple[str, int]
    ) -> None:
        """CPU and RSS of the daemon left alone at default poll intervals."""
        time.sleep(3.0)  # let the first fetches (versions, load balancer) settle
        request(emulator, "POST", "/_emulator/reset-stats")
        cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(self.plan.idle)
        cpu1, t1 = cpu_seconds(daemon.pid), time.monotonic()
        stats = json.loads(request(emulator, "GET", "/_emulator/stats")[2])
        mem = memory_mb(daemon.pid)
        pct = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        self.fig["idle_cpu_pct"] = pct
        self.fig["rss_mb_idle"] = mem["VmRSS"]
        rows.append(
            (
                "idle_cpu_pct",
                fmt("idle_cpu_pct", pct),
                f"{cpu1 - cpu0:.2f} s CPU in {t1 - t0:.0f} s",
            )
        )
        rows.append(
            (
                "rss_mb_idle",
                fmt("rss_mb_idle", mem["VmRSS"]),
                f"VmRSS (peak {mem['VmHWM']:.1f} MiB)",
            )
        )
        rows.append(
            (
                "upstream req/s",
                f"{stats['total'] / (t1 - t0):.2f}",
                "polls: instance 10 s, events 1 s, LB 60 s",
            )
        )

    def query(self, rows: list[tuple[str, str, str]], daemon: Child, sock: str) -> None:
        """imdsd vs the bare trio+h11 loop (and nginx), interleaved rounds of the same load."""
        status, headers, body = request(sock, "GET", QUERY)
        if status != 200:
            raise RuntimeError(f"imdsd answered {status} to {QUERY}")
        replay = [(k, headers[k]) for k in REPLAYED_HEADERS if k in headers]
        body_file = self.ws.path("body.bin")
        with open(body_file, "wb") as f:
            f.write(body)
        bare_sock = self.ws.path("bare.sock")
        bare = self.ws.start(
            "bare_h11",
            [python(), os.path.join(BENCH, "bare_h11.py"), "--unix", bare_sock, "--body-file",
             body_file, *[f"--header={k}: {v}" for k, v in replay]],
            stdout_pipe=True, env=self.env,
        )  # fmt: skip
        bare.read_line(20.0)
        targets: dict[str, tuple[str, int | None]] = {
            "imdsd": (sock, daemon.pid),
            "bare_h11": (bare_sock, bare.pid),
        }
        binary = find_nginx()
        if binary is None and self.with_nginx:
            binary = install_nginx()
        if binary is not None:
            _child, nginx_sock = start_nginx(self.ws, binary, body, replay)
            targets["nginx"] = (nginx_sock, None)
        else:
            self.report.notes.append("nginx not installed: run with --with-nginx to compare")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        names = list(targets)
        for round_no in range(self.plan.query_rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                path, pid = targets[name]
                cpu0 = cpu_seconds(pid) if pid else 0.0
                result = self.tool(
                    "loadgen", "--unix", path, "--target", QUERY,
                    "--connections", str(CONNECTIONS),
                    "--duration", str(self.plan.query_seconds), "--warmup", str(WARMUP),
                    timeout=self.plan.query_seconds + 60,
                )  # fmt: skip
                if pid:  # CPU over warmup + window, scaled to the measured window
                    share = result["seconds"] / (result["seconds"] + WARMUP)
                    result["server_cpu"] = (cpu_seconds(pid) - cpu0) * share
                runs[name].append(result)
        self.ws.stop(bare)
        agg = {name: _aggregate(results) for name, results in runs.items()}
        for name, a in agg.items():
            self.report.series[f"query {name}"] = a.pop("samples")
            per_round = ", ".join(f"{r['rps']:.0f}" for r in runs[name])
            cpu = "" if math.isnan(a["cpu_us"]) else f"; server CPU {a['cpu_us']:.0f} us/request"
            rows.append(
                (
                    f"{name} req/s",
                    f"{a['rps']:.0f}",
                    f"median of rounds {per_round}; p50 {a['p50']:.2f} ms, p99 {a['p99']:.2f} ms; "
                    f"non-200/errors {a['bad']:.0f}{cpu}; loadgen CPU {a['lg_cpu']:.0f}%",
                )
            )
        imdsd, bare_agg = agg["imdsd"], agg["bare_h11"]
        self.fig["query_rps"] = imdsd["rps"]
        self.fig["bare_h11_rps"] = bare_agg["rps"]
        self.fig["query_vs_bare"] = imdsd["rps"] / bare_agg["rps"]
        self.fig["query_p99_ms"] = imdsd["p99"]
        rows.append(("query_vs_bare", fmt("query_vs_bare", self.fig["query_vs_bare"]), ""))
        rows.append(
            (
                "CPU/request bare : imdsd",
                f"{bare_agg['cpu_us'] / imdsd['cpu_us']:.3f}",
                "the same comparison by server CPU per request (less sensitive to other load)",
            )
        )
        if "nginx" in agg:
            self.fig["nginx_rps"] = agg["nginx"]["rps"]
            self.fig["query_vs_nginx"] = imdsd["rps"] / agg["nginx"]["rps"]
            rows.append(("query_vs_nginx", fmt("query_vs_nginx", self.fig["query_vs_nginx"]), ""))
        ceiling = bare_agg["lg_ceiling"]
        verdict = (
            "not the bottleneck for the Python servers"
            if ceiling >= 2 * max(imdsd["rps"], bare_agg["rps"])
            else "MAY BE THE BOTTLENECK: the figures are lower bounds"
        )
        rows.append(
            (
                "loadgen ceiling req/s",
                f"{ceiling:.0f}",
                f"requests per loadgen CPU second while driving bare_h11 "
                f"({ceiling / bare_agg['rps']:.1f}x its rate): {verdict}",
            )
        )
        if "nginx" in agg and agg["nginx"]["lg_cpu"] >= 80:
            self.report.notes.append(
                "nginx_rps is bounded by the load generator "
                f"(it used {agg['nginx']['lg_cpu']:.0f}% of a core): nginx is faster than that"
            )

    def agents(self, rows: list[tuple[str, str, str]], sock: str, e0: tuple[str, int]) -> None:
        """The same agents against IMDS directly, then through imdsd."""
        _e1, direct = self.emulator("emulator-direct")
        seconds = str(self.plan.agents)
        request(direct, "POST", "/_emulator/reset-stats")
        res_d = self.tool(
            "agents", "--tcp", f"{direct[0]}:{direct[1]}", "--duration", seconds,
            timeout=self.plan.agents + 60,
        )  # fmt: skip
        stats_d = json.loads(request(direct, "GET", "/_emulator/stats")[2])
        request(e0, "POST", "/_emulator/reset-stats")
        t0 = time.monotonic()
        res_v = self.tool(
            "agents", "--unix", sock, "--duration", seconds, timeout=self.plan.agents + 60
        )
        stats_v = json.loads(request(e0, "GET", "/_emulator/stats")[2])
        window = time.monotonic() - t0
        self.fig["direct_429"] = float(stats_d["by_status"].get("429", 0))
        self.fig["via_imdsd_429"] = float(stats_v["by_status"].get("429", 0))
        self.fig["upstream_rps_via_imdsd"] = stats_v["total"] / window
        rows.append(
            (
                "direct_429",
                fmt("direct_429", self.fig["direct_429"]),
                f"{res_d['requests']} requests for {res_d['refreshes']} refreshes, "
                f"{res_d['retries']} retries, {res_d['given_up']} refreshes given up; "
                f"upstream peak {stats_d['peak_rps']} req/s",
            )
        )
        non_200 = sum(n for s, n in res_v["statuses"].items() if s != "200")
        rows.append(
            (
                "via_imdsd_429",
                fmt("via_imdsd_429", self.fig["via_imdsd_429"]),
                f"429s imdsd got upstream; agents: {res_v['requests']} requests, {non_200} not 200",
            )
        )
        age = res_v["age_s"]
        rows.append(
            (
                "upstream_rps_via_imdsd",
                fmt("upstream_rps_via_imdsd", self.fig["upstream_rps_via_imdsd"]),
                f"{stats_v['total']} upstream requests in {window:.0f} s, "
                f"peak {stats_v['peak_rps']} req/s; data age seen by agents "
                f"p50 {age['p50']:.1f} s, max {age['max']:.1f} s",
            )
        )

    def watch_process(self, sock: str, target: str) -> Child:
        """Start bench/watchers.py with WATCHERS streams and wait until all have a frame."""
        with raised_nofile():
            child = self.ws.start(
                "watchers",
                [python(), os.path.join(BENCH, "watchers.py"), "--unix", sock,
                 "--count", str(WATCHERS), "--target", target],
                stdin_pipe=True, stdout_pipe=True, env=self.env,
            )  # fmt: skip
        line = child.read_line(120.0)
        if not line.startswith("ready"):
            raise RuntimeError(f"watchers: {line}")
        return child

    def finish_watchers(self, child: Child) -> dict[str, Any]:
        """Ask the watchers process for its figures and stop it."""
        child.send_line("quit")
        while True:
            line = child.read_line(60.0)
            if line.startswith("{"):
                result: dict[str, Any] = json.loads(line)
                self.ws.stop(child)
                return result

    def watchers_rss(self, rows: list[tuple[str, str, str]], daemon: Child, sock: str) -> None:
        """RSS of the default daemon while 1000 watch streams are open."""
        started = time.monotonic()
        child = self.watch_process(sock, "/v1/watch")
        connected = time.monotonic() - started
        time.sleep(3.0)
        mem = memory_mb(daemon.pid)
        health = json.loads(request(sock, "GET", "/v1/health")[2])
        result = self.finish_watchers(child)
        self.fig["rss_mb_1000_watchers"] = mem["VmRSS"]
        rows.append(
            (
                "rss_mb_1000_watchers",
                fmt("rss_mb_1000_watchers", mem["VmRSS"]),
                f"VmRSS, peak {mem['VmHWM']:.1f} MiB; {health.get('watchers')} watchers open, all "
                f"had their state frame {connected:.1f} s after the first connect; "
                f"stream errors {result['error_count']}",
            )
        )

    def fanout(
        self,
        rows: list[tuple[str, str, str]],
        sock: str,
        emulator: tuple[str, int],
        changes: int,
        daemon: Child,
    ) -> None:
        """Tag changes while 1000 watchers follow ``kinds=tags``."""
        child = self.watch_process(sock, "/v1/watch?kinds=tags")
        reader0, daemon0 = cpu_seconds(child.pid), cpu_seconds(daemon.pid)
        for i in range(changes):
            action = {"action": "set_tag", "name": "bench", "value": f"v{i}"}
            status, _, body = request(emulator, "POST", "/_emulator/actions", action)
            if status != 200:
                raise RuntimeError(f"emulator action failed: {status} {body[:200]!r}")
            line = child.read_line(30.0)
            if not line.startswith("done"):
                raise RuntimeError(f"watchers: {line}")
        reader_ms = 1000.0 * (cpu_seconds(child.pid) - reader0) / changes
        daemon_ms = 1000.0 * (cpu_seconds(daemon.pid) - daemon0) / changes
        result = self.finish_watchers(child)
        overall = result["all"]
        complete = sum(1 for r in result["revisions"].values() if r["received"] == WATCHERS)
        worst = max((r["max"] for r in result["revisions"].values()), default=math.nan)
        self.fig["fanout_p50_ms"] = overall["p50"]
        self.fig["fanout_p99_ms"] = overall["p99"]
        self.report.series["fanout all watchers"] = result["sample_ms"]
        self.fanout_breakdown(rows, result["revisions"], daemon)
        rows.append(
            (
                "CPU per change",
                f"{daemon_ms:.0f} ms",
                f"daemon (incl. its 1 s polls); the watchers' reader: {reader_ms:.0f} ms",
            )
        )
        rows.append(
            ("fanout_p50_ms", fmt("fanout_p50_ms", overall["p50"]), "frame `at` -> received")
        )
        rows.append(
            (
                "fanout_p99_ms",
                fmt("fanout_p99_ms", overall["p99"]),
                f"{complete} changes reached all {WATCHERS} watchers "
                f"({overall['count']:.0f} deliveries), max {worst:.1f} ms, "
                f"stream errors {result['error_count']}",
            )
        )

    def fanout_breakdown(
        self, rows: list[tuple[str, str, str]], revisions: dict[str, Any], daemon: Child
    ) -> None:
        """Where the time goes: stored -> published (daemon log) -> first and last watcher."""
        published: dict[int, float] = {}
        if daemon.log_path:
            with open(daemon.log_path, errors="replace") as f:
                for line in f:
                    if '"changes"' not in line:
                        continue
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        entry = json.loads(line)
                        if entry.get("event") == "changes":
                            published[entry["revision"]] = parse_rfc3339(entry["timestamp"])
        store, first, last = [], [], []
        for rev, info in revisions.items():
            at = parse_rfc3339(info["at"])
            if int(rev) in published:
                pub_ms = (published[int(rev)] - at) * 1000.0
                store.append(pub_ms)
                first.append(info["min"] - pub_ms)
                last.append(info["max"] - pub_ms)
        if not store:
            return
        rows.append(
            (
                "stored -> published",
                f"{statistics.median(store):.1f} ms",
                f"median (max {max(store):.1f}): frame `at` -> the daemon's `changes` log line, "
                "i.e. the store step and state persistence before the broadcast",
            )
        )
        rows.append(
            (
                "published -> 1st watcher",
                f"{statistics.median(first):.1f} ms",
                f"median (max {max(first):.1f})",
            )
        )
        rows.append(
            (
                "published -> last watcher",
                f"{statistics.median(last):.1f} ms",
                f"median (max {max(last):.1f}): the fan-out itself over {WATCHERS} streams",
            )
        )

    def hook_script(self, times_file: str) -> str:
        """A tiny executable that appends ``<revision> <unix time>`` to ``times_file``."""
        script = self.ws.path("hook.sh")
        with open(script, "w") as f:
            f.write(f'#!/bin/sh\nexec date "+${{IMDSD_REVISION}} %s.%N" >>{times_file}\n')
        os.chmod(script, 0o755)
        return script

    def hooks(
        self,
        rows: list[tuple[str, str, str]],
        sock: str,
        emulator: tuple[str, int],
        script: str,
        times_file: str,
    ) -> None:
        """vmSize changes (kind compute) run the hook; compare its start with frame ``at``."""
        overhead = self.script_overhead(script)
        before = int(json.loads(request(sock, "GET", "/v1/health")[2])["revision"])

        def lines() -> list[str]:
            try:
                with open(times_file) as f:
                    return f.read().splitlines()
            except FileNotFoundError:
                return []

        for i in range(self.plan.hook_changes):
            count = len(lines())
            patch = {"compute": {"vmSize": f"Standard_Bench{i}"}}
            status, _, body = request(emulator, "PATCH", "/_emulator/instance", patch)
            if status != 200:
                raise RuntimeError(f"emulator patch failed: {status} {body[:200]!r}")
            wait_until(lambda n=count: len(lines()) > n, 30.0, "the hook to run")
        target = f"/v1/events?since={before}&kinds=compute&wait=0s"
        frames = json.loads(request(sock, "GET", target)[2])["frames"]
        at = {frame["revision"]: parse_rfc3339(frame["at"]) for frame in frames}
        raw: list[float] = []
        for line in lines():
            rev_text, stamp = line.split()
            if int(rev_text) in at:
                raw.append((float(stamp) - at[int(rev_text)]) * 1000.0)
        if not raw:
            raise RuntimeError("no hook run matched a change frame")
        net = [max(0.0, v - overhead) for v in raw]
        self.fig["change_to_hook_ms"] = percentile(net, 50)
        self.report.series["hook start (net)"] = net
        rows.append(
            (
                "change_to_hook_ms",
                fmt("change_to_hook_ms", percentile(net, 50)),
                f"median over {len(net)} runs, net of the script's own start "
                f"({overhead:.2f} ms); p99 {percentile(net, 99):.1f} ms; "
                f"raw median {percentile(raw, 50):.1f} ms, raw max {max(raw):.1f} ms",
            )
        )
        rows.append(("hook config", "debounce 0s", "a 1 s default debounce adds 1 s by design"))

    def script_overhead(self, script: str) -> float:
        """Median ms from spawning the hook script until it records its time (sh + date)."""
        probe = self.ws.path("probe.times")
        with open(script) as f:
            text = f.read()
        probe_script = self.ws.path("probe.sh")
        with open(probe_script, "w") as f:
            f.write(text.replace(self.ws.path("hook.times"), probe))
        os.chmod(probe_script, 0o755)
        costs = []
        for _ in range(15):
            started = time.time()
            subprocess.run(
                [probe_script], env={"IMDSD_REVISION": "0", "PATH": "/usr/bin:/bin"}, check=True
            )
            with open(probe) as f:
                stamp = float(f.read().splitlines()[-1].split()[1])
            costs.append((stamp - started) * 1000.0)
        return statistics.median(costs)


def _aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median rps over rounds, latency percentiles over all samples, CPU figures."""
    requests = sum(r["requests"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    samples = [v for r in results for v in r["sample_ms"]]
    server_cpu = [r["server_cpu"] for r in results if "server_cpu" in r]
    loadgen_cpu = sum(r["cpu_seconds"] for r in results)
    return {
        "rps": statistics.median(r["rps"] for r in results),
        "p50": percentile(samples, 50),
        "p99": percentile(samples, 99),
        "bad": sum(n for r in results for s, n in r["statuses"].items() if s != "200")
        + sum(r["errors"] for r in results),
        "cpu_us": 1e6 * sum(server_cpu) / requests if server_cpu else math.nan,
        "lg_cpu": 100.0 * loadgen_cpu / seconds,
        "lg_ceiling": requests / max(1e-9, loadgen_cpu),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="imdsd benchmark (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="short run (< 4 minutes)")
    parser.add_argument(
        "--with-nginx", action="store_true", help="apt-get install nginx if missing"
    )
    parser.add_argument(
        "--only", help=f"comma list of phases to run ({','.join(sorted(PHASES))}); default all"
    )
    parser.add_argument("--out", help="results file (default bench/RESULTS.md on full runs)")
    args = parser.parse_args(argv)
    wanted = PHASES
    if args.only:
        wanted = frozenset(p.strip() for p in args.only.split(",") if p.strip())
        if not wanted <= PHASES:
            parser.error(f"--only: unknown phase(s) {', '.join(sorted(wanted - PHASES))}")
    out = args.out or (None if args.quick else os.path.join(BENCH, "RESULTS.md"))
    plan = Plan.make(args.quick)
    machine = machine_info()
    load_start = loadavg()
    started = time.time()
    print(f"imdsd bench ({'quick' if args.quick else 'full'}): {machine['nproc']} CPUs, "
          f"{machine['cpu']}, load {load_start}", flush=True)  # fmt: skip
    try:
        with Workspace() as ws:
            report = Bench(ws, plan, args.with_nginx, wanted).run()
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    load_end = loadavg()
    elapsed = time.time() - started
    report.notes.append(
        f"load average at start {load_start}, at end {load_end} (other work on the machine "
        "skews every figure; compare ratios measured in the same run)"
    )
    print(report.text())
    if out:
        header = [
            f"Run: `bench/run.py{' --quick' if args.quick else ''}` on "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}, {elapsed:.0f} s.",
        ]
        chart_path = os.path.splitext(out)[0] + "-latency.png"
        chart = os.path.basename(chart_path) if write_chart(report.series, chart_path) else None
        with open(out, "w") as f:
            f.write(report.markdown(machine, header, chart))
        print(f"\nwrote {out}" + (f" and {chart_path}" if chart else ""))
    print(f"(took {elapsed:.0f} s)")
    print(report.result_line())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
