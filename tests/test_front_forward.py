"""Forwarding (sans-IO cores and the trio relay with a fake upstream, on a mock clock)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from imdsd.config import ImdsConfig
from imdsd.front.forward import FairQueue, IdentityLimits
from imdsd.front.relay import Relay
from imdsd.front.rules import Endpoint, Routed
from imdsd.front.tokens import TokenCache, expires_on
from imdsd.upstream.budget import Budget
from imdsd.upstream.client import ConnectError, ImdsClient, UpstreamResponse
from imdsd.upstream.messages import Outbound
from imdsd.upstream.pool import Acquire, Pool

# ------------------------------------------------------------------ fair queue


def test_fair_queue_takes_callers_in_turn() -> None:
    queue = FairQueue()
    a = [queue.enqueue("a") for _ in range(3)]
    b = [queue.enqueue("b") for _ in range(2)]
    c = queue.enqueue("c")
    order = []
    while (head := queue.head()) is not None:
        order.append(head)
        queue.remove(head)
    assert order == [a[0], b[0], c, a[1], b[1], a[2]]


def test_fair_queue_giving_up_keeps_the_callers_place() -> None:
    queue = FairQueue()
    a1, a2 = queue.enqueue("a"), queue.enqueue("a")
    b1 = queue.enqueue("b")
    queue.remove(a2)  # a waiter behind gives up: "a" is still first
    assert queue.head() == a1
    queue.remove(a1)
    assert queue.head() == b1
    assert queue.waiting() == 1
    assert queue.waiting("a") == 0
    queue.remove(a1)  # twice is harmless
    assert len(queue) == 1


# ------------------------------------------------------------------ identity limits


def test_identity_limits_concurrency_and_rate() -> None:
    limits = IdentityLimits(rate=20, concurrency=5)
    assert all(limits.try_start(0.0) for _ in range(5))
    assert not limits.try_start(0.0)
    assert limits.next_start(0.0) == math.inf
    for step in range(15):
        limits.finish()
        assert limits.try_start(0.01 * (step + 1))
    limits.finish()
    assert not limits.try_start(0.5)  # 20 starts within the last second
    assert limits.next_start(0.5) == pytest.approx(1.05)
    assert limits.try_start(1.05)
    for _ in range(5):
        limits.finish()
    with pytest.raises(ValueError, match="without a started request"):
        limits.finish()


# ------------------------------------------------------------------ token cache

TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r"


def _token_body(expiry: float | str) -> bytes:
    return msgspec.json.encode({"access_token": "t", "expires_on": expiry})


def test_token_cache_until_five_minutes_before_expiry() -> None:
    cache = TokenCache()
    assert cache.put(TOKEN, 200, (), _token_body(str(10_000)), now_wall=1_000)
    assert cache.get(TOKEN, 9_699) is not None
    assert cache.get(TOKEN + "&client_id=x", 1_000) is None
    assert cache.get(TOKEN, 9_700) is None
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("status", "body", "now"),
    [
        (400, _token_body(10_000), 0),
        (200, b"not json", 0),
        (200, msgspec.json.encode({"expires_on": "soon"}), 0),
        (200, msgspec.json.encode({"expires_on": True}), 0),
        (200, msgspec.json.encode(["x"]), 0),
        (200, _token_body(10_000), 9_800),
    ],
)
def test_token_answers_not_kept(status: int, body: bytes, now: float) -> None:
    assert not TokenCache().put(TOKEN, status, (), body, now)


def test_token_cache_is_bounded() -> None:
    cache = TokenCache(capacity=2)
    for index, expiry in enumerate((400.0, 10_000.0, 10_000.0)):
        cache.put(f"{TOKEN}{index}", 200, (), _token_body(expiry), now_wall=200)
    assert len(cache) == 2
    assert cache.get(f"{TOKEN}0", 200) is None  # the one already due went first
    assert expires_on(_token_body(12.5)) == 12.5


# ------------------------------------------------------------------ relay


class FakePool(Pool):
    """Stands in for the upstream connections: records requests, holds them until released."""

    def __init__(self, hold: bool = False, fail: bool = False) -> None:
        super().__init__(ImdsConfig())
        self.calls: list[dict[str, Any]] = []
        self.started: list[tuple[float, str]] = []
        self.in_flight = 0
        self.peak = 0
        self.release = trio.Event()
        self.hold = hold
        self.fail = fail

    async def exchange(
        self, lane: str, out: Outbound, acquire: Acquire, **_: object
    ) -> UpstreamResponse:
        await acquire()
        self.calls.append({"method": out.method, "target": out.target, "headers": list(out.headers),
                           "body": out.body, "lane": lane})  # fmt: skip
        self.started.append((trio.current_time(), dict(out.headers).get("who", "")))
        if self.fail:
            raise ConnectError("connect to 169.254.169.254:80 failed: refused")
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.hold:
                await self.release.wait()
            else:
                await trio.sleep(0.01)
        finally:
            self.in_flight -= 1
        body_out = _token_body(trio.current_time() + 3600) if "token" in out.target else b"{}"
        return UpstreamResponse(200, (("Content-Type", "application/json"), ("Server", "x")),
                                body_out)  # fmt: skip


def _relay(pool: FakePool, rate: float = 2.0, queue_timeout: float = 5.0) -> Relay:
    budget = Budget(rate)
    client = ImdsClient(ImdsConfig(), budget, pool=pool)  # the real forward, a fake pool
    return Relay(
        lambda: client,
        lambda: budget,
        queue_timeout=queue_timeout,
        token_cache=True,
        wall=trio.current_time,
    )


def _routed(endpoint: Endpoint, method: str = "GET") -> Routed:
    return Routed(endpoint, method, [], "2020-09-01", {})


async def _send(relay: Relay, who: str, target: str, out: list[Any], **kw: Any) -> None:
    endpoint = Endpoint.IDENTITY if "identity" in target else Endpoint.OTHER
    answer = await relay.forward(
        _routed(endpoint),
        caller=who,
        target=target,
        headers=[("Metadata", "true"), ("who", who)],
        body=b"",
        on_queued=lambda: out.append(("queued", who)),
        **kw,
    )
    out.append((answer.result, who, answer.status))


async def test_waiting_longer_than_queue_timeout_gets_imdss_429(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = FakePool()
    relay = _relay(client, rate=1.0, queue_timeout=2.0)
    out: list[Any] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(_send, relay, "a", "/metadata/attested/document", out)
    results = [item[0] for item in out if item[0] != "queued"]
    assert results.count("forwarded") == 2  # t=0 and t=1.05; the next slot is after 2 s
    assert results.count("throttled") == 3
    assert all(item[2] == 429 for item in out if item[0] == "throttled")
    assert relay.waiting == 0
    assert out.count(("queued", "a")) == 4


async def test_a_flooding_caller_does_not_delay_another_beyond_one_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = FakePool()
    relay = _relay(client, rate=2.0, queue_timeout=60.0)
    out: list[Any] = []
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(_send, relay, "flood", "/metadata/attested/document", out)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(_send, relay, "quiet", "/metadata/attested/document", out)
    order = [who for _, who in client.started]
    assert order.index("quiet") <= 2
    assert len(order) == 11


async def test_identity_requests_keep_imdss_identity_limits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = FakePool(hold=True)
    relay = _relay(client, rate=0.1)  # the general budget plays no part for identity
    out: list[Any] = []
    async with trio.open_nursery() as nursery:
        for index in range(8):
            target = f"/metadata/identity/oauth2/token?resource=r{index}"
            nursery.start_soon(_send, relay, f"c{index}", target, out)
        await trio.sleep(1)
        assert client.in_flight == 5
        client.release.set()
    assert client.peak == 5
    assert [result for result, *_ in out if result != "queued"] == ["forwarded"] * 8


async def test_identity_rate_is_20_per_second(autojump_clock: trio.testing.MockClock) -> None:
    client = FakePool()
    relay = _relay(client)
    out: list[Any] = []
    async with trio.open_nursery() as nursery:
        for index in range(45):
            target = f"/metadata/identity/oauth2/token?resource=r{index}"
            nursery.start_soon(_send, relay, "c", target, out)
    starts = [at for at, _ in client.started]
    assert len(starts) == 45
    for at in starts:
        assert sum(1 for other in starts if at <= other <= at + 1.0) <= 20


async def test_tokens_are_served_from_the_cache(autojump_clock: trio.testing.MockClock) -> None:
    client = FakePool()
    relay = _relay(client)
    out: list[Any] = []
    await _send(relay, "a", TOKEN, out)
    await _send(relay, "b", TOKEN, out)
    await _send(relay, "b", TOKEN + "&client_id=x", out)
    assert [r for r, *_ in out] == ["forwarded", "cached", "forwarded"]
    assert len(client.calls) == 2
    await trio.sleep(3600 - 300)
    await _send(relay, "a", TOKEN, out)
    assert len(client.calls) == 3


async def test_forwarded_as_it_came_without_hop_headers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = FakePool()
    relay = _relay(client)
    answer = await relay.forward(
        _routed(Endpoint.SCHEDULED_EVENTS, "POST"),
        caller="a",
        target="/metadata/scheduledevents?api-version=2020-07-01",
        headers=[
            ("Host", "169.254.169.254"),
            ("Metadata", "true"),
            ("Connection", "close"),
            ("Content-Length", "5"),
            ("User-Agent", "agent/1"),
        ],
        body=b'{"a"}',
        on_queued=lambda: None,
    )
    call = client.calls[0]
    assert (call["method"], call["target"], call["body"]) == (
        "POST",
        "/metadata/scheduledevents?api-version=2020-07-01",
        b'{"a"}',
    )
    assert call["headers"] == [("Metadata", "true"), ("User-Agent", "agent/1")]
    assert answer.content_type == "application/json"
    assert dict(answer.headers) == {"x-imdsd-source": "upstream"}


async def test_no_answer_upstream_is_imdss_500(autojump_clock: trio.testing.MockClock) -> None:
    relay = _relay(FakePool(fail=True))
    out: list[Any] = []
    await _send(relay, "a", "/metadata/attested/document", out)
    assert out == [("error", "a", 500)]


async def test_concurrent_requests_for_one_token_ask_imds_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = FakePool()
    relay = _relay(client)
    out: list[Any] = []
    async with trio.open_nursery() as nursery:
        for index in range(10):
            nursery.start_soon(_send, relay, f"c{index}", TOKEN, out)
    assert len(client.calls) == 1
    assert sorted(r for r, *_ in out) == ["cached"] * 9 + ["forwarded"]


async def test_waiting_for_a_token_that_is_not_kept_asks_imds_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = FakePool()
    relay = _relay(client)
    relay.token_cache = True
    relay.tokens.capacity = 0  # nothing can be kept: every waiter asks in turn
    out: list[Any] = []
    async with trio.open_nursery() as nursery:
        for index in range(3):
            nursery.start_soon(_send, relay, f"c{index}", TOKEN, out)
    assert len(client.calls) == 3
    assert [r for r, *_ in out] == ["forwarded"] * 3


def _serve_all(queue: FairQueue) -> list[int]:
    out = []
    while (head := queue.head()) is not None:
        out.append(head)
        queue.remove(head)
    return out


@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=60))
def test_fair_queue_serves_each_caller_in_order_and_in_turn(arrivals: list[str]) -> None:
    queue = FairQueue()
    owner = {queue.enqueue(caller): caller for caller in arrivals}
    tickets = _serve_all(queue)
    served = [owner[ticket] for ticket in tickets]
    assert sorted(tickets) == sorted(owner)
    for caller in set(arrivals):
        mine = [ticket for ticket in tickets if owner[ticket] == caller]
        assert mine == sorted(mine)  # first come, first served within a caller
        positions = [i for i, who in enumerate(served) if who == caller]
        for first, second in itertools.pairwise(positions):
            between = served[first + 1 : second]
            still_waiting = set(served[first + 1 :]) - {caller}
            assert len(between) == len(set(between))  # nobody else went twice meanwhile
            assert set(between) == still_waiting  # and everyone waiting had a turn


@pytest.mark.parametrize("cancel_after", [0.0, 0.001, 0.5, 1.0, 1.2, 2.5])
async def test_cancelled_forwards_leave_nothing_behind(
    autojump_clock: trio.testing.MockClock, cancel_after: float
) -> None:
    client = FakePool(hold=True)
    relay = _relay(client, rate=1.0, queue_timeout=10.0)
    out: list[Any] = []
    with trio.move_on_after(cancel_after):
        async with trio.open_nursery() as nursery:
            for index in range(8):
                target = TOKEN if index % 2 else "/metadata/attested/document"
                nursery.start_soon(_send, relay, f"c{index % 3}", target, out)
    assert relay.waiting == 0
    assert sorted(relay.general.free) == [f"front-{i}" for i in range(4)]
    assert sorted(relay.identity_gate.free) == [f"identity-{i}" for i in range(5)]
    assert relay.identity.active == 0
    assert relay._fetching == {}
    assert relay.budget().waiting == 0


async def test_an_approval_goes_before_imdsds_normal_polls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = FakePool()
    relay = _relay(client, rate=1.0)
    budget = relay.budget()
    await budget.acquire()  # the slot of this second is taken
    order: list[str] = []

    async def poll() -> None:
        await budget.acquire()
        order.append("poll")

    async def approve() -> None:
        await relay.forward(
            _routed(Endpoint.SCHEDULED_EVENTS, "POST"),
            caller="agent",
            target="/metadata/scheduledevents?api-version=2020-07-01",
            headers=[("Metadata", "true")],
            body=b'{"StartRequests":[]}',
            on_queued=lambda: None,
        )
        order.append("approval")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.1)
        nursery.start_soon(approve)
    assert order == ["approval", "poll"]


@pytest.mark.parametrize("kind", [str, int])
def test_kept_tokens_count_expires_in_down(kind: type) -> None:
    cache = TokenCache()
    body = msgspec.json.encode(
        {"access_token": "t", "expires_in": kind(86399), "expires_on": str(1_086_399)}
    )
    cache.put(TOKEN, 200, (), body, now_wall=1_000_000)
    kept = cache.get(TOKEN, 1_050_000)
    assert kept is not None
    assert msgspec.json.decode(kept.body_at(1_050_000)) == {
        "access_token": "t",
        "expires_in": kind(36399),
        "expires_on": "1086399",
    }
    bare = TokenCache()
    bare.put(TOKEN, 200, (), _token_body(10_000), now_wall=0)
    kept = bare.get(TOKEN, 10)
    assert kept is not None
    assert kept.body_at(10) == _token_body(10_000)  # no expires_in: as IMDS sent it
