"""Running one hook process (trio shell): no shell, clean env, own process group, bounded.

The process gets its own session (so its process group id is its pid). On timeout the whole
group gets SIGTERM, then SIGKILL after a grace period. Processes a hook leaves behind in its
group after it exits are cleaned up the same way, so a run never outlives itself. Output
(stdout and stderr merged) is kept up to a cap and the rest drained, and reading stops shortly
after the group is gone even if an escaped process still holds the pipe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from dataclasses import dataclass

import trio

from imdsd.frames import KINDS, ChangeFrame
from imdsd.hooks.model import RunAs

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_CAP = 64 * 1024
KILL_GRACE = 5.0
READ_TAIL = 1.0
_POLL = 0.02
DEFERRED_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM, errno.ENOBUFS, errno.EINTR}
)
"""Start failures caused by a lack of resources: the run is deferred, not failed."""


@dataclass(frozen=True)
class RunResult:
    """How a hook process ended.

    ``exit_code`` is the process's status (negative: killed by that signal), None when it did
    not start (``error`` says why). ``output`` is at most the cap; ``dropped`` counts the bytes
    drained beyond it. ``leftovers`` is True when processes remained in its group after it
    exited and had to be terminated. ``pid`` is the process id (and process group id).
    ``start_errno`` is the errno of a failed start.
    """

    exit_code: int | None
    timed_out: bool
    duration: float
    output: bytes = b""
    dropped: int = 0
    leftovers: bool = False
    error: str | None = None
    pid: int | None = None
    start_errno: int | None = None

    @property
    def deferred(self) -> bool:
        """True when the process could not start for lack of resources (EMFILE, ENOMEM ...)."""
        return self.start_errno in DEFERRED_ERRNOS

    @property
    def ok(self) -> bool:
        """True when the process exited 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out and self.error is None


def kinds_present(frame: ChangeFrame) -> list[str]:
    """The kinds with changes in ``frame``, in the contract's order."""
    present = {c.kind for c in frame.changes}
    return [k for k in KINDS if k in present]


def hook_environment(frame: ChangeFrame, socket_path: str) -> dict[str, str]:
    """The whole environment of a hook run: a minimal base plus the ``IMDSD_*`` variables."""
    return {
        "PATH": CLEAN_PATH,
        "LANG": "C.UTF-8",
        "IMDSD_REVISION": str(frame.revision),
        "IMDSD_KINDS": ",".join(kinds_present(frame)),
        "IMDSD_SOCKET": socket_path,
    }


def _is_live_member(pid: str, pgid: int) -> bool:
    """True if /proc says ``pid`` is in group ``pgid`` and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    fields = data[data.rfind(b")") + 2 :].split()
    return len(fields) > 2 and fields[0] not in (b"Z", b"X") and fields[2] == str(pgid).encode()


def group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process is in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        pids = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return True
    return any(_is_live_member(pid, pgid) for pid in pids)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_group_gone(proc: trio.Process, pgid: int) -> None:
    await proc.wait()
    while group_alive(pgid):  # noqa: ASYNC110 - nothing signals a process group emptying
        await trio.sleep(_POLL)


async def _terminate_group(proc: trio.Process, pgid: int, grace: float) -> None:
    """SIGTERM the group, SIGKILL it if anything is still alive ``grace`` seconds later."""
    _signal_group(pgid, signal.SIGTERM)
    with trio.move_on_after(grace):
        await _wait_group_gone(proc, pgid)
        return
    _signal_group(pgid, signal.SIGKILL)
    with trio.move_on_after(grace):
        await _wait_group_gone(proc, pgid)


class _Output:
    """Merged stdout/stderr kept up to ``cap`` bytes; the rest is only counted."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.dropped = 0
        self.done = trio.Event()

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            while chunk := await stream.receive_some(65536):
                room = max(0, self.cap - len(self.data))
                self.data += chunk[:room]
                self.dropped += len(chunk) - min(room, len(chunk))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self.done.set()


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    """Write the frame to stdin and close it; a hook that does not read it is fine."""
    try:
        await stream.send_all(data)
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def run_hook_process(
    argv: list[str],
    stdin: bytes,
    env: dict[str, str],
    *,
    timeout: float,
    run_as: RunAs | None = None,
    kill_grace: float = KILL_GRACE,
    output_cap: int = OUTPUT_CAP,
    read_tail: float = READ_TAIL,
) -> RunResult:
    """Run ``argv`` (never through a shell) with ``stdin`` and exactly ``env``, cwd ``/``.

    If cancelled (shutdown), the process group is killed before the cancellation propagates.
    When this returns or raises, no process of the group is alive (barring one that survives
    SIGKILL for longer than ``kill_grace``, e.g. stuck in the kernel).
    """
    start = trio.current_time()
    try:
        proc = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
            user=None if run_as is None else run_as.uid,
            group=None if run_as is None else run_as.gid,
            extra_groups=None if run_as is None else list(run_as.groups),
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return RunResult(
            exit_code=None,
            timed_out=False,
            duration=trio.current_time() - start,
            error=f"cannot start {argv[0]!r}: {exc}",
            start_errno=exc.errno if isinstance(exc, OSError) else None,
        )
    pgid = proc.pid
    output = _Output(output_cap)
    timed_out = False
    leftovers = False
    try:
        async with trio.open_nursery() as nursery:
            assert proc.stdin is not None
            assert proc.stdout is not None
            nursery.start_soon(_feed, proc.stdin, stdin)
            nursery.start_soon(output.collect, proc.stdout)
            with trio.move_on_after(timeout) as waiting:
                await proc.wait()
            timed_out = waiting.cancelled_caught
            leftovers = not timed_out and group_alive(pgid)
            if timed_out or leftovers:
                await _terminate_group(proc, pgid, kill_grace)
            duration = trio.current_time() - start
            with trio.move_on_after(read_tail):
                await output.done.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None or group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
                with trio.move_on_after(kill_grace):
                    await _wait_group_gone(proc, pgid)
            await proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await stream.aclose()
    return RunResult(
        exit_code=proc.returncode,
        timed_out=timed_out,
        duration=duration,
        output=bytes(output.data),
        dropped=output.dropped,
        leftovers=leftovers,
        pid=pgid,
    )
