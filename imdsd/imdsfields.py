"""Which fields of IMDS's documents appear at which api-version (sans-IO).

The one table of field ages, used by the emulator (:mod:`imdsd.emulator.profiles` serves a
document at the requested api-version) and by the IMDS front (:mod:`imdsd.front.shaping`
answers an older api-version from the cached document).

Sources: the "Version introduced" column of the IMDS documentation's schema tables, checked
against the compute definitions of the official API description (azure-rest-api-specs,
``specification/imds/data-plane/Microsoft.InstanceMetadataService/stable/<version>/imds.json``;
the compute fields of its 2018-10-01 and 2020-06-01 descriptions are kept in
``tests/data/imds-api-description-fields.json`` and the table must serve exactly those at
those versions, apart from ``customData`` and data disks' ``encryptionSettings``, which the
documentation lists and the description leaves out). ``physicalZone`` has no version there
(rolling out); 2023-11-15 is assumed.
Fields of the first versions (2017-03-01/04-02) have no entry and are always served; the
containers' children of those versions are listed (the network part is all of that age) so
that a field IMDS adds later and this table does not know is found (:func:`unknown_paths`).
Scheduled Events has its own track (the "Version and region availability" table of its
page): ``Description`` came with 2019-04-01, ``EventSource`` with 2019-08-01,
``DurationInSeconds`` with 2020-07-01. The attested document's ``licenseType`` came with
2020-09-01.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# Dotted path under the instance document ("*" = every array element) -> first api-version.
INSTANCE_FIELDS: Mapping[str, str] = {
    "compute.additionalCapabilities": "2021-11-01",
    "compute.azEnvironment": "2018-10-01",
    "compute.customData": "2019-02-01",
    "compute.evictionPolicy": "2020-12-01",
    "compute.extendedLocation": "2021-03-01",
    "compute.host": "2021-11-15",
    "compute.hostGroup": "2021-11-15",
    "compute.isHostCompatibilityLayerVm": "2020-06-01",
    "compute.licenseType": "2020-09-01",
    "compute.osProfile": "2020-07-15",
    "compute.osProfile.disablePasswordAuthentication": "2020-10-01",
    "compute.physicalZone": "2023-11-15",
    "compute.placementGroupId": "2017-08-01",
    "compute.plan": "2018-04-02",
    "compute.platformSubFaultDomain": "2021-10-01",
    "compute.priority": "2020-12-01",
    "compute.provider": "2018-10-01",
    "compute.publicKeys": "2018-04-02",
    "compute.resourceGroupName": "2017-08-01",
    "compute.resourceId": "2019-03-11",
    "compute.securityProfile": "2020-06-01",
    "compute.securityProfile.encryptionAtHost": "2021-11-01",
    "compute.securityProfile.securityType": "2021-12-13",
    "compute.storageProfile": "2019-06-01",
    "compute.storageProfile.resourceDisk": "2021-02-01",
    "compute.storageProfile.dataDisks.*.bytesPerSecondThrottle": "2021-05-01",
    "compute.storageProfile.dataDisks.*.diskCapacityBytes": "2021-05-01",
    "compute.storageProfile.dataDisks.*.isSharedDisk": "2021-05-01",
    "compute.storageProfile.dataDisks.*.isUltraDisk": "2021-05-01",
    "compute.storageProfile.dataDisks.*.opsPerSecondThrottle": "2021-05-01",
    "compute.subscriptionId": "2017-08-01",
    "compute.tags": "2017-08-01",
    "compute.tagsList": "2019-06-04",
    "compute.userData": "2021-01-01",
    "compute.virtualMachineScaleSet": "2021-03-01",
    "compute.vmScaleSetName": "2017-12-01",
    "compute.zone": "2017-12-01",
}

# Containers whose children appeared over time, with the children present from the start.
_BASE_CHILDREN: Mapping[str, frozenset[str]] = {
    "": frozenset({"compute", "network"}),
    "compute": frozenset(
        {
            "location", "name", "offer", "osType", "platformFaultDomain",
            "platformUpdateDomain", "publisher", "sku", "version", "vmId", "vmSize",
        }
    ),
    "compute.osProfile": frozenset({"adminUsername", "computerName"}),
    "compute.securityProfile": frozenset({"secureBootEnabled", "virtualTpmEnabled"}),
    "compute.storageProfile": frozenset({"dataDisks", "imageReference", "osDisk"}),
    "compute.storageProfile.dataDisks.*": frozenset(
        {
            "caching", "createOption", "diskSizeGB", "encryptionSettings", "image", "lun",
            "managedDisk", "name", "vhd", "writeAcceleratorEnabled",
        }
    ),
    "network": frozenset({"interface"}),
    "network.interface.*": frozenset({"ipv4", "ipv6", "macAddress"}),
    "network.interface.*.ipv4": frozenset({"ipAddress", "subnet"}),
    "network.interface.*.ipv4.ipAddress.*": frozenset({"privateIpAddress", "publicIpAddress"}),
    "network.interface.*.ipv4.subnet.*": frozenset({"address", "prefix"}),
    "network.interface.*.ipv6": frozenset({"ipAddress"}),
}  # fmt: skip

# Field of one scheduled event -> first api-version (of the Scheduled Events track).
EVENT_FIELDS: Mapping[str, str] = {
    "Description": "2019-04-01",
    "EventSource": "2019-08-01",
    "DurationInSeconds": "2020-07-01",
}

# Field of the attested document's payload -> first api-version.
ATTESTED_FIELDS: Mapping[str, str] = {"licenseType": "2020-09-01"}


def _known_children() -> dict[str, frozenset[str]]:
    known = {path: set(children) for path, children in _BASE_CHILDREN.items()}
    for dotted in INSTANCE_FIELDS:
        parent, _, name = dotted.rpartition(".")
        if parent in known:
            known[parent].add(name)
    return {path: frozenset(children) for path, children in known.items()}


# Container of the instance document -> every child whose first api-version is known.
KNOWN_CHILDREN: Mapping[str, frozenset[str]] = _known_children()


def _nodes(document: Any, dotted: str) -> list[Any]:
    """Every node at ``dotted`` ("" = the document, ``*`` = each array element)."""
    nodes = [document]
    for part in dotted.split(".") if dotted else []:
        found: list[Any] = []
        for node in nodes:
            if part == "*" and isinstance(node, list):
                found.extend(node)
            elif isinstance(node, dict) and part in node:
                found.append(node[part])
        nodes = found
    return nodes


def _located(document: Any, dotted: str) -> list[tuple[tuple[str, ...], Any]]:
    """Every node at ``dotted`` with its path (``*`` gives each array element's index)."""
    located: list[tuple[tuple[str, ...], Any]] = [((), document)]
    for part in dotted.split(".") if dotted else []:
        found: list[tuple[tuple[str, ...], Any]] = []
        for path, node in located:
            if part == "*" and isinstance(node, list):
                found.extend(((*path, str(i)), item) for i, item in enumerate(node))
            elif isinstance(node, dict) and part in node:
                found.append(((*path, part), node[part]))
        located = found
    return located


def unknown_paths(document: Any) -> list[tuple[str, ...]]:
    """Paths (keys and array indexes, as route segments) of the fields of unknown age."""
    found: set[tuple[str, ...]] = set()
    for container, known in KNOWN_CHILDREN.items():
        for path, node in _located(document, container):
            if isinstance(node, dict):
                found.update((*path, str(key)) for key in node if key not in known)
    return sorted(found)


def unknown_fields(document: Any) -> list[str]:
    """Dotted paths of the instance document's fields whose first api-version is unknown."""
    found: list[str] = []
    for container, known in KNOWN_CHILDREN.items():
        for node in _nodes(document, container):
            if isinstance(node, dict):
                prefix = container + "." if container else ""
                found.extend(prefix + key for key in node if key not in known)
    return sorted(set(found))


def _drop(node: Any, parts: list[str]) -> None:
    """Remove the field at ``parts`` (``*`` walks every array element) where present."""
    if not parts:
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(node, list):
            for item in node:
                _drop(item, rest)
    elif isinstance(node, dict) and head in node:
        if rest:
            _drop(node[head], rest)
        else:
            del node[head]


def strip_newer(document: Any, table: Mapping[str, str], api_version: str) -> Any:
    """A copy of ``document`` without the fields of ``table`` newer than ``api_version``."""
    result = copy.deepcopy(document)
    for dotted, first in table.items():
        if api_version < first:
            _drop(result, dotted.split("."))
    return result
