"""An in-memory HookLedger for the hook tests (with tests of its own contract)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
import pytest
import trio

from imdsd.frames import Change, ChangeFrame, GoneFrame, Kind
from imdsd.hooks.ledger import HookLedger


class _Saved(msgspec.Struct):
    revision: int
    oldest: int
    frames: list[ChangeFrame]
    marks: dict[str, int]
    history: int


class FakeLedger:
    """Revisions, a bounded frame history and delivery marks, like the store keeps them."""

    def __init__(self, history: int = 100) -> None:
        self.revision = 0
        self.oldest = 0
        self.frames: list[ChangeFrame] = []
        self.marks: dict[str, int] = {}
        self.history = history
        self._advanced = trio.Event()

    def append(self, *changes: Change) -> int:
        """Store one revision holding ``changes`` and wake whoever waits for it."""
        self.revision += 1
        at = f"2024-01-01T00:00:{self.revision % 60:02d}Z"
        self.frames.append(ChangeFrame(revision=self.revision, at=at, changes=list(changes)))
        if len(self.frames) > self.history:
            del self.frames[0]
            self.oldest = self.frames[0].revision - 1
        self._advanced.set()
        self._advanced = trio.Event()
        return self.revision

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        """Frames after ``since``; GoneFrame when ``since`` is outside the kept history."""
        if since < self.oldest or since > self.revision:
            return GoneFrame(oldest=self.oldest)
        return [f for f in self.frames if f.revision > since]

    def delivered(self, hook: str) -> int | None:
        """The hook's mark, None if it has none."""
        return self.marks.get(hook)

    def mark_delivered(self, hook: str, revision: int) -> bool:
        """Move the hook's mark forward (never back)."""
        if not 0 <= revision <= self.revision:
            raise ValueError(f"{hook}: revision {revision} out of range")
        if self.marks.get(hook, -1) >= revision:
            return False
        self.marks[hook] = revision
        return True

    def forget_hooks(self, keep: Iterable[str]) -> bool:
        """Drop marks of hooks not in ``keep``."""
        kept = set(keep)
        gone = [name for name in self.marks if name not in kept]
        for name in gone:
            del self.marks[name]
        return bool(gone)

    async def wait_for_revision(self, revision: int) -> None:
        """Return once the revision is above ``revision``."""
        while self.revision <= revision:
            await self._advanced.wait()

    def dump(self) -> bytes:
        """What a daemon would persist."""
        saved = _Saved(self.revision, self.oldest, self.frames, self.marks, self.history)
        return msgspec.json.encode(saved)

    @classmethod
    def load(cls, data: bytes) -> FakeLedger:
        """A ledger restored from :meth:`dump` (a restart)."""
        saved = msgspec.json.decode(data, type=_Saved)
        ledger = cls(history=saved.history)
        ledger.revision, ledger.oldest = saved.revision, saved.oldest
        ledger.frames, ledger.marks = saved.frames, saved.marks
        return ledger


def change(kind: Kind, op: str, key: str, old: Any = None, new: Any = None) -> Change:
    """A change; ``modified`` gets ``fields=["value"]``."""
    fields = ["value"] if op == "modified" else None
    return Change(kind=kind, op=op, key=key, old=old, new=new, fields=fields)


def tag(op: str, key: str, old: Any = None, new: Any = None) -> Change:
    """A tags change."""
    return change("tags", op, key, old, new)


def test_fake_is_a_hook_ledger() -> None:
    ledger: HookLedger = FakeLedger()
    assert ledger.revision == 0


def test_fake_history_and_gone() -> None:
    ledger = FakeLedger(history=2)
    for i in range(4):
        ledger.append(tag("added", f"t{i}", new="v"))
    assert ledger.frames_since(1) == GoneFrame(oldest=2)
    assert ledger.frames_since(5) == GoneFrame(oldest=2)
    assert [f.revision for f in ledger.frames_since(2)] == [3, 4]  # type: ignore[union-attr]


def test_fake_marks_move_forward_only_and_survive_dump() -> None:
    ledger = FakeLedger()
    ledger.append(tag("added", "a", new="1"))
    ledger.append(tag("added", "b", new="2"))
    assert ledger.mark_delivered("h", 2)
    assert not ledger.mark_delivered("h", 1)
    with pytest.raises(ValueError, match="out of range"):
        ledger.mark_delivered("h", 3)
    restored = FakeLedger.load(ledger.dump())
    assert restored.delivered("h") == 2
    assert restored.frames_since(0) == ledger.frames_since(0)
    assert restored.forget_hooks(["other"])
    assert restored.delivered("h") is None


async def test_fake_wait_for_revision() -> None:
    ledger = FakeLedger()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ledger.wait_for_revision, 0)
        await trio.sleep(0.01)
        ledger.append(tag("added", "a", new="1"))
    with trio.fail_after(1):
        await ledger.wait_for_revision(0)
