"""gRPC over HTTP/2: status rules, message counting, trailers, resets, fuzzing, allocation.

HTTP/2 bytes come from the real ``h2`` state machines (tests/support/h2drive.py);
the real grpcio client/server traffic is in tests/test_grpc_real.py.
"""

from __future__ import annotations

import struct
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.protocols import grpc
from processors.protocols.base import Perspective
from processors.protocols.errors import Malformed
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.h2drive import Driver, H2Pair, grpc_msg

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
REQ = [(":method", "POST"), (":scheme", "http"), (":path", "/helloworld.Greeter/SayHello"),
       (":authority", "localhost:50051"), ("content-type", "application/grpc"), ("te", "trailers")]
RESP = [(":status", "200"), ("content-type", "application/grpc")]


def _call(p: H2Pair, req_msgs: list[bytes], resp_msgs: list[bytes], status: str | None = "0",
          message: str | None = None, extra: list[tuple[str, str]] | None = None) -> int:
    sid = p.request(REQ + (extra or []), b"".join(grpc_msg(m) for m in req_msgs))
    trailers = None
    if status is not None:
        trailers = [("grpc-status", status)] + ([("grpc-message", message)] if message else [])
    p.respond(sid, RESP, b"".join(grpc_msg(m) for m in resp_msgs), trailers)
    return sid


def _one(p: H2Pair, **kw: object) -> object:
    drv = Driver(**kw)  # type: ignore[arg-type]
    p.replay(drv)
    assert len(drv.spans) == 1, (drv.spans, drv.drops)
    return drv.spans[0]


def test_unary_ok() -> None:
    p = H2Pair()
    _call(p, [b"hello"], [b"world"], extra=[("traceparent", TP), ("grpc-timeout", "500m")])
    s = _one(p)
    assert s.name == "helloworld.Greeter/SayHello" and s.kind == SpanKind.SERVER
    a = s.attributes
    assert a["rpc.system.name"] == "grpc" and a["rpc.method"] == "helloworld.Greeter/SayHello"
    assert a["rpc.response.status_code"] == "OK"
    assert a["rpc.grpc.request.metadata.grpc-timeout"] == ["500m"]
    assert a["wirespan.grpc.request.message_count"] == 1 and a["wirespan.grpc.response.message_count"] == 1
    assert a["server.address"] == "localhost"
    assert s.status_code == StatusCode.UNSET
    assert s.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_streaming_counts() -> None:
    p = H2Pair()
    _call(p, [b"a" * i for i in range(7)], [b"b" * 100] * 3)
    a = _one(p).attributes
    assert a["wirespan.grpc.request.message_count"] == 7 and a["wirespan.grpc.response.message_count"] == 3


def test_server_error_rules() -> None:
    for code, err in ((5, False), (3, False), (2, True), (4, True), (12, True), (13, True), (14, True), (15, True),
                      (16, False), (1, False)):
        p = H2Pair()
        _call(p, [b"x"], [], status=str(code), message="why%20not%3F")
        s = _one(p)
        assert s.attributes["rpc.response.status_code"] == grpc.STATUS_NAMES[code]
        assert (s.status_code == StatusCode.ERROR) == err, code
        if err:
            assert s.status_message == "why not?"
            assert s.attributes["error.type"] == grpc.STATUS_NAMES[code]


def test_client_error_rules() -> None:
    for code in (0, 1, 5, 13):
        p = H2Pair()
        _call(p, [b"x"], [b"y"], status=str(code))
        s = _one(p, perspective=Perspective.CLIENT)
        assert s.kind == SpanKind.CLIENT
        assert (s.status_code == StatusCode.ERROR) == (code != 0)


def test_trailers_only_response() -> None:
    p = H2Pair()
    sid = p.request(REQ, grpc_msg(b"q"))
    p.respond(sid, [*RESP, ("grpc-status", "12"), ("grpc-message", "unknown method")])
    s = _one(p)
    assert s.attributes["rpc.response.status_code"] == "UNIMPLEMENTED"
    assert s.status_code == StatusCode.ERROR and s.status_message == "unknown method"


def test_no_trailer_uses_http_status() -> None:
    p = H2Pair()
    sid = p.request(REQ, grpc_msg(b"q"))
    p.respond(sid, [(":status", "503"), ("content-type", "application/grpc")])
    assert _one(p).attributes["rpc.response.status_code"] == "UNAVAILABLE"


def test_rst_stream_is_cancelled_or_deadline() -> None:
    p = H2Pair()
    sid = p.request(REQ, grpc_msg(b"q"), end=False)
    p.client.reset_stream(sid, 8)
    p.pump()
    drv = Driver()
    p.replay(drv, ts0=0)
    (s,) = drv.spans
    assert s.attributes["rpc.response.status_code"] == "CANCELLED"
    assert s.status_code == StatusCode.UNSET  # CANCELLED is the caller's doing
    # With a grpc-timeout that has passed when the client resets: DEADLINE_EXCEEDED
    p = H2Pair()
    sid = p.request([*REQ, ("grpc-timeout", "1n")], grpc_msg(b"q"), end=False)
    p.client.reset_stream(sid, 8)
    p.pump()
    drv = Driver()
    p.replay(drv, ts0=0)
    (s,) = drv.spans
    assert s.attributes["rpc.response.status_code"] == "DEADLINE_EXCEEDED"
    assert s.status_code == StatusCode.ERROR


def test_grpc_web_and_plus_proto_content_types() -> None:
    assert grpc.is_grpc("application/grpc+proto")
    assert grpc.is_grpc("application/grpc;charset=utf-8")
    assert not grpc.is_grpc("application/json")
    assert not grpc.is_grpc("application/grpc-web+proto")
    assert not grpc.is_grpc(None)


def test_helpers() -> None:
    assert grpc.parse_timeout_ns("100m") == 100_000_000
    assert grpc.parse_timeout_ns("2S") == 2_000_000_000
    assert grpc.parse_timeout_ns("123456789S") is None  # more than 8 digits
    assert grpc.parse_timeout_ns("x") is None and grpc.parse_timeout_ns("1x") is None
    assert grpc.percent_decode("a%20b%") == "a b%"
    assert grpc.percent_decode("%E2%82%AC") == "\u20ac"
    assert grpc.status_from_http(404) == grpc.UNIMPLEMENTED
    assert grpc.status_from_http(418) == grpc.UNKNOWN
    assert grpc.status_name(99) == "UNKNOWN"


def _count(chunks: list[bytes]) -> grpc.MessageCounter:
    c = grpc.MessageCounter()
    for ch in chunks:
        buf = LargeBuffer(ch)
        c.feed(buf, 0, len(ch))
    return c


def test_counter_across_frames_and_empty_messages() -> None:
    data = grpc_msg(b"") + grpc_msg(b"abc") + grpc_msg(b"") + grpc_msg(b"x" * 70000, 1)
    for step in (1, 2, 3, 5, 7, 4096, len(data)):
        c = _count([data[i:i + step] for i in range(0, len(data), step)])
        assert c.messages == 4 and not c.partial, step
    c = _count([data[:-1]])
    assert c.partial


def test_counter_bad_flag() -> None:
    c = grpc.MessageCounter()
    buf = LargeBuffer(b"\x07\0\0\0\0")
    try:
        c.feed(buf, 0, 5)
    except Malformed as e:
        assert e.reason == "bad_message_prefix"
    else:
        raise AssertionError("no error")
    assert c.broken
    c.feed(buf, 0, 5)  # broken: no more counting, no more errors


def test_bad_prefix_in_stream_is_counted_not_fatal() -> None:
    p = H2Pair()
    sid = p.request(REQ, b"\x09garbage-not-grpc")
    p.respond(sid, RESP, grpc_msg(b"ok"), [("grpc-status", "0")])
    drv = Driver()
    p.replay(drv)
    assert drv.drops == ["grpc_bad_message_prefix"]
    assert drv.spans[0].attributes["rpc.response.status_code"] == "OK"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_fuzz_counter_split_invariance(data: bytes, cuts: list[int]) -> None:
    """Any bytes, cut anywhere: same count as whole, or the same Malformed; nothing else escapes."""
    def run(chunks: list[bytes]) -> tuple[int, bool]:
        c = grpc.MessageCounter()
        try:
            for ch in chunks:
                c.feed(LargeBuffer(ch), 0, len(ch))
        except Malformed:
            return c.messages, True
        return c.messages, False

    chunks, p = [], 0
    for k in cuts:
        chunks.append(data[p:p + k])
        p += k
    chunks.append(data[p:])
    assert run([data]) == run([c for c in chunks if c])


def test_message_allocation_is_flat() -> None:
    def peak(size: int) -> int:
        p = H2Pair()
        p.server.local_settings.max_frame_size = 16384
        sid = p.request(REQ, grpc_msg(b"q"))
        p.server.send_headers(sid, RESP)
        p.pump()
        drv = Driver()
        p.replay(drv)
        body = memoryview(struct.pack(">BI", 0, size) + b"\0" * size)
        frames = []
        for i in range(0, len(body), 16384):
            part = body[i:i + 16384]
            frames.append(struct.pack(">HBBBI", len(part) >> 8, len(part) & 0xFF, 0, 0, sid))
            frames.append(part)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for f in frames:  # (no slicing here: a list copy would be counted)
            drv.feed(False, f)
        got = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        st_ = drv.session.streams[sid]
        assert st_.resp_msgs.messages == 1 and st_.resp_body == len(body)
        return got

    small = peak(100_000)
    large = peak(10_000_000)
    assert large < small + 4096, (small, large)


def test_status_unknown_is_not_guessed() -> None:
    name, attrs, status, _ = grpc.rpc_fields("/a.B/C", SpanKind.SERVER, None, None, 200, False, False, None,
                                               None, None, status_unknown=True)
    assert name == "a.B/C" and "rpc.response.status_code" not in attrs and status == StatusCode.UNSET
    assert "wirespan.grpc.request.message_count" not in attrs


def test_reply_cut_by_the_end_of_the_capture_is_incomplete_not_unavailable() -> None:
    """A server stream whose trailers never came before the capture ended: the status is not
    known, so none is reported (no UNAVAILABLE, no error), and the span says it is incomplete."""
    p = H2Pair()
    sid = p.request(REQ, grpc_msg(b"q"))
    p.server.send_headers(sid, RESP)
    for i in range(3):
        p.server.send_data(sid, grpc_msg(b"row %d" % i))
    p.pump()
    drv = Driver()
    p.replay(drv)
    drv.close(10**9)
    (s,) = drv.spans
    a = s.attributes
    assert s.name == "helloworld.Greeter/SayHello" and s.status_code == StatusCode.UNSET
    assert "rpc.response.status_code" not in a and "error.type" not in a
    assert a["wirespan.incomplete"] is True and a["wirespan.grpc.response.message_count"] == 3
    drv = Driver(perspective=Perspective.CLIENT)  # a client's view: still no error of its own
    p.replay(drv)
    drv.close(10**9)
    assert drv.spans[0].status_code == StatusCode.UNSET
    drv = Driver()  # a reset is a failure of the transport under the call
    p.replay(drv)
    drv.session.close(10**9, reset=True)
    assert drv.spans[0].attributes["rpc.response.status_code"] == "UNAVAILABLE"
