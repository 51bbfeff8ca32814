"""The state file in ``state.directory``: versioned, checksummed, written atomically.

Two files live in the directory:

- ``state.json``: ``{"format": 1, "sha256": "<hex>", "written_at": "<RFC 3339>", "state": {...}}``
  where ``state`` is a :class:`~imdsd.store.PersistedState` and ``sha256`` is the digest of its
  exact bytes in the file, so a torn or bit-flipped file is detected.
- ``revision``: the revision high-water mark ``{"revision": N, "sha256": "<hex of N>"}``,
  written *before* ``state.json`` whenever the revision grows. If ``state.json`` is lost or
  corrupt, revisions continue above the mark instead of starting again at zero.

Both are replaced atomically (temp file in the same directory, write, fsync, rename, fsync the
directory) with mode 0600. A bad ``state.json`` is moved aside as
``state.json.corrupt-<timestamp>`` (the newest few are kept) and the daemon starts clean.

These functions block; the trio shell runs them with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

import msgspec
import structlog

from imdsd.store import PersistedState, format_timestamp

S = TypeVar("S", bound=msgspec.Struct)

STATE_FILE = "state.json"
REVISION_FILE = "revision"
FORMAT = 1
CORRUPT_KEPT = 5

_log = structlog.get_logger("imdsd.persist")


class PersistError(Exception):
    """The state directory could not be read or written (an OS error, not bad content)."""


@dataclass(frozen=True)
class LoadedState(Generic[S]):
    """What :func:`load_state` found.

    ``state`` is always usable: the persisted state, or a fresh one whose revision continues
    from the high-water mark. ``problem`` says why the state file was discarded (None when it
    was fine or missing) and ``moved_to`` where the bad file went.
    """

    state: PersistedState[S]
    problem: str | None = None
    moved_to: str | None = None


class _Envelope(msgspec.Struct):
    format: int
    sha256: str
    written_at: str
    state: msgspec.Raw


class _FormatProbe(msgspec.Struct):
    format: int


class _RevisionMark(msgspec.Struct):
    revision: int
    sha256: str


class _Corrupt(Exception):
    pass


class _FileOps:
    """The OS calls that change the state directory; crash tests replace ``_ops``."""

    def open_new(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, source: str, target: str) -> None:
        os.replace(source, target)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_directory(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(fd)


_ops = _FileOps()
_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_probe_decoder = msgspec.json.Decoder(_FormatProbe)
_mark_decoder = msgspec.json.Decoder(_RevisionMark)
_state_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def load_state(directory: str, snapshot_type: type[S]) -> LoadedState[S]:
    """Load the persisted state from ``directory``; never fails on bad content.

    A missing directory or file is a fresh start. A truncated, corrupt, unknown-format or
    inconsistent file is logged, moved aside and replaced by a fresh state whose revision
    continues from the high-water mark. Leftover temp files of an interrupted save are
    removed. Raises :class:`PersistError` only when the directory cannot be read.
    """
    _remove_temp_files(directory)
    mark, mark_problem = _read_mark(directory)
    if mark_problem is not None:
        _log.warning("revision_mark_unreadable", directory=directory, problem=mark_problem)
    path = os.path.join(directory, STATE_FILE)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        if mark:
            _log.warning("state_file_missing", path=path, revision=mark)
        return LoadedState(PersistedState(revision=mark or 0, oldest=mark or 0))
    except OSError as exc:
        raise PersistError(f"cannot read state file {path}: {exc.strerror or exc}") from exc
    try:
        state = _decode(data, snapshot_type)
    except _Corrupt as exc:
        problem = str(exc)
        moved_to = _move_aside(directory, path)
        _log.warning(
            "state_file_corrupt",
            path=path,
            problem=problem,
            moved_to=moved_to,
            revision=mark or 0,
        )
        return LoadedState(
            PersistedState(revision=mark or 0, oldest=mark or 0),
            problem=problem,
            moved_to=moved_to,
        )
    if mark is not None and mark > state.revision:
        _log.info("revision_from_mark", state_revision=state.revision, revision=mark)
        state = msgspec.structs.replace(state, revision=mark)
    return LoadedState(state)


def save_state(directory: str, state: PersistedState[Any]) -> None:
    """Write ``state`` atomically to ``directory`` (created with mode 0700 if missing).

    Raises :class:`PersistError` on any OS error; the previous state then stays intact.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        mark, _ = _read_mark(directory)
        if mark is None or state.revision > mark:
            _write_atomic(directory, REVISION_FILE, _encode_mark(state.revision))
        payload = _encoder.encode(state)
        envelope = _Envelope(
            format=FORMAT,
            sha256=hashlib.sha256(payload).hexdigest(),
            written_at=format_timestamp(time.time()),
            state=msgspec.Raw(payload),
        )
        _write_atomic(directory, STATE_FILE, _encoder.encode(envelope) + b"\n")
    except OSError as exc:
        raise PersistError(f"cannot save state in {directory}: {exc.strerror or exc}") from exc


def _decode(data: bytes, snapshot_type: type[S]) -> PersistedState[S]:
    if not data.strip():
        raise _Corrupt("file is empty")
    try:
        version = _probe_decoder.decode(data).format
        if version != FORMAT:
            raise _Corrupt(f"unknown format version {version}")
        envelope = _envelope_decoder.decode(data)
        if hashlib.sha256(envelope.state).hexdigest() != envelope.sha256:
            raise _Corrupt("checksum mismatch")
        state: PersistedState[S] = _state_decoder(snapshot_type).decode(envelope.state)
    except msgspec.DecodeError as exc:
        raise _Corrupt(f"invalid content: {exc}") from exc
    return state


def _state_decoder(snapshot_type: type[S]) -> msgspec.json.Decoder[Any]:
    decoder = _state_decoders.get(snapshot_type)
    if decoder is None:
        decoder = msgspec.json.Decoder(cast(Any, PersistedState)[snapshot_type])
        _state_decoders[snapshot_type] = decoder
    return decoder


def _encode_mark(revision: int) -> bytes:
    digest = hashlib.sha256(str(revision).encode()).hexdigest()
    return _encoder.encode(_RevisionMark(revision=revision, sha256=digest)) + b"\n"


def _read_mark(directory: str) -> tuple[int | None, str | None]:
    """The revision high-water mark (None if absent or bad) and why it is bad, if it is."""
    path = os.path.join(directory, REVISION_FILE)
    try:
        with open(path, "rb") as file:
            data = file.read(4096)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    try:
        mark = _mark_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return None, f"invalid content in {path}: {exc}"
    expected = hashlib.sha256(str(mark.revision).encode()).hexdigest()
    if mark.revision < 0 or mark.sha256 != expected:
        return None, f"checksum mismatch in {path}"
    return mark.revision, None


def _write_atomic(directory: str, name: str, data: bytes) -> None:
    ops = _ops
    target = os.path.join(directory, name)
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    fd = ops.open_new(temp)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[ops.write(fd, view) :]
            ops.fsync(fd)
        finally:
            ops.close(fd)
        ops.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            ops.unlink(temp)
        raise
    ops.fsync_directory(directory)


def _remove_temp_files(directory: str) -> None:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PersistError(f"cannot read state directory {directory}: {exc.strerror}") from exc
    for name in names:
        if name.startswith((f".{STATE_FILE}.", f".{REVISION_FILE}.")) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError as exc:
                _log.warning("temp_file_not_removed", name=name, problem=exc.strerror)


def _move_aside(directory: str, path: str) -> str | None:
    """Rename a bad state file for inspection, keeping the newest few; None if it failed."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    prefix = f"{STATE_FILE}.corrupt-"
    target = os.path.join(directory, prefix + stamp)
    suffix = 0
    while os.path.lexists(target):
        suffix += 1
        target = os.path.join(directory, f"{prefix}{stamp}-{suffix}")
    try:
        os.replace(path, target)
    except OSError as exc:
        _log.warning("state_file_not_moved", path=path, problem=exc.strerror)
        return None
    try:
        old = sorted(
            (name for name in os.listdir(directory) if name.startswith(prefix)),
            key=lambda name: _corrupt_order(name[len(prefix) :]),
        )
        for name in old[:-CORRUPT_KEPT]:
            os.unlink(os.path.join(directory, name))
        _ops.fsync_directory(directory)
    except OSError as exc:
        _log.warning("corrupt_files_not_pruned", directory=directory, problem=exc.strerror)
    return target


def _corrupt_order(tail: str) -> tuple[str, int]:
    stamp, _, counter = tail.partition("-")
    return stamp, int(counter) if counter.isdigit() else 0
