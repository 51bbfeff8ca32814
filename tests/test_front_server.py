"""The front in an in-process daemon against the emulator: agents get IMDS's own answers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from daemon_support import daemon, emulator, write_config
from emulator_support import Emulator
from test_front_rules import SPELLINGS

from imdsd import httpio
from imdsd.api.server import ListenError
from imdsd.config import load_config
from imdsd.daemon import Daemon
from imdsd.front.callers import Caller, Resolver
from imdsd.front.server import open_front_listeners

MD = ("Metadata", "true")
EVENT = {"EventType": "Reboot", "EventId": "E1", "Description": "maintenance",
         "EventSource": "Platform", "DurationInSeconds": 300}  # fmt: skip
_IGNORED = {b"date", b"server", b"content-length", b"connection"}


@asynccontextmanager
async def front_daemon(tmp: Path, emu: Emulator, extra: str = "") -> AsyncIterator[Daemon]:
    """A daemon polling ``emu`` with its front on an inherited loopback socket."""
    config = write_config(tmp, emu.url, extra, loadbalancer="60s")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    daemon = Daemon(load_config(str(config)), str(config), front_inherited=[listener])
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        yield daemon
        daemon.stop()


def front_port(daemon: Daemon) -> int:
    assert daemon.front is not None
    return int(daemon.front.listening[0].rpartition(":")[2])


async def call(
    port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> httpio.Response:
    conn = httpio.ClientConnection(await httpio.open_tcp("127.0.0.1", port, 5))
    try:
        all_headers = [("Host", "169.254.169.254"), *headers]
        return await conn.request(method, target, all_headers, body, timeout=10)
    finally:
        await conn.aclose()


def visible_headers(response: httpio.Response) -> set[bytes]:
    """Header names an agent sees, apart from X-Imdsd-* and per-connection ones."""
    return {k for k, _ in response.headers if k not in _IGNORED and not k.startswith(b"x-imdsd-")}


def imdsd_headers(response: httpio.Response) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in response.headers if k.startswith(b"x-imdsd-")}


V = "api-version"
TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01"
TABLE: list[tuple[str, str, list[tuple[str, str]], str]] = [
    ("GET", f"/metadata/instance?{V}=2023-11-15", [MD], "cache"),
    ("GET", f"/metadata/instance?{V}=2021-02-01", [MD], "cache"),
    ("GET", f"/metadata/instance?{V}=2019-06-04&format=json", [MD], "cache"),
    ("GET", f"/metadata/instance?{V}=2017-08-01&format=text", [MD], "cache"),
    ("GET", f"/metadata/instance/compute?{V}=2018-10-01", [MD], "cache"),
    ("GET", f"/metadata/instance/compute/vmId?{V}=2017-08-01&format=text", [MD], "cache"),
    ("GET", f"/metadata/instance/compute/vmId?{V}=2017-08-01", [MD], "cache"),
    ("GET", f"/metadata/instance/compute/tagsList?{V}=2019-06-01", [MD], "cache"),
    ("GET", f"/metadata/instance/network/interface/9?{V}=2021-02-01", [MD], "cache"),
    ("GET", f"/metadata/instance/network/interface/0?{V}=2021-02-01&format=xml", [MD], "cache"),
    ("GET", f"/metadata/instance/network?{V}=2021-02-01&format=text", [MD], "cache"),
    ("GET", "/metadata/versions", [MD], "cache"),
    ("GET", f"/metadata/scheduledevents?{V}=2020-07-01", [MD], "cache"),
    ("GET", f"/metadata/scheduledevents?{V}=2019-01-01", [MD], "cache"),
    ("GET", f"/metadata/loadbalancer?{V}=2020-10-01", [MD], "cache"),
    ("GET", f"/metadata/instance?{V}=2021-02-01", [], "front"),
    ("GET", f"/metadata/instance?{V}=2021-02-01", [("Metadata", "false")], "front"),
    ("GET", f"/metadata/instance?{V}=2021-02-01", [MD, ("X-Forwarded-For", "10.1.1.1")], "front"),
    ("GET", "/metadata/instance", [MD], "front"),
    ("GET", "/metadata/scheduledevents", [MD], "front"),
    ("GET", f"/metadata/instance?{V}=2021-02-01&{V}=2021-02-01", [MD], "front"),
    ("POST", f"/metadata/instance?{V}=2021-02-01", [MD], "front"),
    ("HEAD", f"/metadata/instance?{V}=2021-02-01", [MD], "cache"),
    ("PUT", f"/metadata/scheduledevents?{V}=2020-07-01", [MD], "front"),
    ("GET", f"/metadata/instance?{V}=2016-01-01", [MD], "upstream"),
    ("GET", f"/metadata/instance?{V}=2099-01-01", [MD], "upstream"),
    ("GET", f"/metadata/scheduledevents?{V}=2021-02-01", [MD], "upstream"),
    ("GET", f"/metadata/nothing/here?{V}=2021-02-01", [MD], "upstream"),
    ("GET", f"/metadata/identity/oauth2/token?{V}=2018-02-01", [MD], "upstream"),
    ("GET", f"{TOKEN}&resource=r&client_id=nope", [MD], "upstream"),
    ("POST", f"/metadata/identity/oauth2/token?{V}=2018-02-01&resource=r", [MD], "upstream"),
]


async def test_agents_get_the_answers_imds_gives(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu:
        await emu.control("POST", "scheduled-events", EVENT)
        async with front_daemon(tmp_path, emu) as daemon:
            port = front_port(daemon)
            with trio.fail_after(10):
                while (snapshot := daemon.keeper.snapshot) is None or (
                    snapshot.loadbalancer_raw is None
                ):
                    await trio.sleep(0.05)
            for method, target, headers, source in TABLE:
                ours = await call(port, method, target, headers)
                theirs = await call(emu.port, method, target, headers)
                where = f"{method} {target} {headers}"
                assert ours.status == theirs.status, where
                assert ours.header("content-type") == theirs.header("content-type"), where
                assert ours.body == theirs.body, where
                assert visible_headers(ours) == visible_headers(theirs), where
                assert imdsd_headers(ours)["x-imdsd-source"] == source, where
    assert daemon.front is not None
    assert daemon.front.results["cached"] == sum(1 for *_, s in TABLE if s == "cache")


async def test_cached_answers_carry_imdsd_headers_and_count(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        port = front_port(daemon)
        answer = await call(port, "GET", "/metadata/instance?api-version=2021-02-01", [MD])
        await call(port, "GET", "/metadata/instance", [MD])
        await call(port, "GET", "/metadata/attested/document?api-version=2020-09-01", [MD])
        health = daemon.health()
        metrics = daemon.metrics.render().decode()
    extra = imdsd_headers(answer)
    assert extra["x-imdsd-stale"] == "false"
    assert int(extra["x-imdsd-revision"]) >= 1
    assert extra["x-imdsd-fetched-at"].endswith("Z")
    assert health["front"]["requests"]["cached"] == 1
    (me,) = health["callers"]
    assert me == {"uid": os.geteuid(), "pid": os.getpid(), "command": me["command"],
                  "requests": 3, "cached": 1, "forwarded": 1, "queued": me["queued"],
                  "refused": 1}  # fmt: skip
    assert 'imdsd_front_requests_total{result="cached"} 1' in metrics
    assert 'imdsd_front_requests_total{result="refused"} 1' in metrics
    assert 'imdsd_front_requests_total{result="forwarded"} 1' in metrics


async def test_last_good_answer_served_stale_while_upstream_fails(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        port = front_port(daemon)
        target = "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text"
        fresh = await call(port, "GET", target, [MD])
        await emu.fault(status=500, count=100_000, path="/metadata/instance")
        with trio.fail_after(20):
            while daemon.health()["upstream"]["instance"]["state"] != "stale":
                await trio.sleep(0.2)
        stale = await call(port, "GET", target, [MD])
        assert daemon.front is not None
        assert daemon.front.results["stale"] == 1
    assert (stale.status, stale.body) == (fresh.status, fresh.body)
    assert imdsd_headers(fresh)["x-imdsd-stale"] == "false"
    assert imdsd_headers(stale)["x-imdsd-stale"] == "true"


AGENT = """
import http.client, json, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
for path in sys.argv[2:]:
    conn.request("GET", path, headers={"Metadata": "true"})
    r = conn.getresponse()
    print(json.dumps([r.status, r.read().decode()]))
"""
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run an agent as another uid")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON}")
async def test_restricted_paths_by_the_callers_uid(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        port = front_port(daemon)
        cached = [
            "/metadata/instance/compute/userData?api-version=2021-02-01&format=text",
            "/metadata/instance/compute?api-version=2021-02-01",
        ]
        root = await call(port, "GET", cached[0], [MD])
        nobody = await agent(port, *cached)
        # a field of unknown age: reads at older versions are forwarded to IMDS from now on
        await emu.control("PATCH", "instance", {"compute": {"brandNewField": "x"}})
        with trio.fail_after(10):
            while "brandNewField" not in instance_raw(daemon)["compute"]:
                await trio.sleep(0.05)
        forwarded = await agent(
            port,
            "/metadata/instance/compute/userData?api-version=2021-01-01&format=text",
            "/metadata/instance/compute?api-version=2021-01-01",
            "/metadata/instance/compute?api-version=2021-01-01&format=text",
        )
        assert daemon.front is not None
        callers = daemon.front.callers()
    assert root.status == 200
    for (denied, _), (status, compute), *listing in (nobody, forwarded):
        assert (denied, status) == (403, 200)
        keys = set(msgspec.json.decode(compute))
        assert "vmId" in keys
        assert not keys & {"userData", "customData"}
        for code, text in listing:
            names = set(text.split("\n"))
            assert code == 200
            assert "vmId" in names
            assert not names & {"userData", "customData"}
    counts = [
        sum(c[key] for c in callers if c["uid"] == 65534)
        for key in ("requests", "refused", "cached", "forwarded")
    ]
    assert counts == [5, 2, 1, 2]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run an agent as another uid")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON}")
async def test_no_spelling_of_a_restricted_path_gets_past_the_access_check(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        await emu.control("PATCH", "instance", {"compute": {"userData": "c2VjcmV0"}})
        with trio.fail_after(10):
            while instance_raw(daemon)["compute"].get("userData") != "c2VjcmV0":
                await trio.sleep(0.05)
        port = front_port(daemon)
        nobody = await agent(port, *SPELLINGS)
        root = await call(port, "GET", SPELLINGS[0], [MD])
    for target, (status, body) in zip(SPELLINGS, nobody, strict=True):
        assert status in (400, 403, 404), (target, status, body)
        assert "c2VjcmV0" not in body
        assert set(msgspec.json.decode(body)) == {"error"}
    assert (root.status, root.body) == (200, b"c2VjcmV0")


HOLDER = """
import json, selectors, socket, sys, time
port, count, kept = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
print("ready", flush=True)
sys.stdin.readline()
answers = {}
def note(data):
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    key = json.dumps([head.split(b"\\r\\n")[0].decode(), body.decode()])
    answers[key] = answers.get(key, 0) + 1
# wait (20 s at most) until all but `kept` have been answered: a refusal written just after
# the last accept must not be read as a connection kept open
selector = selectors.DefaultSelector()
for conn in held:
    conn.setblocking(False)
    selector.register(conn, selectors.EVENT_READ)
deadline = time.monotonic() + 20
while len(selector.get_map()) > kept and time.monotonic() < deadline:
    for key, _ in selector.select(timeout=0.5):
        selector.unregister(key.fileobj)
        note(key.fileobj.recv(4096))
for _ in range(len(selector.get_map())):
    note(b"open")
print(json.dumps(answers), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run an agent as another uid")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON}")
async def test_one_user_holding_connections_does_not_cut_the_others_off(tmp_path: Path) -> None:
    """1100 idle connections of uid 65534: it keeps a quarter of the front, the rest are
    answered IMDS's 429 and closed, and root's requests are still answered."""
    count = 1100
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        assert daemon.front is not None
        port = front_port(daemon)
        process = await trio.lowlevel.open_process(
            [SYSTEM_PYTHON, "-c", HOLDER, str(port), str(count), "256"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            user=65534,
            group=65534,
            cwd="/",
            env={},
        )
        assert process.stdin is not None
        assert process.stdout is not None
        lines = b""
        with trio.fail_after(60):
            while not lines.endswith(b"ready\n"):
                lines += await process.stdout.receive_some()
            while daemon.front.http.accepted < count:
                await trio.sleep(0.05)
            root = await call(
                port,
                "GET",
                "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
                [MD],
            )
            await process.stdin.send_all(b"go\n")
            lines = b""
            while not lines.endswith(b"\n"):
                lines += await process.stdout.receive_some()
            await process.wait()
        callers = [c for c in daemon.front.callers() if c["uid"] == 65534]
    answers = msgspec.json.decode(lines)
    refused = json.dumps(["HTTP/1.1 429 Too Many Requests", '{"error":"Too many requests"}'])
    assert root.status == 200
    assert answers == {json.dumps(["open", ""]): 256, refused: count - 256}
    assert [c["refused"] for c in callers] == [count - 256]


def instance_raw(daemon: Daemon) -> dict[str, Any]:
    snapshot = daemon.keeper.snapshot
    assert snapshot is not None
    assert snapshot.instance_raw is not None
    return snapshot.instance_raw


async def agent(port: int, *paths: str) -> list[tuple[int, str]]:
    """Run an agent as uid 65534 asking for ``paths``; the status and body of each."""
    result = await trio.run_process(
        [SYSTEM_PYTHON, "-c", AGENT, str(port), *paths],
        capture_stdout=True,
        user=65534,
        group=65534,
        cwd="/",
        env={},
        stderr=subprocess.STDOUT,
    )
    return [tuple(msgspec.json.decode(line)) for line in result.stdout.splitlines()]


async def test_identity_requests_stay_within_imdss_concurrency(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        await emu.control("POST", "rules", {"identity_latency": 0.2})
        port = front_port(daemon)
        statuses: list[int] = []

        async def token(index: int) -> None:
            answer = await call(port, "GET", f"{TOKEN}&resource=https://r{index}/", [MD])
            statuses.append(answer.status)

        async with trio.open_nursery() as nursery:
            for index in range(12):
                nursery.start_soon(token, index)
        stats = await emu.stats()
    assert statuses == [200] * 12  # IMDS would have answered 429 beyond 5 in flight
    assert "429" not in msgspec.json.encode(stats).decode()


async def test_approval_is_forwarded_with_its_body(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu:
        await emu.control("POST", "scheduled-events", EVENT)
        async with front_daemon(tmp_path, emu) as daemon:
            port = front_port(daemon)
            body = msgspec.json.encode({"StartRequests": [{"EventId": "E1"}]})
            target = "/metadata/scheduledevents?api-version=2020-07-01"
            answer = await call(
                port, "POST", target, [MD, ("Content-Type", "application/json")], body
            )
            state = await emu.control("GET", "state")
    assert answer.status == 200
    assert imdsd_headers(answer)["x-imdsd-source"] == "upstream"
    (event,) = state["scheduled_events"]["Events"]
    assert event["EventStatus"] == "Started"


async def test_forwarded_requests_share_the_budget(tmp_path: Path) -> None:
    extra = '[front]\nqueue_timeout = "3s"\n'
    async with emulator() as emu, front_daemon(tmp_path, emu, extra) as daemon:  # IMDS's 5/s
        port = front_port(daemon)
        statuses: list[int] = []

        async def attested() -> None:
            target = "/metadata/attested/document?api-version=2020-09-01"
            statuses.append((await call(port, "GET", target, [MD])).status)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(attested)
        stats = await emu.stats()
        assert daemon.front is not None
        results = dict(daemon.front.results)
    assert "429" not in stats["by_status"]
    assert stats["peak_rps"] <= 4
    assert statuses.count(200) == results["forwarded"] >= 3
    assert statuses.count(429) == results["throttled"] == 20 - results["forwarded"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate"
)
async def test_socket_activated_front(tmp_path: Path) -> None:
    port = _free_port()
    api = str(tmp_path / "activated.sock")
    async with emulator(rate_limit=0) as emu:
        config = write_config(tmp_path, emu.url)  # no [front] listen: only the passed fd
        prefix = ["systemd-socket-activate", "-l", api, "-l", f"127.0.0.1:{port}"]
        async with daemon(config, argv_prefix=[*prefix, "--fdname=api:front"]) as proc:
            proc.socket = api
            await proc.wait_ready()
            answer = await call(port, "GET", "/metadata/instance?api-version=2021-02-01", [MD])
            health = msgspec.json.decode((await proc.get("/v1/health")).body)
            assert await proc.stop() == 0
    assert answer.status == 200
    assert imdsd_headers(answer)["x-imdsd-source"] == "cache"
    assert health["front"]["listen"] == [f"127.0.0.1:{port}"]
    assert health["callers"][0]["cached"] == 1


async def test_imdss_lasting_refusals_are_asked_once(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu:
        await emu.control("DELETE", "loadbalancer")
        async with front_daemon(tmp_path, emu) as daemon:
            with trio.fail_after(10):
                while not ((snapshot := daemon.keeper.snapshot) and snapshot.loadbalancer_absent):
                    await trio.sleep(0.05)
            port = front_port(daemon)
            await emu.control("DELETE", "stats")
            answers = []
            for target in 3 * [
                "/metadata/instance/compute?api-version=2016-01-01",
                "/metadata/loadbalancer?api-version=2020-10-01",
            ]:
                answers.append(await call(port, "GET", target, [MD]))
            stats = await emu.stats()
    sources = [imdsd_headers(a)["x-imdsd-source"] for a in answers]
    assert sources == ["upstream", "upstream", "cache", "cache", "cache", "cache"]
    assert [a.status for a in answers] == [400, 404] * 3
    assert answers[0].body == answers[2].body
    assert answers[1].body == answers[3].body
    asked = stats["by_path_status"]
    assert asked["/metadata/instance/compute"] == {"400": 1}
    assert asked["/metadata/loadbalancer"].get("404", 0) <= 2  # ours once, a poll maybe


async def test_reload_applies_queue_timeout_and_token_cache(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        assert daemon.front is not None
        assert (daemon.front.relay.queue_timeout, daemon.front.relay.token_cache) == (5.0, True)
        extra = '[front]\nqueue_timeout = "1500ms"\ntoken_cache = false\n'
        write_config(tmp_path, emu.url, extra, loadbalancer="60s")
        assert await daemon.reload()
        relay = daemon.front.relay
        assert (relay.queue_timeout, relay.token_cache) == (1.5, False)
        port = front_port(daemon)
        for _ in range(2):
            answer = await call(port, "GET", f"{TOKEN}&resource=https://r/", [MD])
            assert imdsd_headers(answer)["x-imdsd-source"] == "upstream"


async def test_a_busy_listen_address_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(
            ListenError, match=rf"^front.listen: cannot listen on 127.0.0.1:{port}: "
        ):
            await open_front_listeners(f"127.0.0.1:{port}")
    assert await open_front_listeners("") == []


class _BrokenResolver(Resolver):
    def resolve(self, peer: Any, ours: Any, original: Any = None) -> Caller:
        raise RuntimeError("lookup bug")


async def test_a_failed_caller_lookup_is_an_unknown_caller_not_an_error(tmp_path: Path) -> None:
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        assert daemon.front is not None
        daemon.front.resolver = _BrokenResolver()
        port = front_port(daemon)
        plain = await call(
            port, "GET", "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text", [MD]
        )
        restricted = await call(
            port,
            "GET",
            "/metadata/instance/compute/userData?api-version=2021-02-01&format=text",
            [MD],
        )
    assert plain.status == 200
    assert restricted.status == 403


@pytest.mark.parametrize(
    "target",
    [
        TOKEN + "&resource=https://management.azure.com/",
        "/metadata/attested/document?api-version=2020-09-01",
    ],
)
async def test_a_forwarded_head_keeps_imdss_content_length(tmp_path: Path, target: str) -> None:
    async with emulator(rate_limit=0) as emu, front_daemon(tmp_path, emu) as daemon:
        port = front_port(daemon)
        direct = await call(emu.port, "HEAD", target, [MD])
        ours = await call(port, "HEAD", target, [MD])
        got = await call(port, "GET", target, [MD])
    assert imdsd_headers(ours)["x-imdsd-source"] == "upstream"
    assert (ours.status, ours.body) == (direct.status, b"")
    length = ours.header("content-length")
    assert length == direct.header("content-length")
    assert length is not None
    assert int(length) > 0
    assert int(length) == len(got.body) or "token" in target  # a token's length varies
