"""Who is calling: /proc/net/tcp parsing (sans-IO) and real loopback connections."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imdsd.front import sockdiag
from imdsd.front.callers import (
    UNKNOWN,
    Caller,
    CallerStats,
    Resolver,
    SocketEntry,
    command_name,
    find_peer_socket,
    parse_address,
    parse_table,
)

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1
   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 222 1
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 333 1
   3: garbage
"""


def test_parse_address_forms() -> None:
    assert parse_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert parse_address("FEA9FEA9:0050") == ("169.254.169.254", 80)
    assert parse_address("00000000000000000000000001000000:0050") == ("::1", 80)
    assert parse_address("0000000000000000FFFF00000100007F:0050") == ("127.0.0.1", 80)


def test_parse_table_and_find_the_clients_socket() -> None:
    entries = parse_table(TABLE)
    assert len(entries) == 3
    assert entries[1] == SocketEntry(("127.0.0.1", 54321), ("127.0.0.1", 8080), 1, 1000, 222)
    found = find_peer_socket(entries, ("127.0.0.1", 54321), ("127.0.0.1", 8080))
    assert found is not None
    assert (found.uid, found.inode) == (1000, 222)
    mapped = find_peer_socket(entries, ("::ffff:127.0.0.1", 54321), ("::ffff:127.0.0.1", 8080))
    assert mapped == found
    assert find_peer_socket(entries, ("127.0.0.1", 1), ("127.0.0.1", 8080)) is None


def test_a_redirected_connection_is_found_by_the_clients_address() -> None:
    # the agent's socket still names IMDS as its remote end; the front sees its own address
    redirected = [
        SocketEntry(("10.0.0.4", 40000), ("169.254.169.254", 80), 1, 0, 444),
        SocketEntry(("127.0.0.1", 8169), ("10.0.0.4", 40000), 1, 0, 555),
    ]
    found = find_peer_socket(redirected, ("10.0.0.4", 40000), ("127.0.0.1", 8169))
    assert found is not None
    assert found.inode == 444


def test_caller_stats_rank_and_bound() -> None:
    stats = CallerStats(capacity=2)
    a, b, c = Caller(0, 0, 1, "a"), Caller(1000, 1000, 2, "b"), Caller(1001, 1001, 3, "c")
    for _ in range(3):
        stats.counts(a).requests += 1
    stats.counts(b).requests += 1
    assert [row["command"] for row in stats.top()] == ["a", "b"]
    stats.counts(a)
    stats.counts(c).requests += 5  # b was the least recently seen
    assert [row["command"] for row in stats.top()] == ["c", "a"]
    assert stats.top(1) == [
        {"uid": 1001, "pid": 3, "command": "c", "requests": 5, "cached": 0, "forwarded": 0,
         "queued": 0, "refused": 0},
    ]  # fmt: skip


@contextmanager
def _listener(family: int = socket.AF_INET) -> Iterator[socket.socket]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(8)
    try:
        yield server
    finally:
        server.close()


def _comm(pid: int) -> str:
    """What the resolver should name ``pid`` (read while it runs)."""
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return command_name(Path(f"/proc/{pid}/comm").read_text().strip(), argv)


@pytest.mark.parametrize("netlink", [True, False], ids=["netlink", "proc"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_connection_from_this_process(family: int, netlink: bool) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    with _listener(family) as server:
        client = socket.socket(family, socket.SOCK_STREAM)
        try:
            client.connect(server.getsockname()[:2])
        except OSError as exc:
            client.close()
            pytest.skip(f"cannot connect over {family!r}: {exc}")
        accepted, peer = server.accept()
        with client, accepted:
            caller = Resolver(netlink=netlink).resolve(peer[:2], accepted.getsockname()[:2])
    assert caller == Caller(os.geteuid(), os.getegid(), os.getpid(), _comm(os.getpid()))


CHILD = "import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1]))); sys.stdin.read()"  # noqa: E501


def _resolve_child(executable: str, **popen: object) -> tuple[Caller, int, str]:
    with _listener() as server:
        port = server.getsockname()[1]
        argv = [executable, "-c", CHILD, str(port)]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, **popen)  # type: ignore[call-overload]
        try:
            accepted, peer = server.accept()
            with accepted:
                resolver = Resolver()
                caller = resolver.resolve(peer, accepted.getsockname())
                again = resolver.resolve(peer, accepted.getsockname())
                assert again == caller
                assert resolver.scans == 1  # the second lookup found the pid among recent ones
                command = _comm(child.pid)
        finally:
            child.communicate(b"", timeout=10)
    return caller, child.pid, command


def test_a_connection_from_a_child_process() -> None:
    caller, pid, command = _resolve_child(sys.executable)
    assert caller == Caller(os.geteuid(), os.getegid(), pid, command)


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON}")
def test_a_child_of_another_uid() -> None:
    caller, pid, command = _resolve_child(SYSTEM_PYTHON, user=65534, group=65534, cwd="/")
    assert caller == Caller(65534, 65534, pid, command)


def test_an_unknown_peer() -> None:
    assert Resolver().resolve(("127.0.0.1", 1), ("127.0.0.1", 2)) == UNKNOWN
    assert Resolver(proc="/nonexistent").resolve(("127.0.0.1", 1), None) == UNKNOWN


@pytest.mark.parametrize(
    ("comm", "argv", "shown"),
    [
        ("curl", ["curl", "-H", "Metadata:true", "http://x/?secret=1"], "curl"),
        ("python3", ["/usr/bin/python3", "-u", "/usr/sbin/waagent", "-daemon"], "python3 waagent"),
        ("python3", ["python3", "-m", "azure.cli", "login"], "python3 -m"),
        ("python3.11", ["python3.11", "-c", "print(1)"], "python3.11 -c"),
        ("bash", ["bash"], "bash"),
        ("sh", ["sh", "/etc/cron.hourly/imds-poll"], "sh imds-poll"),
        ("python3", [], "python3"),
    ],
)
def test_command_names_show_scripts_not_arguments(comm: str, argv: list[str], shown: str) -> None:
    assert command_name(comm, argv) == shown


def test_netlink_finds_a_redirected_connection_by_its_original_destination() -> None:
    with _listener() as server, socket.create_connection(server.getsockname()) as client:
        accepted, peer = server.accept()
        with accepted:
            # as after a redirect: the front's own address is not where the client connected
            elsewhere = ("127.0.0.1", 1)
            assert sockdiag.lookup(peer, elsewhere) is None
            resolver = Resolver(proc="/nonexistent")  # netlink only
            found = resolver.socket_of(peer, elsewhere, accepted.getsockname())
            assert found == (os.geteuid(), os.fstat(client.fileno()).st_ino)
            assert Resolver().resolve(peer, elsewhere, accepted.getsockname()).pid == os.getpid()


def test_sockdiag_request_and_answer() -> None:
    request = sockdiag.build_request(("10.0.0.4", 40000), ("169.254.169.254", 80))
    assert len(request) == 16 + 56
    assert request[16:18] == bytes([socket.AF_INET, socket.IPPROTO_TCP])
    assert request[24:28] == (40000).to_bytes(2, "big") + (80).to_bytes(2, "big")
    assert request[28:32] == bytes([10, 0, 0, 4])
    assert request[44:48] == bytes([169, 254, 169, 254])
    mapped = sockdiag.build_request(("::ffff:127.0.0.1", 5), ("127.0.0.1", 6))
    assert mapped[16] == socket.AF_INET
    with pytest.raises(ValueError, match="different families"):
        sockdiag.build_request(("::1", 5), ("127.0.0.1", 6))
    answer = bytearray(16 + 72)
    answer[0:4] = len(answer).to_bytes(4, "little")
    answer[4:6] = sockdiag.SOCK_DIAG_BY_FAMILY.to_bytes(2, "little")
    answer[16 + 64 : 16 + 72] = (1000).to_bytes(4, "little") + (4242).to_bytes(4, "little")
    assert sockdiag.parse_response(bytes(answer)) == (1000, 4242)
    error = bytearray(answer)
    error[4:6] = sockdiag.NLMSG_ERROR.to_bytes(2, "little")
    assert sockdiag.parse_response(bytes(error)) is None
    assert sockdiag.parse_response(b"short") is None
    assert sockdiag.lookup(("not an address", 1), ("127.0.0.1", 2)) is None


class _SlowResolver(Resolver):
    """Switches threads inside every ``/proc/<pid>/fd`` scan, as a loaded host does."""

    def _holds(self, pid: int, link: str) -> bool:
        time.sleep(0)
        return super()._holds(pid, link)


def test_concurrent_pid_lookups_share_the_recent_pids_safely(tmp_path: Path) -> None:
    # The front resolves callers in worker threads; lookups that find a new pid change the
    # list of recent pids while others walk it.
    processes = 40
    for pid in range(100, 100 + processes):
        fd = tmp_path / str(pid) / "fd"
        fd.mkdir(parents=True)
        os.symlink(f"socket:[{pid * 10}]", fd / "3")
    resolver = _SlowResolver(proc=str(tmp_path), remember=8, netlink=False)
    errors: list[BaseException] = []
    found: dict[int, int | None] = {}

    def look_up(worker: int) -> None:
        try:
            for round_ in range(30):
                pid = 100 + (worker * 7 + round_) % processes
                found[pid] = resolver.pid_of(pid * 10)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=look_up, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(found) == processes
    assert all(pid == expected for expected, pid in found.items())


CHILD_MANY = "import socket,sys; a=('127.0.0.1', int(sys.argv[1])); s=[socket.create_connection(a) for _ in range(5)]; sys.stdin.read()"  # noqa: E501


def test_a_process_holding_several_connections_is_scanned_once() -> None:
    # A threaded agent or a pool: the scan that finds its first socket notes where the others
    # are, and each of them is then checked with one readlink.
    with _listener() as server:
        argv = [sys.executable, "-c", CHILD_MANY, str(server.getsockname()[1])]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE)
        try:
            accepted = [server.accept() for _ in range(5)]
            resolver = Resolver()
            callers = []
            for n, (conn, peer) in enumerate(accepted):
                with conn:
                    callers.append(resolver.resolve(peer, conn.getsockname()))
                if n == 0:
                    scanned = resolver.fd_scans
            assert resolver.fd_scans == scanned
            assert {caller.pid for caller in callers} == {child.pid}
        finally:
            child.communicate(b"", timeout=10)


class _FakeProc:
    """A ``/proc`` of fd tables only: ``fd/<n>`` links of a few pids, changed at will."""

    def __init__(self, root: Path, pids: list[int]) -> None:
        self.root = root
        for pid in pids:
            (root / str(pid) / "fd").mkdir(parents=True)

    def open(self, pid: int, fd: int, inode: int) -> None:
        self.close(pid, fd)
        os.symlink(f"socket:[{inode}]", self.root / str(pid) / "fd" / str(fd))

    def close(self, pid: int, fd: int) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.root / str(pid) / "fd" / str(fd))

    def holders(self, inode: int) -> set[int]:
        link = f"socket:[{inode}]"
        return {
            int(entry.parent.parent.name)
            for entry in self.root.glob("*/fd/*")
            if os.readlink(entry) == link
        }


_PIDS = [100, 200]
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.sampled_from(_PIDS), st.integers(3, 4), st.integers(1, 3)),
        st.tuples(st.just("close"), st.sampled_from(_PIDS), st.integers(3, 4), st.just(0)),
        st.tuples(st.just("lookup"), st.just(0), st.just(0), st.integers(1, 3)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None, database=None)
@given(ops=_OPS, capacity=st.integers(1, 4))
def test_remembered_sockets_never_name_a_process_that_no_longer_holds_them(
    ops: list[tuple[str, int, int, int]], capacity: int
) -> None:
    # Sockets close, fd numbers are reused and sockets move between processes after the
    # resolver noted where they were: it must still name a process holding the socket now.
    with tempfile.TemporaryDirectory() as tmp:
        proc = _FakeProc(Path(tmp), _PIDS)
        resolver = Resolver(proc=tmp, remember=2, netlink=False, sockets=capacity)
        for op, pid, fd, inode in ops:
            if op == "open":
                proc.open(pid, fd, inode)
            elif op == "close":
                proc.close(pid, fd)
            else:
                holders = proc.holders(inode)
                found = resolver.pid_of(inode)
                assert found in holders if holders else found is None
        assert len(resolver._sockets) <= capacity


@given(st.text(max_size=15), st.lists(st.text(), max_size=4))
def test_command_names_are_printable(comm: str, argv: list[str]) -> None:
    """A process picks its own name and script path; neither reaches a terminal raw."""
    assert command_name(comm, argv).isprintable()
    assert command_name(comm, ["python3", f"/tmp/{comm}"]).isprintable()


RENAMED = """
import sys
with open("/proc/self/comm", "w") as comm:
    comm.write(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_process_that_names_itself_an_escape_sequence_is_shown_escaped() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", RENAMED, "\033[2J\033]0;x\007"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        command, _ = Resolver().process(child.pid)
        assert child.stdin is not None
        child.stdin.close()
    assert command == "\\x1b[2J\\x1b]0;x\\x07"
