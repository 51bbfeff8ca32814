"""Create the project's virtual environment with nothing but python3 (>= 3.11).

Debian and Ubuntu ship python3 without ensurepip unless python3-venv is installed, so when
`python -m venv` cannot provide pip we create the environment without it and install pip from
its wheel on PyPI. Then the project is installed in editable mode with the extras asked for.
Usage: python3 .ci/venv.py VENV_DIR EXTRAS   (EXTRAS like "test" or "" )
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

MIN_PYTHON = (3, 11)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _bootstrap_pip(python: Path) -> None:
    with urllib.request.urlopen("https://pypi.org/pypi/pip/json", timeout=60) as reply:
        urls = json.load(reply)["urls"]
    wheel = next(u for u in urls if u["filename"].endswith(".whl"))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / wheel["filename"]
        with urllib.request.urlopen(wheel["url"], timeout=120) as reply:
            target.write_bytes(reply.read())
        _run(str(python), f"{target}/pip", "install", "-q", "--no-index", str(target))


def main() -> int:
    if sys.version_info < MIN_PYTHON:
        sys.stderr.write(f"imdsd needs Python >= 3.11, this is {sys.version.split()[0]}\n")
        return 1
    venv, extras = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "")
    python = venv / "bin" / "python"
    if not python.exists():
        try:
            _run(sys.executable, "-m", "venv", str(venv))
        except subprocess.CalledProcessError:
            _run(sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv))
    probe = [str(python), "-m", "pip", "--version"]
    if subprocess.run(probe, check=False, capture_output=True).returncode:
        _bootstrap_pip(python)
    spec = f".[{extras}]" if extras else "."
    _run(str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
