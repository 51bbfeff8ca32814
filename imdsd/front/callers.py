"""Who is calling the front: uid, pid and command of a TCP peer, from the kernel's tables.

Nothing the caller sends is trusted. For a connection accepted from ``peer`` (address, port)
the client's own socket is looked up: asked of the kernel by netlink (:mod:`.sockdiag`, by
its exact 4-tuple: ``peer`` to the front's address, or to the original destination when an
nftables redirect rewrote it), else in ``/proc/net/tcp`` and ``/proc/net/tcp6`` (the entry
whose *local* address is ``peer``, preferring one whose remote address is the front's). That
gives the socket's uid and inode; the process holding ``socket:[inode]`` is found by reading
``/proc/<pid>/fd`` links (pids seen before first, then every process, newest first), and its
command from ``/proc/<pid>/comm`` and ``cmdline`` (:func:`command_name`). Finding the pid of
another user's process needs root (or CAP_SYS_PTRACE); without it the pid and command stay
unknown and only the uid is known.

Parsing and the per-caller counters (:class:`CallerStats`) are sans-IO; :class:`Resolver`
reads ``/proc`` and netlink (blocking: call it in a worker thread).
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from imdsd.front import sockdiag
from imdsd.printable import printable

Address = tuple[str, int]
ESTABLISHED = 0x01


class SocketEntry(NamedTuple):
    """One row of ``/proc/net/tcp{,6}``."""

    local: Address
    remote: Address
    state: int
    uid: int
    inode: int


class Caller(NamedTuple):
    """A connection's peer process; ``pid`` None and ``command`` "" when unknown."""

    uid: int
    gid: int
    pid: int | None
    command: str


UNKNOWN = Caller(-1, -1, None, "")


def normalize(host: str) -> str:
    """An IP address in canonical text; IPv4-mapped IPv6 becomes plain IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def parse_address(text: str) -> Address:
    """``0100007F:1F90`` (or the 32-hex-digit IPv6 form) -> ``("127.0.0.1", 8080)``."""
    host_hex, port_hex = text.split(":")
    raw = bytes.fromhex(host_hex)
    # the kernel prints each 32-bit word in host (little-endian) order
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    host = ipaddress.ip_address(swapped)
    return normalize(str(host)), int(port_hex, 16)


def encode_address(address: Address) -> set[str]:
    """The forms ``address`` takes as a local address in ``/proc/net/tcp`` and ``tcp6``."""
    host, port = address
    try:
        ip = ipaddress.ip_address(normalize(host))
    except ValueError:
        return set()
    packed = [ip.packed]
    if isinstance(ip, ipaddress.IPv4Address):
        packed.append(ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed).packed)
    return {
        b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)).hex().upper() + f":{port:04X}"
        for raw in packed
    }


def parse_table(text: str, local: set[str] | None = None) -> list[SocketEntry]:
    """The rows of a ``/proc/net/tcp`` or ``/proc/net/tcp6`` text (malformed rows skipped);
    with ``local``, only rows whose local address is one of those (see :func:`encode_address`).
    """
    entries = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or (local is not None and fields[1] not in local):
            continue
        try:
            entries.append(
                SocketEntry(
                    parse_address(fields[1]),
                    parse_address(fields[2]),
                    int(fields[3], 16),
                    int(fields[7]),
                    int(fields[9]),
                )
            )
        except ValueError:
            continue
    return entries


def find_peer_socket(
    entries: list[SocketEntry], peer: Address, ours: Address | None
) -> SocketEntry | None:
    """The client's socket of a connection from ``peer`` to ``ours`` (see module docstring)."""
    peer = (normalize(peer[0]), peer[1])
    mine = (normalize(ours[0]), ours[1]) if ours else None
    candidates = [e for e in entries if e.local == peer and e.inode]
    for entry in candidates:
        if entry.remote == mine:
            return entry
    established = [e for e in candidates if e.state == ESTABLISHED and e.remote != peer]
    return established[0] if len(established) == 1 else None


INTERPRETERS = re.compile(r"^(python[0-9.]*|perl|ruby|node|nodejs|java|bash|sh|dash|pwsh)$")


def command_name(comm: str, argv: list[str]) -> str:
    """The command to show for a process: its name, or for an interpreter running a script
    (``python3 /usr/sbin/waagent ...``) the interpreter and the script's file name
    (``python3 waagent``). No other argument is shown (arguments may hold secrets).
    Characters that are not printable are escaped (:func:`~imdsd.printable.printable`): a
    process chooses its own name, and it is shown on root's terminal."""
    return printable(_command(comm, argv))


def _command(comm: str, argv: list[str]) -> str:
    if not INTERPRETERS.match(comm):
        return comm
    for arg in argv[1:]:
        if arg.startswith("-"):
            if arg in ("-m", "-c"):
                return f"{comm} {arg}"
            continue
        name = os.path.basename(arg)
        return f"{comm} {name}" if name else comm
    return comm


@dataclass
class CallerCounts:
    """Front requests of one caller, by how they were answered."""

    uid: int
    pid: int | None
    command: str
    requests: int = 0
    cached: int = 0
    forwarded: int = 0
    queued: int = 0
    refused: int = 0

    def to_json(self) -> dict[str, Any]:
        """The record ``imdsd status`` shows."""
        return {
            "uid": self.uid,
            "pid": self.pid,
            "command": self.command,
            "requests": self.requests,
            "cached": self.cached,
            "forwarded": self.forwarded,
            "queued": self.queued,
            "refused": self.refused,
        }


@dataclass
class CallerStats:
    """Counters per caller (uid, pid, command), at most ``capacity`` callers (LRU)."""

    capacity: int = 1024
    _callers: OrderedDict[tuple[int, int | None, str], CallerCounts] = field(
        default_factory=OrderedDict
    )

    def counts(self, caller: Caller) -> CallerCounts:
        """The counters of ``caller`` (created, and the least recently seen one dropped)."""
        key = (caller.uid, caller.pid, caller.command)
        found = self._callers.get(key)
        if found is None:
            if len(self._callers) >= self.capacity:
                self._callers.popitem(last=False)
            found = self._callers[key] = CallerCounts(caller.uid, caller.pid, caller.command)
        else:
            self._callers.move_to_end(key)
        return found

    def top(self, count: int = 10) -> list[dict[str, Any]]:
        """The ``count`` callers with the most requests, most first."""
        ranked = sorted(self._callers.values(), key=lambda c: (-c.requests, c.uid, c.command))
        return [c.to_json() for c in ranked[:count]]


class Resolver:
    """Reads ``/proc`` to find a TCP peer's process (blocking: run it in threads; what it
    remembers is shared by them under a lock).

    It remembers the recent pids, and where each socket of a found process was (pid and fd):
    the next connection of a process holding several (threads, a pool) is checked with one
    ``readlink`` instead of another scan of its fd table.
    """

    def __init__(
        self,
        proc: str = "/proc",
        remember: int = 256,
        *,
        netlink: bool = True,
        sockets: int = 4096,
    ) -> None:
        self.proc = proc
        self.netlink = netlink
        self.remember = remember
        self.remember_sockets = sockets
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._sockets: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self.scans = 0
        self.fd_scans = 0

    def _read(self, name: str) -> str:
        # os.read in large chunks: /proc files are generated per read call
        try:
            fd = os.open(os.path.join(self.proc, name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return ""
        chunks = []
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except OSError:
            return ""
        finally:
            os.close(fd)
        return b"".join(chunks).decode("ascii", "replace")

    def socket_of(
        self, peer: Address, ours: Address | None, original: Address | None = None
    ) -> tuple[int, int] | None:
        """The uid and inode of the client's socket of a connection from ``peer`` to ``ours``.

        Asked by netlink for the exact socket first (its destination is ``ours``, or
        ``original`` when a redirect rewrote it), then found in ``/proc/net/tcp{,6}``.
        """
        if self.netlink:
            # after a redirect the client's socket goes to ``original``: ask that first
            for destination in dict.fromkeys((original, ours)):
                if destination is not None:
                    found = sockdiag.lookup(peer, destination)
                    if found is not None:
                        return found.uid, found.inode
        entry = self._socket_in_tables(peer, ours)
        return None if entry is None else (entry.uid, entry.inode)

    def _socket_in_tables(self, peer: Address, ours: Address | None) -> SocketEntry | None:
        local = encode_address(peer)
        entries = parse_table(self._read("net/tcp"), local)
        entries += parse_table(self._read("net/tcp6"), local)
        return find_peer_socket(entries, peer, ours)

    def _holds(self, pid: int, link: str) -> bool:
        """Whether ``pid`` has ``link`` open; when it has, where its sockets are is kept."""
        self.fd_scans += 1
        sockets: dict[str, str] = {}
        found = False
        # links read relative to the open fd directory: no path walk through /proc per fd
        try:
            fd_dir = os.open(
                os.path.join(self.proc, str(pid), "fd"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
        except OSError:
            return False
        try:
            for name in os.listdir(fd_dir):
                try:
                    target = os.readlink(name, dir_fd=fd_dir)
                except OSError:
                    continue
                found = found or target == link
                if target.startswith("socket:["):
                    sockets[target] = name
        except OSError:
            return False
        finally:
            os.close(fd_dir)
        if found:
            self._keep_sockets(pid, sockets)
        return found

    def _keep_sockets(self, pid: int, sockets: dict[str, str]) -> None:
        with self._lock:
            kept = self._sockets
            for link, name in sockets.items():
                kept.pop(link, None)
                kept[link] = (pid, name)
            while len(kept) > self.remember_sockets:
                del kept[next(iter(kept))]

    def _still_holds(self, pid: int, name: str, link: str) -> bool:
        try:
            return os.readlink(os.path.join(self.proc, str(pid), "fd", name)) == link
        except OSError:
            return False

    def pid_of(self, inode: int) -> int | None:
        """The pid of a process holding ``socket:[inode]`` (where it was seen last, then
        recent pids, then every process)."""
        link = f"socket:[{inode}]"
        with self._lock:
            known = self._sockets.get(link)
            recent = list(reversed(self._recent))
        if known is not None and self._still_holds(*known, link):
            self._remember(known[0])
            return known[0]
        for pid in recent:
            if self._holds(pid, link):
                self._remember(pid)
                return pid
        self.scans += 1
        try:
            # newest first: agents that call once and exit (curl in a script) are new processes
            pids = sorted((int(n) for n in os.listdir(self.proc) if n.isdigit()), reverse=True)
        except OSError:
            return None
        tried = set(recent)
        for pid in pids:
            if pid not in tried and self._holds(pid, link):
                self._remember(pid)
                return pid
        return None

    def _remember(self, pid: int) -> None:
        with self._lock:
            self._recent[pid] = None
            self._recent.move_to_end(pid)
            if len(self._recent) > self.remember:
                self._recent.popitem(last=False)

    def process(self, pid: int) -> tuple[str, int]:
        """The command (see :func:`command_name`) and effective gid of ``pid``
        ("" and -1 when unreadable)."""
        comm = self._read(f"{pid}/comm").strip()
        # the arguments matter only for an interpreter (see command_name)
        argv = self._read(f"{pid}/cmdline").split("\0") if INTERPRETERS.match(comm) else []
        command = command_name(comm, argv)
        gid = -1
        for line in self._read(f"{pid}/status").splitlines():
            if line.startswith("Gid:"):
                parts = line.split()
                if len(parts) > 2 and parts[2].isdigit():
                    gid = int(parts[2])
                break
        return command, gid

    def resolve(
        self, peer: Address, ours: Address | None, original: Address | None = None
    ) -> Caller:
        """The caller of a TCP connection from ``peer`` to ``ours`` (``original``: where the
        client connected to, when a redirect rewrote it); uid -1 when not found."""
        found = self.socket_of(peer, ours, original)
        if found is None:
            return UNKNOWN
        uid, inode = found
        pid = self.pid_of(inode)
        if pid is None:
            return Caller(uid, -1, None, "")
        command, gid = self.process(pid)
        return Caller(uid, gid, pid, command)
