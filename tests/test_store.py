"""Tests for imdsd.store: revisions, history ring, resume boundaries, hook marks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imdsd.frames import Change, ChangeFrame, GoneFrame
from imdsd.store import PersistedState, Store
from imdsd.timestamps import format_timestamp

NOW = 1_700_000_000.0


class Snap(msgspec.Struct, frozen=True):
    """A tiny stand-in for model.Snapshot: only ``tags`` is diffed, ``extra`` is not."""

    tags: dict[str, str] = msgspec.field(default_factory=dict)
    extra: str = ""


class Other(msgspec.Struct, frozen=True):
    """A snapshot of the wrong type."""

    value: int = 0


def fake_diff(old: Snap, new: Snap) -> list[Change]:
    """Tag changes between two snapshots, sorted by key."""
    changes = []
    for key in sorted(old.tags.keys() | new.tags.keys()):
        before, after = old.tags.get(key), new.tags.get(key)
        if before == after:
            continue
        op = "added" if before is None else "removed" if after is None else "modified"
        changes.append(Change(kind="tags", op=op, key=key, old=before, new=after))
    return changes


def make_store(history: int = 10, state: PersistedState[Snap] | None = None) -> Store[Snap]:
    return Store(diff=fake_diff, snapshot_type=Snap, history=history, state=state)


def snap(**tags: str) -> Snap:
    return Snap(tags=tags)


def grow(store: Store[Snap], count: int) -> list[ChangeFrame]:
    """Apply ``count`` snapshots that each change tag ``n``; return their frames."""
    frames = []
    for _ in range(count):
        frame = store.apply(snap(n=str(store.revision + 1)), NOW)
        assert frame is not None
        frames.append(frame)
    return frames


def restart(store: Store[Snap], history: int = 10) -> Store[Snap]:
    """Round-trip the store's state through JSON, as a restart would."""
    data = msgspec.json.encode(store.to_state())
    state = msgspec.json.decode(data, type=PersistedState[Snap])
    return Store(diff=fake_diff, snapshot_type=Snap, history=history, state=state)


def test_fresh_store_is_empty() -> None:
    store = make_store()
    assert store.snapshot is None
    assert store.revision == 0
    assert store.oldest == 0
    assert store.frames_since(0) == []
    assert store.frames_since(1) == GoneFrame(oldest=0)
    assert store.frames_since(-1) == GoneFrame(oldest=0)
    assert not store.dirty


def test_first_snapshot_is_a_baseline_with_a_revision_but_no_frame() -> None:
    store = make_store()
    assert store.apply(snap(a="1"), NOW) is None
    assert store.revision == 1
    assert store.snapshot == snap(a="1")
    assert store.oldest == 1
    assert store.frames_since(1) == []
    assert store.frames_since(0) == GoneFrame(oldest=1)
    assert store.history_size == 0


def test_changes_create_one_revision_with_all_changes() -> None:
    calls: list[tuple[Snap, Snap]] = []

    def recording_diff(old: Snap, new: Snap) -> list[Change]:
        calls.append((old, new))
        return fake_diff(old, new)

    store = Store(diff=recording_diff, snapshot_type=Snap, history=10)
    store.apply(snap(a="1", b="2"), NOW)
    frame = store.apply(snap(a="9", c="3"), NOW + 0.25)
    assert calls == [(snap(a="1", b="2"), snap(a="9", c="3"))]
    assert frame == ChangeFrame(
        revision=2,
        at="2023-11-14T22:13:20.250Z",
        changes=[
            Change(kind="tags", op="modified", key="a", old="1", new="9"),
            Change(kind="tags", op="removed", key="b", old="2", new=None),
            Change(kind="tags", op="added", key="c", old=None, new="3"),
        ],
    )
    assert store.revision == 2
    assert store.frames_since(1) == [frame]
    assert store.frames_since(2) == []


def test_no_changes_create_no_revision_but_replace_the_snapshot() -> None:
    store = make_store()
    store.apply(snap(a="1"), NOW)
    assert store.apply(snap(a="1"), NOW) is None
    assert store.apply(Snap(tags={"a": "1"}, extra="unknown field changed"), NOW) is None
    assert store.revision == 1
    assert store.snapshot == Snap(tags={"a": "1"}, extra="unknown field changed")
    assert store.history_size == 0


def test_history_boundary_matches_the_documented_example() -> None:
    # History holds frames 7..10 and the current revision is 10.
    store = make_store(history=4)
    store.apply(snap(), NOW)
    frames = grow(store, 9)
    assert [f.revision for f in frames] == list(range(2, 11))
    assert store.history_size == 4
    assert store.oldest == 6
    assert store.frames_since(6) == frames[-4:]
    assert store.frames_since(8) == frames[-2:]
    assert store.frames_since(10) == []
    assert store.frames_since(5) == GoneFrame(oldest=6)
    assert store.frames_since(0) == GoneFrame(oldest=6)
    assert store.frames_since(11) == GoneFrame(oldest=6)


def test_history_zero_keeps_no_frames() -> None:
    store = make_store(history=0)
    store.apply(snap(), NOW)
    grow(store, 3)
    assert store.history_size == 0
    assert store.history_limit == 0
    assert store.frames_since(4) == []
    assert store.frames_since(3) == GoneFrame(oldest=4)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (NOW + 0.9999, "2023-11-14T22:13:20.999Z"),
        (datetime(2024, 5, 1, 12, 30, 5, 123456, tzinfo=UTC), "2024-05-01T12:30:05.123Z"),
        (
            datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
            "2024-05-01T12:00:00.000Z",
        ),
    ],
)
def test_format_timestamp(now: datetime | float, expected: str) -> None:
    assert format_timestamp(now) == expected


def test_naive_datetime_is_rejected() -> None:
    store = make_store()
    with pytest.raises(ValueError, match="has no timezone"):
        store.apply(snap(), datetime(2024, 1, 1))
    assert store.revision == 0


def test_bad_arguments_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="history must be >= 0"):
        make_store(history=-1)
    store = make_store()
    with pytest.raises(TypeError, match="snapshot is a Other, expected Snap"):
        store.apply(Other(), NOW)  # type: ignore[arg-type]
    wrong: PersistedState[Snap] = PersistedState(
        revision=1,
        oldest=1,
        snapshot=Other(),  # type: ignore[arg-type]
    )
    with pytest.raises(TypeError, match="persisted snapshot is a Other"):
        make_store(state=wrong)


def test_diff_failure_leaves_the_store_unchanged() -> None:
    def broken(old: Snap, new: Snap) -> list[Change]:
        raise RuntimeError("boom")

    store = Store(diff=broken, snapshot_type=Snap, history=10)
    store.apply(snap(a="1"), NOW)
    with pytest.raises(RuntimeError):
        store.apply(snap(a="2"), NOW)
    assert store.snapshot == snap(a="1")
    assert store.revision == 1


def test_hook_marks() -> None:
    store = make_store()
    store.apply(snap(), NOW)
    grow(store, 3)
    assert store.delivered("remount") is None
    assert store.mark_delivered("remount", 2) is True
    assert store.delivered("remount") == 2
    assert store.mark_delivered("remount", 2) is False
    assert store.mark_delivered("remount", 1) is False
    assert store.delivered("remount") == 2
    assert store.mark_delivered("tags", 4) is True
    assert store.hooks == {"remount": 2, "tags": 4}
    with pytest.raises(ValueError, match=r"'tags': delivered revision 5 is not within 0\.\.4"):
        store.mark_delivered("tags", 5)
    with pytest.raises(ValueError, match="delivered revision -1"):
        store.mark_delivered("tags", -1)
    assert store.forget_hooks({"tags", "new"}) is True
    assert store.hooks == {"tags": 4}
    assert store.forget_hooks({"tags"}) is False


def test_hooks_mapping_is_a_copy() -> None:
    store = make_store()
    store.apply(snap(), NOW)
    store.mark_delivered("a", 1)
    view = store.hooks
    assert isinstance(view, dict)
    view["b"] = 1
    assert store.delivered("b") is None


def test_dirty_tracking_tells_the_shell_when_to_save() -> None:
    store = make_store()
    store.apply(snap(a="1"), NOW)
    assert store.dirty
    assert store.must_save
    store.mark_saved(store.generation)
    assert not store.dirty

    store.apply(snap(a="1"), NOW)
    assert not store.dirty, "an identical snapshot changes nothing to persist"

    store.apply(Snap(tags={"a": "1"}, extra="x"), NOW)
    assert store.dirty
    assert not store.must_save, "a snapshot-only update may be saved lazily"
    store.mark_saved(store.generation)

    store.mark_delivered("h", 1)
    assert store.must_save
    store.mark_saved(store.generation)
    store.mark_delivered("h", 1)
    store.forget_hooks({"h"})
    assert not store.dirty


def test_change_during_a_save_keeps_the_store_dirty() -> None:
    store = make_store()
    store.apply(snap(a="1"), NOW)
    generation = store.generation
    state = store.to_state()
    store.apply(snap(a="2"), NOW)  # happens while `state` is being written
    store.mark_saved(generation)
    assert store.dirty
    assert store.must_save
    assert state.revision == 1
    assert state.snapshot == snap(a="1")
    store.mark_saved(generation - 1)  # a late, older save does not undo a newer one
    store.mark_saved(store.generation)
    assert not store.dirty
    with pytest.raises(ValueError, match="is ahead of"):
        store.mark_saved(store.generation + 1)


def test_to_state_is_a_copy() -> None:
    store = make_store()
    store.apply(snap(), NOW)
    store.mark_delivered("h", 1)
    state = store.to_state()
    grow(store, 2)
    store.mark_delivered("h", 3)
    assert state.revision == 1
    assert state.history == []
    assert state.hooks == {"h": 1}


def test_restart_continues_revisions_and_reports_downtime_changes_once() -> None:
    store = make_store(history=3)
    store.apply(snap(a="1"), NOW)
    frames = grow(store, 4)
    store.mark_delivered("h", 4)
    restored = restart(store, history=3)
    assert restored.revision == 5
    assert restored.oldest == store.oldest == 2
    assert restored.snapshot == store.snapshot
    assert restored.frames_since(2) == frames[-3:]
    assert restored.delivered("h") == 4
    assert not restored.dirty

    frame = restored.apply(snap(n="5", down="time"), NOW)
    assert frame is not None
    assert frame.revision == 6
    assert [c.key for c in frame.changes] == ["down"]
    again = restart(restored, history=3)
    assert again.apply(snap(n="5", down="time"), NOW) is None


def test_restart_with_a_smaller_history_raises_oldest() -> None:
    store = make_store(history=10)
    store.apply(snap(), NOW)
    frames = grow(store, 6)
    smaller = restart(store, history=2)
    assert smaller.history_size == 2
    assert smaller.oldest == 5
    assert smaller.frames_since(5) == frames[-2:]
    assert smaller.frames_since(4) == GoneFrame(oldest=5)
    bigger = restart(smaller, history=10)
    grow(bigger, 1)
    assert bigger.history_size == 3
    assert bigger.oldest == 5


def test_lost_snapshot_restarts_above_the_recovered_revision() -> None:
    # What persist.load_state hands over when state.json was corrupt but the mark said 50.
    store = make_store(state=PersistedState(revision=50, oldest=50))
    assert store.frames_since(50) == []
    assert store.apply(snap(a="1"), NOW) is None
    assert store.revision == 51
    assert store.oldest == 51
    assert store.frames_since(50) == GoneFrame(oldest=51)
    assert grow(store, 1)[0].revision == 52


def test_revision_without_frame_is_not_a_gap() -> None:
    # Revisions 10..12 took no frame (documents that appeared without a change): resumable.
    old = make_store()
    old.apply(snap(), NOW)
    frames = grow(old, 9)
    state = msgspec.structs.replace(old.to_state(), revision=12)
    store = make_store(state=state)
    assert store.frames_since(9) == [frames[-1]]
    assert store.frames_since(10) == []
    assert store.frames_since(12) == []
    assert store.frames_since(13) == GoneFrame(oldest=1)
    frame = store.apply(snap(n="13"), NOW)
    assert frame is not None
    assert frame.revision == 13
    assert store.frames_since(11) == [frame]


def test_a_never_published_gap_is_gone_until_it_leaves_the_history() -> None:
    # persist.apply_mark's result for a state at revision 5 and a mark at 8.
    old = make_store(history=4)
    old.apply(snap(), NOW)
    frames = grow(old, 4)
    state = msgspec.structs.replace(old.to_state(), revision=9, gaps=[(5, 8)])
    store = restart(make_store(history=4, state=state), history=4)
    assert store.frames_since(1) == frames
    assert store.frames_since(5) == []
    assert [store.frames_since(since) for since in (6, 7, 8)] == [GoneFrame(oldest=1)] * 3
    assert store.frames_since(9) == []
    newer = grow(store, 3)
    assert store.frames_since(5) == newer
    assert store.frames_since(8) == GoneFrame(oldest=4)
    assert store.to_state().gaps == [(5, 8)]
    grow(store, 1)
    assert (store.oldest, store.to_state().gaps) == (5, [(5, 8)])
    assert store.frames_since(6) == GoneFrame(oldest=5)
    grow(store, 1)  # the history now starts at 10: the gap is below it, forgotten
    assert (store.oldest, store.to_state().gaps) == (10, [])


def test_a_baseline_forgets_the_gaps() -> None:
    state = PersistedState[Snap](revision=9, oldest=2, gaps=[(3, 5), (6, 8)])
    store = make_store(state=state)
    assert store.apply(snap(a="1"), NOW) is None
    assert (store.revision, store.oldest, store.to_state().gaps) == (10, 10, [])


@pytest.mark.parametrize(
    "gaps",
    [[(3, 3)], [(4, 3)], [(1, 9)], [(1, 10)], [(-1, 2)], [(1, 4), (3, 6)], [(5, 6), (1, 2)]],
)
def test_gaps_must_be_ordered_ranges_below_the_revision(gaps: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError, match="gap"):
        PersistedState[Snap](revision=9, gaps=gaps)


def frame_at(revision: int) -> ChangeFrame:
    return ChangeFrame(revision=revision, at="2024-01-01T00:00:00.000Z", changes=[])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"revision": -1}, "revision -1 is negative"),
        ({"revision": 3, "oldest": 4}, r"oldest 4 is not within 0\.\.revision 3"),
        ({"revision": 3, "oldest": -1}, "oldest -1"),
        ({"revision": 3, "oldest": 1, "history": [frame_at(1)]}, "revision 1 is not within 2..3"),
        ({"revision": 3, "history": [frame_at(2), frame_at(2)]}, "revision 2 is not within 3"),
        ({"revision": 3, "history": [frame_at(4)]}, "revision 4 is not within 1..3"),
        ({"revision": 3, "hooks": {"h": 4}}, r"hook 'h' delivered revision 4"),
        ({"revision": 3, "hooks": {"h": -1}}, r"hook 'h' delivered revision -1"),
    ],
)
def test_inconsistent_persisted_state_is_rejected(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PersistedState[Snap](**fields)  # type: ignore[arg-type]
    data = msgspec.json.encode(fields)
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.json.decode(data, type=PersistedState[Snap])


# Each step is a snapshot (tags from a tiny alphabet, so repeats are common, and an
# undiffed field), or None for a restart through the persisted state.
steps = st.lists(
    st.one_of(
        st.none(),
        st.builds(
            Snap,
            tags=st.dictionaries(st.sampled_from("ab"), st.sampled_from("xy"), max_size=2),
            extra=st.sampled_from(["", "e"]),
        ),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps=steps, history=st.integers(min_value=0, max_value=5))
def test_random_sequences_keep_revisions_history_and_resume_exact(
    steps: list[Snap | None], history: int
) -> None:
    store = make_store(history=history)
    published: list[ChangeFrame] = []
    evicted = 0
    baseline = 0
    for step in steps:
        if step is None:
            store = restart(store, history=history)
            continue
        before = store.revision
        had_snapshot = store.snapshot is not None
        previous = store.snapshot
        frame = store.apply(step, NOW)
        assert store.snapshot == step
        if not had_snapshot:
            assert frame is None
            assert store.revision == before + 1
            baseline = store.revision
        elif frame is None:
            assert previous is not None
            assert fake_diff(previous, step) == []
            assert store.revision == before
        else:
            assert frame.revision == before + 1 == store.revision
            assert frame.changes == fake_diff(previous, step)  # type: ignore[arg-type]
            published.append(frame)
        assert store.history_size <= history
        evicted = len(published) - store.history_size
        expected_oldest = max([baseline] + [f.revision for f in published[:evicted]])
        assert store.oldest == expected_oldest
        for since in range(-1, store.revision + 3):
            got = store.frames_since(since)
            if since < expected_oldest or since > store.revision:
                assert got == GoneFrame(oldest=expected_oldest)
            else:
                assert got == [f for f in published if f.revision > since]
    revisions = [f.revision for f in published]
    assert revisions == sorted(set(revisions))


def test_new_content_without_changes_takes_a_revision_without_a_frame() -> None:
    store = Store(diff=lambda a, b: [], snapshot_type=_AppearSnap, history=8)
    store.apply(_AppearSnap(a=1), 0.0)
    assert store.revision == 1
    assert store.apply(_AppearSnap(a=1, b=2), 1.0, new_content=True) is None
    assert store.revision == 2
    assert store.must_save
    assert store.frames_since(1) == []
    assert store.apply(_AppearSnap(a=1, b=3), 2.0) is None
    assert store.revision == 2


class _AppearSnap(msgspec.Struct, frozen=True):
    a: int = 0
    b: int = 0


def test_baseline_brings_hook_marks_up_to_date() -> None:
    store = Store(diff=lambda a, b: [], snapshot_type=_AppearSnap, history=8)
    store.mark_delivered("h", 0)
    store.apply(_AppearSnap(a=1), 0.0)
    assert store.delivered("h") == 1
    assert store.frames_since(1) == []


# ------------------------------------------------------------ update, publish, limits


def saving_store(history: int = 10, **options: object) -> Store[Snap]:
    """A store that publishes a revision only once a save of it succeeded (the daemon's)."""
    return Store(
        diff=fake_diff,
        snapshot_type=Snap,
        history=history,
        publish_on_save=True,
        **options,  # type: ignore[arg-type]
    )


def test_update_skips_the_diff_when_every_field_is_unchanged() -> None:
    calls = []

    def counting_diff(old: Snap, new: Snap) -> list[Change]:
        calls.append((old, new))
        return fake_diff(old, new)

    store = Store(diff=counting_diff, snapshot_type=Snap, history=4)
    assert store.update({"tags": {"a": "1"}}, NOW)
    assert store.update({"tags": {"a": "2"}}, NOW)
    generation = store.generation
    assert not store.update({"tags": {"a": "2"}}, NOW)
    assert not store.update({"tags": {"a": "2"}, "extra": ""}, NOW)
    assert (len(calls), store.generation, store.revision) == (1, generation, 2)
    assert store.update({"extra": "seen"}, NOW), "a field the diff ignores still changes"
    assert (store.revision, store.snapshot) == (2, Snap(tags={"a": "2"}, extra="seen"))


def test_update_gives_a_revision_to_content_that_appeared() -> None:
    store = Store(
        diff=fake_diff,
        snapshot_type=Snap,
        history=4,
        appeared=lambda old, new: not old.extra and bool(new.extra),
    )
    store.update({"tags": {"a": "1"}}, NOW)
    assert store.update({"extra": "new document"}, NOW)
    assert (store.revision, store.frames_since(1)) == (2, [])
    assert store.update({"extra": "edited"}, NOW)
    assert store.revision == 2, "not new content: the same revision"


def test_carry_prepares_each_snapshot_before_the_diff() -> None:
    def carry(previous: Snap, new: Snap) -> Snap:
        return msgspec.structs.replace(new, tags={**previous.tags, **new.tags})

    store = Store(diff=fake_diff, snapshot_type=Snap, history=4, carry=carry)
    store.apply(snap(a="1", b="1"), NOW)
    frame = store.apply(snap(b="2"), NOW)
    assert frame is not None
    assert [(c.key, c.op) for c in frame.changes] == [("b", "modified")]
    assert store.snapshot == snap(a="1", b="2")


def test_a_revision_is_published_only_once_saved() -> None:
    store = saving_store()
    store.apply(snap(a="1"), NOW)
    assert (store.published_revision, store.published_snapshot) == (0, None)
    assert store.saved(store.begin_save()) == []
    assert (store.published_revision, store.published_snapshot) == (1, snap(a="1"))
    first = store.apply(snap(a="2"), NOW)
    failed = store.begin_save()  # this save fails: saved() is never called for it
    assert (store.published_revision, store.unpublished) == (1, 1)
    assert store.published_since(1) == []
    assert store.published_since(2) == GoneFrame(oldest=1), "not published: unknown"
    second = store.apply(snap(a="3"), NOW)
    assert store.saved(store.begin_save()) == [first, second]
    assert store.published_since(1) == [first, second]
    assert (store.published_revision, store.published_snapshot) == (3, snap(a="3"))
    assert store.saved(failed) == [], "a late ticket publishes nothing older"
    assert store.published_revision == 3


def test_a_snapshot_only_update_is_published_at_once_unless_a_revision_is_pending() -> None:
    store = saving_store()
    store.apply(snap(a="1"), NOW)
    store.saved(store.begin_save())
    store.apply(Snap(tags={"a": "1"}, extra="x"), NOW)
    assert store.published_snapshot == Snap(tags={"a": "1"}, extra="x")
    assert not store.must_save
    store.apply(Snap(tags={"a": "2"}, extra="x"), NOW)
    store.apply(Snap(tags={"a": "2"}, extra="y"), NOW)
    assert store.published_snapshot == Snap(tags={"a": "1"}, extra="x")
    store.saved(store.begin_save())
    assert store.published_snapshot == Snap(tags={"a": "2"}, extra="y")


def test_history_is_bounded_in_bytes() -> None:
    size = len(msgspec.json.encode(ChangeFrame(revision=2, at=format_timestamp(NOW), changes=[])))
    store = Store(diff=fake_diff, snapshot_type=Snap, history=100, history_bytes=10_000)
    store.apply(snap(), NOW)
    for n in range(40):
        store.apply(snap(blob=f"{n}".ljust(1000, "x")), NOW)
    assert store.history_bytes <= 10_000
    kept = store.history_size
    assert 3 <= kept < 10, "each frame holds two 1000-byte values"
    assert store.oldest == store.revision - kept
    assert store.frames_since(store.oldest - 1) == GoneFrame(oldest=store.oldest)
    assert len(store.frames_since(store.oldest)) == kept  # type: ignore[arg-type]
    restored = Store(
        diff=fake_diff,
        snapshot_type=Snap,
        history=100,
        history_bytes=size * 3 + 4000,
        state=store.to_state(),
    )
    assert restored.history_size == 1, "a smaller limit drops frames on load"
    assert restored.oldest == restored.revision - 1
    tiny = Store(diff=fake_diff, snapshot_type=Snap, history=100, history_bytes=10)
    tiny.apply(snap(), NOW)
    tiny.apply(snap(a="1"), NOW)
    assert (tiny.history_size, tiny.oldest, tiny.revision) == (0, 2, 2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=40))
def test_published_frames_never_skip_nor_repeat_whatever_saves_fail(
    steps: list[tuple[int, bool]],
) -> None:
    """Apply random snapshots; each is saved or its save fails. What is published is always
    the saved prefix, and the published frames walk through every change exactly once."""
    store = saving_store(history=100)
    store.apply(snap(v="0"), NOW)
    store.saved(store.begin_save())
    published: list[ChangeFrame] = []
    seen = "0"
    for value, save_ok in steps:
        store.apply(snap(v=str(value)), NOW)
        ticket = store.begin_save()
        if save_ok:
            published += store.saved(ticket)
            assert store.published_revision == store.revision
        shown = published[-1].changes[0].new if published else "0"
        assert store.published_snapshot == snap(v=shown), "only what was saved is shown"
        assert store.published_since(store.published_revision) == []
    published += store.saved(store.begin_save())
    for frame in published:
        (change,) = frame.changes
        assert change.old == seen
        seen = change.new
    assert seen == store.snapshot.tags["v"]  # type: ignore[union-attr]
    assert [f.revision for f in published] == list(range(2, store.revision + 1))
