"""File descriptor limit for ``server.max_connections``: the plan and a daemon under a low limit."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio
from daemon_support import daemon, emulator, write_config

from imdsd import daemon as daemon_module
from imdsd.config import load_config
from imdsd.fdlimit import BASE_RESERVE, HOOK_RESERVE, FdLimitError, plan_fd_limit, reserve
from imdsd.httpio import ClientConnection, open_unix

INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(
    ("max_connections", "soft", "hard", "expected_soft"),
    [
        (2048, 1024, 524288, 2148),  # systemd's default 1024:524288: raised to what is needed
        (2048, 1024, INF, 2148),
        (2048, 2148, 2148, 2148),  # exactly enough
        (2048, 8192, 8192, 8192),  # never lowered
        (2048, INF, INF, INF),
        (100, 1024, 1024, 1024),
        (1, 101, 101, 101),
    ],
)
def test_the_soft_limit_is_raised_as_far_as_needed(
    max_connections: int, soft: int, hard: int, expected_soft: int
) -> None:
    plan = plan_fd_limit(max_connections, 100, soft, hard)
    assert plan.soft == expected_soft
    assert plan.needed == max_connections + 100
    assert plan.raised == (expected_soft != soft)
    assert plan.hard == hard


@pytest.mark.parametrize(
    ("max_connections", "hard", "fix"),
    [
        (2048, 1024, "lower server.max_connections to at most 924 or raise LimitNOFILE="),
        (2048, 2147, "lower server.max_connections to at most 2047 or raise LimitNOFILE="),
        (10, 100, ": raise LimitNOFILE="),
        (10, 50, ": raise LimitNOFILE="),
    ],
)
def test_a_limit_that_cannot_carry_max_connections_is_refused(
    max_connections: int, hard: int, fix: str
) -> None:
    with pytest.raises(FdLimitError) as caught:
        plan_fd_limit(max_connections, 100, 64, hard)
    message = str(caught.value)
    assert "\n" not in message
    assert f"server.max_connections = {max_connections} needs {max_connections + 100}" in message
    assert f"RLIMIT_NOFILE is {hard}" in message
    assert fix in message


def test_the_reserve_grows_with_parallel_hooks_and_listeners() -> None:
    assert reserve(4) == BASE_RESERVE + 4 * HOOK_RESERVE == 80
    assert reserve(1, {"front": 4096, "metrics": 64}) == BASE_RESERVE + HOOK_RESERVE + 4160


LOW_LIMIT = (
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({}, {})); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def test_a_daemon_whose_hard_limit_is_too_low_exits_78_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    argv = [sys.executable, "-c", LOW_LIMIT.format(512, 512), sys.executable, "-m", "imdsd"]
    done = subprocess.run(
        [*argv, "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78, done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("imdsd: server.max_connections = 2048 needs 2128 ")
    assert "hard RLIMIT_NOFILE is 512" in done.stderr
    assert "lower server.max_connections to at most 432 or raise LimitNOFILE=" in done.stderr


async def test_a_daemon_raises_its_soft_limit_and_serves_beyond_it(tmp_path: Path) -> None:
    async with emulator() as emu:
        config = write_config(tmp_path, emu.endpoint)
        text = config.read_text()
        config.write_text(
            text.replace('heartbeat = "1s"', 'heartbeat = "1s"\nmax_connections = 400')
        )
        prefix = [sys.executable, "-c", LOW_LIMIT.format(128, 4096)]
        async with daemon(config, argv_prefix=prefix) as proc:
            await proc.wait_ready()
            limits = await trio.Path(f"/proc/{proc.process.pid}/limits").read_text()
            line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
            assert line.split()[3:5] == ["480", "4096"]  # 400 + 64 + 4 * 4 hooks
            idle = [ClientConnection(await open_unix(proc.socket, 5)) for _ in range(300)]
            with trio.fail_after(10):
                while True:
                    health = msgspec.json.decode((await proc.get("/v1/health")).body)
                    if health["connections"] == 301:
                        break
                    await trio.sleep(0.05)
            assert len(list(await trio.Path(f"/proc/{proc.process.pid}/fd").iterdir())) > 300
            for conn in idle:
                await conn.aclose()
            assert await proc.stop() == 0


def test_a_reload_keeps_max_connections_the_limit_cannot_carry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(str(write_config(tmp_path, "http://127.0.0.1:9")))
    running = daemon_module.Daemon(config, None)
    bigger = msgspec.structs.replace(
        config, server=msgspec.structs.replace(config.server, max_connections=10**6)
    )
    seen: list[tuple[int, int]] = []

    def hard_limit_of_4096(max_connections: int, reserved: int) -> object:
        seen.append((max_connections, reserved))
        return plan_fd_limit(max_connections, reserved, 1024, 4096)

    monkeypatch.setattr(daemon_module, "ensure_fd_limit", hard_limit_of_4096)
    assert running._carried(bigger, 2048).max_connections == 2048
    assert running._carried(config, 2048) is config.server
    assert seen == [(10**6, 80), (2048, 80)]
