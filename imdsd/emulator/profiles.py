"""Emulator profiles: which IMDS the emulator pretends to be (sans-IO).

``azure``: Azure public cloud, every endpoint, the seed's api-version list (newest
2023-11-15). ``azurestack``: Azure Stack Hub, api-versions 2017-03-01 up to 2021-05-01,
``/metadata/attested``, ``/metadata/identity`` and ``/metadata/loadbalancer`` answer 404, and
every served instance document has ``azEnvironment`` ``AzureStack`` and empty ``customData``,
``plan`` and ``zone``.

Version sources (all from Microsoft's public docs):

- api-versions: the IMDS page's "Supported API versions" (plus 2023-07-01 and 2023-11-15 from
  the seed); the seed's copy lacks 2021-01-01 only because its duplicate lines were removed,
  the docs list it (and userData needs it). Azure Stack Hub: its own page's list.
- endpoint minimum versions: the IMDS page's "Endpoint categories" table (attested
  2018-10-01, identity 2018-02-01, loadbalancer 2020-10-01; instance takes every version).
- Scheduled Events is versioned on its own ("Version and region availability" table of the
  Scheduled Events page): 2017-03-01 (preview) ... 2020-07-01.
- instance, event and attested fields: :mod:`imdsd.imdsfields` (shared with the IMDS front);
  a field newer than the requested api-version is left out.
"""

from __future__ import annotations

import copy
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from imdsd.imdsfields import EVENT_FIELDS, INSTANCE_FIELDS, strip_newer


class Endpoint(enum.StrEnum):
    """The IMDS endpoints the emulator serves."""

    VERSIONS = "versions"
    INSTANCE = "instance"
    SCHEDULED_EVENTS = "scheduledevents"
    LOADBALANCER = "loadbalancer"
    ATTESTED = "attested"
    IDENTITY = "identity"


AZURE_VERSIONS: tuple[str, ...] = (
    "2017-03-01", "2017-04-02", "2017-08-01", "2017-10-01", "2017-12-01", "2018-02-01",
    "2018-04-02", "2018-10-01", "2019-02-01", "2019-03-11", "2019-04-30", "2019-06-01",
    "2019-06-04", "2019-08-01", "2019-08-15", "2019-11-01", "2020-06-01", "2020-07-15",
    "2020-09-01", "2020-10-01", "2020-12-01", "2021-01-01", "2021-02-01", "2021-03-01",
    "2021-05-01", "2021-08-01", "2021-10-01", "2021-11-01", "2021-11-15", "2021-12-13",
    "2023-07-01", "2023-11-15",
)  # fmt: skip

AZURESTACK_VERSIONS: tuple[str, ...] = tuple(v for v in AZURE_VERSIONS if v <= "2021-05-01")

SCHEDULED_EVENTS_VERSIONS: tuple[str, ...] = (
    "2017-03-01", "2017-08-01", "2017-11-01", "2019-01-01", "2019-04-01", "2019-08-01",
    "2020-07-01",
)  # fmt: skip

ENDPOINT_MIN_VERSION: Mapping[Endpoint, str] = {
    Endpoint.ATTESTED: "2018-10-01",
    Endpoint.IDENTITY: "2018-02-01",
    Endpoint.LOADBALANCER: "2020-10-01",
}


@cache
def _data_text(name: str) -> str:
    return (resources.files("imdsd.emulator") / "data" / name).read_text(encoding="utf-8")


def load_data(name: str) -> Any:
    """A fresh copy of the JSON document ``imdsd/emulator/data/<name>`` shipped in the package."""
    return json.loads(_data_text(name))


@dataclass(frozen=True)
class Profile:
    """One emulated IMDS flavour: versions, endpoints, default documents, document shaping."""

    name: str
    versions: tuple[str, ...]
    endpoints: frozenset[Endpoint]
    instance_file: str
    has_loadbalancer: bool
    forced_compute: Mapping[str, Any] = field(default_factory=dict)

    def serves(self, endpoint: Endpoint) -> bool:
        """True when this profile has ``endpoint`` (otherwise it answers 404)."""
        return endpoint in self.endpoints

    def versions_for(self, endpoint: Endpoint) -> tuple[str, ...]:
        """The api-versions ``endpoint`` accepts, oldest first (empty for /metadata/versions)."""
        if endpoint is Endpoint.VERSIONS:
            return ()
        if endpoint is Endpoint.SCHEDULED_EVENTS:
            return SCHEDULED_EVENTS_VERSIONS
        minimum = ENDPOINT_MIN_VERSION.get(endpoint, "")
        return tuple(v for v in self.versions if v >= minimum)

    def newest_versions(self, endpoint: Endpoint, count: int = 3) -> list[str]:
        """The ``count`` newest api-versions of ``endpoint``, newest first."""
        return list(reversed(self.versions_for(endpoint)))[:count]

    def default_instance(self) -> dict[str, Any]:
        """A fresh copy of this profile's default instance document."""
        doc: dict[str, Any] = load_data(self.instance_file)
        return doc

    def default_loadbalancer(self) -> dict[str, Any] | None:
        """A fresh copy of the default load balancer document, None when there is none."""
        if not self.has_loadbalancer:
            return None
        doc: dict[str, Any] = load_data("loadbalancer.json")
        return doc

    def shape_instance(self, document: dict[str, Any], api_version: str) -> dict[str, Any]:
        """The instance document as served at ``api_version`` (newer fields left out)."""
        shaped: dict[str, Any] = strip_newer(document, INSTANCE_FIELDS, api_version)
        compute = shaped.get("compute")
        if isinstance(compute, dict):
            for key, value in self.forced_compute.items():
                if key in compute:
                    compute[key] = copy.deepcopy(value)
        return shaped

    def shape_scheduled_events(self, document: dict[str, Any], api_version: str) -> dict[str, Any]:
        """The scheduled events document as served at ``api_version``."""
        shaped = copy.deepcopy(document)
        shaped["Events"] = [
            strip_newer(event, EVENT_FIELDS, api_version) for event in shaped.get("Events", [])
        ]
        return shaped


AZURE = Profile(
    name="azure",
    versions=AZURE_VERSIONS,
    endpoints=frozenset(Endpoint),
    instance_file="instance-azure.json",
    has_loadbalancer=True,
)

AZURESTACK = Profile(
    name="azurestack",
    versions=AZURESTACK_VERSIONS,
    endpoints=frozenset(
        {Endpoint.VERSIONS, Endpoint.INSTANCE, Endpoint.SCHEDULED_EVENTS},
    ),
    instance_file="instance-azurestack.json",
    has_loadbalancer=False,
    forced_compute={
        "azEnvironment": "AzureStack",
        "customData": "",
        "plan": {"name": "", "product": "", "publisher": ""},
        "zone": "",
    },
)

PROFILES: Mapping[str, Profile] = {p.name: p for p in (AZURE, AZURESTACK)}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ``ValueError`` names the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(PROFILES)
        raise ValueError(f"unknown emulator profile {name!r}, expected one of {known}") from None
