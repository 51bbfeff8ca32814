"""systemd's native journal protocol, without libsystemd.

:func:`stderr_is_journal` tells whether ``$JOURNAL_STREAM`` names fd 2 (systemd.exec(5)).
:func:`encode_entry` builds one entry as journald reads it from a datagram (``NAME=value``
lines; a value with a newline in the binary form: ``NAME``, newline, little-endian 64-bit
length, value, newline). :class:`JournalSink` sends entries to ``/run/systemd/journal/socket``
without ever blocking: an entry too large for one datagram goes in a sealed memfd passed with
``SCM_RIGHTS`` (as ``sd_journal_sendv`` does), and an entry the socket does not take (missing
socket, full queue, any error) is written to the fallback stream as one line with the
sd-daemon ``<N>`` priority prefix instead, so no record is lost without a trace.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, TextIO

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
IDENTIFIER: Final = "imdsd"
FIELD_PREFIX: Final = "IMDSD_"
PRIORITIES: Final[Mapping[str, int]] = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}
_MAX_NAME: Final = 64
_INVALID: Final = re.compile(r"[^A-Z0-9_]")
_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_TOO_BIG: Final = frozenset({errno.EMSGSIZE, errno.ENOBUFS})
SEND_BUFFER: Final = 8 * 1024 * 1024

Field = tuple[str, str]


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``$JOURNAL_STREAM`` (``DEVICE:INODE``) is the file behind ``fd``."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(fd)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def field_name(key: str) -> str:
    """The journal field for structured key ``key``: ``IMDSD_`` + upper-cased, ``_`` for others.

    Journal field names allow only ``A-Z``, ``0-9`` and ``_`` and at most 64 characters.
    """
    return (FIELD_PREFIX + _INVALID.sub("_", key.upper()))[:_MAX_NAME]


def encode_entry(fields: Iterable[Field]) -> bytes:
    """One journal entry in the native protocol's datagram form."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def fallback_line(priority: int, message: str) -> str:
    """``<N>message`` on one line (newlines escaped), as journald reads stream lines."""
    return f"<{priority}>{_escape(message)}\n"


class JournalSink:
    """Sends entries to journald's socket; never blocks, falls back to ``<N>`` lines.

    ``sent`` counts entries the socket took (``memfd`` those passed in a memfd), ``fallbacks``
    those written to ``fallback`` instead. The first failure of the socket is reported once
    on ``fallback`` with its reason.
    """

    def __init__(self, fallback: TextIO, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.fallback = fallback
        self.sent = 0
        self.memfd = 0
        self.fallbacks = 0
        self._socket: socket.socket | None = None
        self._reported = False

    def _sock(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            self._socket = sock
        return self._socket

    def send(self, priority: int, message: str, fields: Sequence[Field]) -> bool:
        """Send one entry (``PRIORITY``, ``MESSAGE``, ``SYSLOG_IDENTIFIER`` and ``fields``).

        True when journald's socket took it; False when it went to the fallback stream.
        """
        entry = encode_entry(
            [
                ("PRIORITY", str(priority)),
                ("SYSLOG_IDENTIFIER", IDENTIFIER),
                ("MESSAGE", message),
                *fields,
            ]
        )
        try:
            try:
                self._sock().sendto(entry, self.path)
            except OSError as exc:
                if exc.errno not in _TOO_BIG:
                    raise
                self._send_memfd(entry)
                self.memfd += 1
        except OSError as exc:
            self._fall_back(priority, message, exc)
            return False
        self.sent += 1
        return True

    def _send_memfd(self, entry: bytes) -> None:
        fd = os.memfd_create("journal-data", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = array.array("i", [fd])
            self._sock().sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.path)
        finally:
            os.close(fd)

    def _fall_back(self, priority: int, message: str, exc: OSError) -> None:
        self.fallbacks += 1
        if not self._reported:
            self._reported = True
            reason = exc.strerror or str(exc)
            self._write(
                fallback_line(4, f"journal socket {self.path} not usable ({reason}); logging here")
            )
        self._write(fallback_line(priority, message))

    def _write(self, line: str) -> None:
        try:
            self.fallback.write(line)
            self.fallback.flush()
        except (OSError, ValueError):
            pass  # stderr itself is gone: there is nowhere left to say it

    def close(self) -> None:
        """Close the socket (the next entry opens it again)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
