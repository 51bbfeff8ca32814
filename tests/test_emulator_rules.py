"""Sans-IO tests of the IMDS request rules (imdsd.emulator.rules)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imdsd.emulator.profiles import AZURE, AZURESTACK, Endpoint
from imdsd.emulator.rules import ImdsRequest, RequestRules, RuleError, classify
from imdsd.imdsrules import NO_API_VERSION, Rejection

DATA = Path(__file__).parent / "data"
MD = [("Metadata", "true")]
INSTANCE = "/metadata/instance?api-version=2021-02-01"


def rules(**kwargs: Any) -> RequestRules:
    return RequestRules(AZURE, **kwargs)


def rejected(result: ImdsRequest | Rejection) -> Rejection:
    assert isinstance(result, Rejection), result
    return result


def accepted(result: ImdsRequest | Rejection) -> ImdsRequest:
    assert isinstance(result, ImdsRequest), result
    return result


# ------------------------------------------------------------------------------ routing


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/metadata/versions", (Endpoint.VERSIONS, [])),
        ("/metadata/instance", (Endpoint.INSTANCE, [])),
        ("/metadata/instance/", (Endpoint.INSTANCE, [])),
        ("/metadata/instance/compute/tags", (Endpoint.INSTANCE, ["compute", "tags"])),
        ("/metadata/scheduledevents", (Endpoint.SCHEDULED_EVENTS, [])),
        ("/metadata/loadbalancer", (Endpoint.LOADBALANCER, [])),
        ("/metadata/attested/document", (Endpoint.ATTESTED, [])),
        ("/metadata/identity/oauth2/token", (Endpoint.IDENTITY, [])),
        ("/metadata", None),
        ("/metadata/instances", None),
        ("/metadata/attested", None),
        ("/metadata/scheduledevents/x", None),
        ("/", None),
    ],
)
def test_classify(path: str, expected: Any) -> None:
    assert classify(path) == expected


def test_accepted_request_carries_route_and_query() -> None:
    target = "/metadata/instance/network/interface/0?api-version=2021-02-01&format=text"
    request = accepted(rules().check("GET", target, MD, 0.0))
    assert request.endpoint is Endpoint.INSTANCE
    assert request.segments == ["network", "interface", "0"]
    assert request.api_version == "2021-02-01"
    assert request.query == {"api-version": "2021-02-01", "format": "text"}


def test_percent_encoded_path_is_decoded() -> None:
    target = "/metadata/instance/compute/%74ags?api-version=2021-02-01"
    request = accepted(rules().check("GET", target, MD, 0))
    assert request.segments == ["compute", "tags"]


# ------------------------------------------------------------------------------ each rule


@pytest.mark.parametrize("value", ["true", "True", "TRUE", " true "])
def test_metadata_header_value_is_case_insensitive(value: str) -> None:
    accepted(rules().check("GET", INSTANCE, [("metadata", value)], 0))


@pytest.mark.parametrize("headers", [[], [("Metadata", "false")], [("Metadata", "yes")]])
def test_metadata_header_required(headers: list[tuple[str, str]]) -> None:
    result = rejected(rules().check("GET", INSTANCE, headers, 0))
    assert (result.rule, result.status) == ("metadata_header", 400)
    assert result.body == {"error": "Bad request. Required metadata header not specified"}


def test_x_forwarded_for_rejected() -> None:
    result = rejected(rules().check("GET", INSTANCE, [*MD, ("X-Forwarded-For", "1.2.3.4")], 0))
    assert (result.rule, result.status) == ("forwarded_for", 400)
    assert "X-Forwarded-For" in result.body["error"]


def test_duplicate_query_parameter_rejected() -> None:
    target = "/metadata/instance?api-version=2021-02-01&api-version=2021-02-01"
    result = rejected(rules().check("GET", target, MD, 0))
    assert (result.rule, result.status) == ("duplicate_params", 400)
    assert result.body == {"error": "Bad request. Duplicate query parameter 'api-version'"}


def test_unknown_path_is_404() -> None:
    result = rejected(rules().check("GET", "/metadata/nope?api-version=2021-02-01", MD, 0))
    assert (result.rule, result.status, result.body) == ("not_found", 404, {"error": "Not found"})


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD", "PATCH"])
def test_only_get_on_instance(method: str) -> None:
    result = rejected(rules().check(method, INSTANCE, MD, 0))
    assert (result.rule, result.status) == ("method", 405)
    assert result.headers == (("allow", "GET"),)


def test_post_allowed_on_scheduled_events_only() -> None:
    target = "/metadata/scheduledevents?api-version=2020-07-01"
    accepted(rules().check("POST", target, MD, 0))
    result = rejected(rules().check("DELETE", target, MD, 0))
    assert result.headers == (("allow", "GET, POST"),)


def test_missing_api_version_matches_the_golden_error() -> None:
    golden = json.loads((DATA / "error-no-api-version.json").read_text())
    result = rejected(rules().check("GET", "/metadata/instance", MD, 0))
    assert (result.rule, result.status) == ("api_version", 400)
    assert result.body["error"] == golden["error"] == NO_API_VERSION
    assert result.body["newest-versions"] == ["2023-11-15", "2023-07-01", "2021-12-13"]
    assert set(result.body) == set(golden)


def test_unknown_api_version_lists_newest_versions() -> None:
    result = rejected(rules().check("GET", "/metadata/instance?api-version=2099-01-01", MD, 0))
    assert "api-version '2099-01-01' is not supported" in result.body["error"]
    assert result.body["newest-versions"] == ["2023-11-15", "2023-07-01", "2021-12-13"]


def test_versions_endpoint_needs_no_api_version() -> None:
    request = accepted(rules().check("GET", "/metadata/versions", MD, 0))
    assert request.endpoint is Endpoint.VERSIONS


def test_endpoint_specific_versions() -> None:
    check = rules(rate_limit=0).check
    too_old = rejected(check("GET", "/metadata/loadbalancer?api-version=2020-09-01", MD, 0))
    assert too_old.body["newest-versions"] == ["2023-11-15", "2023-07-01", "2021-12-13"]
    accepted(check("GET", "/metadata/loadbalancer?api-version=2020-10-01", MD, 0))
    accepted(check("GET", "/metadata/scheduledevents?api-version=2020-07-01", MD, 0))
    se = rejected(check("GET", "/metadata/scheduledevents?api-version=2021-02-01", MD, 0))
    assert se.body["newest-versions"] == ["2020-07-01", "2019-08-01", "2019-04-01"]
    rejected(check("GET", "/metadata/attested/document?api-version=2018-04-02", MD, 0))
    accepted(check("GET", "/metadata/attested/document?api-version=2018-10-01", MD, 0))


def test_rate_limit_5_per_sliding_second() -> None:
    check = rules().check
    for _ in range(5):
        accepted(check("GET", INSTANCE, MD, 10.0))
    result = rejected(check("GET", INSTANCE, MD, 10.5))
    assert (result.rule, result.status, result.body) == (
        "rate_limit",
        429,
        {"error": "Too many requests"},
    )
    accepted(check("GET", INSTANCE, MD, 11.0))  # the first five left the window


def test_rate_limit_counts_rejected_by_other_rules_but_not_throttled() -> None:
    check = rules().check
    for _ in range(5):
        rejected(check("GET", INSTANCE, [], 0.0))  # 400s still use the budget
    rejected(check("GET", INSTANCE, MD, 0.0))
    for _ in range(10):
        assert rejected(check("GET", INSTANCE, MD, 0.5)).status == 429
    accepted(check("GET", INSTANCE, MD, 1.0))


def test_identity_has_its_own_20_per_second_window() -> None:
    check = rules().check
    token = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r"
    for _ in range(5):
        accepted(check("GET", INSTANCE, MD, 0.0))
    for _ in range(20):
        accepted(check("GET", token, MD, 0.0))
    assert rejected(check("GET", token, MD, 0.0)).status == 429
    assert rejected(check("GET", INSTANCE, MD, 0.0)).status == 429


def test_custom_and_fractional_rate_limits() -> None:
    check = rules(rate_limit=2.5).check
    for _ in range(3):
        accepted(check("GET", INSTANCE, MD, 0.0))
    rejected(check("GET", INSTANCE, MD, 0.0))
    unlimited = rules(rate_limit=0).check
    for _ in range(100):
        accepted(unlimited("GET", INSTANCE, MD, 0.0))


# ------------------------------------------------------------------------------ switches


def test_every_rule_can_be_switched_off() -> None:
    r = rules()
    r.configure(
        {
            "metadata_header": False,
            "forwarded_for": False,
            "duplicate_params": False,
            "method": False,
            "api_version": False,
            "rate_limit": False,
        }
    )
    target = "/metadata/instance?format=json&format=json"
    for _ in range(10):
        request = accepted(r.check("POST", target, [("X-Forwarded-For", "x")], 0.0))
    assert request.api_version == "2023-11-15"
    se = accepted(r.check("GET", "/metadata/scheduledevents", [], 0.0))
    assert se.api_version == "2020-07-01"
    rejected(r.check("GET", "/metadata/nope", [], 0.0))  # 404 stays


def test_configure_rate_limit_number() -> None:
    r = rules()
    r.configure({"rate_limit": 1, "identity_rate_limit": 2})
    assert r.describe() == {
        "rate_limit": True,
        "metadata_header": True,
        "forwarded_for": True,
        "duplicate_params": True,
        "method": True,
        "api_version": True,
        "rate_limit_per_second": 1.0,
        "identity_rate_limit_per_second": 2.0,
        "identity_concurrency": 5,
        "identity_latency": 0.0,
        "identity_in_flight": 0,
        "identity_peak_in_flight": 0,
        "identity_refused_concurrent": 0,
    }
    accepted(r.check("GET", INSTANCE, MD, 0.0))
    rejected(r.check("GET", INSTANCE, MD, 0.0))
    r.configure({"rate_limit": 0})
    assert r.describe()["rate_limit"] is False


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ([], "rules must be an object"),
        ({"colour": True}, "unknown rule 'colour'"),
        ({"metadata_header": "no"}, "rule 'metadata_header' takes a boolean"),
        ({"rate_limit": -1}, "rule 'rate_limit' takes a boolean or a number >= 0"),
        ({"identity_rate_limit": True}, "rule 'identity_rate_limit' takes"),
    ],
)
def test_configure_errors(changes: Any, message: str) -> None:
    r = rules()
    with pytest.raises(RuleError) as info:
        r.configure(changes)
    assert message in str(info.value)


def test_configure_is_all_or_nothing() -> None:
    r = rules()
    with pytest.raises(RuleError):
        r.configure({"metadata_header": False, "method": "x"})
    assert r.switches.metadata_header is True


# ------------------------------------------------------------------------------ profiles


@pytest.mark.parametrize(
    "path",
    [
        "/metadata/attested/document?api-version=2020-09-01",
        "/metadata/identity/oauth2/token?api-version=2020-09-01&resource=x",
        "/metadata/loadbalancer?api-version=2020-10-01",
    ],
)
def test_azurestack_lacks_endpoints(path: str) -> None:
    result = rejected(RequestRules(AZURESTACK).check("GET", path, MD, 0))
    assert result.status == 404


def test_azurestack_versions_stop_at_2021_05_01() -> None:
    r = RequestRules(AZURESTACK)
    accepted(r.check("GET", "/metadata/instance?api-version=2021-05-01", MD, 0))
    result = rejected(r.check("GET", "/metadata/instance?api-version=2021-08-01", MD, 0))
    assert result.body["newest-versions"] == ["2021-05-01", "2021-03-01", "2021-02-01"]
