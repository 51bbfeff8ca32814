"""The daemon's redirect control (imdsd.redirect_daemon) with nft replaced by a recorder."""

from __future__ import annotations

from collections.abc import AsyncIterator

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


@pytest.fixture
async def listeners() -> AsyncIterator[list[trio.SocketListener]]:
    opened = await trio.open_tcp_listeners(0, host="127.0.0.1")
    yield opened
    for listener in opened:
        await listener.aclose()


async def test_lifecycle_installs_to_the_actual_address_and_removes(
    nft: Nft, listeners: list[trio.SocketListener]
) -> None:
    port = listeners[0].socket.getsockname()[1]
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
