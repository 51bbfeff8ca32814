"""The systemd units in systemd/: `systemd-analyze verify` is silent, exposure stays low.

The units are copied to tmp_path as they are, except that ExecStart's /usr/bin/imdsd (not
installed on a development machine) points at this checkout's imdsd; verify checks that the
executable exists. The hardened variant is the same directory plus the drop-in in
imdsd.service.d/, which is how systemd (and systemd-analyze) finds drop-ins.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED_IMDSD = "/usr/bin/imdsd"
HARDENED_EXPOSURE_GOAL = 2.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian/Ubuntu package: systemd)",
)


def _local_imdsd() -> str:
    return shutil.which("imdsd", path=str(Path(sys.executable).parent)) or sys.executable


def _unit_dir(target: Path, *, hardened: bool) -> Path:
    target.mkdir()
    service = (SYSTEMD_DIR / "imdsd.service").read_text()
    assert service.count(f"ExecStart={INSTALLED_IMDSD} ") == 1
    (target / "imdsd.service").write_text(service.replace(INSTALLED_IMDSD, _local_imdsd()))
    shutil.copy(SYSTEMD_DIR / "imdsd.socket", target)
    if hardened:
        (target / "imdsd.service.d").mkdir()
        shutil.copy(SYSTEMD_DIR / "imdsd-hardened.conf", target / "imdsd.service.d/hardened.conf")
    return target


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "--no-pager", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _exposure(unit_dir: Path) -> float:
    done = _analyze("security", "--offline=yes", "imdsd.service", cwd=unit_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"Overall exposure level for imdsd\.service: (\d+\.\d)", done.stdout)
    assert match, done.stdout
    return float(match.group(1))


def _settings(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in order (sections are not told apart)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize("hardened", [False, True], ids=["base", "hardened"])
def test_verify_is_silent(tmp_path: Path, hardened: bool) -> None:
    unit_dir = _unit_dir(tmp_path / "units", hardened=hardened)
    done = _analyze("verify", "imdsd.service", "imdsd.socket", cwd=unit_dir)
    output = (done.stdout + done.stderr).strip()
    assert output == "", f"systemd-analyze verify said:\n{output}"
    assert done.returncode == 0


def test_security_exposure(tmp_path: Path) -> None:
    base = _exposure(_unit_dir(tmp_path / "base", hardened=False))
    hardened = _exposure(_unit_dir(tmp_path / "hardened", hardened=True))
    print(f"systemd-analyze security exposure: base {base}, hardened {hardened}")
    assert hardened <= HARDENED_EXPOSURE_GOAL, f"hardened exposure {hardened} (base {base})"
    assert base > hardened, "the drop-in was not applied"


def test_service_settings() -> None:
    service = _settings(SYSTEMD_DIR / "imdsd.service")
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "ExecStart": [f"{INSTALLED_IMDSD} run -c /etc/imdsd/imdsd.toml"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "WatchdogSec": ["30s"],
        "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["78"],
        "RuntimeDirectory": ["imdsd"],
        "RuntimeDirectoryPreserve": ["yes"],
        "StateDirectory": ["imdsd"],
        "ConfigurationDirectory": ["imdsd"],
        "Requires": ["imdsd.socket"],
    }
    assert {key: service.get(key) for key in expected} == expected


def test_base_service_sets_up_no_mount_namespace() -> None:
    # Any of these gives the service a mount namespace whose mounts do not propagate to the
    # host, so a data disk mounted by a root hook would be invisible outside the service
    # (ProtectHostname: a UTS namespace, so a hook could not rename the host).
    namespacing = {
        "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectHome", "ProtectSystem",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectProc", "ProcSubset", "ProtectHostname", "ReadOnlyPaths",
        "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
        "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountFlags", "DynamicUser",
    }  # fmt: skip
    assert namespacing.isdisjoint(_settings(SYSTEMD_DIR / "imdsd.service"))


def test_socket_settings() -> None:
    socket_unit = _settings(SYSTEMD_DIR / "imdsd.socket")
    expected = {
        "ListenStream": ["/run/imdsd/imdsd.sock"],
        "SocketMode": ["0660"],
        "SocketGroup": ["imdsd"],
        "FileDescriptorName": ["api"],
        "Service": ["imdsd.service"],
    }
    assert {key: socket_unit.get(key) for key in expected} == expected


def test_hardened_drop_in_allows_only_the_imds_address() -> None:
    drop_in = _settings(SYSTEMD_DIR / "imdsd-hardened.conf")
    assert drop_in["IPAddressDeny"] == ["any"]
    assert drop_in["IPAddressAllow"] == ["169.254.169.254"]
    assert drop_in["User"] == ["imdsd"]
    assert drop_in["CapabilityBoundingSet"] == [""]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_sysusers_creates_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "-"],
        input=(SYSTEMD_DIR / "imdsd.sysusers").read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert all(line.startswith("Creating ") for line in done.stderr.splitlines()), done.stderr
    [group] = (tmp_path / "etc/group").read_text().splitlines()
    [user] = (tmp_path / "etc/passwd").read_text().splitlines()
    gid = group.split(":")[2]
    assert group.startswith("imdsd:x:")
    assert user.startswith("imdsd:x:")
    assert user.split(":")[3] == gid
    assert user.endswith(":/var/lib/imdsd:/usr/sbin/nologin")
