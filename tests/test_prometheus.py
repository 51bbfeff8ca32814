"""End to end with a real Prometheus: it scrapes a real daemon's TCP metrics and loads the rules.

The daemon polls an in-process emulator; the test drives changes (tags) and faults (429, 500)
through the emulator's control API, runs a hook that works and one that always fails, then
asks Prometheus's HTTP API: the target is up, every metric family the README lists is there,
``imdsd_upstream_requests_total`` by class equals what the emulator answered (compared once
the daemon is quiet), every PromQL expression of the dashboard and of the alert rules
evaluates without error, those that should have data do, and the alerts the faults should
raise are pending or firing while the others are not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
import trio
from daemon_support import DaemonProcess, daemon, emulator, write_config
from emulator_support import Emulator

from imdsd.api.metrics import status_class
from imdsd.httpio import ClientConnection, HttpIOError, open_tcp

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "conf" / "prometheus" / "imdsd-alerts.yml"
DASHBOARD = ROOT / "conf" / "grafana" / "imdsd.json"
README = ROOT / "README.md"
MISSING = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
REQUIRED = os.environ.get("IMDSD_REQUIRE_PROMETHEUS") == "1"

if MISSING and REQUIRED:
    pytest.fail(f"IMDSD_REQUIRE_PROMETHEUS=1 but {', '.join(MISSING)} not installed")
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{', '.join(MISSING)} not installed (Debian package 'prometheus'; .ci/run installs it)",
)

#: Alerts the faults and the failing hook must raise (pending or firing) during the test.
RAISED = {"ImdsdUpstreamThrottled", "ImdsdHookFailing", "ImdsdHookGaveUp"}
#: Alerts that must stay quiet: the daemon is up, scraped, fresh and saving its state.
QUIET = {"ImdsdDown", "ImdsdTargetMissing", "ImdsdDataStale", "ImdsdStateNotSaved"}
RATE_INTERVAL = "10s"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def readme_families() -> set[str]:
    """The metric families the README's "Metrics" section lists."""
    text = README.read_text()
    section = text.split("\n### Metrics\n", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"`(imdsd_[a-z_]+)", section))


def dashboard_exprs() -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every query of the dashboard, variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$job", "imdsd")
                .replace("$instance", ".+")
            )
            out.append((panel["title"], expr))
    return out


class Prometheus:
    """A Prometheus server on loopback and a client of its HTTP API."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log

    async def get(self, target: str) -> Any:
        """One API call; the decoded JSON answer."""
        conn = ClientConnection(await open_tcp("127.0.0.1", self.port, 5), max_body=16 << 20)
        try:
            reply = await conn.request("GET", target, [("host", "prometheus")], timeout=10)
        finally:
            await conn.aclose()
        return msgspec.json.decode(reply.body)

    async def query(self, expr: str) -> dict[str, Any]:
        """An instant query; the whole answer (``status``, ``data`` or ``error``)."""
        answer: dict[str, Any] = await self.get("/api/v1/query?query=" + quote(expr))
        return answer

    async def vector(self, expr: str) -> list[dict[str, Any]]:
        """The samples of a successful instant query."""
        answer = await self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def wait_until(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until ``expr`` has samples."""
        with trio.fail_after(timeout):
            while not (result := await self.vector(expr)):
                await trio.sleep(0.2)
        return result

    async def rules(self) -> dict[str, dict[str, Any]]:
        """The loaded alerting rules by name."""
        answer = await self.get("/api/v1/rules?type=alert")
        return {r["name"]: r for g in answer["data"]["groups"] for r in g["rules"]}


@asynccontextmanager
async def prometheus(tmp: Path, scrape_port: int) -> AsyncIterator[Prometheus]:
    """Run ``prometheus`` (1 s scrape and rule interval, storage in ``tmp``) for the block."""
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "imdsd",
                        "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"]}],
                    }
                ],
            }
        )
    )
    log = tmp / "prometheus.log"
    argv = [
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as sink:
        process = await trio.lowlevel.open_process(argv, stdout=sink, stderr=subprocess.STDOUT)
    server = Prometheus(port, log)
    try:
        with trio.fail_after(30):
            while True:
                if process.returncode is not None:
                    raise AssertionError(f"prometheus exited: {log.read_text()[-2000:]}")
                try:
                    conn = ClientConnection(await open_tcp("127.0.0.1", port, 2))
                    try:
                        ready = await conn.request("GET", "/-/ready", [("host", "p")], timeout=5)
                    finally:
                        await conn.aclose()
                    if ready.status == 200:
                        break
                except HttpIOError:
                    pass
                await trio.sleep(0.1)
        yield server
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def hooks_config() -> str:
    """One hook that succeeds and one that always fails (and gives up at once)."""
    return (
        '[[hook]]\nname = "works"\non = ["tags"]\ncommand = ["/bin/true"]\ndebounce = "0s"\n'
        '[[hook]]\nname = "broken"\non = ["tags"]\ncommand = ["/bin/false"]\n'
        'debounce = "0s"\nretries = 0\n'
    )


async def drive(emu: Emulator) -> None:
    """Changes and faults through the emulator's control API."""
    await emu.action(action="set_tag", name="role", value="db")
    await emu.faults(
        {"status": 429, "count": 2, "path": "/metadata/instance"},
        {"status": 500, "count": 1, "path": "/metadata/instance"},
    )
    await emu.action(action="set_tag", name="role", value="web")
    await emu.action(action="attach_disk", lun=3, size_gb=64)
    with trio.fail_after(30):
        while (await emu.stats())["by_status"].get("429", 0) < 2:
            await trio.sleep(0.1)


def slow_polls(config: Path) -> None:
    """Poll intervals of an hour in ``config``."""
    text = config.read_text().replace('instance = "1s"', 'instance = "1h"')
    config.write_text(text.replace('scheduled_events = "1s"', 'scheduled_events = "1h"'))


async def quiesce(proc: DaemonProcess, config: Path, emu: Emulator) -> dict[str, int]:
    """Reload the daemon with hour-long poll intervals; the emulator's answers by class."""
    slow_polls(config)
    proc.signal(signal.SIGHUP)
    last: dict[str, Any] = {}
    with trio.fail_after(30):
        while True:
            await trio.sleep(1.5)
            stats = await emu.stats()
            if stats == last:
                break
            last = stats
    by_class: Counter[str] = Counter()
    for status, count in last["by_status"].items():
        by_class["error" if status == "reset" else status_class(int(status))] += count
    assert sum(by_class.values()) == last["total"]
    return dict(by_class)


async def test_real_prometheus_scrapes_rules_and_dashboard(tmp_path: Path) -> None:
    scrape_port = free_port()
    async with emulator(port=0) as emu:
        extra = f'[metrics]\nlisten = "127.0.0.1:{scrape_port}"\n' + hooks_config()
        config = write_config(tmp_path, emu.url, extra)
        async with daemon(config) as proc, prometheus(tmp_path, scrape_port) as prom:
            await proc.wait_ready()
            await prom.wait_until('up{job="imdsd"} == 1')
            targets = (await prom.get("/api/v1/targets"))["data"]["activeTargets"]
            assert [(t["labels"]["job"], t["health"]) for t in targets] == [("imdsd", "up")]

            await drive(emu)
            await prom.wait_until('imdsd_hook_failures_total{hook="broken"} > 0')
            await prom.wait_until("imdsd_upstream_throttled_total > 0")

            families = readme_families()
            assert "imdsd_upstream_requests_total" in families
            present = {
                s["metric"]["__name__"]
                for s in await prom.vector('{__name__=~"imdsd_.+", job="imdsd"}')
            }
            suffixes = ("_bucket", "_sum", "_count")
            present |= {name.removesuffix(s) for name in present for s in suffixes}
            assert families <= present, f"listed in README, not scraped: {families - present}"

            for title, expr in dashboard_exprs():
                assert await prom.vector(expr), f"dashboard panel {title!r} has no data: {expr}"

            with trio.move_on_after(30):
                while not all(
                    rules[name]["state"] in ("pending", "firing")
                    for rules in [await prom.rules()]
                    for name in RAISED
                ):
                    await trio.sleep(0.2)
            rules = await prom.rules()
            assert set(rules) >= RAISED | QUIET
            for name, rule in rules.items():
                assert rule["health"] == "ok", (name, rule.get("lastError"))
                await prom.vector(rule["query"])  # evaluates without error
            for name in RAISED:
                assert rules[name]["state"] in ("pending", "firing"), name
                assert await prom.vector(rules[name]["query"]), name
            for name in QUIET:
                assert rules[name]["state"] == "inactive", (name, rules[name]["alerts"])

            emulated = await quiesce(proc, config, emu)
            await trio.sleep(2.5)  # two more scrapes of the now quiet daemon
            scraped = {
                s["metric"]["class"]: int(float(s["value"][1]))
                for s in await prom.vector(
                    'sum by (class) (imdsd_upstream_requests_total{job="imdsd"})'
                )
            }
            assert {k: v for k, v in scraped.items() if v} == emulated
            assert emulated.get("4xx", 0) >= 2
            assert emulated.get("5xx", 0) >= 1
            assert await proc.stop() == 0
