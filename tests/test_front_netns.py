"""Unmodified IMDS clients through imdsd's front and redirect, as root in a network namespace.

In a namespace this module creates (``netns_support``), the emulator listens on port 80 of
every address, ``169.254.169.254`` included (an address on the namespace's ``lo``), with IMDS's
5 requests/s limit; imdsd runs with ``[front] listen = "127.0.0.1:169"`` (a port only root can
bind, as the redirect requires) and ``redirect = true``. Real clients, with their built-in
IMDS address, must get correct answers through imdsd: curl, cloud-init's Azure datasource,
WALinuxAgent's ImdsClient (Debian packages, run with the system python3) and azure-identity's
ManagedIdentityCredential. While
50 simulated agents poll, the emulator sees only imdsd's budgeted traffic. After imdsd stops
(SIGTERM; SIGKILL followed by the unit's ``ExecStopPost=imdsd redirect remove``) the rules are
gone and the same clients reach the emulator directly; restarted after a SIGKILL while another
process holds the front's port, imdsd removes the stale rules first and keeps running, degraded.

The emulator's control API is reached at ``127.0.0.1:80``, which the redirect leaves alone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_support import IMDS, IMDSD, SYSTEM_PYTHON, Netns, needs_netns, netns

pytestmark = [needs_netns, pytest.mark.slow]

FRONT_PORT = 169  # below 1024: only root can bind it (config refuses others with the redirect)
INSTANCE = f"http://{IMDS}/metadata/instance?api-version=2021-02-01"
TOKEN = (
    f"http://{IMDS}/metadata/identity/oauth2/token?api-version=2018-02-01"
    "&resource=https%3A%2F%2Fmanagement.azure.com%2F"
)
CLOUD_INIT = """
import json
from cloudinit.sources import DataSourceAzure as az
md = az.get_metadata_from_imds(retries=0, api_version=az.IMDS_VER_WANT)
print(json.dumps({"name": md["compute"]["name"], "vmId": md["compute"]["vmId"],
                  "mac": md["network"]["interface"][0]["macAddress"]}))
"""
WALINUXAGENT = """
import json
from azurelinuxagent.common.protocol.imds import ImdsClient
client = ImdsClient("168.63.129.16")
compute = client.get_compute()
healthy, error = client.validate()
print(json.dumps({"name": compute.name, "vmId": compute.vmId, "healthy": healthy,
                  "error": error}))
"""
AZURE_IDENTITY = """
import json
from azure.identity import ManagedIdentityCredential
token = ManagedIdentityCredential().get_token("https://management.azure.com/.default")
print(json.dumps({"parts": len(token.token.split(".")), "expires_on": token.expires_on}))
"""
AGENTS = """
import http.client, json, sys, threading, time
count, rounds = int(sys.argv[1]), int(sys.argv[2])
statuses, lock = {}, threading.Lock()
def agent():
    for _ in range(rounds):
        started = time.monotonic()
        conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=10)
        conn.request("GET", "/metadata/instance?api-version=2021-02-01",
                     headers={"Metadata": "true"})
        status = conn.getresponse().status
        conn.close()
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
threads = [threading.Thread(target=agent) for _ in range(count)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(statuses))
"""


def _has_module(ns: Netns, python: str, module: str) -> bool:
    return ns.run([python, "-c", f"import {module}"]).returncode == 0


class Stack:
    """The emulator and imdsd inside one namespace."""

    def __init__(self, ns: Netns, tmp: Path) -> None:
        self.ns = ns
        self.port = FRONT_PORT
        self.socket = str(tmp / "imdsd.sock")
        self.config = tmp / "imdsd.toml"
        (tmp / "state").mkdir()
        self.config.write_text(
            f'[server]\nsocket = "{self.socket}"\nsocket_group = ""\n'
            f'[state]\ndirectory = "{tmp / "state"}"\n'
            f'[hooks]\ndirectory = "{tmp / "hooks.d"}"\n'
            f'[front]\nlisten = "127.0.0.1:{self.port}"\nredirect = true\n'
            '[log]\nformat = "json"\n'
        )
        self.log = tmp / "imdsd.log"
        self.emulator = ns.spawn(
            [IMDSD, "emulate", "--listen", "0.0.0.0:80", "--rate-limit", "5"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ns.wait_tcp(IMDS, 80)
        self.daemon: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start imdsd and wait until the redirect is active and the front answers."""
        with self.log.open("ab") as log:
            self.daemon = self.ns.spawn([IMDSD, "run", "-c", str(self.config)], stderr=log)
        deadline = time.monotonic() + 20
        while self.redirect("status").returncode != 0:
            assert self.daemon.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "imdsd did not install the redirect"
            time.sleep(0.1)

    def stop(self, sig: signal.Signals) -> int:
        """Send ``sig`` to imdsd and wait for it to exit; its exit status."""
        assert self.daemon is not None
        self.daemon.send_signal(sig)
        code = self.daemon.wait(timeout=20)
        self.daemon = None
        return code

    def redirect(self, action: str) -> subprocess.CompletedProcess[str]:
        return self.ns.run([IMDSD, "redirect", action, "-c", str(self.config)])

    def control(self, method: str, path: str) -> Any:
        done = self.ns.run(
            ["curl", "-s", "-X", method, f"http://127.0.0.1/_emulator/{path}"], check=True
        )
        return json.loads(done.stdout)

    def front(self) -> dict[str, Any]:
        front: dict[str, Any] = self.health()["front"]
        return front

    def health(self, *, reachable: bool = True) -> dict[str, Any]:
        """``imdsd status --json`` (whatever its exit status says of the health); ``{}`` when
        imdsd does not answer and ``reachable`` is False."""
        done = subprocess.run(
            [IMDSD, "status", "--json", "--socket", self.socket],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        if not done.stdout and not reachable:
            return {}
        assert done.stdout, done.stderr
        health: dict[str, Any] = json.loads(done.stdout)
        return health

    def close(self) -> None:
        for proc in (self.daemon, self.emulator):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with netns() as ns:
        created = Stack(ns, tmp_path_factory.mktemp("front-netns"))
        try:
            created.start()
            yield created
        finally:
            created.close()


def _curl(stack: Stack, url: str) -> tuple[dict[str, str], str]:
    done = stack.ns.run(
        ["curl", "-s", "-i", "--max-time", "10", "-H", "Metadata: true", url], check=True
    )
    head, _, body = done.stdout.partition("\n\n")  # text mode: CRLF read as LF
    lines = head.splitlines()
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    headers[":status"] = lines[0].split()[1]
    return headers, body


def _client(stack: Stack, python: str, module: str, code: str) -> dict[str, Any]:
    if not _has_module(stack.ns, python, module):
        pytest.skip(f"{module} is not installed for {python}")
    result: dict[str, Any] = json.loads(stack.ns.python(code, python=python))
    return result


def _check_clients(stack: Stack) -> dict[str, Any]:
    """Run every client once; their answers (asserted correct)."""
    vm_id = stack.control("GET", "state")["instance"]["compute"]["vmId"]
    headers, body = _curl(stack, f"{INSTANCE}&format=json")
    assert headers[":status"] == "200"
    assert json.loads(body)["compute"]["vmId"] == vm_id
    token_headers, token_body = _curl(stack, TOKEN)
    assert token_headers[":status"] == "200"
    assert json.loads(token_body)["token_type"] == "Bearer"
    cloud_init = _client(stack, SYSTEM_PYTHON, "cloudinit", CLOUD_INIT)
    assert cloud_init == {"name": "examplevmname", "vmId": vm_id, "mac": "0011AAFFBB22"}
    agent = _client(stack, SYSTEM_PYTHON, "azurelinuxagent", WALINUXAGENT)
    assert agent == {"name": "examplevmname", "vmId": vm_id, "healthy": True, "error": ""}
    identity = _client(stack, sys.executable, "azure.identity", AZURE_IDENTITY)
    assert identity["parts"] == 3
    assert identity["expires_on"] > time.time() + 3600
    return {"curl": headers, "token": token_headers}


def test_real_clients_are_answered_by_imdsd(stack: Stack) -> None:
    before = stack.front()["requests"]
    answers = _check_clients(stack)
    after = stack.front()["requests"]
    assert answers["curl"]["server"].startswith("imdsd/")
    assert answers["curl"]["x-imdsd-stale"] == "false"
    assert answers["token"]["server"].startswith("imdsd/")
    # curl, cloud-init and WALinuxAgent (2 requests) from the cache; curl's and
    # azure-identity's token requests were forwarded (or answered from the token cache)
    assert after["cached"] - before["cached"] >= 4
    assert sum(after.values()) - sum(before.values()) >= 6
    assert after["refused"] == before["refused"]


def test_fifty_agents_cost_imds_only_imdsd_budget(stack: Stack) -> None:
    stack.control("DELETE", "stats")
    cached = stack.front()["requests"]["cached"]
    started = time.monotonic()
    done = stack.ns.run([sys.executable, "-c", AGENTS, "50", "4"], timeout=60, check=True)
    elapsed = time.monotonic() - started
    assert json.loads(done.stdout) == {"200": 200}
    assert stack.front()["requests"]["cached"] - cached == 200
    stats = stack.control("GET", "stats")
    assert "429" not in stats["by_status"]
    # imdsd's own budget (2 requests/s by default) is all the emulator sees
    assert stats["total"] <= 2 * elapsed + 2
    assert stats["peak_rps"] <= 4


def _instance_requests(stack: Stack) -> int:
    by_path = stack.control("GET", "stats")["by_path"]
    return sum(n for path, n in by_path.items() if path.startswith("/metadata/instance"))


def test_clients_go_direct_after_sigterm(stack: Stack) -> None:
    assert stack.stop(signal.SIGTERM) == 0
    try:
        assert "imdsd" not in stack.ns.ruleset()
        assert stack.redirect("status").returncode == 3
        before = _instance_requests(stack)
        answers = _check_clients(stack)
        assert answers["curl"]["server"].startswith("imdsd-emulator/")
        assert answers["token"]["server"].startswith("imdsd-emulator/")
        # curl, cloud-init and WALinuxAgent (twice): all straight to the emulator now
        assert _instance_requests(stack) - before >= 4
    finally:
        stack.start()


def test_sigkill_leaves_rules_that_execstoppost_removes(stack: Stack) -> None:
    assert stack.stop(signal.SIGKILL) == -signal.SIGKILL
    try:
        assert "table ip imdsd" in stack.ns.ruleset()  # nobody removed them: a crash
        assert stack.redirect("status").returncode == 1  # active, nothing answers
        assert stack.ns.run([IMDSD, "redirect", "remove"]).returncode == 0  # ExecStopPost
        assert "imdsd" not in stack.ns.ruleset()
        answers = _check_clients(stack)
        assert answers["curl"]["server"].startswith("imdsd-emulator/")
    finally:
        stack.start()


def _wait_status(stack: Stack, code: int) -> None:
    deadline = time.monotonic() + 15
    while stack.redirect("status").returncode != code:
        assert time.monotonic() < deadline, f"redirect status never exited {code}"
        time.sleep(0.1)


def test_reload_switches_the_redirect(stack: Stack) -> None:
    assert stack.daemon is not None
    text = stack.config.read_text()
    try:
        stack.config.write_text(text.replace("redirect = true", "redirect = false"))
        stack.daemon.send_signal(signal.SIGHUP)
        _wait_status(stack, 3)
        headers, _ = _curl(stack, INSTANCE)
        assert headers["server"].startswith("imdsd-emulator/")
    finally:
        stack.config.write_text(text)
        stack.daemon.send_signal(signal.SIGHUP)
    _wait_status(stack, 0)
    headers, _ = _curl(stack, INSTANCE)
    assert headers["server"].startswith("imdsd/")


SQUATTER = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(16)
print("bound", flush=True)
body = b'{"compute": {"vmId": "forged"}}'
while True:
    conn, _ = listener.accept()
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nServer: squatter\\r\\nContent-Type: application/json\\r\\n"
                 b"Content-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s" % (len(body), body))
    conn.close()
"""


def test_restart_with_the_front_port_taken_clears_stale_rules_and_degrades(stack: Stack) -> None:
    """Killed outside systemd, imdsd leaves its rules; another process then holds the front's
    port. The restarted imdsd removes the rules before binding anything and keeps running
    (``degraded``, no redirect): agents reach IMDS, never the process holding the port."""
    assert stack.stop(signal.SIGKILL) == -signal.SIGKILL
    assert "table ip imdsd" in stack.ns.ruleset()
    squatter = stack.ns.spawn(
        [sys.executable, "-c", SQUATTER, str(stack.port)], stdout=subprocess.PIPE
    )
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline() == b"bound\n"
        with stack.log.open("ab") as log:
            stack.daemon = stack.ns.spawn([IMDSD, "run", "-c", str(stack.config)], stderr=log)
        deadline = time.monotonic() + 20
        while "reason" not in (health := stack.health(reachable=False)):
            assert stack.daemon.poll() is None, stack.log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"imdsd never reported the front: {health}"
            time.sleep(0.1)
        assert health["status"] == "degraded"
        assert health["reason"].startswith(f"front.listen: cannot listen on 127.0.0.1:{stack.port}")
        assert health["redirect"]["installed"] is False
        assert "imdsd" not in stack.ns.ruleset()
        headers, body = _curl(stack, f"{INSTANCE}&format=json")
        assert headers["server"].startswith("imdsd-emulator/")
        assert json.loads(body)["compute"]["vmId"] != "forged"
        assert stack.stop(signal.SIGTERM) == 0
    finally:
        squatter.kill()
        squatter.communicate()
        if stack.daemon is not None:
            stack.stop(signal.SIGKILL)
        stack.ns.run([IMDSD, "redirect", "remove"])
        stack.start()
