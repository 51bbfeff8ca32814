"""The state directory's files: versioned, checksummed, written atomically (blocking calls).

- ``state.json``: the compacted state, ``{"format": 2, "seq": N, "sha256": "<hex>",
  "written_at": "<RFC 3339>", "state": {...}}`` where ``state`` is a
  :class:`~imdsd.store.PersistedState`, ``sha256`` the digest of its exact bytes in the file
  (a torn or bit-flipped file is detected) and ``seq`` the last journal record folded into it
  (see :mod:`imdsd.statelog`). Format 1 files (no ``seq``) still load.
- ``revision``: the revision high-water mark ``{"revision": N, "sha256": "<hex of N>"}``,
  written *before* any file holding a higher revision. If the state is lost or corrupt,
  revisions continue above the mark instead of starting again at zero; when the mark is above
  the state's revision, the state continues above the mark with its history and hook marks
  whole, and the revisions in between become a gap (see :func:`apply_mark`).

Whole files are replaced atomically (temp file in the same directory, write, fsync, rename,
fsync the directory) with mode 0600. A state file that is bad, or is not a readable regular
file (a directory, a FIFO, a symlink loop, unreadable), is moved aside as
``state.json.corrupt-<timestamp>`` (the newest few are kept) and the daemon starts clean; files
are opened with ``O_NONBLOCK`` and checked with ``fstat`` first, so nothing can hang a start.

These functions block; the trio shell runs them with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

import msgspec
import structlog

from imdsd.store import PersistedState
from imdsd.timestamps import format_timestamp

S = TypeVar("S", bound=msgspec.Struct)

STATE_FILE = "state.json"
REVISION_FILE = "revision"
FORMAT = 2
FORMATS = (1, 2)
CORRUPT_KEPT = 5
MAX_MARK_BYTES = 4096

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
    seq: int = 0


class _Envelope(msgspec.Struct, kw_only=True):
    format: int
    seq: int = 0
    sha256: str
    written_at: str
    state: msgspec.Raw


class _FormatProbe(msgspec.Struct):
    format: int


class _RevisionMark(msgspec.Struct):
    revision: int
    sha256: str


class CorruptFile(Exception):
    """A state file with bad content, or one that is not a readable regular file."""

    def __init__(self, problem: str, *, regular: bool = True) -> None:
        super().__init__(problem)
        self.regular = regular


class _FileOps:
    """The OS calls that change the state directory; crash tests replace ``_ops``."""

    def open_new(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def open_append(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def open_read(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)

    def truncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

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
    """Load ``state.json`` from ``directory`` (not the journal); never fails on bad content.

    A missing directory or file is a fresh start. A truncated, corrupt, unknown-format or
    inconsistent file, or one that is not a readable regular file, is logged, moved aside and
    replaced by a fresh state whose revision continues from the high-water mark. Leftover temp
    files of an interrupted save are removed. Raises :class:`PersistError` (naming the path)
    only when the directory cannot be read or a bad file cannot be moved aside.
    """
    mark = read_mark(directory)
    loaded = load_base(directory, snapshot_type, mark)
    return LoadedState(apply_mark(loaded.state, mark), loaded.problem, loaded.moved_to, loaded.seq)


def load_base(directory: str, snapshot_type: type[S], mark: int | None) -> LoadedState[S]:
    """``state.json`` as it is (``mark``, only logged here, is not applied); see
    :func:`load_state`."""
    _remove_temp_files(directory)
    path = os.path.join(directory, STATE_FILE)
    try:
        data = read_regular(path)
        seq, state = _decode(data, snapshot_type)
    except FileNotFoundError:
        if mark:
            _log.warning("state_file_missing", path=path, revision=mark)
        return LoadedState(PersistedState())
    except CorruptFile as exc:
        return _discard(directory, path, exc, mark)
    return LoadedState(state, seq=seq)


def apply_mark(state: PersistedState[S], mark: int | None) -> PersistedState[S]:
    """``state`` continued above the high-water ``mark`` when the mark is ahead of it.

    The mark is raised before the record holding a new revision is written, and a revision is
    published only once that record is saved, so a mark ahead of a loaded state means the
    daemon died in between (or the journal's tail was lost): the revisions in the gap
    ``(state.revision, mark]`` were never published with the state's content, if at all. The
    state then takes revision ``mark + 1`` (no number is reused, and a client that did see the
    mark is not told it is up to date) and keeps its history, ``oldest`` and hook marks, so
    pending hook deliveries and resumes from the state's revision go on; a resume from inside
    the gap gets gone (:attr:`PersistedState.gaps`). A state without revisions (lost or
    fresh) just starts at the mark.
    """
    if mark is None or mark <= state.revision:
        return state
    if state.revision == 0:
        return PersistedState(revision=mark, oldest=mark)
    _log.info("revision_from_mark", state_revision=state.revision, mark=mark, revision=mark + 1)
    gaps = [*state.gaps, (state.revision, mark)]
    return msgspec.structs.replace(state, revision=mark + 1, gaps=gaps)


def read_mark(directory: str) -> int | None:
    """The revision high-water mark, None (logged) when it is missing or unreadable."""
    mark, problem = _read_mark(directory)
    if problem is not None:
        _log.warning("revision_mark_unreadable", directory=directory, problem=problem)
    return mark


def save_state(directory: str, state: PersistedState[Any], *, seq: int = 0) -> None:
    """Write ``state`` atomically to ``state.json`` in ``directory`` (created with mode 0700
    if missing), raising the revision mark first; ``seq`` is the last journal record it holds.

    Raises :class:`PersistError` on any OS error; the previous state then stays intact.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        raise_mark(directory, state.revision)
        payload = _encoder.encode(state)
        envelope = _Envelope(
            format=FORMAT,
            sha256=hashlib.sha256(payload).hexdigest(),
            written_at=format_timestamp(time.time()),
            state=msgspec.Raw(payload),
            seq=seq,
        )
        write_atomic(directory, STATE_FILE, _encoder.encode(envelope) + b"\n")
    except OSError as exc:
        raise PersistError(f"cannot save state in {directory}: {exc.strerror or exc}") from exc


def raise_mark(directory: str, revision: int) -> None:
    """Write the high-water mark ``revision`` unless the mark on disk is already that high."""
    mark, _ = _read_mark(directory)
    if mark is None or revision > mark:
        write_atomic(directory, REVISION_FILE, _encode_mark(revision))


def read_regular(path: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``), never blocking on a FIFO.

    Raises ``FileNotFoundError`` when it does not exist, and :class:`CorruptFile` (naming the
    path) when it is not a readable regular file.
    """
    try:
        fd = _ops.open_read(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptFile(f"cannot open {path}: {exc.strerror or exc}", regular=False) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            problem = f"{path} is not a regular file ({_kind(info.st_mode)})"
            raise CorruptFile(problem, regular=False)
        chunks = []
        left = info.st_size if limit is None else min(limit, info.st_size)
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise CorruptFile(f"cannot read {path}: {exc.strerror or exc}", regular=False) from exc
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"mode {mode:o}"


def _discard(directory: str, path: str, exc: CorruptFile, mark: int | None) -> LoadedState[Any]:
    """Move a bad state file aside; one that is not a regular file must go (or we fail)."""
    moved_to = move_aside(directory, path)
    if moved_to is None and not exc.regular:
        raise PersistError(f"{exc}; cannot move it aside")
    _log.warning(
        "state_file_corrupt", path=path, problem=str(exc), moved_to=moved_to, revision=mark or 0
    )
    return LoadedState(PersistedState(), problem=str(exc), moved_to=moved_to)


def _decode(data: bytes, snapshot_type: type[S]) -> tuple[int, PersistedState[S]]:
    if not data.strip():
        raise CorruptFile("file is empty")
    try:
        version = _probe_decoder.decode(data).format
        if version not in FORMATS:
            raise CorruptFile(f"unknown format version {version}")
        envelope = _envelope_decoder.decode(data)
        if hashlib.sha256(envelope.state).hexdigest() != envelope.sha256:
            raise CorruptFile("checksum mismatch")
        state: PersistedState[S] = _state_decoder(snapshot_type).decode(envelope.state)
    except msgspec.DecodeError as exc:
        raise CorruptFile(f"invalid content: {exc}") from exc
    return envelope.seq, state


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
        data = read_regular(path, MAX_MARK_BYTES)
    except FileNotFoundError:
        return None, None
    except CorruptFile as exc:
        return None, str(exc)
    try:
        mark = _mark_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return None, f"invalid content in {path}: {exc}"
    expected = hashlib.sha256(str(mark.revision).encode()).hexdigest()
    if mark.revision < 0 or mark.sha256 != expected:
        return None, f"checksum mismatch in {path}"
    return mark.revision, None


def write_atomic(directory: str, name: str, data: bytes) -> None:
    """Replace ``directory/name`` by ``data`` atomically and durably (mode 0600)."""
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


def move_aside(directory: str, path: str) -> str | None:
    """Rename a bad state file for inspection, keeping the newest few; None if it failed."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    prefix = f"{os.path.basename(path)}.corrupt-"
    target = os.path.join(directory, prefix + stamp)
    suffix = 0
    while os.path.lexists(target):
        suffix += 1
        target = os.path.join(directory, f"{prefix}{stamp}-{suffix}")
    try:
        _ops.replace(path, target)
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
