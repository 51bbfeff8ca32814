"""Hook sources: [[hook]] entries, <kind>.d directories, file checks, users."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from imdsd.hooks.model import Hook, RunAs
from imdsd.hooks.sources import (
    HookUserError,
    check_hook_file,
    is_ignored_name,
    load_hooks,
    resolve_user,
    scan_directory,
)

ROOT = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")


@dataclass(frozen=True)
class _Entry:
    name: str
    on: list[str]
    command: list[str]
    timeout: float = 60.0
    debounce: float = 1.0
    retries: int = 3
    user: str = ""


@dataclass(frozen=True)
class _Section:
    directory: str


@dataclass(frozen=True)
class _Config:
    hooks: _Section
    hook: list[_Entry] = field(default_factory=list)


def _script(path: Path, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def _names(hooks: list[Hook]) -> list[str]:
    return [h.name for h in hooks]


def test_directory_hooks_in_lexical_order_with_kind_and_revision_args(tmp_path: Path) -> None:
    for name in ("20-b", "10-a", "30-c"):
        _script(tmp_path / "tags.d" / name)
    _script(tmp_path / "disks.d" / "50-mount")
    hooks = scan_directory(str(tmp_path), euid=os.geteuid())
    assert _names(hooks) == ["10-a", "20-b", "30-c", "50-mount"]
    mount = hooks[-1]
    assert mount.kinds == frozenset({"disks"})
    assert mount.argv(7) == [str(tmp_path / "disks.d" / "50-mount"), "disks", "7"]
    assert mount.source == str(tmp_path / "disks.d" / "50-mount")
    assert (mount.timeout, mount.debounce, mount.retries) == (60.0, 1.0, 3)


def test_missing_directory_gives_no_hooks(tmp_path: Path) -> None:
    with capture_logs() as logs:
        assert scan_directory(str(tmp_path / "nope"), euid=0) == []
    assert logs == []


@pytest.mark.parametrize(
    "name",
    [
        ".hidden",
        "10-a~",
        "10-a.dpkg-old",
        "10-a.dpkg-dist",
        "10-a.rpmnew",
        "10-a.rpmsave",
        ".10-a.swp",
        "10-a.swp",
        "#10-a#",
        "10-a.ucf-old",
    ],
)
def test_backup_and_hidden_names_are_ignored_quietly(tmp_path: Path, name: str) -> None:
    assert is_ignored_name(name)
    _script(tmp_path / "tags.d" / name)
    with capture_logs() as logs:
        assert scan_directory(str(tmp_path), euid=os.geteuid()) == []
    assert [e for e in logs if e["log_level"] != "debug"] == []


@pytest.mark.parametrize("name", ["10-a", "mount.sh", "a.d", "rpm-helper"])
def test_ordinary_names_are_not_ignored(name: str) -> None:
    assert not is_ignored_name(name)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        (0o775, "writable by group or others"),
        (0o757, "writable by group or others"),
        (0o644, "not executable"),
        (0o4755, "set-user-ID"),
    ],
)
def test_unsafe_modes_are_skipped_with_a_warning(tmp_path: Path, mode: int, reason: str) -> None:
    path = _script(tmp_path / "tags.d" / "10-a", mode)
    with capture_logs() as logs:
        assert scan_directory(str(tmp_path), euid=os.geteuid()) == []
    [entry] = logs
    assert entry["log_level"] == "warning"
    assert entry["path"] == str(path)
    assert reason in entry["reason"]


def test_non_regular_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "tags.d" / "10-dir").mkdir(parents=True)
    (tmp_path / "tags.d" / "20-dangling").symlink_to(tmp_path / "missing")
    with capture_logs() as logs:
        assert scan_directory(str(tmp_path), euid=os.geteuid()) == []
    assert [e["reason"] for e in logs] == [
        "not a regular file",
        "cannot stat: No such file or directory",
    ]


def test_symlinks_are_followed_and_dev_null_masks(tmp_path: Path) -> None:
    target = _script(tmp_path / "bin" / "real")
    (tmp_path / "tags.d").mkdir()
    (tmp_path / "tags.d" / "10-link").symlink_to(target)
    (tmp_path / "tags.d" / "20-masked").symlink_to(os.devnull)
    with capture_logs() as logs:
        hooks = scan_directory(str(tmp_path), euid=os.geteuid())
    assert _names(hooks) == ["10-link"]
    assert [(e["event"], e["log_level"]) for e in logs] == [("hook masked", "info")]


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_files_owned_by_another_user_are_skipped(tmp_path: Path) -> None:
    path = _script(tmp_path / "tags.d" / "10-a")
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    with capture_logs() as logs:
        assert scan_directory(str(tmp_path), euid=0) == []
    assert f"owned by uid {NOBODY.pw_uid}" in logs[0]["reason"]
    assert check_hook_file(str(path), NOBODY.pw_uid) is None


def test_files_owned_by_the_daemon_user_or_root_are_accepted(tmp_path: Path) -> None:
    path = _script(tmp_path / "x")
    owner = path.stat().st_uid
    assert check_hook_file(str(path), owner) is None
    if owner != 0:
        assert check_hook_file(str(path), owner + 1) is not None


def test_unknown_kind_directories_are_reported(tmp_path: Path) -> None:
    _script(tmp_path / "tag.d" / "10-a")
    with capture_logs() as logs:
        assert scan_directory(str(tmp_path), euid=os.geteuid()) == []
    assert logs[0]["event"] == "hook directory ignored"
    assert logs[0]["path"] == str(tmp_path / "tag.d")


def test_name_collisions_get_the_kind_directory_as_prefix(tmp_path: Path) -> None:
    _script(tmp_path / "tags.d" / "10-log")
    _script(tmp_path / "disks.d" / "10-log")
    _script(tmp_path / "disks.d" / "20-mount")
    _script(tmp_path / "network.d" / "remount")
    config = _Config(
        hooks=_Section(str(tmp_path)),
        hook=[_Entry(name="remount", on=["disks"], command=["/bin/true"])],
    )
    hooks = load_hooks(config)
    assert _names(hooks) == [
        "remount",
        "tags.d/10-log",
        "disks.d/10-log",
        "20-mount",
        "network.d/remount",
    ]


def test_config_hooks_keep_their_settings_and_argv(tmp_path: Path) -> None:
    config = _Config(
        hooks=_Section(str(tmp_path)),
        hook=[
            _Entry(
                name="remount",
                on=["disks", "tags"],
                command=["/usr/local/sbin/remount", "--all", "$(id)"],
                timeout=5.0,
                debounce=2.0,
                retries=0,
            )
        ],
    )
    [hook] = load_hooks(config)
    assert hook == Hook(
        name="remount",
        kinds=frozenset({"disks", "tags"}),
        command=("/usr/local/sbin/remount", "--all", "$(id)"),
        timeout=5.0,
        debounce=2.0,
        retries=0,
    )
    assert hook.argv(9) == ["/usr/local/sbin/remount", "--all", "$(id)"]
    assert hook.source == "config"


def test_bad_config_entries_are_skipped_with_an_error(tmp_path: Path) -> None:
    config = _Config(
        hooks=_Section(str(tmp_path)),
        hook=[
            _Entry(name="a", on=["tag"], command=["/bin/true"]),
            _Entry(name="b", on=["tags"], command=[]),
            _Entry(name="c", on=["tags"], command=["/bin/true"], user="no-such-user-here"),
            _Entry(name="d", on=["tags"], command=["/bin/true"]),
            _Entry(name="d", on=["disks"], command=["/bin/true"]),
        ],
    )
    with capture_logs() as logs:
        hooks = load_hooks(config)
    assert _names(hooks) == ["d"]
    assert [(e["log_level"], e.get("key")) for e in logs] == [
        ("error", "hook[0].on"),
        ("error", "hook[1].command"),
        ("error", "hook[2].user"),
        ("error", None),
    ]
    assert "unknown user 'no-such-user-here'" in logs[2]["reason"]


def test_reloading_an_unchanged_setup_gives_equal_hooks(tmp_path: Path) -> None:
    _script(tmp_path / "tags.d" / "10-a")
    config = _Config(
        hooks=_Section(str(tmp_path)),
        hook=[_Entry(name="x", on=["tags"], command=["/bin/true"], user="nobody")],
    )
    euid = 0 if ROOT else NOBODY.pw_uid
    assert load_hooks(config, euid=euid) == load_hooks(config, euid=euid)


def test_user_switching_needs_root() -> None:
    with pytest.raises(HookUserError, match="needs the daemon to run as root"):
        resolve_user("nobody", 12345)
    assert resolve_user("nobody", NOBODY.pw_uid) is None
    assert resolve_user(str(NOBODY.pw_uid), NOBODY.pw_uid) is None
    assert resolve_user("", 12345) is None


def test_root_resolves_the_user_and_its_groups() -> None:
    run_as = resolve_user("nobody", 0)
    groups = tuple(sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid))))
    assert run_as == RunAs(user="nobody", uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, groups=groups)
    assert resolve_user("root", 0) is None
