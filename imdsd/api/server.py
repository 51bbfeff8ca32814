"""The local API's trio shell: listeners, peer credentials, and request dispatch.

:func:`open_listeners` binds the configured unix socket (removing a stale socket file,
refusing to steal one a live process still serves, applying ``socket_mode`` and
``socket_group``) or adopts inherited listening sockets (systemd socket activation; their
mode and group are systemd's business then). :class:`ApiServer` serves them through
:class:`imdsd.httpio.HttpServer`: keep-alive, pipelining, ``max_connections`` (503), header
(431) and body (413) limits, idle and request-read deadlines all come from there.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
import struct
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
import trio

from imdsd.api.access import AccessPolicy, Peer
from imdsd.api.context import ApiContext
from imdsd.api.lines import FrameLines
from imdsd.api.metrics import Metrics
from imdsd.api.routes import ApproveCall, EventsCall, Reply, Router, WatchCall, error, json_reply
from imdsd.api.watch import JSON_HEADERS, NDJSON_HEADERS, Watchers
from imdsd.config import ServerConfig
from imdsd.frames import ChangeFrame
from imdsd.httpio import HttpServer, Request, Responder, ServerLimits, unix_listener
from imdsd.httpio import listeners as _listeners
from imdsd.httpio.listeners import HttpService, adopt

log = structlog.get_logger("imdsd.api")

ListenError = _listeners.ListenError  # what open_listeners raises, under its usual name

DEFAULT_LIMITS = ServerLimits(
    max_head=16384, max_body=8192, idle_timeout=60.0, request_timeout=10.0, drain_timeout=1.0
)
APPROVE_TIMEOUT = 60.0
_PEERCRED = struct.Struct("iII")


def peer_credentials(stream: trio.abc.Stream) -> Peer | None:
    """The pid, uid and gid of a unix-socket peer (SO_PEERCRED); None for anything else."""
    if not isinstance(stream, trio.SocketStream) or stream.socket.family != socket.AF_UNIX:
        return None
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    return Peer(*_PEERCRED.unpack(raw))


def _group_id(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ListenError(f"server.socket_group: group {name!r} does not exist") from None


def _check_not_in_use(path: str) -> None:
    """Refuse a socket path another live process serves (a stale one is fine)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"server.socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return
    except OSError as exc:
        raise ListenError(f"server.socket: cannot tell whether {path} is in use: {exc}") from None
    finally:
        probe.close()
    raise ListenError(f"server.socket: {path} is in use by another running process")


def bind_unix(config: ServerConfig) -> trio.SocketListener:
    """Listen on ``config.socket`` with ``socket_mode`` and ``socket_group`` applied."""
    path = config.socket
    gid = _group_id(config.socket_group)
    parent = os.path.dirname(path)
    try:
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        _check_not_in_use(path)
        listener = unix_listener(path, config.socket_mode)
    except OSError as exc:
        raise ListenError(
            f"server.socket: cannot listen on {path}: {exc.strerror or exc}"
        ) from None
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            listener.socket.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise ListenError(
                f"server.socket_group: cannot give {path} to group {config.socket_group!r}: "
                f"{exc.strerror or exc}"
            ) from None
    return listener


def open_listeners(
    config: ServerConfig, inherited: Sequence[socket.socket] = ()
) -> list[trio.SocketListener]:
    """The inherited sockets when there are any, else the configured unix socket.

    Raises :class:`ListenError` with a one-line message naming what is wrong.
    """
    if inherited:
        return adopt(inherited)
    return [bind_unix(config)]


def _upstream_body(body: bytes) -> Any:
    with contextlib.suppress(msgspec.DecodeError):
        return msgspec.json.decode(body)
    return body[:2000].decode("utf-8", "replace")


class ApiServer(HttpService):
    """The local API: routes, watch streams, long polls and approvals over HTTP/1.1.

    ``metrics`` is the daemon's shared registry (its watcher, connection and revision gauges
    are tracked here). ``max_pending`` bounds each watcher's queue of unsent frames.
    """

    def __init__(
        self,
        ctx: ApiContext,
        config: ServerConfig,
        metrics: Metrics | None = None,
        *,
        limits: ServerLimits | None = None,
        max_pending: int = 1024,
        write_timeout: float = 10.0,
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.policy = AccessPolicy(
            config.restricted_paths, config.restricted_allow_uids, config.restricted_allow_gids
        )
        self.router = Router(ctx, self.policy, self.metrics, live=self._live)
        self.lines = FrameLines(self.policy)
        self.watchers = Watchers(
            ctx,
            self.router,
            self.lines,
            self.metrics,
            heartbeat=config.heartbeat,
            max_pending=max_pending,
            write_timeout=write_timeout,
        )
        self.http = HttpServer(
            self.handle,
            limits or DEFAULT_LIMITS,
            max_connections=config.max_connections,
            peer_info=peer_credentials,
        )
        self.metrics.watchers.track(lambda: self.watchers.active)
        self.metrics.connections.track(lambda: self.http.active)

    def reconfigure(self, config: ServerConfig) -> None:
        """Apply a reloaded ``[server]`` section.

        The access policy, ``heartbeat`` and ``max_connections`` take effect at once (for new
        requests, frames and connections; a watcher keeps the access level it started with);
        ``socket``, ``socket_mode`` and ``socket_group`` need a restart.
        """
        self.config = config
        self.policy = AccessPolicy(
            config.restricted_paths, config.restricted_allow_uids, config.restricted_allow_gids
        )
        self.router.reset(self.policy)
        self.lines.reset(self.policy)
        self.watchers.heartbeat = config.heartbeat
        self.http.max_connections = config.max_connections

    def deliver(self, frame: ChangeFrame) -> None:
        """Write a just-published frame to every waiting watch stream at once."""
        self.watchers.deliver(frame)

    def _live(self) -> dict[str, int]:
        return {"watchers": self.watchers.active, "connections": self.http.active}

    async def handle(self, request: Request, responder: Responder) -> None:
        """Answer one request (the :class:`imdsd.httpio.HttpServer` handler).

        HEAD is answered as GET (httpio sends no body); for a watch stream or a long poll,
        with the head of its answer at once.
        """
        head = request.method == "HEAD"
        outcome = self.router.route_target(
            "GET" if head else request.method,
            request.target,
            request.header("if-none-match"),
            request.peer,
        )
        if isinstance(outcome, Reply):
            await responder.send(outcome.status, outcome.headers, outcome.body)
        elif head and isinstance(outcome, WatchCall | EventsCall):
            streamed = isinstance(outcome, WatchCall)
            await responder.start(200, NDJSON_HEADERS if streamed else JSON_HEADERS)
            await responder.end()
        elif isinstance(outcome, WatchCall):
            await self.watchers.stream(outcome, responder)
        elif isinstance(outcome, EventsCall):
            await self.watchers.poll(outcome, responder)
        else:
            reply = await self.approve(outcome)
            await responder.send(reply.status, reply.headers, reply.body)

    async def approve(self, call: ApproveCall) -> Reply:
        """Ask upstream to start ``call.event_id`` and report what it answered."""
        peer = call.peer
        log.info(
            "approving scheduled event",
            event_id=call.event_id,
            pid=peer.pid if peer else None,
            uid=peer.uid if peer else None,
        )
        try:
            with trio.fail_after(APPROVE_TIMEOUT):
                status, body = await self.ctx.approve(call.event_id)
        except trio.TooSlowError:
            return error(504, f"no answer from IMDS within {APPROVE_TIMEOUT:g}s")
        except Exception as exc:
            log.warning("approval failed", event_id=call.event_id, error=str(exc))
            return error(502, f"could not approve {call.event_id} upstream: {exc}")
        answer: dict[str, Any] = {
            "event_id": call.event_id,
            "approved": 200 <= status < 300,
            "upstream_status": status,
        }
        if body:
            answer["upstream_body"] = _upstream_body(body)
        if answer["approved"]:
            return json_reply(200, answer)
        return error(502, f"IMDS answered {status} to the approval", **answer)
