"""The front's IMDS request rules (sans-IO), compared with the emulator's where both judge."""

from __future__ import annotations

from urllib.parse import unquote

import msgspec
import pytest

from imdsd.emulator.profiles import AZURE
from imdsd.emulator.rules import RequestRules
from imdsd.filtering import split_path
from imdsd.front.rules import (
    Endpoint,
    Refusal,
    Routed,
    check,
    classify,
    newest_versions,
    origin_form,
)
from imdsd.imdsrules import NO_API_VERSION, NO_METADATA_HEADER, Rejection

VERSIONS = list(AZURE.versions)
MD = [("Metadata", "true")]
SE = "/metadata/scheduledevents?api-version=2020-07-01"

REFUSED = [
    ("GET", "/metadata/instance?api-version=2021-02-01", []),
    ("GET", "/metadata/instance?api-version=2021-02-01", [("Metadata", "false")]),
    ("GET", "/metadata/instance?api-version=2021-02-01", [*MD, ("X-Forwarded-For", "1.2.3.4")]),
    ("GET", "/metadata/instance?api-version=2021-02-01&api-version=2021-02-01", MD),
    ("GET", "/metadata/instance?api-version=2021-02-01&format=json&format=text", MD),
    ("POST", "/metadata/instance?api-version=2021-02-01", MD),
    ("PUT", "/metadata/scheduledevents?api-version=2020-07-01", MD),
    ("DELETE", "/metadata/versions", MD),
    ("GET", "/metadata/instance", MD),
    ("GET", "/metadata/instance/compute?format=text", MD),
    ("GET", "/metadata/scheduledevents", MD),
    ("GET", "/metadata/loadbalancer", MD),
    ("GET", "/metadata/identity/oauth2/token?resource=x", []),
    ("GET", "/nowhere", [("X-Forwarded-For", "10.0.0.1")]),
]


@pytest.mark.parametrize(("method", "target", "headers"), REFUSED)
def test_refusals_are_the_emulators(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    ours = check(method, target, headers, VERSIONS)
    theirs = RequestRules(AZURE).check(method, target, headers, 0.0)
    assert isinstance(ours, Refusal)
    assert isinstance(theirs, Rejection)
    assert ours.status == theirs.status
    assert msgspec.json.decode(ours.body) == theirs.body
    assert dict(ours.headers) == dict(theirs.headers)


def test_missing_header_message_is_imdss() -> None:
    refused = check("GET", "/metadata/instance?api-version=2021-02-01", [], VERSIONS)
    assert isinstance(refused, Refusal)
    assert msgspec.json.decode(refused.body) == {"error": NO_METADATA_HEADER}


def test_missing_api_version_lists_the_newest_three() -> None:
    refused = check("GET", "/metadata/instance", MD, ["2020-07-15", "2020-10-01", "2020-09-01"])
    assert isinstance(refused, Refusal)
    assert msgspec.json.decode(refused.body) == {
        "error": NO_API_VERSION,
        "newest-versions": ["2020-10-01", "2020-09-01", "2020-07-15"],
    }


def test_newest_versions_per_endpoint() -> None:
    assert newest_versions(Endpoint.LOADBALANCER, ["2019-06-01", "2020-10-01"]) == ["2020-10-01"]
    assert newest_versions(Endpoint.SCHEDULED_EVENTS, VERSIONS) == [
        "2020-07-01",
        "2019-08-01",
        "2019-04-01",
    ]


@pytest.mark.parametrize(
    ("method", "target", "endpoint", "forwarded"),
    [
        ("GET", "/metadata/instance/compute/tags?api-version=2021-02-01", Endpoint.INSTANCE, False),
        ("GET", "/metadata/versions", Endpoint.VERSIONS, False),
        ("HEAD", "/metadata/versions", Endpoint.VERSIONS, False),
        ("HEAD", "/metadata/identity/oauth2/token?resource=r", Endpoint.IDENTITY, True),
        ("GET", SE, Endpoint.SCHEDULED_EVENTS, False),
        ("POST", SE, Endpoint.SCHEDULED_EVENTS, True),
        ("GET", "/metadata/loadbalancer?api-version=2020-10-01", Endpoint.LOADBALANCER, False),
        ("GET", "/metadata/identity/oauth2/token?resource=r", Endpoint.IDENTITY, True),
        ("POST", "/metadata/identity/oauth2/token?resource=r", Endpoint.IDENTITY, True),
        ("GET", "/metadata/attested/document?api-version=2020-09-01", Endpoint.OTHER, True),
        ("GET", "/metadata/unknown?api-version=2020-09-01", Endpoint.OTHER, True),
        ("GET", "/", Endpoint.OTHER, True),
    ],
)
def test_accepted_requests_are_routed(
    method: str, target: str, endpoint: Endpoint, forwarded: bool
) -> None:
    routed = check(method, target, MD, VERSIONS)
    assert isinstance(routed, Routed)
    assert routed.endpoint is endpoint
    assert routed.forwarded is forwarded


def test_route_segments_and_query_are_decoded() -> None:
    routed = check(
        "GET", "/metadata/instance/compute/tags%4C?api-version=2021-02-01&format=text", MD, []
    )
    assert isinstance(routed, Routed)
    assert routed.segments == ["compute", "tagsL"]
    assert routed.query == {"api-version": "2021-02-01", "format": "text"}


def test_absolute_form_targets() -> None:
    assert origin_form("http://169.254.169.254/metadata/versions") == "/metadata/versions"
    assert origin_form("http://169.254.169.254") == "/"
    assert origin_form("/metadata/instance?x=1") == "/metadata/instance?x=1"
    assert classify("/metadata/instance/")[0] is Endpoint.INSTANCE


UD = "api-version=2021-02-01&format=text"
USER_DATA = "/metadata/instance/compute/userData"
SPELLINGS = [
    f"/METADATA/INSTANCE/compute/userData?{UD}",
    f"/metadata/Instance/compute/userData?{UD}",
    f"/Metadata/instance/compute/userData?{UD}",
    f"/metadata/x/../instance/compute/userData?{UD}",
    f"/metadata/instance/compute/x/../userData?{UD}",
    f"/metadata/instance/compute/./userData?{UD}",
    f"/metadata/instance/compute/x/%2e%2e/userData?{UD}",
    f"/metadata/instance/compute/x/%2E./userData?{UD}",
    f"/metadata/instance/compute/x%2F..%2FuserData?{UD}",
    f"/metadata/instance/compute/x%5C..%5CuserData?{UD}",
    f"/metadata/instance/compute%2FuserData?{UD}",
    f"%2Fmetadata%2Finstance%2Fcompute%2FuserData?{UD}",
    f"/metadata/instance/compute/%75serData?{UD}",
    f"/metadata/%69nstance/compute/userData?{UD}",
    f"//metadata//instance//compute//userData?{UD}",
    f"/metadata/instance/compute/userData/?{UD}",
    f"http://169.254.169.254/metadata/x/../instance/compute/userData?{UD}",
    f"/metadata/instance/compute/userData%FF?{UD}",
]


@pytest.mark.parametrize("target", SPELLINGS)
def test_every_spelling_of_a_path_is_judged_as_what_is_forwarded(target: str) -> None:
    """Refused as IMDS refuses a bad path, or routed to the instance route the access check
    sees, with the canonical target (never the raw one) to forward."""
    for method in ("GET", "HEAD"):
        routed = check(method, target, MD, VERSIONS)
        decoded = unquote(origin_form(target).partition("?")[0]).replace("\\", "/")
        if {".", ".."} & set(decoded.split("/")) or "%FF" in target:
            assert isinstance(routed, Refusal)
            assert routed.status == (404 if "." in decoded else 400)
            assert set(msgspec.json.decode(routed.body)) == {"error"}
            continue
        assert isinstance(routed, Routed)
        assert routed.endpoint is Endpoint.INSTANCE
        assert routed.segments == ["compute", "userData"]
        path, _, query = routed.target.partition("?")
        assert path.lower().startswith(USER_DATA.lower())
        assert split_path(unquote(path)) == ["metadata", "instance", *routed.segments]
        assert query == UD
