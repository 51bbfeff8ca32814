"""An in-process emulator on an ephemeral port and a client of its control API (for tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from imdsd import httpio
from imdsd.emulator.server import EmulatorConfig, serve_emulator


@dataclass
class Emulator:
    """A running emulator and a way to drive its control API."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """The emulator's base URL."""
        return f"http://{self.host}:{self.port}"

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        """One request to ``/_emulator/<path>``; returns the decoded JSON answer."""
        stream = await httpio.open_tcp(self.host, self.port, 5)
        conn = httpio.ClientConnection(stream)
        try:
            payload = b"" if body is None else msgspec.json.encode(body)
            response = await conn.request(
                method, "/_emulator/" + path, [("Host", "emulator")], payload, timeout=5
            )
        finally:
            await conn.aclose()
        assert response.status < 300, response.body
        return msgspec.json.decode(response.body)

    async def stats(self) -> dict[str, Any]:
        """Request counts by path and status, and the peak requests per second."""
        result: dict[str, Any] = await self.control("GET", "stats")
        return result

    async def fault(self, **spec: Any) -> None:
        """Queue one fault."""
        await self.control("POST", "faults", spec)

    async def faults(self, *specs: dict[str, Any]) -> None:
        """Queue several faults."""
        await self.control("POST", "faults", list(specs))


async def start_emulator(nursery: trio.Nursery, profile: str = "azure") -> Emulator:
    """Start an emulator in ``nursery`` on an ephemeral loopback port."""
    host, port = await nursery.start(serve_emulator, EmulatorConfig(port=0, profile=profile))
    return Emulator(host, port)
