"""IMDS api-version policy (sans-IO): what imdsd supports, negotiation and fallback.

Each endpoint has its own floor and candidate list:

- ``instance``: any version imdsd knows, from 2017-03-01 up.
- ``loadbalancer``: 2020-10-01 and newer (the first version that serves it).
- ``scheduled_events``: Scheduled Events has its own version track (2017-11-01 is the first
  GA version with every event type imdsd handles, ``Preempt`` included; 2020-07-01 adds
  ``DurationInSeconds``). Those versions are not all listed by ``/metadata/versions``, so the
  preferred 2020-07-01 is used whenever the host is at least that new.

``auto`` asks ``/metadata/versions`` once and picks, per endpoint, the newest version both
sides support. A later ``400`` naming ``newest-versions`` (a host update) moves the endpoint
to the newest of those imdsd supports; when none fits, the versions are asked again. A fixed
``api_version`` is used for every endpoint and never changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Literal

Endpoint = Literal["instance", "scheduled_events", "loadbalancer"]
ENDPOINTS: Final[tuple[Endpoint, ...]] = ("instance", "scheduled_events", "loadbalancer")

PATHS: Final[dict[Endpoint, str]] = {
    "instance": "/metadata/instance",
    "scheduled_events": "/metadata/scheduledevents",
    "loadbalancer": "/metadata/loadbalancer",
}
VERSIONS_PATH: Final = "/metadata/versions"

# The Azure public list (seed), newest first, plus 2021-01-01 from the Azure Stack Hub list.
GENERAL_VERSIONS: Final[tuple[str, ...]] = (
    "2023-11-15",
    "2023-07-01",
    "2021-12-13",
    "2021-11-15",
    "2021-11-01",
    "2021-10-01",
    "2021-08-01",
    "2021-05-01",
    "2021-03-01",
    "2021-02-01",
    "2021-01-01",
    "2020-12-01",
    "2020-10-01",
    "2020-09-01",
    "2020-07-15",
    "2020-06-01",
    "2019-11-01",
    "2019-08-15",
    "2019-08-01",
    "2019-06-04",
    "2019-06-01",
    "2019-04-30",
    "2019-03-11",
    "2019-02-01",
    "2018-10-01",
    "2018-04-02",
    "2018-02-01",
    "2017-12-01",
    "2017-10-01",
    "2017-08-01",
    "2017-04-02",
    "2017-03-01",
)

# The Scheduled Events version track (GA versions, newest first).
SCHEDULED_EVENTS_VERSIONS: Final[tuple[str, ...]] = (
    "2020-07-01",
    "2019-08-01",
    "2019-04-01",
    "2019-01-01",
    "2017-11-01",
)

MINIMUM: Final[dict[Endpoint, str]] = {
    "instance": "2017-03-01",
    "scheduled_events": "2017-11-01",
    "loadbalancer": "2020-10-01",
}
PREFERRED_SCHEDULED_EVENTS: Final = "2020-07-01"


class NoCommonVersion(ValueError):
    """The endpoint lists no api-version that imdsd supports for this endpoint."""


def _newest_first(versions: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(versions), reverse=True))


def candidates(endpoint: Endpoint) -> tuple[str, ...]:
    """Every version imdsd may use for ``endpoint``, newest first."""
    floor = MINIMUM[endpoint]
    pool: Iterable[str] = GENERAL_VERSIONS
    if endpoint == "scheduled_events":
        pool = (*GENERAL_VERSIONS, *SCHEDULED_EVENTS_VERSIONS)
    return _newest_first(v for v in pool if v >= floor)


def default_version(endpoint: Endpoint) -> str:
    """The version used when the endpoint's list is unknown (``/metadata/versions`` failed)."""
    if endpoint == "scheduled_events":
        return PREFERRED_SCHEDULED_EVENTS
    return candidates(endpoint)[0]


def negotiate(available: Sequence[str] | None, endpoint: Endpoint, fixed: str | None) -> str:
    """The api-version to use for ``endpoint``.

    ``fixed`` (a configured version; ``None`` or ``"auto"`` for automatic) always wins.
    ``available`` is the ``/metadata/versions`` list, or ``None`` when it could not be had.
    Raises :class:`NoCommonVersion` when the list shares no version with imdsd.
    """
    if fixed is not None and fixed != "auto":
        return fixed
    if available is None:
        return default_version(endpoint)
    offered = set(available)
    if endpoint == "scheduled_events":
        newest_offered = max(offered, default="")
        track = [v for v in SCHEDULED_EVENTS_VERSIONS if v <= newest_offered or v in offered]
        if track:
            return track[0]
    for version in candidates(endpoint):
        if version in offered:
            return version
    listed = ", ".join(sorted(offered, reverse=True)[:5]) or "none"
    raise NoCommonVersion(
        f"no api-version usable for {endpoint}: the endpoint lists {listed}, imdsd needs "
        f"{MINIMUM[endpoint]} or newer among its known versions"
    )


def fallback(newest_versions: Sequence[str], endpoint: Endpoint) -> str | None:
    """The newest of a ``400``'s ``newest-versions`` that imdsd supports for ``endpoint``."""
    usable = set(candidates(endpoint))
    for version in _newest_first(newest_versions):
        if version in usable:
            return version
    return None


class VersionBook:
    """Per-endpoint api-version state of one client (sans-IO).

    :meth:`version_for` answers ``None`` while the ``/metadata/versions`` list is needed;
    the shell then probes and calls :meth:`learn`. :meth:`rejected` handles a ``400``.
    """

    def __init__(self, configured: str) -> None:
        self.fixed: str | None = None if configured == "auto" else configured
        self.available: tuple[str, ...] | None = None
        self.probed = False
        self._chosen: dict[Endpoint, str] = {}

    @property
    def needs_probe(self) -> bool:
        """True when the ``/metadata/versions`` list should be asked for."""
        return self.fixed is None and not self.probed

    def learn(self, available: Sequence[str] | None) -> None:
        """Record the ``/metadata/versions`` answer (``None``: the probe failed)."""
        self.available = None if available is None else tuple(available)
        self.probed = True
        self._chosen.clear()

    def version_for(self, endpoint: Endpoint) -> str | None:
        """The version to use now, or ``None`` when a probe must come first.

        Raises :class:`NoCommonVersion` when the learned list shares nothing with imdsd.
        """
        if self.fixed is not None:
            return self.fixed
        chosen = self._chosen.get(endpoint)
        if chosen is not None:
            return chosen
        if not self.probed:
            return None
        chosen = negotiate(self.available, endpoint, None)
        self._chosen[endpoint] = chosen
        return chosen

    def rejected(self, endpoint: Endpoint, used: str, newest_versions: Sequence[str]) -> bool:
        """A ``400`` named ``newest_versions`` for a request made with ``used``.

        Returns True when there is something new to try: a fallback version, or a fresh
        probe of ``/metadata/versions``. False means give up (a fixed version, or nothing
        better than what was just rejected).
        """
        if self.fixed is not None:
            return False
        choice = fallback(newest_versions, endpoint)
        if choice is not None and choice != used:
            self._chosen[endpoint] = choice
            return True
        if choice is None and self.probed:
            self.probed = False
            self._chosen.pop(endpoint, None)
            return True
        return False

    def chosen(self) -> dict[Endpoint, str]:
        """The versions in use per endpoint (for status output)."""
        if self.fixed is not None:
            return dict.fromkeys(ENDPOINTS, self.fixed)
        return dict(self._chosen)
