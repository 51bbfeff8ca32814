"""What the hooks need from the store: revisions, change history and delivery marks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from imdsd.frames import ChangeFrame, GoneFrame


class HookLedger(Protocol):
    """The store as the hooks see it (``imdsd.store.Store`` satisfies it).

    ``frames_since(rev)`` gives the frames after ``rev`` oldest first, or ``GoneFrame`` when
    ``rev`` is older than the kept history; ``frames_since(oldest)`` is always available.
    ``mark_delivered`` only moves a mark forward; the daemon persists the marks with the store.
    """

    @property
    def revision(self) -> int: ...

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame: ...

    def delivered(self, hook: str) -> int | None: ...

    def mark_delivered(self, hook: str, revision: int) -> object: ...

    def forget_hooks(self, keep: Iterable[str]) -> object: ...


WaitForRevision = Callable[[int], Awaitable[object]]
"""``await wait_for_revision(rev)`` returns once the ledger's revision is above ``rev``."""
