"""Hook processes with real scripts: argv, stdin, env, timeouts, process groups, output."""

from __future__ import annotations

import json
import os
import pwd
import signal
import sys
from pathlib import Path

import pytest
import trio
from test_hooks_support import change, tag

from imdsd.frames import ChangeFrame, decode_frame, encode_line
from imdsd.hooks.runner import (
    CLEAN_PATH,
    group_alive,
    hook_environment,
    kinds_present,
    run_hook_process,
)
from imdsd.hooks.sources import resolve_user

FRAME = ChangeFrame(
    revision=12,
    at="2024-01-01T00:00:12Z",
    changes=[change("disks", "attached", "lun:0", new={"lun": 0}), tag("added", "a", new="1")],
    covers=[10, 12],
)
ENV = hook_environment(FRAME, "/run/imdsd/test.sock")


def _script(tmp_path: Path, body: str, name: str = "hook") -> str:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a reaper that never comes (as in some containers)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X")


def test_environment_is_minimal_and_names_the_kinds() -> None:
    assert ENV == {
        "PATH": CLEAN_PATH,
        "LANG": "C.UTF-8",
        "IMDSD_REVISION": "12",
        "IMDSD_KINDS": "tags,disks",
        "IMDSD_SOCKET": "/run/imdsd/test.sock",
    }
    assert kinds_present(FRAME) == ["tags", "disks"]


async def test_stdin_frame_env_and_cwd(tmp_path: Path) -> None:
    hook = _script(
        tmp_path,
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print(json.dumps({'stdin': sys.stdin.read(), 'env': dict(os.environ),"
        " 'cwd': os.getcwd(), 'pgid': os.getpgid(0), 'pid': os.getpid()}))\n",
    )
    result = await run_hook_process([hook], encode_line(FRAME), ENV, timeout=10)
    assert result.ok
    seen = json.loads(result.output)
    assert decode_frame(seen["stdin"].encode()) == FRAME
    assert seen["stdin"].count("\n") == 1
    assert seen["env"] == ENV
    assert seen["cwd"] == "/"
    assert seen["pgid"] == seen["pid"] == result.pid


async def test_arguments_are_never_interpreted_by_a_shell(tmp_path: Path) -> None:
    hook = _script(tmp_path, "#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    pwned = tmp_path / "pwned"
    args = [f"$(touch {pwned})", f"; touch {pwned}", "*", "two words", "`id`", "$HOME", "'q'"]
    result = await run_hook_process([hook, *args], b"", ENV, timeout=10)
    assert result.ok
    assert result.output.decode().splitlines() == args
    assert not pwned.exists()


async def test_exit_status_and_merged_stderr(tmp_path: Path) -> None:
    hook = _script(tmp_path, "#!/bin/sh\necho out\necho err >&2\nexit 3\n")
    result = await run_hook_process([hook], b"", ENV, timeout=10)
    assert (result.ok, result.exit_code, result.timed_out) == (False, 3, False)
    assert sorted(result.output.decode().split()) == ["err", "out"]


async def test_a_missing_program_is_an_error_not_a_crash(tmp_path: Path) -> None:
    result = await run_hook_process([str(tmp_path / "missing")], b"", ENV, timeout=10)
    assert not result.ok
    assert result.exit_code is None
    assert result.error is not None
    assert "missing" in result.error


async def test_timeout_kills_the_whole_group_grandchild_included(tmp_path: Path) -> None:
    hook = _script(tmp_path, "#!/bin/sh\nsleep 1000 &\necho $!\nwait\n")
    start = trio.current_time()
    result = await run_hook_process([hook], b"", ENV, timeout=0.5, kill_grace=0.5)
    assert result.timed_out
    assert result.exit_code == -signal.SIGTERM
    assert trio.current_time() - start < 3
    grandchild = int(result.output.split()[0])
    assert _dead(grandchild)
    assert not group_alive(result.pid or 0)


async def test_sigterm_is_followed_by_sigkill_after_the_grace(tmp_path: Path) -> None:
    hook = _script(
        tmp_path,
        "#!/bin/sh\ntrap '' TERM\n(trap '' TERM; sleep 1000) &\necho $!\n"
        "while :; do sleep 0.05; done\n",
    )
    start = trio.current_time()
    result = await run_hook_process([hook], b"", ENV, timeout=0.3, kill_grace=0.4)
    elapsed = trio.current_time() - start
    assert result.timed_out
    assert result.exit_code == -signal.SIGKILL
    assert 0.6 < elapsed < 3
    assert _dead(int(result.output.split()[0]))


async def test_leftover_processes_are_cleaned_up_and_do_not_hang_the_reader(
    tmp_path: Path,
) -> None:
    hook = _script(tmp_path, "#!/bin/sh\nsleep 1000 &\necho $!\nexit 0\n")
    start = trio.current_time()
    result = await run_hook_process([hook], b"", ENV, timeout=10, kill_grace=0.5)
    assert trio.current_time() - start < 2
    assert result.ok
    assert result.leftovers
    assert _dead(int(result.output.split()[0]))


async def test_an_escaped_process_holding_stdout_does_not_hang_the_reader(
    tmp_path: Path,
) -> None:
    hook = _script(
        tmp_path,
        f"#!{sys.executable}\n"
        "import os, subprocess\n"
        "p = subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
        "print(p.pid, flush=True)\n",
    )
    start = trio.current_time()
    result = await run_hook_process([hook], b"", ENV, timeout=10, read_tail=0.3)
    escaped = int(result.output.split()[0])
    try:
        assert result.ok
        assert trio.current_time() - start < 3
    finally:
        os.kill(escaped, signal.SIGKILL)


async def test_output_is_capped_and_the_rest_drained(tmp_path: Path) -> None:
    hook = _script(
        tmp_path,
        f"#!{sys.executable}\nimport sys\nsys.stdout.write('x' * 200_000)\n",
    )
    result = await run_hook_process([hook], b"", ENV, timeout=10, output_cap=65536)
    assert result.ok
    assert len(result.output) == 65536
    assert result.dropped == 200_000 - 65536


async def test_a_hook_that_ignores_a_large_stdin_is_fine(tmp_path: Path) -> None:
    hook = _script(tmp_path, "#!/bin/sh\nexit 0\n")
    result = await run_hook_process([hook], b"y" * 1_000_000, ENV, timeout=10)
    assert result.ok


async def test_cancellation_kills_the_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    hook = _script(tmp_path, f"#!/bin/sh\nsleep 1000 &\necho $! > {pidfile}\nwait\n")
    with trio.move_on_after(0.5):
        await run_hook_process([hook], b"", ENV, timeout=100)
    assert _dead(int(pidfile.read_text()))


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_runs_as_the_configured_user_with_its_groups() -> None:
    run_as = resolve_user("nobody", 0)
    assert run_as is not None
    result = await run_hook_process(
        ["/bin/sh", "-c", "id -u; id -g; id -G"], b"", ENV, timeout=10, run_as=run_as
    )
    assert result.ok, result
    uid, gid, groups = result.output.decode().splitlines()
    nobody = pwd.getpwnam("nobody")
    assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
    assert sorted(map(int, groups.split())) == sorted(run_as.groups)
