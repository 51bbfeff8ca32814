"""Resilience: upstream faults, SIGKILLs during changes, watchers that never read.

- The fault matrix runs the daemon and the emulator in one trio run under an autojumping
  MockClock (virtual minutes take real milliseconds); state saves run inline (see
  :func:`resilience_support.run_inline`).
- The SIGKILL and the stalled-watcher tests run ``imdsd run`` as a real process on the real
  clock.
"""

from __future__ import annotations

import errno
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
import trio
import trio.testing
from daemon_support import daemon, emulator, write_config
from emulator_support import Emulator
from resilience_support import (
    BIG_COUNT,
    FastWatcher,
    Follower,
    Sample,
    Sampler,
    drain_to_eof,
    metric,
    request,
    run_inline,
    running,
    slow_inline,
    stalled_watcher,
    vm_rss_kib,
)

from imdsd import persist
from imdsd.emulator.profiles import get_profile
from imdsd.frames import ChangeFrame, OverflowFrame, StateFrame, decode_frame
from imdsd.health import STALE_INTERVALS
from imdsd.httpio import ClientConnection, open_unix
from imdsd.keeper import RETRY_MAX
from imdsd.model import Snapshot
from imdsd.statelog import StateLog

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------- fault matrix

INTERVAL = 10.0  # poll.instance
RATE = 2.0  # imds.max_requests_per_second (the default)
STALE_AFTER = STALE_INTERVALS * INTERVAL
SLOT = 1 / RATE  # one budget slot: the most a request may wait for its turn
READ_TIMEOUT = 10.0  # imds.read_timeout (the default)
SEED = 12  # retry jitter; under MockClock each case then replays the same way


def _wrong_types() -> str:
    """The real instance document with one field of the wrong type (vmSize a number)."""
    document = get_profile("azure").default_instance()
    document["compute"]["vmSize"] = 42
    return msgspec.json.encode(document).decode()


@dataclass(frozen=True)
class FaultCase:
    """Fault specs queued together, cleared after ``duration`` seconds; ``worst`` is the
    instance health expected at the fault's height."""

    specs: tuple[dict[str, Any], ...]
    duration: float
    worst: Literal["degraded", "stale"]


FAULTS = {
    "429-storm": FaultCase(({"status": 429, "count": BIG_COUNT},), 45.0, "stale"),
    "410-for-70s": FaultCase(({"status": 410, "count": BIG_COUNT},), 70.0, "stale"),
    "5xx-bursts": FaultCase(
        (
            {"status": 500, "count": 4},
            {"status": 503, "count": 3, "retry_after": 2},
            {"status": 502, "count": 4},
            {"status": 504, "count": BIG_COUNT},
        ),
        15.0,
        "degraded",
    ),
    "stall-12s": FaultCase(({"delay": "12s", "count": BIG_COUNT},), 12.0, "degraded"),
    "connection-resets": FaultCase(({"reset": True, "count": BIG_COUNT},), 35.0, "stale"),
    "bad-json": FaultCase(({"body": "not json", "count": BIG_COUNT},), 15.0, "degraded"),
    "wrong-types": FaultCase(({"body": _wrong_types(), "count": BIG_COUNT},), 15.0, "degraded"),
    "over-1MiB": FaultCase(({"oversize": (1 << 20) + 1, "count": BIG_COUNT},), 15.0, "degraded"),
    "truncated": FaultCase(({"truncate": True, "count": BIG_COUNT},), 35.0, "stale"),
}


def _recovered(sample: Sample) -> bool:
    fresh = sample.stale == "false" and sample.instance == "ok"
    return fresh and "changed-during-fault" in sample.tags


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault_matrix(
    name: str,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serve the last good snapshot, flag degraded/stale, recover within one interval after
    the fault ends, never exceed the budget."""
    case = FAULTS[name]
    monkeypatch.setattr(trio.to_thread, "run_sync", run_inline)
    async with running(tmp_path, instance=INTERVAL, rate=RATE, seed=SEED) as run:
        sampler = Sampler(run, every=0.5)
        await run.next_instance_poll()  # the fault starts right after a good fetch
        good = await sampler.sample()
        assert (good.status, good.stale, good.instance) == (200, "false", "ok")
        await run.faults(list(case.specs))
        await run.emu.action(action="set_tag", name="changed-during-fault", value=name)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler.run_forever)
            await trio.sleep(case.duration)
            await run.clear_faults()
            ended = trio.current_time()
            with trio.fail_after(10 * INTERVAL):
                while not _recovered(last := await sampler.sample()):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        stats = await run.stats()
    samples = [s for s in sampler.samples if s.at <= last.at]
    during = [s for s in samples if s.at < ended]
    states = [s.instance for s in samples]
    first = {state: min(s.at for s in samples if s.instance == state) for state in set(states)}
    print(
        f"{name}: recovered {last.at - ended:.2f}s after the fault ended; "
        f"degraded at +{first['degraded'] - started:.1f}s"
        + (f", stale at +{first['stale'] - started:.1f}s" if "stale" in first else "")
        + f"; peak {stats['peak_rps']} req/s; answers {stats['by_status']}"
    )

    # the last good snapshot is served, unchanged, for as long as the fault lasts
    assert all(s.status == 200 for s in samples)
    assert {(s.tags, s.revision) for s in during} == {(good.tags, good.revision)}
    # health says what is going on; the stale header agrees with it
    for s in samples:
        assert (s.stale == "true") == (s.instance == "stale"), s
        assert s.instance == "ok" or s.health == "degraded", s
    # degraded from the first failed poll (a stalled one fails at its read timeout)
    assert first["degraded"] - started <= INTERVAL + READ_TIMEOUT + SLOT
    if case.worst == "stale":
        assert STALE_AFTER - 0.1 <= first["stale"] - started <= STALE_AFTER + 1
    else:
        assert "stale" not in first
    # the budget held throughout
    assert stats["peak_rps"] <= math.ceil(RATE)
    # recovery within one poll interval (plus one budget slot) of the fault's end
    recovery = last.at - ended
    assert recovery <= INTERVAL + SLOT


# ---------------------------------------------------------------------------- SIGKILL

KILLS = 20


def _mutations(rng: random.Random) -> list[tuple[dict[str, Any], tuple[str, str, str]]]:
    """Tags set, data disks attached and NICs added, shuffled; each with the change it makes."""
    plan: list[tuple[dict[str, Any], tuple[str, str, str]]] = []
    for i in range(12):
        plan.append(
            (
                {"action": "set_tag", "name": f"kill-{i}", "value": str(i)},
                ("tags", "added", f"kill-{i}"),
            )
        )
        plan.append(
            (
                {"action": "attach_disk", "lun": 20 + i, "size_gb": 8},
                ("disks", "attached", f"lun:{20 + i}"),
            )
        )
        mac = f"000D3A0000{i:02X}"
        plan.append(
            (
                {"action": "add_nic", "mac": mac, "private_ip": f"10.1.{i}.4"},
                ("network", "added", f"mac:{mac}"),
            )
        )
    rng.shuffle(plan)
    return plan


async def _mutate(
    emu: Emulator,
    plan: list[tuple[dict[str, Any], tuple[str, str, str]]],
    rng: random.Random,
    applied: list[tuple[str, str, str]],
) -> None:
    for spec, change in plan:
        await trio.sleep(rng.uniform(0.2, 1.0))
        await emu.action(**spec)
        applied.append(change)


def _loaded_revision(events: list[dict[str, Any]]) -> int:
    """The revision the ``state loaded`` log line reports."""
    loaded = [e for e in events if e.get("event") == "state loaded"]
    assert len(loaded) == 1, events[:5]
    revision: int = loaded[0]["revision"]
    return revision


def _no_discard(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``events``, after checking that no state file was discarded as bad."""
    assert not [e for e in events if e.get("event") == "state discarded"]
    return events


def _ready_from_disk(events: list[dict[str, Any]]) -> bool:
    """True when the process said ``ready`` before its first instance fetch, i.e. it served
    the persisted snapshot."""
    names = [
        "instance fetched"
        if e.get("event") == "upstream state changed" and e.get("endpoint") == "instance"
        else e.get("event")
        for e in events
    ]
    return "ready" in names and (
        "instance fetched" not in names or names.index("ready") < names.index("instance fetched")
    )


def _persisted(directory: Path) -> Snapshot | None:
    """The snapshot in the state file of ``directory`` (read as a restart would)."""
    return StateLog(str(directory), Snapshot).load().state.snapshot


async def test_sigkill_during_mutations_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """20 SIGKILLs at random moments while the VM changes: the state always loads, revisions
    never go back, resuming watchers see every revision once and every change once."""
    rng = random.Random(20240601)
    plan = _mutations(rng)
    applied: list[tuple[str, str, str]] = []
    polls, streams = Follower("long poll"), Follower("watch stream")
    loaded: list[int] = []
    async with emulator() as emu, trio.open_nursery() as nursery:
        config = write_config(tmp_path, emu.endpoint, instance="1s")
        socket_path = str(tmp_path / "imdsd.sock")
        async with daemon(config) as proc:
            await proc.wait_ready()
            # the first snapshot on disk (see test_instance_document_persisted_when_ready)
            with trio.fail_after(10):
                while (snapshot := _persisted(tmp_path / "state")) is None or (
                    snapshot.instance is None
                ):
                    await trio.sleep(0.05)
            state = msgspec.json.decode((await proc.get("/v1/state")).body)
            baseline = polls.since = streams.since = state["revision"]
            nursery.start_soon(polls.long_poll, socket_path)
            nursery.start_soon(streams.stream, socket_path)
            nursery.start_soon(_mutate, emu, plan, rng, applied)
            await trio.sleep(rng.uniform(0.2, 1.5))
            proc.process.kill()
            await proc.process.wait()
            loaded.append(_loaded_revision(_no_discard(proc.log_events())))
        for _ in range(KILLS - 1):
            async with daemon(config) as proc:
                await proc.wait_ready()
                state = msgspec.json.decode((await proc.get("/v1/state")).body)
                assert state["revision"] >= max([*polls.revisions, *streams.revisions, *loaded])
                await trio.sleep(rng.uniform(0.2, 1.5))
                proc.process.kill()
                await proc.process.wait()
                events = _no_discard(proc.log_events())
                assert _ready_from_disk(events), events
                loaded.append(_loaded_revision(events))
        async with daemon(config) as proc:
            await proc.wait_ready()
            with trio.fail_after(30):
                while len(applied) < len(plan) or not all(
                    follower.changes[change] for follower in (polls, streams) for change in applied
                ):
                    await trio.sleep(0.1)
            await trio.sleep(2)  # a few more polls of the final document
            reply = await proc.get(f"/v1/events?since={baseline}&wait=0s")
            assert await proc.stop() == 0
            events = _no_discard(proc.log_events())
            assert _ready_from_disk(events)
            loaded.append(_loaded_revision(events))
        nursery.cancel_scope.cancel()
    # the persisted revision never went back
    assert loaded == sorted(loaded)
    # every revision exactly once, in order, for both kinds of resuming watcher
    revisions = [frame["revision"] for frame in msgspec.json.decode(reply.body)["frames"]]
    assert polls.revisions == revisions
    assert streams.revisions == revisions
    # every change reported, none twice
    for follower in (polls, streams):
        assert sorted(follower.changes) == sorted(applied)
        assert set(follower.changes.values()) == {1}
    print(
        f"{KILLS} kills: loaded revisions {loaded}; {len(revisions)} change frames; "
        f"reconnects: long poll {polls.reconnects}, stream {streams.reconnects}"
    )


async def test_instance_document_persisted_when_ready(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the daemon says READY, a crash must not lose the instance document it serves."""
    monkeypatch.setattr(trio.to_thread, "run_sync", run_inline)
    async with running(tmp_path) as run:
        served = await run.get("/metadata/instance/compute/vmSize?format=text")
        snapshot = _persisted(tmp_path / "state")
    assert served.status == 200
    assert snapshot is not None
    assert snapshot.instance is not None


async def test_no_revision_is_served_before_it_is_on_disk(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a slow disk, no reader sees a revision the state file does not hold yet."""
    monkeypatch.setattr(trio.to_thread, "run_sync", slow_inline(2.0))
    async with running(tmp_path, instance=1.0) as run:
        await trio.sleep(5)  # every first save done
        before = run.daemon.keeper.revision
        await run.emu.action(action="set_tag", name="slow-disk", value="1")
        with trio.fail_after(10):
            while True:
                state = await run.get_json("/v1/state")
                events = await run.get_json(f"/v1/events?since={before}&wait=0s")
                served = max([state["revision"], *(f["revision"] for f in events["frames"])])
                if served > before:
                    break
                await trio.sleep(0.1)
        on_disk = StateLog(str(tmp_path / "state"), Snapshot).load().state.revision
    assert on_disk >= served


class _FullDisk(persist._FileOps):
    """Every new file or append fails: the state directory's filesystem is full."""

    def open_new(self, path: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_append(self, path: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


async def test_a_full_disk_keeps_the_last_saved_revision_and_health_says_so(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change that cannot be saved is not served; /v1/health is degraded with the reason
    and the metrics count the failures, until a retry succeeds."""
    monkeypatch.setattr(trio.to_thread, "run_sync", run_inline)
    async with running(tmp_path, instance=1.0) as run:
        await trio.sleep(5)
        before = run.daemon.keeper.revision
        assert (await run.get_json("/v1/health"))["status"] == "ok"
        monkeypatch.setattr(persist, "_ops", _FullDisk())
        await run.emu.action(action="set_tag", name="disk", value="full")
        await trio.sleep(10)
        assert (await run.get_json("/v1/state"))["revision"] == before
        assert (await run.get_json(f"/v1/events?since={before}&wait=0s"))["frames"] == []
        health = await run.get_json("/v1/health")
        assert health["status"] == "degraded"
        assert "No space left on device" in health["reason"]
        assert health["state_save"]["unsaved_revisions"] == 1
        text = (await run.get("/metrics")).body
        assert metric(text, "imdsd_state_save_failures_total") >= 2, "retried"
        assert metric(text, "imdsd_state_saved") == 0
        monkeypatch.setattr(persist, "_ops", persist._FileOps())
        await trio.sleep(RETRY_MAX + 5)
        state = await run.get_json("/v1/state")
        assert state["revision"] == before + 1
        tags = {t["name"]: t["value"] for t in state["instance"]["compute"]["tagsList"]}
        assert tags["disk"] == "full"
        assert (await run.get_json("/v1/health"))["status"] == "ok"
        text = (await run.get("/metrics")).body
        assert metric(text, "imdsd_state_saved") == 1
        assert metric(text, "imdsd_state_last_save_timestamp_seconds") > 0


# ---------------------------------------------------------------------------- watchers

STALLED = 100
FAST = 5
WRITE_TIMEOUT = 30.0  # imdsd.api.watch.Watchers default, not configurable
BLOB = 48 * 1024  # a tag value; every change frame carries its old and new value


async def _change_blob(emu: Emulator, count: int, every: float) -> None:
    """Give the ``blob`` tag a new ~48 KB value every ``every`` seconds."""
    for i in range(count):
        await emu.action(action="set_tag", name="blob", value=f"{i:06d}".ljust(BLOB, "x"))
        await trio.sleep(every)


async def _metrics(proc_socket: str) -> bytes:
    reply = await request(proc_socket, "/metrics")
    assert reply.status == 200
    return reply.body


async def test_stalled_watchers_cost_little_and_do_not_slow_the_fast_ones(tmp_path: Path) -> None:
    """100 watchers that never read: memory stays bounded, they are closed, and a few fast
    watchers get every change promptly meanwhile.

    Each change frame carries ~100 KB (a tag's old and new value), so a stalled watcher's
    socket (the daemon's send buffer, ~200 KiB) is full after its state frame and one
    change; from then on the daemon's memory must grow with the changes (history) only,
    not with changes times stalled watchers.
    """
    async with emulator() as emu:
        await emu.action(action="set_tag", name="blob", value="".ljust(BLOB, "x"))
        config = write_config(tmp_path, emu.endpoint, instance="1s", scheduled_events="0s")
        async with daemon(config) as proc, trio.open_nursery() as nursery:
            await proc.wait_ready()
            pid = proc.process.pid
            fast = [FastWatcher() for _ in range(FAST)]
            for watcher in fast:
                await nursery.start(watcher.run, proc.socket)
            rss_idle = vm_rss_kib(pid)
            stalled = [stalled_watcher(proc.socket) for _ in range(STALLED)]
            with trio.fail_after(10):
                while metric(await _metrics(proc.socket), "imdsd_watchers") < FAST + STALLED:
                    await trio.sleep(0.05)
            started = time.monotonic()
            nursery.start_soon(_change_blob, emu, 1000, 1.0)
            await trio.sleep(5)  # every stalled socket is full by now
            rss_stalled, changes_stalled = vm_rss_kib(pid), len(fast[0].revisions)
            rss_peak = rss_stalled
            with trio.fail_after(WRITE_TIMEOUT + 30):
                while metric(await _metrics(proc.socket), "imdsd_watchers") > FAST:
                    rss_peak = max(rss_peak, vm_rss_kib(pid))
                    await trio.sleep(0.25)
            closed_after = time.monotonic() - started
            changes_closed = len(fast[0].revisions)
            await trio.sleep(3)  # a few more changes with only the fast watchers left
            rss_after = vm_rss_kib(pid)
            metrics = await _metrics(proc.socket)
            last = msgspec.json.decode((await proc.get("/v1/state")).body)["revision"]
            with trio.fail_after(10):
                while any(not w.revisions or w.revisions[-1] < last for w in fast):
                    await trio.sleep(0.05)
            reply = await request(
                proc.socket, f"/v1/events?since={fast[0].state_revision}&wait=0s", max_body=1 << 30
            )
            nursery.cancel_scope.cancel()
        leftovers = [drain_to_eof(sock) for sock in stalled]
        for sock in stalled:
            sock.close()
    revisions = [f["revision"] for f in msgspec.json.decode(reply.body)["frames"]]
    latencies = sorted(latency for w in fast for latency in w.latencies)
    per_change = (rss_peak - rss_stalled) / max(1, changes_closed - changes_stalled)
    print(
        f"VmRSS: idle {rss_idle} KiB; {rss_stalled} KiB with {STALLED} stalled watchers "
        f"after {changes_stalled} changes; peak {rss_peak} KiB after {changes_closed} "
        f"({per_change:.0f} KiB per change meanwhile); {rss_after} KiB after they were closed "
        f"({closed_after:.1f}s after changes began). Fast watchers: {len(revisions)} changes, "
        f"latency p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms. imdsd_watch_overflows_total "
        f"{metric(metrics, 'imdsd_watch_overflows_total'):g}; bytes each stalled socket got "
        f"{min(map(len, leftovers))}..{max(map(len, leftovers))}"
    )
    # every stalled watcher was closed by the daemon (write timeout): its socket reads to EOF
    assert closed_after <= WRITE_TIMEOUT + 15
    assert metric(metrics, "imdsd_watchers") == FAST
    assert all(data.startswith(b"HTTP/1.1 200 ") for data in leftovers)
    # bounded memory: a stalled watcher costs its blocked write, not one copy per change
    assert rss_peak - rss_idle < 64 * 1024
    assert per_change < 2 * 1024  # < 20 KiB per stalled watcher per ~100 KB change
    # the fast watchers got every change, in order, promptly
    for watcher in fast:
        assert watcher.revisions == [r for r in revisions if r <= watcher.revisions[-1]]
    assert latencies[-1] < 1.0


MAX_PENDING = 4


async def test_watcher_that_falls_behind_gets_overflow_then_resumes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher that stops reading is overflowed (not fed forever); when it reads again it
    finds the overflow frame, and resuming from its revision loses and repeats nothing.

    The daemon's per-watcher queue is lowered from 1024 to 4 frames: at the pollers' at most
    few revisions per second, 1024 frames take longer than the 30 s write timeout, so with
    the defaults a stalled watcher is always closed by that timeout instead.
    """
    monkeypatch.setattr(trio.to_thread, "run_sync", run_inline)
    async with running(tmp_path, instance=1.0) as run, trio.open_nursery() as nursery:
        run.daemon.api.watchers.max_pending = MAX_PENDING
        fast = FastWatcher()
        await nursery.start(fast.run, run.socket)
        laggard = ClientConnection(await open_unix(run.socket, 5))
        head, next_line = await laggard.stream_lines("GET", "/v1/watch", [("host", "imdsd")])
        assert head.status == 200
        async with trio.open_nursery() as changes:
            changes.start_soon(_change_blob, run.emu, 1000, 1.0)
            with trio.fail_after(60):
                while run.daemon.keeper.broadcaster.overflows == 0:
                    await trio.sleep(0.1)
            changes.cancel_scope.cancel()
        frames = []
        while (line := await next_line()) is not None:
            frames.append(decode_frame(line))
        await laggard.aclose()
        last = run.daemon.keeper.revision
        resumed: list[int] = []
        overflow = frames[-1]
        assert isinstance(overflow, OverflowFrame)
        conn = ClientConnection(await open_unix(run.socket, 5))
        _, next_line = await conn.stream_lines(
            "GET", f"/v1/watch?since={overflow.revision}", [("host", "imdsd")]
        )
        with trio.fail_after(10):
            while not resumed or resumed[-1] < last:
                line = await next_line()
                assert line is not None
                frame = decode_frame(line)
                if isinstance(frame, ChangeFrame):
                    resumed.append(frame.revision)
            while not fast.revisions or fast.revisions[-1] < last:
                await trio.sleep(0.1)
        await conn.aclose()
        metrics = await run.get("/metrics")
        nursery.cancel_scope.cancel()
    assert isinstance(frames[0], StateFrame)
    before = [f.revision for f in frames if isinstance(f, ChangeFrame)]
    print(
        f"laggard: state {frames[0].revision}, changes {before}, overflow at "
        f"{overflow.revision}; resumed {resumed}; fast watcher {fast.revisions}"
    )
    assert overflow.revision == (before[-1] if before else frames[0].revision)
    assert before + resumed == fast.revisions
    assert len(fast.revisions) > MAX_PENDING
    assert metric(metrics.body, "imdsd_watch_overflows_total") == 1
