"""Tests for imdsd.persist: format, atomic writes, corruption handling, crash safety."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from imdsd import persist
from imdsd.frames import Change, GoneFrame
from imdsd.persist import LoadedState, PersistError, load_state, save_state
from imdsd.store import PersistedState, Store

NOW = 1_700_000_000.0
REPO = Path(__file__).resolve().parents[1]


class Snap(msgspec.Struct, frozen=True):
    """A tiny stand-in for model.Snapshot."""

    tags: dict[str, str] = msgspec.field(default_factory=dict)


class Strict(msgspec.Struct, frozen=True):
    """A snapshot type whose shape the saved Snap files do not match."""

    required: int


def fake_diff(old: Snap, new: Snap) -> list[Change]:
    return [
        Change(kind="tags", op="modified", key=k, old=old.tags.get(k), new=new.tags.get(k))
        for k in sorted(old.tags.keys() | new.tags.keys())
        if old.tags.get(k) != new.tags.get(k)
    ]


def make_store(state: PersistedState[Snap] | None = None, history: int = 8) -> Store[Snap]:
    return Store(diff=fake_diff, snapshot_type=Snap, history=history, state=state)


def state_at(revision: int) -> PersistedState[Snap]:
    """A consistent state at ``revision`` whose snapshot and history record the revision."""
    store = make_store()
    store.apply(Snap(tags={"rev": "1"}), NOW)
    while store.revision < revision:
        store.apply(Snap(tags={"rev": str(store.revision + 1)}), NOW)
    store.mark_delivered("hook", max(0, revision - 1))
    return store.to_state()


def load(directory: Path) -> LoadedState[Snap]:
    return load_state(str(directory), Snap)


def test_missing_directory_is_a_fresh_start(tmp_path: Path) -> None:
    with capture_logs() as logs:
        loaded = load(tmp_path / "absent")
    assert loaded == LoadedState(PersistedState())
    assert logs == []


def test_round_trip(tmp_path: Path) -> None:
    state = state_at(6)
    assert state.history[0].changes
    save_state(str(tmp_path / "state"), state)
    assert load(tmp_path / "state") == LoadedState(state)


def test_round_trip_of_a_fresh_state(tmp_path: Path) -> None:
    save_state(str(tmp_path), PersistedState())
    assert load(tmp_path).state == PersistedState()


def test_file_format_modes_and_no_leftovers(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    save_state(str(directory), state_at(3))
    save_state(str(directory), state_at(4))
    assert sorted(os.listdir(directory)) == ["revision", "state.json"]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("revision", "state.json"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    document = msgspec.json.decode((directory / "state.json").read_bytes())
    assert document["format"] == 2
    assert document["seq"] == 0
    assert document["written_at"].endswith("Z")
    assert document["state"]["revision"] == 4
    raw = (directory / "state.json").read_bytes()
    payload = raw[raw.index(b'"state":') + len(b'"state":') : raw.rindex(b"}")]
    assert hashlib.sha256(payload).hexdigest() == document["sha256"]
    assert msgspec.json.decode((directory / "revision").read_bytes())["revision"] == 4


def test_leftover_temp_files_are_removed_on_load(tmp_path: Path) -> None:
    save_state(str(tmp_path), state_at(2))
    (tmp_path / ".state.json.abc.tmp").write_bytes(b"partial")
    (tmp_path / ".revision.abc.tmp").write_bytes(b"")
    (tmp_path / "unrelated.tmp").write_bytes(b"keep")
    assert load(tmp_path).state == state_at(2)
    assert sorted(os.listdir(tmp_path)) == ["revision", "state.json", "unrelated.tmp"]


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_a_bit_in_the_payload(data: bytes) -> bytes:
    at = data.index(b'"tags":{"rev":"') + len(b'"tags":{"rev":"')
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def reseal(data: bytes, edit: Callable[[dict[str, object]], None]) -> bytes:
    """Edit the state inside the envelope and fix the checksum, so only content is wrong."""
    document = msgspec.json.decode(data)
    edit(document["state"])
    payload = msgspec.json.encode(document["state"])
    document["sha256"] = hashlib.sha256(payload).hexdigest()
    return msgspec.json.encode(document)


def set_key(key: str, value: object) -> Callable[[bytes], bytes]:
    return lambda data: reseal(data, lambda state: state.__setitem__(key, value))


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (truncate, "invalid content"),
        (lambda data: b"", "file is empty"),
        (lambda data: b"\x00" * 100, "invalid content"),
        (lambda data: os.urandom(64) + b"\xff", "invalid content"),
        (flip_a_bit_in_the_payload, "checksum mismatch"),
        (lambda data: data.replace(b'"format":2', b'"format":3'), "unknown format version 3"),
        (lambda data: data.replace(b'"format":2', b'"format":"2"'), "invalid content"),
        (lambda data: b"[1, 2]", "invalid content"),
        (lambda data: b'{"format": 1}', "invalid content"),
        (set_key("oldest", 99), "oldest 99 is not within"),
        (set_key("snapshot", {"tags": 5}), "invalid content"),
        (set_key("hooks", {"hook": 42}), "delivered revision 42"),
    ],
)
def test_corrupt_state_is_moved_aside_and_revisions_continue(
    tmp_path: Path, corrupt: Callable[[bytes], bytes], problem: str
) -> None:
    save_state(str(tmp_path), state_at(5))
    path = tmp_path / "state.json"
    bad = corrupt(path.read_bytes())
    path.write_bytes(bad)
    with capture_logs() as logs:
        loaded = load(tmp_path)
    assert loaded.problem is not None
    assert problem in loaded.problem
    assert loaded.state == PersistedState(revision=5, oldest=5)
    assert loaded.moved_to is not None
    moved = Path(loaded.moved_to)
    assert moved.parent == tmp_path
    assert moved.name.startswith("state.json.corrupt-")
    assert moved.read_bytes() == bad
    assert not path.exists()
    assert [log["event"] for log in logs] == ["state_file_corrupt"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["revision"] == 5

    store = make_store(loaded.state)
    store.apply(Snap(tags={"after": "corruption"}), NOW)
    assert store.revision == 6
    save_state(str(tmp_path), store.to_state())
    assert load(tmp_path).state.revision == 6


def test_snapshot_type_change_is_treated_as_corrupt(tmp_path: Path) -> None:
    save_state(str(tmp_path), state_at(3))
    with capture_logs():
        loaded = load_state(str(tmp_path), Strict)
    assert loaded.problem is not None
    assert "invalid content" in loaded.problem
    assert loaded.state.revision == 3


def test_corrupt_state_without_a_mark_starts_at_zero(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"{")
    with capture_logs() as logs:
        loaded = load(tmp_path)
    assert loaded.state == PersistedState()
    assert loaded.problem is not None
    assert logs[0]["event"] == "state_file_corrupt"


def test_missing_state_file_continues_from_the_mark(tmp_path: Path) -> None:
    save_state(str(tmp_path), state_at(7))
    (tmp_path / "state.json").unlink()
    with capture_logs() as logs:
        loaded = load(tmp_path)
    assert loaded == LoadedState(PersistedState(revision=7, oldest=7))
    assert logs[0]["event"] == "state_file_missing"


def test_mark_ahead_of_the_state_continues_above_it_and_keeps_the_history(
    tmp_path: Path,
) -> None:
    # Killed between raising the mark (to 12) and writing the state holding revision 12: the
    # revisions 10..12 were never published, 9 and its history were.
    saved = state_at(9)
    save_state(str(tmp_path), saved)
    (tmp_path / "revision").write_bytes(persist._encode_mark(12))
    state = load(tmp_path).state
    assert state == msgspec.structs.replace(saved, revision=13, gaps=[(9, 12)])
    store = make_store(state)
    assert store.frames_since(saved.hooks["hook"]) == saved.history[-1:], "hooks still pending"
    assert store.frames_since(9) == [], "a client at the published revision is up to date"
    for since in (10, 11, 12):
        assert store.frames_since(since) == GoneFrame(oldest=saved.oldest), "never published"
    assert store.frames_since(13) == []


def test_mark_is_never_lowered(tmp_path: Path) -> None:
    save_state(str(tmp_path), state_at(9))
    save_state(str(tmp_path), state_at(4))
    assert load(tmp_path).state.revision == 10


@pytest.mark.parametrize(
    "mark",
    [
        b"",
        b"12",
        b'{"revision": 12, "sha256": "00"}',
        b'{"revision": -1, "sha256": "' + hashlib.sha256(b"-1").hexdigest().encode() + b'"}',
    ],
)
def test_bad_mark_is_ignored_and_rewritten(tmp_path: Path, mark: bytes) -> None:
    save_state(str(tmp_path), state_at(3))
    (tmp_path / "revision").write_bytes(mark)
    with capture_logs() as logs:
        loaded = load(tmp_path)
    assert loaded == LoadedState(state_at(3))
    assert [log["event"] for log in logs] == ["revision_mark_unreadable"]
    save_state(str(tmp_path), state_at(3))
    assert persist._read_mark(str(tmp_path)) == (3, None)


def test_only_the_newest_corrupt_files_are_kept(tmp_path: Path) -> None:
    contents = [f"bad {n}".encode() for n in range(persist.CORRUPT_KEPT + 3)]
    with capture_logs():
        for content in contents:
            (tmp_path / "state.json").write_bytes(content)
            load(tmp_path)
    kept = sorted(p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-"))
    assert len(kept) == persist.CORRUPT_KEPT
    assert {p.read_bytes() for p in kept} == set(contents[-persist.CORRUPT_KEPT :])


def test_save_errors_raise_persist_error_and_keep_the_old_state(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(PersistError, match="cannot save state in"):
        save_state(str(blocker / "state"), state_at(1))

    save_state(str(tmp_path), state_at(2))
    (tmp_path / "state.json").unlink()
    (tmp_path / "state.json").mkdir()
    with pytest.raises(PersistError, match="cannot save state"):
        save_state(str(tmp_path), state_at(3))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with capture_logs():
        loaded = load(tmp_path)
    assert loaded.problem is not None
    assert "is not a regular file (a directory)" in loaded.problem
    assert loaded.state == PersistedState(revision=3, oldest=3)


class ShortWrites(persist._FileOps):
    """Writes at most 7 bytes per call, as a signal-interrupted write may."""

    def write(self, fd: int, data: memoryview) -> int:
        return super().write(fd, data[:7])


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persist, "_ops", ShortWrites())
    save_state(str(tmp_path), state_at(4))
    monkeypatch.undo()
    assert load(tmp_path).state == state_at(4)


class Killed(BaseException):
    """The simulated SIGKILL: after it, the shim refuses every further call."""


class CrashingOps(persist._FileOps):
    """Performs real file operations until call number ``kill_at``, then dies in that call.

    A write at the kill point first writes a random prefix of its buffer (a torn write).
    """

    def __init__(self, kill_at: int, rng: random.Random) -> None:
        self.kill_at = kill_at
        self.rng = rng
        self.calls = 0
        self.open_fds: set[int] = set()

    def _step(self) -> bool:
        """True when this call is the one that dies (it may still act partially)."""
        if self.calls > self.kill_at:
            raise Killed
        self.calls += 1
        return self.calls > self.kill_at

    def open_new(self, path: str) -> int:
        if self._step():
            raise Killed
        fd = super().open_new(path)
        self.open_fds.add(fd)
        return fd

    def write(self, fd: int, data: memoryview) -> int:
        if self._step():
            os.write(fd, data[: self.rng.randrange(len(data) + 1)])
            raise Killed
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        if self._step():
            raise Killed
        super().fsync(fd)

    def close(self, fd: int) -> None:
        if self._step():
            raise Killed
        self.open_fds.discard(fd)
        super().close(fd)

    def replace(self, source: str, target: str) -> None:
        if self._step():
            raise Killed
        super().replace(source, target)

    def unlink(self, path: str) -> None:
        if self._step():
            raise Killed
        super().unlink(path)

    def fsync_directory(self, path: str) -> None:
        if self._step():
            raise Killed
        super().fsync_directory(path)

    def release(self) -> None:
        for fd in self.open_fds:
            os.close(fd)


def crashing_save(
    monkeypatch: pytest.MonkeyPatch,
    directory: Path,
    state: PersistedState[Snap],
    kill_at: int,
    rng: random.Random,
) -> bool:
    """Save with a writer killed at call ``kill_at``; True if the save completed."""
    ops = CrashingOps(kill_at, rng)
    monkeypatch.setattr(persist, "_ops", ops)
    try:
        save_state(str(directory), state)
    except Killed:
        return False
    finally:
        ops.release()
        monkeypatch.undo()
    return True


def check_consistent(
    loaded: LoadedState[Snap], low: int, high: int, directory: Path | None = None
) -> None:
    """The state is one that was saved (revision in low..high), possibly continued above the
    mark (revision ``mark + 1``, the revisions after the saved one a gap, the history whole).

    With ``directory``, also check the mark covers the state file's own revision, so losing
    that file later could not rewind the revision either.
    """
    assert loaded.problem is None
    state = loaded.state
    assert state.snapshot is not None
    saved_at = int(state.snapshot.tags["rev"])
    assert low <= saved_at <= state.revision <= high + 1
    if state.revision > saved_at:  # the mark is ahead: nothing in the gap can be resumed
        assert state.gaps[-1] == (saved_at, state.revision - 1)
    if state.history:
        assert state.history[-1].revision == saved_at
    else:
        assert state.oldest == saved_at, "only a baseline has no frame"
    if directory is not None:
        mark, _ = persist._read_mark(str(directory))
        assert mark is not None
        assert mark >= saved_at
    assert state.hooks == {"hook": saved_at - 1}


def test_every_kill_point_of_one_save_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(1)
    probe = CrashingOps(10**9, rng)
    monkeypatch.setattr(persist, "_ops", probe)
    save_state(str(tmp_path / "probe"), state_at(2))
    monkeypatch.undo()
    assert probe.calls >= 12, "two atomic writes: open, write, fsync, close, replace, dir fsync"

    outcomes = set()
    for kill_at in range(probe.calls + 1):
        for attempt in range(3):
            directory = tmp_path / f"k{kill_at}-{attempt}"
            save_state(str(directory), state_at(2))
            done = crashing_save(monkeypatch, directory, state_at(3), kill_at, rng)
            loaded = load(directory)
            check_consistent(loaded, 2, 3, directory)
            if done:
                assert loaded.state == state_at(3)
            new = loaded.state.snapshot == state_at(3).snapshot
            assert loaded.state.revision == 3 or not new
            outcomes.add((loaded.state.revision, new))
            assert sorted(os.listdir(directory)) == ["revision", "state.json"]
    assert outcomes == {(2, False), (4, False), (3, True)}, "4: above the mark 3, never reused"


def test_random_kills_never_lose_or_rewind_revisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(2)
    saved = 0  # the snapshot on disk is at least this new
    seen = 0  # the revision never goes below this
    attempted = 0
    for _ in range(120):
        loaded = load(tmp_path)
        if saved:
            check_consistent(loaded, saved, attempted, tmp_path)
            assert loaded.state.snapshot is not None
            saved = int(loaded.state.snapshot.tags["rev"])
        assert loaded.state.revision >= seen
        seen = loaded.state.revision
        store = make_store(loaded.state)
        store.apply(Snap(tags={"rev": str(store.revision + 1)}), NOW)
        store.mark_delivered("hook", store.revision - 1)
        attempted = store.revision
        if crashing_save(monkeypatch, tmp_path, store.to_state(), rng.randrange(15), rng):
            saved = attempted
    assert seen > 60


ZYGOTE = """
import os
import sys

import msgspec
import structlog

from imdsd.frames import Change
from imdsd.persist import load_state, save_state
from imdsd.store import Store

class Snap(msgspec.Struct, frozen=True):
    tags: dict[str, str] = msgspec.field(default_factory=dict)

def diff(old, new):
    return [Change(kind="tags", op="modified", key="rev", old=None, new=None)]

def write_forever(directory):
    store = Store(diff=diff, snapshot_type=Snap, history=8, state=load_state(directory, Snap).state)
    os.write(1, f"ready {os.getpid()}\\n".encode())
    while True:
        store.apply(Snap(tags={"rev": str(store.revision + 1)}), 0.0)
        store.mark_delivered("hook", store.revision - 1)
        save_state(directory, store.to_state())
        os.write(1, f"{store.revision}\\n".encode())

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            write_forever(line.strip())
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    print("exit", status, flush=True)
"""


def test_sigkilled_writer_processes_leave_old_or_new(tmp_path: Path) -> None:
    # A zygote process imports everything once and forks one writer per kill, so each of
    # the many kills costs milliseconds, not an interpreter start.
    script = tmp_path / "zygote.py"
    script.write_text(ZYGOTE)
    zygote = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )
    watchdog = threading.Timer(60, zygote.kill)  # a hang ends in EOF and a failed test
    watchdog.start()
    assert zygote.stdin is not None
    assert zygote.stdout is not None
    rng = random.Random(3)
    directories = [tmp_path / f"w{n}" for n in range(3)]
    saved = dict.fromkeys(directories, 0)
    seen = dict.fromkeys(directories, 0)
    mid_save = 0  # kills that left a temp file behind
    try:
        for kill in range(60):
            directory = directories[kill % len(directories)]
            zygote.stdin.write(f"{directory}\n".encode())
            zygote.stdin.flush()
            ready, pid = zygote.stdout.readline().split()
            assert ready == b"ready"
            time.sleep(rng.uniform(0, 0.01))
            os.kill(int(pid), signal.SIGKILL)
            lines: list[bytes] = []
            while not (line := zygote.stdout.readline()).startswith(b"exit"):
                assert line.endswith(b"\n"), (kill, lines[-5:], line)
                lines.append(line)
            assert os.WTERMSIG(int(line.split()[1])) == signal.SIGKILL
            # The writer may have saved one revision past the last it printed and written
            # the mark of the next one.
            high = max([seen[directory], *(int(x) for x in lines)]) + 2
            if lines:
                saved[directory] = int(lines[-1])
            if directory.exists():
                mid_save += any(p.name.endswith(".tmp") for p in directory.iterdir())
            loaded = load(directory)
            assert loaded.state.revision >= seen[directory]
            seen[directory] = loaded.state.revision
            if saved[directory]:
                check_consistent(loaded, saved[directory], high, directory)
                assert loaded.state.snapshot is not None
                saved[directory] = int(loaded.state.snapshot.tags["rev"])
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=10)
        zygote.stdout.close()
        watchdog.cancel()
    assert min(seen.values()) > 0
    assert mid_save > 0


def _mkdir(path: Path) -> None:
    path.mkdir()


def _loop(path: Path) -> None:
    path.symlink_to(path.name)


@pytest.mark.parametrize("make", [_mkdir, _loop, os.mkfifo], ids=["directory", "loop", "FIFO"])
def test_a_state_file_that_is_not_a_regular_file_is_moved_aside_without_hanging(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    save_state(str(tmp_path), state_at(4))
    path = tmp_path / "state.json"
    path.unlink()
    make(path)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(load(tmp_path)), daemon=True)
    with capture_logs():
        thread.start()
        thread.join(10)
    assert result, "load_state hangs"
    loaded = result[0]
    assert isinstance(loaded, LoadedState)
    assert loaded.problem is not None
    assert str(path) in loaded.problem
    assert loaded.state == PersistedState(revision=4, oldest=4)
    assert not os.path.lexists(path)
