"""The API server on real unix sockets: reads, limits, socket setup, peers, robustness."""

from __future__ import annotations

import grp
import json
import os
import resource
import socket
import stat
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api_support import (
    EVENT_ID,
    FakeContext,
    body_json,
    get,
    running_api,
    server_config,
    started_context,
)

from imdsd.api.routes import body_etag
from imdsd.api.server import ApiServer, ListenError, open_listeners
from imdsd.httpio import ClientConnection, ServerLimits, open_unix


async def raw_exchange(
    path: str, payload: bytes, *, read_for: float = 2.0, eof: bool = False
) -> bytes:
    """Send ``payload`` (then EOF if asked) and read until the server closes or ``read_for``."""
    stream = await trio.open_unix_socket(path)
    try:
        await stream.send_all(payload)
        if eof:
            await stream.send_eof()
        received = b""
        with trio.move_on_after(read_for):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received
    except trio.BrokenResourceError:
        return b""
    finally:
        await stream.aclose()


async def test_reads_on_one_keep_alive_connection(tmp_path: Path) -> None:
    async with running_api(tmp_path, started_context()) as (path, api):
        client = ClientConnection(await open_unix(path, 2))
        host = [("host", "imdsd")]
        leaf = await client.request("GET", "/metadata/instance/compute/vmSize?format=text", host)
        assert leaf.body == b"Standard_A3"
        assert leaf.header("etag") == body_etag(leaf.body).decode()
        assert leaf.header("x-imdsd-stale") == "false"
        assert leaf.header("x-imdsd-fetched-at") == "2023-11-14T22:13:20.000Z"
        obj = await client.request("GET", "/metadata/instance/network?format=text", host)
        assert obj.body == b"interface/"
        array = await client.request(
            "GET", "/metadata/instance/compute/publicKeys?format=text", host
        )
        assert array.body == b"0/\n1/"
        json_leaf = await client.request("GET", "/metadata/instance/compute/vmSize", host)
        assert json.loads(json_leaf.body) == "Standard_A3"
        cached = await client.request(
            "GET",
            "/metadata/instance/compute/vmSize",
            [*host, ("if-none-match", f"W/{json_leaf.header('etag')}")],
        )
        assert cached.status == 304
        assert cached.body == b""
        events = await client.request("GET", "/metadata/scheduledevents", host)
        assert json.loads(events.body)["Events"][0]["EventId"] == EVENT_ID
        missing = await client.request("GET", "/nope", host)
        assert missing.status == 404
        assert json.loads(missing.body) == {"error": "no such path: /nope"}
        metrics = await client.request("GET", "/metrics", host)
        assert b"\nimdsd_connections 1\n" in metrics.body
        assert client.reusable
        await client.aclose()
        assert api.http.accepted == 1


async def test_pipelined_requests(tmp_path: Path) -> None:
    async with running_api(tmp_path, started_context()) as (path, _):
        two = (
            b"GET /metadata/instance/compute/vmSize?format=text HTTP/1.1\r\nhost: i\r\n\r\n"
            b"GET /metadata/instance/compute/location?format=text HTTP/1.1\r\nhost: i\r\n\r\n"
        )
        data = await raw_exchange(path, two, eof=True)
        assert data.count(b"HTTP/1.1 200") == 2
        assert data.index(b"Standard_A3") < data.index(b"westus")


async def test_limits(tmp_path: Path) -> None:
    limits = ServerLimits(max_head=2048, max_body=64, request_timeout=0.3, idle_timeout=0.3)
    async with running_api(tmp_path, started_context(), limits=limits) as (path, _):
        big_head = b"GET /v1/state HTTP/1.1\r\nhost: i\r\nx: " + b"a" * 4096 + b"\r\n\r\n"
        answer = await raw_exchange(path, big_head)
        assert answer.startswith(b"HTTP/1.1 431")
        assert b'{"error":' in answer
        big_body = (
            b"POST /v1/scheduled-events/x/approve HTTP/1.1\r\nhost: i\r\n"
            b"content-length: 1000\r\n\r\n" + b"x" * 1000
        )
        assert (await raw_exchange(path, big_body)).startswith(b"HTTP/1.1 413")
        slow = await raw_exchange(path, b"GET /v1/state HTTP/1.1\r\nhost:", read_for=3)
        assert slow.startswith(b"HTTP/1.1 408")
        with trio.fail_after(3):
            idle = await raw_exchange(path, b"", read_for=3)
        assert idle == b""
        assert (await get(path, "/v1/health")).status == 200


async def test_max_connections_answers_503(tmp_path: Path) -> None:
    async with running_api(tmp_path, started_context(), max_connections=2) as (path, _):
        held = [ClientConnection(await open_unix(path, 2)) for _ in range(2)]
        for client in held:
            assert (await client.request("GET", "/v1/health", [("host", "i")])).status == 200
        rejected = await get(path, "/v1/health")
        assert rejected.status == 503
        assert rejected.header("connection") == "close"
        await held[0].aclose()
        await trio.sleep(0.05)
        assert (await get(path, "/v1/health")).status == 200
        await held[1].aclose()


async def test_socket_mode_group_and_stale_file(tmp_path: Path) -> None:
    sock_path = tmp_path / "run" / "api.sock"
    sock_path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()
    group = grp.getgrgid(os.getgid())
    if os.geteuid() == 0:  # root may give the socket to any group: pick another one
        group = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), group)
    config = server_config(sock_path, socket_mode=0o640, socket_group=group.gr_name)
    listeners = open_listeners(config)
    info = os.stat(sock_path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_gid == group.gr_gid
    with pytest.raises(ListenError, match="in use by another running process"):
        open_listeners(config)
    for listener in listeners:
        await listener.aclose()


def test_socket_setup_errors(tmp_path: Path) -> None:
    with pytest.raises(ListenError, match="group 'no-such-group-x' does not exist"):
        open_listeners(server_config(tmp_path / "a.sock", socket_group="no-such-group-x"))
    assert not (tmp_path / "a.sock").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ListenError, match="exists and is not a socket"):
        open_listeners(server_config(tmp_path / "file"))
    (tmp_path / "dir").mkdir()
    not_dir = tmp_path / "file" / "x.sock"
    with pytest.raises(ListenError, match="cannot listen on"):
        open_listeners(server_config(not_dir))


async def test_creates_the_socket_directory(tmp_path: Path) -> None:
    path = tmp_path / "run" / "imdsd" / "imdsd.sock"
    listeners = open_listeners(server_config(path))
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    await listeners[0].aclose()


async def test_inherited_socket_is_served(tmp_path: Path) -> None:
    """Socket activation: the listener is built from a socket created elsewhere."""
    inherited = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "activated.sock")
    inherited.bind(path)
    inherited.listen(16)
    config = server_config(tmp_path / "configured.sock")
    api = ApiServer(started_context(), config)
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve, open_listeners(config, [inherited]))
        response = await get(path, "/metadata/instance/compute/vmSize?format=text")
        assert response.body == b"Standard_A3"
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "configured.sock").exists()


def test_inherited_socket_must_be_listening(tmp_path: Path) -> None:
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ListenError, match="not a listening stream socket"):
            open_listeners(server_config(tmp_path / "x.sock"), [idle])
        with pytest.raises(ListenError, match="not a listening stream socket"):
            open_listeners(server_config(tmp_path / "x.sock"), [datagram])
    finally:
        idle.close()
        datagram.close()


async def test_peer_credentials_decide_access(tmp_path: Path) -> None:
    ctx = started_context()
    target = "/metadata/instance/compute/userData?format=text"
    async with running_api(tmp_path, ctx, restricted_allow_uids=[], restricted_allow_gids=[]) as (
        path,
        _,
    ):
        denied = await get(path, target)
        assert denied.status == 403
        assert f"uid {os.getuid()} gid {os.getgid()}" in body_json(denied)["error"]
        state = body_json(await get(path, "/v1/state"))
        assert "userData" not in state["instance"]["compute"]
        approve = await raw_exchange(
            path,
            f"POST /v1/scheduled-events/{EVENT_ID}/approve HTTP/1.1\r\nhost: i\r\n"
            "content-length: 0\r\nconnection: close\r\n\r\n".encode(),
        )
        assert approve.startswith(b"HTTP/1.1 403")
        assert ctx.approvals == []
    async with running_api(
        tmp_path, ctx, restricted_allow_uids=[], restricted_allow_gids=[os.getgid()]
    ) as (path, _):
        allowed = await get(path, target)
        assert allowed.status == 200
        assert allowed.body == b"c2VjcmV0"


def _ask(path: str, target: str) -> tuple[int, str]:
    """One blocking HTTP/1.1 request (used in a forked child without trio)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nhost: i\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_other_uid_is_denied_and_redacted() -> None:
    """A child with uid/gid 65534 (forked before trio starts) reads through the socket."""
    shared = Path(tempfile.mkdtemp(prefix="imdsd-api-"))
    shared.chmod(0o755)
    path = str(shared / "api.sock")
    targets = [
        "/metadata/instance/compute/userData?format=text",
        "/metadata/instance/compute?format=text",
        "/v1/state",
        "/metadata/instance/compute/vmSize?format=text",
    ]
    go_read, go_write = os.pipe()
    out_read, out_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child process
        code = 1
        try:
            os.close(go_write)
            os.close(out_read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            if os.read(go_read, 1) == b"g":
                answers = [_ask(path, target) for target in targets]
                os.write(out_write, json.dumps(answers).encode())
                code = 0
        finally:
            os._exit(code)
    os.close(go_read)
    os.close(out_write)

    async def scenario() -> bytes:
        async with running_api(shared, started_context(), socket_mode=0o666):
            os.write(go_write, b"g")
            stream = trio.lowlevel.FdStream(out_read)
            output = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some():
                    output += chunk
            await stream.aclose()
            return output

    try:
        output = trio.run(scenario)
    finally:
        os.close(go_write)
        _, status = os.waitpid(pid, 0)
        for child in shared.iterdir():
            child.unlink()
        shared.rmdir()
    assert os.waitstatus_to_exitcode(status) == 0
    answers = json.loads(output)
    assert answers[0][0] == 403
    assert "uid 65534 gid 65534" in answers[0][1]
    assert answers[1][0] == 200
    assert "vmSize" in answers[1][1].split("\n")
    assert "userData" not in answers[1][1]
    assert "userData" not in json.loads(answers[2][1])["instance"]["compute"]
    assert answers[3] == [200, "Standard_A3"]


async def test_approve_over_the_socket(tmp_path: Path) -> None:
    ctx = started_context()
    async with running_api(tmp_path, ctx) as (path, _):

        async def post(target: str) -> tuple[int, dict[str, object]]:
            client = ClientConnection(await open_unix(path, 2))
            try:
                response = await client.request("POST", target, [("host", "i")], timeout=5)
            finally:
                await client.aclose()
            return response.status, json.loads(response.body)

        target = f"/v1/scheduled-events/{EVENT_ID}/approve"
        assert await post(target) == (
            200,
            {"event_id": EVENT_ID, "approved": True, "upstream_status": 200},
        )
        assert ctx.approvals == [EVENT_ID]
        ctx.approve_answer = (400, b'{"error":"bad"}')
        status, answer = await post(target)
        assert status == 502
        assert answer["upstream_status"] == 400
        assert answer["upstream_body"] == {"error": "bad"}
        assert answer["approved"] is False
        ctx.approve_answer = ConnectionError("IMDS unreachable")
        status, answer = await post(target)
        assert status == 502
        assert "IMDS unreachable" in str(answer["error"])
        status, answer = await post("/v1/scheduled-events/unknown-id/approve")
        assert status == 404
        assert len(ctx.approvals) == 3


REQUEST_LINE = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda method, target, version, headers: (
            method + b" " + target + b" " + version + b"\r\n" + headers + b"\r\n\r\n"
        ),
        st.sampled_from([b"GET", b"POST", b"PUT", b"", b"G\x00T", b"BREW"]),
        st.binary(max_size=80).map(lambda b: b"/metadata/instance" + b),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b"", b"HTTP/1.1 x"]),
        st.lists(
            st.tuples(st.binary(max_size=20), st.binary(max_size=40)).map(
                lambda kv: kv[0] + b": " + kv[1]
            ),
            max_size=4,
        ).map(b"\r\n".join),
    ),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payloads=st.lists(REQUEST_LINE, min_size=1, max_size=4))
def test_malformed_requests_never_crash(tmp_path: Path, payloads: list[bytes]) -> None:
    async def scenario() -> None:
        limits = ServerLimits(request_timeout=1, idle_timeout=1, drain_timeout=0.05)
        async with running_api(tmp_path, started_context(), limits=limits) as (path, _):
            for payload in payloads:
                answer = await raw_exchange(path, payload, read_for=2.0, eof=True)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
            good = await get(path, "/metadata/instance/compute/vmSize?format=text")
            assert good.body == b"Standard_A3"

    trio.run(scenario)


async def test_idle_connections_do_not_block_a_new_request(tmp_path: Path) -> None:
    wanted = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + 100
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        async with running_api(tmp_path, started_context()) as (path, api):
            idle = [await trio.open_unix_socket(path) for _ in range(wanted)]
            with trio.fail_after(5):
                while api.http.active < wanted:
                    await trio.sleep(0.01)
                response = await get(path, "/metadata/instance/compute/vmSize?format=text")
            assert response.body == b"Standard_A3"
            for stream in idle:
                await stream.aclose()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_starting_daemon_answers_503(tmp_path: Path) -> None:
    async with running_api(tmp_path, FakeContext()) as (path, _):
        response = await get(path, "/metadata/instance")
        assert response.status == 503
        assert "starting" in body_json(response)["error"]
        health = await get(path, "/v1/health")
        assert health.status == 503
        assert body_json(health)["status"] == "starting"


async def test_reconfigure_applies_policy_and_limits(tmp_path: Path) -> None:
    ctx = started_context()
    target = "/metadata/instance/compute/userData?format=text"
    async with running_api(tmp_path, ctx, restricted_allow_uids=[], restricted_allow_gids=[]) as (
        path,
        api,
    ):
        assert (await get(path, target)).status == 403
        redacted = await get(path, "/v1/state")
        api.reconfigure(
            server_config(
                path,
                restricted_paths=["compute/vmSize"],
                restricted_allow_uids=[],
                max_connections=7,
                heartbeat=2,
            )
        )
        assert (await get(path, target)).body == b"c2VjcmV0"
        assert (await get(path, "/metadata/instance/compute/vmSize")).status == 403
        state = body_json(await get(path, "/v1/state"))
        assert "vmSize" not in state["instance"]["compute"]
        assert state["instance"]["compute"]["userData"] == "c2VjcmV0"
        assert body_json(redacted)["instance"]["compute"]["vmSize"] == "Standard_A3"
        assert api.http.max_connections == 7
        assert api.watchers.heartbeat == 2
