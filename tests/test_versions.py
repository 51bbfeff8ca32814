"""api-version policy: candidates, negotiation, fallback and the per-client book."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imdsd.upstream.versions import (
    GENERAL_VERSIONS,
    SCHEDULED_EVENTS_VERSIONS,
    Endpoint,
    NoCommonVersion,
    VersionBook,
    candidates,
    default_version,
    fallback,
    negotiate,
)

AZURE = [v for v in GENERAL_VERSIONS if v != "2021-01-01"]
AZURE_STACK = [v for v in GENERAL_VERSIONS if v <= "2021-05-01"]
DATA = Path(__file__).parent / "data"


def test_candidates_respect_minimums_and_order() -> None:
    for endpoint, floor in [
        ("instance", "2017-03-01"),
        ("scheduled_events", "2017-11-01"),
        ("loadbalancer", "2020-10-01"),
    ]:
        found = candidates(endpoint)  # type: ignore[arg-type]
        assert found == tuple(sorted(found, reverse=True))
        assert min(found) == floor
    assert candidates("instance")[0] == "2023-11-15"
    assert "2021-01-01" in candidates("instance")
    assert set(SCHEDULED_EVENTS_VERSIONS) <= set(candidates("scheduled_events"))
    assert "2020-07-01" not in candidates("instance")


@pytest.mark.parametrize(
    ("available", "endpoint", "fixed", "expected"),
    [
        (AZURE, "instance", None, "2023-11-15"),
        (AZURE, "loadbalancer", None, "2023-11-15"),
        (AZURE, "scheduled_events", None, "2020-07-01"),
        (AZURE_STACK, "instance", None, "2021-05-01"),
        (AZURE_STACK, "loadbalancer", None, "2021-05-01"),
        (AZURE_STACK, "scheduled_events", None, "2020-07-01"),
        (AZURE, "instance", "auto", "2023-11-15"),
        (AZURE, "instance", "2019-06-04", "2019-06-04"),
        (AZURE, "loadbalancer", "2019-06-04", "2019-06-04"),
        (None, "instance", "2020-09-01", "2020-09-01"),
        (None, "instance", None, "2023-11-15"),
        (None, "loadbalancer", None, "2023-11-15"),
        (None, "scheduled_events", None, "2020-07-01"),
        # an old host: Scheduled Events takes the newest of its track the host can know
        (["2019-11-01", "2019-08-15", "2019-08-01"], "scheduled_events", None, "2019-08-01"),
        (["2018-10-01", "2017-12-01"], "scheduled_events", None, "2017-11-01"),
        # unknown future versions are ignored, known ones picked
        (["2030-01-01", "2021-02-01"], "instance", None, "2021-02-01"),
        (["2021-01-01", "2020-12-01"], "instance", None, "2021-01-01"),
    ],
)
def test_negotiate(
    available: list[str] | None, endpoint: Endpoint, fixed: str | None, expected: str
) -> None:
    assert negotiate(available, endpoint, fixed) == expected


@pytest.mark.parametrize(
    ("available", "endpoint"),
    [
        (["2020-09-01", "2020-07-15"], "loadbalancer"),
        (["2030-01-01"], "instance"),
        ([], "instance"),
        (["2017-08-01"], "scheduled_events"),
    ],
)
def test_negotiate_without_common_version(available: list[str], endpoint: Endpoint) -> None:
    with pytest.raises(NoCommonVersion, match=endpoint):
        negotiate(available, endpoint, None)


def test_fallback_uses_golden_error_body() -> None:
    body = json.loads((DATA / "error-no-api-version.json").read_text())
    newest = body["newest-versions"]
    assert fallback(newest, "instance") == "2020-10-01"
    assert fallback(newest, "loadbalancer") == "2020-10-01"
    assert fallback(newest, "scheduled_events") == "2020-10-01"


@pytest.mark.parametrize(
    ("newest", "endpoint", "expected"),
    [
        (["2021-05-01", "2021-03-01", "2021-02-01"], "instance", "2021-05-01"),
        (["2021-02-01", "2021-05-01"], "instance", "2021-05-01"),
        (["2020-09-01", "2020-07-15"], "loadbalancer", None),
        (["2031-01-01", "2030-06-01", "2030-01-01"], "instance", None),
        (["2020-07-01", "2019-08-01"], "scheduled_events", "2020-07-01"),
        (["2020-07-01"], "instance", None),
        ([], "instance", None),
    ],
)
def test_fallback(newest: list[str], endpoint: Endpoint, expected: str | None) -> None:
    assert fallback(newest, endpoint) == expected


def test_default_versions() -> None:
    assert default_version("instance") == "2023-11-15"
    assert default_version("scheduled_events") == "2020-07-01"
    assert default_version("loadbalancer") == "2023-11-15"


def test_book_auto_probes_then_negotiates_per_endpoint() -> None:
    book = VersionBook("auto")
    assert book.needs_probe
    assert book.version_for("instance") is None
    book.learn(AZURE_STACK)
    assert not book.needs_probe
    assert book.version_for("instance") == "2021-05-01"
    assert book.version_for("scheduled_events") == "2020-07-01"
    assert book.chosen() == {"instance": "2021-05-01", "scheduled_events": "2020-07-01"}


def test_book_failed_probe_uses_defaults() -> None:
    book = VersionBook("auto")
    book.learn(None)
    assert book.version_for("instance") == "2023-11-15"


def test_book_host_update_falls_back_then_reprobes() -> None:
    book = VersionBook("auto")
    book.learn(AZURE)
    assert book.version_for("instance") == "2023-11-15"
    # host downgraded: a 400 names versions imdsd knows -> move there, no probe
    assert book.rejected("instance", "2023-11-15", ["2021-05-01", "2021-03-01"])
    assert book.version_for("instance") == "2021-05-01"
    assert not book.needs_probe
    # the server lists the version that was just refused: nothing to try
    assert not book.rejected("instance", "2021-05-01", ["2021-05-01"])
    # only unknown versions offered: ask /metadata/versions again
    assert book.rejected("instance", "2021-05-01", ["2031-01-01"])
    assert book.needs_probe
    assert book.version_for("instance") is None
    book.learn(["2031-01-01", "2021-02-01"])
    assert book.version_for("instance") == "2021-02-01"


def test_book_fixed_version_is_never_changed() -> None:
    book = VersionBook("2019-06-04")
    assert not book.needs_probe
    assert book.version_for("loadbalancer") == "2019-06-04"
    assert not book.rejected("instance", "2019-06-04", ["2021-05-01"])
    assert book.version_for("instance") == "2019-06-04"
    assert book.chosen()["scheduled_events"] == "2019-06-04"


def test_book_no_common_version_raises() -> None:
    book = VersionBook("auto")
    book.learn(["2020-09-01"])
    assert book.version_for("instance") == "2020-09-01"
    with pytest.raises(NoCommonVersion):
        book.version_for("loadbalancer")
