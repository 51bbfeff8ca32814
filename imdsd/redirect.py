"""The IMDS redirect: nftables rules sending local TCP to 169.254.169.254:80 to the front.

The rules live in their own table, ``table ip imdsd``, with one ``nat`` chain on the
``output`` hook (locally generated packets only)::

    socket mark 0x1d5d return                                # imdsd's own upstream sockets
    ip daddr 169.254.169.254 tcp dport 80 dnat to <front>    # every other local process

imdsd marks its upstream sockets (:mod:`imdsd.netmark`), so the exclusion is per socket and
root-owned agents (WALinuxAgent) are still redirected.

The exemption matches the *socket's* mark (``socket mark``: the ``SO_MARK`` imdsd set, read
from the packet's owning socket), not the packet's (``meta mark``). Other rules may change a
packet's mark before this chain sees it: an ``output`` route chain setting a policy-routing
mark (``meta mark set 0x11d5d``, priority mangle, runs before nat), a CONNMARK restore, a
``mark or``. With ``meta mark 0x1d5d`` such a rule made imdsd's own traffic miss the
exemption and loop into its own front; a masked match (``meta mark and 0x1d5d == 0x1d5d``)
would survive bits ORed in but not a mark overwritten. Nothing but imdsd (with
``CAP_NET_ADMIN``) changes its socket's mark, so ``socket mark`` survives all of these. It
needs the ``socket`` expression's ``mark`` key in the output hook (tested on Linux 6.18); where
the kernel lacks it, installing fails and agents keep reaching IMDS directly. Should
the exemption still be missed, the upstream client recognises the front's answers
(:class:`imdsd.upstream.errors.ThroughFront`) and never takes them for IMDS's.

Install and remove are atomic and
idempotent: one ``nft -f`` transaction creates the table if missing, deletes it and (install)
creates it again. Only new connections are affected; established ones keep their path.

Needs ``CAP_NET_ADMIN`` and the ``nft`` program (package ``nftables``). The rendering and
parsing here are pure; :func:`run_nft` is the only I/O.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from imdsd.netmark import UPSTREAM_MARK

IMDS_ADDRESS: Final = "169.254.169.254"
IMDS_PORT: Final = 80
FAMILY: Final = "ip"
TABLE: Final = "imdsd"
CHAIN: Final = "output"
NFT_TIMEOUT: Final = 10.0
_SBIN_PATH: Final = "/usr/sbin:/sbin"


_OLD_MATCH: Final = (
    " [matched on the packet mark, which other rules can change: reinstall the redirect]"
)


class RedirectError(Exception):
    """The redirect could not be installed, removed or read; the message says why."""


@dataclass(frozen=True)
class RedirectState:
    """What ``table ip imdsd`` holds: where IMDS traffic goes and which mark is exempt."""

    active: bool
    target: tuple[str, int] | None = None
    exempt_mark: int | None = None
    exempt_match: str = "socket mark"

    def describe(self) -> str:
        """One human line, e.g. ``active: tcp 169.254.169.254:80 -> 127.0.0.1:8169 ...``."""
        if not self.active:
            return f"inactive: no table {FAMILY} {TABLE}; agents reach IMDS directly"
        target = f"{self.target[0]}:{self.target[1]}" if self.target else "(no dnat rule)"
        mark = f"0x{self.exempt_mark:x}" if self.exempt_mark is not None else "(none)"
        return (
            f"active: tcp {IMDS_ADDRESS}:{IMDS_PORT} -> {target}, "
            f"except sockets marked {mark} (imdsd's upstream)"
            + ("" if self.exempt_match == "socket mark" else _OLD_MATCH)
        )


def front_target(listen: str) -> tuple[str, int]:
    """The IPv4 address and port the rules send IMDS traffic to, from ``[front] listen``.

    A wildcard (``0.0.0.0``) becomes ``127.0.0.1``; a host name is resolved to IPv4. IMDS is
    IPv4, so an IPv6 front cannot take the redirect.
    """
    if not listen:
        raise RedirectError('[front] listen is "" (the front is off): nothing to redirect to')
    host, _, port_text = listen.rpartition(":")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise RedirectError(f"[front] listen = {listen!r}: expected HOST:PORT")
    if host.startswith("["):
        raise RedirectError(
            f"[front] listen = {listen!r}: the redirect needs an IPv4 front (IMDS is IPv4)"
        )
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.gethostbyname(host))
        except (OSError, ValueError) as exc:
            raise RedirectError(f"[front] listen = {listen!r}: cannot resolve {host!r}") from exc
    if address.is_unspecified:
        address = ipaddress.IPv4Address("127.0.0.1")
    return str(address), int(port_text)


def _table_reset() -> list[str]:
    # "add" makes "delete" succeed when the table is absent: idempotent in one transaction.
    return [f"add table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}"]


def install_script(target: tuple[str, int], mark: int = UPSTREAM_MARK) -> str:
    """The ``nft -f`` script that (re)creates the table redirecting IMDS to ``target``."""
    host, port = target
    lines = [
        *_table_reset(),
        f"table {FAMILY} {TABLE} {{",
        f"    chain {CHAIN} {{",
        "        type nat hook output priority -100; policy accept;",
        f'        socket mark 0x{mark:x} return comment "imdsd upstream"',
        f"        ip daddr {IMDS_ADDRESS} tcp dport {IMDS_PORT} dnat to {host}:{port}"
        ' comment "imdsd front"',
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def remove_script() -> str:
    """The ``nft -f`` script that deletes the table (a no-op when it is absent)."""
    return "\n".join(_table_reset()) + "\n"


def parse_table(listing: str) -> RedirectState:
    """The state described by ``nft -j list table ip imdsd`` output."""
    try:
        items = json.loads(listing)["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RedirectError(f"cannot read nft's JSON listing: {exc}") from exc
    target: tuple[str, int] | None = None
    mark: int | None = None
    match_key = "socket mark"
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        for expr in rule.get("expr", []):
            if not isinstance(expr, dict):
                continue
            dnat = expr.get("dnat")
            if isinstance(dnat, dict) and "addr" in dnat:
                target = (str(dnat["addr"]), int(dnat.get("port", IMDS_PORT)))
            match = expr.get("match")
            left = match.get("left") if isinstance(match, dict) else None
            for key in ("socket", "meta"):
                if isinstance(match, dict) and left == {key: {"key": "mark"}}:
                    right = match.get("right")
                    mark = right if isinstance(right, int) else mark
                    match_key = f"{key} mark"
    return RedirectState(True, target, mark, match_key)


# -------------------------------------------------------------------------- I/O: nft


def nft_path() -> str:
    """The ``nft`` program (also found in /usr/sbin and /sbin when PATH lacks them)."""
    search = os.pathsep.join(p for p in (os.environ.get("PATH", ""), _SBIN_PATH) if p)
    found = shutil.which("nft", path=search)
    if found is None:
        raise RedirectError("nft not found: install the nftables package")
    return found


def run_nft(args: Sequence[str], script: str | None = None) -> str:
    """Run ``nft ARGS`` (with ``script`` on stdin for ``-f -``); its stdout, or RedirectError."""
    try:
        done = subprocess.run(
            [nft_path(), *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RedirectError(f"nft failed: {exc}") from exc
    if done.returncode != 0:
        message = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        if "Operation not permitted" in message:
            message += " (nft needs CAP_NET_ADMIN: run as root or grant the capability)"
        raise RedirectError(f"nft {' '.join(args)}: {message}")
    return done.stdout


def install(listen: str) -> RedirectState:
    """Install (or replace) the redirect to the front at ``listen``; returns the new state."""
    run_nft(["-f", "-"], install_script(front_target(listen)))
    return status()


def remove() -> None:
    """Remove the redirect; succeeds when it is already absent."""
    run_nft(["-f", "-"], remove_script())


def status() -> RedirectState:
    """Whether the redirect is installed, and what it does."""
    try:
        listing = run_nft(["-j", "list", "table", FAMILY, TABLE])
    except RedirectError as exc:
        if "No such file or directory" in str(exc):
            return RedirectState(False)
        raise
    return parse_table(listing)


def front_answers(target: tuple[str, int], timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections at ``target`` (the front is up)."""
    try:
        with socket.create_connection(target, timeout=timeout):
            return True
    except OSError:
        return False


def state_json(state: RedirectState, answering: bool | None) -> dict[str, Any]:
    """``imdsd redirect status --json`` document."""
    return {
        "active": state.active,
        "table": f"{FAMILY} {TABLE}",
        "match": f"tcp {IMDS_ADDRESS}:{IMDS_PORT}",
        "target": f"{state.target[0]}:{state.target[1]}" if state.target else None,
        "exempt_mark": state.exempt_mark,
        "exempt_match": state.exempt_match,
        "front_answering": answering,
    }
