"""Running one hook process (trio shell): no shell, clean env, own process group, bounded.

The process gets its own session (so its process group id is its pid), and its process tree is
followed while it runs (:mod:`imdsd.hooks.tree`), so children that call ``setsid`` are not
lost. On timeout, and when the run is cancelled (shutdown), the group and the tree get
SIGTERM, then SIGKILL after a grace period, repeated until nothing is left; every wait is
bounded. Processes a hook leaves behind after it exits are cleaned up the same way, so a run
never outlives itself. Output (stdout and stderr merged) is kept up to a cap and the rest
drained, and reading stops shortly after the processes are gone even if one still holds the
pipe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from dataclasses import dataclass

import structlog
import trio

from imdsd.frames import KINDS, ChangeFrame
from imdsd.hooks.model import RunAs
from imdsd.hooks.tree import ProcessTree

log = structlog.get_logger("imdsd.hooks")

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_CAP = 64 * 1024
KILL_GRACE = 5.0
READ_TAIL = 1.0
_POLL = 0.02
TRACK = 0.02
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


_stuck: set[trio.Process] = set()
"""Hook processes that outlived SIGKILL and the bounded wait, kept to be reaped later."""


class _Processes:
    """A run's processes: the hook, its process group, and its whole tree (setsid escapees).

    Without ``proc``, just the processes of ``tree``.
    """

    def __init__(self, proc: trio.Process | None, tree: ProcessTree) -> None:
        self.proc = proc
        self.tree = tree

    def _group_alive(self) -> bool:
        if self.proc is None:
            return False
        return self.proc.returncode is None or group_alive(self.proc.pid)

    def alive(self) -> bool:
        """True while the hook, a member of its group or a process of its tree is alive."""
        self.tree.observe()
        return self._group_alive() or bool(self.tree.live())

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the group and to every process of the tree."""
        self.tree.observe()
        if self.proc is not None and self._group_alive():
            _signal_group(self.proc.pid, sig)
        self.tree.signal(sig)

    async def track(self) -> None:
        """Look at the tree every ``TRACK`` seconds, so children are known before they escape."""
        while True:
            self.tree.observe()
            await trio.sleep(TRACK)

    async def _gone(self, resend: signal.Signals | None) -> None:
        while self.alive():
            if resend is not None:
                self.send(resend)  # new children of dying processes get it too
            await trio.sleep(_POLL)

    async def terminate(self, grace: float) -> bool:
        """SIGTERM everything, SIGKILL (repeatedly) what is left after ``grace`` seconds.

        Returns False when something still lives ``grace`` seconds after the first SIGKILL.
        """
        self.send(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self._gone(None)
            return True
        self.send(signal.SIGKILL)
        with trio.move_on_after(grace):
            await self._gone(signal.SIGKILL)
            return True
        return False


async def sweep_orphans(kill_grace: float = KILL_GRACE) -> int:
    """Terminate what hooks left below this process (SIGTERM, then SIGKILL) and reap it.

    For a daemon that is a child subreaper (:func:`imdsd.hooks.tree.become_subreaper`): while
    no hook runs, every process below it in another session than its own is something a
    hook left behind that escaped its run's tree. Its own helpers (in its session) and
    processes started after the call are spared (the snapshot is taken before the first
    checkpoint). Returns how many processes were found.
    """
    tree = ProcessTree.below(os.getpid())
    found = len(tree.live())
    if found:
        log.warning("hook leftovers killed", pids=tree.live())
        await _Processes(None, tree).terminate(kill_grace)
    tree.reap()
    return found


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

    If cancelled (shutdown), the group and tree get SIGTERM, then SIGKILL ``kill_grace`` s
    later, before the cancellation propagates (after at most about ``3 * kill_grace`` s).
    When this returns or raises, no process of the group or the tree is alive (barring one
    that survives SIGKILL for longer than ``kill_grace``, e.g. stuck in the kernel, which is
    logged; or one that escaped the tree, see :mod:`imdsd.hooks.tree`).
    """
    start = trio.current_time()
    _stuck.difference_update([p for p in _stuck if p.returncode is not None])
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
    processes = _Processes(proc, ProcessTree(proc.pid))
    output = _Output(output_cap)
    timed_out = False
    leftovers = False
    try:
        async with trio.open_nursery() as nursery:
            assert proc.stdin is not None
            assert proc.stdout is not None
            nursery.start_soon(_feed, proc.stdin, stdin)
            nursery.start_soon(output.collect, proc.stdout)
            nursery.start_soon(processes.track)
            with trio.move_on_after(timeout) as waiting:
                await proc.wait()
            timed_out = waiting.cancelled_caught
            leftovers = not timed_out and processes.alive()
            if timed_out or leftovers:
                await processes.terminate(kill_grace)
            duration = trio.current_time() - start
            with trio.move_on_after(read_tail):
                await output.done.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if processes.alive() and not await processes.terminate(kill_grace):
                log.warning(
                    "hook processes survive SIGKILL",
                    pid=proc.pid,
                    survivors=processes.tree.live() or [proc.pid],
                )
            with trio.move_on_after(kill_grace):
                await proc.wait()
            if proc.returncode is None:
                _stuck.add(proc)  # reaped by a later run, once the kernel lets it go
            processes.tree.reap()
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
        pid=proc.pid,
    )
