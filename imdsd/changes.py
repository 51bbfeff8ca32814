"""Pure diff of two snapshots into the changes of CONTRACT section 4 (no I/O, no clock).

Kinds, keys and ops:

- ``tags``: key = tag name; ``added`` / ``removed`` / ``modified`` (``fields == ["value"]``);
  old/new are the values. Read from ``tagsList`` when both sides have it, otherwise from
  ``tags`` (``"k1:v1;k2:v2"``, each pair split at its first ``:``, empty pairs ignored), and
  when the sides share neither, each from the one it has. A repeated name's values compare
  as a multiset (see ``_name_changes``).
- ``disks``: ``lun:<n>`` (data disks), ``os`` (OS disk), ``resource`` (temp disk, none when
  its size is ``""`` or ``"0"``, unknown when it has no size); ``attached`` / ``detached`` /
  ``modified``; old/new are the disk objects as IMDS sent them.
- ``network``: ``mac:<MAC upper-case, no separators>``; ``added`` / ``removed`` /
  ``modified``; old/new are the NIC objects as IMDS sent them.
- ``scheduled_events``: key = EventId; ``added`` / ``modified`` / ``removed``; only events
  whose ``Resources`` name this VM (``compute.name`` of the new snapshot, else the old one,
  compared case-insensitively; every event when no name is known).
- ``compute``: key = dotted field path as IMDS names it (``vmSize``, ``plan.name``); op
  ``modified``, ``fields == [key]``; every compute leaf except ``tags``, ``tagsList`` and
  ``storageProfile`` (``userData`` and ``customData`` included).
- ``loadbalancer``: ``frontend:<frontendIpAddress>`` for ``publicIpAddresses``;
  ``rule:inbound:<protocol>:<frontendIp>:<frontendPort>`` and
  ``rule:outbound:<frontendIp>:<privateIp>`` for rules, IPv6 addresses in brackets
  (``rule:inbound:tcp:[2603:10e1::1]:80``); ``added`` / ``removed`` / ``modified``. A 404
  (``loadbalancer_absent``) counts as an empty load balancer.

``fields`` (on ``modified`` only) lists changed sub-field paths, sorted. Lists compare as
multisets, so reordering NICs, disks, tags, IPs, subnets, keys or resources is no change. A
field present on one side only is an api-version difference and no change, except inside the
free-form ``encryptionSettings`` blob. When two items share a key, the second and later (in a
canonical order) get ``#2``, ``#3``... appended. An endpoint unknown on either side (not
fetched yet) yields no changes.

Every field and section is optional (CONTRACT 4): an absent one is unknown, never empty, so
it yields no ``removed`` / ``detached``; an empty list is empty. ``carry`` gives each new
snapshot a memory of what its documents lack (the last value known), and ``diff`` compares
the old snapshot's memory with the new raw documents, so a section that comes back is
compared with the last document that had it and a change made meanwhile is reported once.
Walks stop at ``depth.MAX_DEPTH`` levels (deeper documents never get past the decoder). The
result is ordered by kind (``frames.KINDS``) then key
(numbers in keys compare numerically).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from imdsd.depth import MAX_DEPTH
from imdsd.frames import KINDS, Change, Kind
from imdsd.memory import FREE_FORM, TAGS, carry, known_document, raw_document
from imdsd.model import Snapshot

__all__ = ["carry", "diff", "mac_key", "parse_tags"]

_NOT_COMPUTE = frozenset({"tags", "tagsList", "storageProfile"})
_KIND_ORDER = {kind: i for i, kind in enumerate(KINDS)}
_NON_HEX = re.compile(r"[^0-9A-Fa-f]")
_DIGITS = re.compile(r"(\d+)")
_encoder = msgspec.json.Encoder(order="sorted")

Raw = dict[str, Any]


def diff(old: Snapshot, new: Snapshot) -> list[Change]:
    """Every change from ``old`` to ``new``, in a deterministic order (see module doc)."""
    changes: list[Change] = []
    old_instance, new_instance = known_document(old, "instance"), raw_document(new, "instance")
    if old_instance is not None and new_instance is not None:
        old_compute = _obj(old_instance.get("compute"))
        new_compute = _obj(new_instance.get("compute"))
        changes += _tag_changes(old_compute, new_compute)
        changes += _disk_changes(old_compute, new_compute)
        changes += _network_changes(
            _obj(old_instance.get("network")), _obj(new_instance.get("network"))
        )
        changes += _compute_changes(old_compute, new_compute)
    changes += _scheduled_event_changes(old, new)
    changes += _loadbalancer_changes(old, new)
    changes.sort(key=_order)
    return changes


def parse_tags(tags: str) -> dict[str, str]:
    """Parse the legacy ``tags`` string ``"k1:v1;k2:v2"`` (split at the first ``:``)."""
    return dict(_tag_pairs(tags))


def _tag_pairs(tags: str) -> list[tuple[str, str]]:
    return [
        (name, value) for name, _, value in (p.partition(":") for p in tags.split(";") if p.strip())
    ]


def mac_key(mac: str) -> str:
    """The network change key of a MAC in any notation: ``mac:0011AAFFBB22``."""
    return "mac:" + _NON_HEX.sub("", mac).upper()


# ---------------------------------------------------------------------------- helpers


def _order(change: Change) -> tuple[int, tuple[Any, ...], str]:
    parts = _DIGITS.split(change.key)
    natural = tuple(int(p) if i % 2 else p for i, p in enumerate(parts))
    return _KIND_ORDER[change.kind], natural, change.key


def _obj(value: Any) -> Raw:
    return value if isinstance(value, dict) else {}


def _items(container: Mapping[str, Any], key: str) -> list[Raw] | None:
    """The objects of list ``key``, or None when the field is absent (api-version)."""
    if key not in container:
        return None
    value = container[key]
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _canonical(value: Any, depth: int = 0) -> Any:
    if depth >= MAX_DEPTH:  # deeper than any document the decoder lets through: as is
        return value
    if isinstance(value, dict):
        return {k: _canonical(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((_canonical(v, depth + 1) for v in value), key=_encoder.encode)
    return value


def _fingerprint(value: Any) -> bytes:
    return _encoder.encode(_canonical(value))


def _same(a: Any, b: Any) -> bool:
    if type(a) is type(b) and not isinstance(a, dict | list):
        return bool(a == b)
    return _fingerprint(a) == _fingerprint(b)


def _leaf_paths(value: Any, path: str, depth: int = 0) -> list[str]:
    if isinstance(value, dict) and value and depth < MAX_DEPTH:
        out: list[str] = []
        for k, v in value.items():
            out += _leaf_paths(v, f"{path}.{k}", depth + 1)
        return out
    return [path]


def _changed(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Changed leaf paths; a key on one side only counts only inside free-form blobs."""
    return sorted(path for path, _, _ in _changed_leaves(old, new, prefix, free_form=False))


def _changed_leaves(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    prefix: str,
    *,
    free_form: bool,
    depth: int = 0,
) -> list[tuple[str, Any, Any]]:
    """Changed leaves; below ``MAX_DEPTH`` levels a subtree counts as one leaf."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(old.keys() | new.keys()):
        path = prefix + key
        if key not in old or key not in new:
            if free_form:
                present = old[key] if key in old else new[key]
                out += [(leaf, None, None) for leaf in _leaf_paths(present, path, depth)]
            continue
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict) and depth < MAX_DEPTH:
            out += _changed_leaves(
                a, b, path + ".", free_form=free_form or key in FREE_FORM, depth=depth + 1
            )
        elif not _same(a, b):
            out.append((path, a, b))
    return out


def _keyed(items: list[Raw], key_of: Callable[[Raw], str]) -> dict[str, Raw]:
    groups: dict[str, list[Raw]] = {}
    for item in items:
        groups.setdefault(key_of(item), []).append(item)
    out: dict[str, Raw] = {}
    for key, group in groups.items():
        if len(group) > 1:
            group.sort(key=_fingerprint)
        for i, item in enumerate(group, 1):
            out[key if i == 1 else f"{key}#{i}"] = item
    return out


def _keyed_changes(
    kind: Kind,
    old: dict[str, Raw],
    new: dict[str, Raw],
    ops: tuple[str, str],
    fields_of: Callable[[Raw, Raw], list[str]] = _changed,
) -> list[Change]:
    added, removed = ops
    out = [Change(kind, removed, k, old[k], None) for k in old.keys() - new.keys()]
    out += [Change(kind, added, k, None, new[k]) for k in new.keys() - old.keys()]
    for k in old.keys() & new.keys():
        fields = fields_of(old[k], new[k])
        if fields:
            out.append(Change(kind, "modified", k, old[k], new[k], sorted(fields)))
    return out


def _str(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key, "")
    return value if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------- instance kinds


def _tags_of(compute: Raw, use_list: bool) -> dict[str, list[str]]:
    """Each tag name's values (several when the name repeats), sorted."""
    if use_list:
        pairs = [(_str(t, "name"), _str(t, "value")) for t in _items(compute, "tagsList") or []]
    else:
        pairs = _tag_pairs(_str(compute, "tags"))
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    for values in out.values():
        values.sort()
    return out


def _tag_views(old: Raw, new: Raw) -> tuple[bool, bool] | None:
    """Read each side from ``tagsList`` (True) or ``tags`` (False); None: a side has neither.

    The same view on both sides when they share one (``tagsList`` first), else each its own.
    """
    for field in ("tagsList", "tags"):
        if field in old and field in new:
            return field == "tagsList", field == "tagsList"
    if not (TAGS & old.keys() and TAGS & new.keys()):
        return None
    return "tagsList" in old, "tagsList" in new


def _tag_changes(old: Raw, new: Raw) -> list[Change]:
    views = _tag_views(old, new)
    if views is None:
        return []
    a, b = _tags_of(old, views[0]), _tags_of(new, views[1])
    out: list[Change] = []
    for name in a.keys() | b.keys():
        out += _name_changes(name, a.get(name, []), b.get(name, []))
    return out


def _name_changes(name: str, old: list[str], new: list[str]) -> list[Change]:
    """The changes of one tag name's values, compared as multisets (sorted lists).

    Values on both sides cancel; what is left is paired in order (``modified``), the rest is
    ``removed`` / ``added``. A name that repeats keys its leftovers ``name#<n>``, numbered
    after the values that stayed, so a reorder is no change and one changed value is one change.
    """
    if old == new:
        return []
    kept = collections.Counter(old) & collections.Counter(new)
    gone = sorted((collections.Counter(old) - kept).elements())
    came = sorted((collections.Counter(new) - kept).elements())
    same = kept.total()
    out = []
    for i in range(max(len(gone), len(came))):
        slot = same + i + 1
        key = name if slot == 1 else f"{name}#{slot}"
        if i >= len(came):
            out.append(Change("tags", "removed", key, gone[i], None))
        elif i >= len(gone):
            out.append(Change("tags", "added", key, None, came[i]))
        else:
            out.append(Change("tags", "modified", key, gone[i], came[i], ["value"]))
    return out


def _lun_key(disk: Raw) -> str:
    lun = _str(disk, "lun").strip()
    return f"lun:{int(lun)}" if lun.isdigit() else f"lun:{lun}"


def _has_resource_disk(disk: Raw) -> bool:
    return _str(disk, "size").strip() not in ("", "0")


def _disk_changes(old_compute: Raw, new_compute: Raw) -> list[Change]:
    if "storageProfile" not in old_compute or "storageProfile" not in new_compute:
        return []
    old, new = _obj(old_compute["storageProfile"]), _obj(new_compute["storageProfile"])
    out: list[Change] = []
    old_data, new_data = _items(old, "dataDisks"), _items(new, "dataDisks")
    if old_data is not None and new_data is not None:
        out += _keyed_changes(
            "disks",
            _keyed(old_data, _lun_key),
            _keyed(new_data, _lun_key),
            ("attached", "detached"),
        )
    if "osDisk" in old and "osDisk" in new:
        a, b = _obj(old["osDisk"]), _obj(new["osDisk"])
        fields = _changed(a, b)
        if fields:
            out.append(Change("disks", "modified", "os", a, b, fields))
    a, b = _obj(old.get("resourceDisk")), _obj(new.get("resourceDisk"))
    if "size" in a and "size" in b:  # an absent size is unknown, not "no disk"
        had, has = _has_resource_disk(a), _has_resource_disk(b)
        if had and not has:
            out.append(Change("disks", "detached", "resource", a, None))
        elif has and not had:
            out.append(Change("disks", "attached", "resource", None, b))
        elif has and had:
            fields = _changed(a, b)
            if fields:
                out.append(Change("disks", "modified", "resource", a, b, fields))
    return out


def _nic_key(nic: Raw) -> str:
    return mac_key(_str(nic, "macAddress"))


def _nic_fields(old: Raw, new: Raw) -> list[str]:
    # Both sides share the normalised MAC (it is the key): a notation change is no change.
    return [f for f in _changed(old, new) if f != "macAddress"]


def _network_changes(old: Raw, new: Raw) -> list[Change]:
    old_nics, new_nics = _items(old, "interface"), _items(new, "interface")
    if old_nics is None or new_nics is None:
        return []
    return _keyed_changes(
        "network",
        _keyed(old_nics, _nic_key),
        _keyed(new_nics, _nic_key),
        ("added", "removed"),
        _nic_fields,
    )


def _compute_changes(old: Raw, new: Raw) -> list[Change]:
    a = {k: v for k, v in old.items() if k not in _NOT_COMPUTE}
    b = {k: v for k, v in new.items() if k not in _NOT_COMPUTE}
    return [
        Change("compute", "modified", path, va, vb, [path])
        for path, va, vb in _changed_leaves(a, b, "", free_form=False)
    ]


# ---------------------------------------------------------------------------- other endpoints


def _vm_name(old: Snapshot, new: Snapshot) -> str:
    for snapshot in (new, old):
        name = _obj(_obj(known_document(snapshot, "instance")).get("compute")).get("name")
        if isinstance(name, str) and name:
            return name
    return ""


def _events(raw: Raw | None, vm_name: str) -> dict[str, Raw] | None:
    """The events naming this VM by EventId; None when unknown (not fetched, or absent)."""
    events = None if raw is None else _items(raw, "Events")
    if events is None:
        return None
    if vm_name:
        wanted = vm_name.casefold()
        events = [
            e
            for e in events
            if any(isinstance(r, str) and r.casefold() == wanted for r in e.get("Resources", []))
        ]
    return _keyed(events, lambda e: _str(e, "EventId"))


def _scheduled_event_changes(old: Snapshot, new: Snapshot) -> list[Change]:
    vm_name = _vm_name(old, new)
    a = _events(known_document(old, "scheduled_events"), vm_name)
    b = _events(raw_document(new, "scheduled_events"), vm_name)
    if a is None or b is None:
        return []
    return _keyed_changes("scheduled_events", a, b, ("added", "removed"))


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _inbound_key(rule: Raw) -> str:
    return (
        f"rule:inbound:{_str(rule, 'protocol')}:{_host(_str(rule, 'frontendIpAddress'))}"
        f":{_str(rule, 'frontendPort')}"
    )


def _outbound_key(rule: Raw) -> str:
    return (
        f"rule:outbound:{_host(_str(rule, 'frontendIpAddress'))}"
        f":{_host(_str(rule, 'privateIpAddress'))}"
    )


def _frontend_key(entry: Raw) -> str:
    return f"frontend:{_str(entry, 'frontendIpAddress')}"


_LB_LISTS: tuple[tuple[str, Callable[[Raw], str]], ...] = (
    ("publicIpAddresses", _frontend_key),
    ("inboundRules", _inbound_key),
    ("outboundRules", _outbound_key),
)


def _lb_lists(snapshot: Snapshot, raw: Raw | None) -> Raw | None:
    """The ``loadbalancer`` object; ``{}`` lists for a 404, None when unknown."""
    if snapshot.loadbalancer_absent:
        return {field: [] for field, _ in _LB_LISTS}
    return None if raw is None else _obj(raw.get("loadbalancer"))


def _loadbalancer_changes(old: Snapshot, new: Snapshot) -> list[Change]:
    a = _lb_lists(old, known_document(old, "loadbalancer"))
    b = _lb_lists(new, raw_document(new, "loadbalancer"))
    if a is None or b is None:
        return []
    out: list[Change] = []
    for field, key_of in _LB_LISTS:
        old_items, new_items = _items(a, field), _items(b, field)
        if old_items is not None and new_items is not None:
            out += _keyed_changes(
                "loadbalancer",
                _keyed(old_items, key_of),
                _keyed(new_items, key_of),
                ("added", "removed"),
            )
    return out
