"""Typed model of the Azure IMDS documents, their decoders, and the ``Snapshot`` imdsd keeps.

Every struct is frozen and ignores unknown fields, so a newer IMDS that adds fields still
decodes. Python names are snake_case; the JSON names are exactly what IMDS sends. In the
instance document every scalar is a string (``""`` when empty or not applicable), and fields
an older api-version lacks decode to their defaults (``""``, ``[]`` or an empty struct).

Decoders are built once at import. Every decoder raises ``DocumentError`` (a ``ValueError``)
whose message names the JSON path of the problem, e.g.
``invalid instance document: Expected `str`, got `int` - at `$.compute.name```.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from imdsd.depth import MAX_DEPTH, too_deep

__all__ = [
    "AdditionalCapabilities",
    "AttestedDocument",
    "AttestedPayload",
    "AttestedTimeStamp",
    "Compute",
    "DataDisk",
    "DiffDiskSettings",
    "DiskImage",
    "DocumentError",
    "ExtendedLocation",
    "Host",
    "HostGroup",
    "ImageReference",
    "ImdsError",
    "InboundRule",
    "Instance",
    "Interface",
    "IpAddress",
    "Ipv4",
    "Ipv6",
    "LoadBalancer",
    "LoadBalancerInfo",
    "ManagedDisk",
    "Network",
    "OsDisk",
    "OsProfile",
    "OutboundRule",
    "Plan",
    "PublicIpAddress",
    "PublicKey",
    "ResourceDisk",
    "ScheduledEvent",
    "ScheduledEvents",
    "SecurityProfile",
    "Snapshot",
    "StorageProfile",
    "Subnet",
    "Tag",
    "Versions",
    "VirtualHardDisk",
    "VirtualMachineScaleSet",
    "convert_instance",
    "convert_loadbalancer",
    "convert_scheduled_events",
    "decode_attested",
    "decode_attested_payload",
    "decode_error",
    "decode_instance",
    "decode_loadbalancer",
    "decode_scheduled_events",
    "decode_versions",
    "parse_instance",
    "parse_loadbalancer",
    "parse_scheduled_events",
]

_PATH_RE = re.compile(r" - at `(\$[^`]*)`$")


class DocumentError(ValueError):
    """An IMDS document that is not JSON, is truncated, or does not have the expected shape.

    ``document`` names the document ("instance", "scheduled events", ...), ``reason`` is the
    decoder's message and ``path`` the JSON path it points at (``"$"`` when the problem is
    the JSON text itself, e.g. truncation).
    """

    def __init__(self, document: str, reason: str) -> None:
        super().__init__(f"invalid {document} document: {reason}")
        self.document = document
        self.reason = reason
        match = _PATH_RE.search(reason)
        self.path = match.group(1) if match else "$"


class _Camel(msgspec.Struct, frozen=True, rename="camel"):
    """Base for the camelCase IMDS documents."""


class _Pascal(msgspec.Struct, frozen=True, rename="pascal"):
    """Base for the PascalCase Scheduled Events document."""


# ---------------------------------------------------------------------------- instance


class AdditionalCapabilities(_Camel, frozen=True):
    """``compute.additionalCapabilities``."""

    hibernation_enabled: str = ""


class ExtendedLocation(_Camel, frozen=True):
    """``compute.extendedLocation`` (e.g. an edge zone)."""

    type: str = ""
    name: str = ""


class Host(_Camel, frozen=True):
    """``compute.host``: the dedicated host, if any."""

    id: str = ""


class HostGroup(_Camel, frozen=True):
    """``compute.hostGroup``: the dedicated host group, if any."""

    id: str = ""


class OsProfile(_Camel, frozen=True):
    """``compute.osProfile``."""

    admin_username: str = ""
    computer_name: str = ""
    disable_password_authentication: str = ""


class Plan(_Camel, frozen=True):
    """Marketplace plan (``compute.plan`` and the attested payload's ``plan``)."""

    name: str = ""
    product: str = ""
    publisher: str = ""


class PublicKey(_Camel, frozen=True):
    """One entry of ``compute.publicKeys``."""

    key_data: str = ""
    path: str = ""


class SecurityProfile(_Camel, frozen=True):
    """``compute.securityProfile``."""

    secure_boot_enabled: str = ""
    virtual_tpm_enabled: str = ""
    encryption_at_host: str = ""
    security_type: str = ""


class ImageReference(_Camel, frozen=True):
    """``compute.storageProfile.imageReference``."""

    id: str = ""
    offer: str = ""
    publisher: str = ""
    sku: str = ""
    version: str = ""
    community_gallery_image_id: str = ""
    shared_gallery_image_id: str = ""
    exact_version: str = ""


class DiffDiskSettings(_Camel, frozen=True):
    """``osDisk.diffDiskSettings`` (ephemeral OS disk)."""

    option: str = ""


class DiskImage(_Camel, frozen=True):
    """Source user image of a disk (``image``)."""

    uri: str = ""


class VirtualHardDisk(_Camel, frozen=True):
    """Unmanaged disk VHD (``vhd``)."""

    uri: str = ""


class ManagedDisk(_Camel, frozen=True):
    """Managed disk parameters (``managedDisk``)."""

    id: str = ""
    storage_account_type: str = ""


class OsDisk(_Camel, frozen=True):
    """``compute.storageProfile.osDisk``. ``encryption_settings`` is kept free-form."""

    caching: str = ""
    create_option: str = ""
    diff_disk_settings: DiffDiskSettings = msgspec.field(default_factory=DiffDiskSettings)
    disk_size_gb: str = msgspec.field(default="", name="diskSizeGB")
    encryption_settings: dict[str, Any] = msgspec.field(default_factory=dict)
    image: DiskImage = msgspec.field(default_factory=DiskImage)
    managed_disk: ManagedDisk = msgspec.field(default_factory=ManagedDisk)
    name: str = ""
    os_type: str = ""
    vhd: VirtualHardDisk = msgspec.field(default_factory=VirtualHardDisk)
    write_accelerator_enabled: str = ""


class DataDisk(_Camel, frozen=True):
    """One entry of ``compute.storageProfile.dataDisks``, identified by ``lun``."""

    bytes_per_second_throttle: str = ""
    caching: str = ""
    create_option: str = ""
    disk_capacity_bytes: str = ""
    disk_size_gb: str = msgspec.field(default="", name="diskSizeGB")
    encryption_settings: dict[str, Any] = msgspec.field(default_factory=dict)
    image: DiskImage = msgspec.field(default_factory=DiskImage)
    is_shared_disk: str = ""
    is_ultra_disk: str = ""
    lun: str = ""
    managed_disk: ManagedDisk = msgspec.field(default_factory=ManagedDisk)
    name: str = ""
    ops_per_second_throttle: str = ""
    vhd: VirtualHardDisk = msgspec.field(default_factory=VirtualHardDisk)
    write_accelerator_enabled: str = ""


class ResourceDisk(_Camel, frozen=True):
    """``compute.storageProfile.resourceDisk``: temp disk size in KB, ``"0"`` when none."""

    size: str = ""


class StorageProfile(_Camel, frozen=True):
    """``compute.storageProfile``."""

    image_reference: ImageReference = msgspec.field(default_factory=ImageReference)
    os_disk: OsDisk = msgspec.field(default_factory=OsDisk)
    data_disks: list[DataDisk] = msgspec.field(default_factory=list)
    resource_disk: ResourceDisk = msgspec.field(default_factory=ResourceDisk)


class Tag(_Camel, frozen=True):
    """One entry of ``compute.tagsList``."""

    name: str = ""
    value: str = ""


class VirtualMachineScaleSet(_Camel, frozen=True):
    """``compute.virtualMachineScaleSet``."""

    id: str = ""


class Compute(_Camel, frozen=True):
    """``compute`` of the instance document."""

    az_environment: str = ""
    additional_capabilities: AdditionalCapabilities = msgspec.field(
        default_factory=AdditionalCapabilities
    )
    custom_data: str = ""
    user_data: str = ""
    eviction_policy: str = ""
    extended_location: ExtendedLocation = msgspec.field(default_factory=ExtendedLocation)
    host: Host = msgspec.field(default_factory=Host)
    host_group: HostGroup = msgspec.field(default_factory=HostGroup)
    is_host_compatibility_layer_vm: str = ""
    license_type: str = ""
    location: str = ""
    name: str = ""
    offer: str = ""
    os_profile: OsProfile = msgspec.field(default_factory=OsProfile)
    os_type: str = ""
    physical_zone: str = ""
    placement_group_id: str = ""
    plan: Plan = msgspec.field(default_factory=Plan)
    platform_update_domain: str = ""
    platform_fault_domain: str = ""
    platform_sub_fault_domain: str = ""
    priority: str = ""
    provider: str = ""
    public_keys: list[PublicKey] = msgspec.field(default_factory=list)
    publisher: str = ""
    resource_group_name: str = ""
    resource_id: str = ""
    sku: str = ""
    security_profile: SecurityProfile = msgspec.field(default_factory=SecurityProfile)
    storage_profile: StorageProfile = msgspec.field(default_factory=StorageProfile)
    subscription_id: str = ""
    tags: str = ""
    tags_list: list[Tag] = msgspec.field(default_factory=list)
    version: str = ""
    virtual_machine_scale_set: VirtualMachineScaleSet = msgspec.field(
        default_factory=VirtualMachineScaleSet
    )
    vm_id: str = ""
    vm_scale_set_name: str = ""
    vm_size: str = ""
    zone: str = ""


class IpAddress(_Camel, frozen=True):
    """One entry of ``ipv4.ipAddress`` or ``ipv6.ipAddress``."""

    private_ip_address: str = ""
    public_ip_address: str = ""


class Subnet(_Camel, frozen=True):
    """One entry of ``ipv4.subnet``."""

    address: str = ""
    prefix: str = ""


class Ipv4(_Camel, frozen=True):
    """``interface[].ipv4``."""

    ip_address: list[IpAddress] = msgspec.field(default_factory=list)
    subnet: list[Subnet] = msgspec.field(default_factory=list)


class Ipv6(_Camel, frozen=True):
    """``interface[].ipv6``."""

    ip_address: list[IpAddress] = msgspec.field(default_factory=list)


class Interface(_Camel, frozen=True):
    """One NIC. NICs come in no guaranteed order: identify them by ``mac_address``."""

    ipv4: Ipv4 = msgspec.field(default_factory=Ipv4)
    ipv6: Ipv6 = msgspec.field(default_factory=Ipv6)
    mac_address: str = ""


class Network(_Camel, frozen=True):
    """``network`` of the instance document."""

    interface: list[Interface] = msgspec.field(default_factory=list)


class Instance(_Camel, frozen=True):
    """``/metadata/instance``: compute and network (storage lives in compute).

    Both sections are optional, as every field is in the official API description (its own
    2021-11-15 example has no ``network``); an absent one decodes to its empty default here,
    while the raw document keeps it absent, which the diff reads as unknown, not empty.
    """

    compute: Compute = msgspec.field(default_factory=Compute)
    network: Network = msgspec.field(default_factory=Network)


# ---------------------------------------------------------------------------- scheduled events


class ScheduledEvent(_Pascal, frozen=True):
    """One maintenance event; ``not_before`` is an RFC 1123 date, ``""`` once started."""

    event_id: str = ""
    event_type: str = ""
    resource_type: str = ""
    resources: list[str] = msgspec.field(default_factory=list)
    event_status: str = ""
    not_before: str = ""
    description: str = ""
    event_source: str = ""
    duration_in_seconds: int = -1


class ScheduledEvents(_Pascal, frozen=True):
    """``/metadata/scheduledevents``; like every IMDS field, both are optional."""

    document_incarnation: int = 0
    events: list[ScheduledEvent] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------------------- load balancer


class PublicIpAddress(_Camel, frozen=True):
    """``loadbalancer.publicIpAddresses[]``: instance-level public IP and its private IP."""

    frontend_ip_address: str = ""
    private_ip_address: str = ""


class InboundRule(_Camel, frozen=True):
    """``loadbalancer.inboundRules[]``: a load-balancing or inbound NAT rule for this VM."""

    frontend_ip_address: str = ""
    protocol: str = ""
    frontend_port: int = 0
    backend_port: int = 0
    private_ip_address: str = ""


class OutboundRule(_Camel, frozen=True):
    """``loadbalancer.outboundRules[]``."""

    frontend_ip_address: str = ""
    private_ip_address: str = ""


class LoadBalancerInfo(_Camel, frozen=True):
    """The ``loadbalancer`` object of ``/metadata/loadbalancer``."""

    public_ip_addresses: list[PublicIpAddress] = msgspec.field(default_factory=list)
    inbound_rules: list[InboundRule] = msgspec.field(default_factory=list)
    outbound_rules: list[OutboundRule] = msgspec.field(default_factory=list)


class LoadBalancer(_Camel, frozen=True):
    """``/metadata/loadbalancer`` (Standard Load Balancer only; 404 otherwise).

    As in every IMDS document, the section and its lists are optional: absent is unknown.
    """

    loadbalancer: LoadBalancerInfo = msgspec.field(default_factory=LoadBalancerInfo)


# ---------------------------------------------------------------------------- misc documents


class Versions(_Camel, frozen=True):
    """``/metadata/versions``."""

    api_versions: list[str]


class AttestedDocument(_Camel, frozen=True):
    """``/metadata/attested/document``: a base64 pkcs7 ``signature`` over the payload."""

    encoding: str
    signature: str


class AttestedTimeStamp(_Camel, frozen=True):
    """``timeStamp`` of the attested payload (``"11/30/20 21:19:19 -0000"`` format)."""

    created_on: str = ""
    expires_on: str = ""


class AttestedPayload(_Camel, frozen=True):
    """The JSON signed inside the attested document (classic VMs only fill ``vm_id``)."""

    nonce: str = ""
    plan: Plan = msgspec.field(default_factory=Plan)
    sku: str = ""
    subscription_id: str = ""
    time_stamp: AttestedTimeStamp = msgspec.field(default_factory=AttestedTimeStamp)
    vm_id: str = ""
    license_type: str = ""


class ImdsError(_Camel, frozen=True):
    """IMDS error body, e.g. for a missing or unknown api-version."""

    error: str
    newest_versions: list[str] = msgspec.field(default_factory=list, name="newest-versions")


# ---------------------------------------------------------------------------- decoders

_T = TypeVar("_T")

_instance_decoder = msgspec.json.Decoder(Instance)
_scheduled_events_decoder = msgspec.json.Decoder(ScheduledEvents, strict=False)
_loadbalancer_decoder = msgspec.json.Decoder(LoadBalancer, strict=False)
_versions_decoder = msgspec.json.Decoder(Versions)
_attested_decoder = msgspec.json.Decoder(AttestedDocument)
_attested_payload_decoder = msgspec.json.Decoder(AttestedPayload)
_error_decoder = msgspec.json.Decoder(ImdsError)
_object_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()


def _invalid(document: str, exc: msgspec.ValidationError) -> DocumentError:
    reason = str(exc)
    if not _PATH_RE.search(reason):
        reason += " - at `$`"
    return DocumentError(document, reason)


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes, document: str) -> _T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(document, exc) from None
    except msgspec.DecodeError as exc:
        raise DocumentError(document, str(exc)) from None
    except RecursionError:
        raise DocumentError(document, _nested(MAX_DEPTH, "$")) from None


def _nested(limit: int, path: str) -> str:
    return f"nested deeper than {limit} levels, more than IMDS ever sends - at `{path}`"


def decode_instance(body: bytes) -> Instance:
    """Decode ``/metadata/instance``; raises ``DocumentError``."""
    return _decode(_instance_decoder, body, "instance")


def decode_scheduled_events(body: bytes) -> ScheduledEvents:
    """Decode ``/metadata/scheduledevents``; raises ``DocumentError``."""
    return _decode(_scheduled_events_decoder, body, "scheduled events")


def decode_loadbalancer(body: bytes) -> LoadBalancer:
    """Decode ``/metadata/loadbalancer``; raises ``DocumentError``."""
    return _decode(_loadbalancer_decoder, body, "loadbalancer")


def decode_versions(body: bytes) -> Versions:
    """Decode ``/metadata/versions``; raises ``DocumentError``."""
    return _decode(_versions_decoder, body, "versions")


def decode_attested(body: bytes) -> AttestedDocument:
    """Decode ``/metadata/attested/document``; raises ``DocumentError``."""
    return _decode(_attested_decoder, body, "attested")


def decode_attested_payload(body: bytes) -> AttestedPayload:
    """Decode the JSON content signed inside an attested document; raises ``DocumentError``."""
    return _decode(_attested_payload_decoder, body, "attested payload")


def decode_error(body: bytes) -> ImdsError:
    """Decode an IMDS error body (``{"error", "newest-versions"}``); raises ``DocumentError``."""
    return _decode(_error_decoder, body, "error")


def _convert(raw: Any, type_: type[_T], document: str, *, strict: bool = True) -> _T:
    try:
        return msgspec.convert(raw, type_, strict=strict)
    except msgspec.ValidationError as exc:
        raise _invalid(document, exc) from None


def convert_instance(raw: Any) -> Instance:
    """Validate an already-parsed instance document into ``Instance``."""
    return _convert(raw, Instance, "instance")


def convert_scheduled_events(raw: Any) -> ScheduledEvents:
    """Validate an already-parsed scheduled events document into ``ScheduledEvents``."""
    return _convert(raw, ScheduledEvents, "scheduled events", strict=False)


def convert_loadbalancer(raw: Any) -> LoadBalancer:
    """Validate an already-parsed load balancer document into ``LoadBalancer``."""
    return _convert(raw, LoadBalancer, "loadbalancer", strict=False)


def _parse_object(body: bytes, document: str) -> dict[str, Any]:
    raw = _decode(_object_decoder, body, document)
    path = too_deep(raw)
    if path is not None:
        raise DocumentError(document, _nested(MAX_DEPTH, path))
    return raw


def parse_instance(body: bytes) -> tuple[Instance, dict[str, Any]]:
    """Decode ``/metadata/instance`` once into the typed model and the raw JSON object."""
    raw = _parse_object(body, "instance")
    return convert_instance(raw), raw


def parse_scheduled_events(body: bytes) -> tuple[ScheduledEvents, dict[str, Any]]:
    """Decode ``/metadata/scheduledevents`` once into the typed model and the raw object."""
    raw = _parse_object(body, "scheduled events")
    return convert_scheduled_events(raw), raw


def parse_loadbalancer(body: bytes) -> tuple[LoadBalancer, dict[str, Any]]:
    """Decode ``/metadata/loadbalancer`` once into the typed model and the raw object."""
    raw = _parse_object(body, "loadbalancer")
    return convert_loadbalancer(raw), raw


def _as_body(doc: bytes | Mapping[str, Any], document: str) -> bytes:
    if isinstance(doc, bytes):
        return doc
    try:
        return _encoder.encode(doc)
    except (TypeError, msgspec.EncodeError) as exc:
        raise DocumentError(document, f"not JSON-encodable: {exc}") from None


# ---------------------------------------------------------------------------- snapshot


class Snapshot(msgspec.Struct, frozen=True):
    """What imdsd knows at one moment, per endpoint, in typed and raw form.

    ``*_raw`` is the document exactly as IMDS sent it, so reads can serve fields the model
    does not know. ``None`` means not fetched yet (or the endpoint is disabled).
    ``loadbalancer_absent`` means IMDS answered 404 (no Standard Load Balancer); the diff
    treats it as an empty load balancer. ``*_known`` is the memory ``changes.carry`` keeps:
    the raw document with every section it lacks filled in from the last document that had
    it (None: nothing is missing, the raw document is all that is known). Persist with
    ``msgspec.json.encode`` and restore with ``msgspec.json.decode(data, type=Snapshot)``.
    """

    instance: Instance | None = None
    instance_raw: dict[str, Any] | None = None
    scheduled_events: ScheduledEvents | None = None
    scheduled_events_raw: dict[str, Any] | None = None
    loadbalancer: LoadBalancer | None = None
    loadbalancer_raw: dict[str, Any] | None = None
    loadbalancer_absent: bool = False
    instance_known: dict[str, Any] | None = None
    scheduled_events_known: dict[str, Any] | None = None
    loadbalancer_known: dict[str, Any] | None = None

    def with_instance(self, doc: bytes | Mapping[str, Any]) -> Snapshot:
        """Return a copy holding this instance document (JSON bytes or a parsed mapping).

        Raises ``DocumentError`` when it does not validate; ``self`` is left unchanged.
        """
        typed, raw = parse_instance(_as_body(doc, "instance"))
        return msgspec.structs.replace(self, instance=typed, instance_raw=raw, instance_known=None)

    def with_scheduled_events(self, doc: bytes | Mapping[str, Any]) -> Snapshot:
        """Return a copy holding this scheduled events document; raises ``DocumentError``."""
        typed, raw = parse_scheduled_events(_as_body(doc, "scheduled events"))
        return msgspec.structs.replace(
            self, scheduled_events=typed, scheduled_events_raw=raw, scheduled_events_known=None
        )

    def with_loadbalancer(self, doc: bytes | Mapping[str, Any]) -> Snapshot:
        """Return a copy holding this load balancer document; raises ``DocumentError``."""
        typed, raw = parse_loadbalancer(_as_body(doc, "loadbalancer"))
        return msgspec.structs.replace(
            self,
            loadbalancer=typed,
            loadbalancer_raw=raw,
            loadbalancer_absent=False,
            loadbalancer_known=None,
        )

    def with_loadbalancer_absent(self) -> Snapshot:
        """Return a copy recording that IMDS said 404: the VM has no Standard Load Balancer."""
        return msgspec.structs.replace(
            self,
            loadbalancer=None,
            loadbalancer_raw=None,
            loadbalancer_absent=True,
            loadbalancer_known=None,
        )
