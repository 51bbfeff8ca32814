"""What a reload can apply at once and what it logs as needing a restart (no I/O)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from imdsd.config import Config
from imdsd.daemon_reload import restart_settings


def changed(section: str, **fields: Any) -> Config:
    """The default configuration with ``fields`` of ``[section]`` replaced."""
    base = Config()
    return msgspec.structs.replace(
        base, **{section: msgspec.structs.replace(getattr(base, section), **fields)}
    )


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (Config(), []),
        (changed("server", socket="/run/other.sock"), ["server.socket"]),
        (
            changed("server", socket_mode=0o600, socket_group="wheel"),
            ["server.socket_mode", "server.socket_group"],
        ),
        (changed("state", history=10), ["state"]),
        (changed("metrics", listen="127.0.0.1:9469"), ["metrics.listen"]),
        (changed("front", listen="127.0.0.1:8080"), ["front.listen"]),
        # applied at once
        (changed("server", max_connections=10, heartbeat=5.0), []),
        (changed("front", queue_timeout=1.0, token_cache=False, redirect=True), []),
        (changed("imds", max_requests_per_second=2.0), []),
        (changed("hooks", max_parallel=1), []),
    ],
)
def test_restart_settings(new: Config, expected: list[str]) -> None:
    assert restart_settings(Config(), new) == expected
    assert restart_settings(new, Config()) == expected
