"""Restricted paths that name no IMDS instance key are found (and warned about)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from imdsd import daemon_reload
from imdsd.commands import check_config_command
from imdsd.config import load_config
from imdsd.daemon import Daemon
from imdsd.instance_paths import restricted_path_problem, restricted_path_problems

DATA = Path(__file__).parent / "data"
DOCUMENTS = ["instance-linux.json", "instance-windows.json", "instance-azurestack.json"]


@pytest.mark.parametrize(
    "path",
    [
        "compute/userData",
        "compute/customData",
        "compute",
        "network",
        "compute/tags",
        "compute/tagsList",
        "compute/tagsList/0",
        "compute/tagsList/0/value",
        "compute/osProfile/adminUsername",
        "compute/publicKeys/0/keyData",
        "network/interface/0/ipv4/ipAddress/0/publicIpAddress",
        "compute/storageProfile/osDisk/encryptionSettings",
        "compute/storageProfile/osDisk/encryptionSettings/diskEncryptionKey",  # free-form
        "/compute/userData/",
    ],
)
def test_paths_naming_instance_keys_pass(path: str) -> None:
    assert restricted_path_problem(path) is None


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("compute/userdata", "did you mean 'compute/userData'? keys are case-sensitive"),
        ("Compute/userData", "did you mean 'compute'?"),
        ("compute/CustomData", "did you mean 'compute/customData'?"),
        ("compute/user_data", "keys of compute: "),
        ("metadata/instance/compute", "keys of the instance document: compute, network"),
        ("network/interfaces/0", "keys of network: interface"),
        ("compute/tagsList/env", "compute/tagsList is a list, entered by an index"),
        ("network/interface/first/macAddress", "network/interface is a list"),
        ("compute/tags/env", "compute/tags is a plain value with no keys below it"),
        ("compute/userData/x", "compute/userData is a plain value"),
    ],
)
def test_paths_naming_no_instance_key_are_explained(path: str, says: str) -> None:
    problem = restricted_path_problem(path)
    assert problem is not None
    assert problem.startswith(f"restricted path {path!r}")
    assert says in problem
    assert "protects nothing" in problem


def key_paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path of a JSON document (list items by index)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from key_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*prefix, str(index))
            yield from key_paths(item, (*prefix, str(index)))


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_key_of_real_documents_is_known_and_a_case_slip_is_caught(name: str) -> None:
    document = json.loads((DATA / name).read_text())
    paths = list(key_paths(document))
    assert len(paths) > 50
    for path in paths:
        assert restricted_path_problem("/".join(path)) is None, path
        free_form = restricted_path_problem("/".join([*path[:-1], "no-such-key"])) is None
        slipped = [*path[:-1], path[-1].lower()]
        if slipped != list(path) and not free_form:
            assert restricted_path_problem("/".join(slipped)) is not None, slipped


def test_problems_lists_only_the_bad_ones() -> None:
    problems = restricted_path_problems(["compute/userData", "compute/userdata", "network/x"])
    assert len(problems) == 2


def config_file(tmp_path: Path, paths: list[str]) -> Path:
    path = tmp_path / "imdsd.toml"
    path.write_text(
        f'[server]\nsocket = "{tmp_path}/s.sock"\nrestricted_paths = {json.dumps(paths)}\n'
        f'[state]\ndirectory = "{tmp_path}/state"\n'
    )
    return path


def test_check_config_warns_on_stderr_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path, ["compute/userdata", "compute/customData"])
    assert check_config_command(argparse.Namespace(config=str(path))) == 0
    out, err = capsys.readouterr()
    assert 'restricted_paths = ["compute/userdata", "compute/customData"]' in out
    assert err.splitlines() == [
        "imdsd: warning: restricted path 'compute/userdata' names no IMDS instance key imdsd "
        "knows (did you mean 'compute/userData'? keys are case-sensitive); it protects nothing "
        "unless a newer IMDS sends that key"
    ]
    good = config_file(tmp_path, ["compute/userData"])
    assert check_config_command(argparse.Namespace(config=str(good))) == 0
    assert capsys.readouterr().err == ""


async def test_the_daemon_warns_at_start_and_on_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_reload, "configure_logging", lambda level, fmt: None)
    path = config_file(tmp_path, ["compute/userData"])
    with capture_logs() as logs:
        daemon = Daemon(load_config(str(path)), str(path))
    assert not [e for e in logs if e["event"] == "restricted path protects nothing"]
    config_file(tmp_path, ["compute/userdata"])
    with capture_logs() as logs:
        assert await daemon.reload()
    [warning] = [e for e in logs if e["event"] == "restricted path protects nothing"]
    assert warning["log_level"] == "warning"
    assert "compute/userdata" in warning["problem"]
    with capture_logs() as logs:
        Daemon(load_config(str(path)), str(path))
    assert [e["log_level"] for e in logs if e["event"] == "restricted path protects nothing"] == [
        "warning"
    ]
