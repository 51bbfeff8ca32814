"""Sans-IO tests of emulator profiles and the attested/identity documents."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from imdsd.emulator.attested import (
    attested_document,
    attested_payload,
    default_nonce,
    identity_token,
    unsigned_pkcs7,
)
from imdsd.emulator.profiles import (
    AZURE,
    AZURE_VERSIONS,
    AZURESTACK,
    SCHEDULED_EVENTS_VERSIONS,
    Endpoint,
    get_profile,
)
from imdsd.imdsfields import INSTANCE_FIELDS, strip_newer
from imdsd.model import decode_attested, decode_attested_payload, decode_instance

DATA = Path(__file__).parent / "data"
NOW = 1_606_771_159.0  # 2020-11-30 21:19:19 UTC, the docs' example


def test_azure_versions_follow_the_seed() -> None:
    assert AZURE_VERSIONS[0] == "2017-03-01"
    assert AZURE_VERSIONS[-1] == "2023-11-15"
    assert list(AZURE_VERSIONS) == sorted(set(AZURE_VERSIONS))
    assert len(AZURE_VERSIONS) == 32
    assert "2021-01-01" in AZURE_VERSIONS


def test_azurestack_versions_follow_its_page() -> None:
    assert AZURESTACK.versions[0] == "2017-03-01"
    assert AZURESTACK.versions[-1] == "2021-05-01"
    assert len(AZURESTACK.versions) == 25


def test_versions_per_endpoint() -> None:
    assert AZURE.versions_for(Endpoint.VERSIONS) == ()
    assert AZURE.versions_for(Endpoint.INSTANCE) == AZURE_VERSIONS
    assert AZURE.versions_for(Endpoint.SCHEDULED_EVENTS) == SCHEDULED_EVENTS_VERSIONS
    assert AZURE.versions_for(Endpoint.LOADBALANCER)[0] == "2020-10-01"
    assert AZURE.versions_for(Endpoint.ATTESTED)[0] == "2018-10-01"
    assert AZURE.versions_for(Endpoint.IDENTITY)[0] == "2018-02-01"
    assert AZURE.newest_versions(Endpoint.INSTANCE) == ["2023-11-15", "2023-07-01", "2021-12-13"]


def test_endpoints_per_profile() -> None:
    assert all(AZURE.serves(e) for e in Endpoint)
    assert [e for e in Endpoint if AZURESTACK.serves(e)] == [
        Endpoint.VERSIONS,
        Endpoint.INSTANCE,
        Endpoint.SCHEDULED_EVENTS,
    ]
    assert AZURE.default_loadbalancer() is not None
    assert AZURESTACK.default_loadbalancer() is None


def test_get_profile() -> None:
    assert get_profile("azurestack") is AZURESTACK
    with pytest.raises(ValueError, match="unknown emulator profile 'gcp', expected one of azure"):
        get_profile("gcp")


def test_default_documents_are_fresh_copies_and_valid() -> None:
    first = AZURE.default_instance()
    first["compute"]["vmSize"] = "x"
    assert AZURE.default_instance()["compute"]["vmSize"] == "Standard_A3"
    for profile in (AZURE, AZURESTACK):
        decode_instance(msgspec.json.encode(profile.default_instance()))


def test_azurestack_default_is_the_golden_document() -> None:
    golden = json.loads((DATA / "instance-azurestack.json").read_text())
    assert AZURESTACK.default_instance() == golden


# ------------------------------------------------------------------------------ shaping


def test_newest_version_keeps_every_field() -> None:
    doc = AZURE.default_instance()
    assert AZURE.shape_instance(doc, "2023-11-15") == doc


def test_older_versions_lose_newer_fields() -> None:
    doc = AZURE.default_instance()
    old = AZURE.shape_instance(doc, "2019-06-01")["compute"]
    assert "tagsList" not in old
    assert "securityProfile" not in old
    assert "storageProfile" in old
    assert "resourceDisk" not in old["storageProfile"]
    assert "isUltraDisk" not in old["storageProfile"]["dataDisks"][0]
    assert old["tags"] == "baz:bash;foo:bar"
    mid = AZURE.shape_instance(doc, "2021-11-01")["compute"]
    assert mid["securityProfile"] == {
        "secureBootEnabled": "true",
        "virtualTpmEnabled": "false",
        "encryptionAtHost": "true",
    }
    oldest = AZURE.shape_instance(doc, "2017-04-02")["compute"]
    assert sorted(oldest) == [
        "location",
        "name",
        "offer",
        "osType",
        "platformFaultDomain",
        "platformUpdateDomain",
        "publisher",
        "sku",
        "version",
        "vmId",
        "vmSize",
    ]
    assert doc == AZURE.default_instance()  # the input is untouched


def test_every_shaped_version_still_decodes() -> None:
    doc = AZURE.default_instance()
    for version in AZURE_VERSIONS:
        decode_instance(msgspec.json.encode(AZURE.shape_instance(doc, version)))


def test_field_table_paths_exist_in_the_default_document() -> None:
    doc = AZURE.default_instance()
    extra = {"customData": "", "userData": "", "host": {"id": ""}, "provider": ""}
    doc["compute"].update(extra)
    doc["compute"]["physicalZone"] = ""
    for path in INSTANCE_FIELDS:
        node: Any = doc
        for part in path.split("."):
            node = node[0] if part == "*" else node[part]


def test_strip_newer_fields_handles_missing_and_odd_shapes() -> None:
    table = {"a.b": "2020-01-01", "x.*.y": "2020-01-01"}
    assert strip_newer({"a": "leaf", "x": "no list"}, table, "2019-01-01") == {
        "a": "leaf",
        "x": "no list",
    }
    assert strip_newer({"x": [{"y": 1, "z": 2}, 3]}, table, "2019-01-01") == {"x": [{"z": 2}, 3]}


def test_azurestack_forces_its_empty_fields() -> None:
    doc = AZURE.default_instance()
    shaped = AZURESTACK.shape_instance(doc, "2021-05-01")["compute"]
    assert shaped["azEnvironment"] == "AzureStack"
    assert shaped["plan"] == {"name": "", "product": "", "publisher": ""}
    assert shaped["zone"] == ""
    doc["compute"]["customData"] = "c2VjcmV0"
    assert AZURESTACK.shape_instance(doc, "2021-05-01")["compute"]["customData"] == ""
    assert "plan" not in AZURESTACK.shape_instance(doc, "2018-02-01")["compute"]


def test_scheduled_event_fields_by_version() -> None:
    document = {
        "DocumentIncarnation": 2,
        "Events": [
            {
                "EventId": "E",
                "EventType": "Reboot",
                "Description": "",
                "EventSource": "Platform",
                "DurationInSeconds": -1,
            }
        ],
    }
    assert AZURE.shape_scheduled_events(document, "2020-07-01") == document
    (old,) = AZURE.shape_scheduled_events(document, "2019-04-01")["Events"]
    assert old == {"EventId": "E", "EventType": "Reboot", "Description": ""}
    (oldest,) = AZURE.shape_scheduled_events(document, "2017-11-01")["Events"]
    assert oldest == {"EventId": "E", "EventType": "Reboot"}


# ------------------------------------------------------------------------------ attested


def parse_der(data: bytes) -> tuple[int, bytes, bytes]:
    """(tag, content, rest) of the first DER element."""
    tag, first = data[0], data[1]
    if first < 0x80:
        size, start = first, 2
    else:
        count = first & 0x7F
        size, start = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
    return tag, data[start : start + size], data[start + size :]


def test_unsigned_pkcs7_structure() -> None:
    content = b"x" * 300  # long enough for a multi-byte length
    tag, info, rest = parse_der(unsigned_pkcs7(content))
    assert (tag, rest) == (0x30, b"")
    tag, oid, rest = parse_der(info)
    assert (tag, oid) == (0x06, bytes.fromhex("2a864886f70d010702"))
    tag, explicit, _ = parse_der(rest)
    assert tag == 0xA0
    tag, signed_data, _ = parse_der(explicit)
    _, version, rest = parse_der(signed_data)
    assert version == b"\x01"
    tag, digests, rest = parse_der(rest)
    assert (tag, digests) == (0x31, b"")
    tag, encap, rest = parse_der(rest)
    assert tag == 0x30
    assert parse_der(rest) == (0x31, b"", b"")  # no signer infos
    tag, oid, rest = parse_der(encap)
    assert oid == bytes.fromhex("2a864886f70d010701")
    octets = parse_der(parse_der(rest)[1])
    assert octets == (0x04, content, b"")


def test_attested_document_carries_the_payload() -> None:
    instance = AZURE.default_instance()
    payload = attested_payload(instance, nonce="1234567890", now_wall=NOW, include_license=True)
    assert payload == {
        "nonce": "1234567890",
        "plan": {"name": "planName", "product": "planProduct", "publisher": "planPublisher"},
        "sku": "18.04-LTS",
        "subscriptionId": "xxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxx",
        "timeStamp": {
            "createdOn": "11/30/20 21:19:19 -0000",
            "expiresOn": "12/01/20 03:19:19 -0000",
        },
        "vmId": "02aab8a4-74ef-476e-8182-f6d2ba4166a6",
        "licenseType": "",
    }
    document = attested_document(payload)
    decoded = decode_attested(msgspec.json.encode(document))
    assert decoded.encoding == "pkcs7"
    der = base64.b64decode(decoded.signature)
    assert json.dumps(payload, separators=(",", ":")).encode() in der
    start = der.index(b'{"nonce"')
    decode_attested_payload(der[start:-2])  # the DER ends with an empty signerInfos set


def test_attested_payload_without_license_and_with_odd_instance() -> None:
    payload = attested_payload({"compute": "x"}, nonce="n", now_wall=NOW, include_license=False)
    assert "licenseType" not in payload
    assert payload["plan"] == {"name": "", "product": "", "publisher": ""}


def test_default_nonce_is_the_utc_time() -> None:
    assert default_nonce(NOW) == "20201130-211919"


def test_identity_token_is_an_unsigned_jwt() -> None:
    answer = identity_token(
        "https://management.azure.com/", client_id="c", object_id="o", now_wall=NOW
    )
    assert answer["token_type"] == "Bearer"
    assert answer["resource"] == "https://management.azure.com/"
    assert answer["expires_on"] == str(int(NOW) + 86399)
    assert all(isinstance(v, str) for v in answer.values())
    header, claims, signature = answer["access_token"].split(".")
    assert signature == ""

    def b64(text: str) -> Any:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))

    assert b64(header) == {"typ": "JWT", "alg": "none"}
    assert b64(claims)["aud"] == "https://management.azure.com/"
    assert (b64(claims)["appid"], b64(claims)["oid"], answer["client_id"]) == ("c", "o", "c")
