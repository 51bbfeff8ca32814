"""The emulator's trio shell: listens on TCP, applies faults, runs the scenario timeline.

Everything that decides an answer is sans-IO (:mod:`.endpoints`, :mod:`.control`,
:mod:`.rules`, :mod:`.state`); this module owns the sockets (via :mod:`imdsd.httpio`), the
clock (``trio.current_time()``, so tests can use ``MockClock``) and the fault actions that need
I/O: delays, connection resets (``SO_LINGER`` 0, so the peer sees a TCP RST) and truncated
bodies.

Library use::

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_emulator, EmulatorConfig(port=0))
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from imdsd import __version__
from imdsd.emulator.control import Control, is_control_path
from imdsd.emulator.endpoints import Answer, answer_imds, error_answer, json_answer
from imdsd.emulator.faults import Fault, FaultError
from imdsd.emulator.identity import TOO_MANY
from imdsd.emulator.profiles import Profile, get_profile
from imdsd.emulator.rules import RequestRules
from imdsd.emulator.scenario import Scenario, ScenarioError, apply_action, dry_run
from imdsd.emulator.state import StateError, VMState
from imdsd.httpio import HttpServer, PeerClosed, Request, Responder, ServerLimits

log = structlog.get_logger("imdsd.emulator")

SERVER_HEADER = f"imdsd-emulator/{__version__}".encode()
LIMITS = ServerLimits(max_body=1 << 20, idle_timeout=120.0, request_timeout=30.0)


@dataclass
class EmulatorConfig:
    """How to run an emulator. ``port`` 0 picks a free port; ``instance`` and
    ``loadbalancer`` override the profile's default documents."""

    host: str = "127.0.0.1"
    port: int = 0
    profile: str = "azure"
    scenario: Scenario | None = None
    rate_limit: float = 5.0
    identity_rate_limit: float = 20.0
    instance: dict[str, Any] | None = None
    loadbalancer: dict[str, Any] | None = None


class _Abort(PeerClosed):
    """Raised by the handler to make httpio drop the connection without answering."""


class Emulator:
    """One emulated IMDS: its VM state, rules, control API and scenario timeline."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.profile: Profile = get_profile(config.profile)
        instance = config.instance
        loadbalancer = config.loadbalancer
        self.state = VMState(
            instance if instance is not None else self.profile.default_instance(),
            loadbalancer if loadbalancer is not None else self.profile.default_loadbalancer(),
        )
        self.rules = RequestRules(
            self.profile,
            rate_limit=config.rate_limit,
            identity_rate_limit=config.identity_rate_limit,
        )
        self.control = Control(
            self.state,
            self.rules,
            new_id=lambda: str(uuid.uuid4()).upper(),
            scenario_info=self._scenario_info,
        )
        self.scenario = config.scenario
        self.applied_steps = 0
        self.failed_steps: list[str] = []
        self._wall0 = time.time()
        self._t0 = 0.0
        if self.scenario is not None:
            dry_run(self.scenario, self.state, now_wall=self._wall0)

    # ------------------------------------------------------------------ clock

    def now_wall(self) -> float:
        """Epoch seconds: the real start time plus the trio time elapsed since."""
        return self._wall0 + (trio.current_time() - self._t0)

    # ------------------------------------------------------------------ serving

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, run the scenario, serve until cancelled; ``started((host, port))``."""
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        sockname = listeners[0].socket.getsockname()
        self._t0 = trio.current_time()
        http = HttpServer(
            self._gated,
            LIMITS,
            max_connections=1 << 20,  # IMDS caps requests per second, not connections
            server_header=SERVER_HEADER,
            peer_info=lambda stream: stream,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(http.serve, listeners)
            if self.scenario is not None:
                nursery.start_soon(self._run_scenario, self.scenario)
            task_status.started((str(sockname[0]), int(sockname[1])))

    async def _gated(self, request: Request, responder: Responder) -> None:
        """Managed identity: at most ``identity_gate.limit`` in flight (IMDS's 5), else 429."""
        gate = self.rules.identity_gate
        if not gate.covers(request.path):
            return await self._handle(request, responder)
        if not gate.enter():
            self.state.stats.arrived(request.path, trio.current_time())
            self.state.stats.answered(request.path, 429)
            refusal = json_answer(429, TOO_MANY)
            return await responder.send(429, refusal.header_list(), refusal.body)
        try:
            await trio.sleep(gate.latency)
            await self._handle(request, responder)
        finally:
            gate.leave()

    async def _handle(self, request: Request, responder: Responder) -> None:
        stream = request.peer  # the connection's stream (peer_info above)
        path = request.path
        method = "GET" if request.method == "HEAD" else request.method  # httpio drops the body
        if is_control_path(path):
            answer = self.control.handle(method, path, request.body, now_wall=self.now_wall())
            await responder.send(answer.status, answer.header_list(), answer.body)
            return
        self.state.stats.arrived(path, trio.current_time())
        fault = self.state.faults.take(path)
        if fault is not None:
            if fault.delay:
                await trio.sleep(fault.delay)
            if fault.reset:
                self.state.stats.answered(path, "reset")
                _reset(stream)
                raise _Abort("reset fault")
            special = _fault_answer(fault)
            if special is not None:
                self.state.stats.answered(path, special.status)
                await responder.send(special.status, special.header_list(), special.body)
                return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        answer = answer_imds(
            self.state,
            self.rules,
            method=method,
            target=request.target,
            headers=headers,
            body=request.body,
            now=trio.current_time(),
            now_wall=self.now_wall(),
        )
        self.state.stats.answered(path, answer.status)
        if fault is not None and fault.truncate:
            await responder.start(answer.status, answer.header_list())
            await responder.write(answer.body[: len(answer.body) // 2])
            raise _Abort("truncate fault")
        await responder.send(answer.status, answer.header_list(), answer.body)

    # ------------------------------------------------------------------ scenario

    async def _run_scenario(self, scenario: Scenario) -> None:
        log.info("scenario started", scenario=scenario.source, steps=len(scenario.steps))
        for step in scenario.steps:
            await trio.sleep_until(self._t0 + step.at)
            try:
                apply_action(self.state, step.action, step.params, now_wall=self.now_wall())
            except (StateError, FaultError) as exc:
                self.failed_steps.append(f"{step.where()}: {step.action}: {exc}")
                log.warning(
                    "scenario step failed", step=step.index, action=step.action, error=str(exc)
                )
                continue
            self.applied_steps += 1
            log.info(
                "scenario step", step=step.index, at=step.at, action=step.action, params=step.params
            )
        log.info("scenario finished", scenario=scenario.source)

    def _scenario_info(self) -> dict[str, Any] | None:
        if self.scenario is None:
            return None
        return {
            "source": self.scenario.source,
            "name": self.scenario.name,
            "steps": len(self.scenario.steps),
            "applied": self.applied_steps,
            "failed": list(self.failed_steps),
            "elapsed": trio.current_time() - self._t0,
        }


def _reset(stream: trio.SocketStream) -> None:
    """Close the socket so that the peer gets a TCP RST instead of an answer."""
    sock = stream.socket
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _fault_answer(fault: Fault) -> Answer | None:
    """The answer a status, body or oversize fault gives instead of the normal one."""
    if fault.oversize is not None:
        filler = b"x" * max(0, fault.oversize - len(b'{"padding":""}'))
        return Answer(200, b'{"padding":"' + filler + b'"}')
    if fault.status is None and fault.body is None:
        return None
    status = fault.status if fault.status is not None else 200
    headers = (("retry-after", fault.retry_after),) if fault.retry_after is not None else ()
    if fault.body is not None:
        return Answer(status, fault.body, "application/json; charset=utf-8", headers)
    answer = error_answer(status, _REASONS.get(status, f"HTTP {status}"))
    return Answer(answer.status, answer.body, answer.content_type, headers)


_REASONS = {
    400: "Bad request",
    404: "Not found",
    410: "Gone. The resource is not available yet; retry later",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


async def serve_emulator(
    config: EmulatorConfig,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an emulator until cancelled; ``await nursery.start(serve_emulator, cfg)`` gives
    the bound ``(host, port)``. Raises ScenarioError before listening if a step cannot apply."""
    await Emulator(config).serve(task_status=task_status)


__all__ = ["Emulator", "EmulatorConfig", "ScenarioError", "serve_emulator"]
