"""The keeper's write path: a cancel at any checkpoint, a failed save at any step (with a
restart after it), retries with backoff. What consumers saw is recorded across restarts: no
revision number may come back with other content, no change may be reported twice or lost."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from imdsd import persist
from imdsd.frames import ChangeFrame, GoneFrame
from imdsd.keeper import RETRY_FIRST, SAVE_TIMEOUT, StateKeeper, load_store
from imdsd.model import Instance, parse_instance

DATA = Path(__file__).resolve().parent / "data" / "instance-windows.json"
T = TypeVar("T")


def document(value: str) -> tuple[Instance, dict[str, Any]]:
    """The golden instance document with tag ``color`` set to ``value``."""
    doc = json.loads(DATA.read_text())
    doc["compute"]["tags"] = f"color:{value}"
    doc["compute"]["tagsList"] = [{"name": "color", "value": value}]
    return parse_instance(json.dumps(doc).encode())


def color(keeper: StateKeeper) -> str | None:
    """The ``color`` tag of the published snapshot."""
    snapshot = keeper.snapshot
    if snapshot is None or snapshot.instance_raw is None:
        return None
    return str(snapshot.instance_raw["compute"]["tagsList"][0]["value"])


async def inline(fn: Callable[..., T], *args: Any, **_options: Any) -> T:
    """``trio.to_thread.run_sync`` in the trio thread (a save is then one checkpoint)."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


class Consumers:
    """A watcher that resumes across restarts (``since`` its last revision, a resync on gone),
    plus readers checking that a revision always comes with the same content."""

    def __init__(self) -> None:
        self.content: dict[int, str | None] = {}
        self.revision: int | None = None
        self.color: str | None = None
        self.walked: list[str | None] = []
        self.resyncs = 0

    def attach(self, keeper: StateKeeper) -> None:
        """Resume from ``keeper`` (after a start or restart), then follow its frames."""
        self.look(keeper)
        found = None if self.revision is None else keeper.frames_since(self.revision)
        if not isinstance(found, list):
            self.resyncs += self.revision is not None
            self.revision, self.color = keeper.revision, color(keeper)
            self.walked.append(self.color)
            found = []
        for frame in found:
            self.follow(frame)
        keeper.listeners.append(self.follow)

    def follow(self, frame: ChangeFrame) -> None:
        """One change frame: it must continue from exactly what was seen before."""
        assert self.revision is not None
        assert frame.revision > self.revision
        for change in frame.changes:
            assert change.old == self.color, f"{change.old} -> {change.new} after {self.color}"
            self.color = change.new
            self.walked.append(self.color)
        self.revision = frame.revision

    def look(self, keeper: StateKeeper) -> None:
        """A read: the published revision must always come with the same content."""
        seen = self.content.setdefault(keeper.revision, color(keeper))
        assert seen == color(keeper), f"revision {keeper.revision} reused with other content"

    def changes(self) -> list[tuple[str | None, str | None]]:
        """Every change walked through, old -> new."""
        return list(zip(self.walked, self.walked[1:], strict=False))


async def start(directory: Path) -> StateKeeper:
    """A keeper continuing from ``directory``, as the daemon starts one."""
    return StateKeeper(load_store(str(directory), 64), str(directory))


# ------------------------------------------------------------------- cancellation


class CancellingSaves:
    """A stand-in for ``trio.to_thread.run_sync`` with checkpoints before and after the
    save; it cancels ``scope`` at checkpoint number ``cancel_at`` (counted over all calls)."""

    def __init__(self, cancel_at: int) -> None:
        self.cancel_at = cancel_at
        self.count = 0
        self.scope: trio.CancelScope | None = None

    async def _checkpoint(self) -> None:
        if self.count == self.cancel_at and self.scope is not None:
            self.scope.cancel()
        self.count += 1
        await trio.lowlevel.checkpoint()

    async def run_sync(self, fn: Callable[..., T], *args: Any, **_options: Any) -> T:
        await self._checkpoint()
        result = fn(*args)
        await self._checkpoint()
        return result


async def test_a_cancel_at_any_checkpoint_of_the_write_path_loses_no_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poller cancelled while its change is saved (e.g. by a SIGHUP) must not orphan it:
    the change is published and saved exactly once, by this poll or by the next ones."""
    probe = CancellingSaves(-1)
    monkeypatch.setattr(trio.to_thread, "run_sync", probe.run_sync)
    keeper = await start(tmp_path / "probe")
    await keeper.instance(*document("blue"))
    checkpoints = probe.count
    assert checkpoints >= 2
    for cancel_at in range(-1, checkpoints + 1):
        directory = tmp_path / f"cancel-{cancel_at}"
        monkeypatch.setattr(trio.to_thread, "run_sync", inline)
        keeper = await start(directory)
        await keeper.instance(*document("blue"))
        consumers = Consumers()
        consumers.attach(keeper)
        saves = CancellingSaves(cancel_at)
        monkeypatch.setattr(trio.to_thread, "run_sync", saves.run_sync)
        with trio.CancelScope() as scope:
            if cancel_at == -1:
                scope.cancel()  # already cancelled while waiting for the keeper's lock
            saves.scope = scope
            await keeper.instance(*document("red"))
        consumers.look(keeper)
        monkeypatch.setattr(trio.to_thread, "run_sync", inline)
        await keeper.instance(*document("red"))  # the usual poll: the same document again
        assert await keeper.flush()
        consumers.look(keeper)
        assert (color(keeper), keeper.revision) == ("red", 2), f"cancel at {cancel_at}"
        assert consumers.changes() == [("blue", "red")], f"cancel at {cancel_at}"
        restarted = await start(directory)
        assert (restarted.snapshot, restarted.revision) == (keeper.snapshot, 2)


# ------------------------------------------------------------------- failing saves


class FailingOps(persist._FileOps):
    """Real file operations, except call number ``fail_at`` which fails with ``code``
    (after writing part of its buffer, for a write: a disk that fills up mid-write)."""

    def __init__(self, fail_at: int, code: int) -> None:
        self.fail_at = fail_at
        self.code = code
        self.calls = 0

    def _fails(self) -> bool:
        self.calls += 1
        return self.calls == self.fail_at

    def _error(self) -> OSError:
        return OSError(self.code, os.strerror(self.code))

    def open_new(self, path: str) -> int:
        if self._fails():
            raise self._error()
        return super().open_new(path)

    def open_append(self, path: str) -> int:
        if self._fails():
            raise self._error()
        return super().open_append(path)

    def write(self, fd: int, data: memoryview) -> int:
        if self._fails():
            os.write(fd, data[: len(data) // 2])
            raise self._error()
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        if self._fails():
            raise self._error()
        super().fsync(fd)

    def close(self, fd: int) -> None:
        failed = self._fails()
        super().close(fd)
        if failed:
            raise self._error()

    def replace(self, source: str, target: str) -> None:
        if self._fails():
            raise self._error()
        super().replace(source, target)

    def unlink(self, path: str) -> None:
        if self._fails():
            raise self._error()
        super().unlink(path)

    def fsync_directory(self, path: str) -> None:
        if self._fails():
            raise self._error()
        super().fsync_directory(path)


async def _two_changes(keeper: StateKeeper, consumers: Consumers) -> None:
    for value in ("red", "green"):
        await keeper.instance(*document(value))
        consumers.look(keeper)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
async def test_a_failed_save_at_any_step_then_a_restart_reuses_no_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Disk full, read-only or unwritable at any step of a save, then a restart: consumers are
    never shown a revision that is not on disk, so no number comes back with other content
    and every change is reported exactly once."""
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    probe = FailingOps(0, code)
    directory = tmp_path / "probe"
    keeper = await start(directory)
    await keeper.instance(*document("blue"))
    keeper = await start(directory)
    monkeypatch.setattr(persist, "_ops", probe)
    await _two_changes(keeper, Consumers())
    monkeypatch.setattr(persist, "_ops", persist._FileOps())
    steps = probe.calls
    assert steps >= 12, "a whole save and a journal record"
    for fail_at in range(1, steps + 1):
        directory = tmp_path / f"fail-{fail_at}"
        consumers = Consumers()
        keeper = await start(directory)
        await keeper.instance(*document("blue"))
        keeper = await start(directory)
        consumers.attach(keeper)
        monkeypatch.setattr(persist, "_ops", FailingOps(fail_at, code))
        with capture_logs():
            await _two_changes(keeper, consumers)
        monkeypatch.setattr(persist, "_ops", persist._FileOps())
        assert keeper.save_failures == 1, f"step {fail_at}"
        with capture_logs():
            keeper = await start(directory)  # the restart
        consumers.attach(keeper)
        await keeper.instance(*document("green"))  # upstream still says green
        consumers.look(keeper)
        await keeper.instance(*document("yellow"))
        consumers.look(keeper)
        assert consumers.walked[0] == "blue"
        assert consumers.walked[-2:] == ["green", "yellow"], f"step {fail_at}"
        assert consumers.color == color(keeper) == "yellow"
        assert consumers.resyncs == 0, (
            f"step {fail_at}: a save that failed after the mark keeps the history"
        )


async def test_a_failed_save_publishes_nothing_and_is_retried_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    keeper = await start(tmp_path)
    await keeper.instance(*document("blue"))
    consumers = Consumers()
    consumers.attach(keeper)

    class Full(persist._FileOps):
        def open_new(self, path: str) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def open_append(self, path: str) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(persist, "_ops", Full())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run_saver)
        with capture_logs() as logs:
            await keeper.instance(*document("red"))
            assert (keeper.revision, color(keeper)) == (1, "blue")
            assert keeper.save_status()["ok"] is False
            assert "No space left on device" in str(keeper.save_error)
            assert keeper.save_status()["unsaved_revisions"] == 1
            await trio.sleep(RETRY_FIRST * 7.5)  # retries after 1, 2 and 4 seconds
        assert keeper.save_failures == 4
        assert [log["retry_in"] for log in logs if log["event"].startswith("state not")] == [
            1.0,
            2.0,
            4.0,
            8.0,
        ]
        await keeper.instance(*document("red"))  # polls in the backoff do not save
        assert keeper.save_failures == 4
        consumers.look(keeper)
        monkeypatch.setattr(persist, "_ops", persist._FileOps())
        await trio.sleep(RETRY_FIRST * 8)
        consumers.look(keeper)
        assert (keeper.revision, color(keeper), keeper.save_error) == (2, "red", None)
        assert consumers.changes() == [("blue", "red")]
        nursery.cancel_scope.cancel()
    restarted = await start(tmp_path)
    assert (restarted.revision, color(restarted)) == (2, "red")


# ------------------------------------------------------------------- cost of a revision


class CountingOps(persist._FileOps):
    """Real file operations that count the bytes written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, fd: int, data: memoryview) -> int:
        done = super().write(fd, data)
        self.written += done
        return done


def big_document(value: str, tags: int = 2000) -> tuple[Instance, dict[str, Any]]:
    """The golden instance document with ``tags`` tags; tag ``color`` is ``value``."""
    doc = json.loads(DATA.read_text())
    pairs = [("color", value), *((f"tag{i:05d}", f"value-{i}") for i in range(tags))]
    doc["compute"]["tags"] = ";".join(f"{k}:{v}" for k, v in pairs)
    doc["compute"]["tagsList"] = [{"name": k, "value": v} for k, v in pairs]
    return parse_instance(json.dumps(doc).encode())


async def test_saving_a_revision_costs_in_proportion_to_the_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One tag changing in a 2000-tag document, over and over: every revision writes about
    what changed, however long the history and however large the document."""
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    keeper = await start(tmp_path)
    for n in range(30):
        await keeper.instance(*big_document(str(n)))
    size = sum(entry.stat().st_size for entry in os.scandir(tmp_path))
    assert size > 100_000
    counting = CountingOps()
    monkeypatch.setattr(persist, "_ops", counting)
    for n in range(30, 40):
        await keeper.instance(*big_document(str(n)))
    assert keeper.revision == 40
    assert counting.written / 10 < 2_000, "bytes written per revision"


async def test_a_hung_save_is_given_up_after_the_timeout_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """The shielded save is bounded: a disk that never answers cannot hang a poller or the
    shutdown; the change stays unpublished and the saver retries it."""
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    keeper = await start(tmp_path)
    await keeper.instance(*document("blue"))

    async def hung(fn: Callable[..., T], *args: Any, **_options: Any) -> T:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(trio.to_thread, "run_sync", hung)
    started = trio.current_time()
    with capture_logs():
        await keeper.instance(*document("red"))
        assert not await keeper.flush()
    assert trio.current_time() - started == pytest.approx(2 * SAVE_TIMEOUT)
    assert (keeper.revision, color(keeper), keeper.save_failures) == (1, "blue", 2)
    assert "took over" in str(keeper.save_error)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    assert await keeper.flush()
    assert (keeper.revision, color(keeper)) == (2, "red")


async def test_an_unexpected_error_in_a_save_is_a_failed_save_not_a_dead_saver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    keeper = await start(tmp_path)
    await keeper.instance(*document("blue"))

    async def broken(fn: Callable[..., T], *args: Any, **_options: Any) -> T:
        raise RecursionError("maximum recursion depth exceeded while encoding")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run_saver)
        monkeypatch.setattr(trio.to_thread, "run_sync", broken)
        with capture_logs() as logs:
            await keeper.instance(*document("red"))
            await trio.sleep(RETRY_FIRST * 1.5)
        assert keeper.save_failures == 2, "retried by the saver"
        assert str(keeper.save_error).startswith("RecursionError: maximum recursion")
        assert "state save failed unexpectedly" in [log["event"] for log in logs]
        assert (keeper.revision, color(keeper)) == (1, "blue")
        monkeypatch.setattr(trio.to_thread, "run_sync", inline)
        await trio.sleep(RETRY_FIRST * 2)
        assert (keeper.revision, color(keeper), keeper.save_error) == (2, "red", None)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------- a kill in the mark's gap


class KilledAfterTheMark(persist._FileOps):
    """Real file operations until the journal is opened, after the revision mark was raised:
    the process dies there (SIGKILL between the two writes of a save)."""

    def open_append(self, path: str) -> int:
        raise KeyboardInterrupt("killed")


async def test_a_kill_between_the_mark_and_the_record_keeps_history_and_hook_deliveries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook pending at revision 2, then a kill after the mark was raised to 3 but before the
    journal held revision 3: after a restart the hook still gets revision 2's change, a watcher
    at revision 2 (what was published) resumes without gone, and nothing is reused."""
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    keeper = await start(tmp_path)
    await keeper.instance(*document("blue"))
    keeper.mark_delivered("remount", 1)
    await keeper.instance(*document("red"))
    assert (keeper.revision, keeper.delivered("remount")) == (2, 1)
    watcher = Consumers()
    watcher.attach(keeper)
    monkeypatch.setattr(persist, "_ops", KilledAfterTheMark())
    with pytest.raises(KeyboardInterrupt), capture_logs():
        await keeper.instance(*document("green"))
    monkeypatch.setattr(persist, "_ops", persist._FileOps())
    assert persist.read_mark(str(tmp_path)) == 3, "died in the gap"

    with capture_logs():
        keeper = await start(tmp_path)
    assert keeper.delivered("remount") == 1
    pending = keeper.frames_since(1)  # what the hook dispatcher asks for
    assert isinstance(pending, list), "the hook's pending revision is still there"
    [pending_frame] = pending
    assert (pending_frame.revision, [(c.old, c.new) for c in pending_frame.changes]) == (
        2,
        [("blue", "red")],
    )
    assert keeper.frames_since(3) == GoneFrame(oldest=1), "3 was never published"
    watcher.attach(keeper)
    assert watcher.resyncs == 0
    assert (keeper.revision, color(keeper)) == (4, "red"), "above the mark, with what was saved"
    await keeper.instance(*document("green"))
    watcher.look(keeper)
    assert watcher.changes() == [("red", "green")]
    assert keeper.revision == 5

    keeper = await start(tmp_path)  # the gap is remembered across the next restart
    assert keeper.frames_since(3) == GoneFrame(oldest=1)
    kept = keeper.frames_since(1)
    assert isinstance(kept, list)
    assert [frame.revision for frame in kept] == [2, 5]
