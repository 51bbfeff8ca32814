"""The sans-IO router: every route shape, headers, 304, errors, caching and redaction."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_api_support import (
    EVENT_ID,
    FETCHED,
    FakeContext,
    events_doc,
    full_snapshot,
    instance_doc,
    started_context,
)

from imdsd.api.access import AccessPolicy, Peer
from imdsd.api.context import Freshness
from imdsd.api.metrics import Metrics
from imdsd.api.routes import (
    ApproveCall,
    EventsCall,
    Outcome,
    Reply,
    Router,
    WatchCall,
    body_etag,
    etag_matches,
    parse_kinds,
    parse_wait,
)
from imdsd.model import Snapshot
from imdsd.upstream.versions import GENERAL_VERSIONS

ROOT = Peer(1, 0, 0)
USER = Peer(2, 1000, 1000)


def make_router(ctx: FakeContext) -> Router:
    policy = AccessPolicy(["compute/userData", "compute/customData"], [0], [])
    return Router(ctx, policy, Metrics(), live=lambda: {"watchers": 3, "connections": 4})


def call(
    router: Router,
    target: str,
    *,
    method: str = "GET",
    inm: str | None = None,
    peer: Peer | None = ROOT,
) -> Outcome:
    return router.route_target(method, target, inm, peer)


def reply(router: Router, target: str, **kwargs: Any) -> Reply:
    outcome = call(router, target, **kwargs)
    assert isinstance(outcome, Reply), outcome
    return outcome


def header(r: Reply, name: str) -> str | None:
    for key, value in r.headers:
        if key == name.encode():
            return value.decode()
    return None


def body(r: Reply) -> Any:
    return json.loads(r.body)


@pytest.fixture
def router() -> Router:
    return make_router(started_context())


def test_whole_instance_as_json(router: Router) -> None:
    r = reply(router, "/metadata/instance?api-version=2021-02-01")
    assert r.status == 200
    assert header(r, "content-type") == "application/json; charset=utf-8"
    assert body(r) == instance_doc()


def test_route_filtering_shapes(router: Router) -> None:
    leaf = reply(router, "/metadata/instance/compute/vmSize")
    assert body(leaf) == "Standard_A3"
    text_leaf = reply(router, "/metadata/instance/compute/vmSize?format=text")
    assert text_leaf.body == b"Standard_A3"
    assert header(text_leaf, "content-type") == "text/plain; charset=utf-8"
    listing = reply(router, "/metadata/instance/network/interface/0?format=text")
    assert listing.body == b"ipv4/\nipv6/\nmacAddress"
    array = reply(router, "/metadata/instance/compute/publicKeys?format=text")
    assert array.body == b"0/\n1/"
    nested = reply(router, "/metadata/instance/network/interface/0/ipv4/ipAddress/0")
    assert body(nested)["privateIpAddress"] == "10.144.133.132"
    root = reply(router, "/metadata/instance/?format=text")
    assert root.body == b"compute/\nnetwork/"


def test_cached_read_headers(router: Router) -> None:
    r = reply(router, "/metadata/instance/compute/tags?format=text")
    assert header(r, "etag") == body_etag(r.body).decode()
    assert header(r, "x-imdsd-revision") == "1"
    assert header(r, "x-imdsd-fetched-at") == "2023-11-14T22:13:20.000Z"
    assert header(r, "x-imdsd-stale") == "false"


@pytest.mark.parametrize("inm", ["{}", "W/{}", '"0", W/{}', "*", ' "7" ,{} '])
def test_if_none_match_gives_304(router: Router, inm: str) -> None:
    for target in (
        "/metadata/instance/compute/tags",
        "/metadata/scheduledevents",
        "/metadata/loadbalancer",
        "/v1/state",
        "/metadata/versions",
    ):
        etag = header(reply(router, target), "etag")
        assert etag is not None
        r = reply(router, target, inm=inm.format(etag))
        assert r.status == 304
        assert r.body == b""
        assert header(r, "etag") == etag
        assert header(r, "x-imdsd-revision") == "1"


def test_other_etag_gives_200(router: Router) -> None:
    assert reply(router, "/metadata/instance", inm='"2", W/"1", "*"').status == 200
    assert not etag_matches(None, '"1"')
    assert not etag_matches('"11"', '"1"')
    assert etag_matches('W/"1"', '"1"')


def test_errors(router: Router) -> None:
    missing = reply(router, "/metadata/instance/compute/nope")
    assert missing.status == 404
    assert "nope" in body(missing)["error"]
    assert reply(router, "/metadata/instance/compute/publicKeys/9").status == 404
    bad_format = reply(router, "/metadata/instance?format=xml")
    assert bad_format.status == 400
    assert "xml" in body(bad_format)["error"]
    assert reply(router, "/metadata/instance?format=json&format=text").status == 400
    assert reply(router, "/metadata/scheduledevents?format=text").status == 400
    unknown = reply(router, "/nothing/here")
    assert unknown.status == 404
    assert body(unknown) == {"error": "no such path: /nothing/here"}
    wrong = reply(router, "/metadata/instance", method="POST")
    assert wrong.status == 405
    assert header(wrong, "allow") == "GET"
    assert reply(router, "/v1/state", method="DELETE").status == 405
    approve_get = reply(router, f"/v1/scheduled-events/{EVENT_ID}/approve")
    assert approve_get.status == 405
    assert header(approve_get, "allow") == "POST"


def test_before_first_snapshot_everything_cached_is_503() -> None:
    router = make_router(FakeContext())
    for target in (
        "/metadata/instance",
        "/metadata/instance/compute",
        "/metadata/scheduledevents",
        "/metadata/loadbalancer",
        "/v1/state",
        "/v1/watch",
        "/v1/events?since=0",
    ):
        r = reply(router, target)
        assert r.status == 503, target
        assert "error" in body(r)
    health = reply(router, "/v1/health")
    assert health.status == 503
    assert body(health)["status"] == "starting"
    assert reply(router, "/metadata/versions").status == 200
    assert reply(router, "/metrics").status == 200


def test_starting_until_the_instance_is_known() -> None:
    ctx = FakeContext()
    ctx.apply(Snapshot().with_scheduled_events(events_doc(EVENT_ID)))
    router = make_router(ctx)
    for target in ("/metadata/instance", "/v1/state", "/v1/watch", "/v1/events?since=1"):
        assert reply(router, target).status == 503, target
    assert body(reply(router, "/v1/health"))["status"] == "starting"
    events = reply(router, "/metadata/scheduledevents")
    assert body(events)["Events"][0]["EventId"] == EVENT_ID


def test_replies_are_built_once_per_revision() -> None:
    ctx = started_context()
    router = make_router(ctx)
    first = reply(router, "/metadata/instance/compute/tags?format=text")
    again = reply(router, "/metadata/instance/compute/tags?format=text&api-version=x")
    assert again is first
    assert reply(router, "/v1/state") is reply(router, "/v1/state")
    ctx.tag("env", "prod")
    changed = reply(router, "/metadata/instance/compute/tags?format=text")
    assert changed is not first
    assert changed.body == b"baz:bash;foo:bar;env:prod"
    assert header(changed, "etag") == body_etag(changed.body).decode() != header(first, "etag")
    ctx.fresh["instance"] = Freshness(FETCHED + 10, True)
    refreshed = reply(router, "/metadata/instance/compute/tags?format=text")
    assert refreshed is not changed
    assert header(refreshed, "x-imdsd-stale") == "true"
    assert header(refreshed, "x-imdsd-fetched-at") == "2023-11-14T22:13:30.000Z"
    assert reply(router, "/metadata/instance/compute/tags?format=text") is refreshed


def test_instance_reads_are_found_again_by_raw_target() -> None:
    ctx = started_context()
    router = make_router(ctx)
    target = "/metadata/instance/compute/tags?format=text"
    first = reply(router, target)
    assert reply(router, target) is first
    assert reply(router, target, inm=header(first, "etag")).status == 304
    assert reply(router, target, method="POST").status == 405
    encoded = reply(router, "/metadata/instance/compute/vm%53ize?format=%74ext")
    assert encoded.body == b"Standard_A3"
    assert reply(router, "/metadata/instance/compute/vm%53ize?format=%74ext") is encoded
    assert reply(router, target + "&format=json").status == 400
    long_target = target + "&pad=" + "x" * 600  # answered, not remembered
    assert reply(router, long_target).body == first.body
    assert len(router._by_target) == 2
    # the same target at another access level is answered for that level
    compute = "/metadata/instance/compute"
    assert "userData" in body(reply(router, compute, peer=ROOT))
    assert "userData" not in body(reply(router, compute, peer=USER))
    assert "userData" in body(reply(router, compute, peer=ROOT))
    # a new revision, new freshness or a new policy each give a fresh reply
    ctx.tag("env", "prod")
    tagged = reply(router, target)
    assert tagged.body == b"baz:bash;foo:bar;env:prod"
    ctx.fresh["instance"] = Freshness(FETCHED + 5, True)
    stale = reply(router, target)
    assert stale is not tagged
    assert header(stale, "x-imdsd-stale") == "true"
    router.reset(AccessPolicy(["compute/tags"], [0], []))
    assert reply(router, target, peer=USER).status == 403
    assert reply(router, target, peer=ROOT).body == tagged.body


def test_snapshot_change_without_revision_is_served_under_a_new_etag() -> None:
    ctx = started_context()
    router = make_router(ctx)
    target = "/metadata/instance/compute/publicKeys/0/keyData"
    before = reply(router, target)
    unchanged = reply(router, "/metadata/instance/compute/vmSize")
    reordered = instance_doc()
    reordered["compute"]["publicKeys"].reverse()
    assert ctx.apply(full_snapshot(reordered)) is None
    assert ctx.revision == 1
    after = reply(router, target, inm=header(before, "etag"))
    assert (after.status, body(after)) == (200, "ssh-rsa 1")
    assert header(before, "etag") != header(after, "etag")
    same = reply(router, "/metadata/instance/compute/vmSize", inm=header(unchanged, "etag"))
    assert same.status == 304  # the same bytes keep their ETag


def test_documents() -> None:
    ctx = started_context()
    router = make_router(ctx)
    events = reply(router, "/metadata/scheduledevents?api-version=2020-07-01")
    assert body(events)["Events"][0]["EventId"] == EVENT_ID
    lb = reply(router, "/metadata/loadbalancer")
    assert body(lb)["loadbalancer"]["publicIpAddresses"][0]["frontendIpAddress"] == "51.0.0.1"
    snapshot = ctx.snapshot
    assert snapshot is not None
    ctx.apply(snapshot.with_loadbalancer_absent())
    absent = reply(router, "/metadata/loadbalancer")
    assert absent.status == 404
    assert "Load Balancer" in body(absent)["error"]
    assert header(absent, "x-imdsd-revision") == str(ctx.revision)


def test_disabled_and_unfetched_endpoints() -> None:
    ctx = FakeContext()
    ctx.apply(Snapshot().with_instance(instance_doc()))
    ctx.fresh["loadbalancer"] = Freshness(None, False, enabled=False)
    router = make_router(ctx)
    disabled = reply(router, "/metadata/loadbalancer")
    assert disabled.status == 404
    assert "not polled" in body(disabled)["error"]
    assert reply(router, "/metadata/scheduledevents").status == 503
    state = body(reply(router, "/v1/state"))
    assert state["scheduled_events"] is None
    assert state["loadbalancer"] is None


def test_versions() -> None:
    ctx = started_context()
    router = make_router(ctx)
    assert body(reply(router, "/metadata/versions"))["apiVersions"] == list(GENERAL_VERSIONS)
    ctx.known_versions = ["2021-01-01", "2020-09-01"]
    known = reply(router, "/metadata/versions")
    assert body(known) == {"apiVersions": ["2021-01-01", "2020-09-01"]}
    assert reply(router, "/metadata/versions") is known


def test_state_document() -> None:
    ctx = started_context()
    ctx.fresh["scheduled_events"] = Freshness(FETCHED + 5, True)
    ctx.fresh["loadbalancer"] = Freshness(FETCHED - 60, False)
    router = make_router(ctx)
    state = body(reply(router, "/v1/state"))
    assert set(state) == {
        "revision",
        "fetched_at",
        "stale",
        "instance",
        "scheduled_events",
        "loadbalancer",
    }
    assert state["revision"] == 1
    assert state["fetched_at"] == "2023-11-14T22:12:20.000Z"
    assert state["stale"] is True
    assert state["instance"]["compute"]["userData"] == "c2VjcmV0"
    assert state["scheduled_events"]["Events"][0]["EventId"] == EVENT_ID


def test_restricted_paths_for_unprivileged_peers(router: Router) -> None:
    denied = reply(router, "/metadata/instance/compute/userData?format=text", peer=USER)
    assert denied.status == 403
    assert "compute/userData" in body(denied)["error"]
    assert reply(router, "/metadata/instance/compute/customData", peer=None).status == 403
    assert reply(router, "/metadata/instance/compute/userData", peer=ROOT).status == 200
    listing = reply(router, "/metadata/instance/compute?format=text", peer=USER).body.split()
    assert b"vmSize" in listing
    assert b"userData" not in listing
    assert b"customData" not in listing
    whole = body(reply(router, "/metadata/instance", peer=USER))
    assert "userData" not in whole["compute"]
    assert whole["network"] == instance_doc()["network"]
    assert "userData" in body(reply(router, "/metadata/instance", peer=ROOT))["compute"]
    state = body(reply(router, "/v1/state", peer=USER))
    assert "userData" not in state["instance"]["compute"]
    assert "userData" in body(reply(router, "/v1/state", peer=ROOT))["instance"]["compute"]
    unrelated = reply(router, "/metadata/instance/compute/vmSize", peer=USER)
    assert unrelated is reply(router, "/metadata/instance/compute/vmSize", peer=ROOT)


def test_health() -> None:
    ctx = started_context()
    router = make_router(ctx)
    ok = reply(router, "/v1/health")
    assert ok.status == 200
    doc = body(ok)
    assert doc["status"] == "ok"
    assert doc["revision"] == 1
    assert doc["watchers"] == 3
    assert doc["connections"] == 4
    assert doc["hooks"] == [{"name": "remount", "running": False}]
    ctx.health_doc = {"status": "degraded", "endpoints": {"instance": {"state": "stale"}}}
    degraded = reply(router, "/v1/health")
    assert degraded.status == 200
    assert body(degraded)["endpoints"]["instance"]["state"] == "stale"
    ctx.health_doc = {"status": "starting"}
    assert reply(router, "/v1/health").status == 503


def test_metrics_route(router: Router) -> None:
    r = reply(router, "/metrics")
    assert header(r, "content-type") == "text/plain; version=0.0.4; charset=utf-8"
    assert b"\nimdsd_revision 1\n" in r.body


def test_watch_and_events_calls(router: Router) -> None:
    assert call(router, "/v1/watch") == WatchCall(None, None, "full")
    assert call(router, "/v1/watch?since=1&kinds=tags,disks", peer=USER) == WatchCall(
        1, frozenset({"tags", "disks"}), "redacted"
    )
    assert call(router, "/v1/events?since=0&wait=2s") == EventsCall(0, None, 2.0, "full")
    assert call(router, "/v1/events?since=0&wait=1h") == EventsCall(0, None, 300.0, "full")
    for target in (
        "/v1/watch?since=-1",
        "/v1/watch?since=abc",
        "/v1/watch?kinds=tags,bogus",
        "/v1/watch?kinds=",
        "/v1/watch?since=1&since=2",
        "/v1/events",
        "/v1/events?since=1&wait=soon",
        "/v1/events?since=1&wait=-1s",
    ):
        r = reply(router, target)
        assert r.status == 400, target
        assert body(r)["error"]


def test_parse_helpers() -> None:
    assert parse_kinds(None) is None
    assert parse_kinds("tags,disks,network,scheduled_events,compute,loadbalancer") is None
    assert parse_kinds(" tags ") == frozenset({"tags"})
    assert parse_wait(None) == 30.0
    assert parse_wait("0") == 0.0
    assert parse_wait("1.5") == 1.5
    assert parse_wait("500ms") == 0.5


def test_approve_checks(router: Router) -> None:
    target = f"/v1/scheduled-events/{EVENT_ID.lower()}/approve"
    assert call(router, target, method="POST") == ApproveCall(EVENT_ID, ROOT)
    forbidden = reply(router, target, method="POST", peer=USER)
    assert forbidden.status == 403
    unknown = reply(router, "/v1/scheduled-events/nope/approve", method="POST")
    assert unknown.status == 404
    assert "nope" in body(unknown)["error"]
    assert reply(make_router(FakeContext()), target, method="POST").status == 503
