"""Pollers against the emulator: snapshots, bad bodies, absent load balancer, the budget storm.

Everything runs under MockClock (autojump): the emulator and the pollers share the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from emulator_support import start_emulator
from structlog.testing import capture_logs

from imdsd import httpio, poller
from imdsd.config import Config, ImdsConfig, PollConfig
from imdsd.health import HealthBoard, Transition
from imdsd.model import Instance, Snapshot
from imdsd.poller import (
    ABSENT_REPROBE,
    PollSpec,
    SnapshotHolder,
    poll_specs,
    run_pollers,
)
from imdsd.upstream.budget import Budget
from imdsd.upstream.client import ImdsClient
from imdsd.upstream.errors import LOOP_MESSAGE

# ---------------------------------------------------------------------------- helpers


def make_config(url: str, *, rate: float = 2.0, **poll: float) -> Config:
    return Config(
        imds=ImdsConfig(endpoint=url, max_requests_per_second=rate),
        poll=PollConfig(**poll),
    )


@dataclass
class Running:
    client: ImdsClient
    holder: SnapshotHolder
    board: HealthBoard
    pollers: list[poller.Poller]
    scope: trio.CancelScope


async def start_pollers(
    nursery: trio.Nursery, config: Config, holder: SnapshotHolder | None = None
) -> Running:
    client = ImdsClient(config.imds, Budget(config.imds.max_requests_per_second))
    holder = holder or SnapshotHolder()
    board = HealthBoard()
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[list[poller.Poller]]) -> None:
        with scope:
            try:
                await run_pollers(config, client, holder, board, task_status=task_status)
            finally:
                await client.aclose()

    pollers = await nursery.start(run)
    return Running(client, holder, board, pollers, scope)


def record_transitions(monkeypatch: pytest.MonkeyPatch) -> list[Transition]:
    seen: list[Transition] = []
    monkeypatch.setattr(poller, "log_transition", seen.append)
    return seen


# ---------------------------------------------------------------------------- specs


def test_poll_specs_follow_the_config() -> None:
    specs = poll_specs(Config())
    assert specs == [
        PollSpec("instance", 10.0),
        PollSpec("scheduled_events", 1.0, first_timeout=130.0),
        PollSpec("loadbalancer", 60.0),
    ]
    assert specs[1].grace == 130.0
    only = poll_specs(Config(poll=PollConfig(scheduled_events=0.0, loadbalancer=0.0)))
    assert [s.endpoint for s in only] == ["instance"]


# ---------------------------------------------------------------------------- snapshots


async def test_pollers_fill_the_snapshot_and_report_ok(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    transitions = record_transitions(monkeypatch)
    emulator = await start_emulator(nursery)
    await emulator.control(
        "POST", "scheduled-events", {"EventType": "Freeze", "Resources": ["other-vm"]}
    )
    running = await start_pollers(nursery, make_config(emulator.url))
    snapshot = await running.holder.wait_for(
        lambda s: None not in (s.instance, s.scheduled_events, s.loadbalancer)
    )
    assert snapshot.instance is not None
    assert snapshot.instance.compute.vm_id
    assert snapshot.instance_raw is not None
    assert snapshot.instance_raw["compute"]["vmId"] == snapshot.instance.compute.vm_id
    assert snapshot.scheduled_events is not None
    # handed over whole: filtering on Resources is the diff's job
    assert [e.resources for e in snapshot.scheduled_events.events] == [["other-vm"]]
    assert snapshot.loadbalancer is not None
    assert snapshot.loadbalancer.loadbalancer.inbound_rules[0].frontend_port == 443
    await trio.sleep(30)
    now = trio.current_time()
    assert running.board.status(now) == "ok"
    assert {t.endpoint: (t.old, t.new) for t in transitions} == {
        "instance": ("starting", "ok"),
        "scheduled_events": ("starting", "ok"),
        "loadbalancer": ("starting", "ok"),
    }
    stats = await emulator.stats()
    assert stats["by_path"]["/metadata/versions"] == 1
    assert set(stats["by_status"]) == {"200"}
    assert stats["peak_rps"] <= 2
    running.scope.cancel()


async def test_bad_bodies_keep_the_last_good_snapshot(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery)
    config = make_config(emulator.url, instance=10.0, scheduled_events=0.0, loadbalancer=0.0)
    running = await start_pollers(nursery, config)
    good = await running.holder.wait_for(lambda s: s.instance is not None)
    updates = running.holder.updates
    health = running.board["instance"]
    await emulator.faults(
        {"body": "not json", "path": "/metadata/instance"},
        {"body": '{"compute": {"name": 7}, "network": {}}', "path": "/metadata/instance"},
        {"body": '{"compute": {}, "netw', "path": "/metadata/instance"},
        {"body": "[]", "path": "/metadata/instance"},
        {"truncate": True, "path": "/metadata/instance"},
        {"oversize": 2_000_000, "path": "/metadata/instance"},
    )
    await emulator.control("PATCH", "instance", {"compute": {"vmSize": "Standard_D4s_v5"}})
    for _ in range(4):
        await trio.sleep(10)
        assert running.holder.snapshot is good
        assert running.holder.updates == updates
    assert health.failures["invalid"] == 4
    assert health.last_error is not None
    assert "invalid instance document" in health.last_error
    fresh = await running.holder.wait_for(lambda s: s is not good)
    assert fresh.instance is not None
    assert fresh.instance.compute.vm_size == "Standard_D4s_v5"
    assert health.failures["unreachable"] + health.failures["service"] == 2  # truncate, oversize
    assert health.state(trio.current_time()) == "ok"
    running.scope.cancel()


async def test_absent_load_balancer_pauses_and_is_reprobed_hourly(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery)
    await emulator.control("PUT", "loadbalancer", None)
    config = make_config(emulator.url, instance=60.0, scheduled_events=0.0, loadbalancer=60.0)
    running = await start_pollers(nursery, config)
    snapshot = await running.holder.wait_for(lambda s: s.loadbalancer_absent)
    assert snapshot.loadbalancer is None
    lb_health = running.board["loadbalancer"]
    assert lb_health.absent
    assert lb_health.state(trio.current_time()) == "ok"
    lb: dict[str, Any] = {
        "loadbalancer": {"publicIpAddresses": [], "inboundRules": [], "outboundRules": []}
    }
    await emulator.control("PUT", "loadbalancer", lb)
    await trio.sleep(ABSENT_REPROBE - 60)
    assert running.holder.snapshot.loadbalancer_absent
    assert (await emulator.stats())["by_path"]["/metadata/loadbalancer"] == 1
    back = await running.holder.wait_for(lambda s: s.loadbalancer is not None)
    assert not back.loadbalancer_absent
    assert (await emulator.stats())["by_path"]["/metadata/loadbalancer"] == 2
    assert lb_health.failures == dict.fromkeys(lb_health.failures, 0)
    assert not lb_health.absent
    running.scope.cancel()


async def test_azurestack_profile(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery, "azurestack")
    running = await start_pollers(nursery, make_config(emulator.url))
    snapshot = await running.holder.wait_for(
        lambda s: (
            s.instance is not None and s.scheduled_events is not None and s.loadbalancer_absent
        )
    )
    assert snapshot.instance is not None
    assert snapshot.instance.compute.az_environment == "AzureStack"
    assert running.client.versions.chosen() == {
        "instance": "2021-05-01",
        "scheduled_events": "2020-07-01",
        "loadbalancer": "2021-05-01",
    }
    running.scope.cancel()


async def test_first_scheduled_events_call_may_take_two_minutes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    transitions = record_transitions(monkeypatch)
    emulator = await start_emulator(nursery)
    await emulator.faults({"delay": "110s", "path": "/metadata/scheduledevents"})
    config = make_config(emulator.url, instance=10.0, scheduled_events=1.0, loadbalancer=0.0)
    running = await start_pollers(nursery, config)
    start = trio.current_time()
    await running.holder.wait_for(lambda s: s.scheduled_events is not None)
    assert trio.current_time() - start == pytest.approx(110.0, abs=1.0)
    health = running.board["scheduled_events"]
    assert health.consecutive_failures == 0
    assert [(t.old, t.new) for t in transitions if t.endpoint == "scheduled_events"] == [
        ("starting", "ok")
    ]
    # after the first success the normal read timeout (10 s) applies again
    await emulator.faults({"delay": "20s", "path": "/metadata/scheduledevents"})
    await trio.sleep(15)
    assert health.failures["unreachable"] == 1
    assert health.last_error is not None
    assert health.last_error.startswith("timeout")
    running.scope.cancel()


async def test_one_log_line_per_state_change_not_per_retry(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    transitions = record_transitions(monkeypatch)
    emulator = await start_emulator(nursery)
    config = make_config(emulator.url, instance=10.0, scheduled_events=0.0, loadbalancer=0.0)
    running = await start_pollers(nursery, config)
    await running.holder.wait_for(lambda s: s.instance is not None)
    await trio.sleep(5)
    await emulator.faults({"status": 429, "count": 12, "path": "/metadata/instance"})
    await trio.sleep(400)
    health = running.board["instance"]
    assert health.failures["throttled"] == 12
    assert health.failures["service"] == health.failures["unreachable"] == 0
    assert [(t.old, t.new) for t in transitions] == [
        ("starting", "ok"),
        ("ok", "degraded"),
        ("degraded", "stale"),
        ("stale", "ok"),
    ]
    assert transitions[1].error == "HTTP 429: Too many requests"
    running.scope.cancel()


@dataclass
class LoopingFront:
    """Relays to the emulator, or (``looping``) answers from its copy as an imdsd front does."""

    port: int
    looping: bool = False
    kept: dict[str, bytes] | None = None

    async def handle(self, request: httpio.Request, responder: httpio.Responder) -> None:
        kept = self.kept if self.kept is not None else {}
        self.kept = kept
        headers = [(b"content-type", b"application/json")]
        path = request.target.partition("?")[0]
        if self.looping and path in kept:
            headers += [(b"x-imdsd-source", b"cache"), (b"x-imdsd-stale", b"false")]
            await responder.send(200, headers, kept[path])
            return
        conn = httpio.ClientConnection(await httpio.open_tcp("127.0.0.1", self.port, 5))
        sent = [(k.decode(), v.decode()) for k, v in request.headers]
        answer = await conn.request(request.method, request.target, sent, b"", timeout=10)
        await conn.aclose()
        if answer.status == 200:
            kept[path] = answer.body
        await responder.send(answer.status, headers, answer.body)


async def test_a_loop_into_a_front_is_a_failure_and_its_cache_is_never_applied(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    transitions = record_transitions(monkeypatch)
    emulator = await start_emulator(nursery)
    front = LoopingFront(emulator.port)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(httpio.HttpServer(front.handle).serve, listeners)
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    config = make_config(url, instance=10.0, scheduled_events=0.0, loadbalancer=0.0)
    running = await start_pollers(nursery, config)
    good = await running.holder.wait_for(lambda s: s.instance is not None)
    updates = running.holder.updates
    front.looping = True
    await emulator.control("PATCH", "instance", {"compute": {"vmSize": "Standard_LOOPTEST"}})
    health = running.board["instance"]
    for _ in range(6):
        await trio.sleep(10)
        assert running.holder.updates == updates
        assert running.holder.snapshot is good
        assert health.state(trio.current_time()) != "ok"
    assert running.board.status(trio.current_time()) != "ok"
    assert health.last_error == f"protocol: {LOOP_MESSAGE}"
    assert health.failures["service"] >= 6
    assert [(t.old, t.new) for t in transitions] == [
        ("starting", "ok"),
        ("ok", "degraded"),
        ("degraded", "stale"),
    ]
    assert transitions[1].error == f"protocol: {LOOP_MESSAGE}"
    front.looping = False
    fresh = await running.holder.wait_for(lambda s: s is not good)
    assert fresh.instance is not None
    assert fresh.instance.compute.vm_size == "Standard_LOOPTEST"
    assert health.state(trio.current_time()) == "ok"
    running.scope.cancel()


class FlakySink(SnapshotHolder):
    """A sink whose first instance delivery fails."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def instance(self, doc: Instance, raw: dict[str, Any]) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("consumer bug")
        await super().instance(doc, raw)


async def test_a_failing_consumer_does_not_stop_the_poller(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery)
    sink = FlakySink()
    config = make_config(emulator.url, instance=10.0, scheduled_events=0.0, loadbalancer=0.0)
    running = await start_pollers(nursery, config, sink)
    await sink.wait_for(lambda s: s.instance is not None)
    assert sink.calls == 2
    running.scope.cancel()


class BrokenSink(SnapshotHolder):
    """A sink that fails to take any instance document while ``broken`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.calls = 0

    async def instance(self, doc: Instance, raw: dict[str, Any]) -> None:
        self.calls += 1
        if self.broken:
            raise RecursionError("maximum recursion depth exceeded")
        await super().instance(doc, raw)


async def test_apply_failures_are_poll_failures_logged_once_per_error(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    transitions = record_transitions(monkeypatch)
    emulator = await start_emulator(nursery)
    sink = BrokenSink()
    config = make_config(emulator.url, instance=10.0, scheduled_events=0.0, loadbalancer=0.0)
    with capture_logs() as logs:
        running = await start_pollers(nursery, config, sink)
        await trio.sleep(95)
    health = running.board["instance"]
    assert sink.calls == 10  # offered again every round: nothing is taken as applied
    assert health.successes == 0
    assert health.failures["internal"] == 10
    assert health.state(trio.current_time()) == "stale"
    assert running.board.status(trio.current_time()) == "starting"
    assert health.last_error == "apply failed: RecursionError: maximum recursion depth exceeded"
    assert [(t.old, t.new) for t in transitions] == [
        ("starting", "degraded"),
        ("degraded", "stale"),
    ]
    failed = [e for e in logs if e["event"] == "snapshot consumer failed"]
    assert len(failed) == 1  # one traceback per distinct error, not one per poll
    assert failed[0]["log_level"] == "error"
    sink.broken = False
    await sink.wait_for(lambda s: s.instance is not None)
    assert health.state(trio.current_time()) == "ok"
    assert transitions[-1].new == "ok"
    running.scope.cancel()


async def test_a_poller_bug_is_an_internal_failure_logged_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    transitions = record_transitions(monkeypatch)
    emulator = await start_emulator(nursery)
    config = make_config(emulator.url, instance=10.0, scheduled_events=0.0, loadbalancer=0.0)

    async def broken_fetch(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    with capture_logs() as logs:
        running = await start_pollers(nursery, config)
        await running.holder.wait_for(lambda s: s.instance is not None)
        monkeypatch.setattr(running.client, "fetch", broken_fetch)
        await trio.sleep(95)
    health = running.board["instance"]
    assert health.failures["internal"] >= 9
    assert health.last_error == "internal: RuntimeError: a bug"
    assert [(t.old, t.new) for t in transitions] == [
        ("starting", "ok"),
        ("ok", "degraded"),
        ("degraded", "stale"),
    ]
    assert len([e for e in logs if e["event"] == "poller failed; retrying"]) == 1
    running.scope.cancel()


async def test_a_3xx_is_retried_with_backoff_and_never_followed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery)
    config = make_config(emulator.url, instance=10.0, scheduled_events=0.0, loadbalancer=0.0)
    running = await start_pollers(nursery, config)
    await running.holder.wait_for(lambda s: s.instance is not None)
    await emulator.faults(
        {"status": 302, "path": "/metadata/instance"},
        {"status": 301, "path": "/metadata/instance"},
        {"status": 307, "path": "/metadata/instance"},
    )
    await emulator.control("PATCH", "instance", {"compute": {"vmSize": "Standard_D4s_v5"}})
    await trio.sleep(10)  # the next round meets the 3xx answers
    asked = trio.current_time()
    fresh = await running.holder.wait_for(
        lambda s: s.instance is not None and s.instance.compute.vm_size == "Standard_D4s_v5"
    )
    assert fresh.instance is not None
    # backoff 0.5-1 s, 1-2 s, 2-4 s: the usual service-error backoff, not a minute's pause
    assert trio.current_time() - asked <= 7.0
    health = running.board["instance"]
    assert health.failures["service"] == 3
    assert health.failures["rejected"] == 0
    assert (await emulator.stats())["by_path"]["/metadata/instance"] == 1 + 3 + 1
    running.scope.cancel()


# ---------------------------------------------------------------------------- the storm

STORM_CYCLE: list[dict[str, Any]] = [
    {"status": 429, "retry_after": 0, "count": 2},
    {"status": 410, "count": 2},
    {"status": 500, "count": 2},
    {"delay": "3s", "count": 1},
    {"status": 503, "retry_after": 1, "count": 1},
    {"reset": True, "count": 2},
    {"status": 429, "count": 2},
    {"delay": "3s", "status": 502, "count": 1},
    {"status": 504, "count": 2},
]
OK_ONCE: dict[str, Any] = {"delay": 0, "count": 1}  # one normal answer between bursts


def storm_faults() -> list[dict[str, Any]]:
    """Interleaved per-endpoint fault bursts, each followed by one good answer."""
    faults = []
    for _ in range(10):
        for spec in STORM_CYCLE:
            for path in (
                "/metadata/instance",
                "/metadata/scheduledevents",
                "/metadata/loadbalancer",
            ):
                faults += [{**spec, "path": path}, {**OK_ONCE, "path": path}]
    return faults


async def test_budget_holds_under_a_60s_storm(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_transitions(monkeypatch)
    emulator = await start_emulator(nursery)
    config = make_config(
        emulator.url, rate=2.0, instance=1.0, scheduled_events=1.0, loadbalancer=1.0
    )
    await emulator.faults(*storm_faults())
    running = await start_pollers(nursery, config)
    await trio.sleep(60)
    storm = await emulator.stats()
    await emulator.control("DELETE", "faults")
    await trio.sleep(120)
    await running.holder.wait_for(
        lambda s: None not in (s.instance, s.scheduled_events, s.loadbalancer)
    )
    after = await emulator.stats()
    running.scope.cancel()
    # the budget was reached and never exceeded, in any 1 s window, for 3 minutes
    assert storm["peak_rps"] == 2
    assert after["peak_rps"] == 2
    assert storm["total"] <= 2 * 60 + 1
    assert after["total"] <= 2 * 180 + 1
    for status in ("429", "410", "500", "502", "503", "504", "reset"):
        assert storm["by_status"].get(status, 0) > 0, status
    failures = [h.failures for h in running.board.endpoints.values()]
    for kind in ("throttled", "service", "unreachable"):
        assert sum(f[kind] for f in failures) > 0, kind
    # recovered: nothing is failing any more, and every endpoint got through recently. Demand
    # (three 1 s pollers) exceeds the budget (2/s) here by design, so the lowest-priority
    # endpoint is served only when its wait is promoted (after 3 s): it may sit right at the
    # 3-interval staleness line, which is why "ok" is not asserted at one instant.
    now = trio.current_time()
    for health in running.board.endpoints.values():
        assert health.consecutive_failures == 0, running.board.to_json(now, 0.0)
        assert health.last_success is not None
        assert now - health.last_success <= 3 * health.interval + 2, running.board.to_json(now, 0.0)


@pytest.mark.parametrize(("rate", "events_at_least"), [(2.0, 55), (1.0, 15)])
async def test_scheduled_events_win_the_budget_but_nobody_starves(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, rate: float, events_at_least: int
) -> None:
    emulator = await start_emulator(nursery)
    config = make_config(
        emulator.url, rate=rate, instance=1.0, scheduled_events=1.0, loadbalancer=1.0
    )
    running = await start_pollers(nursery, config)
    await trio.sleep(5)
    await emulator.control("POST", "reset-stats")
    await trio.sleep(60)
    stats = await emulator.stats()
    running.scope.cancel()
    by_path = stats["by_path"]
    # three pollers want 3 requests/s; scheduled events go first, and waiters promoted after
    # 3 s keep the others from starving when the budget cannot serve everyone
    events = by_path["/metadata/scheduledevents"]
    assert events >= events_at_least
    assert events >= by_path["/metadata/instance"] >= 10
    assert events >= by_path["/metadata/loadbalancer"] >= 10
    assert stats["total"] <= 60 * rate + 1
    assert stats["peak_rps"] == rate


def test_snapshot_holder_is_a_sink() -> None:
    holder: poller.SnapshotSink = SnapshotHolder(Snapshot())
    assert isinstance(holder, SnapshotHolder)
