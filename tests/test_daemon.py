"""``imdsd run`` as a real process: systemd notify, reload, graceful stop, restart semantics,
socket activation and at-least-once hooks across a SIGKILL."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from daemon_support import NotifySocket, daemon, emulator, python_hook, write_config
from emulator_support import Emulator, start_emulator

from imdsd.aclient import AsyncClient
from imdsd.config import load_config
from imdsd.daemon import Daemon
from imdsd.frames import ChangeFrame, StateFrame, decode_frame
from imdsd.httpio import ClientConnection, open_unix

pytestmark = pytest.mark.slow


async def test_notify_ready_status_watchdog_and_stop(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    await notify.bind()
    async with emulator() as emu, trio.open_nursery() as nursery:
        nursery.start_soon(notify.collect)
        # a ping every 2 s (half of WATCHDOG_USEC); systemd acts on a gap over 4 s
        env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "4000000"}
        async with daemon(write_config(tmp_path, emu.endpoint), env) as proc:
            await notify.wait_for("READY=1")
            await proc.wait_ready()
            await notify.wait_for("WATCHDOG=1", count=4, timeout=60)
            ready_at = next(t for t, m in notify.messages if "READY=1" in m)
            beats = [t for t, m in notify.messages if m == "WATCHDOG=1"]
            assert beats[0] > ready_at, notify.messages
            # paced by the interval, not as fast as the probe answers (3 intervals: 6 s) ...
            assert beats[3] - beats[0] > 3.0, notify.messages
            # ... and never as late as systemd's limit, with 2 s to spare for a loaded machine
            assert max(b - a for a, b in itertools.pairwise(beats[:4])) < 4.0, notify.messages
            assert any(line.startswith("STATUS=revision ") for line in notify.lines())
            assert await proc.stop() == 0
            assert "STOPPING=1" in notify.lines()
        nursery.cancel_scope.cancel()
    notify.close()


async def test_reload_applies_valid_and_keeps_old_on_invalid(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    await notify.bind()
    async with emulator() as emu, trio.open_nursery() as nursery:
        nursery.start_soon(notify.collect)
        config = write_config(tmp_path, emu.endpoint)
        async with daemon(config, {"NOTIFY_SOCKET": notify.path}) as proc:
            await proc.wait_ready()
            await notify.wait_for("READY=1")
            marker = tmp_path / "hook-ran"
            hook = python_hook(
                tmp_path / "hook.py", f"open({str(marker)!r}, 'a').write('ran\\n')\n"
            )
            config.write_text(
                config.read_text()
                + f'[[hook]]\nname = "added"\non = ["tags"]\ncommand = ["{hook}"]\n'
            )
            proc.signal(signal.SIGHUP)
            with trio.fail_after(10):
                while not any(
                    e.get("event") == "configuration reloaded" for e in proc.log_events()
                ):
                    await trio.sleep(0.05)
            await notify.wait_for("RELOADING=1")
            assert notify.lines().count("RELOADING=1") == 1
            await emu.action(action="set_tag", name="after-reload", value="1")
            with trio.fail_after(10):
                while not marker.exists():
                    await trio.sleep(0.05)

            config.write_text(config.read_text() + "\n[imds]\nmax_requests_per_second = 9\n")
            proc.signal(signal.SIGHUP)
            with trio.fail_after(10):
                while not any(
                    e.get("event", "").startswith("reload failed") for e in proc.log_events()
                ):
                    await trio.sleep(0.05)
            await notify.wait_for("READY=1", count=3)
            assert notify.lines().count("RELOADING=1") == 2
            assert notify.lines().count("READY=1") == 3
            assert (await proc.get("/v1/health")).status == 200
            assert await proc.stop() == 0
        nursery.cancel_scope.cancel()
    notify.close()


async def test_sigterm_with_watchers_ends_streams_and_exits_0(tmp_path: Path) -> None:
    async with emulator() as emu, daemon(write_config(tmp_path, emu.endpoint)) as proc:
        await proc.wait_ready()
        conns = [ClientConnection(await open_unix(proc.socket, 5)) for _ in range(5)]
        readers = []
        for conn in conns:
            head, next_line = await conn.stream_lines("GET", "/v1/watch", [("host", "imdsd")])
            assert head.status == 200
            readers.append(next_line)
        started = trio.current_time()
        proc.signal(signal.SIGTERM)
        for next_line in readers:
            lines = []
            with trio.fail_after(5):
                while (line := await next_line()) is not None:
                    lines.append(decode_frame(line))
            assert isinstance(lines[0], StateFrame)
            assert lines[-1].__class__.__name__ == "BookmarkFrame"
        assert await proc.stop() == 0
        assert trio.current_time() - started < 5
        for conn in conns:
            await conn.aclose()


async def test_repeated_sigterm_while_stopping_still_exits_0(tmp_path: Path) -> None:
    # systemd, a supervisor or an impatient admin may signal again while imdsd stops: a
    # SIGTERM after trio stopped listening, or during Python's finalization (which resets
    # Python-level handlers), killed the daemon with -15 instead of a clean exit 0
    async with emulator() as emu, daemon(write_config(tmp_path, emu.endpoint)) as proc:
        await proc.wait_ready()
        with trio.fail_after(20):
            while proc.process.returncode is None:
                proc.signal(signal.SIGTERM)
                await trio.sleep(0.002)
        assert await proc.stop() == 0


async def test_restart_reports_offline_changes_once(tmp_path: Path) -> None:
    async with emulator() as emu:
        config = write_config(tmp_path, emu.endpoint)
        async with daemon(config) as proc:
            await proc.wait_ready()
            revision = msgspec.json.decode((await proc.get("/v1/state")).body)["revision"]
            assert await proc.stop() == 0
        await emu.action(action="set_tag", name="offline", value="yes")
        async with daemon(config) as proc:
            await proc.wait_ready()
            with trio.fail_after(10):
                while True:
                    body = msgspec.json.decode(
                        (await proc.get(f"/v1/events?since={revision}&wait=5s")).body
                    )
                    if body["frames"]:
                        break
            seen = await instance_polls(emu)
            with trio.fail_after(20):  # two more polls of the same document answered and applied
                while await instance_polls(emu) < seen + 3:
                    await trio.sleep(0.05)
            body = msgspec.json.decode(
                (await proc.get(f"/v1/events?since={revision}&wait=0s")).body
            )
            frames = body["frames"]
            assert len(frames) == 1, frames
            assert [(c["kind"], c["op"], c["key"]) for c in frames[0]["changes"]] == [
                ("tags", "added", "offline")
            ]
            assert frames[0]["revision"] > revision
            assert await proc.stop() == 0


async def instance_polls(emu: Emulator) -> int:
    """How many instance documents the emulator has been asked for."""
    by_status = (await emu.stats())["by_path_status"].get("/metadata/instance", {})
    return sum(by_status.values())


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate"
)
async def test_socket_activation(tmp_path: Path) -> None:
    listen = str(tmp_path / "activated.sock")
    async with emulator() as emu:
        config = write_config(tmp_path, emu.endpoint)
        prefix = ["systemd-socket-activate", "-l", listen, "--fdname=api"]
        async with daemon(config, argv_prefix=prefix) as proc:
            proc.socket = listen
            await proc.wait_ready()
            reply = await proc.get("/metadata/instance/compute/vmSize?format=text")
            assert reply.status == 200
            assert not (tmp_path / "imdsd.sock").exists()  # the configured socket was not bound
            assert await proc.stop() == 0


async def test_hooks_delivered_at_least_once_across_sigkill(tmp_path: Path) -> None:
    record = tmp_path / "deliveries"
    hook = python_hook(
        tmp_path / "slow-hook.py",
        "import json, os, sys, time\n"
        "frame = json.loads(sys.stdin.readline())\n"
        f"open({str(record)!r} + '.started', 'a').write(os.environ['IMDSD_REVISION'] + '\\n')\n"
        "time.sleep(float(os.environ.get('SLOW', '0')))\n"
        f"open({str(record)!r}, 'a').write(json.dumps(frame) + '\\n')\n",
    )
    extra = f'[[hook]]\nname = "slow"\non = ["tags"]\ncommand = ["{hook}"]\ntimeout = "30s"\n'
    async with emulator() as emu:
        config = write_config(tmp_path, emu.endpoint, extra)
        async with daemon(config, {"SLOW": "30"}) as proc:
            await proc.wait_ready()
            await emu.action(action="set_tag", name="during-kill", value="1")
            with trio.fail_after(10):
                while not (tmp_path / "deliveries.started").exists():
                    await trio.sleep(0.05)
            proc.process.kill()  # SIGKILL while the hook runs
            await proc.process.wait()
        async with daemon(config, {"SLOW": "0"}) as proc:
            await proc.wait_ready()
            with trio.fail_after(10):
                while not record.exists():
                    await trio.sleep(0.05)
            delivered = [msgspec.json.decode(line) for line in record.read_text().splitlines()]
            keys = [c["key"] for frame in delivered for c in frame["changes"]]
            assert "during-kill" in keys
            assert await proc.stop() == 0


async def test_client_library_against_the_daemon(tmp_path: Path) -> None:
    async with emulator() as emu, daemon(write_config(tmp_path, emu.endpoint)) as proc:
        await proc.wait_ready()
        async with AsyncClient(proc.socket) as client:
            assert await client.get("compute/vmSize", format="text") == "Standard_A3"
            state = await client.state()
            seen: list[str] = []
            async with trio.open_nursery() as nursery:

                async def follow() -> None:
                    from contextlib import aclosing

                    async with aclosing(
                        client.watch(since=state["revision"], kinds=["disks"])
                    ) as frames:
                        async for frame in frames:
                            if isinstance(frame, ChangeFrame):
                                seen.extend(f"{c.op} {c.key}" for c in frame.changes)
                                nursery.cancel_scope.cancel()

                nursery.start_soon(follow)
                await emu.action(action="set_tag", name="ignored", value="by kinds")
                await emu.action(action="attach_disk", lun=3, size_gb=64)
                with trio.fail_after(10):
                    await trio.sleep_forever()
            assert seen == ["attached lun:3"]
        assert await proc.stop() == 0


def test_run_with_bad_config_exits_78(tmp_path: Path) -> None:
    import subprocess

    bad = tmp_path / "bad.toml"
    bad.write_text("[imds]\nmax_requests_per_second = 0\n")
    done = subprocess.run(
        [sys.executable, "-m", "imdsd", "run", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ},
    )
    assert done.returncode == 78
    assert "imds.max_requests_per_second" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------- upstream figures


def scrape(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample of a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def requests(samples: dict[str, float], endpoint: str, cls: str) -> float:
    return samples[f'imdsd_upstream_requests_total{{endpoint="{endpoint}",class="{cls}"}}']


def emulator_classes(by_status: dict[str, int]) -> dict[str, int]:
    """The emulator's answers of one path, by imdsd's status class."""
    classes = dict.fromkeys(("2xx", "4xx", "5xx", "error"), 0)
    for status, count in by_status.items():
        cls = f"{status[0]}xx" if status[:1] in ("2", "4", "5") else "error"
        classes[cls] += count
    return classes


async def test_upstream_metrics_match_the_emulators_counts_under_faults(tmp_path: Path) -> None:
    async with emulator() as emu:
        config = write_config(tmp_path, emu.endpoint, instance="1s", scheduled_events="1s")
        await emu.faults(
            {"status": 429, "count": 3, "path": "/metadata/instance"},
            {"status": 500, "count": 2, "path": "/metadata/instance"},
            {"status": 410, "count": 2, "path": "/metadata/scheduledevents"},
            {"status": 429, "count": 1, "path": "/metadata/scheduledevents"},
        )
        async with daemon(config) as proc:
            await proc.wait_ready()
            in_use_seen = 0.0
            with trio.fail_after(20):
                while True:  # compare at a quiet moment: nothing in flight on either side
                    before = await emu.stats()
                    samples = scrape((await proc.get("/metrics")).body.decode())
                    after = await emu.stats()
                    in_use_seen = max(in_use_seen, samples["imdsd_budget_in_use"])
                    paths = after["by_path_status"]
                    done = not (await emu.control("GET", "state"))["faults"]
                    settled = before == after and sum(after["by_status"].values()) == after["total"]
                    counted = sum(
                        requests(samples, e, c)
                        for e in ("instance", "scheduled_events", "versions")
                        for c in ("2xx", "4xx", "5xx", "error")
                    )
                    if done and settled and counted == after["total"]:
                        break
                    await trio.sleep(0.05)
            assert await proc.stop() == 0
    for endpoint, path in (
        ("instance", "/metadata/instance"),
        ("scheduled_events", "/metadata/scheduledevents"),
        ("versions", "/metadata/versions"),
    ):
        expected = emulator_classes(paths[path])
        assert {c: requests(samples, endpoint, c) for c in expected} == expected, endpoint
    assert expected["2xx"] == 1  # versions: probed once
    assert paths["/metadata/instance"]["429"] == 3
    assert paths["/metadata/instance"]["500"] == 2
    assert samples["imdsd_upstream_throttled_total"] == after["by_status"]["429"] == 4
    for endpoint, path in (
        ("instance", "/metadata/instance"),
        ("scheduled_events", "/metadata/scheduledevents"),
    ):
        fetched = samples[f'imdsd_fetch_duration_seconds_count{{endpoint="{endpoint}"}}']
        assert fetched == paths[path]["200"] > 0
        assert samples[f'imdsd_fetch_duration_seconds_sum{{endpoint="{endpoint}"}}'] > 0
        assert samples[
            f'imdsd_fetch_duration_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}}'
        ] == (fetched)
    # the retried fetches waited out their backoff: some took over 0.25 s
    slow = samples['imdsd_fetch_duration_seconds_bucket{endpoint="instance",le="0.25"}']
    assert slow < samples['imdsd_fetch_duration_seconds_count{endpoint="instance"}']
    assert 0 < in_use_seen <= 4


async def test_health_counts_local_connections_not_upstream_ones(tmp_path: Path) -> None:
    async with emulator() as emu, daemon(write_config(tmp_path, emu.endpoint)) as proc:
        await proc.wait_ready()
        idle = [ClientConnection(await open_unix(proc.socket, 5)) for _ in range(7)]
        with trio.fail_after(10):
            while True:  # every idle connection accepted, and /metrics agrees
                conn = ClientConnection(await open_unix(proc.socket, 5))
                health = msgspec.json.decode(
                    (await conn.request("GET", "/v1/health", [("host", "imdsd")])).body
                )
                metrics = scrape(
                    (await conn.request("GET", "/metrics", [("host", "imdsd")])).body.decode()
                )
                await conn.aclose()
                if health["connections"] == 8:
                    break
                await trio.sleep(0.05)
        assert metrics["imdsd_connections"] == 8
        assert health["upstream_connections"] in (1, 2, 3)  # instance, scheduled events, versions
        for conn in idle:
            await conn.aclose()
        assert await proc.stop() == 0


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    """A mock clock that jumps only after 50 ms of real idleness, so loopback I/O (daemon to
    emulator) completes before time moves: with a threshold of 0 a loaded machine saw
    connect and read timeouts fire in mock time while bytes were still in flight."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_a_reload_keeps_the_request_budget_window(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    """Requests before and after a reload share one window: never over the budget (MockClock)."""
    async with trio.open_nursery() as nursery:
        emu = await start_emulator(nursery)
        path = write_config(tmp_path, emu.endpoint, instance="1s", loadbalancer="1s")
        text = path.read_text().replace(
            "max_requests_per_second = 4", "max_requests_per_second = 2"
        )
        path.write_text(text)
        running = Daemon(load_config(str(path)), str(path))
        with trio.fail_after(120):
            async with trio.open_nursery() as inner:
                await inner.start(running.run)
                for interval in ("2s", "1s", "3s", "1s", "2s", "1s"):
                    await trio.sleep(2.7)  # three pollers want 3/s: the budget is saturated
                    path.write_text(text.replace('instance = "1s"', f'instance = "{interval}"'))
                    assert await running.reload()
                await trio.sleep(3)
                stats = await emu.stats()
                running.stop()
        nursery.cancel_scope.cancel()
    assert stats["total"] > 30
    assert stats["peak_rps"] == 2
