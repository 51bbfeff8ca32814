"""The TCP metrics listener: GET/HEAD /metrics only, bound or socket-activated, in the daemon."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from daemon_support import daemon, emulator, write_config

from imdsd.api.metrics import CONTENT_TYPE, Metrics
from imdsd.api.server import ListenError
from imdsd.httpio import ClientConnection, Response, open_tcp
from imdsd.httpio.listeners import split_address
from imdsd.metrics_server import MetricsServer, open_metrics_listeners


async def request(port: int, method: str, target: str, host: str = "127.0.0.1") -> Response:
    """One request to the metrics listener."""
    conn = ClientConnection(await open_tcp(host, port, 5))
    try:
        return await conn.request(method, target, [("host", "prometheus")], timeout=10)
    finally:
        await conn.aclose()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("listen", "address"),
    [("127.0.0.1:9469", ("127.0.0.1", 9469)), ("[::1]:80", ("::1", 80)), ("host:1", ("host", 1))],
)
def test_split_address(listen: str, address: tuple[str, int]) -> None:
    assert split_address(listen) == address


@asynccontextmanager
async def serving(metrics: Metrics) -> AsyncIterator[int]:
    """A :class:`MetricsServer` for ``metrics`` on a loopback port (yielded) for the block."""
    [listener] = await open_metrics_listeners("127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(MetricsServer(metrics).serve, [listener])
        yield listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_serves_metrics_and_nothing_else() -> None:
    metrics = Metrics()
    metrics.upstream_request("instance", 200)
    async with serving(metrics) as port:
        reply = await request(port, "GET", "/metrics")
        assert reply.status == 200
        assert reply.header("content-type") == CONTENT_TYPE.decode()
        assert reply.body == metrics.render()
        assert b'imdsd_upstream_requests_total{endpoint="instance",class="2xx"} 1' in reply.body
        assert (await request(port, "GET", "/metrics?x=1")).status == 200
        for target in ("/", "/v1/health", "/metadata/instance", "/metrics/", "/metricsx"):
            missing = await request(port, "GET", target)
            assert missing.status == 404, target
            assert b"error" in missing.body
        for method in ("POST", "PUT", "DELETE"):
            refused = await request(port, method, "/metrics")
            assert refused.status == 405, method
            assert refused.header("allow") == "GET, HEAD"


async def test_head_answers_like_get_without_a_body() -> None:
    async with serving(Metrics()) as port:
        head = await request(port, "HEAD", "/metrics")
        assert head.status == 200
        assert head.body == b""
        assert head.header("content-type") == CONTENT_TYPE.decode()


async def test_an_inherited_socket_is_served_instead_of_binding() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    [listener] = await open_metrics_listeners("127.0.0.1:1", [sock])
    async with trio.open_nursery() as nursery:
        await nursery.start(MetricsServer(Metrics()).serve, [listener])
        assert (await request(port, "GET", "/metrics")).status == 200
        nursery.cancel_scope.cancel()


async def test_off_by_default_and_clear_errors() -> None:
    assert await open_metrics_listeners("") == []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ListenError, match=rf"metrics.listen: cannot listen on 127.0.0.1:{port}"
        ):
            await open_metrics_listeners(f"127.0.0.1:{port}")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram,
        pytest.raises(ListenError, match="not a listening stream socket"),
    ):
        await open_metrics_listeners("", [datagram])


async def test_daemon_serves_the_socket_text_over_tcp(tmp_path: Path) -> None:
    port = free_port()
    async with emulator(port=0) as emu:
        config = write_config(tmp_path, emu.url, f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        async with daemon(config) as proc:
            await proc.wait_ready()
            tcp = await request(port, "GET", "/metrics")
            unix = await proc.get("/metrics")
            assert tcp.status == unix.status == 200
            names = {line.split()[2] for line in tcp.body.decode().splitlines() if "# TYPE" in line}
            assert names == {
                line.split()[2] for line in unix.body.decode().splitlines() if "# TYPE" in line
            }
            assert "imdsd_upstream_requests_total" in names
            events = [e["event"] for e in proc.log_events()]
            assert "metrics listening" in events
            assert await proc.stop() == 0


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate"
)
async def test_socket_activated_metrics_listener(tmp_path: Path) -> None:
    port = free_port()
    api = str(tmp_path / "activated.sock")
    async with emulator(port=0) as emu:
        config = write_config(tmp_path, emu.url)  # no [metrics] listen: only the passed fd
        prefix = [
            "systemd-socket-activate",
            "-l",
            api,
            "-l",
            f"127.0.0.1:{port}",
            "--fdname=api:metrics",
        ]
        async with daemon(config, argv_prefix=prefix) as proc:
            proc.socket = api
            await proc.wait_ready()
            reply = await request(port, "GET", "/metrics")
            assert reply.status == 200
            assert b"# TYPE imdsd_revision gauge" in reply.body
            assert (await request(port, "GET", "/v1/health")).status == 404
            assert (await proc.get("/v1/health")).status == 200  # the api fd is the API
            assert await proc.stop() == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_example_socket_unit_verifies_with_its_drop_in(tmp_path: Path) -> None:
    units = Path(__file__).resolve().parent.parent / "systemd"
    example = (units / "imdsd-metrics.socket").read_text()
    assert "FileDescriptorName=metrics\n" in example
    service = (units / "imdsd.service").read_text().replace("/usr/bin/imdsd", sys.executable)
    (tmp_path / "imdsd.service").write_text(service)
    (tmp_path / "imdsd.socket").write_text((units / "imdsd.socket").read_text())
    (tmp_path / "imdsd-metrics.socket").write_text(example)
    [printf] = [line for line in example.splitlines() if "printf '" in line]
    drop_in = printf.split("printf '", 1)[1].split("'", 1)[0].replace("\\n", "\n")
    (tmp_path / "imdsd.service.d").mkdir()
    (tmp_path / "imdsd.service.d" / "metrics-socket.conf").write_text(drop_in)
    done = subprocess.run(
        ["systemd-analyze", "--no-pager", "verify", "imdsd-metrics.socket", "imdsd.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.stdout + done.stderr).strip() == ""
    assert done.returncode == 0


def test_budget_and_freshness_families() -> None:
    metrics = Metrics()
    text = metrics.render().decode()
    for family in ("imdsd_budget_rate", "imdsd_budget_waiting"):
        assert f"# TYPE {family} gauge\n{family} 0\n" in text
    assert "# TYPE imdsd_upstream_stale gauge\n# HELP imdsd_data_age_seconds" in text
    metrics.budget_rate.set(4)
    metrics.budget_waiting.track(lambda: 2)
    metrics.upstream_freshness = lambda: {
        "instance": (False, 1.5),
        "scheduled_events": (True, None),
        "odd\nname": (True, 3.0),
    }
    text = metrics.render().decode()
    assert "imdsd_budget_rate 4\n" in text
    assert "imdsd_budget_waiting 2\n" in text
    assert 'imdsd_upstream_stale{endpoint="instance"} 0\n' in text
    assert 'imdsd_upstream_stale{endpoint="scheduled_events"} 1\n' in text
    assert 'imdsd_upstream_stale{endpoint="other"} 1\n' in text  # labels stay bounded
    assert 'imdsd_data_age_seconds{endpoint="instance"} 1.5\n' in text
    assert 'imdsd_data_age_seconds{endpoint="scheduled_events"}' not in text  # never fetched
