"""FastCGI: records, PARAMS split anywhere, multiplexing, status, stderr, bad input, real nginx + php-fpm."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.protocols import fastcgi as f
from processors.protocols.base import Detection
from processors.protocols.errors import ProtocolError
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.driver import SessionDriver, peak_allocation

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def rec(t: int, rid: int, content: bytes = b"", pad: int = 0) -> bytes:
    return struct.pack(">BBHHBB", 1, t, rid, len(content), pad, 0) + content + b"\0" * pad


def nv(name: str, value: str | bytes) -> bytes:
    n = name.encode()
    v = value.encode() if isinstance(value, str) else value

    def enc(x: int) -> bytes:
        return bytes([x]) if x < 128 else struct.pack(">I", x | 0x80000000)

    return enc(len(n)) + enc(len(v)) + n + v


def params(rid: int, pairs: dict[str, str | bytes], split: int = 0) -> bytes:
    stream = b"".join(nv(k, v) for k, v in pairs.items())
    if split:
        parts = [stream[i:i + split] for i in range(0, len(stream), split)]
    else:
        parts = [stream]
    return b"".join(rec(f.PARAMS, rid, p, pad=len(p) % 8) for p in parts) + rec(f.PARAMS, rid)


def begin(rid: int) -> bytes:
    return rec(f.BEGIN_REQUEST, rid, struct.pack(">HB5x", 1, 1))


def end(rid: int, app: int = 0, proto: int = 0) -> bytes:
    return rec(f.END_REQUEST, rid, struct.pack(">IB3x", app, proto))


BASE = {"REQUEST_METHOD": "GET", "REQUEST_URI": "/shop/item.php?id=7", "QUERY_STRING": "id=7",
        "SERVER_PORT": "8080", "SERVER_NAME": "shop.local", "REMOTE_ADDR": "10.1.2.3", "REMOTE_PORT": "50123",
        "SERVER_PROTOCOL": "HTTP/1.1", "REQUEST_SCHEME": "http", "HTTP_USER_AGENT": "curl/8",
        "HTTP_COOKIE": "session=secret", "HTTP_AUTHORIZATION": "Bearer tok", "CONTENT_LENGTH": "0"}


class Driver(SessionDriver):
    def __init__(self, **settings: object) -> None:
        super().__init__(f, 9000, ts_step=100, **settings)


@pytest.mark.parametrize("sanitize, want", [(True, "id=7&token=REDACTED&pwd=REDACTED"),
                                             (False, "id=7&token=t0k&pwd=pw")])
def test_sensitive_query_values_are_redacted_by_default(sanitize: bool, want: str) -> None:
    d = Driver(sanitize_query=sanitize)
    uri = "/shop/item.php?id=7&token=t0k&pwd=pw"
    d.send(True, begin(1) + params(1, {**BASE, "REQUEST_URI": uri, "QUERY_STRING": uri.partition("?")[2]})
           + rec(f.STDIN, 1))
    d.send(False, rec(f.STDOUT, 1, b"Content-type: text/html\r\n\r\nok") + rec(f.STDOUT, 1) + end(1))
    (s,) = d.spans
    assert s.attributes["url.query"] == want


@pytest.mark.parametrize("extra, path, query", [
    # a front controller (try_files $uri /index.php?$query_string): the client's target, not the script's
    ({"REQUEST_URI": "/users/5", "DOCUMENT_URI": "/index.php", "SCRIPT_NAME": "/index.php",
      "QUERY_STRING": "q=/users/5&"}, "/users/5", "q=/users/5&"),
    ({"REQUEST_URI": "/users/5?x=1", "DOCUMENT_URI": "/index.php", "QUERY_STRING": "q=/users/5&x=1"},
     "/users/5", "x=1"),
    ({"REQUEST_URI": None, "DOCUMENT_URI": "/index.php", "QUERY_STRING": "a=b"}, "/index.php", "a=b"),
])
def test_path_is_the_clients_target(extra: dict, path: str, query: str | None) -> None:
    d = Driver()
    ps = {k: v for k, v in {**BASE, **extra}.items() if v is not None}
    d.send(True, begin(1) + params(1, ps) + rec(f.STDIN, 1))
    d.send(False, rec(f.STDOUT, 1, b"Content-type: text/html\r\n\r\nok") + rec(f.STDOUT, 1) + end(1))
    (s,) = d.spans
    assert s.attributes["url.path"] == path and s.attributes.get("url.query") == query


@pytest.mark.parametrize("step,split", [(None, 0), (1, 3), (7, 1), (64, 5)])
def test_request_with_params_split_anywhere(step: int | None, split: int) -> None:
    d = Driver()
    d.send(True, begin(1) + params(1, {**BASE, "HTTP_TRACEPARENT": TP}, split) + rec(f.STDIN, 1), step)
    d.send(False, rec(f.STDOUT, 1, b"Status: 404 Not Found\r\nContent-type: text/html\r\n\r\nmissing")
           + rec(f.STDOUT, 1) + end(1), step)
    (s,) = d.spans
    assert s.name == "GET" and s.kind == SpanKind.SERVER
    a = s.attributes
    assert a["url.path"] == "/shop/item.php" and a["url.query"] == "id=7"
    assert a["http.response.status_code"] == 404 and s.status_code == StatusCode.UNSET
    assert a["server.port"] == 8080 and a["server.address"] == "shop.local"
    assert a["client.address"] == "10.1.2.3" and a["client.port"] == 50123
    assert a["network.protocol.version"] == "1.1" and a["user_agent.original"] == "curl/8"
    assert a["http.response.body.size"] == len(b"missing")
    assert s.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "secret" not in repr(a) and "Bearer" not in repr(a)
    assert not d.drops and len(d.conn.client_buf) == 0 and len(d.conn.server_buf) == 0


def test_multiplexed_requests_post_body_status_500_and_stderr() -> None:
    d = Driver()
    body = b"x" * 70_000
    stdin = b"".join(rec(f.STDIN, 2, body[i:i + 65535]) for i in range(0, len(body), 65535)) + rec(f.STDIN, 2)
    d.send(True, begin(1) + begin(2) + params(2, {**BASE, "REQUEST_METHOD": "POST", "REQUEST_URI": "/up.php"})
           + params(1, BASE) + stdin + rec(f.STDIN, 1))
    d.send(False, rec(f.STDERR, 1, b"PHP Warning: odd") + rec(f.STDOUT, 2, b"Status: 500\r\n\r\nboom")
           + rec(f.STDOUT, 1, b"Content-type: text/plain\r\n\r\nhello") + end(2) + end(1))
    post, get = d.spans
    assert post.name == "POST" and post.status_code == StatusCode.ERROR
    assert post.attributes["http.response.status_code"] == 500
    assert post.attributes["http.request.body.size"] == 70_000
    assert get.attributes["http.response.status_code"] == 200  # no Status: line
    assert get.status_code == StatusCode.UNSET  # stderr alone is not an error
    assert get.events and get.events[0].attributes["message"] == "PHP Warning: odd"


def test_abort_and_protocol_status_are_errors() -> None:
    d = Driver()
    d.send(True, begin(3) + params(3, BASE) + rec(f.ABORT_REQUEST, 3))
    d.send(False, end(3, app=1))
    d.send(True, begin(4) + params(4, BASE))
    d.send(False, end(4, proto=2))
    a, o = d.spans
    assert a.status_code == StatusCode.ERROR and a.attributes["error.type"] == "aborted"
    assert o.status_code == StatusCode.ERROR and o.attributes["error.type"] == "OVERLOADED"


def test_detect() -> None:
    assert f.detect(LargeBuffer(begin(1)), None) == Detection.REQUEST
    assert f.detect(LargeBuffer(rec(f.STDOUT, 1, b"x")), None) == Detection.RESPONSE
    assert f.detect(LargeBuffer(begin(1)[:5]), None) == Detection.NEED_MORE
    assert f.detect(LargeBuffer(b"GET / HTTP/1.1\r\n\r\n"), None) == Detection.NO
    assert f.detect(LargeBuffer(b"\x02\x01\x00\x01\x00\x08\x00\x00\x00\x01"), None) == Detection.NO


def test_declared_64k_with_10_bytes_sent_waits_bounded_and_is_cut_short_at_close() -> None:
    d = Driver()
    d.send(True, begin(1) + params(1, BASE))
    d.send(False, struct.pack(">BBHHBB", 1, f.STDOUT, 1, 65535, 0, 0) + b"0123456789")
    assert len(d.conn.server_buf) == 18 and not d.spans
    d.session.close(d.ts, reset=True)
    # The STDOUT record had begun: base.py's rule makes the request a span marked incomplete
    # (it was counted no_end_request before the reply_begun rule).
    (s,) = d.spans
    assert s.attributes["wirespan.incomplete"] is True and d.drops == []


@pytest.mark.parametrize("data", [
    b"\x02\x01\x00\x01\x00\x08\x00\x00" + b"\0" * 8,          # wrong version
    b"\x01\x0f\x00\x01\x00\x00\x00\x00",                      # unknown record type
])
def test_malformed_records(data: bytes) -> None:
    d = Driver()
    with pytest.raises(ProtocolError):
        d.send(True, data)


def test_truncated_and_oversized_params() -> None:
    d = Driver()
    with pytest.raises(ProtocolError):
        d.send(True, begin(1) + rec(f.PARAMS, 1, b"\x85\x00") + rec(f.PARAMS, 1))
    d = Driver()
    with pytest.raises(ProtocolError):
        d.send(True, begin(1) + b"".join(rec(f.PARAMS, 1, b"\0" * 65535) for _ in range(5)))


def _alloc(size: int) -> int:
    d = Driver()
    d.send(True, begin(1) + params(1, BASE) + rec(f.STDIN, 1))
    out = rec(f.STDOUT, 1, b"Content-type: text/plain\r\n\r\n")
    chunk = rec(f.STDOUT, 1, b"y" * 32768)

    def respond() -> None:
        d.send(False, out)
        for _ in range(size // 32768):
            d.send(False, chunk, 1400)
        d.send(False, end(1))

    peak = peak_allocation(respond)
    assert d.spans[0].attributes["http.response.body.size"] == size // 32768 * 32768
    return peak


def test_allocation_is_flat_when_the_response_grows_100x() -> None:
    small, large = _alloc(32768 * 2), _alloc(32768 * 200)
    assert large < small * 1.5 + 4096, (small, large)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40))
def test_fuzz_only_protocol_errors_escape(data: bytes, step: int) -> None:
    d = Driver()
    d.send(True, begin(1))  # a request in progress, so the garbage meets a live session
    d.fuzz(data, step)


def test_real_nginx_php_fpm() -> None:
    httpx = pytest.importorskip("httpx")
    from tests.support.capture import tcpdump
    from tests.support.php_fpm import nginx_php_fpm
    from tests.support.replay import replay_spans

    with nginx_php_fpm() as site, tcpdump(site.fpm_port) as pcap:
        base = f"http://127.0.0.1:{site.http_port}"
        with httpx.Client() as c:
            assert c.get(f"{base}/index.php?q=1", headers={"traceparent": TP}).status_code == 200
            assert c.post(f"{base}/index.php", content=b"a" * 10).status_code == 200
            assert c.put(f"{base}/index.php?x=y", content=b"p").status_code == 200
            assert c.delete(f"{base}/index.php").status_code == 200
            assert c.post(f"{base}/index.php", content=b"z" * 2_000_000).status_code == 200
            assert c.get(f"{base}/error.php").status_code == 500
            assert c.get(f"{base}/stderr.php").status_code == 200
            assert c.get(f"{base}/missing.php").status_code == 404
            big = c.get(f"{base}/big.php")
            assert len(big.content) == 300_000
    spans = replay_spans(pcap)
    got = [(s.attributes["http.request.method"], s.attributes["url.path"], s.attributes["http.response.status_code"])
           for s in spans]
    assert got == [("GET", "/index.php", 200), ("POST", "/index.php", 200), ("PUT", "/index.php", 200),
                   ("DELETE", "/index.php", 200), ("POST", "/index.php", 200), ("GET", "/error.php", 500),
                   ("GET", "/stderr.php", 200), ("GET", "/missing.php", 404), ("GET", "/big.php", 200)]
    assert spans[0].attributes["url.query"] == "q=1"
    assert spans[0].trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert spans[4].attributes["http.request.body.size"] == 2_000_000
    assert spans[5].status_code == StatusCode.ERROR
    assert spans[6].status_code == StatusCode.UNSET and spans[6].events
    assert "something odd happened" in spans[6].events[0].attributes["message"]
    assert spans[8].attributes["http.response.body.size"] == 300_000
    for s in spans:
        assert s.kind == SpanKind.SERVER and s.attributes["server.port"] == site.http_port


@pytest.mark.parametrize("step", [None, 1, 7])
def test_reply_cut_by_the_end_of_the_capture_is_an_incomplete_span(step: int | None) -> None:
    """STDOUT began (with its Status: line) and END_REQUEST never came: a span of what was
    seen, marked wirespan.incomplete, with the status the application gave (base.py's rule)."""
    d = Driver()
    d.send(True, begin(1) + params(1, BASE) + rec(f.STDIN, 1), step)
    d.send(False, rec(f.STDOUT, 1, b"Status: 503 Busy\r\nContent-type: text/html\r\n\r\npart"), step)
    d.send(True, begin(2) + params(2, BASE) + rec(f.STDIN, 2), step)  # never answered
    d.session.close(d.ts)
    (s,) = d.spans
    a = s.attributes
    assert a["http.response.status_code"] == 503 and s.status_code == StatusCode.ERROR
    assert a["wirespan.incomplete"] is True and a["url.path"] == "/shop/item.php"
    assert d.drops == ["no_end_request"]


def _conversation() -> list[tuple[bool, bytes]]:
    """Two requests on one connection, each side's records in one segment, plus a
    multiplexed pair with STDERR, a 500 and a POST body."""
    return [(True, begin(1) + params(1, BASE) + rec(f.STDIN, 1)),
            (False, rec(f.STDOUT, 1, b"Status: 404 Not Found\r\nContent-type: text/html\r\n\r\nmissing")
             + rec(f.STDOUT, 1) + end(1)),
            (True, begin(2) + begin(3) + params(3, {**BASE, "REQUEST_METHOD": "POST"}, split=7)
             + params(2, BASE) + rec(f.STDIN, 3, b"a=1", pad=5) + rec(f.STDIN, 3) + rec(f.STDIN, 2)),
            (False, rec(f.STDERR, 2, b"PHP Warning: odd") + rec(f.STDOUT, 3, b"Status: 500\r\n\r\nboom")
             + rec(f.STDOUT, 2, b"Content-type: text/plain\r\n\r\nhello") + end(3, 1) + end(2, 0, 2))]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=3))
def test_feed_whole_matches_the_buffered_path(mutations: list) -> None:
    """The buffer-less path (feed_whole) gives the buffered path's spans and drops, for the
    conversation as sent, with bytes changed and with segments split in two."""
    from tests.support.whole import run_both_ways
    segs = _conversation()
    for i, pos, byte, split in mutations:
        fc, data = segs[i % len(segs)]
        pos %= len(data)
        if split:
            segs[i % len(segs):i % len(segs) + 1] = [(fc, data[:pos]), (fc, data[pos:])] if pos else [(fc, data)]
        else:
            segs[i % len(segs)] = (fc, data[:pos] + bytes([byte]) + data[pos + 1:])
    spans, _drops = run_both_ways(f.Session, 9000, segs)
    if not mutations:
        assert [(s[0].split()[0], dict(s[6])["http.response.status_code"], s[5]) for s in spans] == \
            [("GET", 404, ""), ("POST", 500, ""), ("GET", 200, "OVERLOADED")]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 400), max_size=6), st.integers(0, 3))
def test_records_across_chunks_read_as_in_one_chunk(cuts: list, which: int) -> None:
    """A record straddling chunks (read from the buffer's views) gives what it gives lying
    in one chunk (read from the chunk's view). Times are left out: the driver's clock
    steps with each send."""
    def run(split: bool) -> list:
        d = Driver()
        for i, (fc, data) in enumerate(_conversation()):
            if split and i == which:
                pos = 0
                for c in sorted(set(min(c, len(data)) for c in cuts)):
                    d.send(fc, data[pos:c])
                    pos = c
                d.send(fc, data[pos:])
            else:
                d.send(fc, data)
        return [(s.name, s.status_code, s.status_message, sorted(s.attributes.items()),
                 [e.attributes for e in (s.events or [])]) for s in d.spans] + [dict(d.drops)]
    assert run(True) == run(False)


def _answer(fn: object, *args: object) -> object:
    """What a decoder gives: its result, or its error's class, reason, offset and detail."""
    try:
        return fn(*args)  # type: ignore[operator]
    except ProtocolError as e:
        return (type(e).__name__, e.reason, e.offset, e.detail)


_NAMES = [*sorted(n.decode() for n in f._WANTED), "HTTP_COOKIE", "HTTP_X_A", "X", "", "CONTENT_LENGTH"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.binary(max_size=300), st.booleans()), max_size=12),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3), st.integers(0, 10_000))
def test_params_fast_loop_answers_as_the_walk(pairs: list, flips: list, cut: int) -> None:
    """The fast loop of ``_wanted_pairs`` (short lengths only, no bound checks) gives the
    reference walk's pairs, or its error at the same offset: pairs with one- and four-byte
    lengths (a short one written long too), duplicates, bytes changed, the stream cut."""
    stream = bytearray()
    for name, value, long_form in pairs:
        for x in (len(name), len(value)):
            stream += struct.pack(">I", x | 0x80000000) if long_form or x > 127 else bytes([x])
        stream += name.encode() + value
    for pos, byte in flips:
        if stream:
            stream[pos % len(stream)] = byte
    for data in (bytes(stream), bytes(stream[:cut % (len(stream) + 1)])):
        mv = memoryview(data)
        assert _answer(f._wanted_pairs, mv) == _answer(f._walk_pairs, mv)
        buf = LargeBuffer(*(data[i:i + 7] for i in range(0, len(data), 7)))  # several chunks
        assert _answer(f._pairs, buf) == _answer(f._walk_pairs, mv)


_HEAD_PIECES = ["Status:", "status: ", "STATUS:", "Status:  404 Not Found", "\r\n", "\n", "\r", " ", "200",
                "5_03", "+2", "x", "Content-Type: text/html", "Statu", "s:"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_HEAD_PIECES), max_size=14), st.lists(st.integers(1, 60), max_size=4),
       st.integers(1, 2000))
def test_head_in_one_view_reads_as_the_buffer_walk(pieces: list, cuts: list, at: int) -> None:
    """A STDOUT head found in its first record's one view (a regex each for its end and its
    ``Status:`` line) gives the status and body size that the same records give when each
    lies across two chunks (several views: the buffer's search and line walk)."""
    out = "".join(pieces).encode() + b"\r\n\r\nbody"
    pos, parts = 0, []
    for c in sorted({min(c, len(out)) for c in cuts}):
        if c > pos:
            parts.append(out[pos:c])
            pos = c
    parts.append(out[pos:])
    response = b"".join(rec(f.STDOUT, 1, p) for p in parts) + rec(f.STDOUT, 1) + end(1)

    def run(cut: int) -> list:
        d = Driver()
        d.send(True, begin(1) + params(1, BASE) + rec(f.STDIN, 1))
        d.send(False, response[:cut])
        d.send(False, response[cut:])
        return [(s.attributes["http.response.status_code"], s.attributes["http.response.body.size"])
                for s in d.spans]

    assert run(0) == run(8 + at % len(parts[0]))  # the first record's content cut
    req = f._Req(0)
    req.head_done, req.head_len = True, len(out) - 4
    req.head = memoryview(out)
    in_view = Driver().session._status(req)
    req.head = LargeBuffer(*parts)
    assert in_view == Driver().session._status(req)
