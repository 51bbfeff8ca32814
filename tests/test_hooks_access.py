"""A hook sees what the socket would show its uid: restricted values are redacted."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from test_hooks_dispatcher import _dispatcher, running, until
from test_hooks_support import FakeLedger, change, tag

from imdsd.api.access import REDACTED, AccessPolicy
from imdsd.config import load_config
from imdsd.daemon import Daemon
from imdsd.frames import ChangeFrame
from imdsd.hooks.access import frame_for_hook, hook_peer
from imdsd.hooks.model import Hook, RunAs
from imdsd.hooks.sources import resolve_user

POLICY = AccessPolicy(["compute/userData", "compute/customData"], allow_uids=[0], allow_gids=[50])
FRAME = ChangeFrame(
    revision=3,
    at="2024-01-01T00:00:03Z",
    changes=[
        change("compute", "modified", "userData", old="b2xk", new="c2VjcmV0"),
        change("compute", "modified", "customData", old="", new="aGlkZGVu"),
        tag("added", "env", new="prod"),
    ],
)
NOBODY = RunAs(user="nobody", uid=65534, gid=65534, groups=(65534,))


def _values(frame: ChangeFrame) -> list[tuple[str, object, object]]:
    return [(c.key, c.old, c.new) for c in frame.changes]


def test_a_hook_running_as_an_unprivileged_user_gets_restricted_values_redacted() -> None:
    seen = frame_for_hook(FRAME, NOBODY, POLICY, euid=0, egid=0)
    assert _values(seen) == [
        ("userData", REDACTED, REDACTED),
        ("customData", REDACTED, REDACTED),
        ("env", None, "prod"),
    ]
    assert [c.fields for c in seen.changes] == [c.fields for c in FRAME.changes]


def test_the_daemons_own_identity_applies_when_no_user_is_set() -> None:
    assert frame_for_hook(FRAME, None, POLICY, euid=0, egid=0) is FRAME
    redacted = frame_for_hook(FRAME, None, POLICY, euid=1000, egid=1000)
    assert _values(redacted)[0] == ("userData", REDACTED, REDACTED)
    assert hook_peer(None, 1000, 1000).uid == 1000


def test_an_allowed_uid_or_primary_gid_sees_everything() -> None:
    allowed_uid = RunAs(user="u", uid=0, gid=1000, groups=(1000,))
    allowed_gid = RunAs(user="u", uid=1000, gid=50, groups=(50,))
    supplementary_only = RunAs(user="u", uid=1000, gid=1000, groups=(50, 1000))
    assert frame_for_hook(FRAME, allowed_uid, POLICY, 0, 0) is FRAME
    assert frame_for_hook(FRAME, allowed_gid, POLICY, 0, 0) is FRAME
    # like SO_PEERCRED on the socket: supplementary groups do not count
    assert frame_for_hook(FRAME, supplementary_only, POLICY, 0, 0) != FRAME


def test_nothing_restricted_means_nothing_redacted() -> None:
    assert frame_for_hook(FRAME, NOBODY, AccessPolicy(), 0, 0) is FRAME


def _cat_hook(name: str, user: str) -> Hook:
    return Hook(
        name=name,
        kinds=frozenset({"compute"}),
        command=("/bin/cat",),
        debounce=0.0,
        run_as=resolve_user(user, 0) if user else None,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="running a hook as another user needs root")
async def test_a_hook_run_as_nobody_receives_what_the_socket_shows_nobody() -> None:
    ledger = FakeLedger()
    hooks = [_cat_hook("as-nobody", "nobody"), _cat_hook("as-root", "")]
    secret = "c2VjcmV0"
    with capture_logs() as logs:
        async with running(_dispatcher(hooks, ledger, policy=POLICY)):
            ledger.append(change("compute", "modified", "userData", old="", new=secret))
            await until(lambda: all(ledger.delivered(h.name) == 1 for h in hooks))
    frames = {e["hook"]: json.loads(e["output"]) for e in logs if e["event"] == "hook finished"}
    assert frames["as-nobody"]["changes"][0]["new"] == REDACTED
    assert secret not in json.dumps(frames["as-nobody"])
    assert frames["as-root"]["changes"][0]["new"] == secret
    assert pwd.getpwnam("nobody").pw_uid not in POLICY.allow_uids


def _daemon_config(tmp_path: Path, allow_uids: list[int]) -> Path:
    path = tmp_path / "imdsd.toml"
    path.write_text(
        f"""
[imds]
endpoint = "http://127.0.0.1:9"
[server]
socket = "{tmp_path}/imdsd.sock"
socket_group = ""
restricted_allow_uids = {allow_uids}
[state]
directory = "{tmp_path}/state"
[hooks]
directory = "{tmp_path}/hooks.d"
"""
    )
    return path


async def test_the_daemon_gives_its_hooks_the_socket_policy_also_after_a_reload(
    tmp_path: Path,
) -> None:
    path = _daemon_config(tmp_path, [0])
    daemon = Daemon(load_config(str(path)), str(path))
    assert daemon.hooks.policy is daemon.api.policy
    seen = frame_for_hook(FRAME, NOBODY, daemon.hooks.policy, 0, 0)
    assert _values(seen)[0] == ("userData", REDACTED, REDACTED)
    _daemon_config(tmp_path, [0, NOBODY.uid])
    assert await daemon.reload()
    assert daemon.hooks.policy is daemon.api.policy
    assert frame_for_hook(FRAME, NOBODY, daemon.hooks.policy, 0, 0) is FRAME
