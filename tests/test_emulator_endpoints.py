"""Sans-IO tests of the emulated endpoints and the control API (endpoints.py, control.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from imdsd.emulator.control import Control, is_control_path
from imdsd.emulator.endpoints import Answer, answer_imds
from imdsd.emulator.events import rfc1123
from imdsd.emulator.profiles import AZURE, AZURESTACK, Profile
from imdsd.emulator.rules import RequestRules
from imdsd.emulator.state import VMState
from imdsd.model import decode_loadbalancer, decode_scheduled_events, decode_versions

MD = [("Metadata", "true")]
NOW_WALL = 1_700_000_000.0


class Vm:
    """A state, its rules and its control API, without any I/O."""

    def __init__(self, profile: Profile = AZURE) -> None:
        self.state = VMState(profile.default_instance(), profile.default_loadbalancer())
        self.rules = RequestRules(profile, rate_limit=0)
        ids = iter(f"ID-{n}" for n in range(1, 100))
        self.control = Control(self.state, self.rules, new_id=lambda: next(ids))

    def get(self, target: str, *, method: str = "GET", body: bytes = b"") -> Answer:
        return answer_imds(
            self.state,
            self.rules,
            method=method,
            target=target,
            headers=MD,
            body=body,
            now=0.0,
            now_wall=NOW_WALL,
        )

    def ctl(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raw = (
            b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        )
        answer = self.control.handle(method, path, raw, now_wall=NOW_WALL)
        return answer.status, json.loads(answer.body)


def doc(answer: Answer) -> Any:
    assert answer.content_type == "application/json; charset=utf-8"
    return json.loads(answer.body)


# ------------------------------------------------------------------------------ IMDS


def test_versions() -> None:
    answer = Vm().get("/metadata/versions")
    assert answer.status == 200
    assert decode_versions(answer.body).api_versions[-1] == "2023-11-15"
    stack = Vm(AZURESTACK).get("/metadata/versions")
    assert doc(stack)["apiVersions"][-1] == "2021-05-01"


def test_instance_json_filtered_and_text() -> None:
    vm = Vm()
    whole = doc(vm.get("/metadata/instance?api-version=2023-11-15"))
    assert whole == vm.state.instance
    nic = doc(vm.get("/metadata/instance/network/interface/0?api-version=2021-02-01"))
    assert nic["macAddress"] == "0011AAFFBB22"
    text = vm.get("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text")
    assert (text.status, text.body) == (200, b"02aab8a4-74ef-476e-8182-f6d2ba4166a6")
    assert text.content_type == "text/plain; charset=utf-8"
    root = vm.get("/metadata/instance?api-version=2021-02-01&format=text")
    assert root.body == b"compute/\nnetwork/"


def test_instance_leaf_json_and_bad_format_are_400() -> None:
    vm = Vm()
    for target in (
        "/metadata/instance/compute/vmId?api-version=2021-02-01",
        "/metadata/instance/compute/vmId?api-version=2021-02-01&format=json",
    ):
        answer = vm.get(target)
        assert answer.status == 400
        assert "format=text" in doc(answer)["error"]
    bad = vm.get("/metadata/instance?api-version=2021-02-01&format=xml")
    assert bad.status == 400


def test_instance_missing_route_is_404() -> None:
    answer = Vm().get("/metadata/instance/compute/nope?api-version=2021-02-01")
    assert answer.status == 404
    assert doc(answer) == {"error": "no key 'nope' under /compute"}


def test_instance_is_shaped_by_api_version() -> None:
    vm = Vm()
    old = vm.get("/metadata/instance/compute/tagsList?api-version=2019-06-01")
    assert old.status == 404
    assert doc(vm.get("/metadata/instance/compute/tagsList?api-version=2019-06-04"))[0] == {
        "name": "baz",
        "value": "bash",
    }


def test_azurestack_instance_fields() -> None:
    vm = Vm(AZURESTACK)
    compute = doc(vm.get("/metadata/instance/compute?api-version=2021-05-01"))
    assert compute["azEnvironment"] == "AzureStack"
    assert (compute["customData"], compute["zone"]) == ("", "")
    assert compute["plan"] == {"name": "", "product": "", "publisher": ""}


def test_scheduled_events_get_and_approve() -> None:
    vm = Vm()
    vm.state.add_event("E1", "Reboot", now_wall=NOW_WALL)
    target = "/metadata/scheduledevents?api-version=2020-07-01"
    events = decode_scheduled_events(vm.get(target).body)
    assert events.document_incarnation == 2
    assert events.events[0].not_before == rfc1123(NOW_WALL + 900)
    body = json.dumps({"StartRequests": [{"EventId": "E1"}]}).encode()
    approved = vm.get(target, method="POST", body=body)
    assert (approved.status, approved.body) == (200, b"")
    started = doc(vm.get(target))
    assert started["Events"][0]["EventStatus"] == "Started"
    assert started["DocumentIncarnation"] == 3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b"", "StartRequests"),
        (b'{"StartRequests": [{"EventId": "nope"}]}', "unknown EventId 'nope'"),
    ],
)
def test_scheduled_events_bad_approvals(body: bytes, message: str) -> None:
    answer = Vm().get("/metadata/scheduledevents?api-version=2020-07-01", method="POST", body=body)
    assert answer.status == 400
    assert message in doc(answer)["error"]


def test_scheduled_events_older_version_lacks_newer_fields() -> None:
    vm = Vm()
    vm.state.add_event("E1", "Reboot", now_wall=NOW_WALL)
    event = doc(vm.get("/metadata/scheduledevents?api-version=2017-11-01"))["Events"][0]
    assert "EventSource" not in event
    assert "DurationInSeconds" not in event


def test_due_events_start_when_served() -> None:
    vm = Vm()
    vm.state.add_event("E1", "Preempt", now_wall=NOW_WALL - 31)
    event = doc(vm.get("/metadata/scheduledevents?api-version=2020-07-01"))["Events"][0]
    assert event["EventStatus"] == "Started"


def test_loadbalancer_present_and_absent() -> None:
    vm = Vm()
    answer = vm.get("/metadata/loadbalancer?api-version=2020-10-01")
    assert decode_loadbalancer(answer.body).loadbalancer.inbound_rules[0].frontend_port == 443
    vm.state.set_loadbalancer(None)
    assert vm.get("/metadata/loadbalancer?api-version=2020-10-01").status == 404


def test_attested_nonce() -> None:
    vm = Vm()
    answer = vm.get("/metadata/attested/document?api-version=2020-09-01&nonce=1234567890")
    assert doc(answer)["encoding"] == "pkcs7"
    der = base64.b64decode(doc(answer)["signature"])
    assert b'"nonce":"1234567890"' in der
    assert b'"licenseType"' in der
    default = vm.get("/metadata/attested/document?api-version=2019-02-01")
    der = base64.b64decode(doc(default)["signature"])
    assert b'"nonce":"20231114-221320"' in der
    assert b'"licenseType"' not in der


def test_identity_token() -> None:
    vm = Vm()
    base = "/metadata/identity/oauth2/token?api-version=2018-02-01"
    answer = vm.get(base + "&resource=https%3A%2F%2Fvault.azure.net")
    assert doc(answer)["resource"] == "https://vault.azure.net"
    missing = vm.get(base)
    assert missing.status == 400
    assert doc(missing)["error"] == "invalid_request"


def test_rejections_become_json_answers_with_headers() -> None:
    answer = Vm().get("/metadata/instance?api-version=2021-02-01", method="PUT")
    assert answer.status == 405
    assert (b"allow", b"GET") in answer.header_list()


# ------------------------------------------------------------------------------ control


def test_is_control_path() -> None:
    assert is_control_path("/_emulator/state")
    assert is_control_path("/_emulator")
    assert not is_control_path("/_emulatorx")
    assert not is_control_path("/metadata/instance")


def test_control_state() -> None:
    status, state = Vm().ctl("GET", "/_emulator/state")
    assert status == 200
    assert set(state) == {
        "instance",
        "scheduled_events",
        "loadbalancer",
        "faults",
        "identities",
        "profile",
        "rules",
        "scenario",
    }
    assert state["profile"] == "azure"


def test_control_put_and_patch_instance() -> None:
    vm = Vm()
    status, body = vm.ctl("PUT", "/_emulator/instance", {"compute": {"name": "x"}})
    assert (status, body) == (200, {"compute": {"name": "x"}})
    status, body = vm.ctl("PATCH", "/_emulator/instance", {"compute": {"vmSize": "y"}})
    assert body == {"compute": {"name": "x", "vmSize": "y"}}
    assert vm.ctl("PUT", "/_emulator/instance", [1])[0] == 400
    assert vm.ctl("PUT", "/_emulator/instance", b"{nope")[1]["error"].startswith(
        "the body is not valid JSON"
    )
    assert vm.ctl("PUT", "/_emulator/instance")[1] == {"error": "a JSON body is required"}


def test_control_loadbalancer() -> None:
    vm = Vm()
    assert vm.ctl("PUT", "/_emulator/loadbalancer", b"null") == (200, {"loadbalancer": None})
    assert vm.state.loadbalancer is None
    assert vm.ctl("PUT", "/_emulator/loadbalancer", {"loadbalancer": {}})[0] == 200
    assert vm.state.loadbalancer == {"loadbalancer": {}}
    assert vm.ctl("PUT", "/_emulator/loadbalancer")[0] == 200  # no body: no LB either
    assert vm.state.loadbalancer is None
    vm.state.set_loadbalancer({"loadbalancer": {}})
    assert vm.ctl("DELETE", "/_emulator/loadbalancer") == (200, {"loadbalancer": None})
    assert vm.ctl("PUT", "/_emulator/loadbalancer", [1])[0] == 400


def test_control_scheduled_events() -> None:
    vm = Vm()
    status, event = vm.ctl("POST", "/_emulator/scheduled-events", {"EventType": "Freeze"})
    assert status == 201
    assert event["EventId"] == "ID-1"
    assert event["NotBefore"] == rfc1123(NOW_WALL + 900)
    status, event = vm.ctl(
        "POST",
        "/_emulator/scheduled-events",
        {"EventId": "X", "EventType": "Reboot", "EventSource": "User", "DurationInSeconds": 5},
    )
    assert (event["EventSource"], event["DurationInSeconds"]) == ("User", 5)
    status, doc_ = vm.ctl("POST", "/_emulator/scheduled-events/X/start")
    assert doc_["Events"][1]["EventStatus"] == "Started"
    status, doc_ = vm.ctl("DELETE", "/_emulator/scheduled-events/X")
    assert [e["EventId"] for e in doc_["Events"]] == ["ID-1"]
    assert vm.ctl("DELETE", "/_emulator/scheduled-events/X")[0] == 404
    add = "/_emulator/scheduled-events"
    assert vm.ctl("POST", add, {"EventId": "ID-1", "EventType": "Reboot"})[0] == 409
    assert "missing key 'EventType'" in vm.ctl("POST", add, {})[1]["error"]
    colour = vm.ctl("POST", add, {"EventType": "Reboot", "Colour": 1})[1]["error"]
    assert "unknown event key 'Colour'" in colour
    assert vm.ctl("POST", "/_emulator/scheduled-events", [1])[0] == 400
    assert vm.ctl("POST", "/_emulator/scheduled-events", {"EventType": "Nope"})[0] == 400


def test_control_faults() -> None:
    vm = Vm()
    status, body = vm.ctl("POST", "/_emulator/faults", {"status": 410, "count": 5})
    assert (status, body) == (201, {"faults": [{"count": 5, "path": "/metadata", "status": 410}]})
    status, body = vm.ctl("POST", "/_emulator/faults", [{"reset": True}, {"delay": "1s"}])
    assert len(body["faults"]) == 3
    status, body = vm.ctl("POST", "/_emulator/faults", {"status": 1})
    assert (status, body["error"]) == (400, "status must be an integer from 200 to 599, got 1")
    assert vm.ctl("DELETE", "/_emulator/faults") == (200, {"cleared": 3})


def test_control_stats_and_reset() -> None:
    vm = Vm()
    vm.state.stats.arrived("/metadata/instance", 0.0)
    assert vm.ctl("GET", "/_emulator/stats")[1]["total"] == 1
    assert vm.ctl("POST", "/_emulator/reset-stats")[1]["total"] == 0
    vm.state.stats.arrived("/metadata/instance", 0.0)
    assert vm.ctl("DELETE", "/_emulator/stats")[1]["total"] == 0


def test_control_rules() -> None:
    vm = Vm()
    assert vm.ctl("GET", "/_emulator/rules")[1]["metadata_header"] is True
    status, body = vm.ctl("POST", "/_emulator/rules", {"metadata_header": False})
    assert (status, body["metadata_header"]) == (200, False)
    assert vm.ctl("POST", "/_emulator/rules", {"nope": 1})[0] == 400


def test_control_actions() -> None:
    vm = Vm()
    set_tag = {"action": "set_tag", "name": "a", "value": "b"}
    status, state = vm.ctl("POST", "/_emulator/actions", set_tag)
    assert status == 200
    assert state["instance"]["compute"]["tags"].endswith(";a:b")
    status, body = vm.ctl("POST", "/_emulator/actions", {"action": "detach_disk", "lun": 7})
    assert (status, body["error"]) == (404, "no data disk at lun 7")
    status, body = vm.ctl("POST", "/_emulator/actions", {"action": "set_tag", "name": "a"})
    assert (status, body["error"]) == (400, "set_tag: missing key 'value'")
    assert vm.ctl("POST", "/_emulator/actions", {"name": "a"})[0] == 400
    status, body = vm.ctl("POST", "/_emulator/actions", {"action": "fault", "reset": True})
    assert status == 200
    assert body["faults"] == [{"count": 1, "path": "/metadata", "reset": True}]


def test_control_unknown_path_and_method() -> None:
    vm = Vm()
    assert vm.ctl("GET", "/_emulator/nope") == (
        404,
        {"error": "no control endpoint /_emulator/nope"},
    )
    status, body = vm.ctl("DELETE", "/_emulator/state")
    assert (status, body["error"]) == (405, "method DELETE not allowed here; use GET")
