"""The IMDS client: wire rules, connections, errors, retries and api-version negotiation.

Wire-level checks use a recording server on loopback (built on imdsd.httpio); behaviour
checks run against the emulator with injected faults, under MockClock where time matters.
"""

from __future__ import annotations

import email.utils
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from daemon_support import emulator
from emulator_support import start_emulator
from structlog.testing import capture_logs
from test_front_server import front_daemon, front_port

from imdsd import __version__, httpio
from imdsd.api.metrics import Metrics
from imdsd.config import ImdsConfig
from imdsd.upstream.budget import Budget, Priority
from imdsd.upstream.client import (
    ConnectError,
    GaveUp,
    ImdsClient,
    Reset,
    Timeout,
    TooLarge,
    build_target,
)
from imdsd.upstream.errors import LOOP_MESSAGE, ThroughFront
from imdsd.upstream.retry import Decision, Outcome, Retry, RetryPolicy

# ---------------------------------------------------------------------------- helpers


def make_client(url: str, *, api_version: str = "auto", rate: float = 4.0, **kw: Any) -> ImdsClient:
    config = ImdsConfig(endpoint=url, api_version=api_version, **kw)
    return ImdsClient(config, Budget(rate))


@dataclass
class Recorder:
    """A loopback HTTP server that records requests and answers from a script."""

    requests: list[httpio.Request] = field(default_factory=list)
    answers: list[tuple[int, bytes, bool, float]] = field(default_factory=list)
    server: httpio.HttpServer | None = None
    port: int = 0

    async def handle(self, request: httpio.Request, responder: httpio.Responder) -> None:
        self.requests.append(request)
        status, body, close, delay = self.answers.pop(0) if self.answers else (200, b"{}", False, 0)
        if delay:
            await trio.sleep(delay)
        responder.close_after = close
        await responder.send(status, [(b"content-type", b"application/json")], body)


async def start_recorder(nursery: trio.Nursery) -> Recorder:
    recorder = Recorder()
    recorder.server = httpio.HttpServer(recorder.handle)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    recorder.port = listeners[0].socket.getsockname()[1]
    await nursery.start(recorder.server.serve, listeners)
    return recorder


# ---------------------------------------------------------------------------- wire rules


def test_build_target_encodes_each_parameter_once() -> None:
    assert build_target("/metadata/instance", {"api-version": "2021-02-01"}) == (
        "/metadata/instance?api-version=2021-02-01"
    )
    assert build_target("/metadata/versions", None) == "/metadata/versions"
    assert build_target("/metadata/x", {"a": "b c&d"}) == "/metadata/x?a=b%20c%26d"
    for bad in ("metadata", "/metadata?x=1", "/a#b"):
        with pytest.raises(ValueError, match="absolute path"):
            build_target(bad, None)


async def test_every_request_has_the_required_headers_and_reuses_one_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = await start_recorder(nursery)
    client = make_client(f"http://127.0.0.1:{recorder.port}")
    for _ in range(3):
        response = await client.get("/metadata/instance", {"api-version": "2021-02-01"})
        assert response.status == 200
    await client.post(
        "/metadata/scheduledevents", {"api-version": "2020-07-01"}, b'{"StartRequests": []}'
    )
    await client.aclose()
    assert recorder.server is not None
    assert recorder.server.accepted == 2  # one lane for the GETs, one for the POST
    ids = set()
    for request in recorder.requests:
        assert request.header("metadata") == "true"
        assert request.header("user-agent") == f"imdsd/{__version__}"
        assert request.header("host") == f"127.0.0.1:{recorder.port}"
        assert request.header("x-forwarded-for") is None
        request_id = request.header("x-ms-client-request-id")
        assert request_id is not None
        assert uuid.UUID(request_id).version == 4
        ids.add(request_id)
        names = [name for name, _ in request.query]
        assert len(names) == len(set(names))
    assert len(ids) == 4
    assert recorder.requests[0].target == "/metadata/instance?api-version=2021-02-01"
    assert recorder.requests[3].method == "POST"
    assert recorder.requests[3].header("content-type") == "application/json"
    assert recorder.requests[3].body == b'{"StartRequests": []}'


async def test_reconnects_when_the_server_closes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = await start_recorder(nursery)
    recorder.answers = [(200, b"{}", True, 0), (200, b"{}", False, 0), (200, b"{}", False, 0)]
    client = make_client(f"http://127.0.0.1:{recorder.port}")
    for _ in range(3):
        assert (await client.get("/metadata/instance")).status == 200
    await client.aclose()
    assert recorder.server is not None
    assert recorder.server.accepted == 2


async def test_oversized_answer_is_refused_and_the_connection_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = await start_recorder(nursery)
    recorder.answers = [(200, b"x" * ((1 << 20) + 1), False, 0), (200, b"x" * (1 << 20), False, 0)]
    client = make_client(f"http://127.0.0.1:{recorder.port}")
    with pytest.raises(TooLarge, match="larger than 1048576"):
        await client.get("/metadata/instance")
    assert client.open_connections == 0
    assert len((await client.get("/metadata/instance")).body) == 1 << 20
    await client.aclose()


async def test_read_timeout(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    recorder = await start_recorder(nursery)
    recorder.answers = [(200, b"{}", False, 30.0), (200, b"{}", False, 30.0)]
    client = make_client(f"http://127.0.0.1:{recorder.port}", read_timeout=10.0)
    start = trio.current_time()
    with pytest.raises(Timeout, match="10s"):
        await client.get("/metadata/instance")
    assert trio.current_time() - start == pytest.approx(10.0)
    assert client.open_connections == 0
    start = trio.current_time()
    with pytest.raises(Timeout):
        await client.get("/metadata/instance", timeout=3.0)  # a per-call timeout wins
    assert trio.current_time() - start == pytest.approx(3.0)
    await client.aclose()


async def test_refused_connection_is_a_connect_error() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    client = make_client(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectError, match="failed"):
        await client.get("/metadata/instance")
    assert client.budget.core.granted == 0  # no request was started


async def test_proxy_environment_is_ignored(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    proxy_hits = 0

    async def proxy(stream: trio.SocketStream) -> None:
        nonlocal proxy_hits
        proxy_hits += 1
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy_url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    await nursery.start(trio.serve_listeners, proxy, listeners)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy_url)
    monkeypatch.setenv("all_proxy", proxy_url)
    monkeypatch.setenv("NO_PROXY", "example.com")
    monkeypatch.setenv("no_proxy", "example.com")
    emulator = await start_emulator(nursery)
    client = make_client(emulator.url)
    fetched = await client.fetch("instance")
    assert b'"compute"' in fetched.body
    await client.aclose()
    assert proxy_hits == 0
    assert (await emulator.stats())["by_path"]["/metadata/instance"] == 1


# ---------------------------------------------------------------------------- errors


async def test_reset_maps_to_reset_and_the_next_request_reconnects(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery)
    client = make_client(emulator.url)
    await emulator.fault(reset=True, path="/metadata/versions")
    with pytest.raises(Reset):
        await client.get("/metadata/versions")
    assert (await client.get("/metadata/versions")).status == 200
    await client.aclose()


async def test_non_retryable_status_gives_up_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery)
    client = make_client(emulator.url, api_version="2021-02-01")
    await emulator.fault(status=403, path="/metadata/instance")
    seen: list[tuple[Outcome, Decision]] = []
    with pytest.raises(GaveUp) as caught:
        await client.fetch("instance", observer=lambda o, d: seen.append((o, d)))
    assert caught.value.status == 403
    assert len(seen) == 1
    assert (await emulator.stats())["by_path"]["/metadata/instance"] == 1
    await client.aclose()


async def test_transient_failures_are_retried_with_backoff(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery)
    client = make_client(emulator.url, api_version="2021-02-01")
    for spec in (
        {"status": 500},
        {"status": 502},
        {"status": 503},
        {"status": 504},
        {"reset": True},
        {"truncate": True},
        {"oversize": 2_000_000},
        {"delay": "30s"},
    ):
        await emulator.fault(path="/metadata/instance", **spec)
    seen: list[Decision] = []
    start = trio.current_time()
    fetched = await client.fetch("instance", observer=lambda o, d: seen.append(d))
    assert fetched.version == "2021-02-01"
    assert len(seen) == 8
    assert all(isinstance(d, Retry) for d in seen)
    delays = [d.delay for d in seen if isinstance(d, Retry)]
    assert all(
        0.5 * min(30.0, 0.5 * 2**i) <= x <= min(30.0, 0.5 * 2**i) for i, x in enumerate(delays)
    )
    assert trio.current_time() - start >= sum(delays) + 10.0  # plus the read timeout
    statuses = (await emulator.stats())["by_path_status"]["/metadata/instance"]
    ok = statuses.pop("200")
    assert statuses == {"500": 1, "502": 1, "503": 1, "504": 1, "reset": 1}
    assert ok >= 3  # truncated, oversized, final (the delayed one may still be sleeping)
    await client.aclose()


async def test_gone_is_retried_for_at_least_70s_then_at_the_interval(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery)
    client = make_client(emulator.url, api_version="2021-02-01")
    await emulator.fault(status=410, count=100_000, path="/metadata/instance")
    times: list[float] = []
    start = trio.current_time()
    with trio.move_on_after(200):
        await client.fetch(
            "instance",
            policy=RetryPolicy(interval=10.0),
            observer=lambda o, d: times.append(trio.current_time() - start),
        )
        pytest.fail("a 410 storm must not end the fetch")
    early = [t for t in times if t < 70]
    late = [t for t in times if t >= 75]
    assert len(early) >= 14
    gaps = [b - a for a, b in itertools.pairwise(late)]
    assert gaps
    assert all(g == pytest.approx(10.0, abs=0.01) for g in gaps)
    await client.aclose()


@pytest.mark.parametrize("form", ["seconds", "date"])
async def test_retry_after_is_honoured(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, form: str
) -> None:
    emulator = await start_emulator(nursery)
    client = make_client(emulator.url, api_version="2021-02-01")
    if form == "seconds":
        retry_after: int | str = 7
    else:
        retry_after = email.utils.formatdate(time.time() + 8, usegmt=True)
    await emulator.fault(status=429, retry_after=retry_after, path="/metadata/instance")
    start = trio.current_time()
    await client.fetch("instance")
    elapsed = trio.current_time() - start
    assert 6.0 <= elapsed <= 8.5
    await client.aclose()


# ---------------------------------------------------------------------------- api-versions


async def test_negotiation_against_the_azure_profile(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery, "azure")
    client = make_client(emulator.url)
    for endpoint in ("instance", "scheduled_events", "loadbalancer"):
        await client.fetch(endpoint)
    assert client.versions.chosen() == {
        "instance": "2023-11-15",
        "scheduled_events": "2020-07-01",
        "loadbalancer": "2023-11-15",
    }
    stats = await emulator.stats()
    assert stats["by_path"]["/metadata/versions"] == 1
    assert "400" not in stats["by_status"]
    await client.aclose()


async def test_negotiation_against_the_azurestack_profile(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery, "azurestack")
    client = make_client(emulator.url)
    instance = await client.fetch("instance")
    assert b"AzureStack" in instance.body
    await client.fetch("scheduled_events")
    with pytest.raises(GaveUp) as caught:
        await client.fetch("loadbalancer")
    assert caught.value.status == 404
    assert client.versions.chosen() == {
        "instance": "2021-05-01",
        "scheduled_events": "2020-07-01",
        "loadbalancer": "2021-05-01",
    }
    assert "400" not in (await emulator.stats())["by_status"]
    await client.aclose()


async def test_failed_probe_falls_back_on_the_400_newest_versions(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery, "azurestack")
    client = make_client(emulator.url)
    await emulator.fault(status=500, path="/metadata/versions")
    fetched = await client.fetch("instance")
    assert fetched.version == "2021-05-01"
    stats = await emulator.stats()
    assert stats["by_path_status"]["/metadata/instance"] == {"400": 1, "200": 1}
    await client.aclose()


async def test_a_400_mid_life_renegotiates(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery, "azure")
    client = make_client(emulator.url)
    assert (await client.fetch("instance")).version == "2023-11-15"
    assert (await client.fetch("scheduled_events")).version == "2020-07-01"
    # host update: the version in use is refused, newer ones imdsd knows are offered
    newest = ["2021-05-01", "2021-03-01", "2021-02-01"]
    await emulator.fault(
        status=400,
        body=msgspec.json.encode({"error": "bad api-version", "newest-versions": newest}).decode(),
        path="/metadata/instance",
    )
    assert (await client.fetch("instance")).version == "2021-05-01"
    assert client.versions.chosen()["scheduled_events"] == "2020-07-01"
    # only versions unknown to imdsd offered: ask /metadata/versions again
    await emulator.fault(
        status=400,
        body='{"error": "bad api-version", "newest-versions": ["2031-01-01"]}',
        path="/metadata/instance",
    )
    assert (await client.fetch("instance")).version == "2023-11-15"
    stats = await emulator.stats()
    assert stats["by_path"]["/metadata/versions"] == 2
    assert stats["by_path_status"]["/metadata/instance"] == {"200": 3, "400": 2}
    await client.aclose()


async def test_fixed_version_is_used_everywhere_and_never_changed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery, "azure")
    client = make_client(emulator.url, api_version="2019-08-01")
    assert (await client.fetch("instance")).version == "2019-08-01"
    assert (await client.fetch("scheduled_events")).version == "2019-08-01"
    with pytest.raises(GaveUp, match="2019-08-01 refused") as caught:
        await client.fetch("loadbalancer")  # below the load balancer's minimum: 400
    assert caught.value.status == 400
    stats = await emulator.stats()
    assert "/metadata/versions" not in stats["by_path"]
    assert stats["by_path_status"]["/metadata/loadbalancer"] == {"400": 1}
    await client.aclose()


async def test_approve_posts_start_requests(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery, "azure")
    event = await emulator.control("POST", "scheduled-events", {"EventType": "Reboot"})
    client = make_client(emulator.url)
    await client.approve([event["EventId"]])
    document = msgspec.json.decode((await client.fetch("scheduled_events")).body)
    assert [e["EventStatus"] for e in document["Events"]] == ["Started"]
    with pytest.raises(ValueError, match="no event ids"):
        await client.approve([])
    await client.aclose()


async def test_status_reports_budget_versions_and_connections(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery, "azure")
    client = make_client(emulator.url, rate=2.0)
    await client.fetch("instance", priority=Priority.URGENT)
    status = client.status()
    assert status == {
        "budget": {"rate": 2.0, "in_use": 2, "waiting": 0, "granted": 2},
        "api_version": {"instance": "2023-11-15"},
        "requests_sent": 2,
        "upstream_connections": 2,
    }
    await client.aclose()
    assert client.open_connections == 0


async def test_every_request_and_fetch_is_counted_in_the_metrics(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = await start_emulator(nursery, "azure")
    metrics = Metrics()
    client = ImdsClient(ImdsConfig(endpoint=emulator.url), Budget(4.0), metrics=metrics)
    await emulator.faults(
        {"status": 429, "path": "/metadata/instance"},
        {"reset": True, "path": "/metadata/instance"},
        {"status": 500, "path": "/metadata/instance"},
        {"status": 410, "path": "/metadata/instance"},
    )
    started = trio.current_time()
    await client.fetch("instance")
    took = trio.current_time() - started
    await client.fetch("instance")
    raw = await client.get("/metadata/nothing")  # a raw call counts under "other"
    assert raw.status == 404
    await client.aclose()
    counted = {key: n for key, n in metrics.upstream_requests.items() if n}
    assert counted == {
        ("versions", "2xx"): 1,
        ("instance", "4xx"): 2,
        ("instance", "error"): 1,
        ("instance", "5xx"): 1,
        ("instance", "2xx"): 2,
        ("other", "4xx"): 1,
    }
    assert metrics.upstream_throttled == 1
    histogram = metrics.fetch_duration["instance"]
    assert histogram.count == 2
    assert took <= histogram.total
    assert took >= 0.5 + 0.25 + 0.5  # the backoffs of the retried first fetch are included
    assert sum(h.count for h in metrics.fetch_duration.values()) == 2
    stats = await emulator.stats()
    assert stats["total"] == sum(counted.values())


# ---------------------------------------------------------------------------- slots and closes


class Upstream:
    """Plays IMDS on the far end of socket pairs the pool gets instead of TCP connections.

    Connection ``i`` closes ``linger[i]`` seconds after its first answer (None: kept open).
    """

    def __init__(self, nursery: trio.Nursery, linger: list[float | None]) -> None:
        self.nursery = nursery
        self.linger = linger
        self.heads: list[bytes] = []
        self.connections = 0

    async def connect(self, host: str, port: int, timeout: float) -> trio.SocketStream:
        ours, theirs = trio.socket.socketpair()
        linger = self.linger[self.connections]
        self.connections += 1
        self.nursery.start_soon(self._serve, trio.SocketStream(theirs), linger)
        return trio.SocketStream(ours)

    async def _serve(self, stream: trio.SocketStream, linger: float | None) -> None:
        async with stream:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                self.heads.append(head)
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                if linger is not None:
                    await trio.sleep(linger)
                    return


@pytest.fixture
def upstream(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> Upstream:
    fake = Upstream(nursery, linger=[0.5, None])
    monkeypatch.setattr("imdsd.upstream.pool.open_marked_tcp", fake.connect)
    return fake


async def test_a_connection_closed_while_waiting_for_a_budget_slot_spends_that_slot(
    upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    client = make_client("http://127.0.0.1:9", api_version="2021-02-01", rate=1.0)
    await client.get("/metadata/instance")  # at 0; the server closes at 0.5
    await client.get("/metadata/instance")  # the slot at 1.05 finds it closed
    assert (client.budget.core.granted, upstream.connections, len(upstream.heads)) == (3, 2, 2)
    assert trio.current_time() == pytest.approx(2.1)  # the request started in the next slot
    await client.aclose()


async def test_a_connection_closed_while_the_front_waits_is_reopened_in_the_same_slot(
    upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    client = make_client("http://127.0.0.1:9")
    slots = 0

    async def acquire() -> None:
        nonlocal slots
        slots += 1
        await trio.sleep(1.0)

    for _ in range(2):  # the first answer at 1, the close at 1.5, the second slot at 2
        response = await client.forward(
            "GET", "/x?b=1&b=2", [("Host", "agent"), ("Metadata", "true")], b"",
            acquire=acquire, lane="front",
        )  # fmt: skip
        assert response.status == 200
    assert (slots, upstream.connections) == (2, 2)
    assert trio.current_time() == pytest.approx(2.0)
    for head in upstream.heads:  # as it came, but the endpoint's Host
        assert head.split(b"\r\n") == [b"GET /x?b=1&b=2 HTTP/1.1", b"Host: 127.0.0.1:9",
                                       b"Metadata: true"]  # fmt: skip
    await client.aclose()


# ---------------------------------------------------------------------------- loops into a front

# what an imdsd front adds to its answers (imdsd/front: cache, server, relay)
FRONT_ANSWERS: list[tuple[int, list[tuple[bytes, bytes]]]] = [
    (200, [(b"x-imdsd-source", b"cache"), (b"x-imdsd-revision", b"3")]),
    (200, [(b"x-imdsd-source", b"cache"), (b"x-imdsd-stale", b"true")]),
    (400, [(b"x-imdsd-source", b"front")]),
    (403, [(b"x-imdsd-source", b"front")]),
    (200, [(b"x-imdsd-source", b"upstream")]),
    (429, [(b"x-imdsd-source", b"queue")]),
    (500, [(b"x-imdsd-source", b"upstream"), (b"x-imdsd-error", b"connect failed")]),
    (200, [(b"x-imdsd-source", b"token-cache")]),
    (200, [(b"X-Imdsd-Fetched-At", b"2026-01-01T00:00:00Z")]),
]  # fmt: skip


@dataclass
class FakeFront:
    """Answers like an imdsd front (``X-Imdsd-*`` headers) until ``front`` is switched off."""

    status: int
    extra: list[tuple[bytes, bytes]]
    front: bool = True
    port: int = 0

    async def handle(self, request: httpio.Request, responder: httpio.Responder) -> None:
        headers = [(b"content-type", b"application/json")]
        if self.front:
            await responder.send(self.status, headers + self.extra, b"{}")
        else:
            await responder.send(200, headers, msgspec.json.encode(INSTANCE_DOC))


INSTANCE_DOC: dict[str, Any] = {"compute": {"vmSize": "Standard_LOOPTEST"}, "network": {}}


@pytest.mark.parametrize(("status", "extra"), FRONT_ANSWERS)
async def test_an_answer_from_an_imdsd_front_is_a_loop_error_never_data(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    status: int,
    extra: list[tuple[bytes, bytes]],
) -> None:
    fake = FakeFront(status, extra)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(httpio.HttpServer(fake.handle).serve, listeners)
    client = make_client(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    with capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(ThroughFront, match="imdsd's own front") as raised:
                await client.get("/metadata/instance", {"api-version": "2021-02-01"})
            assert raised.value.kind == "protocol"
            assert client.open_connections == 0  # a looped connection is never reused
        with pytest.raises(ThroughFront):
            await client.forward(
                "GET", "/metadata/identity/oauth2/token?api-version=2018-02-01", [], b"",
                acquire=trio.lowlevel.checkpoint, lane="front",
            )  # fmt: skip
        seen: list[Outcome] = []
        with pytest.raises(GaveUp) as gave_up:
            await client.fetch(
                "instance",
                policy=RetryPolicy(deadline=3.0),
                observer=lambda outcome, _: seen.append(outcome),
            )
        assert gave_up.value.outcome.error == "protocol"
        assert gave_up.value.outcome.message == LOOP_MESSAGE
        assert len(seen) >= 2  # retried with backoff, as a broken answer
        fake.front = False
        fetched = await client.fetch("instance")
        assert msgspec.json.decode(fetched.body) == INSTANCE_DOC
    events = [e["event"] for e in logs if e["event"].startswith("upstream loop")]
    assert events == ["upstream loop", "upstream loop gone: IMDS answers directly"]
    assert next(e for e in logs if e["event"] == "upstream loop")["error"] == LOOP_MESSAGE
    await client.aclose()


async def test_a_real_front_as_the_endpoint_gives_errors_not_its_cache(tmp_path: Any) -> None:
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        await emu.control("PATCH", "instance", {"compute": {"vmSize": "Standard_LOOPTEST"}})
        client = make_client(f"http://127.0.0.1:{front_port(daemon)}")
        for target in ("/metadata/instance", "/metadata/versions", "/metadata/nothing"):
            with pytest.raises(ThroughFront):
                await client.get(target, {"api-version": "2021-02-01"})
        with pytest.raises(GaveUp) as gave_up:
            await client.fetch("instance", policy=RetryPolicy(deadline=1.0, base=0.1))
        assert gave_up.value.outcome.message == LOOP_MESSAGE
        await client.aclose()
