"""Who may read what (sans-IO): restricted instance paths and peer credentials.

Policy (documented in the README):

- A peer is *privileged* when its uid is in ``restricted_allow_uids`` or its primary gid is
  in ``restricted_allow_gids`` (as SO_PEERCRED reports them; supplementary groups do not
  count). A peer whose credentials are unknown is not privileged.
- For unprivileged peers, a read of a restricted path (``compute/userData``) or of anything
  below it answers 403.
- A read of a path *above* a restricted path (``/metadata/instance``,
  ``/metadata/instance/compute``) is served with the restricted fields removed, so ordinary
  agents can still read the whole instance. A restricted path that runs through an array
  index replaces that array item by ``"<redacted>"`` (indexes stay stable).
- ``/v1/state``, watch state frames and long-poll responses carry the same redacted instance.
- A change whose value lies at or below a restricted path keeps its ``kind``, ``op``, ``key``
  and ``fields`` but has ``old`` and ``new`` replaced by ``"<redacted>"``: the peer learns
  *that* it changed, never the value. A change whose value contains a restricted path (e.g. a
  whole OS disk object with ``encryptionSettings`` restricted) has the restricted fields
  removed from ``old`` and ``new``.
- Restricted paths match IMDS keys exactly (case-sensitive), like route filtering does.
  ``compute/tags`` and ``compute/tagsList`` are separate fields: restrict both to hide tags.
- Scheduling approval (``POST /v1/scheduled-events/<id>/approve``) is for privileged peers only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import msgspec

from imdsd.frames import Change, ChangeFrame

Level = Literal["full", "redacted"]
Access = Literal["allow", "deny", "filtered"]
REDACTED = "<redacted>"
_ANY = None  # in a change's path: any array index


class Peer(NamedTuple):
    """A connected peer's credentials as SO_PEERCRED reports them."""

    pid: int
    uid: int
    gid: int


def _overlap(path: Sequence[str], where: Sequence[str | None]) -> bool:
    """True when the shorter of two paths is a prefix of the other (None matches any)."""
    return all(y is _ANY or x == y for x, y in zip(path, where, strict=False))


def _remove(value: Any, path: Sequence[str]) -> Any:
    """A copy of ``value`` without ``path`` (only the containers on the way are copied)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        if head not in value:
            return value
        copy = dict(value)
        if rest:
            copy[head] = _remove(value[head], rest)
        else:
            del copy[head]
        return copy
    if isinstance(value, list) and head.isdigit() and int(head) < len(value):
        index = int(head)
        items = list(value)
        items[index] = _remove(value[index], rest) if rest else REDACTED
        return items
    return value


def _change_paths(change: Change) -> list[list[str | None]]:
    """Where a change's ``old``/``new`` live in the instance document (None: any index)."""
    if change.kind == "compute":
        return [["compute", *change.key.split(".")]]
    if change.kind == "tags":
        return [["compute", "tagsList", _ANY], ["compute", "tags"]]
    if change.kind == "disks":
        if change.key == "os":
            return [["compute", "storageProfile", "osDisk"]]
        if change.key == "resource":
            return [["compute", "storageProfile", "resourceDisk"]]
        return [["compute", "storageProfile", "dataDisks", _ANY]]
    if change.kind == "network":
        return [["network", "interface", _ANY]]
    return []


class AccessPolicy:
    """Restricted instance paths and the uids/gids allowed to read them."""

    def __init__(
        self,
        restricted_paths: Iterable[str] = (),
        allow_uids: Iterable[int] = (),
        allow_gids: Iterable[int] = (),
    ) -> None:
        self.restricted = [tuple(s for s in p.split("/") if s) for p in restricted_paths]
        self.restricted = [p for p in self.restricted if p]
        self.allow_uids = frozenset(allow_uids)
        self.allow_gids = frozenset(allow_gids)

    def privileged(self, peer: Peer | None) -> bool:
        """True when ``peer`` may read restricted paths and approve events."""
        if peer is None:
            return False
        return peer.uid in self.allow_uids or peer.gid in self.allow_gids

    def level(self, peer: Peer | None) -> Level:
        """``full`` when ``peer`` sees everything, else ``redacted``."""
        if not self.restricted or self.privileged(peer):
            return "full"
        return "redacted"

    def instance_access(self, segments: Sequence[str], level: Level) -> Access:
        """``allow``, ``deny`` (403) or ``filtered`` (serve the redacted document) for a read
        of ``/metadata/instance/<segments>`` at ``level``."""
        if level == "full":
            return "allow"
        access: Access = "allow"
        for path in self.restricted:
            if not _overlap(path, segments):
                continue
            if len(path) <= len(segments):
                return "deny"
            access = "filtered"
        return access

    def redact_instance(self, document: Any) -> Any:
        """``document`` (the raw instance) without any restricted path; shares unchanged parts."""
        for path in self.restricted:
            document = _remove(document, path)
        return document

    def redact_change(self, change: Change) -> Change:
        """``change`` as an unprivileged peer may see it (see the module docstring)."""
        strip: list[Sequence[str]] = []
        for where in _change_paths(change):
            for path in self.restricted:
                if not _overlap(path, where):
                    continue
                if len(path) <= len(where):
                    return msgspec.structs.replace(change, old=REDACTED, new=REDACTED)
                strip.append(path[len(where) :])
        if not strip:
            return change
        old, new = change.old, change.new
        for rest in strip:
            old, new = _remove(old, rest), _remove(new, rest)
        return msgspec.structs.replace(change, old=old, new=new)

    def redact_frame(self, frame: ChangeFrame) -> ChangeFrame:
        """``frame`` with every change redacted; the same object when nothing is restricted."""
        changes = [self.redact_change(change) for change in frame.changes]
        if all(a is b for a, b in zip(changes, frame.changes, strict=True)):
            return frame
        return msgspec.structs.replace(frame, changes=changes)
