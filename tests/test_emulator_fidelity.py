"""Emulator fidelity the IMDS front relies on (issue 15 item 6).

- fields IMDS always sends (``""`` when inapplicable) are in the azure profile's document, and
  left out at api-versions older than the field;
- a managed-identity request naming an identity the VM does not have gets IMDS's 400
  ``{"error":"invalid_request","error_description":"Identity not found"}``, never a token;
- at most 5 managed-identity requests are in flight; the sixth gets 429.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio
import trio.testing
from emulator_support import Emulator as Handle
from test_emulator_endpoints import Vm, doc

from imdsd import httpio
from imdsd.emulator.identity import DEFAULT_USER_ASSIGNED, NOT_FOUND, IdentityGate
from imdsd.emulator.server import Emulator, EmulatorConfig

TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault"
USER = DEFAULT_USER_ASSIGNED
ALWAYS_PRESENT = {
    "customData": ("2019-02-01", ""),
    "userData": ("2021-01-01", ""),
    "host": ("2021-11-15", {"id": ""}),
    "physicalZone": ("2023-11-15", ""),
    "provider": ("2018-10-01", "Microsoft.Compute"),
}


def _day_before(version: str) -> str:
    versions = Vm().rules.profile.versions
    return versions[versions.index(version) - 1]


@pytest.mark.parametrize("field", sorted(ALWAYS_PRESENT))
def test_always_present_fields_are_served_from_their_first_version(field: str) -> None:
    first, value = ALWAYS_PRESENT[field]
    vm = Vm()
    newest = doc(vm.get("/metadata/instance/compute?api-version=2023-11-15"))
    assert newest[field] == value
    at_first = doc(vm.get(f"/metadata/instance/compute?api-version={first}"))
    assert at_first[field] == value
    older = doc(vm.get(f"/metadata/instance/compute?api-version={_day_before(first)}"))
    assert field not in older


def _claims(token: dict[str, Any]) -> dict[str, Any]:
    payload = token["access_token"].split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return decoded


@pytest.mark.parametrize(
    ("query", "client_id"),
    [
        ("", None),
        (f"&client_id={USER['client_id']}", USER["client_id"]),
        (f"&object_id={USER['object_id']}", USER["client_id"]),
        (f"&msi_res_id={USER['msi_res_id']}", USER["client_id"]),
        (f"&mi_res_id={USER['msi_res_id'].upper()}", USER["client_id"]),
        (f"&client_id={USER['client_id']}&object_id={USER['object_id']}", USER["client_id"]),
    ],
)
def test_a_token_for_each_identity_the_vm_has(query: str, client_id: str | None) -> None:
    vm = Vm()
    if client_id is None:  # the system-assigned identity: the VM's id, as before
        client_id = vm.state.instance["compute"]["vmId"]
    answer = vm.get(TOKEN + query)
    assert answer.status == 200
    token = doc(answer)
    assert token["client_id"] == client_id
    assert _claims(token)["appid"] == client_id


@pytest.mark.parametrize(
    "query",
    [
        "&client_id=00000000-0000-0000-0000-000000000000",
        "&object_id=00000000-0000-0000-0000-000000000000",
        "&msi_res_id=/subscriptions/x/resourceGroups/y/providers/Microsoft.ManagedIdentity/"
        "userAssignedIdentities/other",
        "&mi_res_id=/subscriptions/x",
        f"&client_id={USER['client_id']}&object_id=00000000-0000-0000-0000-000000000000",
        "&client_id=",
    ],
)
def test_an_identity_the_vm_does_not_have_is_imds_400(query: str) -> None:
    answer = Vm().get(TOKEN + query)
    assert answer.status == 400
    assert answer.body == b'{"error":"invalid_request","error_description":"Identity not found"}'
    assert doc(answer) == NOT_FOUND


def test_no_system_assigned_identity_means_a_bare_request_is_not_found() -> None:
    vm = Vm()
    status, identities = vm.ctl("PUT", "/_emulator/identities", {"system_assigned": False})
    assert (status, identities["system_assigned"]) == (200, None)
    assert vm.get(TOKEN).status == 400
    assert vm.get(f"{TOKEN}&client_id={USER['client_id']}").status == 200
    vm.ctl("PUT", "/_emulator/identities", {"system_assigned": True, "user_assigned": []})
    assert vm.get(TOKEN).status == 200
    assert vm.get(f"{TOKEN}&client_id={USER['client_id']}").status == 400


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "identities must be an object"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"system_assigned": "yes"}, "system_assigned must be a boolean"),
        ({"user_assigned": {}}, "user_assigned must be an array"),
        ({"user_assigned": [{"client_id": "c"}]}, "user_assigned[0].object_id must be"),
        ({"user_assigned": [{**USER, "x": "1"}]}, "user_assigned[0]: unknown key 'x'"),
    ],
)
def test_bad_identities_are_refused_and_nothing_changes(body: Any, message: str) -> None:
    vm = Vm()
    before = vm.state.identities.as_dict()
    status, answer = vm.ctl("PUT", "/_emulator/identities", body)
    assert status == 400
    assert message in answer["error"]
    assert vm.state.identities.as_dict() == before


def test_gate_admits_limit_then_refuses_until_one_leaves() -> None:
    gate = IdentityGate(limit=5)
    assert [gate.enter() for _ in range(7)] == [True] * 5 + [False] * 2
    gate.leave()
    assert gate.enter()
    assert (gate.in_flight, gate.peak, gate.refused) == (5, 5, 2)
    assert IdentityGate.covers("/metadata/identity/oauth2/token")
    assert not IdentityGate.covers("/metadata/identityx")
    unlimited = IdentityGate(limit=0)
    assert all(unlimited.enter() for _ in range(100))


async def test_sixth_concurrent_identity_request_gets_429(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = Emulator(EmulatorConfig(rate_limit=0))
    handle = Handle(*await nursery.start(emulator.serve))
    rules = await handle.control("POST", "rules", {"identity_latency": 0.5})
    assert (rules["identity_concurrency"], rules["identity_latency"]) == (5, 0.5)
    statuses: list[int] = []

    async def token() -> None:
        conn = httpio.ClientConnection(await httpio.open_tcp(handle.host, handle.port, 5))
        try:
            reply = await conn.request("GET", TOKEN, [("host", "x"), ("metadata", "true")])
        finally:
            await conn.aclose()
        statuses.append(reply.status)

    async with trio.open_nursery() as burst:
        for _ in range(7):
            burst.start_soon(token)
    assert sorted(statuses) == [200] * 5 + [429] * 2
    rules = await handle.control("GET", "rules")
    assert (rules["identity_peak_in_flight"], rules["identity_in_flight"]) == (5, 0)
    stats = await handle.stats()
    assert stats["by_path_status"]["/metadata/identity/oauth2/token"] == {"200": 5, "429": 2}
    statuses.clear()
    await token()
    assert statuses == [200]
