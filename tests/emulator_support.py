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

    endpoint = url

    async def call(self, method: str, target: str, body: Any = None) -> httpio.Response:
        """One request to the emulator; returns the raw response."""
        data = b"" if body is None else msgspec.json.encode(body)
        conn = httpio.ClientConnection(await httpio.open_tcp(self.host, self.port, 5))
        try:
            headers = [("host", "emulator"), ("content-type", "application/json")]
            return await conn.request(method, target, headers, data, timeout=10)
        finally:
            await conn.aclose()

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        """One request to ``/_emulator/<path>``; returns the decoded JSON answer."""
        response = await self.call(method, "/_emulator/" + path, body)
        assert response.status < 300, response.body
        return msgspec.json.decode(response.body)

    async def action(self, **spec: Any) -> None:
        """Run one scenario action (``set_tag``, ``attach_disk``, ...) on the emulated VM."""
        await self.control("POST", "actions", spec)

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
