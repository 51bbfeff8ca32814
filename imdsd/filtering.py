"""IMDS route filtering and response rendering (sans-IO; used by the emulator and the daemon).

IMDS lets a client append route parameters to ``/metadata/instance``: each segment is an
object key or an array index, walked exactly like a parsed JSON document
(``/metadata/instance/network/interface/0/macAddress``).

Rendering, as IMDS does it:

- ``format=json`` (the default) gives the JSON of the selected node. On a leaf IMDS answers
  400 (``format=json`` "doesn't work" on leaf nodes, and a missing ``format`` counts as json);
  the daemon's socket API instead gives the JSON string. :func:`render` takes
  ``leaf_json_allowed`` to choose between the two.
- ``format=text`` on a leaf gives the plain value (no quotes, no trailing newline). On an
  object it lists the keys, on an array the indexes, one per line, joined with ``"\\n"`` and
  without a trailing newline; a child that is itself an object or array gets a trailing ``/``
  (IMDS answers ``compute/`` and ``network/`` for the whole instance), a leaf child does not.
  An empty object or array renders as the empty string.

Segments: object keys match exactly (case-sensitive); array indexes are canonical
non-negative decimal numbers (``"0"``, ``"12"``; not ``"01"``, ``"-1"`` or ``"+1"``).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Format = Literal["json", "text"]
FORMATS: tuple[Format, ...] = ("json", "text")


class FilterError(ValueError):
    """Base of the errors raised here; ``status`` is the HTTP status to answer."""

    status = 400


class NotFound(FilterError):
    """A route parameter names a missing key, a bad index, or walks into a leaf."""

    status = 404


class LeafFormatError(FilterError):
    """``format=json`` was asked for a leaf node where IMDS refuses it."""

    status = 400


class UnknownFormat(FilterError):
    """The ``format`` query parameter is neither ``json`` nor ``text``."""

    status = 400


def split_path(path: str) -> list[str]:
    """Split ``"compute/tags"`` or ``"/network/interface/0/"`` into its non-empty segments."""
    return [segment for segment in path.split("/") if segment]


def is_leaf(value: Any) -> bool:
    """True for anything that is not a JSON object or array."""
    return not isinstance(value, dict | list)


def _where(walked: list[str]) -> str:
    return "/" + "/".join(walked)


def resolve(document: Any, segments: list[str]) -> Any:
    """Walk ``segments`` (object keys and array indexes) down ``document``.

    Raises :class:`NotFound` naming the segment and where it failed.
    """
    node = document
    walked: list[str] = []
    for segment in segments:
        if isinstance(node, dict):
            if segment not in node:
                raise NotFound(f"no key {segment!r} under {_where(walked)}")
            node = node[segment]
        elif isinstance(node, list):
            if not (segment.isascii() and segment.isdigit()) or str(int(segment)) != segment:
                raise NotFound(f"{segment!r} is not an array index under {_where(walked)}")
            index = int(segment)
            if index >= len(node):
                raise NotFound(
                    f"index {index} out of range under {_where(walked)} ({len(node)} items)"
                )
            node = node[index]
        else:
            raise NotFound(f"{_where(walked)} is a leaf; cannot walk into {segment!r}")
        walked.append(segment)
    return node


def _leaf_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return msgspec.json.encode(value).decode()


def _child_line(name: str, child: Any) -> str:
    return name if is_leaf(child) else name + "/"


def render_text(value: Any) -> str:
    """Render a node for ``format=text`` (see the module docstring for the exact shape)."""
    if isinstance(value, dict):
        return "\n".join(_child_line(str(key), child) for key, child in value.items())
    if isinstance(value, list):
        return "\n".join(_child_line(str(index), child) for index, child in enumerate(value))
    return _leaf_text(value)


def render_json(value: Any) -> bytes:
    """Render a node as compact JSON."""
    return msgspec.json.encode(value)


def parse_format(value: str | None) -> Format:
    """The ``format`` query parameter (None means json); raises :class:`UnknownFormat`."""
    if value is None or value == "json":
        return "json"
    if value == "text":
        return "text"
    raise UnknownFormat(f"Bad request. format {value!r} is not supported; use json or text")


def render(value: Any, fmt: Format, *, leaf_json_allowed: bool) -> tuple[bytes, str]:
    """Render ``value`` as ``fmt``; returns the body and its content type.

    With ``leaf_json_allowed`` false, JSON for a leaf raises :class:`LeafFormatError` (IMDS);
    with it true, a leaf gives its JSON value (the daemon's socket API).
    """
    if fmt == "text":
        return render_text(value).encode(), "text/plain; charset=utf-8"
    if is_leaf(value) and not leaf_json_allowed:
        raise LeafFormatError(
            "Bad request. format=json is not supported on a leaf node; use format=text"
        )
    return render_json(value), "application/json; charset=utf-8"
