"""The ETag is a strong validator (CONTRACT 3): the same ETag on a target means the same bytes.

Random document edits (reordered tags or NICs, unknown fields, changed values, sections that
go missing) go through the real Store and Router; a request carrying an ETag seen before
gets 304 exactly when the bytes it would get are the ones that ETag was served with.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_api_support import EVENT_ID, LB_DOC, FakeContext, events_doc, instance_doc

from imdsd.api.access import AccessPolicy, Peer
from imdsd.api.metrics import Metrics
from imdsd.api.routes import Reply, Router
from imdsd.model import Snapshot

Raw = dict[str, Any]
TARGETS = (
    "/metadata/instance",
    "/metadata/instance/compute",
    "/metadata/instance/compute/tags?format=text",
    "/metadata/instance/compute/tagsList",
    "/metadata/instance/compute/publicKeys/0",
    "/metadata/instance/network/interface/0/macAddress?format=text",
    "/metadata/instance/network",
    "/metadata/scheduledevents",
    "/metadata/loadbalancer",
    "/metadata/versions",
    "/v1/state",
)
ROOT = Peer(1, 0, 0)


def _reverse_tags(doc: Raw) -> None:
    doc["compute"]["tagsList"].reverse()


def _reverse_keys(doc: Raw) -> None:
    doc["compute"]["publicKeys"].reverse()


def _second_nic(doc: Raw) -> None:
    nics = doc["network"]["interface"]
    if len(nics) == 1:
        extra = copy.deepcopy(nics[0])
        extra["macAddress"] = "000D3A000002"
        nics.append(extra)


def _reverse_nics(doc: Raw) -> None:
    doc["network"]["interface"].reverse()


def _unknown_field(doc: Raw) -> None:
    doc["compute"]["futureField"] = doc["compute"].get("futureField", 0) + 1


def _unknown_nic_field(doc: Raw) -> None:
    doc["network"]["interface"][0]["futureNicField"] = "x"


def _resize(doc: Raw) -> None:
    doc["compute"]["vmSize"] = "Standard_B2" if doc["compute"]["vmSize"] != "Standard_B2" else "A"


def _retag(doc: Raw) -> None:
    doc["compute"]["tagsList"][0]["value"] += "!"


def _drop_tags_list(doc: Raw) -> None:
    doc["compute"].pop("tagsList", None)


def _drop_network(doc: Raw) -> None:
    doc.pop("network", None)


EDITS: list[Callable[[Raw], None]] = [
    _reverse_tags,
    _reverse_keys,
    _second_nic,
    _reverse_nics,
    _unknown_field,
    _unknown_nic_field,
    _resize,
    _retag,
    _drop_tags_list,
    _drop_network,
]


def _apply(doc: Raw, edit: Callable[[Raw], None]) -> Raw:
    out = copy.deepcopy(doc)
    try:
        edit(out)
    except (KeyError, IndexError):
        return copy.deepcopy(doc)  # the section the edit touches is missing: no edit
    return out


def _get(router: Router, target: str, inm: str | None = None) -> Reply:
    outcome = router.route_target("GET", target, inm, ROOT)
    assert isinstance(outcome, Reply)
    return outcome


def _etag(reply: Reply) -> str | None:
    return next((v.decode() for k, v in reply.headers if k == b"etag"), None)


@settings(max_examples=150, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(EDITS), st.booleans(), st.booleans()), min_size=1, max_size=8
    )
)
def test_304_only_for_the_same_bytes(edits: list[tuple[Callable[[Raw], None], bool, bool]]) -> None:
    ctx = FakeContext()
    router = Router(ctx, AccessPolicy([], [0], []), Metrics())
    doc = instance_doc()
    events = events_doc(EVENT_ID)
    ctx.apply(Snapshot().with_instance(doc).with_scheduled_events(events).with_loadbalancer(LB_DOC))
    served: dict[tuple[str, str], bytes] = {}
    for edit, touch_events, restore in edits:
        for target in TARGETS:
            full = _get(router, target)
            etag = _etag(full)
            if full.status != 200:
                continue
            assert etag is not None
            assert served.setdefault((target, etag), full.body) == full.body
            for (seen_target, seen_etag), seen_body in served.items():
                if seen_target == target:
                    answer = _get(router, target, seen_etag)
                    assert (answer.status == 304) == (seen_body == full.body), target
        doc = instance_doc() if restore else _apply(doc, edit)
        if touch_events:
            events = {**events, "futureField": len(served)}
        snapshot = ctx.store.snapshot
        assert snapshot is not None
        ctx.apply(snapshot.with_instance(doc).with_scheduled_events(events))
