"""HTTP/2 session: frames, streams, HPACK, limits, bad input, allocation.

Bytes come from the real ``h2`` client/server state machines (tests/support/h2drive.py)
where h2 can produce them; hand-built frames cover the flags and shapes h2 never sends.
"""

from __future__ import annotations

import os
import random
import struct
import tracemalloc

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import http2
from processors.protocols.base import Detection, Perspective
from processors.protocols.errors import Malformed
from processors.protocols.http2 import H2Session, Settings, detect
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.h2drive import PREFACE, Driver, H2Pair, frame
from tests.support.h2drive import settings as settings_frame

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _req(method: str = "GET", path: str = "/", **extra: str) -> list[tuple[str, str]]:
    h = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "example.com:8080")]
    h += [(k.replace("_", "-"), v) for k, v in extra.items()]
    return h


def _conversation() -> H2Pair:
    p = H2Pair()
    a = p.request(_req("GET", "/a?x=1", user_agent="ua/1", traceparent=TP))
    b = p.request(_req("POST", "/upload", content_type="text/plain"), b"x" * 1000)
    p.respond(b, [(":status", "201")], b"ok")
    p.respond(a, [(":status", "404")], b"nope" * 10)
    return p


def _spans_by_path(drv: Driver) -> dict[str, object]:
    return {s.attributes.get("url.path"): s for s in drv.spans}


def _check_conversation(drv: Driver) -> None:
    assert not drv.drops, drv.drops
    spans = _spans_by_path(drv)
    assert set(spans) == {"/a", "/upload"}
    a = spans["/a"]
    assert a.name == "GET" and a.kind == SpanKind.SERVER
    assert a.attributes["url.query"] == "x=1"
    assert a.attributes["http.response.status_code"] == 404
    assert a.attributes["http.response.body.size"] == 40
    assert a.attributes["network.protocol.version"] == "2"
    assert a.attributes["user_agent.original"] == "ua/1"
    assert a.attributes["server.address"] == "example.com"
    assert a.attributes["url.scheme"] == "http"
    assert a.status_code == StatusCode.UNSET  # 4xx is not a server error
    assert a.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert a.parent_span_id.hex() == "b7ad6b7169203331"
    b = spans["/upload"]
    assert b.name == "POST"
    assert b.attributes["http.request.body.size"] == 1000
    assert b.attributes["http.response.status_code"] == 201


def test_whole_messages() -> None:
    drv = Driver()
    _conversation().replay(drv)
    _check_conversation(drv)
    # the response order was b then a: spans come out in completion order
    assert [s.attributes["url.path"] for s in drv.spans] == ["/upload", "/a"]


def test_byte_by_byte() -> None:
    drv = Driver()
    for fc, data in _conversation().log:
        drv.feed_split(fc, data, step=1)
    _check_conversation(drv)


def test_trailing_partial_frame_is_left_over() -> None:
    drv = Driver()
    _conversation().replay(drv)
    tail = frame(http2.HEADERS, 0x4, 7, b"\x82")[:5]
    drv.feed(True, tail)
    assert len(drv.conn.client_buf) == 5
    assert len(drv.spans) == 2


def test_interleaved_streams_and_times() -> None:
    p = H2Pair()
    sids = [p.request(_req("GET", f"/s{i}")) for i in range(5)]
    for sid in sids:
        p.server.send_headers(sid, [(":status", "200")])
    for i in range(3):  # DATA of all streams interleaved
        for sid in sids:
            p.server.send_data(sid, b"d" * (sid + i))
    for sid in reversed(sids):
        p.server.send_data(sid, b"", end_stream=True)
    p.pump()
    drv = Driver()
    p.replay(drv)
    got = {s.attributes["url.path"]: s for s in drv.spans}
    assert len(got) == 5
    for i, sid in enumerate(sids):
        s = got[f"/s{i}"]
        assert s.attributes["http.response.body.size"] == 3 * sid + 3
        assert s.end_ns >= s.start_ns


def test_dynamic_table_reuse_and_huffman() -> None:
    p = H2Pair()
    for i in range(20):  # h2 indexes custom headers: later requests are mostly indices
        sid = p.request(_req("GET", "/same", user_agent="agent-with-long-name/1.0", x_custom=f"v{i % 3}"))
        p.respond(sid, [(":status", "200"), ("content-type", "text/plain")], b"y")
    drv = Driver()
    p.replay(drv)
    assert len(drv.spans) == 20 and not drv.drops
    assert all(s.attributes["user_agent.original"] == "agent-with-long-name/1.0" for s in drv.spans)
    assert all(s.attributes["url.path"] == "/same" for s in drv.spans)


def _hdr_block(enc: hpack.Encoder, headers: list[tuple[bytes, bytes]], huffman: bool) -> bytes:
    return enc.encode(headers, huffman=huffman)


def test_table_size_update_eviction_and_plain_strings() -> None:
    for huffman in (True, False):
        enc = hpack.Encoder()
        enc.header_table_size = 100  # forces a size update at the next block, then evictions
        drv = Driver()
        drv.feed(True, PREFACE + settings_frame())
        for i in range(6):
            sid = 2 * i + 1
            blk = _hdr_block(enc, [(b":method", b"GET"), (b":path", f"/p{i}".encode()), (b":scheme", b"http"),
                                   (b"user-agent", f"ua-{i}-{'z' * 30}".encode())], huffman)
            drv.feed(True, frame(http2.HEADERS, 0x5, sid, blk))
            drv.feed(False, frame(http2.HEADERS, 0x5, sid, b"\x88"))  # :status 200, END_STREAM
        assert not drv.drops
        assert [s.attributes["url.path"] for s in drv.spans] == [f"/p{i}" for i in range(6)]
        assert drv.session.client.hpack.size <= 100


def test_continuation_padding_priority() -> None:
    enc = hpack.Encoder()
    blk = enc.encode([(b":method", b"GET"), (b":path", b"/cont"), (b":scheme", b"http"),
                      (b":authority", b"h"), (b"user-agent", b"u" * 50), (b"traceparent", TP.encode())])
    a, b, c = blk[:5], blk[5:20], blk[20:]
    pad = 7
    # HEADERS: PADDED | PRIORITY, no END_HEADERS, END_STREAM
    hp = bytes([pad]) + struct.pack(">IB", 0, 15) + a + b"\0" * pad
    drv = Driver()
    data = PREFACE + settings_frame() + frame(http2.HEADERS, 0x1 | 0x8 | 0x20, 1, hp)
    data += frame(http2.CONTINUATION, 0, 1, b) + frame(http2.CONTINUATION, 0x4, 1, c)
    drv.feed_split(True, data, step=3)
    resp = frame(http2.HEADERS, 0x4, 1, b"\x88")
    resp += frame(http2.DATA, 0x8, 1, bytes([3]) + b"body" + b"\0\0\0")  # PADDED DATA
    resp += frame(http2.PRIORITY, 0, 1, struct.pack(">IB", 0, 3))
    resp += frame(http2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 100))
    resp += frame(http2.PING, 0, 0, b"12345678") + frame(0xEE, 0xFF, 1, b"unknown frame type")
    resp += frame(http2.DATA, 0x1, 1, b"!")
    drv.feed_split(False, resp, step=2)
    assert not drv.drops, drv.drops
    (s,) = drv.spans
    assert s.attributes["url.path"] == "/cont"
    assert s.attributes["http.response.body.size"] == 5
    assert s.parent_span_id.hex() == "b7ad6b7169203331"


def test_interleaved_continuation_is_an_error_and_recovers() -> None:
    drv = Driver()
    blk = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"http")])
    drv.feed(True, PREFACE + frame(http2.HEADERS, 0, 1, blk[:3]) + frame(http2.PING, 0, 0, b"8bytes!!"))
    assert "continuation_expected" in drv.drops
    # after the gap the session resynchronises on the next frames
    blk2 = b"\x82\x84\x86"  # GET / http, static only
    drv.feed(True, frame(http2.HEADERS, 0x5, 3, blk2) + frame(http2.PING, 0, 0, b"8bytes!!"))
    drv.feed(False, frame(http2.HEADERS, 0x5, 3, b"\x88"))
    assert [s.attributes.get("url.path") for s in drv.spans] == ["/"]


def test_rst_stream_and_goaway() -> None:
    p = H2Pair()
    a = p.request(_req("GET", "/slow"))
    b = p.request(_req("GET", "/never"))
    p.client.reset_stream(a, 8)  # CANCEL
    p.pump()
    p.server.close_connection(last_stream_id=a)
    p.pump()
    drv = Driver()
    p.replay(drv)
    (s,) = drv.spans
    assert s.attributes["url.path"] == "/slow"
    assert s.attributes["error.type"] == "CANCEL"
    assert s.status_code == StatusCode.ERROR
    assert drv.drops == ["goaway_unprocessed"]
    assert b not in drv.session.streams


def test_close_ends_open_streams() -> None:
    """The end of the connection (or of the capture): a stream answered in part is a span of
    what was seen, marked incomplete, without an error; one never answered is counted; a
    reset ends both as errors (base.py's rule)."""
    p = H2Pair()
    p.request(_req("GET", "/open"))
    sid = p.request(_req("GET", "/half"))
    p.server.send_headers(sid, [(":status", "200")])
    p.server.send_data(sid, b"x" * 100)
    p.pump()
    drv = Driver()
    p.replay(drv)
    drv.close(9999)
    (s,) = drv.spans
    assert s.attributes["url.path"] == "/half" and s.attributes["http.response.status_code"] == 200
    assert s.attributes["wirespan.incomplete"] is True and "error.type" not in s.attributes
    assert s.status_code == StatusCode.UNSET and s.end_ns < 9999
    assert drv.drops == ["no_response"]
    drv = Driver()
    p.replay(drv)
    drv.session.close(9999, reset=True)
    assert sorted(x.attributes["url.path"] for x in drv.spans) == ["/half", "/open"]
    assert all(x.status_code == StatusCode.ERROR for x in drv.spans)
    assert {x.attributes["error.type"] for x in drv.spans} == {"connection_reset"}


def test_a_gap_keeps_the_streams_in_flight() -> None:
    """Bytes lost in the middle of a response (a capture that missed segments): frames after
    the gap still name their stream, so the call ends as a span, without the sizes the gap hid."""
    p = H2Pair()
    sid = p.request(_req("GET", "/stream"))
    p.server.send_headers(sid, [(":status", "200")])
    p.pump()
    head = len(p.log)
    for _ in range(3):
        p.server.send_data(sid, b"y" * 50)
        p.pump()
    p.server.send_data(sid, b"", end_stream=True)
    p.pump()
    drv = Driver()
    for i, (fc, data) in enumerate(p.log):
        if i == head + 1:
            drv.session.gap(False, 1000 + i)  # the first DATA frame never arrives
            continue
        drv.feed(fc, data, 1000 + i)
    (s,) = drv.spans
    assert s.attributes["url.path"] == "/stream" and s.attributes["http.response.status_code"] == 200
    assert "http.response.body.size" not in s.attributes and drv.drops == ["gap"]


def test_client_perspective_and_4xx() -> None:
    p = H2Pair()
    sid = p.request(_req("DELETE", "/r"))
    p.respond(sid, [(":status", "403")])
    drv = Driver(perspective=Perspective.CLIENT)
    p.replay(drv)
    (s,) = drv.spans
    assert s.kind == SpanKind.CLIENT and s.status_code == StatusCode.ERROR
    assert s.attributes["error.type"] == "403"


def test_5xx_is_server_error_and_unknown_method() -> None:
    p = H2Pair()
    sid = p.request(_req("BREW", "/pot"))
    p.respond(sid, [(":status", "503")])
    drv = Driver()
    p.replay(drv)
    (s,) = drv.spans
    assert s.name == "HTTP" and s.attributes["http.request.method"] == "_OTHER"
    assert s.attributes["http.request.method_original"] == "BREW"
    assert s.status_code == StatusCode.ERROR


def test_credentials_never_exported() -> None:
    p = H2Pair()
    sid = p.request(_req("GET", "/me", authorization="Bearer SECRET1", cookie="sid=SECRET2"))
    p.respond(sid, [(":status", "200"), ("set-cookie", "SECRET3")])
    drv = Driver()
    p.replay(drv)
    (s,) = drv.spans
    text = repr(s.attributes) + s.name + s.status_message
    assert "SECRET" not in text
    assert not any("authorization" in k or "cookie" in k for k in s.attributes)


def test_informational_response_is_not_final() -> None:
    drv = Driver()
    drv.feed(True, PREFACE + frame(http2.HEADERS, 0x4, 1, b"\x83\x84\x86"))  # POST /
    drv.feed(False, frame(http2.HEADERS, 0x4, 1, hpack.Encoder().encode([(b":status", b"100")])))
    drv.feed(True, frame(http2.DATA, 0x1, 1, b"abc"))
    drv.feed(False, frame(http2.HEADERS, 0x5, 1, b"\x88"))
    (s,) = drv.spans
    assert s.attributes["http.response.status_code"] == 200
    assert s.attributes["http.request.body.size"] == 3


def test_trailers_and_server_push() -> None:
    enc = hpack.Encoder()
    drv = Driver()
    drv.feed(True, PREFACE + frame(http2.HEADERS, 0x5, 1, b"\x82\x84\x86"))
    sblk = enc.encode([(b":status", b"200")])
    push = struct.pack(">I", 2) + enc.encode([(b":method", b"GET"), (b":path", b"/pushed.css"),
                                               (b":scheme", b"http"), (b":authority", b"h")])
    drv.feed(False, frame(http2.HEADERS, 0x4, 1, sblk) + frame(http2.PUSH_PROMISE, 0x4, 1, push)
             + frame(http2.DATA, 0, 1, b"page") + frame(http2.HEADERS, 0x5, 1, enc.encode([(b"x-trailer", b"t")]))
             + frame(http2.HEADERS, 0x4, 2, enc.encode([(b":status", b"200")])) + frame(http2.DATA, 0x1, 2, b"css"))
    assert not drv.drops
    assert [s.attributes["url.path"] for s in drv.spans] == ["/", "/pushed.css"]


def _get(path: bytes) -> bytes:
    """A HEADERS block written by hand: :method GET, :scheme http (static 2, 6), :path and :authority
    as literals without indexing (RFC 7541 §6.2.2, name by static index 4 and 1, no Huffman)."""
    return b"\x82\x86" + b"\x04" + bytes([len(path)]) + path + b"\x01\x09" + b"shop.test"


def test_sensitive_query_values_are_redacted_by_default() -> None:
    path = b"/cart?item=7&password=hunter2&X-Amz-Signature=abc"
    for opts, want in ((None, "item=7&password=REDACTED&X-Amz-Signature=REDACTED"),
                       (Settings(sanitize_query=False), "item=7&password=hunter2&X-Amz-Signature=abc")):
        drv = Driver(opts)
        drv.feed(True, PREFACE + settings_frame() + frame(http2.HEADERS, 0x5, 1, _get(path)), 1)
        drv.feed(False, settings_frame() + frame(http2.HEADERS, 0x5, 1, b"\x88"), 2)
        (sp,) = drv.spans
        assert sp.attributes["url.path"] == "/cart" and sp.attributes["url.query"] == want
        assert sp.attributes["server.address"] == "shop.test"


def test_h2c_upgrade_stream_1() -> None:
    up = {"method": "GET", "target": b"/up?q=1", "host": b"example.com:80", "user_agent": b"curl/8", "start_ns": 5,
          "traceparent": TP.encode()}
    drv = Driver(extra={"switch_to": "http2", "http2_upgrade_request": up})
    drv.feed(False, settings_frame() + frame(http2.HEADERS, 0x4, 1, b"\x88") + frame(http2.DATA, 0x1, 1, b"hi"), 7)
    drv.feed(True, PREFACE + settings_frame() + settings_frame(ack=True), 8)
    (s,) = drv.spans
    assert s.start_ns == 5 and s.end_ns == 7
    assert s.attributes["url.path"] == "/up" and s.attributes["url.query"] == "q=1"
    assert s.attributes["http.response.status_code"] == 200
    assert s.attributes["server.address"] == "example.com"
    assert s.attributes["user_agent.original"] == "curl/8"
    assert s.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"


def _frames_of(data: bytes) -> list[bytes]:
    out, p = [], 0
    while p + 9 <= len(data):
        n = int.from_bytes(data[p:p + 3], "big")
        out.append(data[p:p + 9 + n])
        p += 9 + n
    return out


def test_mid_stream_pickup_never_invents() -> None:
    p = H2Pair()
    hdrs = dict(user_agent="pickup-agent/2", x_app="a" * 20)
    first = p.request(_req("GET", "/first", **hdrs))
    p.respond(first, [(":status", "200")], b"1")
    start = len(p.log)
    for i in range(4):
        sid = p.request(_req("GET", f"/later{i}", **hdrs))
        p.respond(sid, [(":status", "200")], b"2")
    drv = Driver()
    for fc, data in p.log[start:]:  # the preface and the first exchange were never seen
        drv.feed(fc, data)
    assert len(drv.spans) == 4
    for i, s in enumerate(drv.spans):
        assert s.attributes.get("url.path") == f"/later{i}"  # literals: never indexed by h2
        assert s.attributes.get("user_agent.original") in (None, "pickup-agent/2")
        assert "*" not in repr(s.attributes)
    assert "hpack_unknown_index" in drv.drops  # user-agent was indexed in the lost exchange


def test_mid_stream_response_without_request_is_counted() -> None:
    p = H2Pair()
    sid = p.request(_req("GET", "/x"))
    start = len(p.log)
    p.respond(sid, [(":status", "200")], b"1")
    drv = Driver()
    for fc, data in p.log[start:]:
        drv.feed(fc, data)
    assert drv.spans == [] and drv.drops == ["request_not_seen"]


def test_limits_streams_and_header_list() -> None:
    p = H2Pair()
    sids = [p.request(_req("GET", f"/{i}"), end=True) for i in range(4)]
    for sid in sids:
        p.respond(sid, [(":status", "200")])
    drv = Driver(Settings(max_streams=2))
    p.replay(drv)
    assert "too_many_streams" in drv.drops
    assert len(drv.session.streams) == 0
    # a header block larger than the limit: skipped and counted, never gathered
    drv = Driver(Settings(max_header_list_size=4096))
    big = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/big"),
                                  (b"x-big", os.urandom(3000).hex().encode())])
    drv.feed(True, PREFACE + frame(http2.HEADERS, 0, 1, big[:800]) + frame(http2.CONTINUATION, 0, 1, big[800:1600])
             + frame(http2.CONTINUATION, 0x4, 1, big[1600:]))
    drv.feed(True, frame(http2.HEADERS, 0x5, 3, b"\x82\x84\x86"))
    drv.feed(False, frame(http2.HEADERS, 0x5, 3, b"\x88"))
    assert "header_list_too_large" in drv.drops
    assert [s.attributes["url.path"] for s in drv.spans] == ["/"]


def test_detect() -> None:
    assert detect(LargeBuffer(PREFACE), None) == Detection.REQUEST
    assert detect(LargeBuffer(PREFACE[:10]), None) == Detection.NEED_MORE
    assert detect(LargeBuffer(PREFACE), False) == Detection.NO
    assert detect(LargeBuffer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None) == Detection.NO
    assert detect(LargeBuffer(settings_frame(max_concurrent_streams=100)), None) == Detection.RESPONSE
    hf = frame(http2.HEADERS, 0x5, 1, b"\x82\x84\x86")
    assert detect(LargeBuffer(hf), None) == Detection.REQUEST
    assert detect(LargeBuffer(frame(http2.HEADERS, 0x4, 1, b"\x88") + frame(http2.DATA, 1, 1, b"x")), None) \
        == Detection.RESPONSE
    data = frame(http2.DATA, 0, 3, b"abc") + frame(http2.DATA, 1, 3, b"x")
    assert detect(LargeBuffer(data), True) == Detection.REQUEST
    rnd = random.Random(7)
    for _ in range(20000):
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 64)))
        assert detect(LargeBuffer(data), None) in (Detection.NO, Detection.NEED_MORE)


def test_data_payload_allocation_is_flat() -> None:
    # One DATA frame of 16 KiB vs 1.6 MiB frames fed in 16 KiB segments: the
    # session holds no payload and copies none, so the peak is the same.
    small = _alloc_small(16_000)
    large = _alloc_small(1_600_000)
    assert large < small + 4096, (small, large)


def _alloc_small(size: int) -> int:
    payload = memoryview(b"\0" * size)
    drv = Driver()
    drv.feed(True, PREFACE + settings_frame() + frame(http2.HEADERS, 0x4, 1, b"\x83\x84\x86"))
    drv.feed(False, frame(http2.HEADERS, 0x4, 1, b"\x88"))
    hdr = struct.pack(">HBBBI", size >> 8, size & 0xFF, 0, 1, 1)
    segs = [payload[i:i + 16000] for i in range(0, size, 16000)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    drv.feed(False, hdr)
    for s in segs:
        drv.feed(False, s)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert len(drv.spans) == 1 and drv.spans[0].attributes["http.response.body.size"] == size
    return peak


# -- fuzzing ----------------------------------------------------------------------
_VALID = b"".join(d for _, d in _conversation().log)


def _check_no_escape(chunks: list[bytes], from_client: bool) -> None:
    drv = Driver()
    for c in chunks:
        drv.feed(from_client, c)  # ProtocolError is caught by the driver as by the stage
        drv.feed(not from_client, c)
    drv.close(1)
    assert len(drv.session.streams) == 0
    for d in (drv.session.client, drv.session.server):
        assert d.block is None or len(d.block) <= http2.MAX_HEADER_LIST_SIZE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=0, max_size=200), max_size=8), st.booleans())
def test_fuzz_random_frames(chunks: list[bytes], fc: bool) -> None:
    _check_no_escape([PREFACE, *chunks] if fc else chunks, fc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(1, 64))
def test_fuzz_mutated_conversation(muts: list[tuple[int, int]], step: int) -> None:
    data = bytearray(_VALID)
    for i, v in muts:
        data[i] = v
    drv = Driver()
    for i in range(0, len(data), step):
        drv.feed(True, bytes(data[i:i + step]))
    drv.close(1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), st.integers(0, 255),
                          st.integers(0, 5), st.binary(max_size=40)), max_size=12))
def test_fuzz_frame_sequences(frames: list[tuple[int, int, int, bytes]]) -> None:
    """Well-framed but arbitrary frames: shapes, flags, stream ids and payloads all hostile."""
    data = PREFACE + b"".join(frame(t, f, s, p) for t, f, s, p in frames)
    _check_no_escape([data], True)


def test_regression_hpack_huge_integer_and_bad_huffman() -> None:
    drv = Driver()
    drv.feed(True, PREFACE + frame(http2.HEADERS, 0x5, 1, b"\xff" + b"\xff" * 10))
    assert drv.drops == ["hpack_int_too_long"]
    drv = Driver()
    drv.feed(True, PREFACE + frame(http2.HEADERS, 0x5, 1, b"\x40\x81\xff\x81\xff"))
    assert drv.drops == ["hpack_bad_huffman"]
    drv = Driver()
    drv.feed(True, PREFACE + frame(http2.HEADERS, 0x5, 1, b"\x3f\xe1\xff\x7f"))  # table size 2 MiB
    assert drv.drops == ["hpack_table_too_large"]


def test_session_alias() -> None:
    assert http2.Session is H2Session and http2.NAME == "http2"


def test_regression_hostile_control_frame_sizes() -> None:
    drv = Driver()
    big_settings = struct.pack(">HBBBI", 0x1000, 0, http2.SETTINGS, 0, 0)  # 1 MiB SETTINGS
    drv.feed(True, PREFACE + big_settings)
    assert drv.drops == ["frame_too_large"]
    drv = Driver()
    drv.feed(True, PREFACE + frame(http2.HEADERS, 0x5, 1, b"\x82\x84\x86"))
    n = 1 << 20
    goaway = struct.pack(">HBBBI", n >> 8, n & 0xFF, http2.GOAWAY, 0, 0) + struct.pack(">II", 0, 0)
    drv.feed(False, goaway)  # last stream 0: stream 1 was never processed
    drv.feed(False, b"\0" * (n - 8))  # the debug data is skipped as it arrives
    drv.feed(False, frame(http2.PING, 0, 0, b"8bytes!!"))
    assert drv.drops == ["goaway_unprocessed"]
    assert len(drv.conn.server_buf) == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=12))
def test_huffman_matches_hpack(data: bytes, garbage: bytes) -> None:
    """Our byte-at-a-time Huffman decoder agrees with the hpack package's, valid or not."""
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
    from hpack.huffman_table import decode_huffman

    enc = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(data)
    assert http2._huffman(memoryview(enc)) == data
    try:
        want: bytes | None = decode_huffman(garbage)
    except Exception:
        want = None
    assert http2._huffman(memoryview(garbage)) == want


def test_gap_mid_frame_resyncs() -> None:
    """Bytes lost mid-frame: the session skips to the next frame boundary and goes on."""
    p = H2Pair()
    a = p.request(_req("POST", "/before", user_agent="ua"), b"z" * 5000)
    p.respond(a, [(":status", "200")], b"ok")
    cut = len(p.log)
    b = p.request(_req("POST", "/lost", user_agent="ua"), b"q" * 3000)
    c = p.request(_req("GET", "/after"))
    p.respond(b, [(":status", "200")])
    p.respond(c, [(":status", "204")])
    drv = Driver()
    for fc, data in p.log[:cut]:
        drv.feed(fc, data)
    assert len(drv.spans) == 1
    later = [(fc, d) for fc, d in p.log[cut:]]
    client = b"".join(d for fc, d in later if fc)
    cbuf = drv.conn.client_buf
    cbuf.reset()
    drv.session.gap(True, 0)  # as the stage does on a receiver GAP event
    drv.feed(True, client[40:])  # resume inside /lost's HEADERS block
    for fc, d in later:
        if not fc:
            drv.feed(False, d)
    paths = [s.attributes.get("url.path") for s in drv.spans[1:]]
    assert "/after" in paths and "/lost" not in paths
    assert "resync_skipped" in drv.drops and "request_not_seen" in drv.drops


def test_kept_values_are_bounded() -> None:
    p = H2Pair()
    sid = p.request(_req("GET", "/" + "p" * 20000, user_agent="u" * 20000))
    p.respond(sid, [(":status", "200")])
    drv = Driver()
    p.replay(drv)
    (s,) = drv.spans
    assert len(s.attributes["url.path"]) == http2.MAX_PATH_VALUE
    assert len(s.attributes["user_agent.original"]) == http2.MAX_FIELD_VALUE


def test_pickup_starting_inside_a_frame() -> None:
    """Mid-stream pickup where the server's first bytes are the tail of a DATA frame."""
    p = H2Pair()
    a = p.request(_req("GET", "/big"))
    p.respond(a, [(":status", "200")], b"B" * 10000)
    start = len(p.log)
    b = p.request(_req("GET", "/next"))
    p.respond(b, [(":status", "200")], b"n")
    server_tail = b"".join(d for fc, d in p.log[:start] if not fc)[-3000:]  # inside /big's DATA
    drv = Driver()
    client_later = b"".join(d for fc, d in p.log[start:] if fc)
    drv.feed(True, client_later)
    drv.feed(False, server_tail + b"".join(d for fc, d in p.log[start:] if not fc))
    assert [s.attributes.get("url.path") for s in drv.spans] == ["/next"]


def test_detect_literal_pseudo_header_names() -> None:
    """grpc-c starts blocks with ':path' as a literal with a new name (raw or Huffman)."""
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    hname = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(b":path")
    for name in (b"\x05:path", bytes([0x80 | len(hname)]) + hname):
        hf = frame(http2.HEADERS, 0x4, 5, b"\x40" + name + b"\x06/a.B/C")
        assert detect(LargeBuffer(hf), None) == Detection.REQUEST
    blk = b"\x40\x07:status\x03200"
    assert detect(LargeBuffer(frame(http2.HEADERS, 0x4, 5, blk)), None) == Detection.RESPONSE
    blk = b"\x40\x04x-yz\x01a"
    assert detect(LargeBuffer(frame(http2.HEADERS, 0x4, 5, blk)), None) == Detection.NO


def test_settings_validation() -> None:
    import pydantic
    import pytest

    assert Settings().max_streams == http2.MAX_STREAMS
    for bad in ({"max_streams": 0}, {"max_header_list_size": 10}, {"max_stream": 5}):
        with pytest.raises(pydantic.ValidationError):
            Settings(**bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=20), st.binary(max_size=12))
def test_huffman_memo_gives_the_decoders_answer_and_stays_bounded(values: list[bytes], garbage: bytes) -> None:
    """String literals through _str_value twice (the memo's miss, then its hit) decode as the
    decoder does; an invalid string is refused both times, never memoized; the memo is bounded."""
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    enc = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    for value in values:
        e = enc.encode(value)
        assert len(e) < 127
        lit = bytes([0x80 | len(e)]) + e
        for _ in range(2):
            assert http2._str_value(memoryview(lit), 0, 0, True) == (value, len(e), len(lit))
    if len(garbage) < 127 and http2._huffman(memoryview(garbage)) is None:
        lit = bytes([0x80 | len(garbage)]) + garbage
        for _ in range(2):
            with pytest.raises(Malformed):
                http2._str_value(memoryview(lit), 0, 0, True)
        assert garbage not in http2._HUFF_MEMO
    assert len(http2._HUFF_MEMO) <= http2._HUFF_MEMO_ENTRIES
