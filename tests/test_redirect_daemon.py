"""The daemon's redirect control (imdsd.redirect_daemon) with nft replaced by a recorder."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest
import trio

from imdsd import redirect
from imdsd.redirect_daemon import RedirectControl, listen_address


class Nft:
    """Records install/remove calls; fails installs while ``refuse`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.refuse = ""
        monkeypatch.setattr(redirect, "install", self.install)
        monkeypatch.setattr(redirect, "remove", self.remove)

    def install(self, listen: str) -> redirect.RedirectState:
        if self.refuse:
            raise redirect.RedirectError(self.refuse)
        self.calls.append(f"install {listen}")
        return redirect.RedirectState(True, redirect.front_target(listen), 0x1D5D)

    def remove(self) -> None:
        self.calls.append("remove")


@pytest.fixture
def nft(monkeypatch: pytest.MonkeyPatch) -> Nft:
    return Nft(monkeypatch)


def bound(host: str, port: int) -> list[trio.SocketListener]:
    """A front listener stand-in: the control reads only its socket's address."""
    sock = SimpleNamespace(getsockname=lambda: (host, port))
    return cast(list[trio.SocketListener], [SimpleNamespace(socket=sock)])


@pytest.fixture
def listeners() -> list[trio.SocketListener]:
    return bound("127.0.0.1", 169)


async def test_lifecycle_installs_to_the_actual_address_and_removes(
    nft: Nft, listeners: list[trio.SocketListener]
) -> None:
    port = 169
    control = RedirectControl(enabled=True)
    await control.clear_stale()
    await control.install(listeners)
    assert control.status() == {
        "enabled": True,
        "installed": True,
        "target": f"127.0.0.1:{port}",
        "error": None,
    }
    await control.remove()
    await control.remove()  # removing twice runs nft once
    assert nft.calls == ["remove", f"install 127.0.0.1:{port}", "remove"]
    assert not control.installed


async def test_disabled_never_touches_nft(nft: Nft, listeners: list[trio.SocketListener]) -> None:
    control = RedirectControl(enabled=False)
    await control.clear_stale()
    await control.install(listeners)
    await control.remove()
    assert nft.calls == []


async def test_a_failed_install_is_reported_and_not_raised(
    nft: Nft, listeners: list[trio.SocketListener]
) -> None:
    nft.refuse = "Operation not permitted (nft needs CAP_NET_ADMIN)"
    control = RedirectControl(enabled=True)
    await control.install(listeners)
    assert not control.installed
    assert "CAP_NET_ADMIN" in (control.status()["error"] or "")
    await control.remove()  # nothing installed: nothing to remove
    assert nft.calls == []


async def test_reload_switches_it(nft: Nft, listeners: list[trio.SocketListener]) -> None:
    control = RedirectControl(enabled=True)
    await control.install(listeners)
    await control.reconfigure(False, listeners)
    await control.reconfigure(False, listeners)
    await control.reconfigure(True, listeners)
    assert [c.split()[0] for c in nft.calls] == ["install", "remove", "install"]


async def test_no_ipv4_listener_is_an_error_not_a_blackhole(nft: Nft) -> None:
    control = RedirectControl(enabled=True)
    await control.install([])
    assert control.status()["error"] == "install: the front has no IPv4 listener to redirect to"
    assert nft.calls == []
    assert listen_address([]) == ""


@pytest.mark.parametrize("port", [1, 80, 169, 1023, 1024, 8169, 49152, 65535])
async def test_never_redirects_to_a_port_any_user_can_bind(nft: Nft, port: int) -> None:
    """A socket-activated front on an unprivileged port: a user binding it while imdsd is down
    would get every agent's IMDS traffic, so the rules are refused (and the daemon degraded)."""
    control = RedirectControl(enabled=True)
    await control.install(bound("127.0.0.1", port))
    if port < 1024:
        assert nft.calls == [f"install 127.0.0.1:{port}"]
        assert control.installed
        assert control.problem() is None
        return
    error = (
        f"install: refused: the front listens on 127.0.0.1:{port}, a port any user can bind; "
        "use a port below 1024 (only root can bind it)"
    )
    assert nft.calls == []
    assert control.status() == {
        "enabled": True,
        "installed": False,
        "target": f"127.0.0.1:{port}",
        "error": error,
    }
    assert control.problem() == f"redirect {error}"


async def test_a_disabled_redirect_is_no_problem(nft: Nft) -> None:
    control = RedirectControl(enabled=False)
    await control.install(bound("127.0.0.1", 8169))
    assert control.problem() is None
    nft.refuse = "no nft"
    control = RedirectControl(enabled=True)
    await control.install(bound("127.0.0.1", 169))
    assert control.problem() == "redirect install: no nft"
