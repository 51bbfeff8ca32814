"""Tests for imdsd.delta: a delta turns the old value into the new one, and is small."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imdsd import delta

scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
long_text = st.text(alphabet="ab;:", min_size=200, max_size=400)
values = st.recursive(
    scalars | long_text,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(values, values)
def test_apply_of_make_gives_the_new_value(old: Any, new: Any) -> None:
    edit = delta.make(old, new)
    if edit is None:
        assert msgspec.json.encode(old) == msgspec.json.encode(new)
        return
    through_json = msgspec.json.decode(msgspec.json.encode(edit))
    result = delta.apply(old, through_json)
    assert msgspec.json.encode(result) == msgspec.json.encode(new), "same bytes, key order too"
    assert msgspec.json.encode(old) == msgspec.json.encode(old), "old is not modified"


def test_a_delta_is_as_small_as_the_change() -> None:
    tags = ";".join(f"tag{i}:value{i}" for i in range(2000))
    old = {"compute": {"tags": tags, "tagsList": [{"name": f"tag{i}"} for i in range(2000)]}}
    new = msgspec.json.decode(msgspec.json.encode(old))
    new["compute"]["tags"] = tags.replace("tag1000:value1000", "tag1000:changed")
    new["compute"]["tagsList"][1000]["name"] = "renamed"
    edit = delta.make(old, new)
    assert len(msgspec.json.encode(edit)) < 200
    assert delta.apply(old, edit) == new


def test_one_is_not_true() -> None:
    assert delta.apply({"a": 1}, delta.make({"a": 1}, {"a": True})) == {"a": True}


def _nested(depth: int, leaf: int) -> Any:
    value: Any = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def test_depth_is_bounded() -> None:
    old, new = _nested(300, 0), _nested(300, 1)
    edit: Any = delta.make(old, new)
    levels = 0
    while edit[0] == "d":
        edit = edit[1]["a"]
        levels += 1
    assert levels == delta.MAX_DEPTH
    assert edit == ["=", _nested(300 - delta.MAX_DEPTH, 1)]
    assert delta.apply(old, delta.make(old, new)) == new


@pytest.mark.parametrize(
    ("value", "edit"),
    [
        ({}, "x"),
        ({}, []),
        ([], ["d", {}, []]),
        ({"a": 1}, ["d", {"b": ["d", {}, []]}, []]),
        ([1], ["l", 1, {"3": ["=", 0]}]),
        ([1], ["l", -1, {}]),
        ("abc", ["s", 2, 1, ""]),
        ("abc", ["s", 0, 9, ""]),
        (5, ["?"]),
    ],
)
def test_a_delta_that_does_not_fit_is_an_error(value: Any, edit: Any) -> None:
    with pytest.raises(delta.DeltaError):
        delta.apply(value, edit)
