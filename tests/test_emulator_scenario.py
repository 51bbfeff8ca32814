"""Sans-IO tests of scenario files (imdsd.emulator.scenario) and the shipped demo scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imdsd.emulator.profiles import AZURE, AZURESTACK
from imdsd.emulator.scenario import (
    ScenarioError,
    apply_action,
    check_params,
    demo_scenario,
    demo_text,
    dry_run,
    load_scenario,
    parse_scenario,
)
from imdsd.emulator.state import StateError, VMState

REPO = Path(__file__).parent.parent


def parse(text: str) -> Any:
    return parse_scenario(text, "s.toml")


def error_of(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse(text)
    return str(info.value)


def test_parse_minimal_scenario() -> None:
    scenario = parse(
        """
name = "x"
[[step]]
at = "1m30s"
set_tag = { name = "a", value = "b" }
[[step]]
at = 2
reorder_nics = true
[[step]]
at = "500ms"
fault = { status = 429, count = 3 }
"""
    )
    assert scenario.name == "x"
    assert [(s.index, s.at, s.action) for s in scenario.steps] == [
        (3, 0.5, "fault"),
        (2, 2.0, "reorder_nics"),
        (1, 90.0, "set_tag"),
    ]
    assert scenario.steps[1].params == {}
    assert scenario.duration == 90.0
    assert scenario.steps[2].where() == "step 1 (at 1m30s)"


def test_empty_scenario() -> None:
    scenario = parse("")
    assert scenario.steps == ()
    assert scenario.duration == 0.0


def test_ties_keep_file_order() -> None:
    scenario = parse(
        """
[[step]]
at = "1s"
remove_tag = { name = "b" }
[[step]]
at = "1s"
remove_tag = { name = "a" }
"""
    )
    assert [s.params["name"] for s in scenario.steps] == ["b", "a"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[step]", "s.toml: invalid TOML"),
        ("colour = 1", "s.toml: unknown key 'colour'"),
        ("name = 3", "s.toml: name must be a string, got 3"),
        ("step = 3", "s.toml: step must be an array of tables"),
        ("step = [3]", "s.toml: step 1: must be a table"),
        ("[[step]]\nset_tag = {name='a', value='b'}", "s.toml: step 1: missing key 'at'"),
        ("[[step]]\nat = '5 s'\nreorder_nics = true", "s.toml: step 1: at '5 s'"),
        ("[[step]]\nat = -1\nreorder_nics = true", "step 1: at must not be negative"),
        ("[[step]]\nat = true\nreorder_nics = true", "step 1: at must be a duration"),
        ("[[step]]\nat = [1]\nreorder_nics = true", "step 1: at must be a duration"),
        ("[[step]]\nat = '5s'", "step 1 (at 5s): needs exactly one action"),
        (
            "[[step]]\nat = '5s'\nreorder_nics = true\nremove_tag = {name='a'}",
            "found reorder_nics, remove_tag",
        ),
        ("[[step]]\nat = '5s'\nexplode = {}", "step 1 (at 5s): explode: unknown action"),
        (
            "[[step]]\nat = '5s'\nset_tag = {name='a'}",
            "step 1 (at 5s): set_tag: missing key 'value'",
        ),
        (
            "[[step]]\nat = '5s'\nset_tag = {name='a', value='b', colour='c'}",
            "set_tag: unknown key 'colour' (keys: name, value)",
        ),
        (
            "[[step]]\nat = '5s'\nattach_disk = {lun='1', size_gb=1}",
            "attach_disk: lun must be an integer, got '1'",
        ),
        (
            "[[step]]\nat = '5s'\nreorder_nics = {order='x'}",
            "reorder_nics: order must be a list of strings",
        ),
        ("[[step]]\nat = '5s'\nremove_nic = 'x'", "remove_nic: takes a table of parameters"),
        ("[[step]]\nat = '5s'\nfault = {status=1}", "fault: status must be an integer"),
        ("[[step]]\nat = '5s'\nstart_event = {}", "start_event: missing key 'id'"),
        (
            "[[step]]\nat = '1s'\nreorder_nics = true\n[[step]]\nat = '2s'\nadd_event = {id='x'}",
            "s.toml: step 2 (at 2s): add_event: missing key 'type'",
        ),
    ],
)
def test_errors_name_step_and_key(text: str, message: str) -> None:
    assert message in error_of(text)


def test_check_params_for_free_form_actions() -> None:
    assert check_params("patch_instance", {"compute": {"vmSize": "x"}}) == {
        "compute": {"vmSize": "x"}
    }
    assert check_params("fault", {"reset": True}) == {"reset": True}


def test_apply_every_action() -> None:
    state = VMState(AZURE.default_instance())
    steps: list[tuple[str, dict[str, Any]]] = [
        ("set_tag", {"name": "env", "value": "x"}),
        ("remove_tag", {"name": "baz"}),
        ("attach_disk", {"lun": 2, "size_gb": 4}),
        ("resize_disk", {"lun": 2, "size_gb": 8}),
        ("detach_disk", {"lun": 0}),
        ("add_nic", {"mac": "000D3A000001", "private_ip": "10.0.0.9", "prefix": 16}),
        ("reorder_nics", {}),
        ("remove_nic", {"mac": "0011AAFFBB22"}),
        ("add_event", {"id": "E", "type": "Freeze", "duration": 5, "source": "User"}),
        ("start_event", {"id": "E"}),
        ("add_event", {"id": "F", "type": "Reboot", "status": "Started", "resources": ["a"]}),
        ("remove_event", {"id": "F"}),
        ("patch_instance", {"compute": {"vmSize": "Standard_D2s_v5"}}),
        ("fault", {"status": 410, "count": 2}),
    ]
    for action, params in steps:
        apply_action(state, action, check_params(action, params), now_wall=0.0)
    compute = state.instance["compute"]
    assert compute["tags"] == "foo:bar;env:x"
    assert [d["lun"] for d in compute["storageProfile"]["dataDisks"]] == ["2"]
    assert compute["storageProfile"]["dataDisks"][0]["diskSizeGB"] == "8"
    assert [n["macAddress"] for n in state.instance["network"]["interface"]] == ["000D3A000001"]
    assert state.instance["network"]["interface"][0]["ipv4"]["subnet"][0]["prefix"] == "16"
    assert [e["EventStatus"] for e in state.events] == ["Started"]
    assert compute["vmSize"] == "Standard_D2s_v5"
    assert state.faults.pending() == [{"count": 2, "path": "/metadata", "status": 410}]
    with pytest.raises(StateError, match="unknown action 'explode'"):
        apply_action(state, "explode", {}, now_wall=0.0)


def test_dry_run_catches_impossible_steps_without_touching_the_state() -> None:
    scenario = parse(
        """
[[step]]
at = "1s"
attach_disk = { lun = 3, size_gb = 1 }
[[step]]
at = "2s"
detach_disk = { lun = 3 }
[[step]]
at = "3s"
detach_disk = { lun = 3 }
"""
    )
    state = VMState(AZURE.default_instance())
    with pytest.raises(ScenarioError) as info:
        dry_run(scenario, state)
    assert str(info.value) == "s.toml: step 3 (at 3s): detach_disk: no data disk at lun 3"
    assert len(state.instance["compute"]["storageProfile"]["dataDisks"]) == 1


def test_load_scenario_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"missing\.toml: cannot read scenario"):
        load_scenario(str(tmp_path / "missing.toml"))
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ScenarioError, match="not UTF-8"):
        load_scenario(str(binary))
    good = tmp_path / "good.toml"
    good.write_text('[[step]]\nat = "1s"\nremove_tag = { name = "foo" }\n')
    assert load_scenario(str(good)).source == str(good)


# ------------------------------------------------------------------------------ demo


def test_conf_copy_is_identical_to_the_packaged_demo() -> None:
    assert (REPO / "conf" / "scenario-demo.toml").read_text() == demo_text()


def test_demo_scenario_covers_the_required_story() -> None:
    scenario = demo_scenario()
    actions = [(s.action, s.params) for s in scenario.steps]
    names = [a for a, _ in actions]
    assert 25 <= scenario.duration <= 35
    assert names.index("set_tag") < names.index("remove_tag")
    assert names.index("attach_disk") < names.index("resize_disk")
    assert "add_nic" in names
    assert "reorder_nics" in names
    events = [p["id"] for a, p in actions if a in ("add_event", "start_event", "remove_event")]
    assert len(events) == 3
    assert len(set(events)) == 1
    assert names.index("add_event") < names.index("start_event") < names.index("remove_event")
    faults = [p for a, p in actions if a == "fault"]
    assert faults == [{"status": 429, "count": faults[0]["count"]}]
    assert faults[0]["count"] >= 3


@pytest.mark.parametrize("profile", [AZURE, AZURESTACK])
def test_demo_scenario_applies_to_both_profiles(profile: Any) -> None:
    dry_run(demo_scenario(), VMState(profile.default_instance()))
