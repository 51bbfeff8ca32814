"""How many front connections each caller uid may hold (sans-IO).

The front serves at most ``total`` connections (its share of the descriptor budget). No uid
may hold more than ``per_uid`` of them, so one local user cannot take the front from the
others, and ``reserve`` of them are kept for trusted uids (root and ``restricted_allow_uids``,
which run the agents that matter: WALinuxAgent, cloud-init): connections of other uids
together never hold more than ``total - reserve``. A trusted uid is therefore never refused
because of untrusted uids' connections, only because of its own (``per_uid``) or, when trusted
uids together hold the whole reserve as well, of theirs.

:meth:`ConnectionQuota.admit` and :meth:`~ConnectionQuota.release` are a few dict operations:
they run once per connection, on the accept path.
"""

from __future__ import annotations

from typing import NamedTuple


class Slot(NamedTuple):
    """An admitted connection: its uid and whether it was admitted as trusted."""

    uid: int
    trusted: bool


class ConnectionQuota:
    """Open connections per uid, within ``per_uid`` each and ``total`` with ``reserve``."""

    __slots__ = ("held", "open", "per_uid", "reserve", "total", "untrusted")

    def __init__(self, total: int, per_uid: int, reserve: int) -> None:
        if not 0 < per_uid <= total or not 0 <= reserve < total:
            raise ValueError(f"bad quota: total={total} per_uid={per_uid} reserve={reserve}")
        self.total = total
        self.per_uid = per_uid
        self.reserve = reserve
        self.held: dict[int, int] = {}
        self.open = 0
        self.untrusted = 0

    def admit(self, uid: int, trusted: bool) -> Slot | None:
        """A slot for one more connection of ``uid``, or None when it is over its limits."""
        mine = self.held.get(uid, 0)
        if mine >= self.per_uid or self.open >= self.total:
            return None
        if not trusted and self.untrusted >= self.total - self.reserve:
            return None
        self.held[uid] = mine + 1
        self.open += 1
        if not trusted:
            self.untrusted += 1
        return Slot(uid, trusted)

    def release(self, slot: Slot) -> None:
        """Give back a slot :meth:`admit` returned (once)."""
        left = self.held[slot.uid] - 1
        if left:
            self.held[slot.uid] = left
        else:
            del self.held[slot.uid]
        self.open -= 1
        if not slot.trusted:
            self.untrusted -= 1
