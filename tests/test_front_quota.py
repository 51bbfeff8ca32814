"""Front connections per caller uid (sans-IO): no uid takes the front from the others."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imdsd.front.quota import ConnectionQuota, Slot

TRUSTED = frozenset({0, 7})


def test_one_uid_holds_at_most_its_share() -> None:
    quota = ConnectionQuota(total=16, per_uid=4, reserve=4)
    slots = [quota.admit(65534, trusted=False) for _ in range(10)]
    assert sum(slot is not None for slot in slots) == 4
    assert quota.admit(1000, trusted=False) is not None
    assert quota.admit(0, trusted=True) is not None


def test_untrusted_uids_together_leave_the_reserve() -> None:
    quota = ConnectionQuota(total=16, per_uid=4, reserve=4)
    for uid in range(1000, 1010):
        for _ in range(4):
            quota.admit(uid, trusted=False)
    assert quota.untrusted == 12
    assert quota.admit(0, trusted=True) is not None
    assert quota.admit(7, trusted=True) is not None


def test_a_released_slot_is_free_again() -> None:
    quota = ConnectionQuota(total=4, per_uid=2, reserve=1)
    first = quota.admit(5, trusted=False)
    assert first is not None
    assert quota.admit(5, trusted=False) is not None
    assert quota.admit(5, trusted=False) is None
    quota.release(first)
    assert quota.admit(5, trusted=False) == Slot(5, False)


@pytest.mark.parametrize(("total", "per_uid", "reserve"), [(0, 1, 0), (4, 5, 0), (4, 1, 4)])
def test_impossible_quotas_are_refused(total: int, per_uid: int, reserve: int) -> None:
    with pytest.raises(ValueError, match="bad quota"):
        ConnectionQuota(total, per_uid, reserve)


EVENTS = st.lists(
    st.tuples(st.booleans(), st.sampled_from([0, 7, 1000, 1001, 65534, -1]), st.integers(0, 99)),
    max_size=300,
)


@given(EVENTS)
def test_limits_hold_and_trusted_uids_are_refused_only_for_trusted_connections(
    events: list[tuple[bool, int, int]],
) -> None:
    """Any order of opens and closes: no uid over ``per_uid``, untrusted uids never over
    ``total - reserve``, and a trusted uid under its own limit is refused only while trusted
    connections (its own or another trusted uid's) fill what untrusted ones leave."""
    quota = ConnectionQuota(total=24, per_uid=6, reserve=6)
    held: list[Slot] = []
    for is_open, uid, pick in events:
        if not is_open:
            if held:
                quota.release(held.pop(pick % len(held)))
            continue
        trusted = uid in TRUSTED
        slot = quota.admit(uid, trusted)
        mine = sum(1 for s in held if s.uid == uid)
        untrusted = sum(1 for s in held if not s.trusted)
        if trusted and slot is None and mine < 6:
            assert len(held) - untrusted >= 6  # the reserve is all taken by trusted uids
        if slot is not None:
            held.append(slot)
        assert sum(1 for s in held if s.uid == uid) <= 6
        assert sum(1 for s in held if not s.trusted) <= 18
        assert len(held) <= 24
    assert quota.open == len(held)
    for slot in held:
        quota.release(slot)
    assert (quota.held, quota.open, quota.untrusted) == ({}, 0, 0)
