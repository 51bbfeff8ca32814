"""The kernel's socket table by netlink (``NETLINK_SOCK_DIAG``): uid and inode of one socket.

:func:`lookup` asks the kernel for the TCP socket with an exact 4-tuple (the client's own
view: its address, and the address it connected to) and gets its owner's uid and its inode in
one round trip, where reading ``/proc/net/tcp`` costs time in proportion to every socket on
the host. Building the request and reading the answer are pure functions
(:func:`build_request`, :func:`parse_response`); :func:`lookup` does the I/O (blocking,
microseconds). Any failure (no netlink, no such socket) returns None, and the caller falls
back to ``/proc/net/tcp``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLMSG_ERROR = 0x02
NO_COOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_REQUEST = struct.Struct("=BBBxI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_SOCKID = struct.Struct(">HH16s16s")  # sport, dport, src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
_MESSAGE = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retrans
_MESSAGE_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode

Address = tuple[str, int]


class Found(NamedTuple):
    """The socket's owner uid and inode."""

    uid: int
    inode: int


def _packed(host: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, ip.packed.ljust(16, b"\0")


def build_request(source: Address, destination: Address, seq: int = 1) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request for the TCP socket ``source`` -> ``destination``.

    Raises ValueError for addresses that are not IP addresses of one family.
    """
    family, src = _packed(source[0])
    other, dst = _packed(destination[0])
    if family != other:
        raise ValueError(f"{source[0]} and {destination[0]} are of different families")
    body = (
        _REQUEST.pack(family, socket.IPPROTO_TCP, 0, ALL_STATES)
        + _SOCKID.pack(source[1], destination[1], src, dst)
        + _SOCKID_TAIL.pack(0, NO_COOKIE, NO_COOKIE)
    )
    return _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body


def parse_response(data: bytes) -> Found | None:
    """The uid and inode in a SOCK_DIAG answer; None for an error (no such socket) or junk."""
    if len(data) < _HEADER.size:
        return None
    length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data)
    if kind != SOCK_DIAG_BY_FAMILY or length > len(data):
        return None
    offset = _HEADER.size + _MESSAGE.size + _SOCKID.size + _SOCKID_TAIL.size
    if len(data) < offset + _MESSAGE_TAIL.size:
        return None
    _expires, _rqueue, _wqueue, uid, inode = _MESSAGE_TAIL.unpack_from(data, offset)
    return Found(uid, inode)


def lookup(source: Address, destination: Address, timeout: float = 1.0) -> Found | None:
    """Ask the kernel for the TCP socket ``source`` -> ``destination`` (None: not found)."""
    try:
        request = build_request(source, destination)
    except ValueError:
        return None
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
            sock.settimeout(timeout)
            sock.send(request)
            return parse_response(sock.recv(8192))
    except OSError:  # no netlink here (a container, a seccomp filter): use /proc instead
        return None
