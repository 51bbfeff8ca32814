"""Sans-IO tests of the emulated VM state (imdsd.emulator.state)."""

from __future__ import annotations

import json
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imdsd.emulator.events import rfc1123
from imdsd.emulator.profiles import AZURE
from imdsd.emulator.state import StateError, VMState, merge_patch, normalize_mac
from imdsd.model import decode_instance, decode_scheduled_events

DATA = Path(__file__).parent / "data"
NOW = 1_700_000_000.0


def vm() -> VMState:
    return VMState(AZURE.default_instance(), AZURE.default_loadbalancer())


def compute(state: VMState) -> dict[str, Any]:
    result: dict[str, Any] = state.instance["compute"]
    return result


def assert_valid(state: VMState) -> None:
    """The documents still decode with the daemon's strict models."""
    decode_instance(msgspec.json.encode(state.instance))
    decode_scheduled_events(msgspec.json.encode(state.scheduled_events()))


# Fields the IMDS documentation lists that the golden sample lacks: IMDS always sends them
# ("missing or inapplicable values are always included but will be set to an empty string").
ALWAYS_PRESENT = {
    "customData": "",
    "userData": "",
    "host": {"id": ""},
    "physicalZone": "",
    "provider": "Microsoft.Compute",
}


def test_default_instance_is_the_golden_linux_document_plus_always_present_fields() -> None:
    golden = json.loads((DATA / "instance-linux.json").read_text())
    doc = AZURE.default_instance()
    tags_list = doc["compute"].pop("tagsList")
    extra = {key: doc["compute"].pop(key) for key in ALWAYS_PRESENT}
    assert doc == golden
    assert extra == ALWAYS_PRESENT
    assert tags_list == [{"name": "baz", "value": "bash"}, {"name": "foo", "value": "bar"}]


# ------------------------------------------------------------------------------ merge patch


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # the examples of RFC 7396 appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_rfc7396_examples(target: Any, patch: Any, result: Any) -> None:
    before = json.dumps(target)
    assert merge_patch(target, patch) == result
    assert json.dumps(target) == before


json_values = st.recursive(
    st.one_of(st.text(max_size=4), st.integers(), st.none()),
    lambda c: st.one_of(
        st.lists(c, max_size=3), st.dictionaries(st.text(max_size=3), c, max_size=3)
    ),
    max_leaves=15,
)


@given(st.dictionaries(st.text(max_size=3), json_values, max_size=4), json_values)
def test_merge_patch_is_idempotent(target: dict[str, Any], patch: Any) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


def test_patch_instance_must_be_an_object() -> None:
    state = vm()
    state.patch_instance({"compute": {"vmSize": "Standard_D4s_v5", "zone": None}})
    assert compute(state)["vmSize"] == "Standard_D4s_v5"
    assert "zone" not in compute(state)
    with pytest.raises(StateError, match="must be an object, got array"):
        state.patch_instance([1])


def test_patching_one_tag_field_rewrites_the_other() -> None:
    state = vm()
    state.patch_instance({"compute": {"tags": "a:1;b:2"}})
    assert compute(state)["tagsList"] == [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]
    state.patch_instance({"compute": {"tagsList": [{"name": "c", "value": "3"}]}})
    assert compute(state)["tags"] == "c:3"
    both = {"tags": "x:1", "tagsList": [{"name": "y", "value": "2"}]}
    state.patch_instance({"compute": both})  # both given: kept as given, for tests
    assert compute(state)["tags"] == "x:1"
    assert compute(state)["tagsList"] == [{"name": "y", "value": "2"}]
    state.patch_instance({"compute": {"tags": None}})
    assert "tags" not in compute(state)
    assert "tagsList" not in compute(state)
    state.patch_instance({"compute": {"tags": "z:9"}})  # no tagsList (older api-versions)
    assert "tagsList" not in compute(state)
    state.patch_instance({"compute": {"tagsList": [{"name": "q", "value": "1"}]}})
    assert compute(state)["tags"] == "q:1"
    state.patch_instance({"compute": {"tagsList": None}})
    assert "tags" not in compute(state)


def test_replace_instance_accepts_any_object_only() -> None:
    state = vm()
    state.replace_instance({"compute": {"vmId": 5}})
    assert state.instance == {"compute": {"vmId": 5}}
    with pytest.raises(StateError, match="got string"):
        state.replace_instance("x")


# ------------------------------------------------------------------------------ tags


def test_set_tag_adds_and_modifies_keeping_both_forms_consistent() -> None:
    state = vm()
    state.set_tag("env", "prod")
    assert compute(state)["tags"] == "baz:bash;foo:bar;env:prod"
    state.set_tag("foo", "qux")
    assert compute(state)["tags"] == "baz:bash;foo:qux;env:prod"
    assert compute(state)["tagsList"] == [
        {"name": "baz", "value": "bash"},
        {"name": "foo", "value": "qux"},
        {"name": "env", "value": "prod"},
    ]
    assert_valid(state)


def test_remove_tag() -> None:
    state = vm()
    state.remove_tag("baz")
    assert compute(state)["tags"] == "foo:bar"
    assert compute(state)["tagsList"] == [{"name": "foo", "value": "bar"}]
    state.remove_tag("foo")
    assert compute(state)["tags"] == ""
    assert compute(state)["tagsList"] == []
    with pytest.raises(StateError, match="no tag 'foo'") as info:
        state.remove_tag("foo")
    assert info.value.status == 404


def test_tag_operation_adds_tags_list_when_only_tags_exists() -> None:
    golden = json.loads((DATA / "instance-linux.json").read_text())
    state = VMState(golden)
    assert state.tags() == [("baz", "bash"), ("foo", "bar")]
    state.set_tag("a", "b")
    assert compute(state)["tagsList"][-1] == {"name": "a", "value": "b"}
    assert compute(state)["tags"] == "baz:bash;foo:bar;a:b"


def test_tags_with_separators_survive_in_tags_list() -> None:
    state = vm()
    state.set_tag("url", "http://x;y")
    assert {"name": "url", "value": "http://x;y"} in compute(state)["tagsList"]
    assert state.tags()[-1] == ("url", "http://x;y")


@pytest.mark.parametrize(("name", "value"), [("", "v"), (3, "v"), ("n", 4)])
def test_set_tag_rejects_bad_input(name: Any, value: Any) -> None:
    with pytest.raises(StateError, match="tag"):
        vm().set_tag(name, value)


@given(st.lists(st.tuples(st.sampled_from("abcde"), st.booleans(), st.text(max_size=3))))
def test_tags_and_tags_list_stay_consistent(ops: list[tuple[str, bool, str]]) -> None:
    state = vm()
    for name, add, value in ops:
        if add:
            state.set_tag(name, value)
        elif name in dict(state.tags()):
            state.remove_tag(name)
        expected = ";".join(f"{t['name']}:{t['value']}" for t in compute(state)["tagsList"])
        assert compute(state)["tags"] == expected


# ------------------------------------------------------------------------------ disks


def disks(state: VMState) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = compute(state)["storageProfile"]["dataDisks"]
    return result


def test_attach_resize_detach_disk() -> None:
    state = vm()
    state.attach_disk(1, 128, "data1")
    disk = disks(state)[-1]
    assert disk["lun"] == "1"
    assert disk["diskSizeGB"] == "128"
    assert disk["name"] == "data1"
    disk_id = disk["managedDisk"]["id"]
    assert disk_id.startswith("/subscriptions/xxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxx/resourceGroups/")
    assert disk_id.endswith("/macikgo-test-may-23/providers/Microsoft.Compute/disks/data1")
    assert_valid(state)
    state.resize_disk(1, 256)
    assert disk["diskSizeGB"] == "256"
    assert disk["diskCapacityBytes"] == ""
    state.detach_disk(1)
    assert [d["lun"] for d in disks(state)] == ["0"]


def test_resize_ultra_disk_updates_capacity_bytes() -> None:
    state = vm()
    state.resize_disk(0, 512)
    assert disks(state)[0]["diskCapacityBytes"] == str(512 * 1024**3)


def test_attach_disk_default_name() -> None:
    state = vm()
    state.attach_disk(5, 10)
    assert disks(state)[-1]["name"] == "examplevmname_datadisk_5"


def test_disk_errors() -> None:
    state = vm()
    with pytest.raises(StateError, match="lun 0 already has a data disk") as info:
        state.attach_disk(0, 10)
    assert info.value.status == 409
    with pytest.raises(StateError, match="no data disk at lun 9") as info:
        state.detach_disk(9)
    assert info.value.status == 404
    with pytest.raises(StateError, match="no data disk at lun 9"):
        state.resize_disk(9, 10)
    with pytest.raises(StateError, match="lun must be an integer from 0 to 63, got 64"):
        state.attach_disk(64, 10)
    with pytest.raises(StateError, match="lun must be an integer"):
        state.attach_disk(True, 10)
    with pytest.raises(StateError, match="size_gb must be an integer from 1 to 65536, got 0"):
        state.attach_disk(2, 0)


def test_disk_operation_on_a_document_without_storage_profile_is_a_conflict() -> None:
    state = VMState({"compute": {}, "network": {"interface": []}})
    with pytest.raises(StateError, match=r"no compute\.storageProfile object") as info:
        state.attach_disk(1, 1)
    assert info.value.status == 409
    state = VMState({"network": {}})
    with pytest.raises(StateError, match="no compute object"):
        state.set_tag("a", "b")
    with pytest.raises(StateError, match=r"no network\.interface array"):
        state.reorder_nics()


# ------------------------------------------------------------------------------ NICs


def nics(state: VMState) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = state.instance["network"]["interface"]
    return result


def test_normalize_mac() -> None:
    assert normalize_mac("00-0d-3a:11.22 33") == "000D3A112233"
    with pytest.raises(StateError, match="not 12 hex digits"):
        normalize_mac("00-0D-3A-11-22")
    with pytest.raises(StateError, match="mac must be a string"):
        normalize_mac(12)


def test_add_remove_nic() -> None:
    state = vm()
    state.add_nic("00-0D-3A-11-22-33", "10.1.2.77", prefix=26)
    nic = nics(state)[-1]
    assert nic == {
        "ipv4": {
            "ipAddress": [{"privateIpAddress": "10.1.2.77", "publicIpAddress": ""}],
            "subnet": [{"address": "10.1.2.64", "prefix": "26"}],
        },
        "ipv6": {"ipAddress": []},
        "macAddress": "000D3A112233",
    }
    assert_valid(state)
    with pytest.raises(StateError, match="already exists") as info:
        state.add_nic("000d3a112233", "10.1.2.78")
    assert info.value.status == 409
    state.remove_nic("00:0d:3a:11:22:33")
    assert [n["macAddress"] for n in nics(state)] == ["0011AAFFBB22"]
    with pytest.raises(StateError, match="no NIC with mac 000D3A112233"):
        state.remove_nic("000D3A112233")


@pytest.mark.parametrize(
    ("ip", "prefix", "message"),
    [
        ("10.0.0.300", 24, "is not an IPv4 address"),
        ("::1", 24, "is not an IPv4 address"),
        ("10.0.0.1", 33, "prefix must be an integer from 0 to 32"),
        (5, 24, "private_ip must be a non-empty string"),
    ],
)
def test_add_nic_rejects_bad_input(ip: Any, prefix: Any, message: str) -> None:
    with pytest.raises(StateError, match=message):
        vm().add_nic("000D3A112233", ip, prefix)


def test_reorder_nics_reverses_or_follows_order() -> None:
    state = vm()
    state.add_nic("000D3A000001", "10.0.0.5")
    state.add_nic("000D3A000002", "10.0.0.6")
    state.reorder_nics()
    a, b, golden = "000D3A000001", "000D3A000002", "0011AAFFBB22"
    assert [n["macAddress"] for n in nics(state)] == [b, a, golden]
    state.reorder_nics(["000d3a000001", golden, b])
    assert [n["macAddress"] for n in nics(state)] == [a, golden, b]
    with pytest.raises(StateError, match="must list each NIC's MAC once"):
        state.reorder_nics(["000D3A000001"])
    with pytest.raises(StateError, match="order must be a list"):
        state.reorder_nics("x")


# ------------------------------------------------------------------------------ events


def test_add_event_defaults() -> None:
    state = vm()
    event = state.add_event("E1", "Reboot", now_wall=NOW)
    assert event == {
        "EventId": "E1",
        "EventStatus": "Scheduled",
        "EventType": "Reboot",
        "ResourceType": "VirtualMachine",
        "Resources": ["examplevmname"],
        "NotBefore": rfc1123(NOW + 900),
        "Description": "",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    }
    assert parsedate_to_datetime(event["NotBefore"]).timestamp() == NOW + 900
    assert state.incarnation == 2
    assert_valid(state)


def test_event_notice_per_type() -> None:
    state = vm()
    state.add_event("P", "Preempt", now_wall=NOW)
    state.add_event("R", "Redeploy", now_wall=NOW)
    doc = state.scheduled_events()
    assert [e["NotBefore"] for e in doc["Events"]] == [rfc1123(NOW + 30), rfc1123(NOW + 600)]
    assert doc["DocumentIncarnation"] == 3


def test_start_and_remove_event_bump_incarnation() -> None:
    state = vm()
    state.add_event("E1", "Freeze", now_wall=NOW, description="d", source="User", duration=9)
    assert state.start_event("E1") is True
    event = state.scheduled_events()["Events"][0]
    assert (event["EventStatus"], event["NotBefore"]) == ("Started", "")
    assert state.incarnation == 3
    assert state.start_event("E1") is False
    assert state.incarnation == 3
    state.remove_event("E1")
    assert state.scheduled_events() == {"DocumentIncarnation": 4, "Events": []}
    with pytest.raises(StateError, match="no scheduled event 'E1'") as info:
        state.remove_event("E1")
    assert info.value.status == 404


def test_started_event_has_empty_not_before() -> None:
    state = vm()
    event = state.add_event("E", "Reboot", now_wall=NOW, status="Started")
    assert event["NotBefore"] == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"event_type": "Explode"}, "event type must be one of Reboot, Redeploy"),
        ({"source": "Alien"}, "event source must be one of Platform, User"),
        ({"status": "Done"}, "event status must be Scheduled or Started"),
        ({"duration": -2}, "duration must be an integer >= -1"),
        ({"resources": "vm"}, "resources must be a list of strings"),
        ({"event_id": ""}, "event id must be a non-empty string"),
        ({"not_before": 5}, "not_before must be a string"),
    ],
)
def test_add_event_rejects_bad_input(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"event_id": "E", "event_type": "Reboot", **kwargs}
    event_id, event_type = args.pop("event_id"), args.pop("event_type")
    with pytest.raises(StateError, match=message):
        vm().add_event(event_id, event_type, now_wall=NOW, **args)


def test_duplicate_event_is_a_conflict() -> None:
    state = vm()
    state.add_event("E", "Reboot", now_wall=NOW)
    with pytest.raises(StateError, match="already exists") as info:
        state.add_event("E", "Reboot", now_wall=NOW)
    assert info.value.status == 409


def test_approve_starts_listed_events() -> None:
    state = vm()
    state.add_event("A", "Reboot", now_wall=NOW)
    state.add_event("B", "Reboot", now_wall=NOW)
    assert state.approve({"StartRequests": [{"EventId": "B"}]}) == ["B"]
    statuses = [e["EventStatus"] for e in state.scheduled_events()["Events"]]
    assert statuses == ["Scheduled", "Started"]
    assert state.approve({"StartRequests": [{"EventId": "B"}]}) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "StartRequests"),
        ({"StartRequests": []}, "StartRequests"),
        ({"StartRequests": [{"Id": "A"}]}, "needs an EventId string"),
        ({"StartRequests": [{"EventId": "A"}, {"EventId": "Z"}]}, "unknown EventId 'Z'"),
    ],
)
def test_approve_rejects_malformed_bodies_and_starts_nothing(body: Any, message: str) -> None:
    state = vm()
    state.add_event("A", "Reboot", now_wall=NOW)
    with pytest.raises(StateError, match=message) as info:
        state.approve(body)
    assert info.value.status == 400
    assert state.scheduled_events()["Events"][0]["EventStatus"] == "Scheduled"


def test_start_due_events() -> None:
    state = vm()
    state.add_event("soon", "Preempt", now_wall=NOW)
    state.add_event("later", "Reboot", now_wall=NOW)
    state.add_event("odd", "Reboot", now_wall=NOW, not_before="whenever")
    assert state.start_due_events(NOW + 29) == []
    assert state.start_due_events(NOW + 30) == ["soon"]
    assert state.start_due_events(NOW + 30) == []
    assert state.start_due_events(NOW + 10_000) == ["later"]


# ------------------------------------------------------------------------------ misc


def test_loadbalancer_can_be_removed_and_set() -> None:
    state = vm()
    assert state.loadbalancer is not None
    state.set_loadbalancer(None)
    assert state.loadbalancer is None
    state.set_loadbalancer({"loadbalancer": {}})
    assert state.loadbalancer == {"loadbalancer": {}}
    with pytest.raises(StateError, match="object or null, got array"):
        state.set_loadbalancer([])


def test_snapshot_is_a_copy() -> None:
    state = vm()
    snap = state.snapshot()
    assert set(snap) == {"instance", "scheduled_events", "loadbalancer", "faults", "identities"}
    snap["instance"]["compute"]["vmSize"] = "changed"
    assert compute(state)["vmSize"] == "Standard_A3"
