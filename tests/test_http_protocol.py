"""The server's HTTP/1.1 policy without sockets: bytes into ServerProtocol, requests out."""

from __future__ import annotations

import pytest

from imdsd.httpio import (
    NEED_DATA,
    BodyTooLarge,
    PeerClosed,
    ProtocolViolation,
    Request,
    ServerLimits,
    ServerProtocol,
)

GET = b"GET /a?x=1 HTTP/1.1\r\nhost: t\r\n\r\n"


def protocol(**limits: int) -> ServerProtocol:
    return ServerProtocol(ServerLimits(**limits), b"test")


def request(proto: ServerProtocol, data: bytes = b"") -> Request:
    if data:
        proto.receive_data(data)
    got = proto.next_request()
    assert isinstance(got, Request), got
    return got


def parse(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """Status line, headers (lower-case names) and what follows the head."""
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, rest


def test_keep_alive_and_pipelining() -> None:
    proto = protocol()
    proto.receive_data(GET + b"POST /b HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabc")
    first = request(proto)
    assert (first.method, first.path, first.query) == ("GET", "/a", [("x", "1")])
    status, headers, body = parse(proto.response(200, [(b"content-type", b"text/plain")], b"hi"))
    assert status == "HTTP/1.1 200 OK"
    assert (headers["content-length"], headers["server"], body) == ("2", "test", b"hi")
    assert "connection" not in headers
    assert proto.next_cycle()
    second = request(proto)
    assert (second.method, second.body) == ("POST", b"abc")
    proto.response(204, [])
    assert proto.next_cycle()
    assert proto.next_request() is NEED_DATA
    proto.receive_data(b"")
    assert proto.next_request() is None


def test_a_request_arrives_in_pieces() -> None:
    proto = protocol()
    for piece in (b"GET /a HT", b"TP/1.1\r\nhost:", b" t\r\n"):
        proto.receive_data(piece)
        assert proto.next_request() is NEED_DATA
    assert request(proto, b"\r\n").target == "/a"


@pytest.mark.parametrize(
    ("head", "keep"),
    [
        (b"GET / HTTP/1.1\r\nhost: t\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n", False),
    ],
)
def test_keep_alive_decision(head: bytes, keep: bool) -> None:
    proto = protocol()
    request(proto, head)
    _, headers, _ = parse(proto.response(200, [], b"x"))
    assert (headers.get("connection") == "close") is not keep
    assert proto.next_cycle() is keep


def test_close_after_closes_once_answered() -> None:
    proto = protocol()
    request(proto, GET)
    proto.close_after = True
    _, headers, _ = parse(proto.response(200, [], b"x"))
    assert headers["connection"] == "close"
    assert not proto.next_cycle()


def test_an_unanswered_request_ends_the_connection() -> None:
    proto = protocol()
    request(proto, GET)
    assert not proto.next_cycle()


def test_head_sends_the_head_of_get_without_the_body() -> None:
    proto = protocol()
    request(proto, b"HEAD /a HTTP/1.1\r\nhost: t\r\n\r\n" + GET)
    assert proto.head_only
    _, headers, rest = parse(proto.response(200, [], b"12345"))
    assert (headers["content-length"], rest) == ("5", b"")
    assert proto.next_cycle()
    request(proto)
    assert not proto.head_only
    assert parse(proto.response(200, [], b"12345"))[2] == b"12345"


def test_head_of_a_stream_has_no_chunks() -> None:
    proto = protocol()
    request(proto, b"HEAD /w HTTP/1.1\r\nhost: t\r\n\r\n")
    _, headers, _ = parse(proto.start(200, []))
    assert headers["transfer-encoding"] == "chunked"
    assert proto.chunk(b"line\n") == b""
    assert proto.end() == b""
    assert proto.next_cycle()


def test_chunks_are_framed_by_h11() -> None:
    proto = protocol()
    request(proto, GET)
    proto.start(200, [])
    assert proto.chunk(b"") == b""
    assert proto.chunk(b"0123456789abcdef\n") == b"11\r\n0123456789abcdef\n\r\n"
    assert proto.end() == b"0\r\n\r\n"


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_carry_no_content_length(status: int) -> None:
    proto = protocol()
    request(proto, GET)
    data = proto.response(status, [(b"etag", b'"x"')], b"ignored")
    _, headers, rest = parse(data)
    assert "content-length" not in headers
    assert (headers["etag"], rest) == ('"x"', b"")
    assert proto.next_cycle()


@pytest.mark.parametrize(
    ("sent", "seen"),
    [
        ("http://imdsd/metadata/instance?x=1", "/metadata/instance?x=1"),
        ("HTTP://imdsd:80/a", "/a"),
        ("http://imdsd", "/"),
        ("http://imdsd?x", "/?x"),
        ("/plain", "/plain"),
    ],
)
def test_absolute_form_targets_are_seen_in_origin_form(sent: str, seen: str) -> None:
    got = request(protocol(), f"GET {sent} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
    assert got.target == seen


def test_100_continue_is_offered_only_while_the_body_is_awaited() -> None:
    proto = protocol(max_body=10)
    proto.receive_data(
        b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n"
    )
    assert proto.next_request() is NEED_DATA
    assert proto.interim() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert proto.interim() == b""  # once
    assert request(proto, b"abc").body == b"abc"
    proto.response(200, [])
    assert proto.next_cycle()
    request(proto, b"GET / HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\n\r\n")
    assert proto.interim() == b""  # nothing to wait for


def test_a_body_declared_too_large_is_refused_before_100_continue() -> None:
    proto = protocol(max_body=10)
    proto.receive_data(
        b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 11\r\nexpect: 100-continue\r\n\r\n"
    )
    with pytest.raises(BodyTooLarge):
        proto.next_request()
    status, headers, body = parse(proto.error_response(413, "too big") or b"")
    assert status == "HTTP/1.1 413 Request Entity Too Large"
    assert (headers["connection"], body) == ("close", b'{"error":"too big"}')
    assert not proto.next_cycle()


@pytest.mark.parametrize(
    ("data", "error", "status"),
    [
        (b"GET / HTTP/1.1\r\nhost: t\r\nx: " + b"a" * 200 + b"\r\n\r\n", ProtocolViolation, 431),
        (
            b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 11\r\n\r\n" + b"x" * 11,
            BodyTooLarge,
            413,
        ),
        (
            b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nb\r\n" + b"x" * 11,
            BodyTooLarge,
            413,
        ),
        (b"\x00\x01 not http\r\n\r\n", ProtocolViolation, 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", ProtocolViolation, 400),
    ],
)
def test_limits_and_bad_requests(data: bytes, error: type[Exception], status: int) -> None:
    proto = protocol(max_head=160, max_body=10)
    proto.receive_data(data)
    with pytest.raises(error) as caught:
        proto.next_request()
    if isinstance(caught.value, ProtocolViolation):
        assert caught.value.status == status
    answer = proto.error_response(status, str(caught.value))
    assert answer is not None
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert not proto.next_cycle()


def test_a_head_larger_than_the_limit_is_refused_while_it_arrives() -> None:
    proto = protocol(max_head=1024)
    proto.receive_data(b"GET / HTTP/1.1\r\nhost: t\r\nx: " + b"a" * 2000)
    with pytest.raises(ProtocolViolation) as caught:
        proto.next_request()
    assert caught.value.status == 431


def test_no_error_response_once_a_response_has_started() -> None:
    proto = protocol()
    request(proto, GET)
    proto.start(200, [])
    assert proto.error_response(500, "internal error") is None
    proto = protocol()
    assert proto.error_response(503, "too many connections") is not None  # before any request


def test_the_peer_closing_mid_request_is_peer_closed() -> None:
    proto = protocol()
    proto.receive_data(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nab")
    assert proto.next_request() is NEED_DATA
    proto.receive_data(b"")
    with pytest.raises(PeerClosed):
        proto.next_request()
    with pytest.raises(PeerClosed):
        proto.receive_data(b"more")


def test_buffered_data_counts_what_waits() -> None:
    proto = protocol()
    assert not proto.has_buffered_data()
    request(proto, GET + b"GET /next")
    assert proto.has_buffered_data()
    assert proto.buffered_size() == len(b"GET /next")
