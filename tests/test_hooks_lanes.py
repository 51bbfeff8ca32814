"""Hooks of one ``<kind>.d/`` directory run one after another, in lexical order (run-parts)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs
from test_hooks_dispatcher import Recorder, _dispatcher, running, until
from test_hooks_support import FakeLedger, change, tag

from imdsd.frames import Change, ChangeFrame, decode_frame
from imdsd.hooks import dispatcher as dispatcher_module
from imdsd.hooks.model import Hook
from imdsd.hooks.runner import RunResult
from imdsd.hooks.sources import scan_directory

NAMES = ["10-mount", "20-format", "30-use"]


def _runs(recorders: dict[str, Recorder]) -> list[tuple[float, float, str]]:
    """Every run as (start, end, name), ordered by start."""
    out = []
    for name, rec in recorders.items():
        starts = [r["start"] for r in rec.runs()]
        ends = rec.ends()
        assert len(starts) == len(ends), f"{name}: a run did not finish"
        out += [(s, e, name) for s, e in zip(starts, ends, strict=True)]
    return sorted(out)


def _assert_sequential(runs: list[tuple[float, float, str]]) -> None:
    for (_, end, before), (start, _, after) in itertools.pairwise(runs):
        assert start >= end, f"{after} started before {before} ended: {runs}"


def _lane(tmp_path: Path, **fails: int) -> dict[str, Recorder]:
    (tmp_path / "disks.d").mkdir()
    directory = tmp_path / "disks.d"
    # created in reverse so directory order (and creation order) is not lexical order
    return {
        name: Recorder(directory, name, sleep=0.02, fail_times=fails.get(name, 0))
        for name in reversed(NAMES)
    }


def _disk(i: int) -> Change:
    return change("disks", "attached", f"lun:{i}", new={"lun": i})


async def test_directory_hooks_run_one_after_another_in_lexical_order(tmp_path: Path) -> None:
    recorders = _lane(tmp_path)
    hooks = scan_directory(str(tmp_path), euid=0, debounce=0.0, retries=0)
    ledger = FakeLedger()
    async with running(_dispatcher(hooks, ledger, max_parallel=8)):
        mount, use = recorders["10-mount"], recorders["30-use"]
        for i in range(12):
            ledger.append(_disk(i))
            if i % 3 == 0:  # wait for the pass to end
                await until(lambda: all(ledger.delivered(n) == ledger.revision for n in NAMES))
            elif i % 3 == 1:  # store the next change in the middle of a pass
                await until(lambda: len(mount.runs()) > len(use.runs()))
        await until(lambda: all(ledger.delivered(n) == ledger.revision for n in NAMES))
    runs = _runs(recorders)
    names = [name for _, _, name in runs]
    assert len(names) >= 3 * 5
    assert names == NAMES * (len(names) // 3)
    _assert_sequential(runs)
    for rec in recorders.values():  # every hook got every disk, coalesced or not
        luns = {c["key"] for r in rec.runs() for c in r["frame"]["changes"]}
        assert luns == {f"lun:{i}" for i in range(12)}
    passes = zip(*(recorders[name].runs() for name in NAMES), strict=True)
    for runs_of_a_pass in passes:  # a pass delivers the same changes to each hook, in order
        frames = [run["frame"] for run in runs_of_a_pass]
        assert all(frame == frames[0] for frame in frames), frames


async def test_a_failing_directory_hook_does_not_stop_the_next_and_is_retried_alone(
    tmp_path: Path,
) -> None:
    recorders = _lane(tmp_path, **{"20-format": 1})
    hooks = scan_directory(str(tmp_path), euid=0, debounce=0.0, retries=2)
    ledger = FakeLedger()
    with capture_logs() as logs:
        async with running(_dispatcher(hooks, ledger)):
            ledger.append(_disk(0))
            await until(lambda: all(ledger.delivered(n) == 1 for n in NAMES))
    runs = _runs(recorders)
    assert [name for _, _, name in runs] == ["10-mount", "20-format", "30-use", "20-format"]
    _assert_sequential(runs)
    failed = [e["hook"] for e in logs if e["event"] == "hook failed"]
    assert failed == ["20-format"]


async def test_lanes_of_different_kinds_and_config_hooks_run_independently(
    tmp_path: Path,
) -> None:
    (tmp_path / "disks.d").mkdir()
    (tmp_path / "tags.d").mkdir()
    slow = Recorder(tmp_path / "disks.d", "10-slow", sleep=0.5)
    quick = Recorder(tmp_path / "tags.d", "10-quick")
    hooks = scan_directory(str(tmp_path), euid=0, debounce=0.0)
    ledger = FakeLedger()
    async with running(_dispatcher(hooks, ledger)):
        ledger.append(_disk(0), tag("added", "a", new="1"))
        await until(lambda: ledger.delivered("10-quick") == 1)
        assert slow.ends() == []  # the tags lane did not wait for the disks lane
        await until(lambda: ledger.delivered("10-slow") == 1)
    assert len(quick.runs()) == len(slow.runs()) == 1


async def test_a_lane_follows_reloads(tmp_path: Path) -> None:
    recorders = _lane(tmp_path)
    ledger = FakeLedger()
    dispatcher = _dispatcher(scan_directory(str(tmp_path), euid=0, debounce=0.0), ledger)
    async with running(dispatcher):
        ledger.append(_disk(0))
        await until(lambda: all(ledger.delivered(n) == 1 for n in NAMES))
        (tmp_path / "disks.d" / "20-format").unlink()
        dispatcher.replace_hooks(scan_directory(str(tmp_path), euid=0, debounce=0.0))
        assert [h.name for h in dispatcher.hooks] == ["10-mount", "30-use"]
        ledger.append(_disk(1))
        await until(lambda: all(ledger.delivered(n) == 2 for n in ("10-mount", "30-use")))
    runs = _runs(recorders)
    assert [n for _, _, n in runs] == [*NAMES, "10-mount", "30-use"]
    _assert_sequential(runs)


class _FakeRuns:
    """Stands in for the process runner: each run takes a random time and fails as scripted."""

    def __init__(self, rng: random.Random, failing: dict[str, int]) -> None:
        self.rng = rng
        self.failing = dict(failing)
        self.runs: list[tuple[float, float, str, ChangeFrame, bool]] = []

    async def __call__(self, argv: list[str], stdin: bytes, *_: Any, **__: Any) -> RunResult:
        name = Path(argv[0]).name
        frame = decode_frame(stdin)
        assert isinstance(frame, ChangeFrame)
        start = trio.current_time()
        await trio.sleep(self.rng.uniform(0.01, 0.5))
        ok = self.failing.get(name, 0) == 0
        if not ok:
            self.failing[name] -= 1
        self.runs.append((start, trio.current_time(), name, frame, ok))
        return RunResult(exit_code=0 if ok else 1, timed_out=False, duration=0.1)


@pytest.mark.parametrize("seed", range(25))
async def test_lane_invariants_under_random_timing_and_failures(
    seed: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Whatever the timing: runs never overlap, a hook that never fails sees each change before
    the later hooks of the directory do, and every hook gets every change."""
    rng = random.Random(seed)
    names = [f"{10 * (i + 1)}-{rng.choice('abcdef')}" for i in range(rng.randint(2, 5))]
    failing = {name: rng.choice([0, 0, 1, 2]) for name in names}
    fake = _FakeRuns(rng, failing)
    monkeypatch.setattr(dispatcher_module, "run_hook_process", fake)
    monkeypatch.setattr(dispatcher_module, "check_hook_file", lambda path, euid: None)
    hooks = [
        Hook(
            name=name,
            kinds=frozenset({"disks"}),
            command=(str(tmp_path / "disks.d" / name),),
            debounce=rng.choice([0.0, 0.2, 1.0]),
            retries=5,
            directory_kind="disks",
        )
        for name in rng.sample(names, len(names))
    ]
    ledger = FakeLedger()
    changes = 30
    async with running(_dispatcher(hooks, ledger, max_parallel=rng.randint(1, 4))):
        for i in range(changes):
            await trio.sleep(rng.choice([0.0, 0.05, 0.3, 2.0]))
            ledger.append(_disk(i))
        with trio.fail_after(600):
            while not all(ledger.delivered(n) == ledger.revision for n in names):
                await trio.sleep(1)
    runs = sorted(fake.runs, key=lambda r: r[0])
    for before, after in itertools.pairwise(runs):
        assert after[0] >= before[1], "runs of one directory overlapped"
    first_seen: dict[str, dict[str, float]] = {n: {} for n in names}
    for start, _, name, frame, _ in runs:
        for c in frame.changes:
            first_seen[name].setdefault(c.key, start)
    everything = {f"lun:{i}" for i in range(changes)}
    for name in names:
        assert set(first_seen[name]) == everything, name
    steady = [n for n in sorted(names) if not failing[n]]
    for early, late in itertools.combinations(steady, 2):
        assert all(first_seen[early][k] < first_seen[late][k] for k in everything), (early, late)


@pytest.mark.parametrize("seed", range(10))
async def test_leftovers_are_swept_only_while_no_hook_runs(
    seed: int, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """The sweep kills every hook process outside the daemon's session: a hook started just
    before it would be killed too, so it must see no run in progress when it looks."""
    rng = random.Random(seed)
    fake = _FakeRuns(rng, {})
    sweeps: list[int] = []

    async def sweep(kill_grace: float) -> int:
        sweeps.append(dispatcher._running)
        return 0

    monkeypatch.setattr(dispatcher_module, "run_hook_process", fake)
    monkeypatch.setattr(dispatcher_module, "sweep_orphans", sweep)
    hooks = [
        Hook(name=n, kinds=frozenset({"tags"}), command=(n,), debounce=rng.choice([0.0, 0.1]))
        for n in ("a", "b", "c")
    ]
    ledger = FakeLedger()
    dispatcher = _dispatcher(hooks, ledger, max_parallel=3)
    dispatcher.adopt_orphans = True
    async with running(dispatcher):
        for i in range(40):
            await trio.sleep(rng.choice([0.0, 0.01, 0.1, 0.5]))
            ledger.append(tag("added", f"k{i}", new="1"))
        while not all(ledger.delivered(n) == ledger.revision for n in "abc"):
            await trio.sleep(1)
    assert sweeps
    assert set(sweeps) == {0}
