"""The persisted state as a compacted ``state.json`` plus an append-only journal (blocking).

Saving a revision appends one record to ``state.journal`` -- the new change frames, the new
``oldest``, changed hook marks and gaps, and a structural delta of the snapshot (see
:mod:`imdsd.delta`) -- so its cost follows the change, not the history. Once the journal
outgrows the compacted file (and :data:`COMPACT_MIN`), the next save writes the whole state
to ``state.json`` atomically (see :func:`imdsd.persist.save_state`) and removes the journal.

A record is one line, ``<sha256 of the JSON> <JSON>``, with a sequence number ``seq`` one above
the previous record's; ``state.json`` stores the ``seq`` it holds, so records it already holds
are skipped. Loading stops at the first torn, corrupt or out-of-sequence record (a crash
mid-append leaves at most a torn tail, which was never published); the next save then compacts,
which also drops the bad tail. The revision high-water mark is raised before every record that
raises the revision, so a number is never reused even if the files are later lost.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import threading
from typing import Any, Final, Generic, TypeVar

import msgspec
import structlog

from imdsd import delta, persist
from imdsd.frames import ChangeFrame
from imdsd.persist import LoadedState, PersistError
from imdsd.store import PersistedState

S = TypeVar("S", bound=msgspec.Struct)

JOURNAL_FILE: Final = "state.journal"
COMPACT_MIN: Final = 1 << 20
"""The journal is compacted once larger than this and than the compacted state file."""

_log = structlog.get_logger("imdsd.statelog")


class Record(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One saved step: the state after it differs from the one before by these fields."""

    seq: int
    revision: int
    oldest: int
    frames: list[ChangeFrame] = msgspec.field(default_factory=list)
    snapshot: list[Any] | None = None
    hooks: dict[str, int] | None = None
    gaps: list[tuple[int, int]] | None = None


_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(Record)


def encode_record(record: Record) -> bytes:
    """One journal line for ``record``."""
    payload = _encoder.encode(record)
    return hashlib.sha256(payload).hexdigest().encode() + b" " + payload + b"\n"


def replay(
    state: PersistedState[S], seq: int, data: bytes, snapshot_type: type[S]
) -> tuple[PersistedState[S], int, int, str | None]:
    """``state`` (holding records up to ``seq``) advanced by the journal ``data``.

    Returns the state, the last ``seq`` applied, how many bytes of ``data`` were good, and why
    the rest was ignored (None when all of it was good).
    """
    snapshot: Any = None if state.snapshot is None else msgspec.to_builtins(state.snapshot)
    base_seq = seq
    revision, oldest = state.revision, state.oldest
    history, hooks = collections.deque(state.history), dict(state.hooks)
    gaps = list(state.gaps)
    good = 0
    problem = None
    applied = False
    for line in data.splitlines(keepends=True):
        try:
            record = _decode_line(line, seq)
            if record is None:  # already in the state file
                good += len(line)
                continue
            if record.snapshot is not None:
                snapshot = delta.apply(snapshot, record.snapshot)
        except (ValueError, msgspec.DecodeError) as exc:
            problem = f"journal record after seq {seq} ignored: {exc}"
            break
        seq, revision, oldest = record.seq, record.revision, record.oldest
        history.extend(record.frames)
        while history and history[0].revision <= oldest:
            history.popleft()
        if record.hooks is not None:
            hooks = record.hooks
        if record.gaps is not None:
            gaps = record.gaps
        good += len(line)
        applied = True
    if not applied:
        return state, seq, good, problem
    try:
        typed = None if snapshot is None else msgspec.convert(snapshot, snapshot_type)
        result = PersistedState(
            revision=revision,
            oldest=oldest,
            snapshot=typed,
            history=list(history),
            hooks=hooks,
            gaps=gaps,
        )
    except (ValueError, msgspec.ValidationError) as exc:
        return state, base_seq, 0, f"journal does not fit the state file: {exc}"
    return result, seq, good, problem


def _decode_line(line: bytes, seq: int) -> Record | None:
    """The record on ``line`` if it is the one after ``seq``, None if at or before it."""
    if not line.endswith(b"\n"):
        raise ValueError("torn record (no end of line)")
    digest, _, payload = line[:-1].partition(b" ")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise ValueError("checksum mismatch")
    record = _record_decoder.decode(payload)
    if record.seq <= seq:
        return None
    if record.seq != seq + 1:
        raise ValueError(f"record {record.seq} follows {seq}")
    return record


class StateLog(Generic[S]):
    """Loads and saves the state in one directory; :meth:`save` is thread-safe and serial."""

    def __init__(self, directory: str, snapshot_type: type[S]) -> None:
        self.directory = directory
        self.snapshot_type = snapshot_type
        self._lock = threading.Lock()
        self._last: PersistedState[S] | None = None
        self._last_snapshot: Any = None
        self._seq = 0
        self._journal_size = 0
        self._base_size = 0
        self._compact = True

    @property
    def journal_path(self) -> str:
        """Where the journal lives."""
        return os.path.join(self.directory, JOURNAL_FILE)

    def load(self) -> LoadedState[S]:
        """The persisted state: ``state.json``, then the journal, then the revision mark.

        Never fails on bad content (see :func:`imdsd.persist.load_state`); raises
        :class:`~imdsd.persist.PersistError` when the directory cannot be read.
        """
        with self._lock:
            mark = persist.read_mark(self.directory)
            loaded = persist.load_base(self.directory, self.snapshot_type, mark)
            state, seq = loaded.state, loaded.seq
            problem = loaded.problem
            try:
                data = persist.read_regular(self.journal_path)
            except FileNotFoundError:
                data = b""
            except persist.CorruptFile as exc:
                data, problem = b"", str(exc)
                if persist.move_aside(self.directory, self.journal_path) is None:
                    raise PersistError(f"{exc}; cannot move it aside") from exc
            if loaded.problem is not None:
                data = b""  # records extend the state file that was lost: the next save drops them
            state, seq, good, journal_problem = replay(state, seq, data, self.snapshot_type)
            if journal_problem is not None:
                problem = journal_problem
                _log.warning("journal_tail_ignored", path=self.journal_path, problem=problem)
            self._remember(state, seq)
            self._compact = problem is not None or good != len(data)
            self._journal_size = len(data)
            state = persist.apply_mark(state, mark)
            return LoadedState(state, problem, loaded.moved_to, seq)

    def save(self, state: PersistedState[S]) -> None:
        """Persist ``state``: one journal record, or a compaction when due.

        Raises :class:`~imdsd.persist.PersistError` on any OS error; what was saved before
        stays intact and the next save compacts.
        """
        with self._lock:
            try:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                due = self._journal_size > max(COMPACT_MIN, self._base_size)
                if self._compact or not self._base_size or due:
                    self._save_whole(state)
                else:
                    self._append(state)
            except OSError as exc:
                self._compact = True
                raise PersistError(
                    f"cannot save state in {self.directory}: {exc.strerror or exc}"
                ) from exc
            except BaseException:
                self._compact = True  # whatever is on disk now, the next save rewrites it
                raise

    def _save_whole(self, state: PersistedState[S]) -> None:
        persist.save_state(self.directory, state, seq=self._seq)
        with contextlib.suppress(FileNotFoundError):
            persist._ops.unlink(self.journal_path)
        persist._ops.fsync_directory(self.directory)
        self._journal_size = 0
        self._compact = False
        self._remember(state, self._seq)

    def _append(self, state: PersistedState[S]) -> None:
        last = self._last or PersistedState[S]()
        snapshot = self._last_snapshot
        edit = None
        if state.snapshot is not last.snapshot:
            snapshot = msgspec.to_builtins(state.snapshot)
            edit = delta.make(self._last_snapshot, snapshot)
        record = Record(
            seq=self._seq + 1,
            revision=state.revision,
            oldest=state.oldest,
            frames=_newer(state.history, last.revision),
            snapshot=edit,
            hooks=None if state.hooks == last.hooks else dict(state.hooks),
            gaps=None if state.gaps == last.gaps else list(state.gaps),
        )
        line = encode_record(record)
        if state.revision > last.revision:
            persist.raise_mark(self.directory, state.revision)
        ops = persist._ops
        fd = ops.open_append(self.journal_path)
        try:
            view = memoryview(line)
            while view:
                view = view[ops.write(fd, view) :]
            ops.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                ops.truncate(fd, self._journal_size)
            raise
        finally:
            ops.close(fd)
        if self._journal_size == 0:
            ops.fsync_directory(self.directory)
        self._journal_size += len(line)
        self._seq = record.seq
        self._last, self._last_snapshot = state, snapshot

    def _remember(self, state: PersistedState[S], seq: int) -> None:
        self._seq = seq
        self._last = state
        self._last_snapshot = (
            None if state.snapshot is None else msgspec.to_builtins(state.snapshot)
        )
        try:
            self._base_size = os.stat(os.path.join(self.directory, persist.STATE_FILE)).st_size
        except OSError:
            self._base_size = 0


def _newer(history: list[ChangeFrame], revision: int) -> list[ChangeFrame]:
    found = []
    for frame in reversed(history):
        if frame.revision <= revision:
            break
        found.append(frame)
    found.reverse()
    return found
