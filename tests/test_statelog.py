"""Tests for imdsd.statelog (journal beside a compacted state file) and for odd files in the
state directory."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs
from test_persist import NOW, CrashingOps, Killed, Snap, fake_diff

from imdsd import persist, statelog
from imdsd.persist import LoadedState, PersistError
from imdsd.statelog import JOURNAL_FILE, StateLog
from imdsd.store import PersistedState, Store


def make_store(state: PersistedState[Snap] | None = None, history: int = 8) -> Store[Snap]:
    return Store(diff=fake_diff, snapshot_type=Snap, history=history, state=state)


def step(store: Store[Snap], hook: bool = True) -> PersistedState[Snap]:
    """One more revision (tag ``rev`` and a growing ``seen`` tag), its hook mark moved."""
    tags = dict(store.snapshot.tags) if store.snapshot else {}
    tags["rev"] = str(store.revision + 1)
    tags[f"t{store.revision % 5}"] = "x" * (store.revision % 7)
    store.apply(Snap(tags=tags), NOW)
    if hook:
        store.mark_delivered("hook", store.revision - 1)
    return store.to_state()


def load(directory: Path) -> LoadedState[Snap]:
    return StateLog(str(directory), Snap).load()


def test_round_trip_through_records_and_compactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statelog, "COMPACT_MIN", 4000)
    log = StateLog(str(tmp_path), Snap)
    assert log.load().state == PersistedState()
    store = make_store()
    compactions = 0
    for _ in range(60):
        state = step(store)
        log.save(state)
        journal = tmp_path / JOURNAL_FILE
        compactions += not journal.exists()
        assert load(tmp_path).state == state
    assert compactions > 2
    assert journal.exists(), "most saves append a record"
    restarted = StateLog(str(tmp_path), Snap)
    assert restarted.load().state == state
    state = step(store, hook=False)
    restarted.save(state)
    assert load(tmp_path).state == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["revision", JOURNAL_FILE, "state.json"]


def test_a_record_costs_what_changed_not_the_whole_state(tmp_path: Path) -> None:
    log = StateLog(str(tmp_path), Snap)
    log.load()
    big = {f"tag{i:05d}": f"value-{i}" for i in range(10_000)}
    store = make_store(history=100)
    store.apply(Snap(tags=big), NOW)
    log.save(store.to_state())
    for n in range(20):
        store.apply(Snap(tags={**big, "tag00001": f"changed-{n}"}), NOW)
        before = (tmp_path / JOURNAL_FILE).stat().st_size if n else 0
        log.save(store.to_state())
        assert (tmp_path / JOURNAL_FILE).stat().st_size - before < 1000
    assert (tmp_path / "state.json").stat().st_size > 200_000
    assert load(tmp_path).state == store.to_state()


def _records(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize(
    ("damage", "kept"),
    [
        (lambda lines: [*lines[:-1], lines[-1][:-7]], 4),  # torn tail
        (lambda lines: [*lines[:-1], lines[-1].replace(b'"rev"', b'"reV"')], 4),  # bit rot
        (lambda lines: [*lines[:2], lines[3], lines[4]], 2),  # a record missing
        (lambda lines: [*lines, b"\x00" * 40], 5),  # zeros after a crash
    ],
)
def test_a_bad_journal_tail_is_ignored_and_the_next_save_compacts(
    tmp_path: Path, damage: Callable[[list[bytes]], list[bytes]], kept: int
) -> None:
    log = StateLog(str(tmp_path), Snap)
    log.load()
    store = make_store()
    states = [step(store)]
    log.save(states[0])
    for _ in range(5):
        states.append(step(store))
        log.save(states[-1])
    journal = tmp_path / JOURNAL_FILE
    journal.write_bytes(b"".join(damage(_records(journal))))
    restarted = StateLog(str(tmp_path), Snap)
    with capture_logs() as logs:
        loaded = restarted.load()
    expected = states[kept]
    assert loaded.state.snapshot == expected.snapshot
    if kept == 5:
        assert loaded.state == expected
    else:  # above the mark (numbers are not reused), the kept history whole, the rest gone
        mark = states[-1].revision
        gap = [(expected.revision, mark)]
        assert loaded.state == msgspec.structs.replace(expected, revision=mark + 1, gaps=gap)
        assert loaded.problem is not None
        assert "journal record after seq" in loaded.problem
        assert [log["event"] for log in logs] == ["journal_tail_ignored", "revision_from_mark"]
    resumed = make_store(loaded.state)
    restarted.save(step(resumed))
    assert not journal.exists(), "compacted"
    assert load(tmp_path).state == resumed.to_state()


class CrashingAppends(CrashingOps):
    """:class:`CrashingOps` covering the journal's calls too."""

    def open_append(self, path: str) -> int:
        if self._step():
            raise Killed
        fd = persist._FileOps.open_append(self, path)
        self.open_fds.add(fd)
        return fd

    def truncate(self, fd: int, length: int) -> None:
        if self._step():
            raise Killed
        super().truncate(fd, length)


def test_every_kill_point_of_a_save_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed at any file operation of a compaction or of an append: a restart loads the
    state before or after that save, and the revision never goes back."""
    rng = random.Random(5)
    probe = CrashingAppends(10**9, rng)
    monkeypatch.setattr(persist, "_ops", probe)
    log = StateLog(str(tmp_path / "probe"), Snap)
    log.load()
    store = make_store()
    log.save(step(store))
    log.save(step(store))
    monkeypatch.undo()
    assert probe.calls >= 17
    for kill_at in range(probe.calls + 1):
        directory = tmp_path / f"k{kill_at}"
        log = StateLog(str(directory), Snap)
        log.load()
        store = make_store()
        first, second = step(store), step(store)
        ops = CrashingAppends(kill_at, rng)
        monkeypatch.setattr(persist, "_ops", ops)
        saved = []
        try:
            for state in (first, second):
                log.save(state)
                saved.append(state)
        except Killed:
            pass
        finally:
            ops.release()
            monkeypatch.undo()
        loaded = load(directory).state
        if saved:
            assert loaded.revision >= saved[-1].revision
        if loaded.snapshot is None:
            assert not saved
            continue
        on_disk = int(loaded.snapshot.tags["rev"])
        state = (first, second)[on_disk - 1]
        assert on_disk >= len(saved)
        assert loaded.snapshot == state.snapshot
        if loaded.revision == on_disk:
            assert loaded == state
        else:  # the mark 2 is ahead of revision 1 on disk: continued above it, history whole
            assert loaded == msgspec.structs.replace(state, revision=3, gaps=[(1, 2)])


def test_a_format_1_state_file_still_loads(tmp_path: Path) -> None:
    store = make_store()
    for _ in range(3):
        state = step(store)
    payload = msgspec.json.encode(state)
    (tmp_path / "state.json").write_bytes(
        b'{"format":1,"sha256":"%s","written_at":"2025-01-01T00:00:00.000Z","state":%s}\n'
        % (hashlib.sha256(payload).hexdigest().encode(), payload)
    )
    log = StateLog(str(tmp_path), Snap)
    assert log.load() == LoadedState(state)
    log.save(step(store))
    assert load(tmp_path).state == store.to_state()


# ------------------------------------------------------------------ odd state files


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def _symlink_loop(path: Path) -> None:
    path.symlink_to(path.name)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


class Unreadable(persist._FileOps):
    """Opening ``name`` for reading fails with EACCES (mode 000 for a non-root daemon)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def open_read(self, path: str) -> int:
        if os.path.basename(path) == self.name:
            raise PermissionError(13, "Permission denied")
        return super().open_read(path)


ODD = {"directory": _directory, "symlink loop": _symlink_loop, "FIFO": _fifo, "socket": _socket}


def _load_within(directory: Path, seconds: float = 10) -> LoadedState[Snap]:
    """Load in a thread; fail (not hang) if it does not return in time."""
    result: list[LoadedState[Snap] | BaseException] = []

    def run() -> None:
        try:
            result.append(load(directory))
        except BaseException as exc:  # handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"loading {directory} hangs"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.mark.parametrize("name", ["state.json", JOURNAL_FILE, "revision"])
@pytest.mark.parametrize("kind", [*ODD, "mode 000"])
def test_odd_files_are_moved_aside_and_never_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, name: str
) -> None:
    log = StateLog(str(tmp_path), Snap)
    log.load()
    store = make_store()
    log.save(step(store))
    log.save(step(store))
    path = tmp_path / name
    if path.exists():
        path.unlink()
    if kind == "mode 000":
        path.write_bytes(b"{}")
        path.chmod(0)
        monkeypatch.setattr(persist, "_ops", Unreadable(name))
    else:
        ODD[kind](path)
    with capture_logs() as logs:
        loaded = _load_within(tmp_path)
    monkeypatch.undo()
    if name == "revision":  # the mark is only a safeguard: warned about, rewritten
        assert loaded.state == store.to_state()
        assert [log["event"] for log in logs] == ["revision_mark_unreadable"]
        assert str(path) in logs[0]["problem"]
        if stat.S_ISDIR(path.lstat().st_mode):
            return  # a directory where the mark goes: saves fail, named, until removed
    else:
        assert loaded.problem is not None
        assert str(path) in loaded.problem
        assert not os.path.lexists(path), "moved aside"
        # the next revision is above the mark 2: a lost state takes it as its baseline, a
        # lost journal (revision 1 left) continues above it with revision 2 a gap
        assert loaded.state.revision == (2 if name == "state.json" else 3)
    resumed = make_store(loaded.state)
    log = StateLog(str(tmp_path), Snap)
    log.load()
    log.save(step(resumed))
    assert load(tmp_path).state == resumed.to_state()


def test_an_odd_state_file_that_cannot_be_moved_fails_with_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class ReadOnly(persist._FileOps):
        def replace(self, source: str, target: str) -> None:
            raise OSError(30, "Read-only file system")

    os.mkfifo(tmp_path / "state.json")
    monkeypatch.setattr(persist, "_ops", ReadOnly())
    with capture_logs(), pytest.raises(PersistError) as raised:
        _load_within(tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    assert (
        message == f"{tmp_path / 'state.json'} is not a regular file (a FIFO); cannot move it aside"
    )
