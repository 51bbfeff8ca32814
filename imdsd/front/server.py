"""The IMDS front's trio shell: the TCP listener, caller attribution, counters and status.

``[front] listen = "HOST:PORT"`` binds it (:func:`open_front_listeners`), or systemd passes a
socket named ``front`` (``FileDescriptorName=front``). Each request is checked by IMDS's
rules (:mod:`.rules`), answered from the cache at the caller's api-version (:mod:`.cache`)
or forwarded (:mod:`.relay`). The caller of each connection is looked up once, in a worker
thread, from the kernel's socket tables (:mod:`.callers`), right after accept: its uid
decides whether the connection is served (:mod:`.quota`: no uid holds more than a quarter
of the front's connections, and a quarter is kept for root and ``restricted_allow_uids``;
one over the limit gets IMDS's 429 and is closed) and access to restricted paths, and
:meth:`FrontServer.status` lists the busiest callers.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog
import trio

from imdsd.api.access import AccessPolicy, Peer
from imdsd.api.context import ApiContext
from imdsd.api.metrics import Metrics
from imdsd.config import FrontConfig
from imdsd.front.cache import Answer, CacheAnswers, redact_forwarded
from imdsd.front.callers import UNKNOWN, Address, Caller, CallerStats, Resolver
from imdsd.front.quota import ConnectionQuota
from imdsd.front.relay import Relay
from imdsd.front.rules import JSON_TYPE, TOO_MANY_REQUESTS, Refusal, check, error_body
from imdsd.httpio import (
    REJECT_LINGER,
    HttpIOError,
    HttpServer,
    Request,
    Responder,
    ServerLimits,
    ServerProtocol,
    Transport,
    serve_connection,
)
from imdsd.httpio.listeners import HttpService, ListenError, addresses, open_tcp_setting
from imdsd.upstream.budget import Budget
from imdsd.upstream.client import ImdsClient

log = structlog.get_logger("imdsd.front")

FD_NAME: Final = "front"
MAX_CONNECTIONS: Final = 1024  # agents hold few connections each; see ConnectionQuota
PER_UID: Final = MAX_CONNECTIONS // 4  # no uid holds more
RESERVE: Final = MAX_CONNECTIONS // 4  # kept for root and restricted_allow_uids
SPARE: Final = 64  # kept for connections being looked up or refused
TOP_CALLERS: Final = 10
MAX_HEAD_LENGTH: Final = 1 << 20  # the longest IMDS answer the upstream client reads
LIMITS: Final = ServerLimits(
    max_head=16384, max_body=65536, idle_timeout=60.0, request_timeout=10.0, drain_timeout=1.0
)
_COUNTED: Final = {
    "cached": "cached",
    "stale": "cached",
    "forwarded": "forwarded",
    "error": "forwarded",
    "refused": "refused",
    "throttled": "refused",
}


async def open_front_listeners(
    listen: str, inherited: Sequence[socket.socket] = ()
) -> list[trio.SocketListener]:
    """The inherited ``front`` sockets if any, else ``listen`` bound (``""``: none).

    Inherited sockets must be bound to a loopback address, as ``listen`` must (the
    configuration checks it): IMDS, and so the front with its managed-identity tokens, is
    never reachable from the network; such a socket is closed and refused.

    Raises :class:`imdsd.httpio.listeners.ListenError` with a one-line message.
    """
    listeners = await open_tcp_setting("front.listen", listen, inherited)
    outside = [
        name
        for listener, name in zip(listeners, addresses(listeners), strict=True)
        if not _is_loopback(listener.socket.getsockname())
    ]
    if outside:
        for listener in listeners:
            listener.socket.close()
        raise ListenError(
            f"front: refused the socket passed on {outside[0]}: not a loopback address "
            "(IMDS is never reachable from the network)"
        )
    return listeners


def _is_loopback(name: Any) -> bool:
    try:
        return isinstance(name, tuple) and ipaddress.ip_address(name[0]).is_loopback
    except ValueError:
        return False


class Connection:
    """One accepted TCP connection: its addresses (and the one the client connected to, when
    a redirect rewrote it) and, once looked up, its caller."""

    __slots__ = ("caller", "original", "ours", "peer")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.peer: Address | None = None
        self.ours: Address | None = None
        self.original: Address | None = None
        self.caller: Caller | None = None
        if isinstance(stream, trio.SocketStream):
            try:
                self.peer = _address(stream.socket.getpeername())
                self.ours = _address(stream.socket.getsockname())
            except OSError:
                pass
            self.original = original_destination(stream.socket)


SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value


def original_destination(sock: Any) -> Address | None:
    """Where the client connected to before a NAT redirect (conntrack), or None."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    except OSError:  # not redirected (ENOENT), or no conntrack here
        return None
    return None


def _framed(answer: Answer, head_only: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The response headers and body of ``answer``. A forwarded HEAD carries IMDS's own
    ``Content-Length``: it stands for a body of that length, which HEAD leaves out."""
    out = [(b"content-type", answer.content_type.encode("latin-1"))]
    body = answer.body
    for name, value in answer.headers:
        if name == "content-length":
            if head_only and not body and value.isdigit() and int(value) <= MAX_HEAD_LENGTH:
                body = bytes(int(value))  # sized only: HEAD sends no body
            continue
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    return out, body


def _address(name: Any) -> Address | None:
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return None


class FrontHttp(HttpServer):
    """The front's :class:`HttpServer`: each connection's caller is looked up right after
    accept and admitted by its uid (:class:`~imdsd.front.quota.ConnectionQuota`); one over
    its limits is answered IMDS's 429 at once and closed.

    It never holds more than :data:`MAX_CONNECTIONS` sockets (the descriptors the daemon
    keeps for it), those being looked up or refused included: at that many it accepts no
    more until one closes (new ones wait in the kernel's backlog, they are not refused).
    Admitted connections leave :data:`SPARE` of them for lookups and refusals, so a uid over
    its limit is still answered at once.
    """

    def __init__(self, front: FrontServer) -> None:
        super().__init__(front.handle, LIMITS, max_connections=MAX_CONNECTIONS)
        self.front = front
        self.quota = ConnectionQuota(MAX_CONNECTIONS - SPARE, PER_UID, RESERVE)
        self.room = trio.Semaphore(MAX_CONNECTIONS)

    async def _accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        while True:
            await self.room.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                self.room.release()
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    log.warning("front accept failed, pausing", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                raise
            except BaseException:
                self.room.release()
                raise
            nursery.start_soon(self._holding_room, stream)

    async def _holding_room(self, stream: trio.abc.Stream) -> None:
        try:
            await self.handle(stream)
        finally:
            self.room.release()

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted stream if its caller's uid may hold one more connection."""
        self.accepted += 1
        try:
            conn = Connection(stream)
            caller = await self.front.caller(conn)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        uid = caller.uid
        slot = self.quota.admit(uid, uid == 0 or uid in self.front.policy().allow_uids)
        if slot is None:
            self.rejected += 1
            self.front.throttled(caller)
            await _throttle(stream, self.limits, self.server_header)
            return
        self.active += 1
        try:
            await serve_connection(
                stream,
                self.handler,
                self.limits,
                self.idle,
                server_header=self.server_header,
                peer=conn,
            )
        finally:
            self.active -= 1
            self.quota.release(slot)


THROTTLED: Final = error_body(TOO_MANY_REQUESTS)


async def _throttle(stream: trio.abc.Stream, limits: ServerLimits, server_header: bytes) -> None:
    """IMDS's 429 without reading a request, and close (within REJECT_LINGER)."""
    transport = Transport(stream, limits.write_timeout)
    protocol = ServerProtocol(limits, server_header)
    protocol.close_after = True
    headers = [(b"content-type", JSON_TYPE.encode()), (b"x-imdsd-source", b"front")]
    linger = min(REJECT_LINGER, limits.drain_timeout)
    try:
        with trio.move_on_after(linger), contextlib.suppress(HttpIOError):  # a peer gone: nothing
            await Responder(protocol, transport).send(429, headers, THROTTLED)
    finally:
        with trio.CancelScope(shield=True):
            await transport.close(linger)


class FrontServer(HttpService):
    """The front: ``handle`` answers one request; ``serve`` runs the listener."""

    def __init__(
        self,
        ctx: ApiContext,
        config: FrontConfig,
        *,
        client: Callable[[], ImdsClient],
        budget: Callable[[], Budget],
        policy: Callable[[], AccessPolicy],
        metrics: Metrics,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.policy = policy
        self.cache = CacheAnswers(ctx, lambda: client().versions.chosen(), policy)  # noqa: PLW0108 - the client changes on reload
        self.relay = Relay(
            client, budget, queue_timeout=config.queue_timeout, token_cache=config.token_cache
        )
        self.resolver = resolver or Resolver()
        self.stats = CallerStats()
        self.results = metrics.front_requests
        self.http = FrontHttp(self)
        metrics.front_waiting.track(lambda: self.relay.waiting)

    def reconfigure(self, config: FrontConfig) -> None:
        """Apply a reloaded ``[front]``: ``queue_timeout`` and ``token_cache`` at once."""
        self.config = config
        self.relay.queue_timeout = config.queue_timeout
        self.relay.token_cache = config.token_cache

    async def caller(self, conn: Any) -> Caller:
        """The caller of connection ``conn``, looked up once (in a worker thread)."""
        if not isinstance(conn, Connection) or conn.peer is None:
            return UNKNOWN
        if conn.caller is None:
            try:
                conn.caller = await trio.to_thread.run_sync(
                    self.resolver.resolve,
                    conn.peer,
                    conn.ours,
                    conn.original,
                    abandon_on_cancel=True,
                )
            except Exception:  # an unknown caller is served (restricted paths refused), not 500
                log.exception("front caller lookup failed", peer=conn.peer)
                conn.caller = UNKNOWN
        return conn.caller

    async def handle(self, request: Request, responder: Responder) -> None:
        """Answer one agent request as IMDS would (the HttpServer handler)."""
        caller = await self.caller(request.peer)
        counts = self.stats.counts(caller)
        counts.requests += 1
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        verdict = check(request.method, request.target, headers, self.cache.known_versions())
        answer: Answer | None
        if isinstance(verdict, Refusal):
            answer = Answer(
                verdict.status,
                verdict.body,
                verdict.content_type,
                (*verdict.headers, ("x-imdsd-source", "front")),
                "refused",
            )
        else:
            answer = None
            peer = Peer(caller.pid or -1, caller.uid, caller.gid)
            if not verdict.forwarded:
                answer = self.cache.answer(verdict, peer) or self.cache.learned(verdict)
            if answer is None:

                def queued() -> None:
                    counts.queued += 1

                answer = await self.relay.forward(
                    verdict,
                    caller=(caller.uid, caller.pid),
                    target=verdict.target,  # canonical: what was checked, never the raw one
                    headers=headers,
                    body=request.body,
                    on_queued=queued,
                )
                answer = redact_forwarded(self.policy(), verdict, peer, answer)
                self.cache.learn(verdict, answer)
        self.results[answer.result] += 1
        kind = _COUNTED[answer.result]
        setattr(counts, kind, getattr(counts, kind) + 1)
        out, body = _framed(answer, responder.head_only)
        await responder.send(answer.status, out, body)

    def throttled(self, caller: Caller) -> None:
        """Count a connection refused because ``caller``'s uid holds too many."""
        counts = self.stats.counts(caller)
        counts.requests += 1
        counts.refused += 1
        self.results["throttled"] += 1

    def status(self) -> dict[str, Any]:
        """The front's part of ``/v1/health``: listeners, results, queue and top callers."""
        return {
            "listen": list(self.listening),
            "requests": dict(self.results),
            "waiting": self.relay.waiting,
            "tokens_cached": len(self.relay.tokens),
            "connections": self.http.active,
        }

    def callers(self, count: int = TOP_CALLERS) -> list[dict[str, Any]]:
        """The ``count`` busiest callers (uid, pid, command and their counters)."""
        return self.stats.top(count)
