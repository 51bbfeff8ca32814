"""The daemon's side of ``[front] redirect = true``: rules only while imdsd is ready.

- at start, before READY: stale rules (left by an instance killed outside systemd) are
  removed, so agents reach IMDS directly while this instance starts;
- once READY: the rules are installed, pointing at the address the front actually listens on
  (socket activation included);
- on SIGTERM/SIGINT: the rules are removed first, before the front stops accepting;
- after a crash or SIGKILL the unit's ``ExecStopPost=imdsd redirect remove`` removes them.

The rules only ever point at a port below 1024 (only root can bind it): a front on another
port (a socket passed by systemd; the configuration refuses it) is not redirected to, since
any user who binds that port while imdsd is down would receive every agent's IMDS traffic.

A failure to install is logged and reported in ``imdsd status`` (``redirect``, and the
status ``degraded``); the daemon keeps running and agents keep reaching IMDS directly
(fail-open).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import structlog
import trio

from imdsd import redirect
from imdsd.config import port_is_privileged
from imdsd.netmark import UPSTREAM_MARK

log = structlog.get_logger("imdsd.redirect")

NFT_DEADLINE: Final = redirect.NFT_TIMEOUT + 2.0


def listen_address(listeners: Sequence[trio.SocketListener]) -> str:
    """``HOST:PORT`` of the first IPv4 front listener, ``""`` when there is none."""
    for listener in listeners:
        name = listener.socket.getsockname()
        if isinstance(name, tuple) and len(name) == 2:
            return f"{name[0]}:{name[1]}"
    return ""


class RedirectControl:
    """Installs and removes the redirect for a running daemon (see the module docstring)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.installed = False
        self.target = ""
        self.error: str | None = None

    async def _nft(self, action: str, target: str = "") -> bool:
        def run() -> None:
            if action == "install":
                redirect.install(target)
            else:
                redirect.remove()

        try:
            with trio.CancelScope(shield=True), trio.fail_after(NFT_DEADLINE):
                await trio.to_thread.run_sync(run)
        except (redirect.RedirectError, trio.TooSlowError) as exc:
            self.error = f"{action}: {exc}"
            log.error(f"redirect {action} failed", error=str(exc))
            return False
        return True

    async def clear_stale(self) -> None:
        """Before READY: make sure no rules from an earlier instance send agents here."""
        if self.enabled:
            await self._nft("remove")

    async def install(self, listeners: Sequence[trio.SocketListener]) -> None:
        """Once READY: send local IMDS traffic to the front (when enabled)."""
        if not self.enabled:
            return
        self.target = listen_address(listeners)
        if not self.target:
            self.error = "install: the front has no IPv4 listener to redirect to"
            log.error("redirect not installed", error=self.error)
            return
        if not port_is_privileged(self.target):
            self.error = (
                f"install: refused: the front listens on {self.target}, a port any user can "
                "bind; use a port below 1024 (only root can bind it)"
            )
            log.error("redirect not installed", error=self.error)
            return
        if await self._nft("install", self.target):
            self.installed, self.error = True, None
            log.info("redirect installed", target=self.target, mark=hex(UPSTREAM_MARK))

    async def remove(self) -> None:
        """On stop (or when switched off): agents reach IMDS directly again."""
        if self.installed and await self._nft("remove"):
            self.installed = False
            log.info("redirect removed")

    async def reconfigure(self, enabled: bool, listeners: Sequence[trio.SocketListener]) -> None:
        """Apply a reloaded ``[front] redirect``."""
        if enabled == self.enabled:
            return
        self.enabled = enabled
        if enabled:
            await self.install(listeners)
        else:
            await self.remove()

    def problem(self) -> str | None:
        """Why the wanted redirect is not in place (for the daemon's status), or None."""
        if self.enabled and not self.installed and self.error is not None:
            return f"redirect {self.error}"
        return None

    def status(self) -> dict[str, Any]:
        """The ``redirect`` part of ``imdsd status``."""
        return {
            "enabled": self.enabled,
            "installed": self.installed,
            "target": self.target or None,
            "error": self.error,
        }
