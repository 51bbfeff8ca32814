"""Does a path name an IMDS instance key? (sans-IO): checks ``server.restricted_paths``.

Restricted paths match the instance document's keys exactly, as IMDS route filtering does, so
``compute/userdata`` (wrong case) protects nothing. :func:`restricted_path_problem` walks a
path through the instance model (:class:`imdsd.model.Instance`, by its camelCase JSON names)
and says why it can match nothing:

- an object's key must be one of its fields, case-sensitively (a case-insensitive match is
  suggested);
- a list is entered by an index (``network/interface/0/ipv4``, ``compute/tagsList/0/value``):
  a name there (``compute/tagsList/env``) matches nothing; restrict ``compute/tagsList`` and
  ``compute/tags`` to hide tags;
- a plain value (a string such as ``compute/tags``, which holds every tag in one string) has
  nothing below it;
- below a free-form object (``encryptionSettings``) any key may exist.

A key the model does not know may still be sent by a newer IMDS, so this is a warning (at
start, on reload and in ``imdsd check-config``), not an error.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from imdsd.model import Instance

_Type = msgspec.inspect.Type


def _concrete(info: _Type) -> _Type:
    """The type behind ``T | None`` (a struct or list is preferred in a wider union)."""
    if isinstance(info, msgspec.inspect.UnionType):
        options = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        for option in options:
            if isinstance(option, msgspec.inspect.StructType | msgspec.inspect.ListType):
                return option
        return options[0] if options else info
    return info


def restricted_path_problem(path: str) -> str | None:
    """Why ``path`` (like ``compute/userData``) can match no instance key, or None if it can."""
    segments = [s for s in path.split("/") if s]
    info: _Type = _concrete(msgspec.inspect.type_info(Instance))
    walked: list[str] = []
    for segment in segments:
        here = "/".join(walked) or "the instance document"
        if isinstance(info, msgspec.inspect.StructType):
            names = {field.encode_name: field.type for field in info.fields}
            if segment not in names:
                return _unknown_key(path, here, walked, segment, sorted(names))
            info = _concrete(names[segment])
        elif isinstance(info, msgspec.inspect.ListType):
            if not segment.isdigit():
                return (
                    f"restricted path {path!r}: {here} is a list, entered by an index like "
                    f"{here}/0; {segment!r} matches nothing, so the path protects nothing"
                )
            info = _concrete(info.item_type)
        elif isinstance(info, msgspec.inspect.DictType | msgspec.inspect.AnyType):
            return None  # free-form: any key may be there
        else:
            return (
                f"restricted path {path!r}: {here} is a plain value with no keys below it, "
                f"so the path protects nothing (restrict {here} itself)"
            )
        walked.append(segment)
    return None


def _unknown_key(path: str, here: str, walked: list[str], segment: str, known: list[str]) -> str:
    prefix = "/".join([*walked, ""])
    folded = [name for name in known if name.lower() == segment.lower()]
    if folded:
        hint = f"did you mean {prefix + folded[0]!r}? keys are case-sensitive"
    else:
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        hint = f"keys of {here}: {shown}"
    return (
        f"restricted path {path!r} names no IMDS instance key imdsd knows ({hint}); "
        "it protects nothing unless a newer IMDS sends that key"
    )


def restricted_path_problems(paths: Iterable[str]) -> list[str]:
    """One message per path of ``paths`` that can match no instance key."""
    return [problem for path in paths if (problem := restricted_path_problem(path)) is not None]
