"""Scenario files (sans-IO): a TOML timeline of changes to the emulated VM.

```toml
name = "demo"                       # optional
description = "what it shows"       # optional

[[step]]
at = "5s"                           # time since the emulator started: "500ms", "1m30s", 5
set_tag = { name = "env", value = "prod" }
```

Each step has ``at`` and exactly one action (its value is a table of parameters):

| action | parameters (``?`` = optional) |
|---|---|
| ``set_tag`` / ``remove_tag`` | ``name``, ``value`` / ``name`` |
| ``attach_disk`` / ``detach_disk`` / ``resize_disk`` | ``lun``, ``size_gb``, ``name?`` / ``lun`` / ``lun``, ``size_gb`` |
| ``add_nic`` / ``remove_nic`` | ``mac``, ``private_ip``, ``prefix?``, ``public_ip?`` / ``mac`` |
| ``reorder_nics`` | ``order?`` (list of MACs; default: reverse); ``reorder_nics = true`` works too |
| ``add_event`` | ``id``, ``type``, ``not_before?``, ``resources?``, ``description?``, ``source?``, ``duration?``, ``status?`` |
| ``start_event`` / ``remove_event`` | ``id`` |
| ``patch_instance`` | a JSON merge patch of the instance document, as a table |
| ``fault`` | a fault spec, as for ``POST /_emulator/faults`` |

Steps run in ``at`` order (ties keep file order). Errors name the file, the step (1-based,
in file order), the action and the key. :func:`dry_run` additionally plays the timeline on a
copy of the initial state so that e.g. detaching a disk that is not there is caught at load.
"""  # noqa: E501

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from imdsd.durations import format_duration, parse_duration
from imdsd.emulator.faults import FaultError, parse_fault
from imdsd.emulator.state import StateError, VMState

DEMO_SCENARIO = "demo-scenario.toml"

_STR = "a string"
_INT = "an integer"
_STRS = "a list of strings"
_TYPES: Mapping[str, Callable[[Any], bool]] = {
    _STR: lambda v: isinstance(v, str),
    _INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    _STRS: lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
}


@dataclass(frozen=True)
class _Spec:
    required: Mapping[str, str]
    optional: Mapping[str, str]


ACTIONS: Mapping[str, _Spec] = {
    "set_tag": _Spec({"name": _STR, "value": _STR}, {}),
    "remove_tag": _Spec({"name": _STR}, {}),
    "attach_disk": _Spec({"lun": _INT, "size_gb": _INT}, {"name": _STR}),
    "detach_disk": _Spec({"lun": _INT}, {}),
    "resize_disk": _Spec({"lun": _INT, "size_gb": _INT}, {}),
    "add_nic": _Spec({"mac": _STR, "private_ip": _STR}, {"prefix": _INT, "public_ip": _STR}),
    "remove_nic": _Spec({"mac": _STR}, {}),
    "reorder_nics": _Spec({}, {"order": _STRS}),
    "add_event": _Spec(
        {"id": _STR, "type": _STR},
        {
            "not_before": _STR,
            "resources": _STRS,
            "description": _STR,
            "source": _STR,
            "duration": _INT,
            "status": _STR,
        },
    ),
    "start_event": _Spec({"id": _STR}, {}),
    "remove_event": _Spec({"id": _STR}, {}),
}
FREE_FORM_ACTIONS = ("patch_instance", "fault")
ACTION_NAMES = (*ACTIONS, *FREE_FORM_ACTIONS)


class ScenarioError(ValueError):
    """A scenario file is malformed or one of its steps cannot be applied."""


class ParamError(ValueError):
    """The parameters of one action are malformed (the message names the key)."""


@dataclass(frozen=True)
class Step:
    """One timeline entry: ``index`` (1-based, file order), ``at`` seconds, one action."""

    index: int
    at: float
    action: str
    params: dict[str, Any]

    def where(self) -> str:
        """``step 3 (at 5s)``, for messages."""
        return f"step {self.index} (at {format_duration(self.at)})"


@dataclass(frozen=True)
class Scenario:
    """A validated timeline, steps sorted by ``at``."""

    source: str
    name: str
    description: str
    steps: tuple[Step, ...]

    @property
    def duration(self) -> float:
        """When the last step runs (0 for an empty scenario)."""
        return self.steps[-1].at if self.steps else 0.0


def check_params(action: str, params: Any) -> dict[str, Any]:
    """Validate the parameters of ``action``; returns them as a dict. Raises ParamError."""
    if action == "reorder_nics" and params is True:
        params = {}
    if action == "fault":
        try:
            parse_fault(params)
        except FaultError as exc:
            raise ParamError(str(exc)) from None
        return dict(params)
    if not isinstance(params, dict):
        raise ParamError(f"takes a table of parameters, got {params!r}")
    if action == "patch_instance":
        return dict(params)
    spec = ACTIONS.get(action)
    if spec is None:
        raise ParamError(f"unknown action; known actions: {', '.join(ACTION_NAMES)}")
    for key in spec.required:
        if key not in params:
            raise ParamError(f"missing key {key!r}")
    for key, value in params.items():
        kind = spec.required.get(key) or spec.optional.get(key)
        if kind is None:
            known = ", ".join([*spec.required, *spec.optional]) or "none"
            raise ParamError(f"unknown key {key!r} (keys: {known})")
        if not _TYPES[kind](value):
            raise ParamError(f"{key} must be {kind}, got {value!r}")
    return dict(params)


def apply_action(state: VMState, action: str, params: dict[str, Any], *, now_wall: float) -> None:
    """Apply one (validated) action to ``state``; raises StateError or FaultError."""
    p = params
    match action:
        case "set_tag":
            state.set_tag(p["name"], p["value"])
        case "remove_tag":
            state.remove_tag(p["name"])
        case "attach_disk":
            state.attach_disk(p["lun"], p["size_gb"], p.get("name"))
        case "detach_disk":
            state.detach_disk(p["lun"])
        case "resize_disk":
            state.resize_disk(p["lun"], p["size_gb"])
        case "add_nic":
            state.add_nic(p["mac"], p["private_ip"], p.get("prefix", 24), p.get("public_ip", ""))
        case "remove_nic":
            state.remove_nic(p["mac"])
        case "reorder_nics":
            state.reorder_nics(p.get("order"))
        case "add_event":
            state.add_event(
                p["id"],
                p["type"],
                now_wall=now_wall,
                not_before=p.get("not_before"),
                resources=p.get("resources"),
                description=p.get("description", ""),
                source=p.get("source", "Platform"),
                duration=p.get("duration", -1),
                status=p.get("status", "Scheduled"),
            )
        case "start_event":
            state.start_event(p["id"])
        case "remove_event":
            state.remove_event(p["id"])
        case "patch_instance":
            state.patch_instance(p)
        case "fault":
            state.faults.add(parse_fault(p))
        case _:
            raise StateError(f"unknown action {action!r}")


def _at(value: Any) -> float:
    if isinstance(value, bool):
        raise ParamError(f'at must be a duration like "5s", got {value!r}')
    if isinstance(value, int | float):
        if value < 0:
            raise ParamError(f"at must not be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ParamError(f"at {value!r}: {exc}") from None
    raise ParamError(f'at must be a duration like "5s", got {value!r}')


def _parse_step(index: int, raw: Any) -> Step:
    where = f"step {index}"
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be a table")
    if "at" not in raw:
        raise ScenarioError(f"{where}: missing key 'at'")
    try:
        at = _at(raw["at"])
    except ParamError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    where = f"step {index} (at {format_duration(at)})"
    actions = [key for key in raw if key != "at"]
    if len(actions) != 1:
        found = ", ".join(actions) or "none"
        raise ScenarioError(
            f"{where}: needs exactly one action ({', '.join(ACTION_NAMES)}), found {found}"
        )
    action = actions[0]
    try:
        params = check_params(action, raw[action])
    except ParamError as exc:
        raise ScenarioError(f"{where}: {action}: {exc}") from None
    return Step(index, at, action, params)


def _parse_document(doc: dict[str, Any]) -> tuple[str, str, list[Step]]:
    unknown = sorted(set(doc) - {"name", "description", "step"})
    if unknown:
        raise ScenarioError(f"unknown key {unknown[0]!r} (keys: name, description, step)")
    for key in ("name", "description"):
        if not isinstance(doc.get(key, ""), str):
            raise ScenarioError(f"{key} must be a string, got {doc[key]!r}")
    raw_steps = doc.get("step", [])
    if not isinstance(raw_steps, list):
        raise ScenarioError("step must be an array of tables ([[step]])")
    steps = [_parse_step(index, raw) for index, raw in enumerate(raw_steps, 1)]
    steps.sort(key=lambda step: step.at)
    return doc.get("name", ""), doc.get("description", ""), steps


def parse_scenario(text: str, source: str) -> Scenario:
    """Parse and validate a scenario; :class:`ScenarioError` messages start with ``source``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: invalid TOML: {exc}") from None
    try:
        name, description, steps = _parse_document(doc)
    except ScenarioError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    return Scenario(source, name, description, tuple(steps))


def load_scenario(path: str) -> Scenario:
    """Read and validate the scenario file at ``path``."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read scenario: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not UTF-8 text") from None
    return parse_scenario(text, path)


def demo_text() -> str:
    """The text of the demo scenario shipped in the package."""
    return (resources.files("imdsd.emulator") / "data" / DEMO_SCENARIO).read_text("utf-8")


def demo_scenario() -> Scenario:
    """The demo scenario shipped in the package (a copy lives in conf/scenario-demo.toml)."""
    return parse_scenario(demo_text(), f"<package>/{DEMO_SCENARIO}")


def dry_run(scenario: Scenario, state: VMState, *, now_wall: float = 0.0) -> None:
    """Play every step on a copy of ``state``; ScenarioError names the first failing step."""
    trial = VMState(copy.deepcopy(state.instance), state.loadbalancer)
    trial.scheduled.events = copy.deepcopy(state.events)
    for step in scenario.steps:
        try:
            apply_action(trial, step.action, step.params, now_wall=now_wall + step.at)
        except (StateError, FaultError) as exc:
            raise ScenarioError(
                f"{scenario.source}: {step.where()}: {step.action}: {exc}"
            ) from None
