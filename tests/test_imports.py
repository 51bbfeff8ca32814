"""The sans-IO core is sans-IO at import time: importing it loads no event loop or logger;
the client commands load neither, and ``imdsd get``'s path loads no heavy library either.

Each module is imported in a fresh interpreter, so nothing imported by another test (or by
another module of the list) can hide a dependency that a package ``__init__`` or a stray
import drags in.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE = (
    "imdsd.api.access",
    "imdsd.api.context",
    "imdsd.api.cursor",
    "imdsd.api.lines",
    "imdsd.api.metrics",
    "imdsd.api.params",
    "imdsd.api.reads",
    "imdsd.api.replies",
    "imdsd.api.routes",
    "imdsd.api.v1",
    "imdsd.changes",
    "imdsd.client",
    "imdsd.commands",
    "imdsd.config",
    "imdsd.configfile",
    "imdsd.configrules",
    "imdsd.delta",
    "imdsd.demo_view",
    "imdsd.depth",
    "imdsd.durations",
    "imdsd.emulator.attested",
    "imdsd.emulator.checks",
    "imdsd.emulator.control",
    "imdsd.emulator.endpoints",
    "imdsd.emulator.events",
    "imdsd.emulator.faults",
    "imdsd.emulator.profiles",
    "imdsd.emulator.rules",
    "imdsd.emulator.scenario",
    "imdsd.emulator.state",
    "imdsd.emulator.stats",
    "imdsd.filtering",
    "imdsd.frames",
    "imdsd.health",
    "imdsd.hooks.access",
    "imdsd.hooks.merge",
    "imdsd.hooks.model",
    "imdsd.hooks.schedule",
    "imdsd.imdsfields",
    "imdsd.imdsrules",
    "imdsd.instance_paths",
    "imdsd.memory",
    "imdsd.model",
    "imdsd.socketapi",
    "imdsd.status_view",
    "imdsd.store",
    "imdsd.timestamps",
    "imdsd.tomlwriter",
    "imdsd.upstream.budget_core",
    "imdsd.upstream.errors",
    "imdsd.upstream.messages",
    "imdsd.upstream.report",
    "imdsd.upstream.retry",
    "imdsd.upstream.versions",
)
IO_LIBRARIES = ("trio", "structlog", "h11")

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(name for name in sys.argv[2:] if name in sys.modules)))
"""


def loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after importing ``module``."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, module, *watched],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io_library(module: str) -> None:
    assert loaded_after_import(module, IO_LIBRARIES) == []


GET_PATH = ("imdsd.cli", "imdsd.commands", "imdsd.configfile", "imdsd.socketapi")
HEAVY = (*IO_LIBRARIES, "msgspec", "http.client", "imdsd.config", "imdsd.client")


@pytest.mark.parametrize("module", GET_PATH)
def test_imdsd_get_loads_only_the_standard_library(module: str) -> None:
    # hook scripts and shells call `imdsd get` in loops: it must start about as fast as
    # `imdsd --version` (msgspec and http.client each cost as much as the whole CLI)
    assert loaded_after_import(module, HEAVY) == []


def test_the_probe_sees_io_libraries() -> None:
    assert loaded_after_import("imdsd.broadcast", IO_LIBRARIES) == ["trio"]
