"""``imdsd demo [--duration S]``: emulator + daemon + an example hook, narrated.

In a fresh temporary directory the demo starts the IMDS emulator in-process (ephemeral port),
writes a daemon configuration and an example hook script, and starts ``imdsd run`` as a
subprocess (its own session, so a Ctrl-C reaches only the demo; its log goes to
``daemon.log``). Once the daemon is ready it plays the scenario shipped in the package
(``imdsd/emulator/data/demo-scenario.toml``), step by step against the emulator, and prints
one timeline line per scenario step, per change seen on the watch stream, per hook run and per
upstream health change (the throttling burst shows up there). With ``--duration`` the
scenario's timeline is compressed (up to 4x) so that all of it fits. At the end (``--duration``
elapsed, or SIGINT/SIGTERM) it stops the daemon with SIGTERM, prints a summary and removes the
directory. Exit codes: 0 success, 1 when the daemon failed (or the emulator could not start),
2 for a bad ``--duration``.

Scenario times count from the moment the daemon is ready rather than from the emulator's
start, so the daemon's start-up time never swallows the first steps into its first snapshot.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, Final, TextIO

import trio

from imdsd.aclient import AsyncClient
from imdsd.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from imdsd.client import ImdsdError
from imdsd.demo_view import Palette, Timeline, describe_step, parse_log_line, use_colour
from imdsd.demo_workspace import Workspace, daemon_env, workspace
from imdsd.emulator.faults import FaultError
from imdsd.emulator.scenario import Scenario, ScenarioError, apply_action, demo_scenario
from imdsd.emulator.scenario import dry_run as dry_run_scenario
from imdsd.emulator.server import Emulator, EmulatorConfig
from imdsd.emulator.state import StateError
from imdsd.frames import ChangeFrame, StateFrame
from imdsd.logs import configure_logging

MAX_SPEED: Final = 4.0
TAIL: Final = 3.0  # seconds kept after the last step for its change and hook run to show up
READY_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
# --------------------------------------------------------------------------- pure helpers


def validate_duration(value: float | None) -> str | None:
    """The problem with ``--duration`` (None when it is fine: absent, or finite and > 0)."""
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        return f"--duration must be a number of seconds > 0, got {value!r}"
    return None


def speed_for(scenario_length: float, remaining: float | None) -> float:
    """How much to compress the scenario so it ends within ``remaining`` seconds.

    1 without a time limit or when it fits; at most :data:`MAX_SPEED`.
    """
    if remaining is None or scenario_length <= 0:
        return 1.0
    if remaining <= 0:
        return MAX_SPEED
    return min(MAX_SPEED, max(1.0, scenario_length / remaining))


def scaled(scenario: Scenario, speed: float) -> Scenario:
    """``scenario`` with every step's ``at`` divided by ``speed``."""
    if speed == 1.0:
        return scenario
    steps = tuple(replace(step, at=step.at / speed) for step in scenario.steps)
    return replace(scenario, steps=steps)


# --------------------------------------------------------------------------- the trio shell


class Demo:
    """One run of the demo: emulator, daemon process, watch stream and timeline."""

    def __init__(
        self, ws: Workspace, duration: float | None, out: TextIO, daemon_log: BinaryIO
    ) -> None:
        self.ws = ws
        self.daemon_log = daemon_log
        self.duration = duration
        self.out = out
        self.timeline = Timeline(Palette(use_colour(out, os.environ)))
        self.scenario = demo_scenario()
        self.emulator = Emulator(EmulatorConfig(port=0))
        dry_run_scenario(self.scenario, self.emulator.state)
        self.t0 = 0.0
        self.proc: trio.Process | None = None
        self.state_seen = trio.Event()
        self.out_closed = False

    def now(self) -> float:
        """Seconds since the demo started."""
        return trio.current_time() - self.t0

    def emit(self, line: str | None) -> None:
        """Print one timeline line (output is dropped once the reader went away)."""
        if line is None or self.out_closed:
            return
        try:
            print(line, file=self.out, flush=True)
        except BrokenPipeError:
            self.out_closed = True
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())

    async def run(self) -> int:
        """Run the whole demo; returns the exit code."""
        self.t0 = trio.current_time()
        failure: str | None = None
        stats: dict[str, Any] = {}
        exit_text, stopped_ok = "was not started", False
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                host, port = await nursery.start(self.emulator.serve)
                endpoint = f"http://{host}:{port}"
                self.ws.write(endpoint)
                self.emit(
                    f"imdsd demo in {self.ws.root}: emulator {endpoint}, "
                    f"daemon socket {self.ws.socket}"
                )
                self.proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "imdsd", "run", "-c", self.ws.config],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=daemon_env(os.environ),
                    start_new_session=True,
                )
                pumped = trio.Event()
                try:
                    self.emit(self.timeline.note(self.now(), "daemon", f"pid {self.proc.pid}"))
                    nursery.start_soon(self._pump_log, pumped)
                    failure = await self._main_phase(signals)
                    stats = self.emulator.state.stats.as_dict()
                finally:
                    with trio.CancelScope(shield=True):
                        exit_text, stopped_ok = await self._stop_daemon()
                        with trio.move_on_after(STOP_TIMEOUT):
                            await pumped.wait()
                nursery.cancel_scope.cancel()
        summary = self.timeline.summary(self.now(), stats, self.ws.hook_log_lines(), exit_text)
        self.emit("\n".join(summary))
        if failure is not None:
            self.emit(f"imdsd demo: the daemon failed: {failure}")
            self._show_log_tail()
        return EXIT_OK if failure is None and stopped_ok else EXIT_FAILURE

    async def _main_phase(self, signals: AsyncIterator[int]) -> str | None:
        """Wait for the daemon, play the scenario and show the timeline until the end.

        Returns what went wrong with the daemon, or None.
        """
        died: list[str] = []
        async with trio.open_nursery() as inner:

            async def until_end() -> None:
                left = math.inf if self.duration is None else self.duration - self.now()
                with trio.move_on_after(max(0.0, left)):
                    async for signum in signals:
                        self.emit(
                            self.timeline.note(
                                self.now(), "demo", f"{signal.Signals(signum).name}, finishing"
                            )
                        )
                        break
                inner.cancel_scope.cancel()

            async def daemon_exit() -> None:
                assert self.proc is not None
                code = await self.proc.wait()
                died.append(f"it exited with code {code}")
                inner.cancel_scope.cancel()

            inner.start_soon(until_end)
            inner.start_soon(daemon_exit)
            if not await self._wait_ready():
                died.append(f"it was not ready after {READY_TIMEOUT:g}s")
                inner.cancel_scope.cancel()
                return died[0]
            inner.start_soon(self._watch)
            await self.state_seen.wait()
            remaining = None if self.duration is None else self.duration - self.now() - TAIL
            speed = speed_for(self.scenario.duration, remaining)
            how = "" if speed == 1.0 else f", played at {speed:.1f}x to fit --duration"
            self.emit(
                self.timeline.note(
                    self.now(),
                    "scenario",
                    f"{self.scenario.name!r}: {len(self.scenario.steps)} steps over "
                    f"{self.scenario.duration:g}s{how}",
                    "dim",
                )
            )
            inner.start_soon(self._play, scaled(self.scenario, speed), trio.current_time())
        return died[0] if died else None

    async def _wait_ready(self) -> bool:
        """Wait until the daemon's health says it serves a snapshot; False after a timeout."""
        async with AsyncClient(self.ws.socket, timeout=2.0) as client:
            with trio.move_on_after(READY_TIMEOUT):
                while True:
                    try:
                        response = await client.request("GET", "/v1/health")
                    except ImdsdError:
                        response = None
                    if response is not None and response.status == 200:
                        return True
                    await trio.sleep(0.1)
        return False

    async def _watch(self) -> None:
        """Print the state frame, then one line per change of every change frame."""
        async with AsyncClient(self.ws.socket) as client:
            frames = client.watch(retry_delay=0.2)
            try:
                async for frame in frames:
                    if isinstance(frame, StateFrame):
                        if not self.state_seen.is_set():
                            self.emit(self.timeline.state(self.now(), frame))
                            self.state_seen.set()
                    elif isinstance(frame, ChangeFrame):
                        for line in self.timeline.changes(self.now(), frame):
                            self.emit(line)
            finally:
                await frames.aclose()

    async def _play(self, scenario: Scenario, start: float) -> None:
        """Apply each scenario step to the emulator at its time."""
        state = self.emulator.state
        for step in scenario.steps:
            await trio.sleep_until(start + step.at)
            try:
                apply_action(state, step.action, step.params, now_wall=self.emulator.now_wall())
            except (StateError, FaultError) as exc:
                text = f"{describe_step(step)}: failed: {exc}"
                self.emit(self.timeline.note(self.now(), "scenario", text, "red"))
                continue
            self.emit(self.timeline.step(self.now(), step))
        self.emit(self.timeline.note(self.now(), "scenario", "finished", "dim"))

    async def _pump_log(self, done: trio.Event) -> None:
        """Copy the daemon's output to ``daemon.log`` and show the interesting events."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        log_file = self.daemon_log
        pending = b""
        try:
            while chunk := await self.proc.stdout.receive_some(65536):
                log_file.write(chunk)
                log_file.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._log_line(line)
            if pending:
                self._log_line(pending)
        finally:
            done.set()

    def _log_line(self, line: bytes) -> None:
        if not line.strip():
            return
        event = parse_log_line(line)
        if event is None:
            text = line.decode("utf-8", "replace").rstrip()
            self.emit(self.timeline.note(self.now(), "daemon", text, "red"))
        else:
            self.emit(self.timeline.log_event(self.now(), event))

    async def _stop_daemon(self) -> tuple[str, bool]:
        """SIGTERM, wait; returns how it ended and whether that was a clean exit 0."""
        proc = self.proc
        assert proc is not None
        if proc.returncode is not None:
            return f"had already exited with code {proc.returncode}", False
        self.emit(self.timeline.note(self.now(), "daemon", "sending SIGTERM"))
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            code = await proc.wait()
            if code == 0:
                return "stopped with SIGTERM, exit 0", True
            return f"stopped with SIGTERM, exit code {code} (expected 0)", False
        proc.kill()
        await proc.wait()
        return f"did not stop within {STOP_TIMEOUT:g}s of SIGTERM; killed", False

    def _show_log_tail(self, lines: int = 20) -> None:
        try:
            tail = Path(self.ws.daemon_log).read_text("utf-8", "replace").splitlines()[-lines:]
        except OSError:
            return
        self.emit("last lines of the daemon log:")
        for line in tail:
            self.emit(f"  {line}")


def demo_command(args: argparse.Namespace) -> int:
    """``imdsd demo [--duration S]``: returns the exit code."""
    duration: float | None = args.duration
    problem = validate_duration(duration)
    if problem is not None:
        print(f"imdsd demo: {problem}", file=sys.stderr)
        return EXIT_USAGE
    with (
        workspace() as ws,
        open(os.path.join(ws.root, "emulator.log"), "w", encoding="utf-8") as emulator_log,
        open(ws.daemon_log, "wb") as daemon_log,
    ):
        configure_logging("info", "json", stream=emulator_log)
        try:
            demo = Demo(ws, duration, sys.stdout, daemon_log)
        except ScenarioError as exc:
            print(f"imdsd demo: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            return trio.run(demo.run)
        except OSError as exc:
            print(f"imdsd demo: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
