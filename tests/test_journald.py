"""The journal: native protocol datagrams (both value forms, memfd), fallback lines, detection.

A unix datagram socket bound in ``tmp_path`` stands in for journald; the entries are parsed
here with an independent reader of the protocol (systemd's "Native Journal Protocol").
"""

from __future__ import annotations

import array
import fcntl
import io
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import trio
from daemon_support import daemon, emulator, write_config
from hypothesis import given
from hypothesis import strategies as st

from imdsd.journald import (
    JournalSink,
    encode_entry,
    fallback_line,
    field_name,
    stderr_is_journal,
)
from imdsd.logs import close_journal, configure_logging

Entry = list[tuple[str, bytes]]


def _boom() -> None:
    raise RuntimeError("boom")


def parse_entry(data: bytes) -> Entry:
    """Read one native-protocol entry: ``NAME=value\\n`` or ``NAME\\n<le64 size>value\\n``."""
    fields: Entry = []
    at = 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            at = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            at = end + 10 + size
        fields.append((name.decode(), value))
    return fields


def one(entry: Entry, name: str) -> str:
    """The only value of field ``name``."""
    [value] = [v for n, v in entry if n == name]
    return value.decode()


class Journal:
    """A datagram socket standing in for ``/run/systemd/journal/socket``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    def entries(self) -> list[Entry]:
        """Every entry received so far (a memfd entry is read from its file)."""
        out: list[Entry] = []
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return out
            fds = array.array("i")
            for level, kind, payload in ancdata:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if fds:
                assert data == b""
                [fd] = fds
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                assert seals & fcntl.F_SEAL_WRITE
                assert seals & fcntl.F_SEAL_SHRINK
                data = os.pread(fd, os.fstat(fd).st_size, 0)
                os.close(fd)
            out.append(parse_entry(data))

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sock")
    yield j
    j.close()


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    close_journal()


def test_journal_stream_must_name_fd_2s_file(tmp_path: Path) -> None:
    with (tmp_path / "f").open("w") as f:
        st_ = os.fstat(f.fileno())
        here = f"{st_.st_dev}:{st_.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": here}, fd=f.fileno())
        assert not stderr_is_journal(
            {"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino + 1}"}, fd=f.fileno()
        )
        for bad in ("", "12", "a:b", ":", f"{st_.st_dev}:"):
            assert not stderr_is_journal({"JOURNAL_STREAM": bad}, fd=f.fileno())
        assert not stderr_is_journal({}, fd=f.fileno())


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("event", "IMDSD_EVENT"),
        ("revision", "IMDSD_REVISION"),
        ("event_id", "IMDSD_EVENT_ID"),
        ("api-version", "IMDSD_API_VERSION"),
        ("héllo.wörld", "IMDSD_H_LLO_W_RLD"),
        ("x" * 100, "IMDSD_" + "X" * 58),
    ],
)
def test_field_names_are_valid_journal_names(key: str, name: str) -> None:
    assert field_name(key) == name


@given(st.lists(st.tuples(st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True), st.text())))
def test_entries_round_trip_through_the_protocol(fields: list[tuple[str, str]]) -> None:
    parsed = parse_entry(encode_entry(fields))
    assert parsed == [(n, v.encode("utf-8", "replace")) for n, v in fields]


def test_newline_values_use_the_binary_form() -> None:
    data = encode_entry([("MESSAGE", "two\nlines"), ("A", "b")])
    assert data == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\nA=b\n"


def test_sink_sends_priority_identifier_message_and_fields(journal: Journal) -> None:
    sink = JournalSink(io.StringIO(), journal.path)
    assert sink.send(4, "poll failed\ndetail", [("IMDSD_EVENT", "poll failed")])
    [entry] = journal.entries()
    assert one(entry, "PRIORITY") == "4"
    assert one(entry, "SYSLOG_IDENTIFIER") == "imdsd"
    assert one(entry, "MESSAGE") == "poll failed\ndetail"
    assert one(entry, "IMDSD_EVENT") == "poll failed"
    assert (sink.sent, sink.fallbacks) == (1, 0)
    sink.close()


def test_an_entry_too_big_for_a_datagram_goes_in_a_sealed_memfd(journal: Journal) -> None:
    sink = JournalSink(io.StringIO(), journal.path)
    big = "x" * (8 << 20)  # above the 8 MiB send buffer: sendto says EMSGSIZE
    assert sink.send(6, "big", [("IMDSD_BLOB", big)])
    [entry] = journal.entries()
    assert one(entry, "IMDSD_BLOB") == big
    assert one(entry, "MESSAGE") == "big"
    assert (sink.sent, sink.memfd, sink.fallbacks) == (1, 1, 0)
    sink.close()


def test_no_socket_falls_back_to_prefixed_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    sink = JournalSink(out, str(tmp_path / "missing.sock"))
    assert not sink.send(3, "hook gave up hook=x", [])
    assert not sink.send(6, "multi\nline", [])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("<4>journal socket ")
    assert "not usable" in lines[0]
    assert lines[1:] == ["<3>hook gave up hook=x", "<6>multi\\nline"]
    assert (sink.sent, sink.fallbacks) == (0, 2)
    sink.close()


def test_a_full_socket_never_blocks_and_loses_nothing(journal: Journal) -> None:
    out = io.StringIO()
    sink = JournalSink(out, journal.path)
    total = 0
    while sink.fallbacks < 20 and total < 100_000:  # past the receive queue (max_dgram_qlen)
        sink.send(6, f"record {total}", [])
        total += 1
    received = {one(e, "MESSAGE") for e in journal.entries()}
    fallen = {line[3:] for line in out.getvalue().splitlines()[1:]}
    assert sink.fallbacks > 0, "the queue never filled: the test proves nothing"
    assert out.getvalue().startswith("<4>journal socket")
    assert received | fallen == {f"record {n}" for n in range(total)}
    assert not received & fallen
    assert (sink.sent, sink.fallbacks) == (len(received), len(fallen))
    sink.close()


def test_fallback_line_escapes_newlines() -> None:
    assert fallback_line(4, "a\nb\\c") == "<4>a\\nb\\\\c\n"


def test_structlog_records_become_journal_entries(journal: Journal) -> None:
    out = io.StringIO()
    configure_logging("info", "auto", stream=out, journal=journal.path)
    log = structlog.get_logger("imdsd.test")
    log.debug("not shown")
    log.info("changes", revision=12, kinds=["disks", "tags"], count=3)
    log.warning("poll failed", endpoint="instance", error="timed out after 2s")
    try:
        _boom()
    except RuntimeError:
        log.exception("hook worker error", hook="mount")
    info, warning, error = journal.entries()
    assert one(info, "PRIORITY") == "6"
    assert one(info, "IMDSD_EVENT") == "changes"
    assert one(info, "IMDSD_REVISION") == "12"
    assert [v for n, v in info if n == "IMDSD_KINDS"] == [b"disks", b"tags"]
    assert one(info, "MESSAGE") == "changes revision=12 kinds=disks,tags count=3"
    assert {n for n, _ in info} == {
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "MESSAGE",
        "IMDSD_EVENT",
        "IMDSD_REVISION",
        "IMDSD_KINDS",
        "IMDSD_COUNT",
    }
    assert one(warning, "PRIORITY") == "4"
    assert one(warning, "MESSAGE") == 'poll failed endpoint=instance error="timed out after 2s"'
    assert one(warning, "IMDSD_ERROR") == "timed out after 2s"
    assert one(error, "PRIORITY") == "3"
    message = one(error, "MESSAGE")
    assert message.startswith("hook worker error hook=mount\nTraceback")
    assert message.rstrip().endswith("RuntimeError: boom")
    assert "RuntimeError: boom" in one(error, "IMDSD_EXCEPTION")
    assert out.getvalue() == ""


@pytest.mark.parametrize(("fmt", "start"), [("json", '<4>{"timestamp"'), ("console", "<4>20")])
def test_explicit_formats_on_the_journal_get_a_priority_prefix(
    journal: Journal, fmt: str, start: str
) -> None:
    out = io.StringIO()
    configure_logging("info", fmt, stream=out, journal=journal.path)
    structlog.get_logger().warning("careful", n=1)
    assert out.getvalue().startswith(start)
    assert journal.entries() == []


async def test_daemon_under_journald_sends_native_entries(tmp_path: Path) -> None:
    """A real ``imdsd run`` whose stderr is "the journal" logs ready and changes natively."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(tmp_path / "journal.sock"))
    entries: list[Entry] = []

    async def collect() -> None:
        while True:
            entries.append(parse_entry(await sock.recv(1 << 20)))

    def find(event: str) -> Entry | None:
        return next((e for e in entries if (("IMDSD_EVENT", event.encode()) in e)), None)

    async def wait_for(event: str) -> Entry:
        with trio.fail_after(15):
            while (found := find(event)) is None:
                await trio.sleep(0.02)
        return found

    async with emulator(port=0) as emu, trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        config = write_config(tmp_path, emu.url)
        config.write_text(config.read_text().replace('format = "json"', 'format = "auto"'))
        log_path = config.parent / "stderr.log"
        log_path.touch()
        st_ = log_path.stat()
        env = {
            "JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino}",
            "IMDSD_JOURNAL_SOCKET": str(tmp_path / "journal.sock"),
        }
        async with daemon(config, env=env, log_path=log_path) as proc:
            await proc.wait_ready()
            ready = await wait_for("ready")
            assert one(ready, "PRIORITY") == "6"
            assert one(ready, "SYSLOG_IDENTIFIER") == "imdsd"
            await emu.action(action="set_tag", name="role", value="db")
            changes = await wait_for("changes")
            assert ("IMDSD_KINDS", b"tags") in changes
            assert int(one(changes, "IMDSD_REVISION")) >= 2
            assert one(changes, "MESSAGE").startswith("changes revision=")
            await proc.stop()
        nursery.cancel_scope.cancel()
    sock.close()
    assert find("stopped") is not None
    assert "<" not in log_path.read_text()[:1], "nothing fell back to stderr"
