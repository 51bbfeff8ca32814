"""Documents at an older api-version (sans-IO), against the emulator and the golden documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imdsd.emulator.profiles import AZURE, SCHEDULED_EVENTS_VERSIONS
from imdsd.filtering import FilterError, parse_format, render, resolve
from imdsd.front.shaping import events_at, instance_at
from imdsd.imdsfields import (
    INSTANCE_FIELDS,
    KNOWN_CHILDREN,
    strip_newer,
    unknown_fields,
    unknown_paths,
)

DATA = Path(__file__).parent / "data"
NEWEST = AZURE.versions[-1]


def _golden(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / name).read_text())
    return doc


@pytest.mark.parametrize("version", AZURE.versions)
def test_every_version_matches_what_the_emulator_serves(version: str) -> None:
    full = AZURE.default_instance()
    shaped = instance_at(full, version, NEWEST)
    assert shaped is not None
    assert shaped.document == AZURE.shape_instance(full, version)
    assert shaped.unknown == ()


@pytest.mark.parametrize("name", ["instance-linux.json", "instance-windows.json"])
def test_golden_documents_hold_only_fields_of_known_age(name: str) -> None:
    assert unknown_fields(_golden(name)) == []


def test_fields_newer_than_the_version_are_absent() -> None:
    doc = _golden("instance-linux.json")
    shaped = instance_at(doc, "2017-08-01", "2021-02-01")
    assert shaped is not None
    old = shaped.document
    compute = old["compute"]
    for gone in ("tagsList", "storageProfile", "azEnvironment", "publicKeys", "plan"):
        assert gone not in compute
    for kept in ("tags", "vmId", "subscriptionId", "resourceGroupName", "placementGroupId"):
        assert kept in compute
    assert old["network"] == doc["network"]
    assert "azEnvironment" in doc["compute"]  # the cached document itself is untouched


def test_the_polled_version_is_served_as_fetched() -> None:
    doc = {"compute": {"brandNew": "x"}, "network": {}}
    shaped = instance_at(doc, "2021-02-01", "2021-02-01")
    assert shaped is not None
    assert shaped.document is doc
    assert shaped.exact(["compute"], listing=False)


def test_newer_than_polled_is_not_exact() -> None:
    assert instance_at(_golden("instance-linux.json"), "2021-05-01", "2021-02-01") is None


def test_fields_of_unknown_age_are_found_in_compute_and_network() -> None:
    doc = _golden("instance-linux.json")
    doc["compute"]["brandNew"] = "x"
    doc["compute"]["storageProfile"]["osDisk"]["x"] = "inside a container of stable shape"
    doc["network"]["interface"][0]["ipv4"]["subnet"][0]["gateway"] = "10.0.0.1"
    assert unknown_fields(doc) == ["compute.brandNew", "network.interface.*.ipv4.subnet.*.gateway"]
    assert unknown_paths(doc) == [
        ("compute", "brandNew"),
        ("network", "interface", "0", "ipv4", "subnet", "0", "gateway"),
    ]


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


def _containers(document: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every object in ``document`` whose children the field table lists."""
    found = []
    dotted = ".".join("*" if part.isdigit() else part for part in path)
    if isinstance(document, dict) and dotted in KNOWN_CHILDREN:
        found.append(path)
    children = document.items() if isinstance(document, dict) else enumerate(document)
    for key, child in children if isinstance(document, dict | list) else ():
        found.extend(_containers(child, (*path, str(key))))
    return found


def _reads(document: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every node's path in ``document``, and one missing key below each object."""
    found = [path]
    if isinstance(document, dict):
        found.append((*path, "absent"))
    children = document.items() if isinstance(document, dict) else enumerate(document)
    for key, child in children if isinstance(document, dict | list) else ():
        found.extend(_reads(child, (*path, str(key))))
    return found


def _read(document: Any, path: tuple[str, ...], fmt: str) -> tuple[int, bytes]:
    try:
        return 200, render(
            resolve(document, list(path)), parse_format(fmt), leaf_json_allowed=False
        )[0]
    except FilterError as exc:
        return exc.status, str(exc).encode()


NEW_FIELD_VALUES: list[Any] = ["x", {"inner": "y"}, [{"inner": "y"}]]


@pytest.mark.parametrize("version", ["2017-08-01", "2019-02-01", "2020-09-01"])
@pytest.mark.parametrize("value", NEW_FIELD_VALUES, ids=["leaf", "object", "array"])
def test_a_read_is_exact_exactly_when_a_new_field_cannot_change_it(
    version: str, value: Any
) -> None:
    """For a field of unknown age added to each container of the golden document in turn,
    every read (each node, a missing key below each object, the field and below it, as
    ``json`` and ``text``) is exact if and only if IMDS's answer is the same whether or not it
    has the field at ``version``."""
    base = _golden("instance-linux.json")
    polled = "2021-02-01"
    without = instance_at(base, version, polled)
    assert without is not None
    for container in _containers(base):
        doc = json.loads(json.dumps(base))
        node = resolve(doc, list(container))
        node["zzNew"] = value
        field = (*container, "zzNew")
        shaped = instance_at(doc, version, polled)
        assert shaped is not None
        reads = {*_reads(shaped.document), field, (*field, "inner"), (*field, "0")}
        for path in sorted(reads):
            for fmt in ("json", "text"):
                same = _read(shaped.document, path, fmt) == _read(without.document, path, fmt)
                exact = shaped.exact(path, listing=fmt == "text")
                assert exact == same, (container, path, fmt)


def test_a_new_field_inside_a_container_newer_than_the_version_is_gone_with_it() -> None:
    doc = _golden("instance-linux.json")
    doc["compute"]["storageProfile"]["zzNew"] = "x"
    before = instance_at(doc, "2019-02-01", "2021-02-01")  # storageProfile came 2019-06-01
    after = instance_at(doc, "2020-09-01", "2021-02-01")
    assert before is not None
    assert after is not None
    assert before.unknown == ()
    assert before.exact(["compute"], listing=False)
    assert after.unknown == (("compute", "storageprofile", "zznew"),)
    assert not after.exact(["compute"], listing=False)
    assert not after.exact(["compute", "storageProfile"], listing=True)
    assert after.exact(["compute"], listing=True)
