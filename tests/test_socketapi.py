"""The standard-library socket client: one request per connection, answers parsed strictly."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imdsd.socketapi import DaemonUnreachable, parse_answer, read_target, request

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (OK + b'{"a":1}', (200, b'{"a":1}')),
        (OK + b'{"a":1}trailing', (200, b'{"a":1}')),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            (200, b"abcde"),
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b'{"a":1}', (200, b'{"a":1}')),
        (b'HTTP/1.1 304 Not Modified\r\netag: "x"\r\n\r\n', (304, b"")),
        (b"HTTP/1.0 404 Not Found\r\n\r\nno such path", (404, b"no such path")),
    ],
)
def test_answers_are_parsed(answer: bytes, expected: tuple[int, bytes]) -> None:
    status, _, body = parse_answer(answer)
    assert (status, body) == expected


def test_headers_are_lower_case_and_a_head_answer_has_no_body() -> None:
    status, headers, body = parse_answer(OK, head_only=True)
    assert (status, body) == (200, b"")
    assert headers == {"content-type": "application/json", "content-length": "7"}


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n",
        OK + b"{}",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
    ],
)
def test_incomplete_or_malformed_answers_are_errors(answer: bytes) -> None:
    with pytest.raises(Exception, match=r"ended|not an HTTP|malformed|content-length"):
        parse_answer(answer)


@contextmanager
def one_shot_server(path: Path, answer: bytes) -> Iterator[list[bytes]]:
    """A unix socket server answering one connection with ``answer``, then closing it."""
    received: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            received.append(data)
            conn.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield received
    finally:
        thread.join(10)
        server.close()


def test_a_request_asks_for_one_exchange_and_reads_until_close(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with one_shot_server(path, OK + b'{"a":1}') as received:
        status, headers, body = request(str(path), "POST", "/v1/x", 5)
    assert (status, body, headers["content-type"]) == (200, b'{"a":1}', "application/json")
    head = received[0].decode().split("\r\n")
    assert head[0] == "POST /v1/x HTTP/1.1"
    assert {"connection: close", "content-length: 0", "host: imdsd"} <= set(head)


def test_a_broken_answer_is_daemon_unreachable(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    short = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort"
    with (
        one_shot_server(path, short),
        pytest.raises(DaemonUnreachable, match="content-length"),
    ):
        request(str(path), "GET", "/metadata/instance", 5)


def test_a_missing_socket_is_daemon_unreachable(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable, match="not reachable"):
        request(str(tmp_path / "absent.sock"), "GET", "/v1/health", 5)


def test_read_targets() -> None:
    assert read_target("compute/tags", "text") == "/metadata/instance/compute/tags?format=text"
    assert read_target("", "json") == "/metadata/instance?format=json"
    assert read_target("/metadata/versions", "json") == "/metadata/versions?format=json"
