"""Conformance suite: the emulator over real loopback TCP (imdsd.emulator.server).

Most tests freeze trio's clock (``mock_clock``: time moves only when a test jumps it), so
rate limits and timelines are deterministic while the bytes go through real sockets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing

from imdsd.emulator.scenario import ScenarioError, demo_scenario, parse_scenario
from imdsd.emulator.server import Emulator, EmulatorConfig, serve_emulator
from imdsd.httpio import BodyTooLarge, ClientConnection, HttpIOError, Response, open_tcp
from imdsd.model import decode_attested, decode_instance, decode_scheduled_events

MD = (("Metadata", "true"),)
V = "api-version=2021-02-01"
SE = "/metadata/scheduledevents?api-version=2020-07-01"
INSTANCE = f"/metadata/instance?{V}"


class Client:
    """Sends each request on a fresh loopback connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    async def connect(self, max_body: int = 4 << 20) -> ClientConnection:
        return ClientConnection(await open_tcp(self.host, self.port, 5.0), max_body=max_body)

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = MD,
        body: bytes = b"",
        *,
        max_body: int = 4 << 20,
    ) -> Response:
        conn = await self.connect(max_body)
        try:
            return await conn.request(method, target, [("Host", "imds"), *headers], body)
        finally:
            await conn.aclose()

    async def get(self, target: str, headers: Sequence[tuple[str, str]] = MD) -> Response:
        return await self.request("GET", target, headers)

    async def ctl(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raw = b"" if body is None else json.dumps(body).encode()
        response = await self.request(method, "/_emulator/" + path, (), raw)
        return response.status, json.loads(response.body)

    async def stats(self) -> dict[str, Any]:
        status, stats = await self.ctl("GET", "stats")
        assert status == 200
        result: dict[str, Any] = stats
        return result


def jbody(response: Response) -> Any:
    return json.loads(response.body)


async def start(nursery: trio.Nursery, **config: Any) -> tuple[Emulator, Client]:
    emulator = Emulator(EmulatorConfig(**{"rate_limit": 0, **config}))
    host, port = await nursery.start(emulator.serve)
    return emulator, Client(host, port)


@pytest.fixture
async def emu(nursery: trio.Nursery, mock_clock: trio.testing.MockClock) -> Client:
    _, client = await start(nursery)
    return client


# ------------------------------------------------------------------------------ basics


async def test_serve_emulator_reports_an_ephemeral_port(nursery: trio.Nursery) -> None:
    host, port = await nursery.start(serve_emulator, EmulatorConfig(port=0))
    assert host == "127.0.0.1"
    assert port > 0
    response = await Client(host, port).get("/metadata/versions")
    assert response.status == 200
    assert (response.header("server") or "").startswith("imdsd-emulator/")


async def test_versions_and_instance(emu: Client) -> None:
    versions = await emu.get("/metadata/versions")
    assert jbody(versions)["apiVersions"][-1] == "2023-11-15"
    instance = await emu.get(INSTANCE)
    assert instance.status == 200
    assert instance.header("content-type") == "application/json; charset=utf-8"
    decoded = decode_instance(instance.body)
    assert decoded.compute.name == "examplevmname"
    assert [t.name for t in decoded.compute.tags_list] == ["baz", "foo"]


async def test_keep_alive_serves_several_requests_on_one_connection(emu: Client) -> None:
    conn = await emu.connect()
    for _ in range(3):
        response = await conn.request("GET", INSTANCE, [("Host", "x"), *MD])
        assert response.status == 200
    assert conn.reusable
    await conn.aclose()


async def test_route_filtering_and_text(emu: Client) -> None:
    nic = await emu.get(f"/metadata/instance/network/interface/0/macAddress?{V}&format=text")
    assert (nic.status, nic.body) == (200, b"0011AAFFBB22")
    assert nic.header("content-type") == "text/plain; charset=utf-8"
    root = await emu.get(f"/metadata/instance?{V}&format=text")
    assert root.body == b"compute/\nnetwork/"
    array = await emu.get(f"/metadata/instance/compute/publicKeys?{V}&format=text")
    assert array.body == b"0/\n1/"
    leaf_json = await emu.get(f"/metadata/instance/compute/vmId?{V}")
    assert leaf_json.status == 400
    missing = await emu.get(f"/metadata/instance/network/interface/3?{V}")
    assert missing.status == 404
    assert "out of range" in jbody(missing)["error"]


# ------------------------------------------------------------------------------ IMDS rules


async def test_metadata_header_required(emu: Client) -> None:
    response = await emu.get(INSTANCE, headers=())
    assert response.status == 400
    assert jbody(response) == {"error": "Bad request. Required metadata header not specified"}


async def test_x_forwarded_for_rejected(emu: Client) -> None:
    response = await emu.get(INSTANCE, headers=(*MD, ("X-Forwarded-For", "10.0.0.1")))
    assert response.status == 400


async def test_api_version_required_and_known(emu: Client) -> None:
    missing = await emu.get("/metadata/instance")
    assert missing.status == 400
    assert jbody(missing)["newest-versions"] == ["2023-11-15", "2023-07-01", "2021-12-13"]
    unknown = await emu.get("/metadata/instance?api-version=2016-01-01")
    assert unknown.status == 400
    assert "2016-01-01" in jbody(unknown)["error"]


async def test_duplicate_query_parameters_rejected(emu: Client) -> None:
    response = await emu.get(f"/metadata/instance?{V}&format=json&format=text")
    assert response.status == 400
    assert "Duplicate query parameter 'format'" in jbody(response)["error"]


async def test_get_only_405(emu: Client) -> None:
    response = await emu.request("POST", INSTANCE, body=b"{}")
    assert response.status == 405
    assert response.header("allow") == "GET"
    delete = await emu.request("DELETE", SE)
    assert (delete.status, delete.header("allow")) == (405, "GET, POST")


async def test_unknown_paths_404(emu: Client) -> None:
    for target in (f"/metadata/nothing?{V}", "/", f"/metadata?{V}"):
        response = await emu.get(target)
        assert response.status == 404, target
        assert jbody(response) == {"error": "Not found"}


async def test_429_after_5_rapid_requests(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    _, client = await start(nursery, rate_limit=5)
    statuses = [(await client.get(INSTANCE)).status for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    throttled = await client.get(INSTANCE)
    assert jbody(throttled) == {"error": "Too many requests"}
    mock_clock.jump(1.0)
    assert (await client.get(INSTANCE)).status == 200
    for _ in range(20):  # the control API is never rate limited
        assert (await client.ctl("GET", "state"))[0] == 200
    stats = await client.stats()
    assert stats["by_status"] == {"200": 6, "429": 3}
    assert stats["peak_rps"] == 8


async def test_identity_endpoint_allows_20_per_second(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    _, client = await start(nursery, rate_limit=5)
    token = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault"
    statuses = [(await client.get(token)).status for _ in range(21)]
    assert statuses == [200] * 20 + [429]
    assert (await client.get(INSTANCE)).status == 200


async def test_rules_can_be_switched_off(emu: Client) -> None:
    status, rules = await emu.ctl("POST", "rules", {"metadata_header": False, "method": False})
    assert (status, rules["metadata_header"], rules["method"]) == (200, False, False)
    assert (await emu.get(INSTANCE, headers=())).status == 200
    assert (await emu.request("PUT", INSTANCE, body=b"x")).status == 200
    status, error = await emu.ctl("POST", "rules", {"method": "maybe"})
    assert status == 400
    assert "takes a boolean" in error["error"]


# ------------------------------------------------------------------------------ endpoints


async def test_scheduled_events_announce_approve_finish(emu: Client) -> None:
    status, event = await emu.ctl("POST", "scheduled-events", {"EventType": "Reboot"})
    assert status == 201
    event_id = event["EventId"]
    document = decode_scheduled_events((await emu.get(SE)).body)
    assert document.document_incarnation == 2
    assert document.events[0].event_status == "Scheduled"
    assert document.events[0].resources == ["examplevmname"]
    approve = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
    response = await emu.request("POST", SE, body=approve)
    assert (response.status, response.body) == (200, b"")
    started = jbody(await emu.get(SE))
    assert (started["Events"][0]["EventStatus"], started["Events"][0]["NotBefore"]) == (
        "Started",
        "",
    )
    bad = await emu.request("POST", SE, body=b'{"StartRequests": [{"EventId": "nope"}]}')
    assert bad.status == 400
    status, _ = await emu.ctl("DELETE", f"scheduled-events/{event_id}")
    assert status == 200
    assert jbody(await emu.get(SE)) == {"DocumentIncarnation": 4, "Events": []}


async def test_loadbalancer_and_its_absence(emu: Client) -> None:
    target = "/metadata/loadbalancer?api-version=2020-10-01"
    assert jbody(await emu.get(target))["loadbalancer"]["inboundRules"][0]["frontendPort"] == 443
    response = await emu.request("PUT", "/_emulator/loadbalancer", (), b"null")
    assert response.status == 200
    assert (await emu.get(target)).status == 404


async def test_attested_and_identity(emu: Client) -> None:
    attested = await emu.get("/metadata/attested/document?api-version=2020-09-01&nonce=42")
    assert decode_attested(attested.body).encoding == "pkcs7"
    token = await emu.get("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r")
    assert jbody(token)["token_type"] == "Bearer"


async def test_azurestack_profile(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    _, client = await start(nursery, profile="azurestack")
    for target in (
        "/metadata/attested/document?api-version=2020-09-01",
        "/metadata/identity/oauth2/token?api-version=2020-09-01&resource=r",
        "/metadata/loadbalancer?api-version=2020-10-01",
    ):
        assert (await client.get(target)).status == 404, target
    versions = jbody(await client.get("/metadata/versions"))["apiVersions"]
    assert versions[-1] == "2021-05-01"
    assert (await client.get("/metadata/instance?api-version=2021-08-01")).status == 400
    compute = jbody(await client.get("/metadata/instance/compute?api-version=2021-05-01"))
    assert compute["azEnvironment"] == "AzureStack"
    assert (compute["customData"], compute["zone"], compute["plan"]["name"]) == ("", "", "")
    _status, state = await client.ctl("GET", "state")
    assert state["profile"] == "azurestack"


# ------------------------------------------------------------------------------ control API


async def test_put_and_patch_instance_are_served(emu: Client) -> None:
    status, _ = await emu.ctl("PATCH", "instance", {"compute": {"vmSize": "Standard_D4s_v5"}})
    assert status == 200
    size = await emu.get(f"/metadata/instance/compute/vmSize?{V}&format=text")
    assert size.body == b"Standard_D4s_v5"
    status, _ = await emu.ctl("PUT", "instance", {"compute": {"vmSize": 5}, "network": {}})
    assert status == 200
    assert jbody(await emu.get(INSTANCE)) == {"compute": {"vmSize": 5}, "network": {}}
    status, error = await emu.ctl("PATCH", "instance", ["x"])
    assert status == 400
    assert "must be an object" in error["error"]


async def test_actions_change_the_served_instance(emu: Client) -> None:
    status, _ = await emu.ctl("POST", "actions", {"action": "attach_disk", "lun": 3, "size_gb": 64})
    assert status == 200
    lun = await emu.get(
        f"/metadata/instance/compute/storageProfile/dataDisks/1/lun?{V}&format=text"
    )
    assert lun.body == b"3"
    status, error = await emu.ctl(
        "POST", "actions", {"action": "attach_disk", "lun": 3, "size_gb": 1}
    )
    assert (status, error["error"]) == (409, "lun 3 already has a data disk")


async def test_control_requests_are_not_counted(emu: Client) -> None:
    await emu.get(INSTANCE)
    await emu.ctl("GET", "state")
    await emu.ctl("GET", "rules")
    stats = await emu.stats()
    assert stats["total"] == 1
    assert stats["by_path"] == {"/metadata/instance": 1}


async def test_stats_by_path_status_and_reset(emu: Client) -> None:
    await emu.get(INSTANCE)
    await emu.get(INSTANCE, headers=())
    await emu.get("/metadata/versions")
    await emu.get(f"/metadata/instance/compute?{V}")
    stats = await emu.stats()
    assert stats["total"] == 4
    assert stats["by_path"] == {
        "/metadata/instance": 2,
        "/metadata/versions": 1,
        "/metadata/instance/compute": 1,
    }
    assert stats["by_status"] == {"200": 3, "400": 1}
    assert stats["by_path_status"]["/metadata/instance"] == {"200": 1, "400": 1}
    assert stats["peak_rps"] == 4
    status, cleared = await emu.ctl("POST", "reset-stats")
    assert (status, cleared["total"], cleared["peak_rps"]) == (200, 0, 0)


async def test_peak_rps_uses_a_sliding_window(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    _, client = await start(nursery)
    for gap in (0.0, 0.4, 0.4, 0.4, 0.4):  # at 0, .4, .8, 1.2, 1.6: at most 3 within 1 s
        mock_clock.jump(gap)
        await client.get("/metadata/versions")
    assert (await client.stats())["peak_rps"] == 3


# ------------------------------------------------------------------------------ faults


async def test_status_fault_hits_count_requests(emu: Client) -> None:
    status, _body = await emu.ctl("POST", "faults", {"status": 410, "count": 2})
    assert status == 201
    statuses = [(await emu.get(INSTANCE)).status for _ in range(3)]
    assert statuses == [410, 410, 200]
    stats = await emu.stats()
    assert stats["by_status"] == {"410": 2, "200": 1}


async def test_status_fault_body_and_retry_after(emu: Client) -> None:
    await emu.ctl("POST", "faults", {"status": 429, "retry_after": 3})
    response = await emu.get(INSTANCE)
    assert response.status == 429
    assert response.header("retry-after") == "3"
    assert jbody(response) == {"error": "Too many requests"}


async def test_fault_path_targets_one_endpoint(emu: Client) -> None:
    await emu.ctl("POST", "faults", {"status": 500, "path": "/metadata/scheduledevents"})
    assert (await emu.get(INSTANCE)).status == 200
    assert (await emu.get(SE)).status == 500
    assert (await emu.get(SE)).status == 200


async def test_body_fault(emu: Client) -> None:
    await emu.ctl("POST", "faults", {"body": "not json", "count": 1})
    response = await emu.get(INSTANCE)
    assert (response.status, response.body) == (200, b"not json")


async def test_oversize_fault(emu: Client) -> None:
    await emu.ctl("POST", "faults", [{"oversize": 2_000_000}, {"oversize": 2_000_000}])
    response = await emu.get(INSTANCE)
    assert response.status == 200
    assert len(response.body) == 2_000_000
    assert json.loads(response.body)["padding"].startswith("xxx")
    with pytest.raises(BodyTooLarge):
        await emu.request("GET", INSTANCE, max_body=1 << 20)


async def test_truncate_fault(emu: Client) -> None:
    await emu.ctl("POST", "faults", {"truncate": True})
    with pytest.raises(HttpIOError):
        await emu.get(INSTANCE)
    assert (await emu.get(INSTANCE)).status == 200


async def test_reset_fault_aborts_the_connection_and_server_survives(emu: Client) -> None:
    await emu.ctl("POST", "faults", {"reset": True, "count": 1})
    with pytest.raises(HttpIOError):
        await emu.get(INSTANCE)
    assert (await emu.get(INSTANCE)).status == 200
    stats = await emu.stats()
    assert stats["by_status"] == {"reset": 1, "200": 1}


async def test_delay_fault(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    _, client = await start(nursery)
    await client.ctl("POST", "faults", {"delay": "3s", "count": 2})
    before = trio.current_time()
    assert (await client.get(INSTANCE)).status == 200
    assert trio.current_time() - before >= 3.0
    before = trio.current_time()
    await client.get(INSTANCE)
    await client.get(INSTANCE)
    assert 3.0 <= trio.current_time() - before < 6.0


async def test_delete_faults(emu: Client) -> None:
    await emu.ctl("POST", "faults", {"status": 500, "count": 10})
    assert await emu.ctl("DELETE", "faults") == (200, {"cleared": 1})
    assert (await emu.get(INSTANCE)).status == 200


# ------------------------------------------------------------------------------ scenario


async def test_demo_scenario_timeline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    emulator, client = await start(nursery, scenario=demo_scenario())
    t0 = trio.current_time()

    async def at(seconds: float) -> None:
        await trio.sleep_until(t0 + seconds + 0.5)

    async def tags() -> bytes:
        return (await client.get(f"/metadata/instance/compute/tags?{V}&format=text")).body

    assert await tags() == b"baz:bash;foo:bar"
    await at(3)
    assert await tags() == b"baz:bash;foo:bar;env:staging"
    await at(7)
    events = jbody(await client.get(SE))["Events"]
    assert [e["EventStatus"] for e in events] == ["Scheduled"]
    await at(11)
    disks = jbody(await client.get(f"/metadata/instance/compute/storageProfile/dataDisks?{V}"))
    assert [(d["lun"], d["diskSizeGB"]) for d in disks] == [("0", "1024"), ("1", "256")]
    nics = jbody(await client.get(f"/metadata/instance/network/interface?{V}"))
    assert [n["macAddress"] for n in nics] == ["0011AAFFBB22", "000D3A112233"]
    await at(13)
    nics = jbody(await client.get(f"/metadata/instance/network/interface?{V}"))
    assert [n["macAddress"] for n in nics] == ["000D3A112233", "0011AAFFBB22"]
    await at(15)
    assert jbody(await client.get(SE))["Events"][0]["EventStatus"] == "Started"
    await at(21)
    assert jbody(await client.get(SE))["Events"] == []
    await at(22)
    assert [(await client.get(INSTANCE)).status for _ in range(7)] == [429] * 6 + [200]
    await at(28)
    assert b"env" not in await tags()
    size = await client.get(f"/metadata/instance/compute/vmSize?{V}&format=text")
    assert size.body == b"Standard_D4s_v5"
    _status, state = await client.ctl("GET", "state")
    assert state["scenario"]["applied"] == 12
    assert state["scenario"]["failed"] == []
    assert emulator.applied_steps == 12


async def test_scenario_step_failing_at_runtime_is_reported(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    scenario = parse_scenario('[[step]]\nat = "2s"\nremove_tag = { name = "foo" }\n', "t.toml")
    emulator, client = await start(nursery, scenario=scenario)
    await client.ctl("POST", "actions", {"action": "remove_tag", "name": "foo"})
    await trio.sleep(3)
    _status, state = await client.ctl("GET", "state")
    assert state["scenario"]["failed"] == ["step 1 (at 2s): remove_tag: no tag 'foo'"]
    assert emulator.applied_steps == 0


def test_impossible_scenario_is_refused_before_listening() -> None:
    scenario = parse_scenario('[[step]]\nat = "1s"\ndetach_disk = { lun = 9 }\n', "bad.toml")
    with pytest.raises(ScenarioError, match=r"bad\.toml: step 1 \(at 1s\): detach_disk"):
        Emulator(EmulatorConfig(scenario=scenario))


async def test_custom_instance_document(nursery: trio.Nursery) -> None:
    _, client = await start(nursery, instance={"compute": {"name": "mine"}, "network": {}})
    name = await client.get(f"/metadata/instance/compute/name?{V}&format=text")
    assert name.body == b"mine"
