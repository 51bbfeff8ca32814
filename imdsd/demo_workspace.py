"""The files of one ``imdsd demo`` run: a temporary directory, the daemon's configuration,
the example hook script, and the daemon's environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from imdsd.frames import KINDS
from imdsd.tomlwriter import toml_value

HOOK_NAME: Final = "demo-hook"
SOCKET_PATH_MAX: Final = 100
_UNSET_ENV: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "IMDSD_SOCKET",
)


HOOK_SCRIPT: Final = '''\
"""imdsd demo hook: append a one-line summary of the change frame on stdin to a log file."""

import json
import os
import sys

frame = json.load(sys.stdin)
changes = "; ".join(f"{c['kind']} {c['op']} {c['key']}" for c in frame["changes"])
revision = os.environ.get("IMDSD_REVISION", "?")
line = f"revision {revision} [{os.environ.get('IMDSD_KINDS', '')}]: {changes}"
with open(sys.argv[1], "a", encoding="utf-8") as log:
    log.write(line + "\\n")
print(line)
'''


def daemon_config_text(endpoint: str, workdir: str, hook_command: list[str]) -> str:
    """The daemon configuration of the demo: lively polling, everything inside ``workdir``."""
    return f"""\
# Written by `imdsd demo`.
[imds]
endpoint = {toml_value(endpoint)}

[poll]
instance = "1s"
scheduled_events = "1s"
loadbalancer = "60s"

[server]
socket = {toml_value(os.path.join(workdir, "imdsd.sock"))}
socket_group = ""
heartbeat = "5s"

[state]
directory = {toml_value(os.path.join(workdir, "state"))}

[hooks]
directory = {toml_value(os.path.join(workdir, "hooks.d"))}

[[hook]]
name = {toml_value(HOOK_NAME)}
on = {toml_value(list(KINDS))}
command = {toml_value(hook_command)}
timeout = "10s"
debounce = "0s"
retries = 1

[log]
level = "info"
format = "json"
"""


@dataclass
class Workspace:
    """The files of one demo run inside its temporary directory."""

    root: str

    @property
    def socket(self) -> str:
        """The daemon's socket."""
        return os.path.join(self.root, "imdsd.sock")

    @property
    def config(self) -> str:
        """The daemon's configuration file."""
        return os.path.join(self.root, "imdsd.toml")

    @property
    def hook(self) -> str:
        """The example hook script."""
        return os.path.join(self.root, "demo-hook.py")

    @property
    def hook_log(self) -> str:
        """Where the example hook appends its summaries."""
        return os.path.join(self.root, "demo-hook.log")

    @property
    def daemon_log(self) -> str:
        """The daemon's captured stdout and stderr."""
        return os.path.join(self.root, "daemon.log")

    def write(self, endpoint: str) -> None:
        """Write the hook script and the daemon configuration, create the directories."""
        os.makedirs(os.path.join(self.root, "state"), exist_ok=True)
        os.makedirs(os.path.join(self.root, "hooks.d"), exist_ok=True)
        Path(self.hook).write_text(HOOK_SCRIPT, encoding="utf-8")
        command = [sys.executable, self.hook, self.hook_log]
        Path(self.config).write_text(
            daemon_config_text(endpoint, self.root, command), encoding="utf-8"
        )

    def hook_log_lines(self) -> int:
        """How many runs the hook logged."""
        try:
            return len(Path(self.hook_log).read_text(encoding="utf-8").splitlines())
        except OSError:
            return 0


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    """A fresh temporary directory (short enough for a unix socket path), removed at the end."""
    root = tempfile.mkdtemp(prefix="imdsd-demo-")
    if len(os.path.join(root, "imdsd.sock")) > SOCKET_PATH_MAX:
        os.rmdir(root)
        root = tempfile.mkdtemp(prefix="imdsd-demo-", dir="/tmp")
    try:
        yield Workspace(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def daemon_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment: no systemd hand-over variables, imdsd importable."""
    env = {k: v for k, v in environ.items() if k not in _UNSET_ENV}
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env
