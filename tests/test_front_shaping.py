"""Documents at an older api-version (sans-IO), against the emulator and the golden documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imdsd.emulator.profiles import AZURE, SCHEDULED_EVENTS_VERSIONS
from imdsd.front.shaping import events_at, instance_at
from imdsd.imdsfields import INSTANCE_FIELDS, KNOWN_CHILDREN, strip_newer, unknown_fields

DATA = Path(__file__).parent / "data"
NEWEST = AZURE.versions[-1]


def _golden(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / name).read_text())
    return doc


@pytest.mark.parametrize("version", AZURE.versions)
def test_every_version_matches_what_the_emulator_serves(version: str) -> None:
    full = AZURE.default_instance()
    assert instance_at(full, version, NEWEST) == AZURE.shape_instance(full, version)


@pytest.mark.parametrize("name", ["instance-linux.json", "instance-windows.json"])
def test_golden_documents_hold_only_fields_of_known_age(name: str) -> None:
    assert unknown_fields(_golden(name)) == []


def test_fields_newer_than_the_version_are_absent() -> None:
    doc = _golden("instance-linux.json")
    old = instance_at(doc, "2017-08-01", "2021-02-01")
    assert old is not None
    compute = old["compute"]
    for gone in ("tagsList", "storageProfile", "azEnvironment", "publicKeys", "plan"):
        assert gone not in compute
    for kept in ("tags", "vmId", "subscriptionId", "resourceGroupName", "placementGroupId"):
        assert kept in compute
    assert old["network"] == doc["network"]
    assert "azEnvironment" in doc["compute"]  # the cached document itself is untouched


def test_the_polled_version_is_served_as_fetched() -> None:
    doc = {"compute": {"brandNew": "x"}, "network": {}}
    assert instance_at(doc, "2021-02-01", "2021-02-01") is doc


def test_newer_than_polled_or_unknown_fields_are_not_exact() -> None:
    doc = _golden("instance-linux.json")
    assert instance_at(doc, "2021-05-01", "2021-02-01") is None
    doc["compute"]["brandNew"] = "x"
    doc["compute"]["storageProfile"]["osDisk"]["x"] = "inside a container of stable shape"
    assert unknown_fields(doc) == ["compute.brandNew"]
    assert instance_at(doc, "2020-09-01", "2021-02-01") is None


def test_nested_and_array_fields_are_dropped() -> None:
    doc = {
        "compute": {
            "securityProfile": {"secureBootEnabled": "true", "securityType": "TrustedLaunch"},
            "storageProfile": {"dataDisks": [{"lun": "0", "isUltraDisk": "false"}, {"lun": "1"}]},
        }
    }
    shaped = strip_newer(doc, INSTANCE_FIELDS, "2021-03-01")
    assert shaped["compute"]["securityProfile"] == {"secureBootEnabled": "true"}
    assert shaped["compute"]["storageProfile"]["dataDisks"] == [{"lun": "0"}, {"lun": "1"}]


@pytest.mark.parametrize("version", SCHEDULED_EVENTS_VERSIONS)
def test_scheduled_events_match_the_emulator(version: str) -> None:
    doc = {
        "DocumentIncarnation": 3,
        "Events": [
            {
                "EventId": "A",
                "EventType": "Reboot",
                "Description": "d",
                "EventSource": "Platform",
                "DurationInSeconds": -1,
            }
        ],
    }
    assert events_at(doc, version, "2020-07-01") == AZURE.shape_scheduled_events(doc, version)
    assert events_at(doc, "2021-01-01", "2020-07-01") is None


# Fields the IMDS documentation lists that the API description leaves out.
DOCUMENTED_ONLY = {
    "compute": {"customData"},
    "compute.storageProfile.dataDisks.*": {"encryptionSettings"},
}


@pytest.mark.parametrize("version", ["2018-10-01", "2020-06-01"])
def test_fields_served_at_a_version_are_the_api_descriptions(version: str) -> None:
    described = _golden("imds-api-description-fields.json")[version]
    for container, names in described.items():
        served = {
            name
            for name in KNOWN_CHILDREN[container]
            if INSTANCE_FIELDS.get(f"{container}.{name}", "") <= version
        }
        assert served - DOCUMENTED_ONLY.get(container, set()) == set(names), container
