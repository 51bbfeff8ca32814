"""packaging/: the Debian package builds, installs, runs and purges; the RPM spec agrees with it
and builds.

The package test needs the Debian build dependencies (apt-get install --no-install-recommends
build-essential debhelper dh-virtualenv python3-venv), PyPI, and root for dpkg -i; it is
skipped, saying which, when one is missing. It installs the package on this machine and purges
it again, also when something fails. The RPM test needs Debian's ``rpm`` (rpmbuild), which has
no systemd or Python RPM macros: it defines those, the scriptlets' as no-ops, so it checks the
spec's %prep, %install and %files and the package's contents, not its scriptlets.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest

from imdsd import __version__

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
DEBIAN = PACKAGING / "debian"
SPEC = PACKAGING / "rpm" / "imdsd.spec"
APT_COMMAND = (
    "apt-get install --no-install-recommends build-essential debhelper dh-virtualenv python3-venv"
)
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_virtualenv", "dh_installsysusers", "systemd-analyze")
UNITS = ("/lib/systemd/system/imdsd.service", "/lib/systemd/system/imdsd.socket")
# Files of the repository that both packages ship.
SHIPPED = (
    "systemd/imdsd.service",
    "systemd/imdsd.socket",
    "systemd/imdsd.sysusers",
    "systemd/imdsd-hardened.conf",
    "conf/imdsd.toml",
    "README.md",
)


def _missing_build_dependencies() -> list[str]:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    venv_ok = Path("/usr/bin/python3").exists() and (
        subprocess.run(
            ["/usr/bin/python3", "-c", "import ensurepip, venv"], capture_output=True, check=False
        ).returncode
        == 0
    )
    if not venv_ok:
        missing.append("python3-venv")
    return missing


def _clean_env() -> dict[str, str]:
    """The environment minus this checkout's virtualenv, as a package build or a user sees it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if p and p != venv_bin)
    env["PATH"] = env["PATH"] or "/usr/sbin:/usr/bin:/sbin:/bin"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=_clean_env(), check=False
    )


def _installed(package: str) -> bool:
    done = _run("dpkg-query", "-W", "-f=${db:Status-Status}", package)
    return done.returncode == 0 and done.stdout not in ("", "not-installed", "config-files")


def _exists(database: str, key: str) -> bool:
    return _run("getent", database, key).returncode == 0


def test_versions_agree() -> None:
    changelog = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"imdsd ({__version__}) ")
    spec_version = re.search(r"^Version:\s+(\S+)$", SPEC.read_text(), re.MULTILINE)
    assert spec_version
    assert spec_version.group(1) == __version__


def test_both_packages_ship_the_same_files() -> None:
    debian = "\n".join(
        (DEBIAN / name).read_text() for name in ("imdsd.install", "imdsd.docs", "rules")
    )
    spec = SPEC.read_text()
    for path in SHIPPED:
        assert (ROOT / path).is_file(), path
        assert path in debian, f"the Debian package does not ship {path}"
        assert path in spec, f"the RPM spec does not ship {path}"
    for line in (DEBIAN / "imdsd.install").read_text().splitlines():
        assert (ROOT / line.split()[0]).is_file(), line


def test_spec_and_debian_use_the_same_layout() -> None:
    spec = SPEC.read_text()
    assert "%global venv /opt/venvs/imdsd" in spec
    assert "ln -s %{venv}/bin/imdsd %{buildroot}%{_bindir}/imdsd" in spec
    assert "%config(noreplace) %{_sysconfdir}/imdsd/imdsd.toml" in spec
    assert "%{_sysusersdir}/imdsd.conf" in spec
    assert (DEBIAN / "imdsd.links").read_text().split() == [
        "opt/venvs/imdsd/bin/imdsd",
        "usr/bin/imdsd",
    ]
    assert "DH_VIRTUALENV_INSTALL_ROOT = /opt/venvs" in (DEBIAN / "rules").read_text()


@pytest.mark.slow
def test_deb_builds_installs_runs_and_purges(tmp_path: Path) -> None:
    missing = _missing_build_dependencies()
    if missing:
        pytest.skip(f"Debian build dependencies missing ({', '.join(missing)}): {APT_COMMAND}")
    if os.geteuid() != 0:
        pytest.skip("installing the package with dpkg -i needs root")
    if _installed("imdsd"):
        pytest.skip(
            "a package imdsd is installed on this machine; not replacing it (dpkg -P imdsd)"
        )

    build = _run(str(PACKAGING / "build-deb"), str(tmp_path), timeout=900)
    assert build.returncode == 0, build.stderr
    [deb] = tmp_path.glob(f"imdsd_{__version__}_*.deb")
    had_user, had_group = _exists("passwd", "imdsd"), _exists("group", "imdsd")
    try:
        install = _run("dpkg", "-i", str(deb), timeout=300)
        assert install.returncode == 0, install.stdout + install.stderr

        version = _run("/usr/bin/imdsd", "--version")
        assert (version.returncode, version.stdout.strip()) == (0, f"imdsd {__version__}")

        check = _run("/usr/bin/imdsd", "check-config")
        assert check.returncode == 0, check.stderr
        assert "imds" in tomllib.loads(check.stdout)

        verify = _run("systemd-analyze", "--no-pager", "verify", *UNITS)
        assert (verify.stdout + verify.stderr).strip() == ""
        assert verify.returncode == 0

        conffiles = _run("dpkg-query", "-W", "-f=${Conffiles}", "imdsd").stdout.split()
        assert "/etc/imdsd/imdsd.toml" in conffiles
        assert Path("/usr/lib/sysusers.d/imdsd.conf").is_file()
        assert _exists("group", "imdsd"), "postinst did not create the group imdsd"
        assert Path("/usr/share/imdsd/imdsd-hardened.conf").is_file()
    finally:
        purge = _run("dpkg", "-P", "imdsd", timeout=300)
        if not had_user and _exists("passwd", "imdsd"):
            _run("userdel", "imdsd")
        if not had_group and _exists("group", "imdsd"):
            _run("groupdel", "imdsd")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not _installed("imdsd")
    assert not os.path.lexists("/usr/bin/imdsd")
    assert not Path("/opt/venvs/imdsd").exists()


RPM_MACROS = {
    "python3": "/usr/bin/python3",
    "python3_version": "3.11",
    "_unitdir": "/usr/lib/systemd/system",
    "_sysusersdir": "/usr/lib/sysusers.d",
    "systemd_post()": ":",
    "systemd_preun()": ":",
    "systemd_postun_with_restart()": ":",
    "sysusers_create_compat()": ":",
}


@pytest.mark.slow
def test_rpm_builds_with_the_debian_layout(tmp_path: Path) -> None:
    if shutil.which("rpmbuild") is None or shutil.which("rpm2archive") is None:
        pytest.skip("rpmbuild missing: apt-get install --no-install-recommends rpm")
    if "python3-venv" in _missing_build_dependencies():
        pytest.skip(f"/usr/bin/python3 cannot make a virtualenv: {APT_COMMAND}")
    sources = tmp_path / "SOURCES"
    sources.mkdir()
    archive = sources / f"imdsd-{__version__}.tar.gz"
    done = _run("git", "-C", str(ROOT), "archive", f"--prefix=imdsd-{__version__}/", "-o",
                str(archive), "HEAD")  # fmt: skip
    assert done.returncode == 0, done.stderr
    shutil.copy(ROOT / "systemd" / "imdsd.sysusers", sources)
    defines = [arg for name, value in RPM_MACROS.items() for arg in ("--define", f"{name} {value}")]
    build = _run("rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {tmp_path}", *defines,
                 str(SPEC), timeout=600)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    [rpm] = (tmp_path / "RPMS").glob(f"*/imdsd-{__version__}-1*.rpm")

    files = set(_run("rpm", "-qlp", str(rpm)).stdout.split())
    for path in (
        "/usr/bin/imdsd",
        "/opt/venvs/imdsd/bin/imdsd",
        "/usr/lib/systemd/system/imdsd.service",
        "/usr/lib/systemd/system/imdsd.socket",
        "/usr/lib/sysusers.d/imdsd.conf",
        "/usr/share/imdsd/imdsd-hardened.conf",
        "/etc/imdsd/hooks.d",
    ):
        assert path in files, path
    assert not any(path.startswith("/usr/lib/.build-id") for path in files)
    assert _run("rpm", "-qp", "--configfiles", str(rpm)).stdout.split() == ["/etc/imdsd/imdsd.toml"]

    assert _run("rpm2archive", str(rpm)).returncode == 0
    root = tmp_path / "root"
    with tarfile.open(f"{rpm}.tgz") as tar:
        tar.extractall(root, filter="tar")
    venv = root / "opt" / "venvs" / "imdsd"
    for text in ((venv / "pyvenv.cfg").read_text(), (venv / "bin" / "imdsd").read_text()):
        assert str(tmp_path) not in text  # no build root left in the virtualenv
    assert (venv / "bin" / "imdsd").read_text().startswith("#!/opt/venvs/imdsd/bin/python")
    assert os.readlink(root / "usr" / "bin" / "imdsd") == "/opt/venvs/imdsd/bin/imdsd"
    version = _run(str(venv / "bin" / "python"), "-m", "imdsd", "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"imdsd {__version__}")
