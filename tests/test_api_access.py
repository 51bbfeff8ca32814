"""The access policy: who is privileged, 403 vs filtered parents, redaction of changes."""

from __future__ import annotations

from typing import Any

import pytest

from imdsd.api.access import REDACTED, AccessPolicy, Peer
from imdsd.frames import Change, ChangeFrame

POLICY = AccessPolicy(["compute/userData", "compute/customData"], allow_uids=[0], allow_gids=[50])
ROOT = Peer(1, 0, 0)
ADMIN = Peer(2, 1000, 50)
USER = Peer(3, 1000, 1000)


def test_privilege_by_uid_or_primary_gid() -> None:
    assert POLICY.privileged(ROOT)
    assert POLICY.privileged(ADMIN)
    assert not POLICY.privileged(USER)
    assert not POLICY.privileged(None)
    assert POLICY.level(USER) == "redacted"
    assert POLICY.level(ADMIN) == "full"
    assert AccessPolicy([], [0]).level(USER) == "full"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", "filtered"),
        ("compute", "filtered"),
        ("compute/userData", "deny"),
        ("compute/userData/x", "deny"),
        ("compute/customData", "deny"),
        ("compute/tags", "allow"),
        ("compute/userdata", "allow"),
        ("network", "allow"),
        ("network/interface/0", "allow"),
    ],
)
def test_instance_access_for_unprivileged(path: str, expected: str) -> None:
    segments = [s for s in path.split("/") if s]
    assert POLICY.instance_access(segments, "redacted") == expected
    assert POLICY.instance_access(segments, "full") == "allow"


def test_redact_instance_removes_only_restricted_fields() -> None:
    doc: dict[str, Any] = {
        "compute": {"userData": "secret", "customData": "x", "vmSize": "D2"},
        "network": {"interface": []},
    }
    redacted = POLICY.redact_instance(doc)
    assert redacted == {"compute": {"vmSize": "D2"}, "network": {"interface": []}}
    assert doc["compute"]["userData"] == "secret"
    assert redacted["network"] is doc["network"]


def test_redact_instance_through_arrays_keeps_indexes() -> None:
    policy = AccessPolicy(["network/interface/1", "compute/publicKeys/0/keyData"])
    doc = {
        "compute": {"publicKeys": [{"keyData": "k0", "path": "p0"}, {"keyData": "k1"}]},
        "network": {"interface": [{"mac": "a"}, {"mac": "b"}]},
    }
    assert policy.redact_instance(doc) == {
        "compute": {"publicKeys": [{"path": "p0"}, {"keyData": "k1"}]},
        "network": {"interface": [{"mac": "a"}, REDACTED]},
    }
    assert policy.redact_instance({"compute": "odd"}) == {"compute": "odd"}


def test_restricted_compute_change_keeps_key_hides_values() -> None:
    change = Change("compute", "modified", "userData", "old", "new", ["userData"])
    redacted = POLICY.redact_change(change)
    assert (redacted.kind, redacted.op, redacted.key, redacted.fields) == (
        "compute",
        "modified",
        "userData",
        ["userData"],
    )
    assert redacted.old == REDACTED
    assert redacted.new == REDACTED
    other = Change("compute", "modified", "vmSize", "a", "b", ["vmSize"])
    assert POLICY.redact_change(other) is other


def test_change_containing_a_restricted_path_is_stripped() -> None:
    policy = AccessPolicy(["compute/storageProfile/osDisk/encryptionSettings"])
    old = {"name": "os", "encryptionSettings": {"enabled": "false"}}
    new = {"name": "os", "encryptionSettings": {"enabled": "true"}}
    change = Change("disks", "modified", "os", old, new, ["encryptionSettings.enabled"])
    redacted = policy.redact_change(change)
    assert redacted.old == {"name": "os"}
    assert redacted.new == {"name": "os"}
    data_disk = Change("disks", "attached", "lun:0", None, {"lun": "0"})
    assert policy.redact_change(data_disk) is data_disk


def test_whole_kinds_can_be_restricted() -> None:
    policy = AccessPolicy(["compute/tags", "network"])
    tag = Change("tags", "added", "env", None, "prod")
    nic = Change("network", "added", "mac:00", None, {"macAddress": "00"})
    event = Change("scheduled_events", "added", "E1", None, {"EventId": "E1"})
    assert policy.redact_change(tag).new == REDACTED
    assert policy.redact_change(nic).new == REDACTED
    assert policy.redact_change(event) is event
    nested = AccessPolicy(["network/interface/0/macAddress"])
    nic_old = {"macAddress": "00", "ipv4": {}}
    stripped = nested.redact_change(Change("network", "modified", "mac:00", nic_old, nic_old))
    assert stripped.old == {"ipv4": {}}


def test_redact_frame_shares_untouched_frames() -> None:
    plain = ChangeFrame(revision=2, at="t", changes=[Change("tags", "added", "a", None, "1")])
    assert POLICY.redact_frame(plain) is plain
    secret = ChangeFrame(
        revision=3,
        at="t",
        changes=[
            Change("compute", "modified", "userData", "a", "b", ["userData"]),
            Change("compute", "modified", "vmSize", "a", "b", ["vmSize"]),
        ],
    )
    redacted = POLICY.redact_frame(secret)
    assert [c.new for c in redacted.changes] == [REDACTED, "b"]
    assert secret.changes[0].new == "b"
