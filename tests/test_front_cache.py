"""Front answers from the cache: when the cache answers, and what it answers.

Sans-IO, apart from one daemon+emulator test (a field of unknown age in IMDS's document).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from daemon_support import emulator, write_config
from emulator_support import Emulator
from test_api_support import FETCHED, FakeContext, full_snapshot, instance_doc, started_context
from test_front_server import MD, call, front_port, imdsd_headers

from imdsd.api.access import AccessPolicy, Peer
from imdsd.api.context import Freshness
from imdsd.config import load_config
from imdsd.daemon import Daemon
from imdsd.front.cache import Answer, CacheAnswers, instance_access, redact_forwarded
from imdsd.front.rules import Endpoint, Routed
from imdsd.upstream.versions import GENERAL_VERSIONS

POLLED = {"instance": "2021-02-01", "scheduled_events": "2020-07-01", "loadbalancer": "2021-02-01"}
POLICY = AccessPolicy(["compute/userData"], allow_uids=[0])
ROOT = Peer(1, 0, 0)
AGENT = Peer(2, 1000, 1000)


def answers(ctx: FakeContext, polled: dict[str, str] | None = None) -> CacheAnswers:
    return CacheAnswers(ctx, lambda: POLLED if polled is None else polled, lambda: POLICY)


def get(endpoint: Endpoint, version: str | None, *segments: str, **query: str) -> Routed:
    return Routed(endpoint, "GET", list(segments), version, query)


def decode(body: bytes) -> Any:
    return msgspec.json.decode(body)


def test_instance_at_an_older_version_with_imdsd_headers() -> None:
    ctx = started_context()
    answer = answers(ctx).answer(get(Endpoint.INSTANCE, "2019-06-01", "compute"), ROOT)
    assert answer is not None
    compute = decode(answer.body)
    assert "storageProfile" in compute
    assert "tagsList" not in compute
    assert answer.result == "cached"
    assert dict(answer.headers) == {
        "x-imdsd-source": "cache",
        "x-imdsd-revision": str(ctx.revision),
        "x-imdsd-fetched-at": "2023-11-14T22:13:20.000Z",
        "x-imdsd-stale": "false",
    }


@pytest.mark.parametrize(
    ("version", "polled"),
    [
        ("2021-05-01", POLLED),  # newer than imdsd's
        ("2020-01-01", POLLED),  # not a version IMDS lists
        ("2021-02-01", {}),  # imdsd's own version unknown
    ],
)
def test_instance_forwarded_when_not_exact(version: str, polled: dict[str, str]) -> None:
    assert answers(started_context(), polled).answer(get(Endpoint.INSTANCE, version), ROOT) is None


def test_nothing_cached_or_never_fetched_in_this_run_is_forwarded() -> None:
    assert answers(FakeContext()).answer(get(Endpoint.INSTANCE, "2021-02-01"), ROOT) is None
    ctx = started_context()
    ctx.fresh["instance"] = Freshness(None, False)  # restored from disk
    assert answers(ctx).answer(get(Endpoint.INSTANCE, "2021-02-01"), ROOT) is None


def test_stale_answers_say_so() -> None:
    ctx = started_context()
    ctx.fresh["instance"] = Freshness(FETCHED, True)
    answer = answers(ctx).answer(get(Endpoint.INSTANCE, "2021-02-01"), ROOT)
    assert answer is not None
    assert answer.result == "stale"
    assert dict(answer.headers)["x-imdsd-stale"] == "true"


def test_restricted_paths_by_uid() -> None:
    cache = answers(started_context())
    denied = cache.answer(get(Endpoint.INSTANCE, "2021-02-01", "compute", "userData"), AGENT)
    assert denied is not None
    assert (denied.status, denied.result) == (403, "refused")
    allowed = cache.answer(
        get(Endpoint.INSTANCE, "2021-02-01", "compute", "userData", format="text"), ROOT
    )
    assert allowed is not None
    assert allowed.body == b"c2VjcmV0"
    redacted = cache.answer(get(Endpoint.INSTANCE, "2021-02-01", "compute"), AGENT)
    full = cache.answer(get(Endpoint.INSTANCE, "2021-02-01", "compute"), None)
    assert redacted is not None
    assert full is not None
    assert "userData" not in decode(redacted.body)
    assert "userData" not in decode(full.body)  # unknown peers are not privileged


def test_filtering_errors_are_imdss() -> None:
    cache = answers(started_context())
    leaf = cache.answer(get(Endpoint.INSTANCE, "2021-02-01", "compute", "vmId"), ROOT)
    missing = cache.answer(get(Endpoint.INSTANCE, "2021-02-01", "nope"), ROOT)
    assert leaf is not None
    assert missing is not None
    assert (leaf.status, missing.status) == (400, 404)
    again = cache.answer(get(Endpoint.INSTANCE, "2021-02-01", "compute", "vmId"), ROOT)
    assert again is not None
    assert again.body == leaf.body


def test_scheduled_events_by_their_own_versions() -> None:
    cache = answers(started_context())
    old = cache.answer(get(Endpoint.SCHEDULED_EVENTS, "2019-01-01"), AGENT)
    assert old is not None
    (event,) = decode(old.body)["Events"]
    assert "Description" not in event
    assert "DurationInSeconds" not in event
    assert cache.answer(get(Endpoint.SCHEDULED_EVENTS, "2021-02-01"), AGENT) is None


def test_loadbalancer_and_its_absence() -> None:
    ctx = started_context()
    cache = answers(ctx)
    assert cache.answer(get(Endpoint.LOADBALANCER, "2020-10-01"), AGENT) is not None
    assert cache.answer(get(Endpoint.LOADBALANCER, "2020-09-01"), AGENT) is None
    ctx.apply(full_snapshot().with_loadbalancer_absent())
    assert cache.answer(get(Endpoint.LOADBALANCER, "2020-10-01"), AGENT) is None


def test_versions_are_upstreams_list() -> None:
    ctx = started_context()
    cache = answers(ctx)
    assert cache.answer(get(Endpoint.VERSIONS, None), AGENT) is None
    assert cache.known_versions() == GENERAL_VERSIONS
    ctx.known_versions = ["2017-03-01", "2021-02-01"]
    answer = cache.answer(get(Endpoint.VERSIONS, None), AGENT)
    assert answer is not None
    assert decode(answer.body) == {"apiVersions": ["2017-03-01", "2021-02-01"]}
    assert cache.answer(get(Endpoint.INSTANCE, "2019-06-01"), ROOT) is None  # not listed now


@pytest.mark.parametrize(
    ("version", "polled"),
    [
        ("2021-02-01", POLLED),  # the cache could answer
        ("2021-05-01", POLLED),  # newer than imdsd's: would be forwarded
        ("2020-01-01", POLLED),  # unlisted: would be forwarded
        ("2021-02-01", {}),  # imdsd's version unknown: would be forwarded
    ],
)
def test_restricted_reads_never_reach_imds(version: str, polled: dict[str, str]) -> None:
    for ctx in (started_context(), FakeContext()):
        cache = answers(ctx, polled)
        denied = cache.answer(get(Endpoint.INSTANCE, version, "compute", "userData"), AGENT)
        assert denied is not None
        assert (denied.status, denied.result) == (403, "refused")
        assert cache.answer(get(Endpoint.INSTANCE, version, "compute", "userData"), ROOT) != denied


def _forwarded(body: bytes, content_type: str = "application/json; charset=utf-8") -> Answer:
    return Answer(200, body, content_type, (("x-imdsd-source", "upstream"),), "forwarded")


def test_forwarded_reads_above_restricted_paths_are_redacted() -> None:
    compute = {"vmId": "v", "userData": "c2VjcmV0", "tags": ""}
    whole = _forwarded(msgspec.json.encode({"compute": compute, "network": {}}))
    request = get(Endpoint.INSTANCE, "2099-01-01")
    redacted = redact_forwarded(POLICY, request, AGENT, whole)
    assert decode(redacted.body) == {"compute": {"vmId": "v", "tags": ""}, "network": {}}
    assert redact_forwarded(POLICY, request, ROOT, whole) is whole
    listing = _forwarded(b"userData\nvmId\ntags", "text/plain; charset=utf-8")
    request = get(Endpoint.INSTANCE, "2099-01-01", "compute", format="text")
    assert redact_forwarded(POLICY, request, AGENT, listing).body == b"vmId\ntags"
    broken = redact_forwarded(POLICY, get(Endpoint.INSTANCE, "2099-01-01"), AGENT, _forwarded(b"{"))
    assert broken.status == 403
    unrelated = get(Endpoint.INSTANCE, "2099-01-01", "network")
    assert redact_forwarded(POLICY, unrelated, AGENT, whole) is whole


def test_restricted_paths_match_in_any_case() -> None:
    cache = answers(started_context())
    for segments in (("compute", "USERDATA"), ("Compute", "userData", "x")):
        denied = cache.answer(get(Endpoint.INSTANCE, "2099-01-01", *segments), AGENT)
        assert denied is not None
        assert denied.status == 403
    whole = _forwarded(msgspec.json.encode({"vmId": "v", "userData": "c2VjcmV0"}))
    redacted = redact_forwarded(
        POLICY, get(Endpoint.INSTANCE, "2099-01-01", "COMPUTE"), AGENT, whole
    )
    assert decode(redacted.body) == {"vmId": "v"}


def test_restricted_paths_match_without_segment_parameters() -> None:
    # should IMDS drop ;parameters from a segment as some servers do, they must not help
    for segments in (
        ("compute", "userData;x"),
        ("compute;a", "userData"),
        ("COMPUTE;", "USERDATA"),
    ):
        assert instance_access(POLICY, segments, AGENT) == "deny"
    assert instance_access(POLICY, ("compute", "vmId;x"), AGENT) == "allow"


def test_lasting_refusals_are_remembered_while_they_hold() -> None:
    ctx = started_context()
    ctx.known_versions = ["2020-10-01", "2021-02-01"]
    cache = answers(ctx)
    old = get(Endpoint.INSTANCE, "2016-01-01", "compute")
    refused = _forwarded(msgspec.json.encode({"error": "x", "newest-versions": ["2021-02-01"]}))
    refused = Answer(400, refused.body, refused.content_type, refused.headers, "forwarded")
    assert cache.learned(old) is None
    cache.learn(old, refused)
    kept = cache.learned(get(Endpoint.INSTANCE, "2016-01-01"))
    assert kept is not None
    assert (kept.status, kept.body, kept.result) == (400, refused.body, "cached")
    assert dict(kept.headers) == {"x-imdsd-source": "cache"}
    ctx.known_versions = ["2020-10-01", "2021-02-01", "2021-05-01"]  # IMDS was updated
    assert cache.learned(old) is None
    lb = get(Endpoint.LOADBALANCER, "2020-10-01")
    absent = Answer(404, b'{"error":"none"}', "application/json", (), "forwarded")
    cache.learn(lb, absent)  # imdsd's own polls found a load balancer: not remembered
    assert cache.learned(lb) is None
    ctx.apply(full_snapshot().with_loadbalancer_absent())
    cache.learn(lb, absent)
    assert cache.learned(lb) is not None
    ctx.apply(full_snapshot())
    assert cache.learned(lb) is None
    cache.learn(get(Endpoint.IDENTITY, "2018-02-01"), refused)  # only cached endpoints
    assert cache.learned(get(Endpoint.IDENTITY, "2018-02-01")) is None


def _unknown_in(where: str) -> CacheAnswers:
    """Answers over the golden instance with a field of unknown age in compute and/or network."""
    doc = instance_doc()
    if where in ("compute", "both"):
        doc["compute"]["zzNew"] = "x"
    if where in ("network", "both"):
        doc["network"]["interface"][0]["zzNew"] = "y"
    ctx = FakeContext()
    ctx.apply(full_snapshot(doc))
    return answers(ctx)


# Read path, format; forwarded with the unknown field in compute, with it in network.
UNKNOWN_AGE_READS: list[tuple[str, str | None, bool, bool]] = [
    ("", None, True, True),
    ("", "text", False, False),  # lists compute/ and network/ only
    ("compute", None, True, False),
    ("compute", "text", True, False),  # lists zzNew
    ("compute/vmSize", "text", False, False),
    ("compute/vmSize", None, False, False),  # IMDS's 400 for json on a leaf
    ("compute/zzNew", "text", True, False),
    ("compute/ZZNEW", "text", True, False),
    ("compute/zzNew/below", None, True, False),
    ("compute/storageProfile", None, False, False),
    ("compute/storageProfile/osDisk", "text", False, False),
    ("compute/absent", None, False, False),  # IMDS's 404
    ("compute/tagsList", None, False, False),  # newer than the version: 404
    ("network", None, False, True),
    ("network", "text", False, False),
    ("network/interface", None, False, True),
    ("network/interface", "text", False, False),  # lists 0/
    ("network/interface/0", None, False, True),
    ("network/interface/0", "text", False, True),  # lists zzNew
    ("network/interface/0/zzNew", "text", False, True),
    ("network/interface/0/ipv4", None, False, False),
    ("network/interface/0/macAddress", "text", False, False),
    ("network/interface/1", None, False, False),  # IMDS's 404
]


@pytest.mark.parametrize("where", ["compute", "network", "both"])
@pytest.mark.parametrize(("path", "fmt", "in_compute", "in_network"), UNKNOWN_AGE_READS)
def test_a_field_of_unknown_age_forwards_only_the_reads_that_show_it(
    where: str, path: str, fmt: str | None, in_compute: bool, in_network: bool
) -> None:
    """At an older api-version, a read is forwarded only when the field of unknown age lies
    in what was asked for (or on the way to it); every other read is answered from the cache,
    exactly as from a document without that field. At the polled version all are cached."""
    forwarded = {"compute": in_compute, "network": in_network, "both": in_compute or in_network}
    query = {} if fmt is None else {"format": fmt}
    for peer in (ROOT, AGENT):
        older = get(Endpoint.INSTANCE, "2020-09-01", *path.split("/") if path else [], **query)
        answer = _unknown_in(where).answer(older, peer)
        assert (answer is None) == forwarded[where]
        if answer is not None:
            assert answer.result == "cached"
            assert answer == _unknown_in("nowhere").answer(older, peer)
        polled = Routed(Endpoint.INSTANCE, "GET", older.segments, "2021-02-01", query)
        assert _unknown_in(where).answer(polled, peer) is not None


@asynccontextmanager
async def quiet_front(tmp: Path, emu: Emulator) -> AsyncIterator[Daemon]:
    """A daemon with its front polling ``emu`` once (the next polls are ten minutes away)."""
    polls = {"instance": "600s", "scheduled_events": "600s", "loadbalancer": "600s"}
    config = write_config(tmp, emu.url, **polls)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    daemon = Daemon(load_config(str(config)), str(config), front_inherited=[listener])
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        yield daemon
        daemon.stop()


UNRELATED_READS = [
    *30 * ["/metadata/instance/compute/vmSize?api-version=2021-02-01"],  # the review's case
    "/metadata/instance/compute/vmSize?api-version=2021-02-01&format=text",
    "/metadata/instance/compute/storageProfile?api-version=2021-02-01",
    "/metadata/instance/compute/tags?api-version=2019-06-01&format=text",
    "/metadata/instance/network?api-version=2021-02-01",
    "/metadata/instance/network/interface/0/macAddress?api-version=2017-08-01&format=text",
    "/metadata/instance?api-version=2021-02-01&format=text",
]


async def test_a_new_imds_field_leaves_unrelated_reads_at_older_versions_cached(
    tmp_path: Path,
) -> None:
    async with emulator(rate_limit=0) as emu:
        await emu.control("PATCH", "instance", {"compute": {"zzNew": "x"}})
        async with quiet_front(tmp_path, emu) as daemon:
            with trio.fail_after(10):
                while not (
                    (snapshot := daemon.keeper.snapshot)
                    and snapshot.instance_raw
                    and snapshot.scheduled_events_raw is not None
                    and snapshot.loadbalancer_raw is not None
                ):
                    await trio.sleep(0.05)
            assert "zzNew" in snapshot.instance_raw["compute"]
            await trio.testing.wait_all_tasks_blocked()
            port = front_port(daemon)
            asked = (await emu.stats())["total"]
            ours: dict[int, Any] = {}
            async with trio.open_nursery() as nursery:
                for index, target in enumerate(UNRELATED_READS):

                    async def read(index: int = index, target: str = target) -> None:
                        ours[index] = await call(port, "GET", target, [MD])

                    nursery.start_soon(read)
            unchanged = (await emu.stats())["total"]
            shown = await call(
                port, "GET", "/metadata/instance/compute?api-version=2021-02-01", [MD]
            )
            grown = (await emu.stats())["total"]
            theirs = [await call(emu.port, "GET", target, [MD]) for target in UNRELATED_READS]
    assert unchanged == asked
    assert grown == asked + 1  # a read showing zzNew is still forwarded
    assert imdsd_headers(shown)["x-imdsd-source"] == "upstream"
    for index, target in enumerate(UNRELATED_READS):
        answer = ours[index]
        assert imdsd_headers(answer)["x-imdsd-source"] == "cache", target
        assert (answer.status, answer.body) == (theirs[index].status, theirs[index].body), target
