"""Tests for imdsd.model: golden documents, defaults, bad shapes, Snapshot persistence."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from imdsd import depth, model
from imdsd.model import DocumentError, Snapshot

DATA = Path(__file__).parent / "data"

SCHEDULED_EVENTS: dict[str, Any] = {
    "DocumentIncarnation": 2,
    "Events": [
        {
            "EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123",
            "EventType": "Reboot",
            "ResourceType": "VirtualMachine",
            "Resources": ["examplevmname"],
            "EventStatus": "Scheduled",
            "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT",
            "Description": "Virtual machine is going to be restarted.",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
    ],
}

LOADBALANCER: dict[str, Any] = {
    "loadbalancer": {
        "publicIpAddresses": [{"frontendIpAddress": "51.0.0.1", "privateIpAddress": "10.1.0.4"}],
        "inboundRules": [
            {
                "frontendIpAddress": "50.0.0.1",
                "protocol": "tcp",
                "frontendPort": 80,
                "backendPort": 443,
                "privateIpAddress": "10.1.0.4",
            }
        ],
        "outboundRules": [{"frontendIpAddress": "50.0.0.1", "privateIpAddress": "10.1.0.4"}],
    }
}

# Every compute field listed in IMDS.md, spelled as IMDS spells it.
COMPUTE_FIELDS = {
    "azEnvironment",
    "additionalCapabilities",
    "customData",
    "userData",
    "evictionPolicy",
    "extendedLocation",
    "host",
    "hostGroup",
    "isHostCompatibilityLayerVm",
    "licenseType",
    "location",
    "name",
    "offer",
    "osProfile",
    "osType",
    "physicalZone",
    "placementGroupId",
    "plan",
    "platformUpdateDomain",
    "platformFaultDomain",
    "platformSubFaultDomain",
    "priority",
    "provider",
    "publicKeys",
    "publisher",
    "resourceGroupName",
    "resourceId",
    "sku",
    "securityProfile",
    "storageProfile",
    "subscriptionId",
    "tags",
    "tagsList",
    "version",
    "virtualMachineScaleSet",
    "vmId",
    "vmScaleSetName",
    "vmSize",
    "zone",
}


def body(name: str) -> bytes:
    return (DATA / name).read_bytes()


def doc(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(body(name))
    return loaded


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)


def leaves(value: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


@pytest.mark.parametrize(
    "name", ["instance-linux.json", "instance-windows.json", "instance-azurestack.json"]
)
def test_golden_instance_fields_map_to_imds_names(name: str) -> None:
    instance, raw = model.parse_instance(body(name))
    assert raw == doc(name)
    reencoded = dict(leaves(json.loads(encode(instance))))
    for path, value in leaves(raw):
        assert reencoded.get(path, "<missing>") == value, path


def test_compute_has_every_documented_field() -> None:
    assert set(json.loads(encode(model.Compute()))) == COMPUTE_FIELDS
    storage = json.loads(encode(model.StorageProfile()))
    assert set(storage) == {"imageReference", "osDisk", "dataDisks", "resourceDisk"}
    assert set(storage["osDisk"]) == {
        "caching",
        "createOption",
        "diffDiskSettings",
        "diskSizeGB",
        "encryptionSettings",
        "image",
        "managedDisk",
        "name",
        "osType",
        "vhd",
        "writeAcceleratorEnabled",
    }
    assert set(json.loads(encode(model.DataDisk()))) == {
        "bytesPerSecondThrottle",
        "caching",
        "createOption",
        "diskCapacityBytes",
        "diskSizeGB",
        "encryptionSettings",
        "image",
        "isSharedDisk",
        "isUltraDisk",
        "lun",
        "managedDisk",
        "name",
        "opsPerSecondThrottle",
        "vhd",
        "writeAcceleratorEnabled",
    }
    assert set(json.loads(encode(model.Interface()))) == {"ipv4", "ipv6", "macAddress"}


def test_instance_linux_values() -> None:
    instance = model.decode_instance(body("instance-linux.json"))
    compute = instance.compute
    assert compute.name == "examplevmname"
    assert compute.vm_size == "Standard_A3"
    assert compute.az_environment == "AZUREPUBLICCLOUD"
    assert compute.additional_capabilities.hibernation_enabled == "true"
    assert compute.extended_location == model.ExtendedLocation("edgeZone", "microsoftlosangeles")
    assert compute.host_group.id == "testHostGroupId"
    assert compute.is_host_compatibility_layer_vm == "true"
    assert compute.os_profile.disable_password_authentication == "true"
    assert compute.plan == model.Plan("planName", "planProduct", "planPublisher")
    assert compute.platform_fault_domain == "36"
    assert compute.platform_update_domain == "42"
    assert compute.public_keys[1] == model.PublicKey(
        "ssh-rsa 1", "/home/user/.ssh/authorized_keys1"
    )
    assert compute.security_profile.security_type == "TrustedLaunch"
    assert compute.tags == "baz:bash;foo:bar"
    assert compute.tags_list == []
    assert compute.user_data == ""
    assert compute.virtual_machine_scale_set.id.endswith("virtual-machine-scale-set-name")
    storage = compute.storage_profile
    assert storage.image_reference.exact_version == "1.1686127202.30113"
    assert storage.os_disk.disk_size_gb == "30"
    assert storage.os_disk.diff_disk_settings.option == "Local"
    assert storage.os_disk.encryption_settings["diskEncryptionKey"]["sourceVault"]["id"].endswith(
        "/vaults/test-kv"
    )
    assert storage.os_disk.managed_disk.storage_account_type == "StandardSSD_LRS"
    disk = storage.data_disks[0]
    assert (disk.lun, disk.disk_size_gb, disk.is_ultra_disk) == ("0", "1024", "true")
    assert disk.disk_capacity_bytes == "274877906944"
    assert disk.encryption_settings == {}
    assert storage.resource_disk.size == "4096"
    nic = instance.network.interface[0]
    assert nic.mac_address == "0011AAFFBB22"
    assert nic.ipv4.ip_address == [model.IpAddress("10.144.133.132", "")]
    assert nic.ipv4.subnet == [model.Subnet("10.144.133.128", "26")]
    assert nic.ipv6.ip_address == []


def test_instance_windows_and_azurestack_values() -> None:
    windows = model.decode_instance(body("instance-windows.json")).compute
    assert (windows.os_type, windows.license_type, windows.user_data) == (
        "Windows",
        "Windows_Client",
        "Zm9vYmFy",
    )
    stack = model.decode_instance(body("instance-azurestack.json"))
    compute = stack.compute
    assert compute.az_environment == "AzureStack"
    assert (compute.custom_data, compute.zone, compute.plan) == ("", "", model.Plan())
    assert compute.security_profile == model.SecurityProfile()
    assert compute.storage_profile.os_disk.encryption_settings == {"enabled": "false"}
    assert compute.storage_profile.resource_disk.size == ""
    assert stack.network.interface[0].ipv4.ip_address[0].public_ip_address == "10.217.119.162"


def test_attested_and_error_documents() -> None:
    attested = model.decode_attested(body("attested-document.json"))
    assert attested.encoding == "pkcs7"
    assert attested.signature.startswith("MIIEEgYJKoZIhvcNAQcCoIIEAzCCA")
    payload = model.decode_attested_payload(body("attested-decoded.json"))
    assert payload.nonce == "20201130-211924"
    assert payload.plan.product == "planProduct"
    assert payload.sku == "Windows-Server-2012-R2-Datacenter"
    assert payload.time_stamp.expires_on == "11/30/20 21:19:24 -0000"
    assert payload.vm_id == "02aab8a4-74ef-476e-8182-f6d2ba4166a6"
    assert payload.license_type == ""
    error = model.decode_error(body("error-no-api-version.json"))
    assert error.error.startswith("Bad request. api-version was not specified")
    assert error.newest_versions == ["2020-10-01", "2020-09-01", "2020-07-15"]
    assert json.loads(encode(error))["newest-versions"][0] == "2020-10-01"


def test_versions_scheduled_events_and_loadbalancer() -> None:
    versions = model.decode_versions(b'{"apiVersions": ["2017-03-01", "2021-02-01"]}')
    assert versions.api_versions == ["2017-03-01", "2021-02-01"]
    events = model.decode_scheduled_events(encode(SCHEDULED_EVENTS))
    assert events.document_incarnation == 2
    event = events.events[0]
    assert (event.event_id, event.event_status, event.duration_in_seconds) == (
        "C7061BAC-AFDC-4513-B24B-AA5F13A16123",
        "Scheduled",
        -1,
    )
    assert event.resources == ["examplevmname"]
    assert json.loads(encode(events)) == SCHEDULED_EVENTS
    lb = model.decode_loadbalancer(encode(LOADBALANCER))
    rule = lb.loadbalancer.inbound_rules[0]
    assert (rule.protocol, rule.frontend_port, rule.backend_port) == ("tcp", 80, 443)
    assert lb.loadbalancer.public_ip_addresses[0].frontend_ip_address == "51.0.0.1"
    assert lb.loadbalancer.outbound_rules[0].private_ip_address == "10.1.0.4"
    assert json.loads(encode(lb)) == LOADBALANCER


def test_integer_fields_accept_numeric_strings() -> None:
    lb = copy.deepcopy(LOADBALANCER)
    lb["loadbalancer"]["inboundRules"][0]["frontendPort"] = "8080"
    assert model.decode_loadbalancer(encode(lb)).loadbalancer.inbound_rules[0].frontend_port == 8080
    events = copy.deepcopy(SCHEDULED_EVENTS)
    events["DocumentIncarnation"] = "7"
    assert model.decode_scheduled_events(encode(events)).document_incarnation == 7


def test_old_api_version_decodes_to_defaults() -> None:
    raw = doc("instance-linux.json")
    compute = raw["compute"]
    for field in ("tagsList", "securityProfile", "userData", "additionalCapabilities", "hostGroup"):
        compute.pop(field, None)
    compute["storageProfile"].pop("resourceDisk")
    compute["storageProfile"]["imageReference"].pop("exactVersion")
    del compute["storageProfile"]["dataDisks"][0]["isSharedDisk"]
    del raw["network"]["interface"][0]["ipv6"]
    instance = model.convert_instance(raw)
    assert instance.compute.tags_list == []
    assert instance.compute.security_profile == model.SecurityProfile()
    assert instance.compute.user_data == ""
    assert instance.compute.additional_capabilities.hibernation_enabled == ""
    assert instance.compute.host_group.id == ""
    assert instance.compute.storage_profile.resource_disk == model.ResourceDisk("")
    assert instance.compute.storage_profile.image_reference.exact_version == ""
    assert instance.compute.storage_profile.data_disks[0].is_shared_disk == ""
    assert instance.network.interface[0].ipv6 == model.Ipv6()
    assert instance.compute.name == "examplevmname"


def test_unknown_fields_are_ignored_but_kept_raw() -> None:
    raw = doc("instance-linux.json")
    raw["compute"]["futureField"] = {"nested": [1, 2]}
    raw["network"]["interface"][0]["futureNicField"] = "x"
    instance, kept = model.parse_instance(encode(raw))
    assert instance.compute.name == "examplevmname"
    assert kept["compute"]["futureField"] == {"nested": [1, 2]}


def _set_name_int(raw: dict[str, Any]) -> None:
    raw["compute"]["name"] = 1


def _set_keys_object(raw: dict[str, Any]) -> None:
    raw["compute"]["publicKeys"] = {"keyData": "x"}


def _set_nics_object(raw: dict[str, Any]) -> None:
    raw["network"]["interface"] = {}


def _set_tag_name_null(raw: dict[str, Any]) -> None:
    raw["compute"]["tagsList"] = [{"name": None, "value": "v"}]


def _set_lun_int(raw: dict[str, Any]) -> None:
    raw["compute"]["storageProfile"]["dataDisks"][0]["lun"] = 0


def _set_compute_null(raw: dict[str, Any]) -> None:
    raw["compute"] = None


@pytest.mark.parametrize(
    ("mutate", "path", "expected"),
    [
        (_set_name_int, "$.compute.name", "Expected `str`, got `int`"),
        (_set_keys_object, "$.compute.publicKeys", "Expected `array`, got `object`"),
        (_set_nics_object, "$.network.interface", "Expected `array`, got `object`"),
        (_set_tag_name_null, "$.compute.tagsList[0].name", "Expected `str`, got `null`"),
        (_set_lun_int, "$.compute.storageProfile.dataDisks[0].lun", "Expected `str`, got `int`"),
        (_set_compute_null, "$.compute", "Expected `object`, got `null`"),
    ],
)
def test_wrong_shape_names_the_path(
    mutate: Callable[[dict[str, Any]], None], path: str, expected: str
) -> None:
    raw = doc("instance-linux.json")
    mutate(raw)
    for decode in (model.decode_instance, lambda b: model.parse_instance(b)[0]):
        with pytest.raises(DocumentError) as info:
            decode(encode(raw))
        assert info.value.path == path
        assert expected in str(info.value)
        assert f"- at `{path}`" in str(info.value)
        assert str(info.value).startswith("invalid instance document: ")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not json", "JSON is malformed"),
        (b'{"compute": {"name": "x"', "truncated"),
        (b"", "truncated"),
        (b"[]", "Expected `object`, got `array` - at `$`"),
        (b'"compute"', "Expected `object`, got `str` - at `$`"),
    ],
)
def test_not_json_truncated_or_not_an_object(data: bytes, fragment: str) -> None:
    with pytest.raises(DocumentError, match="invalid instance document") as info:
        model.decode_instance(data)
    assert fragment in str(info.value)
    assert info.value.path == "$"
    with pytest.raises(DocumentError) as parsed:
        model.parse_instance(data)
    assert fragment in str(parsed.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("decode", "data", "path"),
    [
        (model.decode_scheduled_events, b'{"DocumentIncarnation": 1, "Events": {}}', "$.Events"),
        (
            model.decode_scheduled_events,
            b'{"DocumentIncarnation": 1, "Events": [{"EventType": 1}]}',
            "$.Events[0].EventType",
        ),
        (model.decode_scheduled_events, b'{"Events": null}', "$.Events"),
        (
            model.decode_loadbalancer,
            b'{"loadbalancer": {"inboundRules": [{"frontendPort": "http"}]}}',
            "$.loadbalancer.inboundRules[0].frontendPort",
        ),
        (model.decode_loadbalancer, b'{"loadbalancer": []}', "$.loadbalancer"),
        (model.decode_versions, b'{"apiVersions": [1]}', "$.apiVersions[0]"),
        (model.decode_attested, b'{"encoding": "pkcs7"}', "$"),
        (model.decode_attested_payload, b'{"plan": []}', "$.plan"),
        (model.decode_error, b'{"error": "x", "newest-versions": "2020"}', "$.newest-versions"),
    ],
)
def test_other_documents_reject_bad_shapes(
    decode: Callable[[bytes], object], data: bytes, path: str
) -> None:
    with pytest.raises(DocumentError) as info:
        decode(data)
    assert info.value.path == path


def test_parse_helpers_return_typed_and_raw() -> None:
    events, events_raw = model.parse_scheduled_events(encode(SCHEDULED_EVENTS))
    assert events_raw == SCHEDULED_EVENTS
    assert events.events[0].event_type == "Reboot"
    lb, lb_raw = model.parse_loadbalancer(encode(LOADBALANCER))
    assert lb_raw == LOADBALANCER
    assert lb.loadbalancer.inbound_rules[0].backend_port == 443
    with pytest.raises(DocumentError, match="scheduled events"):
        model.parse_scheduled_events(b"[1]")
    with pytest.raises(DocumentError, match="loadbalancer"):
        model.parse_loadbalancer(b"{")


def full_snapshot() -> Snapshot:
    return (
        Snapshot()
        .with_instance(body("instance-linux.json"))
        .with_scheduled_events(SCHEDULED_EVENTS)
        .with_loadbalancer(encode(LOADBALANCER))
    )


def test_snapshot_helpers() -> None:
    empty = Snapshot()
    assert (empty.instance, empty.scheduled_events, empty.loadbalancer) == (None, None, None)
    assert empty.loadbalancer_absent is False
    snap = full_snapshot()
    assert snap.instance == model.decode_instance(body("instance-linux.json"))
    assert snap.instance_raw == doc("instance-linux.json")
    assert snap.scheduled_events_raw == SCHEDULED_EVENTS
    assert snap.loadbalancer_raw == LOADBALANCER
    absent = snap.with_loadbalancer_absent()
    assert (absent.loadbalancer, absent.loadbalancer_raw, absent.loadbalancer_absent) == (
        None,
        None,
        True,
    )
    assert absent.instance is snap.instance
    back = absent.with_loadbalancer(LOADBALANCER)
    assert back.loadbalancer_absent is False
    assert back.loadbalancer == snap.loadbalancer
    assert snap.loadbalancer_absent is False


def test_snapshot_from_mapping_is_independent_of_the_caller() -> None:
    raw = doc("instance-windows.json")
    snap = Snapshot().with_instance(raw)
    raw["compute"]["name"] = "changed"
    assert snap.instance_raw is not None
    assert snap.instance_raw["compute"]["name"] == "examplevmname"
    assert snap.instance is not None
    assert snap.instance.compute.user_data == "Zm9vYmFy"


def test_snapshot_rejects_bad_documents_and_stays_unchanged() -> None:
    snap = full_snapshot()
    with pytest.raises(DocumentError, match=r"at `\$\.compute`"):
        snap.with_instance({"compute": [], "network": {}})
    with pytest.raises(DocumentError, match="not JSON-encodable"):
        snap.with_scheduled_events({"Events": {object()}})
    with pytest.raises(DocumentError):
        snap.with_loadbalancer(b"<html>404</html>")
    assert snap == full_snapshot()


@pytest.mark.parametrize(
    "snap",
    [
        Snapshot(),
        Snapshot().with_loadbalancer_absent(),
        Snapshot().with_instance(body("instance-azurestack.json")),
    ],
)
def test_snapshot_round_trips_through_msgspec_json(snap: Snapshot) -> None:
    assert msgspec.json.decode(msgspec.json.encode(snap), type=Snapshot) == snap


def test_full_snapshot_round_trips_through_msgspec_json() -> None:
    snap = full_snapshot()
    restored = msgspec.json.decode(msgspec.json.encode(snap), type=Snapshot)
    assert restored == snap
    assert restored.instance is not None
    assert restored.instance.compute.storage_profile.data_disks[0].disk_size_gb == "1024"
    assert restored.instance_raw == doc("instance-linux.json")


def test_structs_are_frozen() -> None:
    instance = model.decode_instance(body("instance-linux.json"))
    with pytest.raises(AttributeError):
        instance.compute.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Snapshot().loadbalancer_absent = True  # type: ignore[misc]


def _nested(depth: int, leaf: bytes = b"1") -> bytes:
    """A JSON value of ``depth`` nested objects around ``leaf``."""
    return b'{"a":' * depth + leaf + b"}" * depth


@pytest.mark.parametrize("levels", [33, 450, 10_000])
def test_documents_deeper_than_imds_sends_are_invalid(levels: int) -> None:
    """A document nested deeper than ``MAX_DEPTH`` (32) is a DocumentError, not a crash."""
    under_known_key = b'{"compute":{"name":"vm","plan":' + _nested(levels - 2) + b'},"network":{}}'
    in_a_list = b'{"compute":{"tagsList":[' + _nested(levels - 3) + b"]}}"
    for body, document, parse in (
        (under_known_key, "instance", model.parse_instance),
        (in_a_list, "instance", model.parse_instance),
        (
            b'{"DocumentIncarnation":1,"Events":[],"x":' + _nested(levels - 1) + b"}",
            "scheduled events",
            model.parse_scheduled_events,
        ),
        (
            b'{"loadbalancer":' + _nested(levels - 1) + b"}",
            "loadbalancer",
            model.parse_loadbalancer,
        ),
    ):
        with pytest.raises(DocumentError, match=f"invalid {document} document: nested deeper"):
            parse(body)
    if levels > 1000:  # beyond the decoder's own recursion limit: still a DocumentError
        with pytest.raises(DocumentError, match="nested deeper than 32 levels"):
            model.decode_instance(b'{"compute":' + _nested(levels) + b"}")


def test_documents_up_to_the_depth_bound_decode() -> None:
    body = b'{"compute":{"name":"vm","future":' + _nested(30) + b"}}"
    instance, raw = model.parse_instance(body)
    assert instance.compute.name == "vm"
    assert depth.too_deep(raw) is None
    assert depth.too_deep(raw, 31) == "$.compute.future" + ".a" * 29
    assert depth.too_deep([[{"x": []}]], 3) == "$[0][0].x"
