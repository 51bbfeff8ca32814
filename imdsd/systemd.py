"""systemd integration without libsystemd: sd_notify messages and socket activation.

`Notifier` writes the service-manager notifications (READY, STATUS, WATCHDOG, RELOADING,
STOPPING) as datagrams to ``$NOTIFY_SOCKET``; `watchdog_interval` reads ``$WATCHDOG_USEC``;
`listen_fds` takes over the sockets systemd passed (``$LISTEN_FDS``, ``$LISTEN_FDNAMES``).
All three follow sd-daemon(3): variables meant for another process (``$LISTEN_PID`` /
``$WATCHDOG_PID`` not ours) are ignored, and the variables are removed once read so that hook
processes do not inherit them.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

import structlog

LISTEN_FDS_START = 3
_NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SystemdError(ValueError):
    """A systemd environment variable holds a value that cannot be right; the message names it."""


def _logger() -> structlog.typing.FilteringBoundLogger:
    # Looked up on each use, so that structlog configuration (and capture_logs) made later applies.
    return structlog.get_logger(__name__)  # type: ignore[no-any-return]


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _positive_int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        number = int(value, 10)
    except ValueError:
        raise SystemdError(f"{name}={value!r} is not a number") from None
    if number <= 0:
        raise SystemdError(f"{name}={value!r} must be a positive number")
    return number


def _for_this_process(environ: Mapping[str, str], name: str, pid: int) -> bool:
    """True unless ``name`` (a PID variable) is set and names another process."""
    if name not in environ:
        return True
    return _positive_int(environ, name) == pid


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, or None.

    None when the watchdog is off, or when ``$WATCHDOG_PID`` names another process. Reads the
    environment without changing it. Raises `SystemdError` for a malformed value.
    """
    env = os.environ if environ is None else environ
    if "WATCHDOG_USEC" not in env:
        return None
    if not _for_this_process(env, "WATCHDOG_PID", os.getpid() if pid is None else pid):
        return None
    return _positive_int(env, "WATCHDOG_USEC") / 2 / 1_000_000


def notify_address(value: str) -> str | bytes:
    """The socket address for a ``$NOTIFY_SOCKET`` value: a path, or ``@name`` (abstract).

    Raises `SystemdError` for anything else (systemd >= 254 also knows ``vsock:``, which
    imdsd does not support).
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    raise SystemdError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor @abstract")


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


class Notifier:
    """Sends sd_notify(3) messages to the service manager; does nothing when not under systemd.

    Sending never raises: a failure is logged once (the first time) and the message dropped.
    The socket is non-blocking, so a full receive queue cannot stall the caller.
    """

    def __init__(
        self,
        address: str | bytes | None,
        *,
        watchdog_interval: float | None = None,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        """Notify ``address`` (a path or ``b"\\0name"``; None = disabled)."""
        self.address = address
        self.watchdog_interval = watchdog_interval
        self._monotonic_usec = monotonic_usec
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_env(
        cls, environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = True
    ) -> Notifier:
        """Build from ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        The watchdog interval (see `watchdog_interval`) is kept in ``self.watchdog_interval``.
        With ``unset_environment`` the three variables are removed, so children do not see
        them. A bad ``$NOTIFY_SOCKET`` or watchdog value is logged and ignored.
        """
        env = os.environ if environ is None else environ
        address: str | bytes | None = None
        interval: float | None = None
        try:
            if env.get("NOTIFY_SOCKET"):
                address = notify_address(env["NOTIFY_SOCKET"])
        except SystemdError as error:
            _logger().warning("systemd notifications disabled", error=str(error))
        try:
            interval = watchdog_interval(env)
        except SystemdError as error:
            _logger().warning("systemd watchdog setting ignored", error=str(error))
        if unset_environment:
            for name in _NOTIFY_VARIABLES:
                env.pop(name, None)
        return cls(address, watchdog_interval=interval)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments as one datagram; True when it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as error:
            if not self._failed:
                self._failed = True
                _logger().warning(
                    "systemd notification failed; further failures are not logged",
                    address=repr(self.address),
                    error=str(error),
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup finished, or a reload did; optionally with a status line."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """``STATUS=``: one line for ``systemctl status`` (newlines become spaces)."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the daemon is alive; due every `watchdog_interval` seconds."""
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        """``RELOADING=1`` plus ``MONOTONIC_USEC`` (systemd >= 253 wants it); `ready` ends it."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: graceful shutdown began."""
        if status is None:
            return self.send("STOPPING=1")
        return self.send("STOPPING=1", f"STATUS={_one_line(status)}")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more to finish starting or stopping."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def close(self) -> None:
        """Close the notification socket (it is reopened by the next message)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def parse_listen_env(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The ``(fd, name)`` pairs that ``$LISTEN_FDS`` / ``$LISTEN_FDNAMES`` pass to ``pid``.

    Empty when nothing was passed or ``$LISTEN_PID`` names another process. Names default to
    ``unknown``, as in sd_listen_fds_with_names(3). Raises `SystemdError` when a value is
    malformed or the name count differs from the fd count.
    """
    if "LISTEN_FDS" not in environ or "LISTEN_PID" not in environ:
        return []
    if _positive_int(environ, "LISTEN_PID") != pid:
        return []
    count = _positive_int(environ, "LISTEN_FDS")
    names = ["unknown"] * count
    if "LISTEN_FDNAMES" in environ:
        names = environ["LISTEN_FDNAMES"].split(":")
        if len(names) != count:
            raise SystemdError(
                f"LISTEN_FDNAMES={environ['LISTEN_FDNAMES']!r} names {len(names)} sockets,"
                f" but LISTEN_FDS={count}"
            )
    return [(LISTEN_FDS_START + index, name) for index, name in enumerate(names)]


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = True
) -> list[tuple[socket.socket, str]]:
    """Take over the sockets systemd passed (socket activation) as ``(socket, name)`` pairs.

    The fds get ``FD_CLOEXEC``; with ``unset_environment`` the ``LISTEN_*`` variables are
    removed (also when they were meant for another process). Raises `SystemdError` for a
    malformed environment or a passed fd that is not an open socket.
    """
    env = os.environ if environ is None else environ
    try:
        passed = parse_listen_env(env, os.getpid())
    finally:
        if unset_environment:
            for name in _LISTEN_VARIABLES:
                env.pop(name, None)
    sockets: list[tuple[socket.socket, str]] = []
    for fd, name in passed:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            sockets.append((socket.socket(fileno=fd), name))
        except OSError as error:
            for sock, _ in sockets:
                sock.detach()
            raise SystemdError(
                f"passed fd {fd} ({name!r}) is not a usable socket: {error}"
            ) from None
    return sockets
