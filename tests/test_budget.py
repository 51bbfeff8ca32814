"""Request budget: the sliding-window guarantee (pure core) and priority (trio shell)."""

from __future__ import annotations

import itertools
import math

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from imdsd.upstream.budget import Budget
from imdsd.upstream.budget_core import BudgetCore, Priority


def peak_in_window(starts: list[float], window: float = 1.0) -> int:
    """Most starts in any closed window of ``window`` seconds."""
    best = 0
    for i, start in enumerate(starts):
        count = sum(1 for other in starts[i:] if other - start <= window)
        best = max(best, count)
    return best


def greedy_starts(rate: float, count: int, arrivals: list[float] | None = None) -> list[float]:
    core = BudgetCore(rate)
    starts: list[float] = []
    now = 0.0
    for index in range(count):
        if arrivals is not None:
            now = max(now, arrivals[index])
        now = core.next_slot(now)
        core.commit(now)
        starts.append(now)
    return starts


@pytest.mark.parametrize(
    ("rate", "allowed"),
    [(0.5, 1), (1.0, 1), (1.5, 1), (2.0, 2), (2.5, 2), (3.0, 3), (4.0, 4)],
)
def test_peak_per_closed_window_never_exceeds_the_rate(rate: float, allowed: int) -> None:
    starts = greedy_starts(rate, 400)
    assert peak_in_window(starts) == allowed
    assert allowed <= max(rate, 1)


@pytest.mark.parametrize("rate", [0.5, 1.0, 2.0, 2.5, 4.0])
def test_spacing_prevents_bursts(rate: float) -> None:
    starts = greedy_starts(rate, 100)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 1 / rate - 1e-9


@pytest.mark.parametrize("rate", [0.5, 1.0, 2.0, 3.0, 4.0])
def test_long_run_throughput_is_close_to_the_rate(rate: float) -> None:
    starts = greedy_starts(rate, 200)
    achieved = (len(starts) - 1) / (starts[-1] - starts[0])
    per_window = math.floor(rate)
    expected = rate if per_window < 1 else per_window / (1 + BudgetCore(rate).margin)
    assert expected * 0.99 <= achieved <= rate


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]),
    gaps=st.lists(st.floats(min_value=0, max_value=3), min_size=1, max_size=60),
)
def test_any_arrival_pattern_respects_the_window(rate: float, gaps: list[float]) -> None:
    arrivals = []
    clock = 0.0
    for gap in gaps:
        clock += gap
        arrivals.append(clock)
    starts = greedy_starts(rate, len(arrivals), arrivals)
    assert peak_in_window(starts) <= max(1, math.floor(rate))
    assert all(b - a >= 1 / rate - 1e-9 for a, b in itertools.pairwise(starts))


RATES = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]


@settings(max_examples=200, deadline=None)
@given(
    old=st.sampled_from(RATES),
    new=st.sampled_from(RATES),
    gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=2, max_size=40),
    split=st.integers(min_value=1, max_value=39),
)
def test_a_new_rate_keeps_the_window(old: float, new: float, gaps: list[float], split: int) -> None:
    """Across set_rate (a reload), every window ending after it holds at most the new budget."""
    core = BudgetCore(old)
    starts: list[float] = []
    now = 0.0
    for index, gap in enumerate(gaps):
        if index == min(split, len(gaps) - 1):
            core.set_rate(new)
            reload_at = len(starts)
        now = core.next_slot(now + gap)
        core.commit(now)
        starts.append(now)
    assert core.rate == new
    allowed = max(1, math.floor(new))
    for index in range(reload_at, len(starts)):
        window = [t for t in starts[: index + 1] if starts[index] - t <= 1.0]
        assert len(window) <= allowed, (starts, reload_at)
    after = starts[reload_at - 1 : reload_at + 1]
    assert after[1] - after[0] >= 1 / new - 1e-9


async def test_set_rate_in_the_trio_shell_keeps_the_log(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = Budget(2.0)
    for _ in range(2):
        await budget.acquire()
    assert budget.in_use() == 2
    budget.set_rate(2.0)
    assert budget.in_use() == 2  # a reload forgets nothing
    start = trio.current_time()
    await budget.acquire()
    assert trio.current_time() - start == pytest.approx(0.55)  # 1 s + margin after the first
    budget.set_rate(4.0)
    await budget.acquire()
    assert trio.current_time() - start == pytest.approx(0.8)  # spacing 1/4 s from the last


def test_commit_before_the_slot_is_refused() -> None:
    core = BudgetCore(2.0)
    core.commit(10.0)
    assert core.next_slot(10.1) == 10.5
    with pytest.raises(ValueError, match="before the next slot"):
        core.commit(10.1)


def test_in_use_counts_the_last_second() -> None:
    core = BudgetCore(4.0)
    for at in (0.0, 0.25, 0.5, 0.75):
        core.commit(at)
    assert core.in_use(0.75) == 4
    assert core.in_use(1.1) == 3
    assert core.in_use(1.3) == 2
    assert core.in_use(5.0) == 0


@pytest.mark.parametrize("rate", [0.0, -1.0, math.inf, math.nan])
def test_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        BudgetCore(rate)


def test_core_queue_grants_in_priority_order() -> None:
    core = BudgetCore(1.0)
    low = core.enqueue(Priority.LOW, 0.0)
    normal = core.enqueue(Priority.NORMAL, 0.0)
    urgent = core.enqueue(Priority.URGENT, 0.0)
    assert core.head(0.0) == urgent
    assert not core.grant(low, 0.0)
    assert core.grant(urgent, 0.0)
    assert not core.grant(normal, 0.5)
    assert not core.grant(normal, 1.001)
    assert core.grant(normal, 1.05)
    core.cancel(low)
    assert core.head(2.0) is None
    assert core.waiting == 0


def test_long_waiters_are_promoted_and_served_first_come() -> None:
    core = BudgetCore(1.0, promote_after=3.0)
    low = core.enqueue(Priority.LOW, 0.0)
    assert core.next_promotion(0.0) == 3.0
    urgent = core.enqueue(Priority.URGENT, 2.5)
    assert core.head(2.9) == urgent
    assert core.head(3.0) == low  # promoted, and it came first
    assert core.next_promotion(3.0) == math.inf
    assert core.grant(low, 3.0)
    assert core.head(3.0) == urgent


async def test_trio_budget_orders_by_priority_and_paces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = Budget(2.0)
    order: list[tuple[str, float]] = []

    async def want(name: str, priority: Priority, delay: float) -> None:
        await trio.sleep(delay)
        async with budget.slot(priority):
            order.append((name, trio.current_time()))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(want, "first", Priority.LOW, 0)
        for index in range(3):
            nursery.start_soon(want, f"lb{index}", Priority.LOW, 0.01 + index / 1000)
        nursery.start_soon(want, "instance", Priority.NORMAL, 0.02)
        nursery.start_soon(want, "events", Priority.URGENT, 0.03)
    names = [name for name, _ in order]
    assert names == ["first", "events", "instance", "lb0", "lb1", "lb2"]
    times = [at - start for _, at in order]
    assert peak_in_window(times) <= 2
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(times))
    assert budget.core.granted == 6
    assert budget.waiting == 0


async def test_cancelled_waiter_frees_its_place(autojump_clock: trio.testing.MockClock) -> None:
    budget = Budget(1.0)
    await budget.acquire(Priority.NORMAL)
    got: list[str] = []

    async def waiter(name: str, priority: Priority, patience: float) -> None:
        with trio.move_on_after(patience):
            await budget.acquire(priority)
            got.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "urgent", Priority.URGENT, 0.1)
        await trio.sleep(0.2)
        nursery.start_soon(waiter, "normal", Priority.NORMAL, 5.0)
    assert got == ["normal"]
    assert budget.core.granted == 2
    assert budget.waiting == 0


async def test_a_saturated_budget_starves_nobody(autojump_clock: trio.testing.MockClock) -> None:
    budget = Budget(1.0)
    served: dict[str, int] = {"urgent": 0, "normal": 0, "low": 0}

    async def poll(name: str, priority: Priority) -> None:
        while True:
            await budget.acquire(priority)
            served[name] += 1
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll, "urgent", Priority.URGENT)
        nursery.start_soon(poll, "normal", Priority.NORMAL)
        nursery.start_soon(poll, "low", Priority.LOW)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert sum(served.values()) <= 61
    assert served["urgent"] > served["normal"] > 5
    assert served["low"] > 5
