"""The configuration's rule walker (sans-IO): typed structs from TOML tables, with errors.

Each field of a configuration struct carries its default and, through ``Annotated``, a
:class:`Rule` that checks and converts its TOML value and renders it back. :func:`build`
walks a TOML table against a struct, so every error names the dotted key
(``imds.max_requests_per_second``, ``hook[0].timeout``) and the bad value.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, get_args, get_origin

import msgspec

from imdsd.durations import format_duration, parse_duration
from imdsd.tomlwriter import toml_str, toml_value

NO_VALUE: Any = object()


class Invalid(ValueError):
    """Raised while checking: what is wrong, and (when known) the key and the bad value.

    Rules raise it with only ``problem`` (or with a ``key`` suffix like ``[2]`` and the bad
    item); the walker fills in the full key and the value.
    """

    def __init__(self, problem: str, key: str = "", value: Any = NO_VALUE) -> None:
        super().__init__(problem)
        self.problem = problem
        self.key = key
        self.value = value

    def message(self) -> str:
        """``key = value: problem``, or ``key: problem`` when there is no value."""
        if self.value is NO_VALUE:
            return f"{self.key}: {self.problem}"
        return f"{self.key} = {show(self.value)}: {self.problem}"


def show(value: object, limit: int = 60) -> str:
    """The value as the user would have written it, shortened to keep messages one line."""
    text = toml_value(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Rule:
    """Checks a TOML value and converts it to its typed form; renders the typed form back."""

    def parse(self, value: object) -> Any:
        raise NotImplementedError

    def render(self, value: Any) -> str:
        return toml_value(value)


class Str(Rule):
    """A string, optionally one of ``choices`` or passed through a checking function."""

    def __init__(
        self, choices: tuple[str, ...] = (), check: Callable[[str], str] | None = None
    ) -> None:
        self.choices = choices
        self.check = check

    def parse(self, value: object) -> str:
        if not isinstance(value, str):
            raise Invalid("expected a string")
        if self.choices and value not in self.choices:
            raise Invalid(f"expected one of {', '.join(self.choices)}")
        return self.check(value) if self.check else value


class Float(Rule):
    """A finite number (TOML integer or float) within ``gt`` < value <= ``le``."""

    def __init__(self, gt: float, le: float) -> None:
        self.gt = gt
        self.le = le

    def parse(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid("expected a number")
        if not (math.isfinite(value) and self.gt < value <= self.le):
            raise Invalid(f"must be > {self.gt:g} and <= {self.le:g}")
        return float(value)


class Int(Rule):
    """An integer (not a boolean) within ``ge`` <= value <= ``le``."""

    def __init__(self, ge: int, le: int | None = None) -> None:
        self.ge = ge
        self.le = le

    def parse(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid("expected an integer")
        if value < self.ge:
            raise Invalid(f"must be >= {self.ge}")
        if self.le is not None and value > self.le:
            raise Invalid(f"must be <= {self.le}")
        return value


class Duration(Rule):
    """A duration string; ``positive`` requires > 0 (else 0 is allowed), ``floor`` a minimum."""

    def __init__(
        self, positive: bool = True, floor: float = 0.0, ceiling: float | None = None
    ) -> None:
        self.positive = positive
        self.floor = floor
        self.ceiling = ceiling

    def parse(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, str):
            hint = f' like "{value}s"' if isinstance(value, int | float) else ""
            raise Invalid(f"expected a duration string{hint}")
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise Invalid(f"invalid duration: {exc}") from None
        if self.positive and seconds <= 0:
            raise Invalid("must be greater than 0s")
        if seconds < self.floor:
            raise Invalid(f"must be at least {format_duration(self.floor)}")
        if self.ceiling is not None and seconds > self.ceiling:
            raise Invalid(f"must be at most {format_duration(self.ceiling)}")
        return seconds

    def render(self, value: Any) -> str:
        return toml_str(format_duration(value))


class Bool(Rule):
    """A TOML boolean."""

    def parse(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise Invalid("expected true or false")
        return value

    def render(self, value: Any) -> str:
        return "true" if value else "false"


class Mode(Rule):
    """A file mode as an octal string like ``"0660"``."""

    def parse(self, value: object) -> int:
        if not isinstance(value, str) or not re.fullmatch(r"[0-7]{3,4}", value):
            raise Invalid('expected an octal mode string like "0660"')
        return int(value, 8)

    def render(self, value: Any) -> str:
        return toml_str(f"{value:04o}")


class List(Rule):
    """An array whose items follow ``item``; optionally non-empty and without duplicates."""

    def __init__(self, item: Rule, non_empty: bool = False, unique: bool = False) -> None:
        self.item = item
        self.non_empty = non_empty
        self.unique = unique

    def parse(self, value: object) -> list[Any]:
        if not isinstance(value, list):
            raise Invalid("expected an array")
        if self.non_empty and not value:
            raise Invalid("must not be empty")
        out: list[Any] = []
        for index, item in enumerate(value):
            try:
                parsed = self.item.parse(item)
            except Invalid as exc:
                raise Invalid(exc.problem, f"[{index}]", item) from None
            if self.unique and parsed in out:
                raise Invalid("duplicate item", f"[{index}]", item)
            out.append(parsed)
        return out

    def render(self, value: Any) -> str:
        return "[" + ", ".join(self.item.render(v) for v in value) + "]"


def struct_of(tp: Any) -> type[msgspec.Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def rule_of(tp: Any) -> Rule | None:
    if get_origin(tp) is Annotated:
        return next((m for m in get_args(tp)[1:] if isinstance(m, Rule)), None)
    return None


def build(cls: type[msgspec.Struct], table: Mapping[str, Any], path: str) -> Any:
    """Build ``cls`` from a TOML table, raising ``Invalid`` with the dotted key."""
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    for key, value in table.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise Invalid(f"unknown key{hint}", f"{path}{key}", value)
    values: dict[str, Any] = {}
    for name, info in fields.items():
        key = f"{path}{name}"
        if name not in table:
            if info.required:
                raise Invalid("required key is missing", key)
            continue
        value = table[name]
        sub = struct_of(info.type)
        if sub is not None:
            if not isinstance(value, dict):
                raise Invalid(f"expected a table ([{key}])", key, value)
            values[name] = build(sub, value, f"{key}.")
        elif get_origin(info.type) is list and struct_of(get_args(info.type)[0]):
            values[name] = build_list(get_args(info.type)[0], value, key)
        else:
            rule = rule_of(info.type)
            assert rule is not None, f"no rule for {cls.__name__}.{name}"
            try:
                values[name] = rule.parse(value)
            except Invalid as exc:
                bad = value if exc.value is NO_VALUE else exc.value
                raise Invalid(exc.problem, key + exc.key, bad) from None
    return cls(**values)


def build_list(cls: type[msgspec.Struct], value: object, key: str) -> list[Any]:
    """Build an array of tables (``[[hook]]``); entries must have unique names."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise Invalid(f"expected an array of tables ([[{key}]])", key, value)
    out = [build(cls, entry, f"{key}[{i}].") for i, entry in enumerate(value)]
    seen: dict[str, int] = {}
    for index, entry in enumerate(out):
        name = getattr(entry, "name", None)
        if isinstance(name, str):
            if name in seen:
                raise Invalid(
                    f"duplicate name (also {key}[{seen[name]}])", f"{key}[{index}].name", name
                )
            seen[name] = index
    return out


def render_table(obj: msgspec.Struct) -> list[str]:
    lines = []
    for info in msgspec.structs.fields(obj):
        rule = rule_of(info.type)
        assert rule is not None
        lines.append(f"{info.name} = {rule.render(getattr(obj, info.name))}")
    return lines
