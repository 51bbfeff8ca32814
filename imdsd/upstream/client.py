"""The IMDS client (trio shell over :mod:`imdsd.httpio`): requests, retries, api-versions.

- Plain HTTP straight to the configured endpoint: a TCP connection is opened to its host
  and port, so ``HTTP_PROXY``, ``http_proxy``, ``ALL_PROXY`` and ``NO_PROXY`` play no part.
- Every request carries ``Metadata: true``, ``User-Agent: imdsd/<version>`` and a fresh
  ``x-ms-client-request-id``; never ``X-Forwarded-For``; the query string is built from a
  mapping, so no parameter appears twice.
- One keep-alive connection per lane (by default one per endpoint, so the slow first
  Scheduled Events call never holds up the instance document), reopened when the server
  closes it or after any error. The connection is made *before* a budget slot is taken and
  the request is sent right after, so request starts keep the budget's spacing.
- ``connect_timeout`` bounds connecting, ``read_timeout`` (or a per-call timeout) the whole
  exchange; answers over 1 MiB are refused and their connection dropped.
- trio/h11 failures become :class:`UpstreamError` subclasses at this boundary.
- Every request sent is counted in the optional :class:`RequestMetrics` by lane (``instance``,
  ``scheduled_events``, ``loadbalancer``, ``versions``, ``approve``; raw calls count under their
  path) and answer status (``None`` when no answer came); every document :meth:`fetch` gets
  records its duration, budget waits and retries included.

:meth:`ImdsClient.fetch` adds the retry policy and api-version negotiation on top.
"""

from __future__ import annotations

import random
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import msgspec
import structlog
import trio

from imdsd import __version__, httpio
from imdsd.config import ImdsConfig
from imdsd.model import DocumentError, decode_error, decode_versions
from imdsd.netmark import open_marked_tcp
from imdsd.upstream.budget import Budget, Priority
from imdsd.upstream.retry import (
    DEFAULT_POLICY,
    Decision,
    ErrorKind,
    FallbackVersion,
    GiveUp,
    Outcome,
    Random,
    Retry,
    RetryPolicy,
    decide,
    parse_retry_after,
)
from imdsd.upstream.versions import (
    PATHS,
    VERSIONS_PATH,
    Endpoint,
    NoCommonVersion,
    VersionBook,
)

log = structlog.get_logger("imdsd.upstream")

MAX_BODY: Final = 1 << 20
MAX_VERSION_SWITCHES: Final = 3
APPROVE_DEADLINE: Final = 30.0
USER_AGENT: Final = f"imdsd/{__version__}"

PRIORITY: Final[dict[Endpoint, Priority]] = {
    "scheduled_events": Priority.URGENT,
    "instance": Priority.NORMAL,
    "loadbalancer": Priority.LOW,
}


class UpstreamError(Exception):
    """Base of every error of the upstream client."""


class TransportError(UpstreamError):
    """The request got no usable HTTP answer; ``kind`` names the failure class."""

    kind: ErrorKind = "reset"


class ConnectError(TransportError):
    """The connection could not be opened (refused, unreachable, connect timeout)."""

    kind = "connect"


class Timeout(TransportError):
    """No complete answer within the read timeout."""

    kind = "timeout"


class Reset(TransportError):
    """The server closed or reset the connection before a complete answer."""

    kind = "reset"


class ProtocolError(TransportError):
    """The server broke HTTP/1.1."""

    kind = "protocol"


class TooLarge(TransportError):
    """The answer's body exceeded the size cap (1 MiB)."""

    kind = "too_large"


class GaveUp(UpstreamError):
    """A request was given up by the retry policy; ``outcome`` is its last attempt."""

    def __init__(self, endpoint: str, outcome: Outcome, reason: str) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.outcome = outcome
        self.reason = reason

    @property
    def status(self) -> int | None:
        """The HTTP status of the last attempt, or None for a transport failure."""
        return self.outcome.status


_ERRORS: Final[dict[type[httpio.HttpIOError], type[TransportError]]] = {
    httpio.ConnectFailed: ConnectError,
    httpio.Deadline: Timeout,
    httpio.PeerClosed: Reset,
    httpio.ProtocolViolation: ProtocolError,
    httpio.BodyTooLarge: TooLarge,
}


def _mapped(exc: httpio.HttpIOError) -> TransportError:
    for source, target in _ERRORS.items():
        if isinstance(exc, source):
            return target(str(exc))
    return Reset(str(exc))


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """One complete IMDS answer."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Fetched:
    """A successful versioned request: the answer and the api-version that got it."""

    endpoint: str
    version: str
    response: UpstreamResponse

    @property
    def body(self) -> bytes:
        """The answer's body."""
        return self.response.body


Observer = Callable[[Outcome, Decision], None]


class RequestMetrics(Protocol):
    """Where the client counts requests and fetch times (:class:`imdsd.api.metrics.Metrics`)."""

    def upstream_request(self, endpoint: str, status: int | None) -> None:
        """One request sent on lane ``endpoint``; ``status`` None when no answer came."""

    def observe_fetch(self, endpoint: str, seconds: float) -> None:
        """One document of ``endpoint`` fetched in ``seconds`` (retries included)."""


def build_target(path: str, query: Mapping[str, str] | None) -> str:
    """``path?query`` with each parameter once, percent-encoded; ``path`` must be absolute."""
    if not path.startswith("/") or "?" in path or "#" in path:
        raise ValueError(f"expected an absolute path without query, got {path!r}")
    quoted = urllib.parse.quote(path, safe="/")
    if not query:
        return quoted
    return quoted + "?" + urllib.parse.urlencode(dict(query), quote_via=urllib.parse.quote)


def _error_message(body: bytes) -> str:
    try:
        return decode_error(body).error[:200]
    except DocumentError:
        return ""


def _newest_versions(body: bytes) -> tuple[str, ...]:
    try:
        return tuple(v for v in decode_error(body).newest_versions if isinstance(v, str))
    except DocumentError:
        return ()


class ImdsClient:
    """Talks to IMDS through ``budget``; see the module docstring for the rules it keeps."""

    def __init__(
        self,
        config: ImdsConfig,
        budget: Budget,
        *,
        rng: Random | None = None,
        max_body: int = MAX_BODY,
        metrics: RequestMetrics | None = None,
    ) -> None:
        url = urllib.parse.urlsplit(config.endpoint)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"IMDS endpoint must be http://host[:port], got {config.endpoint!r}")
        self.host = url.hostname
        self.port = url.port or 80
        self.host_header = url.netloc
        self.config = config
        self.budget = budget
        self.versions = VersionBook(config.api_version)
        self.max_body = max_body
        self.metrics = metrics
        self.sent = 0
        self._rng: Random = rng if rng is not None else random.Random()
        self._connections: dict[str, httpio.ClientConnection] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._probe_lock = trio.Lock()

    # ------------------------------------------------------------------ raw requests

    async def get(
        self,
        path: str,
        query: Mapping[str, str] | None = None,
        *,
        priority: int = Priority.NORMAL,
        timeout: float | None = None,
        lane: str | None = None,
    ) -> UpstreamResponse:
        """One GET (no retries) within the budget; raises :class:`TransportError`."""
        return await self._request(
            "GET", path, query, b"", priority=priority, timeout=timeout, lane=lane
        )

    async def post(
        self,
        path: str,
        query: Mapping[str, str] | None,
        body: bytes,
        *,
        priority: int = Priority.URGENT,
        timeout: float | None = None,
        lane: str | None = None,
    ) -> UpstreamResponse:
        """One POST with a JSON body (no retries) within the budget."""
        return await self._request(
            "POST", path, query, body, priority=priority, timeout=timeout, lane=lane
        )

    def headers(self, method: str) -> list[tuple[str, str]]:
        """The headers of one request (a fresh client request id each time)."""
        headers = [
            ("Host", self.host_header),
            ("Metadata", "true"),
            ("User-Agent", USER_AGENT),
            ("x-ms-client-request-id", str(uuid.uuid4())),
        ]
        if method == "POST":
            headers.append(("Content-Type", "application/json"))
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: bytes,
        *,
        priority: int,
        timeout: float | None,
        lane: str | None,
    ) -> UpstreamResponse:
        target = build_target(path, query)
        lane = lane or path
        lock = self._locks.setdefault(lane, trio.Lock())
        async with lock:
            while True:
                conn = await self._connection(lane)
                await self.budget.acquire(priority)
                if conn.reusable:
                    break
                # closed by the server while we waited for the slot: that slot is spent
                await self._drop(lane)
            self.sent += 1
            try:
                response = await conn.request(
                    method,
                    target,
                    self.headers(method),
                    body,
                    timeout=self.config.read_timeout if timeout is None else timeout,
                )
            except httpio.HttpIOError as exc:
                self._count(lane, None)
                await self._drop(lane)
                raise _mapped(exc) from exc
            self._count(lane, response.status)
            if not conn.reusable:
                await self._drop(lane)
        return UpstreamResponse(
            response.status,
            tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers),
            response.body,
        )

    async def forward(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        acquire: Callable[[], Awaitable[None]],
        lane: str,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send an agent's request as it came (the IMDS front), no retries.

        ``target`` and ``headers`` go as given (the caller's ``Host`` is replaced by the
        endpoint's; nothing is added); ``acquire`` takes the slot instead of the budget,
        after the connection is open, as for imdsd's own requests.
        """
        lock = self._locks.setdefault(lane, trio.Lock())
        sent = [(k, v) for k, v in headers if k.lower() != "host"]
        async with lock:
            conn = await self._connection(lane)
            await acquire()
            if not conn.reusable:  # closed while we waited: one fresh connection, same slot
                await self._drop(lane)
                conn = await self._connection(lane)
            self.sent += 1
            try:
                response = await conn.request(
                    method,
                    target,
                    [("Host", self.host_header), *sent],
                    body,
                    timeout=self.config.read_timeout if timeout is None else timeout,
                )
            except httpio.HttpIOError as exc:
                self._count(lane, None)
                await self._drop(lane)
                raise _mapped(exc) from exc
            self._count(lane, response.status)
            if not conn.reusable:
                await self._drop(lane)
        return UpstreamResponse(
            response.status,
            tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers),
            response.body,
        )

    def _count(self, lane: str, status: int | None) -> None:
        if self.metrics is not None:
            self.metrics.upstream_request(lane, status)

    async def _connection(self, lane: str) -> httpio.ClientConnection:
        conn = self._connections.get(lane)
        if conn is not None and conn.reusable:
            return conn
        if conn is not None:
            await self._drop(lane)
        try:
            # marked so the IMDS redirect lets imdsd itself through (imdsd.netmark)
            stream = await open_marked_tcp(self.host, self.port, self.config.connect_timeout)
        except httpio.HttpIOError as exc:
            raise _mapped(exc) from exc
        conn = httpio.ClientConnection(stream, max_body=self.max_body)
        self._connections[lane] = conn
        return conn

    async def _drop(self, lane: str) -> None:
        conn = self._connections.pop(lane, None)
        if conn is not None:
            await conn.aclose()

    async def aclose(self) -> None:
        """Close every open connection (also when the caller is being cancelled)."""
        with trio.CancelScope(shield=True):
            for lane in list(self._connections):
                await self._drop(lane)

    @property
    def open_connections(self) -> int:
        """How many keep-alive connections are open."""
        return len(self._connections)

    # ------------------------------------------------------------------ versioned requests

    async def fetch(
        self,
        endpoint: Endpoint,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        observer: Observer | None = None,
    ) -> Fetched:
        """GET ``endpoint`` at the negotiated api-version, retrying per ``policy``.

        ``observer`` sees every failed attempt with the decision taken. Raises
        :class:`GaveUp` when the policy gives up (a non-retryable answer, a refused
        version with nothing left to try, or the policy's deadline).
        """
        started = trio.current_time()
        fetched = await self._versioned(
            endpoint,
            "GET",
            priority=priority,
            timeout=timeout,
            policy=policy,
            observer=observer,
            lane=endpoint,
        )
        if self.metrics is not None:
            self.metrics.observe_fetch(endpoint, trio.current_time() - started)
        return fetched

    async def approve(
        self, event_ids: Sequence[str], *, deadline: float = APPROVE_DEADLINE
    ) -> None:
        """Approve scheduled events early (``POST {"StartRequests": [...]}``).

        Retried per policy for at most ``deadline`` seconds; raises :class:`GaveUp`.
        """
        if not event_ids:
            raise ValueError("no event ids to approve")
        body = msgspec.json.encode({"StartRequests": [{"EventId": e} for e in event_ids]})
        policy = RetryPolicy(deadline=deadline, interval=1.0)
        await self._versioned(
            "scheduled_events",
            "POST",
            body=body,
            priority=Priority.URGENT,
            policy=policy,
            lane="approve",
        )

    async def _versioned(
        self,
        endpoint: Endpoint,
        method: str,
        *,
        lane: str,
        body: bytes = b"",
        priority: int | None = None,
        timeout: float | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        observer: Observer | None = None,
    ) -> Fetched:
        priority = PRIORITY[endpoint] if priority is None else priority
        attempt = 0
        first_failure = 0.0
        switches = 0
        while True:
            try:
                version = await self._version_for(endpoint, priority)
            except NoCommonVersion as exc:
                outcome = Outcome(endpoint, status=400, message=str(exc))
                if observer is not None:
                    observer(outcome, GiveUp(str(exc)))
                raise GaveUp(endpoint, outcome, str(exc)) from exc
            outcome, response = await self._attempt(
                endpoint, method, version, body=body, priority=priority, timeout=timeout, lane=lane
            )
            if response is not None and outcome.ok:
                return Fetched(endpoint, version, response)
            now = trio.current_time()
            attempt += 1
            if attempt == 1:
                first_failure = now
            decision = decide(outcome, attempt, first_failure, now, self._rng, policy=policy)
            if isinstance(decision, FallbackVersion):
                offered = decision.newest_versions
                if switches < MAX_VERSION_SWITCHES and self.versions.rejected(
                    endpoint, version, offered
                ):
                    switches += 1
                    log.info(
                        "api-version refused, renegotiating",
                        endpoint=endpoint,
                        refused=version,
                        offered=list(offered),
                    )
                    continue
                decision = GiveUp(
                    f"api-version {version} refused; the endpoint offers {', '.join(offered)}"
                )
            if observer is not None:
                observer(outcome, decision)
            if isinstance(decision, GiveUp):
                raise GaveUp(endpoint, outcome, decision.reason)
            if isinstance(decision, Retry):
                await trio.sleep(decision.delay)

    async def _attempt(
        self,
        endpoint: Endpoint,
        method: str,
        version: str,
        *,
        body: bytes,
        priority: int,
        timeout: float | None,
        lane: str,
    ) -> tuple[Outcome, UpstreamResponse | None]:
        query = {"api-version": version}
        try:
            response = await self._request(
                method, PATHS[endpoint], query, body, priority=priority, timeout=timeout, lane=lane
            )
        except TransportError as exc:
            return Outcome(endpoint, error=exc.kind, message=str(exc)), None
        status = response.status
        if 200 <= status < 300:
            return Outcome(endpoint, status=status), response
        retry_after = parse_retry_after(
            response.header("retry-after"), date=response.header("date"), wall_now=time.time()
        )
        return (
            Outcome(
                endpoint,
                status=status,
                retry_after=retry_after,
                newest_versions=_newest_versions(response.body) if status == 400 else (),
                message=_error_message(response.body),
            ),
            response,
        )

    async def _version_for(self, endpoint: Endpoint, priority: int) -> str:
        """The api-version for ``endpoint``, probing first if needed; may raise NoCommonVersion."""
        while True:
            if self.versions.needs_probe:
                async with self._probe_lock:
                    if self.versions.needs_probe:
                        self.versions.learn(await self.probe_versions(priority))
            version = self.versions.version_for(endpoint)
            if version is not None:
                return version

    async def probe_versions(self, priority: int = Priority.NORMAL) -> list[str] | None:
        """One request for ``/metadata/versions``; None (logged) when it fails."""
        try:
            response = await self.get(VERSIONS_PATH, priority=priority, lane="versions")
        except TransportError as exc:
            log.warning("api-version probe failed", error=str(exc))
            return None
        if response.status != 200:
            log.warning("api-version probe failed", status=response.status)
            return None
        try:
            available = decode_versions(response.body).api_versions
        except DocumentError as exc:
            log.warning("api-version probe failed", error=str(exc))
            return None
        log.info("api-versions learned", newest=max(available, default=None))
        return available

    def status(self) -> dict[str, object]:
        """Budget use, api-versions and upstream connections, JSON-ready (for status)."""
        return {
            "budget": {
                "rate": self.budget.rate,
                "in_use": self.budget.in_use(),
                "waiting": self.budget.waiting,
                "granted": self.budget.core.granted,
            },
            "api_version": dict(self.versions.chosen()),
            "requests_sent": self.sent,
            "upstream_connections": self.open_connections,
        }
