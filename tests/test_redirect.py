"""The IMDS redirect (imdsd.redirect, ``imdsd redirect``) and the upstream socket mark.

Pure tests of the rules and of reading them back; then, as root in a network namespace the
test creates, the real nftables rules: install/remove are idempotent, status tells active from
inactive, every local process (root included) is sent to the front, and only sockets carrying
imdsd's mark reach the IMDS address.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from netns_support import IMDS, IMDSD, Netns, free_port, needs_netns, netns

from imdsd import redirect
from imdsd.netmark import SO_MARK, UPSTREAM_MARK, mark_socket, open_marked_tcp

DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------------------ pure


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        ("127.0.0.1:8169", ("127.0.0.1", 8169)),
        ("0.0.0.0:80", ("127.0.0.1", 80)),
        ("10.1.2.3:9000", ("10.1.2.3", 9000)),
        ("localhost:8169", ("127.0.0.1", 8169)),
    ],
)
def test_front_target(listen: str, target: tuple[str, int]) -> None:
    assert redirect.front_target(listen) == target


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("", "the front is off"),
        ("[::1]:8169", "needs an IPv4 front"),
        ("127.0.0.1:0", "expected HOST:PORT"),
        ("127.0.0.1", "expected HOST:PORT"),
    ],
)
def test_front_target_refuses(listen: str, message: str) -> None:
    with pytest.raises(redirect.RedirectError, match=message):
        redirect.front_target(listen)


def test_install_script_replaces_the_table_in_one_transaction() -> None:
    assert redirect.install_script(("127.0.0.1", 8169)) == (
        "add table ip imdsd\n"
        "delete table ip imdsd\n"
        "table ip imdsd {\n"
        "    chain output {\n"
        "        type nat hook output priority -100; policy accept;\n"
        '        socket mark 0x1d5d return comment "imdsd upstream"\n'
        "        ip daddr 169.254.169.254 tcp dport 80 dnat to 127.0.0.1:8169"
        ' comment "imdsd front"\n'
        "    }\n"
        "}\n"
    )
    assert redirect.remove_script() == "add table ip imdsd\ndelete table ip imdsd\n"


def test_parse_table_reads_target_and_mark() -> None:
    state = redirect.parse_table((DATA / "nft-imdsd-table.json").read_text())
    assert state == redirect.RedirectState(True, ("127.0.0.1", 8169), UPSTREAM_MARK)
    assert state.describe() == (
        "active: tcp 169.254.169.254:80 -> 127.0.0.1:8169, "
        "except sockets marked 0x1d5d (imdsd's upstream)"
    )
    older = redirect.parse_table(
        (DATA / "nft-imdsd-table.json").read_text().replace('"socket"', '"meta"')
    )
    assert older == redirect.RedirectState(True, ("127.0.0.1", 8169), UPSTREAM_MARK, "meta mark")
    assert older.describe().endswith("other rules can change: reinstall the redirect]")
    empty = redirect.parse_table('{"nftables": [{"table": {"name": "imdsd"}}]}')
    assert empty == redirect.RedirectState(True, None, None)
    assert redirect.RedirectState(False).describe().startswith("inactive")
    with pytest.raises(redirect.RedirectError, match="cannot read nft's JSON"):
        redirect.parse_table("not json")


def test_state_json() -> None:
    state = redirect.RedirectState(True, ("127.0.0.1", 8169), UPSTREAM_MARK)
    assert redirect.state_json(state, True) == {
        "active": True,
        "table": "ip imdsd",
        "match": "tcp 169.254.169.254:80",
        "target": "127.0.0.1:8169",
        "exempt_mark": 0x1D5D,
        "exempt_match": "socket mark",
        "front_answering": True,
    }


def test_missing_nft_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redirect, "_SBIN_PATH", "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(redirect.RedirectError, match="install the nftables package"):
        redirect.status()


def test_unit_removes_the_redirect_after_any_stop() -> None:
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "imdsd.service").read_text()
    assert "\nExecStopPost=-/usr/bin/imdsd redirect remove\n" in unit


# ------------------------------------------------------------------------------ the mark

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN (root)")


@needs_root
async def test_upstream_connections_carry_the_mark() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stream = await open_marked_tcp("127.0.0.1", port, 5.0)
    try:
        assert stream.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == UPSTREAM_MARK
    finally:
        await stream.aclose()
        for listener in listeners:
            await listener.aclose()


@needs_root
def test_mark_socket_sets_the_mark() -> None:
    with socket.socket() as plain:
        sock = trio.socket.from_stdlib_socket(plain)
        assert mark_socket(sock, 0x42)
        assert plain.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x42


# ------------------------------------------------------------------------------ netns

# A tiny HTTP server answering every GET with its name; the marked client of imdsd.netmark.
_SERVER = """
import http.server, sys
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = name.encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer((host, port), H).serve_forever()
"""
_MARKED_GET = """
import trio
from imdsd.netmark import open_marked_tcp
async def main():
    stream = await open_marked_tcp("169.254.169.254", 80, 5)
    await stream.send_all(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    print(data.split(b"\\r\\n\\r\\n", 1)[1].decode())
trio.run(main)
"""


def _config(tmp_path: Path, port: int) -> str:
    path = tmp_path / "imdsd.toml"
    path.write_text(f'[front]\nlisten = "127.0.0.1:{port}"\n')
    return str(path)


def _curl(ns: Netns, *prefix: str) -> str:
    done = ns.run([*prefix, "curl", "-s", "--max-time", "5", f"http://{IMDS}/"])
    return done.stdout


@pytest.fixture
def ns() -> Iterator[Netns]:
    with netns() as created:
        yield created


@needs_netns
def test_install_remove_status_in_a_namespace(ns: Netns, tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path, port)

    def imdsd(*args: str) -> tuple[int, str]:
        done = ns.run([IMDSD, "redirect", *args, "-c", config])
        return done.returncode, done.stdout + done.stderr

    assert imdsd("status")[0] == 3
    code, out = imdsd("install")
    assert code == 1
    assert "nothing answers" in out
    assert "imdsd" not in ns.ruleset()  # refused: agents keep reaching IMDS
    assert imdsd("install", "--force")[0] == 0
    first = ns.ruleset()
    assert imdsd("install", "--force")[0] == 0
    assert ns.ruleset() == first  # idempotent: the table is replaced, not duplicated
    assert first.count("table ip imdsd") == 1
    code, out = imdsd("status")
    assert code == 1  # active, but nothing answers at the front
    assert "agents cannot reach IMDS" in out
    front = ns.spawn([sys.executable, "-c", _SERVER, "front", "127.0.0.1", str(port)])
    try:
        ns.wait_tcp("127.0.0.1", port)
        code, out = imdsd("status")
        assert code == 0
        assert f"-> 127.0.0.1:{port}" in out
        assert imdsd("remove")[0] == 0
        assert imdsd("remove")[0] == 0  # idempotent
        assert "imdsd" not in ns.ruleset()
        assert imdsd("status")[0] == 3
    finally:
        front.kill()
        front.wait()


@needs_netns
def test_every_local_process_but_marked_sockets_goes_to_the_front(
    ns: Netns, tmp_path: Path
) -> None:
    port = free_port()
    servers = [
        ns.spawn([sys.executable, "-c", _SERVER, "imds", IMDS, "80"]),
        ns.spawn([sys.executable, "-c", _SERVER, "front", "127.0.0.1", str(port)]),
    ]
    try:
        ns.wait_tcp(IMDS, 80)
        ns.wait_tcp("127.0.0.1", port)
        assert _curl(ns) == "imds"
        assert ns.run([IMDSD, "redirect", "install", "-c", _config(tmp_path, port)]).returncode == 0
        assert _curl(ns) == "front"  # root is redirected: the exclusion is not by uid
        assert _curl(ns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups") == "front"
        marked = ns.python(_MARKED_GET).strip()
        assert marked == "imds"  # imdsd's upstream sockets go straight to IMDS
        assert ns.run([IMDSD, "redirect", "remove"]).returncode == 0
        assert _curl(ns) == "imds"
    finally:
        for server in servers:
            server.kill()
            server.wait()


# Rules of the admin's own, in another table, that change the packet mark of every locally
# generated packet before the redirect's nat chain sees it.
MARK_CHANGERS = {
    "policy routing (set)": "meta mark set 0x11d5d",
    "mark or": "meta mark set meta mark or 0x10000",
    "connmark restore": "meta mark set ct mark",
    "overwritten": "meta mark set 0x100",
}


@needs_netns
@pytest.mark.parametrize("rule", MARK_CHANGERS.values(), ids=MARK_CHANGERS.keys())
def test_imdsd_reaches_imds_when_another_rule_changes_the_packet_mark(
    ns: Netns, tmp_path: Path, rule: str
) -> None:
    port = free_port()
    servers = [
        ns.spawn([sys.executable, "-c", _SERVER, "imds", IMDS, "80"]),
        ns.spawn([sys.executable, "-c", _SERVER, "front", "127.0.0.1", str(port)]),
    ]
    try:
        ns.wait_tcp(IMDS, 80)
        ns.wait_tcp("127.0.0.1", port)
        script = (
            "table ip admin {\n    chain route_out {\n"
            "        type route hook output priority mangle; policy accept;\n"
            f"        {rule}\n    }}\n}}\n"
        )
        ns.run(["nft", "-f", "-"], input=script, check=True)
        assert ns.run([IMDSD, "redirect", "install", "-c", _config(tmp_path, port)]).returncode == 0
        assert ns.python(_MARKED_GET).strip() == "imds"  # imdsd's upstream still exempt
        assert _curl(ns) == "front"  # and every other process still redirected
    finally:
        for server in servers:
            server.kill()
            server.wait()


def _lockdown(port: int, *, naive: bool) -> str:
    """An admin's per-uid IMDS lockdown: the plain rule, or the one README gives for the front."""
    rules = (
        ["ip daddr 169.254.169.254 tcp dport 80 meta skuid != 0 reject"]
        if naive
        else [
            "ct original ip daddr 169.254.169.254 meta l4proto tcp ct original proto-dst 80"
            " meta skuid != 0 reject",
            f"ip daddr 127.0.0.1 tcp dport {port} meta skuid != 0 reject",
        ]
    )
    body = "".join(f"        {rule}\n" for rule in rules)
    return (
        "table ip lockdown {\n    chain output {\n"
        "        type filter hook output priority filter; policy accept;\n"
        f"{body}    }}\n}}\n"
    )


@needs_netns
def test_a_per_uid_lockdown_needs_the_readme_rule_to_hold_through_the_front(
    ns: Netns, tmp_path: Path
) -> None:
    port = free_port()
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    servers = [
        ns.spawn([sys.executable, "-c", _SERVER, "imds", IMDS, "80"]),
        ns.spawn([sys.executable, "-c", _SERVER, "front", "127.0.0.1", str(port)]),
    ]
    try:
        ns.wait_tcp(IMDS, 80)
        ns.wait_tcp("127.0.0.1", port)
        ns.run(["nft", "-f", "-"], input=_lockdown(port, naive=True), check=True)
        assert _curl(ns, *nobody) == ""  # refused, IMDS direct
        assert ns.run([IMDSD, "redirect", "install", "-c", _config(tmp_path, port)]).returncode == 0
        # the nat rewrite to the front comes before the filter hook: the plain rule no longer holds
        assert _curl(ns, *nobody) == "front"
        ns.run(["nft", "delete", "table", "ip", "lockdown"], check=True)
        ns.run(["nft", "-f", "-"], input=_lockdown(port, naive=False), check=True)
        assert _curl(ns, *nobody) == ""  # through the redirect
        done = ns.run([*nobody, "curl", "-s", "--max-time", "5", f"http://127.0.0.1:{port}/"])
        assert done.stdout == ""  # straight to the front
        assert _curl(ns) == "front"  # root still served by the front
        assert ns.python(_MARKED_GET).strip() == "imds"  # and imdsd (root) reaches IMDS
        assert ns.run([IMDSD, "redirect", "remove"]).returncode == 0
        assert _curl(ns, *nobody) == ""  # the same rule holds without the redirect
        assert _curl(ns) == "imds"
    finally:
        for server in servers:
            server.kill()
            server.wait()
