"""The emulated VM (sans-IO): its instance and load balancer documents, and what it holds.

:class:`VMState` edits the instance document (tags, data disks, NICs, merge patches) and
holds the VM's scheduled events (:mod:`imdsd.emulator.events`), faults, stats and managed
identities. Every operation validates its input and raises :class:`StateError` (with an HTTP
``status``: 400 bad input, 404 unknown thing, 409 conflict) naming what is wrong.

Invariants kept by the operations (not by :meth:`VMState.replace_instance`, which stores any
JSON object as given so tests can serve invalid documents):

- ``compute.tags`` (``"k1:v1;k2:v2"``) and ``compute.tagsList`` always list the same tags in
  the same order; ``tagsList`` is added when a tag operation finds only ``tags``; a merge patch
  that sets or removes only one of them has the other follow (a patch giving both is kept).
- data disks are unique by ``lun``; NICs are unique by ``macAddress`` (upper-case hex, no
  separators, as IMDS writes it); every primitive written is a string, as in IMDS.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from typing import Any

from imdsd.emulator.checks import StateError, json_kind, text
from imdsd.emulator.events import ScheduledEvents
from imdsd.emulator.faults import FaultQueue
from imdsd.emulator.identity import Identities
from imdsd.emulator.stats import Stats

__all__ = ["MAX_LUN", "StateError", "VMState", "merge_patch", "normalize_mac"]

MAX_LUN = 63
_MAC = re.compile(r"^[0-9A-F]{12}$")


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7396 JSON merge patch; returns a new value, inputs are not modified."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def normalize_mac(mac: Any) -> str:
    """``"00-0d-3a:11.22 33"`` -> ``"000D3A112233"``; StateError unless 12 hex digits."""
    if not isinstance(mac, str):
        raise StateError(f"mac must be a string, got {mac!r}")
    cleaned = re.sub(r"[-:. ]", "", mac).upper()
    if not _MAC.match(cleaned):
        raise StateError(f"mac {mac!r} is not 12 hex digits (separators - : . allowed)")
    return cleaned


def _lun(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LUN:
        raise StateError(f"lun must be an integer from 0 to {MAX_LUN}, got {value!r}")
    return value


def _size_gb(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
        raise StateError(f"size_gb must be an integer from 1 to 65536, got {value!r}")
    return value


class VMState:
    """The whole state of the emulated VM; mutated only through its methods."""

    def __init__(
        self,
        instance: dict[str, Any],
        loadbalancer: dict[str, Any] | None = None,
        *,
        incarnation: int = 1,
    ) -> None:
        self.instance: dict[str, Any] = copy.deepcopy(instance)
        self.loadbalancer: dict[str, Any] | None = copy.deepcopy(loadbalancer)
        self.scheduled = ScheduledEvents(incarnation)
        self.faults = FaultQueue()
        self.stats = Stats()
        compute = self.instance.get("compute")
        self.identities = Identities.default(
            str(compute.get("vmId", "")) if isinstance(compute, dict) else ""
        )

    # ------------------------------------------------------------------ documents

    def replace_instance(self, document: Any) -> None:
        """Replace the instance document with any JSON object (PUT /_emulator/instance)."""
        if not isinstance(document, dict):
            raise StateError(f"the instance document must be an object, got {json_kind(document)}")
        self.instance = copy.deepcopy(document)

    def patch_instance(self, patch: Any) -> None:
        """Apply an RFC 7396 merge patch to the instance (PATCH /_emulator/instance)."""
        if not isinstance(patch, dict):
            raise StateError(
                f"a merge patch of the instance must be an object, got {json_kind(patch)}"
            )
        self.instance = merge_patch(self.instance, patch)
        self._sync_tags(patch.get("compute"))

    def _sync_tags(self, compute_patch: Any) -> None:
        """After a patch set or removed only one of ``tags`` and ``tagsList``, do the same to the
        other."""
        if not isinstance(compute_patch, dict):
            return
        compute = self.instance.get("compute")
        if not isinstance(compute, dict):
            return
        if "tags" in compute_patch and "tagsList" not in compute_patch and "tagsList" in compute:
            compute.pop("tagsList")
            if isinstance(compute.get("tags"), str):
                self._write_tags(self.tags())
        elif "tagsList" in compute_patch and "tags" not in compute_patch:
            if isinstance(compute.get("tagsList"), list):
                self._write_tags(self.tags())
            else:
                compute.pop("tags", None)

    def set_loadbalancer(self, document: Any) -> None:
        """Replace the load balancer document; None means no Standard LB (404)."""
        if document is not None and not isinstance(document, dict):
            kind = json_kind(document)
            raise StateError(f"the loadbalancer document must be an object or null, got {kind}")
        self.loadbalancer = copy.deepcopy(document)

    def _compute(self) -> dict[str, Any]:
        compute = self.instance.get("compute")
        if not isinstance(compute, dict):
            raise StateError("the instance document has no compute object", 409)
        return compute

    def _list_at(self, parent: dict[str, Any], key: str, where: str) -> list[Any]:
        value = parent.get(key)
        if not isinstance(value, list):
            raise StateError(f"the instance document has no {where} array", 409)
        return value

    # ------------------------------------------------------------------ tags

    def tags(self) -> list[tuple[str, str]]:
        """The current tags in order, from ``tagsList`` when present, else parsed ``tags``."""
        compute = self._compute()
        tags_list = compute.get("tagsList")
        if isinstance(tags_list, list):
            return [
                (str(t.get("name", "")), str(t.get("value", "")))
                for t in tags_list
                if isinstance(t, dict)
            ]
        raw = compute.get("tags", "")
        pairs = []
        for item in str(raw).split(";") if raw else []:
            name, _, value = item.partition(":")
            pairs.append((name, value))
        return pairs

    def _write_tags(self, pairs: list[tuple[str, str]]) -> None:
        compute = self._compute()
        compute["tags"] = ";".join(f"{name}:{value}" for name, value in pairs)
        compute["tagsList"] = [{"name": name, "value": value} for name, value in pairs]

    def set_tag(self, name: Any, value: Any) -> None:
        """Add tag ``name`` or change its value (kept in place)."""
        name = text(name, "tag name")
        value = text(value, "tag value", empty=True)
        pairs = self.tags()
        for index, (existing, _) in enumerate(pairs):
            if existing == name:
                pairs[index] = (name, value)
                break
        else:
            pairs.append((name, value))
        self._write_tags(pairs)

    def remove_tag(self, name: Any) -> None:
        """Remove tag ``name``; 404 when there is no such tag."""
        name = text(name, "tag name")
        pairs = self.tags()
        kept = [pair for pair in pairs if pair[0] != name]
        if len(kept) == len(pairs):
            raise StateError(f"no tag {name!r}", 404)
        self._write_tags(kept)

    # ------------------------------------------------------------------ data disks

    def _data_disks(self) -> list[Any]:
        storage = self._compute().get("storageProfile")
        if not isinstance(storage, dict):
            raise StateError("the instance document has no compute.storageProfile object", 409)
        return self._list_at(storage, "dataDisks", "compute.storageProfile.dataDisks")

    def _find_disk(self, lun: int) -> dict[str, Any]:
        for disk in self._data_disks():
            if isinstance(disk, dict) and disk.get("lun") == str(lun):
                return disk
        raise StateError(f"no data disk at lun {lun}", 404)

    def attach_disk(self, lun: Any, size_gb: Any, name: Any = None) -> None:
        """Attach a managed, non-ultra data disk at ``lun`` (409 if the lun is taken)."""
        lun = _lun(lun)
        size_gb = _size_gb(size_gb)
        disks = self._data_disks()
        if any(isinstance(d, dict) and d.get("lun") == str(lun) for d in disks):
            raise StateError(f"lun {lun} already has a data disk", 409)
        compute = self._compute()
        if name is None:
            name = f"{compute.get('name', 'vm')}_datadisk_{lun}"
        name = text(name, "disk name")
        disk_id = (
            f"/subscriptions/{compute.get('subscriptionId', '')}/resourceGroups/"
            f"{compute.get('resourceGroupName', '')}/providers/Microsoft.Compute/disks/{name}"
        )
        disks.append(
            {
                "bytesPerSecondThrottle": "",
                "caching": "None",
                "createOption": "Empty",
                "diskCapacityBytes": "",
                "diskSizeGB": str(size_gb),
                "image": {"uri": ""},
                "isSharedDisk": "false",
                "isUltraDisk": "false",
                "lun": str(lun),
                "managedDisk": {"id": disk_id, "storageAccountType": "Premium_LRS"},
                "name": name,
                "opsPerSecondThrottle": "",
                "vhd": {"uri": ""},
                "writeAcceleratorEnabled": "false",
            }
        )

    def detach_disk(self, lun: Any) -> None:
        """Detach the data disk at ``lun`` (404 if there is none)."""
        disk = self._find_disk(_lun(lun))
        self._data_disks().remove(disk)

    def resize_disk(self, lun: Any, size_gb: Any) -> None:
        """Set the size of the data disk at ``lun`` (``diskCapacityBytes`` too when filled)."""
        disk = self._find_disk(_lun(lun))
        size_gb = _size_gb(size_gb)
        disk["diskSizeGB"] = str(size_gb)
        if disk.get("diskCapacityBytes"):
            disk["diskCapacityBytes"] = str(size_gb * 1024**3)

    # ------------------------------------------------------------------ NICs

    def _nics(self) -> list[Any]:
        network = self.instance.get("network")
        if not isinstance(network, dict):
            raise StateError("the instance document has no network object", 409)
        return self._list_at(network, "interface", "network.interface")

    def _nic_index(self, mac: str) -> int:
        for index, nic in enumerate(self._nics()):
            if isinstance(nic, dict) and str(nic.get("macAddress", "")).upper() == mac:
                return index
        raise StateError(f"no NIC with mac {mac}", 404)

    def add_nic(self, mac: Any, private_ip: Any, prefix: Any = 24, public_ip: Any = "") -> None:
        """Add a NIC with one IPv4 address in a ``/prefix`` subnet (409 if the MAC exists)."""
        mac = normalize_mac(mac)
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix <= 32:
            raise StateError(f"prefix must be an integer from 0 to 32, got {prefix!r}")
        try:
            address = ipaddress.IPv4Address(text(private_ip, "private_ip"))
        except ipaddress.AddressValueError:
            raise StateError(f"private_ip {private_ip!r} is not an IPv4 address") from None
        public_ip = text(public_ip, "public_ip", empty=True)
        nics = self._nics()
        if any(isinstance(n, dict) and str(n.get("macAddress", "")).upper() == mac for n in nics):
            raise StateError(f"a NIC with mac {mac} already exists", 409)
        subnet = ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)
        nics.append(
            {
                "ipv4": {
                    "ipAddress": [{"privateIpAddress": str(address), "publicIpAddress": public_ip}],
                    "subnet": [{"address": str(subnet.network_address), "prefix": str(prefix)}],
                },
                "ipv6": {"ipAddress": []},
                "macAddress": mac,
            }
        )

    def remove_nic(self, mac: Any) -> None:
        """Remove the NIC with ``mac`` (404 if there is none)."""
        index = self._nic_index(normalize_mac(mac))
        del self._nics()[index]

    def reorder_nics(self, order: Any = None) -> None:
        """Reorder the NICs: reversed, or in the order of the MACs listed in ``order``."""
        nics = self._nics()
        if order is None:
            nics.reverse()
            return
        if not isinstance(order, list):
            raise StateError(f"order must be a list of MACs, got {order!r}")
        macs = [normalize_mac(m) for m in order]
        current = sorted(str(n.get("macAddress", "")).upper() for n in nics if isinstance(n, dict))
        if sorted(macs) != current or len(current) != len(nics):
            raise StateError(f"order must list each NIC's MAC once: {', '.join(current)}")
        nics.sort(key=lambda n: macs.index(str(n["macAddress"]).upper()))

    # ------------------------------------------------------------------ scheduled events

    @property
    def events(self) -> list[dict[str, Any]]:
        """The scheduled events, in order (see :class:`ScheduledEvents`)."""
        return self.scheduled.events

    @property
    def incarnation(self) -> int:
        """The scheduled events document's ``DocumentIncarnation``."""
        return self.scheduled.incarnation

    def scheduled_events(self) -> dict[str, Any]:
        """The ``/metadata/scheduledevents`` document (a copy)."""
        return self.scheduled.document()

    def add_event(
        self, event_id: Any, event_type: Any, *, now_wall: float, **details: Any
    ) -> dict[str, Any]:
        """Announce an event (see :meth:`ScheduledEvents.add`); Resources defaults to the VM."""
        return self.scheduled.add(
            event_id, event_type, now_wall=now_wall, vm_name=self._vm_name, **details
        )

    def _vm_name(self) -> str:
        return str(self._compute().get("name", ""))

    def start_event(self, event_id: Any) -> bool:
        """Start an event (Started, NotBefore ""); False if it had already started."""
        return self.scheduled.start(event_id)

    def remove_event(self, event_id: Any) -> None:
        """Remove an event: it finished or was cancelled (404 if unknown)."""
        self.scheduled.remove(event_id)

    def approve(self, body: Any) -> list[str]:
        """Apply a ``StartRequests`` body (see :meth:`ScheduledEvents.approve`)."""
        return self.scheduled.approve(body)

    def start_due_events(self, now_wall: float) -> list[str]:
        """Start the Scheduled events whose NotBefore has passed; returns their ids."""
        return self.scheduled.start_due(now_wall)

    # ------------------------------------------------------------------ views

    def snapshot(self) -> dict[str, Any]:
        """Everything, JSON-ready (GET /_emulator/state)."""
        return {
            "instance": copy.deepcopy(self.instance),
            "scheduled_events": self.scheduled_events(),
            "loadbalancer": copy.deepcopy(self.loadbalancer),
            "faults": self.faults.pending(),
            "identities": self.identities.as_dict(),
        }
