"""An in-memory ApiContext for the API tests (the real Store, diff and Broadcaster), and
helpers to run an ApiServer on a unix socket in tmp_path; with tests of the fake itself."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import trio

from imdsd.api.context import ENDPOINTS, Endpoint, Freshness
from imdsd.api.server import ApiServer, open_listeners
from imdsd.broadcast import Broadcaster, Subscription
from imdsd.changes import diff
from imdsd.config import ServerConfig
from imdsd.frames import ChangeFrame, GoneFrame
from imdsd.httpio import ClientConnection, Response, ServerLimits, open_unix
from imdsd.model import Snapshot
from imdsd.store import Store

DATA = Path(__file__).parent / "data"
FETCHED = 1_700_000_000.0
EVENT_ID = "C7061BAC-AFDC-4513-B24B-AA5F13A16123"


def instance_doc(**compute: Any) -> dict[str, Any]:
    """The golden Linux instance with userData/customData set and ``compute`` overrides."""
    doc: dict[str, Any] = json.loads((DATA / "instance-linux.json").read_text())
    doc["compute"]["userData"] = "c2VjcmV0"
    doc["compute"]["customData"] = ""
    doc["compute"].update(compute)
    return doc


def with_tag(doc: dict[str, Any], name: str, value: str) -> dict[str, Any]:
    """A copy of ``doc`` with tag ``name`` set (in the ``tags`` string)."""
    new = copy.deepcopy(doc)
    pairs = [p for p in new["compute"]["tags"].split(";") if p and not p.startswith(name + ":")]
    new["compute"]["tags"] = ";".join([*pairs, f"{name}:{value}"])
    return new


def events_doc(*event_ids: str, incarnation: int = 1) -> dict[str, Any]:
    """A scheduled events document with one Reboot event per id for ``examplevmname``."""
    return {
        "DocumentIncarnation": incarnation,
        "Events": [
            {
                "EventId": event_id,
                "EventType": "Reboot",
                "ResourceType": "VirtualMachine",
                "Resources": ["examplevmname"],
                "EventStatus": "Scheduled",
                "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT",
                "Description": "",
                "EventSource": "Platform",
                "DurationInSeconds": 10,
            }
            for event_id in event_ids
        ],
    }


LB_DOC: dict[str, Any] = {
    "loadbalancer": {
        "publicIpAddresses": [{"frontendIpAddress": "51.0.0.1", "privateIpAddress": "10.1.0.4"}],
        "inboundRules": [],
        "outboundRules": [],
    }
}


def full_snapshot(doc: dict[str, Any] | None = None) -> Snapshot:
    """A snapshot with every endpoint fetched."""
    return (
        Snapshot()
        .with_instance(doc if doc is not None else instance_doc())
        .with_scheduled_events(events_doc(EVENT_ID))
        .with_loadbalancer(LB_DOC)
    )


class FakeContext:
    """ApiContext over a real Store and Broadcaster; ``apply`` publishes like the daemon."""

    def __init__(self, history: int = 100) -> None:
        self.store: Store[Snapshot] = Store(diff=diff, snapshot_type=Snapshot, history=history)
        self.broadcaster = Broadcaster()
        self.listeners: list[Callable[[ChangeFrame], None]] = []
        self.fresh: dict[Endpoint, Freshness] = dict.fromkeys(ENDPOINTS, Freshness(FETCHED, False))
        self.health_doc: dict[str, Any] = {"status": "ok", "endpoints": {}}
        self.known_versions: list[str] | None = None
        self.approvals: list[str] = []
        self.approve_answer: tuple[int, bytes] | Exception = (200, b"")
        self.approve_delay = 0.0
        self.clock = FETCHED

    @property
    def snapshot(self) -> Snapshot | None:
        return self.store.snapshot

    @property
    def revision(self) -> int:
        return self.store.revision

    def freshness(self, endpoint: Endpoint) -> Freshness:
        return self.fresh[endpoint]

    def frames_since(self, since: int) -> list[ChangeFrame] | GoneFrame:
        return self.store.frames_since(since)

    def subscribe(self, max_pending: int, after: int) -> Subscription:
        return self.broadcaster.subscribe(max_pending, after)

    def health(self) -> Mapping[str, Any]:
        return self.health_doc

    def hook_status(self) -> Sequence[Any]:
        return [{"name": "remount", "running": False}]

    def versions(self) -> Sequence[str] | None:
        return self.known_versions

    async def approve(self, event_id: str) -> tuple[int, bytes]:
        self.approvals.append(event_id)
        await trio.sleep(self.approve_delay)
        if isinstance(self.approve_answer, Exception):
            raise self.approve_answer
        return self.approve_answer

    def apply(self, snapshot: Snapshot) -> ChangeFrame | None:
        """Make ``snapshot`` current and publish its frame, as the daemon does."""
        self.clock += 1
        frame = self.store.apply(snapshot, self.clock)
        if frame is not None:
            for listener in self.listeners:
                listener(frame)
            self.broadcaster.publish(frame)
        return frame

    def tag(self, name: str, value: str) -> ChangeFrame:
        """Set a tag on the current instance; returns the published frame."""
        snapshot = self.store.snapshot
        assert snapshot is not None
        assert snapshot.instance_raw is not None
        frame = self.apply(snapshot.with_instance(with_tag(snapshot.instance_raw, name, value)))
        assert frame is not None
        return frame


def started_context() -> FakeContext:
    """A context holding a full first snapshot (revision 1)."""
    ctx = FakeContext()
    ctx.apply(full_snapshot())
    return ctx


def server_config(path: Path | str, **overrides: Any) -> ServerConfig:
    """A ServerConfig for a socket at ``path`` (no group change, short heartbeat)."""
    values: dict[str, Any] = {"socket": str(path), "socket_group": "", "heartbeat": 30.0}
    values.update(overrides)
    return msgspec.structs.replace(ServerConfig(), **values)


@asynccontextmanager
async def running_api(
    tmp_path: Path,
    ctx: FakeContext,
    *,
    limits: ServerLimits | None = None,
    max_pending: int = 1024,
    write_timeout: float = 30.0,
    **overrides: Any,
) -> AsyncIterator[tuple[str, ApiServer]]:
    """Serve ``ctx`` on ``tmp_path/api.sock`` while the block runs."""
    config = server_config(tmp_path / "api.sock", **overrides)
    api = ApiServer(
        ctx, config, limits=limits, max_pending=max_pending, write_timeout=write_timeout
    )
    ctx.listeners.append(api.deliver)
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve, open_listeners(config))
        yield config.socket, api
        nursery.cancel_scope.cancel()


async def get(path: str, target: str, *headers: tuple[str, str]) -> Response:
    """One request on a fresh connection."""
    client = ClientConnection(await open_unix(path, 2))
    try:
        return await client.request("GET", target, [("host", "imdsd"), *headers], timeout=5)
    finally:
        await client.aclose()


def body_json(response: Response) -> Any:
    """The response body decoded as JSON."""
    return json.loads(response.body)


# ------------------------------------------------------------------ the fake's own contract


def test_fake_context_publishes_each_change_once() -> None:
    ctx = started_context()
    assert ctx.revision == 1
    assert ctx.frames_since(1) == []
    subscription = ctx.subscribe(10, 1)
    frame = ctx.tag("env", "prod")
    assert frame.revision == 2
    assert [c.key for c in frame.changes] == ["env"]
    assert subscription.receive_nowait() == frame
    assert ctx.frames_since(1) == [frame]


def test_same_snapshot_makes_no_revision() -> None:
    ctx = started_context()
    assert ctx.apply(full_snapshot()) is None
    assert ctx.revision == 1
