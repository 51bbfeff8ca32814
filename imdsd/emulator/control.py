"""The emulator's control API under ``/_emulator/`` (sans-IO): change the VM while it runs.

Never rate limited, never counted in the statistics, never hit by faults. Bodies are JSON;
answers are JSON; errors are ``{"error": ...}`` with 400 (bad input), 404 (unknown thing or
path), 405 (wrong method, with ``Allow``) or 409 (conflict).

| method and path | does |
|---|---|
| ``GET /_emulator/state`` | instance, scheduled events, load balancer, faults, rules, scenario |
| ``PUT /_emulator/instance`` | replace the instance document (any JSON object) |
| ``PATCH /_emulator/instance`` | RFC 7396 merge patch of the instance document |
| ``PUT /_emulator/loadbalancer`` | replace the LB document; ``null`` or no body = no LB (404) |
| ``DELETE /_emulator/loadbalancer`` | no LB: ``/metadata/loadbalancer`` answers 404 |
| ``POST /_emulator/scheduled-events`` | add an event: ``EventType`` and optionally ``EventId``, ``NotBefore``, ``Resources``, ``Description``, ``EventSource``, ``DurationInSeconds``, ``EventStatus`` |
| ``POST /_emulator/scheduled-events/<id>/start`` | start an event |
| ``DELETE /_emulator/scheduled-events/<id>`` | remove an event (finished) |
| ``POST /_emulator/faults`` | queue a fault spec or a list of them (see :mod:`.faults`) |
| ``DELETE /_emulator/faults`` | drop every queued fault |
| ``GET /_emulator/stats`` | counts by path and status, peak requests per second |
| ``DELETE /_emulator/stats``, ``POST /_emulator/reset-stats`` | zero the statistics |
| ``GET``/``POST /_emulator/rules`` | show / switch rules (see :meth:`.RequestRules.configure`) |
| ``GET``/``PUT /_emulator/identities`` | the VM's managed identities (see :mod:`.identity`) |
| ``POST /_emulator/actions`` | run a scenario action: ``{"action": "set_tag", "name": ..., ...}`` |
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from imdsd.emulator.endpoints import Answer, error_answer, json_answer
from imdsd.emulator.faults import FaultError, parse_fault
from imdsd.emulator.identity import IdentityConfigError
from imdsd.emulator.rules import RequestRules, RuleError
from imdsd.emulator.scenario import ParamError, apply_action, check_params
from imdsd.emulator.state import StateError, VMState
from imdsd.emulator.stats import Stats
from imdsd.filtering import split_path

PREFIX = "/_emulator"
_EVENT_KEYS = {
    "EventId": "event_id",
    "EventType": "event_type",
    "NotBefore": "not_before",
    "Resources": "resources",
    "Description": "description",
    "EventSource": "source",
    "DurationInSeconds": "duration",
    "EventStatus": "status",
}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_control_path(path: str) -> bool:
    """True for paths of the control API."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def _json_body(body: bytes) -> Any:
    if not body:
        raise _BadRequest(400, "a JSON body is required")
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise _BadRequest(400, f"the body is not valid JSON: {exc}") from None


class Control:
    """Serves the control API for one emulator.

    ``new_id`` makes an EventId when none is given; ``scenario_info`` reports the scenario's
    progress for ``GET /_emulator/state``.
    """

    def __init__(
        self,
        state: VMState,
        rules: RequestRules,
        *,
        new_id: Callable[[], str],
        scenario_info: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.state = state
        self.rules = rules
        self.new_id = new_id
        self.scenario_info = scenario_info

    def handle(self, method: str, path: str, body: bytes, *, now_wall: float) -> Answer:
        """Answer one control request."""
        parts = split_path(path)[1:]
        try:
            return self._route(method, parts, body, now_wall)
        except _BadRequest as exc:
            return error_answer(exc.status, str(exc))
        except (StateError, RuleError, FaultError, ParamError, IdentityConfigError) as exc:
            return error_answer(getattr(exc, "status", 400), str(exc))

    def _route(self, method: str, parts: list[str], body: bytes, now_wall: float) -> Answer:
        match parts:
            case ["state"]:
                self._allow(method, "GET")
                return json_answer(200, self._state())
            case ["instance"]:
                self._allow(method, "PUT", "PATCH")
                if method == "PUT":
                    self.state.replace_instance(_json_body(body))
                else:
                    self.state.patch_instance(_json_body(body))
                return json_answer(200, self.state.instance)
            case ["loadbalancer"]:
                self._allow(method, "PUT", "DELETE")
                document = _json_body(body) if method == "PUT" and body else None
                self.state.set_loadbalancer(document)
                return json_answer(200, {"loadbalancer": self.state.loadbalancer})
            case ["scheduled-events"]:
                self._allow(method, "POST")
                return json_answer(201, self._add_event(_json_body(body), now_wall))
            case ["scheduled-events", event_id]:
                self._allow(method, "DELETE")
                self.state.remove_event(event_id)
                return json_answer(200, self.state.scheduled_events())
            case ["scheduled-events", event_id, "start"]:
                self._allow(method, "POST")
                self.state.start_event(event_id)
                return json_answer(200, self.state.scheduled_events())
            case ["faults"]:
                self._allow(method, "POST", "DELETE")
                if method == "DELETE":
                    return json_answer(200, {"cleared": self.state.faults.clear()})
                specs = _json_body(body)
                faults = [
                    parse_fault(spec) for spec in (specs if isinstance(specs, list) else [specs])
                ]
                for fault in faults:
                    self.state.faults.add(fault)
                return json_answer(201, {"faults": self.state.faults.pending()})
            case ["stats"]:
                self._allow(method, "GET", "DELETE")
                if method == "DELETE":
                    self.state.stats = Stats()
                return json_answer(200, self.state.stats.as_dict())
            case ["reset-stats"]:
                self._allow(method, "POST")
                self.state.stats = Stats()
                return json_answer(200, self.state.stats.as_dict())
            case ["rules"]:
                self._allow(method, "GET", "POST")
                if method == "POST":
                    self.rules.configure(_json_body(body))
                return json_answer(200, self.rules.describe())
            case ["identities"]:
                self._allow(method, "GET", "PUT")
                if method == "PUT":
                    self.state.identities.replace(_json_body(body))
                return json_answer(200, self.state.identities.as_dict())
            case ["actions"]:
                self._allow(method, "POST")
                return self._action(_json_body(body), now_wall)
        raise _BadRequest(404, f"no control endpoint {PREFIX}/{'/'.join(parts)}")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise _BadRequest(405, f"method {method} not allowed here; use {', '.join(allowed)}")

    def _state(self) -> dict[str, Any]:
        snapshot = self.state.snapshot()
        snapshot["profile"] = self.rules.profile.name
        snapshot["rules"] = self.rules.describe()
        snapshot["scenario"] = self.scenario_info()
        return snapshot

    def _add_event(self, spec: Any, now_wall: float) -> dict[str, Any]:
        if not isinstance(spec, dict):
            raise _BadRequest(400, "an event must be an object")
        unknown = sorted(set(spec) - set(_EVENT_KEYS))
        if unknown:
            known = ", ".join(_EVENT_KEYS)
            raise _BadRequest(400, f"unknown event key {unknown[0]!r}; known: {known}")
        if "EventType" not in spec:
            raise _BadRequest(400, "missing key 'EventType'")
        args = {_EVENT_KEYS[key]: value for key, value in spec.items()}
        event_id = args.pop("event_id", None) or self.new_id()
        event_type = args.pop("event_type")
        return self.state.add_event(event_id, event_type, now_wall=now_wall, **args)

    def _action(self, spec: Any, now_wall: float) -> Answer:
        if not isinstance(spec, dict) or not isinstance(spec.get("action"), str):
            raise _BadRequest(400, 'an action must be an object with "action": "<name>"')
        params = {key: value for key, value in spec.items() if key != "action"}
        action = spec["action"]
        try:
            checked = check_params(action, params)
        except ParamError as exc:
            raise _BadRequest(400, f"{action}: {exc}") from None
        apply_action(self.state, action, checked, now_wall=now_wall)
        return json_answer(200, self._state())
