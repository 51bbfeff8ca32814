"""Tests for imdsd.changes.diff: every kind and op on golden variants, plus properties."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from functools import partial
from operator import ne
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from imdsd.changes import carry, diff, mac_key, parse_tags
from imdsd.frames import KINDS, Change
from imdsd.model import ScheduledEvents, Snapshot

DATA = Path(__file__).parent / "data"
Raw = dict[str, Any]


def golden(name: str = "instance-linux.json") -> Raw:
    loaded: Raw = json.loads((DATA / name).read_bytes())
    return loaded


LINUX = golden()
WINDOWS = golden("instance-windows.json")
STACK = golden("instance-azurestack.json")


def inst(raw: Raw) -> Snapshot:
    return Snapshot().with_instance(raw)


def changes(old: Raw, new: Raw) -> list[Change]:
    return diff(inst(old), inst(new))


def summary(found: list[Change]) -> list[tuple[str, str, str]]:
    return [(c.kind, c.op, c.key) for c in found]


def edited(raw: Raw, edit: Callable[[Raw], object]) -> Raw:
    out = copy.deepcopy(raw)
    edit(out)
    return out


def event(event_id: str, *resources: str, status: str = "Scheduled", **extra: Any) -> Raw:
    return {
        "EventId": event_id,
        "EventType": "Reboot",
        "ResourceType": "VirtualMachine",
        "Resources": list(resources),
        "EventStatus": status,
        "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT" if status == "Scheduled" else "",
        "Description": "Virtual machine is going to be restarted.",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
        **extra,
    }


def events_doc(*events: Raw, incarnation: int = 1) -> Raw:
    return {"DocumentIncarnation": incarnation, "Events": list(events)}


def lb_doc(
    public: list[Raw] | None = None,
    inbound: list[Raw] | None = None,
    outbound: list[Raw] | None = None,
) -> Raw:
    return {
        "loadbalancer": {
            "publicIpAddresses": public or [],
            "inboundRules": inbound or [],
            "outboundRules": outbound or [],
        }
    }


def inbound(frontend: str, port: int, backend: int = 443, private: str = "10.1.0.4") -> Raw:
    return {
        "frontendIpAddress": frontend,
        "protocol": "tcp",
        "frontendPort": port,
        "backendPort": backend,
        "privateIpAddress": private,
    }


SAMPLE_LB = lb_doc(
    [{"frontendIpAddress": "51.0.0.1", "privateIpAddress": "10.1.0.4"}],
    [inbound("50.0.0.1", 80), inbound("2603:10e1:100:2::1:1", 80, private="ace:cab:deca:deed::1")],
    [
        {"frontendIpAddress": "50.0.0.1", "privateIpAddress": "10.1.0.4"},
        {"frontendIpAddress": "2603:10e1:100:2::1:1", "privateIpAddress": "ace:cab:deca:deed::1"},
    ],
)


# ---------------------------------------------------------------------------- baseline


def test_identical_golden_snapshots_have_no_changes() -> None:
    for raw in (LINUX, WINDOWS, STACK):
        snap = (
            inst(raw)
            .with_scheduled_events(events_doc(event("e1", "x")))
            .with_loadbalancer(SAMPLE_LB)
        )
        assert diff(snap, snap) == []


def test_unknown_endpoint_on_either_side_is_a_baseline() -> None:
    full = (
        inst(LINUX)
        .with_scheduled_events(events_doc(event("e1", "examplevmname")))
        .with_loadbalancer(SAMPLE_LB)
    )
    assert diff(Snapshot(), full) == []
    assert diff(full, Snapshot()) == []
    other = inst(edited(LINUX, lambda r: r["compute"].update(vmSize="Standard_D2s_v3")))
    assert summary(diff(full, other)) == [("compute", "modified", "vmSize")]


# ---------------------------------------------------------------------------- tags


def test_tags_from_legacy_string() -> None:
    new = edited(LINUX, lambda r: r["compute"].update(tags="baz:bash2;new:1"))
    found = changes(LINUX, new)
    assert found == [
        Change("tags", "modified", "baz", "bash", "bash2", ["value"]),
        Change("tags", "removed", "foo", "bar", None),
        Change("tags", "added", "new", None, "1"),
    ]


def test_tags_list_keeps_separators_in_values() -> None:
    def with_list(*pairs: tuple[str, str]) -> Raw:
        def edit(r: Raw) -> None:
            r["compute"]["tagsList"] = [{"name": n, "value": v} for n, v in pairs]
            r["compute"]["tags"] = ";".join(f"{n}:{v}" for n, v in pairs)

        return edited(LINUX, edit)

    old = with_list(("url", "http://a;b"), ("k:x", "v"))
    new = with_list(("k:x", "v"), ("url", "http://a;c:d"))
    assert changes(old, new) == [
        Change("tags", "modified", "url", "http://a;b", "http://a;c:d", ["value"])
    ]
    assert changes(old, with_list(("k:x", "v"))) == [
        Change("tags", "removed", "url", "http://a;b", None)
    ]


def tags_list(pairs: list[tuple[str, str]], *, legacy: bool = False) -> Raw:
    """LINUX with these tags (in this order) as ``tagsList``, or only as the ``tags`` string."""

    def edit(r: Raw) -> None:
        if legacy:
            r["compute"].pop("tagsList", None)
            r["compute"]["tags"] = ";".join(f"{n}:{v}" for n, v in pairs)
        else:
            r["compute"]["tagsList"] = [{"name": n, "value": v} for n, v in pairs]

    return edited(LINUX, edit)


_TAG_PAIRS = st.lists(
    st.tuples(st.sampled_from(["env", "owner", "x"]), st.sampled_from(["", "1", "2", "a:b"])),
    max_size=6,
)


@given(pairs=_TAG_PAIRS, order=st.randoms(use_true_random=False), legacy=st.booleans())
def test_reordered_tags_with_repeated_names_are_no_change(
    pairs: list[tuple[str, str]], order: random.Random, legacy: bool
) -> None:
    shuffled = list(pairs)
    order.shuffle(shuffled)
    assert changes(tags_list(pairs, legacy=legacy), tags_list(shuffled, legacy=legacy)) == []


@given(pairs=_TAG_PAIRS.filter(bool), at=st.integers(0, 5), order=st.randoms(use_true_random=False))
def test_one_changed_value_of_a_repeated_name_is_one_change(
    pairs: list[tuple[str, str]], at: int, order: random.Random
) -> None:
    name, value = pairs[at % len(pairs)]
    edited_pairs = list(pairs)
    edited_pairs[at % len(pairs)] = (name, value + "!")
    order.shuffle(edited_pairs)
    [change] = changes(tags_list(pairs), tags_list(edited_pairs))
    assert (change.op, change.key.partition("#")[0], change.old, change.new) == (
        "modified",
        name,
        value,
        value + "!",
    )


def test_repeated_tag_names_keyed_by_occurrence() -> None:
    two = tags_list([("env", "a"), ("env", "b")])
    assert changes(two, tags_list([("env", "b"), ("env", "a")])) == []
    assert changes(two, tags_list([("env", "b"), ("env", "c")])) == [
        Change("tags", "modified", "env#2", "a", "c", ["value"])
    ]
    assert changes(two, tags_list([("env", "b")])) == [
        Change("tags", "removed", "env#2", "a", None)
    ]
    assert changes(tags_list([("env", "b")]), two) == [Change("tags", "added", "env#2", None, "a")]


def test_tags_api_version_switch_compares_common_form() -> None:
    with_list = edited(
        LINUX,
        lambda r: r["compute"].update(
            tagsList=[{"name": "baz", "value": "bash"}, {"name": "foo", "value": "bar"}]
        ),
    )
    assert changes(LINUX, with_list) == []
    assert changes(with_list, LINUX) == []
    changed = edited(LINUX, lambda r: r["compute"].update(tags="baz:bash;foo:qux"))
    assert summary(changes(with_list, changed)) == [("tags", "modified", "foo")]
    no_tags = edited(LINUX, lambda r: r["compute"].pop("tags"))
    assert changes(with_list, no_tags) == []


def test_parse_tags() -> None:
    assert parse_tags("") == {}
    assert parse_tags("a:b:c;;d;e:") == {"a": "b:c", "d": "", "e": ""}
    assert parse_tags("baz:bash;foo:bar") == {"baz": "bash", "foo": "bar"}


# ---------------------------------------------------------------------------- disks


def data_disk(lun: int, size: str = "128", **extra: Any) -> Raw:
    disk: Raw = copy.deepcopy(LINUX["compute"]["storageProfile"]["dataDisks"][0])
    disk.update(lun=str(lun), diskSizeGB=size, name=f"disk{lun}", **extra)
    return disk


def disks(raw: Raw) -> list[Raw]:
    found: list[Raw] = raw["compute"]["storageProfile"]["dataDisks"]
    return found


def test_data_disk_attach_detach_resize() -> None:
    attached = edited(LINUX, lambda r: disks(r).append(data_disk(1)))
    [change] = changes(LINUX, attached)
    assert (change.kind, change.op, change.key, change.old) == ("disks", "attached", "lun:1", None)
    assert change.new == data_disk(1)
    assert change.fields is None

    [change] = changes(attached, LINUX)
    assert (change.op, change.key, change.old, change.new) == (
        "detached",
        "lun:1",
        data_disk(1),
        None,
    )

    def resize(r: Raw) -> None:
        disks(r)[0]["diskSizeGB"] = "2048"
        disks(r)[0]["managedDisk"]["storageAccountType"] = "Premium_LRS"

    resized = edited(LINUX, resize)
    [change] = changes(LINUX, resized)
    assert (change.kind, change.op, change.key) == ("disks", "modified", "lun:0")
    assert change.fields == ["diskSizeGB", "managedDisk.storageAccountType"]
    assert change.old == disks(LINUX)[0]
    assert change.new == disks(resized)[0]


def test_data_disk_reorder_and_new_fields_are_no_change() -> None:
    many = edited(LINUX, lambda r: disks(r).extend([data_disk(2), data_disk(10)]))
    reordered = edited(many, lambda r: disks(r).reverse())
    assert changes(many, reordered) == []

    def older(r: Raw) -> None:
        for disk in disks(r):
            for field in ("isSharedDisk", "isUltraDisk", "diskCapacityBytes"):
                del disk[field]

    assert changes(many, edited(many, older)) == []
    assert changes(edited(many, older), many) == []


def test_disk_order_is_numeric() -> None:
    many = edited(LINUX, lambda r: disks(r).extend([data_disk(10), data_disk(2)]))
    assert summary(changes(LINUX, many)) == [
        ("disks", "attached", "lun:2"),
        ("disks", "attached", "lun:10"),
    ]


def test_os_disk_modified_including_encryption_settings() -> None:
    def edit(r: Raw) -> None:
        os_disk = r["compute"]["storageProfile"]["osDisk"]
        os_disk["diskSizeGB"] = "64"
        os_disk["encryptionSettings"] = {"enabled": "true"}

    [change] = changes(edited(STACK, lambda r: None), edited(STACK, edit))
    assert (change.kind, change.op, change.key) == ("disks", "modified", "os")
    assert change.fields == ["diskSizeGB", "encryptionSettings.enabled"]

    def add_key(r: Raw) -> None:
        r["compute"]["storageProfile"]["osDisk"]["encryptionSettings"]["diskEncryptionKey"] = {
            "sourceVault": {"id": "/vaults/kv"},
            "secretUrl": "https://kv/secret",
        }

    [change] = changes(STACK, edited(STACK, add_key))
    assert change.fields == [
        "encryptionSettings.diskEncryptionKey.secretUrl",
        "encryptionSettings.diskEncryptionKey.sourceVault.id",
    ]
    assert change.old == STACK["compute"]["storageProfile"]["osDisk"]


def test_resource_disk() -> None:
    def size(value: str) -> Callable[[Raw], None]:
        def edit(r: Raw) -> None:
            r["compute"]["storageProfile"]["resourceDisk"]["size"] = value

        return edit

    none, empty = edited(LINUX, size("0")), edited(LINUX, size(""))
    assert changes(LINUX, none) == [Change("disks", "detached", "resource", {"size": "4096"}, None)]
    assert changes(empty, LINUX) == [
        Change("disks", "attached", "resource", None, {"size": "4096"})
    ]
    assert changes(none, empty) == []
    assert changes(LINUX, edited(LINUX, size("8192"))) == [
        Change("disks", "modified", "resource", {"size": "4096"}, {"size": "8192"}, ["size"])
    ]
    no_field = edited(LINUX, lambda r: r["compute"]["storageProfile"].pop("resourceDisk"))
    assert changes(LINUX, no_field) == []


# ---------------------------------------------------------------------------- network


def nic(mac: str, *ips: str, subnet: str = "10.0.1.0") -> Raw:
    return {
        "ipv4": {
            "ipAddress": [{"privateIpAddress": ip, "publicIpAddress": ""} for ip in ips],
            "subnet": [{"address": subnet, "prefix": "24"}],
        },
        "ipv6": {"ipAddress": []},
        "macAddress": mac,
    }


def nics(raw: Raw) -> list[Raw]:
    found: list[Raw] = raw["network"]["interface"]
    return found


def test_nic_added_removed_modified() -> None:
    added = edited(LINUX, lambda r: nics(r).append(nic("00-0d-3a-f8-06-ec", "10.0.1.4")))
    [change] = changes(LINUX, added)
    assert (change.kind, change.op, change.key) == ("network", "added", "mac:000D3AF806EC")
    assert change.new == nics(added)[1]
    [change] = changes(added, LINUX)
    assert (change.op, change.key, change.new) == ("removed", "mac:000D3AF806EC", None)

    def readdress(r: Raw) -> None:
        nics(r)[0]["ipv4"]["ipAddress"].append(
            {"privateIpAddress": "10.144.133.133", "publicIpAddress": ""}
        )
        nics(r)[0]["ipv4"]["subnet"][0]["prefix"] = "25"

    [change] = changes(LINUX, edited(LINUX, readdress))
    assert (change.op, change.key) == ("modified", "mac:0011AAFFBB22")
    assert change.fields == ["ipv4.ipAddress", "ipv4.subnet"]


def test_nic_reorder_and_mac_notation_are_no_change() -> None:
    def many(r: Raw) -> None:
        nics(r).append(nic("000D3AF806EC", "10.0.1.4", "10.0.1.5"))
        nics(r).append(nic("000D3AF806ED", "10.0.2.4"))
        nics(r)[1]["ipv4"]["subnet"].append({"address": "10.0.9.0", "prefix": "24"})

    base = edited(LINUX, many)

    def shuffle(r: Raw) -> None:
        nics(r).reverse()
        for item in nics(r):
            item["ipv4"]["ipAddress"].reverse()
            item["ipv4"]["subnet"].reverse()
            item["macAddress"] = ":".join(
                item["macAddress"][i : i + 2].lower() for i in range(0, 12, 2)
            )

    assert changes(base, edited(base, shuffle)) == []
    assert mac_key("00:11:aa:ff:bb:22") == mac_key("00-11-AA-FF-BB-22") == "mac:0011AAFFBB22"


def test_duplicate_keys_get_a_suffix() -> None:
    twice = edited(LINUX, lambda r: nics(r).append(copy.deepcopy(nics(r)[0])))
    assert summary(changes(LINUX, twice)) == [("network", "added", "mac:0011AAFFBB22#2")]


# ---------------------------------------------------------------------------- scheduled events


def with_events(*events: Raw, raw: Raw = LINUX, incarnation: int = 1) -> Snapshot:
    return inst(raw).with_scheduled_events(events_doc(*events, incarnation=incarnation))


def test_scheduled_event_added_started_removed() -> None:
    mine = event("E1", "othervm", "examplevmname")
    none, scheduled = with_events(), with_events(mine)
    [change] = diff(none, scheduled)
    assert (change.kind, change.op, change.key, change.new) == (
        "scheduled_events",
        "added",
        "E1",
        mine,
    )
    started = with_events(event("E1", "othervm", "examplevmname", status="Started"))
    [change] = diff(scheduled, started)
    assert (change.op, change.key) == ("modified", "E1")
    assert change.fields == ["EventStatus", "NotBefore"]
    assert change.old == mine
    [change] = diff(started, none)
    assert (change.op, change.key, change.new) == ("removed", "E1", None)


def test_scheduled_events_for_other_vms_and_incarnation_are_ignored() -> None:
    base = with_events(event("E1", "examplevmname"), incarnation=1)
    other = with_events(event("E1", "examplevmname"), event("E2", "othervm"), incarnation=5)
    assert diff(base, other) == []
    resources_reordered = with_events(event("E1", "b", "EXAMPLEVMNAME"))
    assert diff(with_events(event("E1", "EXAMPLEVMNAME", "b")), resources_reordered) == []


def test_scheduled_events_without_instance_consider_every_event() -> None:
    old = Snapshot().with_scheduled_events(events_doc())
    new = Snapshot().with_scheduled_events(events_doc(event("E9", "othervm")))
    assert summary(diff(old, new)) == [("scheduled_events", "added", "E9")]
    named = inst(LINUX).with_scheduled_events(events_doc(event("E9", "othervm")))
    assert diff(old, named) == []


def test_scheduled_events_moved_and_api_version_fields() -> None:
    moved = event("E1", "examplevmname", NotBefore="Mon, 19 Sep 2016 19:00:00 GMT")
    [change] = diff(with_events(event("E1", "examplevmname")), with_events(moved))
    assert change.fields == ["NotBefore"]
    older = event("E1", "examplevmname")
    del older["EventSource"], older["DurationInSeconds"]
    assert diff(with_events(event("E1", "examplevmname")), with_events(older)) == []
    unknown = Snapshot().with_instance(LINUX)
    assert diff(unknown, with_events(event("E1", "examplevmname"))) == []


# ---------------------------------------------------------------------------- compute


def test_compute_leaf_changes() -> None:
    def edit(r: Raw) -> None:
        c = r["compute"]
        c["vmSize"] = "Standard_D4s_v5"
        c["securityProfile"]["secureBootEnabled"] = "false"
        c["plan"]["name"] = "otherPlan"
        c["userData"] = "YmFy"

    found = changes(WINDOWS, edited(WINDOWS, edit))
    assert found == [
        Change("compute", "modified", "plan.name", "planName", "otherPlan", ["plan.name"]),
        Change(
            "compute",
            "modified",
            "securityProfile.secureBootEnabled",
            "true",
            "false",
            ["securityProfile.secureBootEnabled"],
        ),
        Change("compute", "modified", "userData", "Zm9vYmFy", "YmFy", ["userData"]),
        Change("compute", "modified", "vmSize", "Standard_A3", "Standard_D4s_v5", ["vmSize"]),
    ]

    def edit_tags_too(r: Raw) -> None:
        edit(r)
        r["compute"]["tags"] = "foo:bar"

    assert summary(changes(LINUX, edited(LINUX, edit_tags_too))) == [
        ("tags", "removed", "baz"),
        ("compute", "modified", "plan.name"),
        ("compute", "modified", "securityProfile.secureBootEnabled"),
        ("compute", "modified", "vmSize"),
    ]


def test_compute_public_keys_compare_as_a_set() -> None:
    reordered = edited(LINUX, lambda r: r["compute"]["publicKeys"].reverse())
    assert changes(LINUX, reordered) == []
    added = edited(
        LINUX,
        lambda r: r["compute"]["publicKeys"].append({"keyData": "ssh-ed25519 x", "path": "p"}),
    )
    [change] = changes(LINUX, added)
    assert (change.kind, change.key, change.fields) == ("compute", "publicKeys", ["publicKeys"])
    assert change.old == LINUX["compute"]["publicKeys"]
    assert len(change.new) == 3


def test_compute_fields_from_other_api_versions_are_no_change() -> None:
    def older(r: Raw) -> None:
        c = r["compute"]
        for field in ("securityProfile", "additionalCapabilities", "hostGroup", "userData"):
            del c[field]
        del c["storageProfile"]["imageReference"]["exactVersion"]

    newer = edited(WINDOWS, lambda r: r["compute"].update(physicalZone="westus-az1"))
    assert changes(WINDOWS, edited(WINDOWS, older)) == []
    assert changes(edited(WINDOWS, older), WINDOWS) == []
    assert changes(WINDOWS, newer) == []


def test_storage_image_reference_is_not_a_compute_change() -> None:
    new = edited(
        LINUX, lambda r: r["compute"]["storageProfile"]["imageReference"].update(version="1.2")
    )
    assert changes(LINUX, new) == []


# ---------------------------------------------------------------------------- load balancer


def with_lb(doc: Raw) -> Snapshot:
    return Snapshot().with_loadbalancer(doc)


def test_loadbalancer_from_absent() -> None:
    absent = Snapshot().with_loadbalancer_absent()
    found = diff(absent, with_lb(SAMPLE_LB))
    assert summary(found) == [
        ("loadbalancer", "added", "frontend:51.0.0.1"),
        ("loadbalancer", "added", "rule:inbound:tcp:50.0.0.1:80"),
        ("loadbalancer", "added", "rule:inbound:tcp:[2603:10e1:100:2::1:1]:80"),
        ("loadbalancer", "added", "rule:outbound:50.0.0.1:10.1.0.4"),
        ("loadbalancer", "added", "rule:outbound:[2603:10e1:100:2::1:1]:[ace:cab:deca:deed::1]"),
    ]
    assert found[1].new == inbound("50.0.0.1", 80)
    assert summary(diff(with_lb(SAMPLE_LB), absent)) == [
        ("loadbalancer", "removed", key) for _, _, key in summary(found)
    ]
    assert diff(absent, Snapshot().with_loadbalancer_absent()) == []
    assert diff(absent, with_lb(lb_doc())) == []
    assert diff(Snapshot(), with_lb(SAMPLE_LB)) == []


def test_loadbalancer_modified_and_reordered() -> None:
    changed = copy.deepcopy(SAMPLE_LB)
    changed["loadbalancer"]["inboundRules"][0]["backendPort"] = 8443
    changed["loadbalancer"]["publicIpAddresses"][0]["privateIpAddress"] = "10.1.0.5"
    found = diff(with_lb(SAMPLE_LB), with_lb(changed))
    assert [(c.op, c.key, c.fields) for c in found] == [
        ("modified", "frontend:51.0.0.1", ["privateIpAddress"]),
        ("modified", "rule:inbound:tcp:50.0.0.1:80", ["backendPort"]),
    ]
    reordered = copy.deepcopy(SAMPLE_LB)
    for items in reordered["loadbalancer"].values():
        items.reverse()
    assert diff(with_lb(SAMPLE_LB), with_lb(reordered)) == []


# ---------------------------------------------------------------------------- order


def test_order_follows_kinds_then_key() -> None:
    def edit(r: Raw) -> None:
        r["compute"]["vmSize"] = "big"
        r["compute"]["tags"] = "zz:1"
        disks(r).append(data_disk(3))
        nics(r).append(nic("AA0000000001", "10.0.0.9"))

    old = inst(LINUX).with_scheduled_events(events_doc()).with_loadbalancer_absent()
    new = (
        inst(edited(LINUX, edit))
        .with_scheduled_events(events_doc(event("E1", "examplevmname")))
        .with_loadbalancer(SAMPLE_LB)
    )
    found = diff(old, new)
    kinds = [c.kind for c in found]
    assert kinds == sorted(kinds, key=KINDS.index)
    assert set(kinds) == set(KINDS)
    assert found == diff(old, new)


# ---------------------------------------------------------------------------- properties

BASE = edited(WINDOWS, lambda r: r["compute"].update(tagsList=[]))
TEXT = st.characters(codec="utf-8") | st.sampled_from(";:")
TAG_NAMES = st.text(TEXT, min_size=1, max_size=6)
TAG_VALUES = st.text(TEXT, max_size=8)
LUNS = st.integers(min_value=0, max_value=63)
SIZES = st.integers(min_value=1, max_value=32767).map(str)
MACS = st.binary(min_size=6, max_size=6).map(lambda b: b.hex().upper())
IPS = st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=3, unique=True)

Tags = dict[str, str]
Disks = dict[int, str]
Nics = dict[str, list[str]]


def build(tags: Tags, luns: Disks, macs: Nics, rnd: random.Random | None = None) -> Raw:
    raw = copy.deepcopy(BASE)
    compute = raw["compute"]
    compute["tagsList"] = [{"name": n, "value": v} for n, v in tags.items()]
    compute["tags"] = ";".join(f"{n}:{v}" for n, v in tags.items())
    compute["storageProfile"]["dataDisks"] = [data_disk(lun, size) for lun, size in luns.items()]
    raw["network"]["interface"] = [
        nic(mac, *ips, subnet=f"10.{int(mac[-2:], 16)}.0.0") for mac, ips in macs.items()
    ]
    for item in raw["network"]["interface"]:
        item["ipv4"]["subnet"].append({"address": "192.168.0.0", "prefix": "16"})
    if rnd is not None:
        rnd.shuffle(compute["tagsList"])
        rnd.shuffle(compute["storageProfile"]["dataDisks"])
        rnd.shuffle(compute["publicKeys"])
        rnd.shuffle(raw["network"]["interface"])
        for item in raw["network"]["interface"]:
            rnd.shuffle(item["ipv4"]["ipAddress"])
            rnd.shuffle(item["ipv4"]["subnet"])
    return raw


STATES = st.tuples(
    st.dictionaries(TAG_NAMES, TAG_VALUES, max_size=5),
    st.dictionaries(LUNS, SIZES, max_size=5),
    st.dictionaries(MACS, IPS, max_size=4),
)
EVENTS = st.lists(
    st.builds(
        event,
        st.uuids().map(str),
        st.sampled_from(["examplevmname", "othervm"]),
        status=st.sampled_from(["Scheduled", "Started"]),
    ),
    max_size=3,
    unique_by=lambda e: e["EventId"],
)
LBS = st.none() | st.builds(
    lambda ports: lb_doc(inbound=[inbound("50.0.0.1", p) for p in ports]),
    st.lists(st.integers(min_value=1, max_value=65535), max_size=3, unique=True),
)


@settings(max_examples=60, deadline=None)
@given(STATES, EVENTS, LBS)
def test_property_same_snapshot_no_change(
    state: tuple[Tags, Disks, Nics], events: list[Raw], lb: Raw | None
) -> None:
    snap = inst(build(*state)).with_scheduled_events(events_doc(*events))
    snap = snap.with_loadbalancer_absent() if lb is None else snap.with_loadbalancer(lb)
    assert diff(snap, snap) == []


@settings(max_examples=60, deadline=None)
@given(STATES, st.randoms(use_true_random=False))
def test_property_permutations_are_no_change(
    state: tuple[Tags, Disks, Nics], rnd: random.Random
) -> None:
    assert changes(build(*state), build(*state, rnd=rnd)) == []


def _drop(*path: str) -> Callable[[Raw], None]:
    def edit(raw: Raw) -> None:
        *parents, last = path
        for key in parents:
            raw = raw[key]
        raw.pop(last, None)

    return edit


def _drop_disk_fields(raw: Raw) -> None:
    for disk in disks(raw):
        for field in (
            "isSharedDisk",
            "isUltraDisk",
            "bytesPerSecondThrottle",
            "encryptionSettings",
        ):
            disk.pop(field, None)


def _drop_ipv6(raw: Raw) -> None:
    for item in nics(raw):
        item.pop("ipv6", None)


OLDER_API: dict[str, Callable[[Raw], None]] = {
    "tagsList": _drop("compute", "tagsList"),
    "securityProfile": _drop("compute", "securityProfile"),
    "userData": _drop("compute", "userData"),
    "additionalCapabilities": _drop("compute", "additionalCapabilities"),
    "hostGroup": _drop("compute", "hostGroup"),
    "extendedLocation": _drop("compute", "extendedLocation"),
    "isHostCompatibilityLayerVm": _drop("compute", "isHostCompatibilityLayerVm"),
    "platformSubFaultDomain": _drop("compute", "platformSubFaultDomain"),
    "encryptionAtHost": _drop("compute", "securityProfile", "encryptionAtHost"),
    "exactVersion": _drop("compute", "storageProfile", "imageReference", "exactVersion"),
    "resourceDisk": _drop("compute", "storageProfile", "resourceDisk"),
    "diffDiskSettings": _drop("compute", "storageProfile", "osDisk", "diffDiskSettings"),
    "diskFields": _drop_disk_fields,
    "ipv6": _drop_ipv6,
}


@settings(max_examples=60, deadline=None)
@given(STATES, st.sets(st.sampled_from(sorted(OLDER_API)), min_size=1), st.booleans())
def test_property_api_version_field_removal_is_no_change(
    state: tuple[Tags, Disks, Nics], removed: set[str], old_is_older: bool
) -> None:
    full = build(*state)
    older = copy.deepcopy(full)
    for name in sorted(removed):
        OLDER_API[name](older)
    old, new = (older, full) if old_is_older else (full, older)
    assert changes(old, new) == []


def differs(old: list[str], new: list[str]) -> bool:
    return set(old) != set(new)


@settings(max_examples=80, deadline=None)
@given(STATES, st.data())
def test_property_each_mutation_reported_exactly_once(
    state: tuple[Tags, Disks, Nics], data: st.DataObject
) -> None:
    tags, luns, macs = dict(state[0]), dict(state[1]), dict(state[2])
    previous = inst(build(tags, luns, macs))
    for _ in range(data.draw(st.integers(min_value=1, max_value=8), label="steps")):
        ops = ["tag_set", "disk_attach", "nic_add"]
        ops += ["tag_remove"] if tags else []
        ops += ["disk_detach", "disk_resize"] if luns else []
        ops += ["nic_remove", "nic_readdress"] if macs else []
        op = data.draw(st.sampled_from(ops), label="op")
        expected: tuple[str, str, str] | None
        if op == "tag_set":
            names = st.sampled_from(sorted(tags)) | TAG_NAMES if tags else TAG_NAMES
            name, value = data.draw(names), data.draw(TAG_VALUES)
            before = tags.get(name)
            tags[name] = value
            kind_op = "added" if before is None else "modified"
            expected = None if before == value else ("tags", kind_op, name)
        elif op == "tag_remove":
            name = data.draw(st.sampled_from(sorted(tags)))
            del tags[name]
            expected = ("tags", "removed", name)
        elif op == "disk_attach":
            lun = data.draw(LUNS.filter(lambda n: n not in luns))
            luns[lun] = data.draw(SIZES)
            expected = ("disks", "attached", f"lun:{lun}")
        elif op == "disk_detach":
            lun = data.draw(st.sampled_from(sorted(luns)))
            del luns[lun]
            expected = ("disks", "detached", f"lun:{lun}")
        elif op == "disk_resize":
            lun = data.draw(st.sampled_from(sorted(luns)))
            luns[lun] = data.draw(SIZES.filter(partial(ne, luns[lun])))
            expected = ("disks", "modified", f"lun:{lun}")
        elif op == "nic_add":
            mac = data.draw(MACS.filter(lambda m: m not in macs))
            macs[mac] = data.draw(IPS)
            expected = ("network", "added", f"mac:{mac}")
        elif op == "nic_remove":
            mac = data.draw(st.sampled_from(sorted(macs)))
            del macs[mac]
            expected = ("network", "removed", f"mac:{mac}")
        else:
            mac = data.draw(st.sampled_from(sorted(macs)))
            macs[mac] = data.draw(IPS.filter(partial(differs, macs[mac])))
            expected = ("network", "modified", f"mac:{mac}")
        current = inst(build(tags, luns, macs, rnd=data.draw(st.randoms(use_true_random=False))))
        found = diff(previous, current)
        assert summary(found) == ([expected] if expected else []), op
        for change in found:
            assert (change.fields is not None) == (change.op == "modified")
        previous = current


def test_typed_only_snapshots_fall_back_to_the_typed_model() -> None:
    full = (
        inst(LINUX)
        .with_scheduled_events(events_doc(event("E1", "examplevmname")))
        .with_loadbalancer(SAMPLE_LB)
    )
    typed_only = Snapshot(
        instance=full.instance,
        scheduled_events=full.scheduled_events,
        loadbalancer=full.loadbalancer,
    )
    assert diff(full, typed_only) == []
    bigger = inst(edited(LINUX, lambda r: r["compute"].update(vmSize="big")))
    assert summary(diff(typed_only, bigger)) == [("compute", "modified", "vmSize")]
    no_events = Snapshot(instance=full.instance, scheduled_events=events_doc_typed())
    assert summary(diff(no_events, typed_only)) == [("scheduled_events", "added", "E1")]


def events_doc_typed() -> ScheduledEvents:
    return ScheduledEvents(document_incarnation=1, events=[])


# ---------------------------------------------------------------------------- carry


def chain(*docs: Raw) -> list[list[Change]]:
    """Apply ``docs`` in turn as the store does (carry, then diff); the changes of each step."""
    previous = inst(docs[0])
    steps: list[list[Change]] = []
    for doc in docs[1:]:
        current = carry(previous, inst(doc))
        steps.append(diff(previous, current))
        previous = current
    return steps


def _tagged(raw: Raw, **tags: str) -> Raw:
    out = copy.deepcopy(raw)
    out["compute"]["tagsList"] = [{"name": k, "value": v} for k, v in tags.items()]
    out["compute"]["tags"] = ";".join(f"{k}:{v}" for k, v in tags.items())
    return out


BASE = _tagged(LINUX, env="prod", team="a")


def _without(*path: str) -> Callable[[Raw], None]:
    def edit(raw: Raw) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return edit


def _without_tags(raw: Raw) -> None:
    del raw["compute"]["tags"], raw["compute"]["tagsList"]


def _retag(raw: Raw) -> None:
    raw["compute"].update(_tagged(raw, env="dev")["compute"])


def _detach(raw: Raw) -> None:
    raw["compute"]["storageProfile"]["dataDisks"] = []


def _resize_os(raw: Raw) -> None:
    raw["compute"]["storageProfile"]["osDisk"]["diskSizeGB"] = "999"


def _drop_temp(raw: Raw) -> None:
    raw["compute"]["storageProfile"]["resourceDisk"]["size"] = "0"


def _drop_nics(raw: Raw) -> None:
    raw["network"]["interface"] = []


def _resize_vm(raw: Raw) -> None:
    raw["compute"]["vmSize"] = "Standard_X9"


SECTION_CASES = [
    (
        _without_tags,
        _retag,
        {("tags", "modified", "env"), ("tags", "removed", "team")},
    ),
    (_without("compute", "storageProfile"), _detach, {("disks", "detached", "lun:0")}),
    (_without("compute", "storageProfile", "dataDisks"), _detach, {("disks", "detached", "lun:0")}),
    (_without("compute", "storageProfile", "osDisk"), _resize_os, {("disks", "modified", "os")}),
    (
        _without("compute", "storageProfile", "resourceDisk"),
        _drop_temp,
        {("disks", "detached", "resource")},
    ),
    (
        _without("compute", "storageProfile", "resourceDisk", "size"),
        _drop_temp,
        {("disks", "detached", "resource")},
    ),
    (_without("network", "interface"), _drop_nics, {("network", "removed", "mac:0011AAFFBB22")}),
    (_without("network"), _drop_nics, {("network", "removed", "mac:0011AAFFBB22")}),
    (_without("compute"), _resize_vm, {("compute", "modified", "vmSize")}),
    (_without("compute", "vmSize"), _resize_vm, {("compute", "modified", "vmSize")}),
]


def test_a_section_that_comes_back_is_compared_with_the_last_document_that_had_it() -> None:
    for hide, change, expected in SECTION_CASES:
        changed = edited(BASE, change)
        missing = edited(changed, hide)
        steps = chain(BASE, missing, missing, changed, changed)
        assert [set(summary(step)) for step in steps] == [set(), set(), expected, set()], (
            hide,
            change,
        )
        # also when the section was missing in the very first document known
        assert chain(edited(BASE, hide), BASE, changed) == [[], chain(BASE, changed)[0]]


def test_a_change_undone_while_the_section_was_missing_is_no_change() -> None:
    for hide, change, _ in SECTION_CASES:
        steps = chain(BASE, edited(edited(BASE, change), hide), BASE)
        assert steps == [[], []], (hide, change)


def test_an_absent_section_is_unknown_an_empty_one_is_empty() -> None:
    empty: Raw = {"compute": {}, "network": {}}
    assert chain(BASE, empty, {}) == [[], []]
    gone = {
        "compute": {"tagsList": [], "storageProfile": {"dataDisks": []}},
        "network": {"interface": []},
    }
    assert set(summary(chain(BASE, empty, gone)[1])) == {
        ("tags", "removed", "env"),
        ("tags", "removed", "team"),
        ("disks", "detached", "lun:0"),
        ("network", "removed", "mac:0011AAFFBB22"),
    }


def test_tags_read_across_views_when_no_document_has_both() -> None:
    only_string = edited(BASE, _without("compute", "tagsList"))
    only_list = edited(_tagged(LINUX, env="dev"), _without("compute", "tags"))
    steps = chain(BASE, only_string, only_list)
    assert [set(summary(s)) for s in steps] == [
        set(),
        {("tags", "modified", "env"), ("tags", "removed", "team")},
    ]


def test_carry_keeps_no_memory_when_nothing_is_missing() -> None:
    first, second = inst(BASE), inst(edited(BASE, _retag))
    assert carry(first, second) is second
    carried = carry(first, inst(edited(BASE, _without("network"))))
    assert carried.instance_known is not None
    assert carried.instance_known["network"] == BASE["network"]
    assert carried.instance_raw is not None
    assert "network" not in carried.instance_raw


def test_loadbalancer_lists_absent_are_unknown() -> None:
    full = lb_doc(inbound=[inbound("50.0.0.1", 80)])
    partial_lb: Raw = {"loadbalancer": {}}
    emptied = lb_doc(inbound=[])
    previous = with_lb(full)
    middle = carry(previous, with_lb(partial_lb))
    assert diff(previous, middle) == []
    last = carry(middle, with_lb(emptied))
    assert summary(diff(middle, last)) == [
        ("loadbalancer", "removed", "rule:inbound:tcp:50.0.0.1:80")
    ]
    assert carry(last, Snapshot().with_loadbalancer_absent()).loadbalancer_known is None
    no_section = carry(last, with_lb({}))
    assert diff(last, no_section) == []
    back = carry(no_section, with_lb(lb_doc(inbound=[inbound("50.0.0.2", 81)])))
    assert summary(diff(no_section, back)) == [
        ("loadbalancer", "added", "rule:inbound:tcp:50.0.0.2:81")
    ]
    assert no_section.loadbalancer_known == last.loadbalancer_raw


def test_snapshot_with_memory_round_trips_and_old_state_decodes() -> None:
    carried = carry(inst(BASE), inst(edited(BASE, _without("compute", "tagsList"))))
    encoded = msgspec.json.encode(carried)
    assert msgspec.json.decode(encoded, type=Snapshot) == carried
    old_state = json.loads(msgspec.json.encode(inst(BASE)))
    for name in ("instance_known", "loadbalancer_known"):
        old_state.pop(name, None)
    restored = msgspec.json.decode(json.dumps(old_state).encode(), type=Snapshot)
    assert restored.instance_known is None
    assert diff(restored, carry(restored, inst(_tagged(LINUX, env="x")))) != []


def test_diff_recursion_is_bounded_on_deep_snapshots_built_without_the_decoder() -> None:
    """The decoder refuses such documents; the diff itself still walks at most 32 levels."""
    deep: Any = "leaf"
    for _ in range(2000):
        deep = {"a": deep}
    new = copy.deepcopy(BASE)
    new["compute"]["storageProfile"]["osDisk"]["encryptionSettings"] = {"x": deep}
    new["compute"]["vmSize"] = "Standard_X9"
    old_snap = inst(BASE)
    new_snap = Snapshot(instance=old_snap.instance, instance_raw=new)
    found = diff(old_snap, carry(old_snap, new_snap))
    assert summary(found) == [("disks", "modified", "os"), ("compute", "modified", "vmSize")]
    [deep_path] = [f for f in found[0].fields or [] if f.startswith("encryptionSettings.x")]
    assert deep_path.count(".") <= 33  # cut at the depth bound


def test_scheduled_events_absent_are_unknown_and_caught_up_when_back() -> None:
    vm = LINUX["compute"]["name"]
    first = with_events(event("A", vm), event("B", vm))
    missing = carry(first, inst(LINUX).with_scheduled_events({"DocumentIncarnation": 2}))
    assert diff(first, missing) == []
    assert carry(missing, missing).scheduled_events_known == missing.scheduled_events_known
    back = carry(missing, with_events(event("B", vm, status="Started"), incarnation=3))
    assert summary(diff(missing, back)) == [
        ("scheduled_events", "removed", "A"),
        ("scheduled_events", "modified", "B"),
    ]
    assert back.scheduled_events_known is None
