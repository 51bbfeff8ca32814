"""Documents generated from the official IMDS API description, any field or section absent.

The schema below is copied from azure-rest-api-specs,
``specification/imds/data-plane/.../stable/<version>/imds.json`` (definitions ``Instance``,
``Compute``, ``Network`` and what they reference) for three api-versions. No property there
is required, so any of them may be absent; every leaf is a string. ``tests/data/
spec-instance-2021-11-15.json`` is that description's own example response (no ``network``).

Each generated document must decode, be served byte-for-byte, and diff without error; a
sequence of them, fed through ``carry`` and ``diff`` as the store does, must report every
change of a section exactly once (replaying the changes rebuilds the last known section).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api_support import FakeContext

from imdsd.api.access import AccessPolicy, Peer
from imdsd.api.metrics import Metrics
from imdsd.api.routes import Reply, Router
from imdsd.changes import carry, diff, mac_key, parse_tags
from imdsd.frames import Change
from imdsd.model import DocumentError, Snapshot, parse_instance

DATA = Path(__file__).parent / "data"
ROOT = Peer(1, 0, 0)
Raw = dict[str, Any]
S = "string"  # a string leaf; a one-item list is an array of that item; a dict an object

_IP4 = {"privateIpAddress": S, "publicIpAddress": S}
_NIC: Raw = {
    "ipv4": {"ipAddress": [_IP4], "subnet": [{"address": S, "prefix": S}]},
    "ipv6": {"ipAddress": [{"privateIpAddress": S}]},
    "macAddress": S,
}
_NETWORK = {"interface": [_NIC]}
_COMPUTE_2018_02_01 = dict.fromkeys(
    [
        "location",
        "name",
        "offer",
        "osType",
        "placementGroupId",
        "platformFaultDomain",
        "platformUpdateDomain",
        "publisher",
        "resourceGroupName",
        "sku",
        "subscriptionId",
        "tags",
        "version",
        "vmId",
        "vmScaleSetName",
        "vmSize",
        "zone",
    ],
    S,
)
_VAULT = {"sourceVault": {"id": S}}
_URI = {"uri": S}
_MANAGED = {"id": S, "storageAccountType": S}
_OS_DISK: Raw = {
    "caching": S,
    "createOption": S,
    "diffDiskSettings": {"option": S},
    "diskSizeGB": S,
    "encryptionSettings": {
        "enabled": S,
        "diskEncryptionKey": {**_VAULT, "secretUrl": S},
        "keyEncryptionKey": {**_VAULT, "keyUrl": S},
    },
    "image": _URI,
    "managedDisk": _MANAGED,
    "name": S,
    "osType": S,
    "vhd": _URI,
    "writeAcceleratorEnabled": S,
}
_DATA_DISK: Raw = {
    **dict.fromkeys(
        [
            "bytesPerSecondThrottle",
            "caching",
            "createOption",
            "diskCapacityBytes",
            "diskSizeGB",
            "isSharedDisk",
            "isUltraDisk",
            "lun",
            "name",
            "opsPerSecondThrottle",
            "writeAcceleratorEnabled",
        ],
        S,
    ),
    "image": _URI,
    "managedDisk": _MANAGED,
    "vhd": _URI,
}
_IMAGE_2021 = dict.fromkeys(["id", "offer", "publisher", "sku", "version"], S)
_SECURITY_2021 = dict.fromkeys(["secureBootEnabled", "virtualTpmEnabled", "encryptionAtHost"], S)
_COMPUTE_2021_11_15: Raw = {
    **_COMPUTE_2018_02_01,
    **dict.fromkeys(
        [
            "azEnvironment",
            "evictionPolicy",
            "isHostCompatibilityLayerVm",
            "licenseType",
            "platformSubFaultDomain",
            "priority",
            "provider",
            "resourceId",
            "userData",
        ],
        S,
    ),
    "extendedLocation": {"type": S, "name": S},
    "osProfile": dict.fromkeys(
        ["adminUsername", "computerName", "disablePasswordAuthentication"], S
    ),
    "plan": {"name": S, "publisher": S, "product": S},
    "publicKeys": [{"path": S, "keyData": S}],
    "securityProfile": _SECURITY_2021,
    "host": {"id": S},
    "hostGroup": {"id": S},
    "storageProfile": {
        "imageReference": _IMAGE_2021,
        "osDisk": _OS_DISK,
        "dataDisks": [_DATA_DISK],
        "resourceDisk": {"size": S},
    },
    "tagsList": [{"name": S, "value": S}],
    "virtualMachineScaleSet": {"id": S},
    "additionalCapabilities": {"hibernationEnabled": S},
}
_COMPUTE_2023_07_01: Raw = {
    **_COMPUTE_2021_11_15,
    "securityProfile": {**_SECURITY_2021, "securityType": S},
    "storageProfile": {
        **_COMPUTE_2021_11_15["storageProfile"],
        "imageReference": {
            **_IMAGE_2021,
            "communityGalleryImageId": S,
            "sharedGalleryImageId": S,
        },
    },
}
SCHEMAS: dict[str, Raw] = {
    "2018-02-01": {"compute": _COMPUTE_2018_02_01, "network": _NETWORK},
    "2021-11-15": {"compute": _COMPUTE_2021_11_15, "network": _NETWORK},
    "2023-07-01": {"compute": _COMPUTE_2023_07_01, "network": _NETWORK},
}

# Small pools, so that keys and values repeat across the documents of a sequence.
_POOLS: dict[str, list[str]] = {
    "lun": ["0", "1", "2"],
    "macAddress": ["000D3A000001", "00-0d-3a-00-00-02", "000d3a000003"],
    "size": ["", "0", "4096", "8192"],
    "name": ["env", "team", "vm1"],
    "value": ["", "prod", "a:b"],
}
_UNIQUE_BY = {"dataDisks": "lun", "interface": "macAddress", "tagsList": "name"}
_LEAF = st.sampled_from(["", "a", "b", "Standard_A1"]) | st.text(max_size=4)


def _strategy(schema: Any, name: str = "") -> st.SearchStrategy[Any]:
    if schema == S:
        return st.sampled_from(_POOLS[name]) if name in _POOLS else _LEAF
    if isinstance(schema, list):
        key = _UNIQUE_BY.get(name)

        def unique(item: Any) -> Any:
            value = item.get(key) if isinstance(item, dict) and key else None
            return mac_key(value) if key == "macAddress" and value is not None else value

        return st.lists(_strategy(schema[0]), max_size=3, unique_by=unique if key else None)
    optional = {k: _strategy(v, k) for k, v in schema.items()}
    optional["futureField"] = st.just({"unknown": ["to", "imdsd"]})
    return st.fixed_dictionaries({}, optional=optional)


def _consistent(doc: Raw) -> Raw:
    """IMDS keeps ``tags`` and ``tagsList`` in step: when both are present, they agree."""
    compute = doc.get("compute")
    if isinstance(compute, dict) and "tagsList" in compute and "tags" in compute:
        compute["tags"] = ";".join(
            f"{t.get('name', '')}:{t.get('value', '')}" for t in compute["tagsList"]
        )
    return doc


DOCUMENTS = st.one_of(*(_strategy(schema).map(_consistent) for schema in SCHEMAS.values()))


def _router(snapshot: Snapshot) -> tuple[FakeContext, Router]:
    ctx = FakeContext()
    ctx.apply(snapshot)
    policy = AccessPolicy(["compute/userData", "compute/customData"], [0], [])
    return ctx, Router(ctx, policy, Metrics())


def _get(router: Router, target: str, peer: Peer = ROOT) -> Reply:
    outcome = router.route_target("GET", target, None, peer)
    assert isinstance(outcome, Reply)
    return outcome


# ---------------------------------------------------------------------------- one document


def test_the_descriptions_own_example_is_accepted_and_served() -> None:
    body = (DATA / "spec-instance-2021-11-15.json").read_bytes()
    instance, raw = parse_instance(body)
    assert instance.compute.name == "examplevmname"
    assert "network" not in raw
    ctx, router = _router(Snapshot().with_instance(body))
    assert ctx.revision == 1
    served = _get(router, "/metadata/instance?api-version=2021-11-15")
    assert served.status == 200
    assert served.body == msgspec.json.encode(json.loads(body))
    assert _get(router, "/metadata/instance/network").status == 404
    assert _get(router, "/v1/state").status == 200


def test_a_wrong_type_is_still_a_document_error() -> None:
    for body in (b'{"network": []}', b'{"compute": {"tagsList": {}}}', b'{"compute": null}'):
        try:
            parse_instance(body)
        except DocumentError:
            continue
        raise AssertionError(body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCUMENTS)
def test_each_document_decodes_is_served_as_sent_and_diffs(doc: Raw) -> None:
    body = json.dumps(doc).encode()
    instance, raw = parse_instance(body)
    assert raw == doc
    snapshot = Snapshot().with_instance(body)
    _, router = _router(snapshot)
    assert _get(router, "/metadata/instance").body == msgspec.json.encode(doc)
    if "compute" in doc:
        assert _get(router, "/metadata/instance/compute").body == msgspec.json.encode(
            doc["compute"]
        )
    user = Peer(2, 1000, 1000)
    redacted = json.loads(_get(router, "/metadata/instance", user).body)
    assert "userData" not in redacted.get("compute", {})
    assert redacted.get("network") == doc.get("network")
    assert _get(router, "/v1/state", user).status == 200
    golden = Snapshot().with_instance((DATA / "instance-linux.json").read_bytes())
    for old, new in ((golden, snapshot), (snapshot, golden), (snapshot, snapshot)):
        found = diff(old, carry(old, new))
        assert len({(c.kind, c.key) for c in found}) == len(found)
    assert diff(snapshot, carry(snapshot, snapshot)) == []
    assert instance.compute.name == doc.get("compute", {}).get("name", "")


# ---------------------------------------------------------------------------- sequences


def _tags(compute: Raw) -> dict[str, str] | None:
    if "tagsList" in compute:
        return {t.get("name", ""): t.get("value", "") for t in compute["tagsList"]}
    if "tags" in compute:
        return parse_tags(compute["tags"])
    return None


def _storage(doc: Raw, field: str) -> Any:
    return doc.get("compute", {}).get("storageProfile", {}).get(field)


def _sections(doc: Raw) -> dict[str, set[str] | None]:
    """The keys of each keyed section of ``doc``; None when the section is absent."""
    disks = _storage(doc, "dataDisks")
    nics = doc.get("network", {}).get("interface")
    temp = _storage(doc, "resourceDisk")
    return {
        "tags": None if (tags := _tags(doc.get("compute", {}))) is None else set(tags),
        "disks": None if disks is None else {f"lun:{d.get('lun', '')}" for d in disks},
        "network": None if nics is None else {mac_key(n.get("macAddress", "")) for n in nics},
        "resource": None
        if temp is None or "size" not in temp
        else ({"resource"} if temp["size"] not in ("", "0") else set()),
    }


def _scalars(doc: Raw) -> dict[str, str]:
    compute = doc.get("compute", {})
    return {k: v for k, v in compute.items() if isinstance(v, str) and k != "tags"}


_ADD = {"added", "attached"}
_REMOVE = {"removed", "detached"}


def _replay(known: set[str], changes: list[Change]) -> set[str]:
    out = set(known)
    for change in changes:
        if change.op in _ADD:
            assert change.key not in out, change
            out.add(change.key)
        elif change.op in _REMOVE:
            assert change.key in out, change
            out.remove(change.key)
        else:
            assert change.key in out, change
    return out


def _of(changes: list[Change], section: str) -> list[Change]:
    if section == "resource":
        return [c for c in changes if c.kind == "disks" and c.key == "resource"]
    if section == "disks":
        return [c for c in changes if c.kind == "disks" and c.key.startswith("lun:")]
    return [c for c in changes if c.kind == section]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(DOCUMENTS, min_size=2, max_size=6))
def test_sequences_report_each_change_exactly_once(docs: list[Raw]) -> None:
    previous = carry(Snapshot(), Snapshot().with_instance(docs[0]))
    known: dict[str, set[str] | None] = dict(_sections(docs[0]))
    scalars = _scalars(docs[0])
    for doc in docs[1:]:
        current = carry(previous, Snapshot().with_instance(doc))
        found = diff(previous, current)
        assert len({(c.kind, c.key) for c in found}) == len(found), found
        for section, keys in _sections(doc).items():
            changes = _of(found, section)
            last = known[section]
            if keys is None or last is None:
                assert [c for c in changes if c.op != "modified"] == [], (section, changes)
            else:
                assert _replay(last, changes) == keys, (section, last, keys, changes)
            if keys is not None:
                known[section] = keys
        new_scalars = _scalars(doc)
        expected = {k for k, v in new_scalars.items() if k in scalars and scalars[k] != v}
        reported = {c.key for c in found if c.kind == "compute" and c.key in _COMPUTE_SCALARS}
        assert reported == expected
        for change in found:
            if change.kind == "compute" and change.key in expected:
                assert (change.old, change.new) == (scalars[change.key], new_scalars[change.key])
        scalars.update(new_scalars)
        previous = current


_COMPUTE_SCALARS = frozenset(k for k, v in _COMPUTE_2023_07_01.items() if v == S) - {"tags"}
