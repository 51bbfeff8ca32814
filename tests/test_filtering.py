"""Tests for imdsd.filtering: IMDS route filtering and json/text rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imdsd.filtering import (
    LeafFormatError,
    NotFound,
    UnknownFormat,
    is_leaf,
    parse_format,
    render,
    render_json,
    render_text,
    resolve,
    split_path,
)

DATA = Path(__file__).parent / "data"


def linux() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / "instance-linux.json").read_text())
    return doc


# ------------------------------------------------------------------------------ resolve


def test_resolve_empty_path_is_whole_document() -> None:
    doc = linux()
    assert resolve(doc, []) is doc


def test_resolve_walks_keys_and_indexes_like_the_docs_example() -> None:
    doc = linux()
    path = split_path("network/interface/0/ipv4/ipAddress/0/privateIpAddress")
    assert resolve(doc, path) == "10.144.133.132"
    assert resolve(doc, ["compute", "tags"]) == "baz:bash;foo:bar"
    assert resolve(doc, ["compute", "publicKeys", "1", "path"]).endswith("authorized_keys1")


def test_split_path_drops_empty_segments() -> None:
    assert split_path("/compute//tags/") == ["compute", "tags"]
    assert split_path("") == []


@pytest.mark.parametrize(
    ("segments", "fragment"),
    [
        (["nope"], "no key 'nope' under /"),
        (["compute", "Tags"], "no key 'Tags' under /compute"),
        (["network", "interface", "1"], "index 1 out of range under /network/interface (1 items)"),
        (["network", "interface", "-1"], "'-1' is not an array index"),
        (["network", "interface", "01"], "'01' is not an array index"),
        (["network", "interface", "+0"], "'+0' is not an array index"),
        (["network", "interface", "mac"], "'mac' is not an array index"),
        (["network", "interface", "\u0660"], "is not an array index"),
        (["compute", "vmId", "x"], "/compute/vmId is a leaf; cannot walk into 'x'"),
    ],
)
def test_resolve_errors_name_the_segment(segments: list[str], fragment: str) -> None:
    with pytest.raises(NotFound, match=None) as info:
        resolve(linux(), segments)
    assert fragment in str(info.value)
    assert info.value.status == 404


# ------------------------------------------------------------------------------ text


def test_render_text_of_root_marks_containers_with_slash() -> None:
    assert render_text(linux()) == "compute/\nnetwork/"


def test_render_text_of_object_lists_keys_leaves_without_slash() -> None:
    lines = render_text(linux()["network"]["interface"][0]).split("\n")
    assert lines == ["ipv4/", "ipv6/", "macAddress"]


def test_render_text_of_array_lists_indexes() -> None:
    assert render_text([{"a": "1"}, {"b": "2"}]) == "0/\n1/"
    assert render_text(["x", "y", "z"]) == "0\n1\n2"
    assert render_text([]) == ""
    assert render_text({}) == ""


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("abc", "abc"),
        ("", ""),
        (7, "7"),
        (True, "true"),
        (False, "false"),
        (None, ""),
        (1.5, "1.5"),
    ],
)
def test_render_text_of_leaf_is_plain(value: Any, text: str) -> None:
    assert render_text(value) == text


# ------------------------------------------------------------------------------ render


def test_render_json_is_compact_json() -> None:
    assert render_json({"a": ["1", 2]}) == b'{"a":["1",2]}'


def test_render_leaf_json_refused_like_imds() -> None:
    with pytest.raises(LeafFormatError) as info:
        render("x", "json", leaf_json_allowed=False)
    assert info.value.status == 400


def test_render_leaf_json_allowed_for_the_daemon() -> None:
    assert render("x", "json", leaf_json_allowed=True) == (
        b'"x"',
        "application/json; charset=utf-8",
    )


def test_render_text_and_object_json() -> None:
    assert render("x", "text", leaf_json_allowed=False) == (b"x", "text/plain; charset=utf-8")
    body, ctype = render({"k": "v"}, "json", leaf_json_allowed=False)
    assert (body, ctype) == (b'{"k":"v"}', "application/json; charset=utf-8")


def test_parse_format() -> None:
    assert parse_format(None) == "json"
    assert parse_format("json") == "json"
    assert parse_format("text") == "text"
    with pytest.raises(UnknownFormat, match="'xml' is not supported"):
        parse_format("xml")
    with pytest.raises(UnknownFormat):
        parse_format("JSON")


# ------------------------------------------------------------------------------ properties

leaves = st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none())
documents = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=6), children, max_size=4),
    ),
    max_leaves=25,
)


@st.composite
def document_and_path(draw: st.DrawFn) -> tuple[Any, list[str], list[Any]]:
    """A document, a valid path into it, and the keys/indexes walked by hand."""
    doc = draw(documents)
    node: Any = doc
    segments: list[str] = []
    steps: list[Any] = []
    while not is_leaf(node) and node and draw(st.booleans()):
        if isinstance(node, dict):
            key = draw(st.sampled_from(sorted(node)))
            segments.append(key)
            steps.append(key)
            node = node[key]
        else:
            index = draw(st.integers(0, len(node) - 1))
            segments.append(str(index))
            steps.append(index)
            node = node[index]
    return doc, segments, steps


@given(document_and_path())
def test_resolve_agrees_with_walking_by_hand(case: tuple[Any, list[str], list[Any]]) -> None:
    doc, segments, steps = case
    expected = doc
    for step in steps:
        expected = expected[step]
    assert resolve(doc, segments) == expected


keys = st.text(st.characters(exclude_characters="\n"), min_size=1, max_size=6)
small_documents = st.recursive(
    leaves,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(keys, c, max_size=3)),
    max_leaves=6,
)


@given(st.dictionaries(keys, small_documents, max_size=6))
def test_render_text_of_object_lists_exactly_its_keys(doc: dict[str, Any]) -> None:
    text = render_text(doc)
    lines = text.split("\n") if doc else []
    assert len(lines) == len(doc)
    for line, (key, child) in zip(lines, doc.items(), strict=True):
        assert line == (key if is_leaf(child) else key + "/")


@given(small_documents, st.text(min_size=1, max_size=6).filter(lambda k: not k.isdigit()))
def test_resolve_missing_key_is_not_found(doc: Any, key: str) -> None:
    if isinstance(doc, dict) and key in doc:
        return
    with pytest.raises(NotFound):
        resolve(doc, [key])
