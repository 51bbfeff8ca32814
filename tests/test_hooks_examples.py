"""The example hooks shipped in conf/hooks.d load cleanly and do what they say."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from test_hooks_support import change, tag

from imdsd.frames import ChangeFrame, encode_line
from imdsd.hooks.runner import hook_environment, run_hook_process
from imdsd.hooks.sources import check_hook_file, scan_directory

EXAMPLES = Path(__file__).resolve().parents[1] / "conf" / "hooks.d"


@pytest.fixture
def hooks_dir(tmp_path: Path) -> Path:
    """The examples copied as an installer would: owned by us, mode 0755."""
    target = tmp_path / "hooks.d"
    shutil.copytree(EXAMPLES, target)
    for path in target.rglob("*"):
        if path.is_file():
            path.chmod(0o755)
    return target


def test_examples_are_executable_and_not_writable_by_others() -> None:
    files = sorted(p for p in EXAMPLES.rglob("*") if p.is_file())
    assert [p.relative_to(EXAMPLES).as_posix() for p in files] == [
        "disks.d/10-list-block-devices",
        "tags.d/10-log-tags",
    ]
    for path in files:
        mode = path.stat().st_mode
        assert mode & stat.S_IXUSR, path
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), path


def test_examples_load_as_directory_hooks(hooks_dir: Path) -> None:
    hooks = scan_directory(str(hooks_dir), euid=os.geteuid())
    assert [(h.name, sorted(h.kinds)) for h in hooks] == [
        ("10-log-tags", ["tags"]),
        ("10-list-block-devices", ["disks"]),
    ]
    assert all(check_hook_file(h.command[0], os.geteuid()) is None for h in hooks)


async def test_log_tags_describes_each_tag_change(hooks_dir: Path) -> None:
    frame = ChangeFrame(
        revision=9,
        at="2024-01-01T00:00:09Z",
        changes=[
            tag("added", "env", new="prod"),
            tag("modified", "team", "a", "b"),
            tag("removed", "old", old="x"),
        ],
        covers=[7, 9],
    )
    [hook] = [
        h for h in scan_directory(str(hooks_dir), euid=os.geteuid()) if h.name == "10-log-tags"
    ]
    result = await run_hook_process(
        hook.argv(9), encode_line(frame), hook_environment(frame, "/s"), timeout=10
    )
    assert result.ok, result
    assert result.output.decode().splitlines() == [
        "tag 'env' added with value 'prod' (revisions 7..9)",
        "tag 'team' changed from 'a' to 'b' (revisions 7..9)",
        "tag 'old' removed, it was 'x' (revisions 7..9)",
    ]


async def test_log_tags_rejects_a_garbled_frame(hooks_dir: Path) -> None:
    script = str(hooks_dir / "tags.d" / "10-log-tags")
    frame = ChangeFrame(revision=1, at="t", changes=[])
    result = await run_hook_process(
        [script, "tags", "1"], b"not json\n", hook_environment(frame, "/s"), timeout=10
    )
    assert result.exit_code == 1
    assert b"cannot read the change frame" in result.output


@pytest.mark.skipif(shutil.which("lsblk") is None, reason="lsblk is not installed")
async def test_list_block_devices_names_the_disks_then_lists_devices(hooks_dir: Path) -> None:
    frame = ChangeFrame(
        revision=4,
        at="2024-01-01T00:00:04Z",
        changes=[
            change("disks", "attached", "lun:0", new={"lun": 0}),
            change("disks", "modified", "lun:1", {"diskSizeGB": 1}, {"diskSizeGB": 2}),
        ],
    )
    script = str(hooks_dir / "disks.d" / "10-list-block-devices")
    result = await run_hook_process(
        [script, "disks", "4"], encode_line(frame), hook_environment(frame, "/s"), timeout=10
    )
    assert result.ok, result
    lines = result.output.decode().splitlines()
    assert lines[:3] == ["disk changes at revision 4:", "  lun:0 attached", "  lun:1 modified"]
    assert lines[3].split()[:2] == ["NAME", "HCTL"]
