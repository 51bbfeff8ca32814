"""Coalescing of change frames for hook runs (pure)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_hooks_support import change, tag

from imdsd.frames import Change, ChangeFrame
from imdsd.hooks.merge import coalesce, count_relevant, has_changes, merge_changes


def _frame(revision: int, *changes: Change) -> ChangeFrame:
    return ChangeFrame(revision=revision, at=f"t{revision}", changes=list(changes))


def _ops(changes: list[Change]) -> list[tuple[str, str, Any, Any]]:
    return [(c.op, c.key, c.old, c.new) for c in changes]


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (tag("added", "k", new="a"), tag("modified", "k", "a", "b"), ("added", "k", None, "b")),
        (tag("added", "k", new="a"), tag("removed", "k", old="a"), None),
        (tag("removed", "k", old="a"), tag("added", "k", new="b"), ("modified", "k", "a", "b")),
        (tag("removed", "k", old="a"), tag("added", "k", new="a"), None),
        (
            tag("modified", "k", "a", "b"),
            tag("modified", "k", "b", "c"),
            ("modified", "k", "a", "c"),
        ),
        (tag("modified", "k", "a", "b"), tag("modified", "k", "b", "a"), None),
        (tag("modified", "k", "a", "b"), tag("removed", "k", old="b"), ("removed", "k", "a", None)),
        (
            change("disks", "attached", "lun:0", new={"lun": 0}),
            change("disks", "detached", "lun:0", old={"lun": 0}),
            None,
        ),
        (
            change("disks", "detached", "lun:0", old={"lun": 0, "size": 1}),
            change("disks", "attached", "lun:0", new={"lun": 0, "size": 2}),
            ("modified", "lun:0", {"lun": 0, "size": 1}, {"lun": 0, "size": 2}),
        ),
        (
            change("disks", "attached", "lun:1", new={"size": 1}),
            change("disks", "modified", "lun:1", {"size": 1}, {"size": 4}),
            ("attached", "lun:1", None, {"size": 4}),
        ),
    ],
)
def test_two_changes_to_one_key_fold(
    first: Change, second: Change, expected: tuple[str, str, Any, Any] | None
) -> None:
    assert _ops(merge_changes([first, second])) == ([] if expected is None else [expected])


def test_modified_fields_are_unioned_in_order() -> None:
    a = Change(kind="compute", op="modified", key="x", old=1, new=2, fields=["b", "a"])
    b = Change(kind="compute", op="modified", key="x", old=2, new=3, fields=["a", "c"])
    assert merge_changes([a, b])[0].fields == ["b", "a", "c"]


def test_removed_then_added_lists_the_changed_fields() -> None:
    merged = merge_changes(
        [
            change("network", "removed", "mac:00", old={"ip": "1", "mask": "24"}),
            change("network", "added", "mac:00", new={"ip": "2", "mask": "24", "gw": "x"}),
        ]
    )
    assert merged[0].op == "modified"
    assert merged[0].fields == ["gw", "ip"]


def test_keys_keep_the_order_of_their_first_change_and_kinds_stay_apart() -> None:
    merged = merge_changes(
        [
            tag("added", "b", new="1"),
            change("compute", "modified", "b", "x", "y"),
            tag("added", "a", new="1"),
            tag("modified", "b", "1", "2"),
        ]
    )
    assert [(c.kind, c.key, c.op) for c in merged] == [
        ("tags", "b", "added"),
        ("compute", "b", "modified"),
        ("tags", "a", "added"),
    ]
    assert merged[0].new == "2"


def test_coalesce_single_frame_passes_through_restricted_to_kinds() -> None:
    frame = _frame(4, tag("added", "a", new="1"), change("disks", "attached", "lun:0", new={}))
    out = coalesce([frame], frozenset({"tags"}))
    assert out is not None
    assert out.covers is None
    assert out.revision == 4
    assert [c.kind for c in out.changes] == ["tags"]


def test_coalesce_several_frames_says_what_it_covers() -> None:
    frames = [
        _frame(3, change("disks", "attached", "lun:0", new={})),
        _frame(5, tag("added", "a", new="1")),
        _frame(6, change("disks", "attached", "lun:1", new={})),
        _frame(8, tag("modified", "a", "1", "2"), tag("added", "b", new="x")),
    ]
    out = coalesce(frames, frozenset({"tags"}))
    assert out == ChangeFrame(
        revision=8,
        at="t8",
        changes=[tag("added", "a", new="2"), tag("added", "b", new="x")],
        covers=[5, 8],
    )


def test_coalesce_returns_none_when_everything_cancels_or_nothing_matches() -> None:
    frames = [_frame(1, tag("added", "a", new="1")), _frame(2, tag("removed", "a", old="1"))]
    assert coalesce(frames, frozenset({"tags"})) is None
    assert coalesce(frames, frozenset({"disks"})) is None
    assert coalesce([], frozenset({"tags"})) is None
    assert coalesce([_frame(3)], frozenset({"tags"})) is None


def test_relevance_helpers() -> None:
    frames = [_frame(1, tag("added", "a", new="1")), _frame(2, change("disks", "attached", "x"))]
    assert has_changes(frames, frozenset({"disks"}))
    assert not has_changes(frames, frozenset({"network"}))
    assert count_relevant(frames, frozenset({"tags", "disks"})) == 2


def _diff(old: dict[str, str], new: dict[str, str]) -> list[Change]:
    out: list[Change] = []
    for key in sorted(old.keys() | new.keys()):
        if key not in old:
            out.append(tag("added", key, new=new[key]))
        elif key not in new:
            out.append(tag("removed", key, old=old[key]))
        elif old[key] != new[key]:
            out.append(tag("modified", key, old[key], new[key]))
    return out


_tag_states = st.lists(
    st.dictionaries(st.sampled_from("abcd"), st.sampled_from(["1", "2", "3"]), max_size=4),
    min_size=2,
    max_size=8,
)


@given(_tag_states)
def test_merging_every_step_equals_the_diff_of_first_and_last(
    states: list[dict[str, str]],
) -> None:
    steps = [c for old, new in itertools.pairwise(states) for c in _diff(old, new)]
    merged = sorted(merge_changes(steps), key=lambda c: c.key)
    assert _ops(merged) == _ops(_diff(states[0], states[-1]))
