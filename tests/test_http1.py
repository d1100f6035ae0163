"""processors/protocols/http1.py: feed-style tests (whole, byte-by-byte, trailing bytes),
framing rules, attributes, hostile input, fuzzing and the allocation proof."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from processors.protocols import http1
from processors.protocols.base import Conn, Detection, Perspective
from processors.protocols.errors import LimitExceeded, Malformed, ProtocolError
from service.largebuf import LargeBuffer
from service.model import Span, SpanKind, StatusCode

TP = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Driver:
    """A session with its connection; collects spans and drops."""

    def __init__(self, perspective: Perspective = Perspective.PASSIVE, settings: http1.Settings | None = None):
        self.spans: list[Span] = []
        self.drops: list[str] = []
        self.conn = Conn("c1", "10.0.0.1", 40000, "10.0.0.2", 8080, self.spans.append,
                         lambda p, r: self.drops.append(r), perspective=perspective, settings=settings,
                         protocol="http")
        self.s = http1.Session(self.conn)
        self.ts = 1_000

    def send(self, from_client: bool, data: bytes, mode: str = "whole") -> None:
        buf = self.conn.client_buf if from_client else self.conn.server_buf
        for piece in _pieces(data, mode):
            self.ts += 1_000
            buf.append(memoryview(piece), self.ts)
            self.s.feed(from_client, buf, self.ts)

    def req(self, data: bytes, mode: str = "whole") -> None:
        self.send(True, data, mode)

    def resp(self, data: bytes, mode: str = "whole") -> None:
        self.send(False, data, mode)


def _pieces(data: bytes, mode: str) -> Iterable[bytes]:
    if mode == "whole":
        yield data
    elif mode == "bytes":
        for i in range(len(data)):
            yield data[i:i + 1]
    elif mode == "split3":
        n = max(1, len(data) // 3)
        for i in range(0, len(data), n):
            yield data[i:i + n]
    else:
        raise ValueError(mode)


MODES = ["whole", "bytes", "split3"]

GET = (b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: shop.example:8443\r\nUser-Agent: curl/8.0\r\n"
       b"Authorization: Bearer secret-token\r\nCookie: session=secret-cookie\r\n"
       b"traceparent: " + TP + b"\r\n\r\n")
OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: id=secret-set\r\n\r\nhello"


@pytest.mark.parametrize("mode", MODES)
def test_get_whole_and_piecewise(mode: str) -> None:
    d = Driver()
    d.req(GET, mode)
    d.resp(OK5, mode)
    assert len(d.spans) == 1
    s = d.spans[0]
    a = s.attributes
    assert s.name == "GET" and s.kind == SpanKind.SERVER and s.status_code == StatusCode.UNSET
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/a/b" and a["url.query"] == "x=1&y=2" and a["url.scheme"] == "http"
    assert a["server.address"] == "shop.example" and a["server.port"] == 8443
    assert a["client.address"] == "10.0.0.1"
    assert a["http.response.status_code"] == 200
    assert a["network.protocol.version"] == "1.1"
    assert a["http.response.body.size"] == 5
    assert a["user_agent.original"] == "curl/8.0"
    assert s.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert s.parent_span_id.hex() == "b7ad6b7169203331"
    assert s.start_ns < s.end_ns
    assert not any("secret" in str(v) for v in a.values())
    assert len(d.conn.client_buf) == 0 and len(d.conn.server_buf) == 0


@pytest.mark.parametrize("mode", MODES)
def test_trailing_bytes_stay_in_buffer(mode: str) -> None:
    d = Driver()
    tail = b"GET /next HTTP/1.1\r\nHo"
    d.req(GET + tail, mode)
    d.resp(OK5 + b"HTTP/1.1 20", mode)
    assert len(d.spans) == 1
    assert len(d.conn.client_buf) == len(tail)
    assert len(d.conn.server_buf) == len(b"HTTP/1.1 20")
    d.req(b"st: x\r\n\r\n")
    d.resp(b"4 No Content\r\n\r\n")
    assert [s.attributes["url.path"] for s in d.spans] == ["/a/b", "/next"]
    assert d.spans[1].attributes["http.response.status_code"] == 204


@pytest.mark.parametrize("mode", MODES)
def test_chunked_with_extensions_and_trailers(mode: str) -> None:
    d = Driver()
    d.req(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
          b"5;name=value;x\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n", mode)
    d.resp(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", mode)
    (s,) = d.spans
    assert s.attributes["http.request.body.size"] == 15
    assert s.attributes["http.response.body.size"] == 3
    assert s.attributes["http.response.status_code"] == 201


def test_pipelining_pairs_in_order() -> None:
    d = Driver()
    d.req(b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(3)))
    assert d.spans == []
    d.resp(b"".join(b"HTTP/1.1 %d X\r\nContent-Length: 1\r\n\r\n%d" % (200 + i, i) for i in range(3)))
    assert [(s.attributes["url.path"], s.attributes["http.response.status_code"]) for s in d.spans] == [
        ("/0", 200), ("/1", 201), ("/2", 202)]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    d = Driver()
    d.req(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" * 2)
    # Content-Length on a 304 describes the resource, not a body (RFC 9110 §8.6).
    d.resp(b"HTTP/1.1 %d X\r\nContent-Length: 100\r\n\r\n" % status * 2)
    assert len(d.spans) == 2
    assert all(s.attributes["http.response.body.size"] == 0 for s in d.spans)


def test_head_has_no_body() -> None:
    d = Driver()
    d.req(b"HEAD /f HTTP/1.1\r\nHost: h\r\n\r\nGET /g HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 6000\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [(s.name, s.attributes["http.response.body.size"]) for s in d.spans] == [("HEAD", 0), ("GET", 2)]


def test_100_continue() -> None:
    d = Driver()
    d.req(b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    d.resp(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert d.spans == []
    d.req(b"data")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    (s,) = d.spans
    assert s.attributes["http.response.status_code"] == 200
    assert s.attributes["http.request.body.size"] == 4


def test_close_delimited_body_ends_at_close() -> None:
    d = Driver()
    d.req(b"GET /old HTTP/1.0\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome ")
    d.resp(b"body")
    assert d.spans == []
    d.s.close(d.ts + 5, reset=False)
    (s,) = d.spans
    assert s.status_code == StatusCode.UNSET
    assert s.attributes["http.response.body.size"] == 9
    assert s.attributes["network.protocol.version"] == "1.0"
    assert s.end_ns == d.ts  # the last body byte, not the close


def test_reset_mid_response_gives_marked_span() -> None:
    d = Driver()
    d.req(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial")
    d.s.close(d.ts + 10, reset=True)
    (s,) = d.spans
    assert s.status_code == StatusCode.ERROR
    assert s.attributes["error.type"] == "connection_reset"
    assert s.attributes["http.response.status_code"] == 200
    assert s.attributes["http.response.body.size"] == 7
    assert "reset" in s.status_message


@pytest.mark.parametrize(("tail", "status"), [(b"HTTP/1.1 503", 503), (b"HTTP/1.1 404 Not Fo", 404),
                                              (b"HTTP/1.", None), (b"H", None)])
def test_status_line_cut_by_the_end_of_the_capture_is_an_incomplete_span(tail: bytes, status: int | None) -> None:
    """The reply had begun, its status line cut short: a span marked incomplete, with the code
    where its three digits are in sight (base.py's rule; before, counted ``unanswered``)."""
    d = Driver()
    d.req(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(tail)
    d.s.close(d.ts + 1)
    (s,) = d.spans
    assert s.attributes["wirespan.incomplete"] is True and d.drops == []
    assert s.attributes.get("http.response.status_code") == status


def test_reset_before_response_and_unanswered_at_close() -> None:
    d = Driver()
    d.req(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    d.s.close(d.ts + 1, reset=True)
    (s,) = d.spans
    assert s.attributes["error.type"] == "connection_reset" and "http.response.status_code" not in s.attributes
    d2 = Driver()
    d2.req(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    d2.s.close(d2.ts + 1, reset=False)
    assert d2.spans == [] and d2.drops == ["unanswered"]


def test_upgrade_websocket_stops_and_h2c_switches() -> None:
    d = Driver()
    d.req(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    d.resp(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
    (s,) = d.spans
    assert s.attributes["http.response.status_code"] == 101
    assert d.conn.extra["switch_to"] is None
    d2 = Driver()
    d2.req(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    d2.resp(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n\x00\x00\x00\x04\x00")
    assert d2.conn.extra["switch_to"] == "http2"
    assert d2.spans == []  # the http2 session answers the request on stream 1
    up = d2.conn.extra["http2_upgrade_request"]
    assert up["method"] == "GET" and up["target"] == b"/" and up["host"] == b"h" and up["start_ns"] > 0
    # The bytes after the switch are left for the next protocol.
    assert bytes(d2.conn.client_buf.view_at(0, 3)) == b"PRI"
    assert len(d2.conn.server_buf) == 5


def test_refused_upgrade_continues_http1() -> None:
    d = Driver()
    d.req(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [s.attributes["url.path"] for s in d.spans] == ["/", "/2"]
    assert "switch_to" not in d.conn.extra


def test_unknown_method_and_error_rules() -> None:
    d = Driver()
    d.req(b"PROPFIND /dav HTTP/1.1\r\nHost: h\r\n\r\nGET /nf HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 207 Multi\r\nContent-Length: 0\r\n\r\nHTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\n")
    a = d.spans[0].attributes
    assert d.spans[0].name == "HTTP"
    assert a["http.request.method"] == "_OTHER" and a["http.request.method_original"] == "PROPFIND"
    assert d.spans[1].status_code == StatusCode.UNSET  # 4xx is not a server error
    c = Driver(Perspective.CLIENT)
    c.req(b"GET /nf HTTP/1.1\r\nHost: h\r\n\r\n")
    c.resp(b"HTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\n")
    (s,) = c.spans
    assert s.kind == SpanKind.CLIENT and s.status_code == StatusCode.ERROR
    assert s.attributes["error.type"] == "404" and s.attributes["url.full"] == "http://h/nf"


def test_absolute_form_and_query_redaction() -> None:
    d = Driver()
    d.req(b"GET http://proxy.test:81/p?AWSAccessKeyId=AKIA&Signature=zzz&a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    a = d.spans[0].attributes
    assert a["url.path"] == "/p" and a["server.address"] == "proxy.test" and a["server.port"] == 81
    assert a["url.query"] == "AWSAccessKeyId=REDACTED&Signature=REDACTED&a=1"


def test_sensitive_query_values_are_redacted_by_default() -> None:
    req = b"GET /login?user=bob&access_token=eyJhbGc&api_key=k1&page=2 HTTP/1.1\r\nHost: h\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    want = "user=bob&access_token=REDACTED&api_key=REDACTED&page=2"
    c = Driver(Perspective.CLIENT)
    c.req(req)
    c.resp(resp)
    a = c.spans[0].attributes
    assert a["url.query"] == want and a["url.full"] == f"http://h/login?{want}"
    assert "eyJhbGc" not in repr(a) and "k1" not in repr(a)
    # off: as sent, except the names still listed in redact_query_params
    off = Driver(Perspective.CLIENT, http1.Settings(sanitize_query=False))
    off.req(req.replace(b"&page=2", b"&sig=s"))
    off.resp(resp)
    a = off.spans[0].attributes
    assert a["url.query"] == "user=bob&access_token=eyJhbGc&api_key=k1&sig=REDACTED"
    assert a["url.full"] == "http://h/login?user=bob&access_token=eyJhbGc&api_key=k1&sig=REDACTED"


def test_scheme_lookalike_target_is_not_absolute_form() -> None:
    """Regression (fuzz find, tests/test_http1_speedup.py): ``https:/`` without "//" made
    the span builder raise ValueError; it is an opaque target, and https:// still works."""
    d = Driver()
    d.req(b"GET https:/ HTTP/1.1\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    d.req(b"GET HTTPS://h.test/a?b HTTP/1.1\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert d.spans[0].attributes["url.path"] == "https:/"
    a = d.spans[1].attributes
    assert (a["url.path"], a["url.query"], a["server.address"]) == ("/a", "b", "h.test")


def test_leading_crlf_between_requests_is_ignored() -> None:
    d = Driver()
    d.req(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 2)
    assert [s.attributes["url.path"] for s in d.spans] == ["/a", "/b"]


# -- detection ---------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "from_client", "want"), [
    (b"GET / HTTP/1.1\r\n", None, Detection.REQUEST),
    (b"HTTP/1.1 200 OK\r\n", None, Detection.RESPONSE),
    (b"HTTP/1.0 404\r\n", None, Detection.RESPONSE),
    (b"GE", None, Detection.NEED_MORE),
    (b"GET /very/long/path", None, Detection.NEED_MORE),
    (b"HTTP/1.1 2", None, Detection.NEED_MORE),
    (b"GET / HTTP/1.1\r\n", False, Detection.NO),  # a server does not send requests
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None, Detection.NO),
    (b"\x16\x03\x01\x02\x00\x01", None, Detection.NO),  # TLS ClientHello
    (b"*1\r\n$4\r\nPING\r\n", None, Detection.NO),       # Redis
    (b"get / HTTP/1.1\r\n", None, Detection.NO),
    (b"GET /\x00 HTTP/1.1\r\n", None, Detection.NO),
])
def test_detect(data: bytes, from_client: bool | None, want: Detection) -> None:
    assert http1.detect(LargeBuffer(data), from_client) == want


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_detect_random_bytes_are_not_http(data: bytes) -> None:
    d = http1.detect(LargeBuffer(data), None)
    if d in (Detection.REQUEST, Detection.RESPONSE):
        assert b" HTTP/1." in data or data.startswith(b"HTTP/1.")



_LINE_ATOMS = st.sampled_from([b"GET", b"POST", b"M-1_X", b"get", b"HTTP/1.1", b"HTTP/1.0", b"http/1.1", b"HTTP/1.",
                               b"HTTP/2.0", b"200", b"404 Not Found", b"/", b"/a?b=1", b"http://h/x", b"*", b" ", b"  ",
                               b"\t", b"\r", b"\n", b"\r\n", b"\x00", b"\x80", b"Host: h", b"HTTP/1.1 200 OK\r\n",
                               b"GET / HTTP/1.1\r\n", b"GET /x\r\n"])


@given(atoms=st.lists(_LINE_ATOMS, max_size=12), from_client=st.sampled_from([None, True, False]),
       cut=st.integers(1, 40))
@settings(max_examples=600, deadline=None)
@example(atoms=[b"*", b" ", b"HTTP/1.1 200 OK\r\n"], from_client=None, cut=1)
@example(atoms=[b"x", b"GET / HTTP/1.1\r\n"], from_client=None, cut=1)
def test_detect_one_chunk_as_across_chunks(atoms: list[bytes], from_client: bool | None, cut: int) -> None:
    """detect's one-chunk fast path (the patterns over the chunk) decides as its line-by-line
    path, which a buffer of two chunks takes."""
    data = b"".join(atoms)
    two = LargeBuffer()
    if 0 < cut < len(data):
        two.append(memoryview(data[:cut]))
        two.append(memoryview(data[cut:]))
    else:
        two.append(memoryview(data[:1]))
        two.append(memoryview(data[1:]))
    if len(data) < 2:
        return
    assert http1.detect(LargeBuffer(data), from_client) == http1.detect(two, from_client)

# -- hostile input -------------------------------------------------------------------------
def test_huge_content_length_is_skipped_without_allocation() -> None:
    d = Driver()
    d.req(b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
    chunk = bytes(65536)
    tracemalloc.start()
    try:
        d.req(chunk)
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            d.req(chunk)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 20_000, grown
    assert len(d.conn.client_buf) == 0
    assert d.s._cbody is not None and d.s._cbody.remaining == (1 << 40) - 201 * 65536


def test_header_line_of_10_mb_is_bounded() -> None:
    d = Driver()
    with pytest.raises(LimitExceeded) as e:
        d.req(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (10 * 1024 * 1024))
    assert e.value.reason == "header_too_large"


def test_100k_headers_are_bounded() -> None:
    d = Driver()
    with pytest.raises(LimitExceeded):
        d.req(b"GET / HTTP/1.1\r\n" + b"a: b\r\n" * 100_000 + b"\r\n")
    # Within the size limit but over the count limit.
    d2 = Driver(settings=http1.Settings(max_headers=10))
    with pytest.raises(LimitExceeded) as e:
        d2.req(b"GET / HTTP/1.1\r\n" + b"a: b\r\n" * 11 + b"\r\n")
    assert e.value.reason == "too_many_headers"


@pytest.mark.parametrize(("data", "reason"), [
    (b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "conflicting_content_length"),
    (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "bad_content_length"),
    (b"GET / HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "bad_content_length"),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "bad_transfer_encoding"),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", "bad_header"),
    (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", "bad_header"),
    (b"GET / HTTP/9.9\r\n\r\n", "bad_request_line"),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad_chunk_size"),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc", "bad_chunk_end"),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 5000, "chunk_line_too_long"),
])
def test_malformed_requests(data: bytes, reason: str) -> None:
    d = Driver()
    with pytest.raises(ProtocolError) as e:
        d.req(data)
    assert e.value.reason == reason


def test_gap_resyncs_at_next_message() -> None:
    d = Driver()
    d.req(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    d.conn.server_buf.reset()
    d.s.gap(False, d.ts)
    assert d.drops == ["gap"]
    d.resp(b"ij")  # the rest of the lost response: discarded while resyncing
    d.req(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [s.attributes["url.path"] for s in d.spans] == ["/2"]


def test_unmatched_response_is_counted() -> None:
    d = Driver()
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert d.spans == [] and d.drops == ["unmatched_response"]


# -- allocation: a 100x larger body allocates the same ---------------------------------------------
def _alloc_for_body(size: int) -> int:
    body = b"x" * size
    chunks = [memoryview(body)[i:i + 16384] for i in range(0, size, 16384)]
    req_head = b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size
    resp_head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    d = Driver()
    d.req(b"GET /warm HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    d.spans.clear()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        d.req(req_head)
        for c in chunks:
            d.send(True, c)  # type: ignore[arg-type]
        d.resp(resp_head)
        for c in chunks:
            d.send(False, c)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(d.spans) == 1 and d.spans[0].attributes["http.request.body.size"] == size
    return peak


def test_allocation_flat_when_body_grows_100x() -> None:
    small = _alloc_for_body(64 * 1024)
    large = _alloc_for_body(6400 * 1024)
    assert large < small * 1.5 + 4096, (small, large)


# -- fuzzing ------------------------------------------------------------------------------------------
_PARTS = st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"POST /p?q=1 HTTP/1.0\r\n", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 101 S\r\n",
    b"Content-Length: 3\r\n", b"Content-Length: 99999999999\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Upgrade: h2c\r\n", b"Connection: close\r\n", b"Host: [::1]:80\r\n", b"Host: :\r\n",
    b"traceparent: 00-zz\r\n", b"\r\n", b"abc", b"5\r\nhello\r\n", b"0\r\n\r\n", b"ffffffffffffffff\r\n",
    b";ext\r\n", b"\x00", b"\xff\xfe", b" ", b":",
])


@given(st.lists(st.tuples(st.booleans(), st.one_of(_PARTS, st.binary(max_size=20))), max_size=30),
       st.booleans())
@settings(max_examples=int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "600")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_session_never_raises_anything_but_protocol_errors(steps: list[tuple[bool, bytes]],
                                                                 reset: bool) -> None:
    d = Driver()
    for from_client, data in steps:
        try:
            d.send(from_client, data)
        except ProtocolError:
            buf = d.conn.client_buf if from_client else d.conn.server_buf
            buf.reset()
            d.s.gap(from_client, d.ts)
        assert len(d.conn.client_buf) <= http1.MAX_HEADER_BYTES + 64
    d.s.close(d.ts, reset=reset)
    for s in d.spans:
        assert s.end_ns >= s.start_ns


def test_malformed_is_a_protocol_error() -> None:
    assert issubclass(Malformed, ProtocolError) and issubclass(LimitExceeded, ProtocolError)


# -- recorded real streams (tests/fixtures/http1, see record.py there) ------------------------------
FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "http1"


@pytest.mark.parametrize("name", ["curl_nginx", "httpx_nginx"])
@pytest.mark.parametrize("mode", ["whole", "split3", "bytes"])
def test_recorded_streams(name: str, mode: str) -> None:
    client = (FIXTURES / f"{name}.client.bin").read_bytes()
    server = (FIXTURES / f"{name}.server.bin").read_bytes()
    d = Driver()
    d.req(client, mode)
    d.resp(server, mode)
    got = [(s.name, s.attributes["url.path"], s.attributes["http.response.status_code"]) for s in d.spans]
    if name == "curl_nginx":
        assert got == [("GET", "/index.html", 200), ("GET", "/missing", 404), ("GET", "/boom", 500)]
    else:
        assert got == [("GET", "/text.txt", 200), ("POST", "/api/items", 200), ("HEAD", "/index.html", 200)]
        assert d.spans[1].attributes["http.request.body.size"] == len(b'{"name":"lamp","qty":2}')
    assert len(d.conn.client_buf) == 0 and len(d.conn.server_buf) == 0 and d.drops == []


def test_flood_of_empty_lines_is_bounded() -> None:
    d = Driver()
    with pytest.raises(Malformed):
        d.req(b"\r\n" * 40000 + b"GET / HTTP/1.1\r\n\r\n")
    d2 = Driver()
    d2.req(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    d2.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert len(d2.spans) == 1


def test_expect_refused_before_body_span_at_close() -> None:
    """A final response before the (never sent) body: the span comes out when the connection ends."""
    d = Driver()
    d.req(b"PUT /big HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1000000\r\n\r\n")
    d.resp(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
    assert d.spans == []  # waiting for the body, which the client may still send
    d.s.close(d.ts + 1)
    (s,) = d.spans
    assert s.attributes["http.response.status_code"] == 417
    assert s.attributes.get("http.request.body.size", 0) == 0


# -- leniency real servers accept (issue 16 class 2), and what stays refused ---------------------------
LENIENT = [
    # bare-LF line ends (RFC 9112 §2.2), as Zeek's and nginx's parsers accept them
    (b"GET /a?x=1 HTTP/1.1\nHost: h:81\nUser-Agent: nc\n\n", ("GET", "/a", "1.1")),
    (b"GET /mixed HTTP/1.1\r\nHost: h\nAccept: */*\r\n\n", ("GET", "/mixed", "1.1")),
    # runs of whitespace between the request line's words (§3)
    (b"GET   /spaces   HTTP/1.1  \r\nHost: h\r\n\r\n", ("GET", "/spaces", "1.1")),
    # obs-fold (§5.2): the continuation joins its field with one space
    (b"GET /fold HTTP/1.1\r\nHost: h\r\nUser-Agent: long\r\n  agent\r\n\r\n", ("GET", "/fold", "1.1")),
    # a version without its minor digit, answered by Google's front end; a missing target
    (b"GET /nominor HTTP/1.\nHost: h\n\n", ("GET", "/nominor", "1.0")),
    (b"OPTIONS HTTP/1.1\nHost: h\n\n", ("OPTIONS", "", "1.1")),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("request_bytes, want", LENIENT)
def test_lenient_requests_real_servers_accept(request_bytes: bytes, want: tuple, mode: str) -> None:
    assert http1.detect(LargeBuffer(request_bytes), None) == Detection.REQUEST
    d = Driver()
    d.req(request_bytes + b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n", mode)  # and a strict one after it
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * 2, mode)
    assert [(s.name, s.attributes["url.path"]) for s in d.spans] == [(want[0], want[1]), ("GET", "/next")]
    a = d.spans[0].attributes
    assert a["http.response.status_code"] == 200 and a["network.protocol.version"] == want[2]
    if b"agent" in request_bytes:
        assert a["user_agent.original"] == "long agent"
    if b"h:81" in request_bytes:
        assert a["server.port"] == 81 and a["url.query"] == "x=1" and a["user_agent.original"] == "nc"
    assert d.drops == [] and len(d.conn.client_buf) == 0 and len(d.conn.server_buf) == 0


@pytest.mark.parametrize("mode", MODES)
def test_lenient_responses_lowercase_version_and_bare_lf(mode: str) -> None:
    for status_line in (b"http/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\n", b"Http/1.0  200  OK\n"):
        assert http1.detect(LargeBuffer(status_line + b"\n"), False) == Detection.RESPONSE
        d = Driver()
        d.req(b"GET /index.html HTTP/1.1\r\nHost: h\r\n\r\n", mode)
        sep = b"\n" if status_line.endswith(b"\n") and not status_line.endswith(b"\r\n") else b"\r\n"
        d.resp(status_line + b"Content-Length: 5" + sep + b"Server: x" + sep + sep + b"hello", mode)
        (s,) = d.spans
        assert s.attributes["http.response.status_code"] == 200
        assert s.attributes["http.response.body.size"] == 5 and s.status_code == StatusCode.UNSET
        assert d.drops == [] and len(d.conn.server_buf) == 0


@pytest.mark.parametrize("mode", MODES)
def test_lenient_request_after_a_gap_resyncs(mode: str) -> None:
    """Joined mid-stream (a gap): the next bare-LF request starts a message."""
    d = Driver()
    d.req(b"GET /lost HTTP/1.1\r\nHost: h\r\n\r\n")
    d.s.gap(True, d.ts)
    d.req(b"GET /found HTTP/1.1\nHost: h\n\n", mode)
    d.resp(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", mode)
    assert [s.attributes["url.path"] for s in d.spans] == ["/found"] and d.drops == ["gap"]


@pytest.mark.parametrize("data, reason", [
    # request smuggling's raw material stays refused, each with its reason
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
     "content_length_with_transfer_encoding"),
    (b"POST / HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\nContent-Length: 5\n\n",
     "content_length_with_transfer_encoding"),
    (b"POST / HTTP/1.1\nContent-Length: 5\nContent-Length: 6\n\n", "conflicting_content_length"),
    (b"GET / HTTP/1.1\nHost : h\n\n", "bad_header"),              # whitespace before the colon (§5.1)
    (b"GET / HTTP/1.1\n folded: x\nHost: h\n\n", "bad_header"),  # whitespace before the first field
    (b"GET / HTTP/1.1\nHost: h\rX: y\n\n", "bad_header"),         # a bare CR
    (b"GET / HTTP/2.0\nHost: h\n\n", "bad_request_line"),
    (b"GET/ HTTP/1.1\nHost: h\n\n", "bad_request_line"),
])
@pytest.mark.parametrize("mode", MODES)
def test_ambiguous_requests_are_still_refused(data: bytes, reason: str, mode: str) -> None:
    d = Driver()
    with pytest.raises(ProtocolError) as e:
        d.req(data, mode)
    assert e.value.reason == reason
    assert d.spans == []


def test_lenient_head_is_linear_a_byte_at_a_time() -> None:
    """Many bare-LF fields dripped a byte a segment: every LF is looked at once."""
    import time

    def run(n: int) -> float:
        head = b"GET / HTTP/1.1\n" + b"".join(b"X-F%d: v\n" % i for i in range(n)) + b"\n"
        d = Driver(settings=http1.Settings(max_headers=100_000, max_header_bytes=1 << 20))
        t = time.perf_counter()
        d.req(head, "bytes")
        d.resp(b"HTTP/1.1 204 No Content\n\n")
        assert len(d.spans) == 1
        return time.perf_counter() - t

    small, big = min(run(200) for _ in range(3)), min(run(2000) for _ in range(3))
    assert big < small * 25, (small, big)


# -- the end of a capture is not a failure (issue 16 class 4) --------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_response_cut_by_the_end_of_the_capture_is_an_incomplete_span(mode: str) -> None:
    d = Driver()
    d.req(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n", mode)
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 104548\r\n\r\n" + b"x" * 4000, mode)
    last = d.ts
    d.req(b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n", mode)  # pipelined, no answer begun
    d.s.close(d.ts + 10_000)
    (s,) = d.spans
    a = s.attributes
    assert a["url.path"] == "/big" and a["http.response.status_code"] == 200
    assert a["wirespan.incomplete"] is True and "error.type" not in a and s.status_code == StatusCode.UNSET
    assert a["http.response.body.size"] == 4000 and s.end_ns == last
    assert d.drops == ["unanswered"]


def test_cut_short_keeps_the_status_the_reply_gave_and_a_reset_stays_an_error() -> None:
    d = Driver()
    d.req(b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 503 Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    d.s.close(d.ts + 1)
    (s,) = d.spans
    assert s.status_code == StatusCode.ERROR and s.attributes["error.type"] == "503"
    assert s.attributes["wirespan.incomplete"] is True
    d = Driver()
    d.req(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    d.s.close(d.ts + 1, reset=True)
    (s,) = d.spans
    assert s.attributes["error.type"] == "connection_reset" and "wirespan.incomplete" not in s.attributes


def test_http10_reply_without_a_length_ends_at_the_close() -> None:
    d = Driver()
    d.req(b"GET /old HTTP/1.0\r\n\r\n")
    d.resp(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nbody until the server closes")
    d.s.close(d.ts + 1)
    (s,) = d.spans
    assert s.attributes["http.response.body.size"] == len(b"body until the server closes")
    assert "wirespan.incomplete" not in s.attributes and s.status_code == StatusCode.UNSET


def test_known_methods_override_the_semconv_list() -> None:
    """semconv: unknown methods are _OTHER (+ method_original), and an instrumentation must let
    the list of known methods be overridden; a configured list replaces the default one."""
    d = Driver()
    d.req(b"CCM_POST / HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
    a = d.spans[0].attributes
    assert a["http.request.method"] == "_OTHER" and a["http.request.method_original"] == "CCM_POST"
    d = Driver(settings=http1.Settings(known_methods=["GET", "CCM_POST"]))
    d.req(b"CCM_POST / HTTP/1.1\r\nHost: h\r\n\r\nPATCH /p HTTP/1.1\r\nHost: h\r\n\r\n")
    d.resp(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n" * 2)
    assert [(s.name, s.attributes["http.request.method"], s.attributes.get("http.request.method_original"))
            for s in d.spans] == [("CCM_POST", "CCM_POST", None), ("HTTP", "_OTHER", "PATCH")]


# -- HTTP/0.9 (RFC 1945 §4.1, §6): a Simple-Request, answered by the bare body until the close --------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("line", [b"GET /bad.html\r\n", b"GET /bad.html\n", b"GET  /bad.html \r\n"])
def test_http09_simple_request_and_response(mode: str, line: bytes) -> None:
    d = Driver()
    d.req(line + b"ignored: the client said all it can\r\n", mode)
    d.resp(b"<html>\n\t<title>Bad!</title>\n", mode)
    d.resp(b"</html>\n", mode)
    assert d.spans == []
    d.s.close(d.ts + 5, reset=False)
    (s,) = d.spans
    assert s.name == "GET"
    assert s.attributes["url.path"] == "/bad.html"
    assert s.attributes["network.protocol.version"] == "0.9"
    assert "http.response.status_code" not in s.attributes
    assert s.attributes["http.response.body.size"] == 36
    assert s.status_code == StatusCode.UNSET and not d.drops


@pytest.mark.parametrize("data, want", [
    (b"GET /x\r\n", Detection.REQUEST),
    (b"GET http://h/x\n", Detection.REQUEST),
    (b"GET /x", Detection.NEED_MORE),
    (b"GET key\r\n", Detection.NO),        # inline Redis, not a Request-URI
    (b"POST /x\r\n", Detection.NO),        # HTTP/0.9 has GET alone
    (b"GET /x y\r\n", Detection.NO),
])
def test_http09_detection(data: bytes, want: Detection) -> None:
    buf = LargeBuffer()
    buf.append(memoryview(data), 1)
    assert http1.detect(buf, True) == want


def test_http09_reset_before_the_body_is_an_error() -> None:
    d = Driver()
    d.req(b"GET /x\r\n")
    d.s.close(d.ts + 5, reset=True)
    (s,) = d.spans
    assert s.status_code == StatusCode.ERROR and s.attributes["error.type"] == "connection_reset"


# -- chunk lines ending in a bare LF: read from a sender whose head did so, refused otherwise -----------
@pytest.mark.parametrize("mode", MODES)
def test_bare_lf_chunks_from_a_bare_lf_sender(mode: str) -> None:
    d = Driver()
    d.req(b"POST /up HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n\n5\nhello\n3;ext=1\r\nabc\n0\nX-T: 1\n\n",
          mode)
    d.resp(b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nok\n0\n\n", mode)
    (s,) = d.spans
    assert s.attributes["http.request.body.size"] == 8
    assert s.attributes["http.response.body.size"] == 2
    assert s.attributes["http.response.status_code"] == 200 and not d.drops


@pytest.mark.parametrize("mode", MODES)
def test_bare_lf_chunk_line_from_a_crlf_sender_is_refused(mode: str) -> None:
    """A CRLF head then an LF-only chunk line: where chunk parsers disagree (smuggling)."""
    d = Driver()
    with pytest.raises(ProtocolError) as e:
        d.req(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", mode)
    assert e.value.reason == "bad_chunk_size"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("line, status", [(b"HTTP/1.0 200 OK\r\n", 200), (b"HTTP/1.1  503\n", 503)])
def test_capture_ends_after_the_status_line(mode: str, line: bytes, status: int) -> None:
    """Only the reply's status line (and maybe a few fields) came: a span with that status,
    marked incomplete (issue 16 class 4); an interim 100 alone says nothing."""
    d = Driver()
    d.req(b"GET /productpage HTTP/1.1\r\nHost: p\r\n\r\n", mode)
    d.resp(line + b"Content-Ty", mode)
    d.s.close(d.ts + 5, reset=False)
    (s,) = d.spans
    assert s.attributes["http.response.status_code"] == status
    assert s.attributes["wirespan.incomplete"] is True
    assert (s.status_code == StatusCode.ERROR) == (status >= 500)  # the reply's own verdict, not the cut's
    d2 = Driver()
    d2.req(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
    d2.resp(b"HTTP/1.1 100 Continue\r\n")
    d2.s.close(d2.ts + 5, reset=False)
    assert d2.spans == [] and d2.drops == ["unanswered"]


@pytest.mark.parametrize("mode", MODES)
def test_whitespace_before_a_colon_is_read_in_a_response_refused_in_a_request(mode: str) -> None:
    """RFC 9112 §5.1: a server must reject ``Name :`` (smuggling), a proxy strips it from a
    response and a client reads on: the response's field still frames the body."""
    d = Driver()
    d.req(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", mode)
    d.resp(b"HTTP/1.1 200 OK\r\nServer : x\r\nContent-Length : 2\r\n\r\nok", mode)
    (s,) = d.spans
    assert s.attributes["http.response.body.size"] == 2 and not d.drops
    with pytest.raises(ProtocolError) as e:
        Driver().req(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", mode)
    assert e.value.reason == "bad_header"
