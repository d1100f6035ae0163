"""Core types and the one OTLP conversion."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from service.model import (
    EventKind,
    Resource,
    Span,
    SpanEvent,
    SpanKind,
    StatusCode,
    TcpEvent,
    new_span_id,
    new_trace_id,
    otlp_json_to_proto,
    parse_traceparent,
    spans_to_otlp,
    spans_to_otlp_dict,
    spans_to_otlp_json,
)

RES_A = Resource({"service.name": "shop", "host.name": "n1"})
RES_B = Resource({"service.name": "db", "host.name": "n1"})


def _spans() -> list[Span]:
    tp = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert tp is not None
    return [
        Span("GET", SpanKind.SERVER, 1_700_000_000_000_000_000, 1_700_000_000_001_000_000,
             {"http.request.method": "GET", "url.path": "/a", "http.response.status_code": 200,
              "server.port": 8080, "ok": True, "ratio": 0.5, "tags": ["a", "b"], "raw": b"\x00\x01"},
             RES_A, trace_id=tp[0], parent_span_id=tp[1]),
        Span("SELECT orders", SpanKind.CLIENT, 10, 20, {"db.system.name": "postgresql"},
             Resource({"service.name": "db", "host.name": "n1"}),  # equal content, other object
             status_code=StatusCode.ERROR, status_message="42P01: relation does not exist",
             events=[SpanEvent("stderr", 15, {"message": "warn"})]),
        Span("send orders", SpanKind.PRODUCER, 30, 40, {"messaging.system": "kafka"}, RES_A),
        Span("SET", SpanKind.CLIENT, 50, 60, {"huge": 1 << 70}, RES_B),
    ]


def test_protobuf_round_trip_and_grouping() -> None:
    spans = _spans()
    req = spans_to_otlp(spans)
    data = req.SerializeToString()
    back = ExportTraceServiceRequest.FromString(data)
    assert back == req
    # one ResourceSpans per distinct resource content, spans in input order within it
    assert len(back.resource_spans) == 2
    by_service = {
        {kv.key: kv.value.string_value for kv in rs.resource.attributes}["service.name"]: rs
        for rs in back.resource_spans
    }
    shop = by_service["shop"].scope_spans[0]
    assert shop.scope.name == "wirespan"
    assert [s.name for s in shop.spans] == ["GET", "send orders"]
    get = shop.spans[0]
    assert get.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert get.parent_span_id.hex() == "00f067aa0ba902b7"
    assert get.kind == SpanKind.SERVER
    attrs = {kv.key: kv.value for kv in get.attributes}
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["ok"].bool_value is True
    assert attrs["ratio"].double_value == 0.5
    assert [v.string_value for v in attrs["tags"].array_value.values] == ["a", "b"]
    assert attrs["raw"].bytes_value == b"\x00\x01"
    db = by_service["db"].scope_spans[0].spans
    assert [s.name for s in db] == ["SELECT orders", "SET"]
    assert db[0].status.code == StatusCode.ERROR
    assert db[0].status.message.startswith("42P01")
    assert db[0].events[0].name == "stderr"
    # an int beyond int64 is not silently wrapped: it becomes a string
    assert {kv.key: kv.value for kv in db[1].attributes}["huge"].string_value == str(1 << 70)


def test_otlp_json_is_the_protobuf_json_mapping() -> None:
    spans = _spans()
    line = spans_to_otlp_json(spans)
    assert "\n" not in line
    d = json.loads(line)
    s0 = d["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    # OTLP/JSON: hex ids, integer enums, 64-bit integers as decimal strings
    assert s0["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert s0["kind"] == 2
    assert s0["startTimeUnixNano"] == "1700000000000000000"
    # parsed back through google.protobuf.json_format, it is the same message
    assert otlp_json_to_proto(line) == spans_to_otlp(spans)
    # and json_format accepts the dict (with ids rewritten to base64 by otlp_json_to_proto)
    assert json_format.MessageToDict(otlp_json_to_proto(line))["resourceSpans"]
    assert spans_to_otlp_dict(spans) == d


def test_ids_are_random_and_valid() -> None:
    tids = {new_trace_id() for _ in range(1000)}
    sids = {new_span_id() for _ in range(1000)}
    assert len(tids) == 1000 and len(sids) == 1000
    assert all(len(t) == 16 and any(t) for t in tids)
    assert all(len(s) == 8 and any(s) for s in sids)


@pytest.mark.parametrize("value,ok", [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
    (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00", True),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", True),  # future version
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", False),  # v00 is exact
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", False),
    ("garbage", False),
    ("", False),
])
def test_traceparent(value: str | bytes, ok: bool) -> None:
    r = parse_traceparent(value)
    assert (r is not None) == ok
    if ok:
        assert r is not None and len(r[0]) == 16 and len(r[1]) == 8


_HEX = "0123456789abcdefABCDEF"


def _field(n: int) -> st.SearchStrategy[str]:
    valid = st.integers(1, 16 ** n - 1).map(lambda v: f"{v:0{n}x}")  # text() would favour all-zero ids
    valid = st.one_of(valid, valid.map(str.upper))
    # mostly valid hex, so the accepting path is exercised as much as the refusing ones
    return st.one_of(valid, valid, valid, st.just("0" * n), st.text(alphabet=_HEX + "g -", min_size=n, max_size=n))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["00", "00", "00", "01", "ff", "FF", "0g"]), _field(32), _field(16), _field(2),
       st.sampled_from(["-", "-", "-", "-", "_"]))
def test_traceparent_fast_path_agrees_with_the_regex(ver: str, tid_s: str, sid_s: str, fl: str, sep: str) -> None:
    """The regex-free version-00 path decides exactly as the W3C grammar (the regex) does."""
    import re
    from binascii import unhexlify

    value = f"{ver}-{tid_s}{sep}{sid_s}-{fl}"
    m = re.fullmatch(r"([0-9a-fA-F]{2})-([0-9a-fA-F]{32})-([0-9a-fA-F]{16})-([0-9a-fA-F]{2})", value)
    want = None
    if m and m.group(1).lower() != "ff":
        tid, sid = unhexlify(m.group(2)), unhexlify(m.group(3))
        if any(tid) and any(sid):
            want = (tid, sid, int(m.group(4), 16))
    assert parse_traceparent(value) == want
    assert parse_traceparent(value.encode()) == want


def test_tcp_event_and_span_are_slotted() -> None:
    ev = TcpEvent(EventKind.DATA, 1, "::1", 5000, "::1", 80, 1, memoryview(b"x"))
    sp = Span("x", SpanKind.INTERNAL, 0, 1)
    for obj in (ev, sp):
        assert not hasattr(obj, "__dict__")
        with pytest.raises(AttributeError):
            obj.nope = 1  # type: ignore[attr-defined]
    assert "DATA" in repr(ev)
    assert sp.duration_ns == 1 and sp.parent_span_id == b""


def test_resource_equality_by_content() -> None:
    a = Resource({"service.name": "x", "k": [1, 2]})
    b = Resource({"k": [1, 2], "service.name": "x"})
    assert a == b and hash(a) == hash(b)
    assert a.merged({"service.name": "y"}).attributes["service.name"] == "y"
    assert a.attributes["service.name"] == "x"


def _tricky_spans() -> list[Span]:
    res = Resource({"service.name": "x\u00e9", "n": 3})
    return [
        Span(f'GET "{i}"', SpanKind.SERVER, 1 + i, 2 + i,
             {"s": f"/p/{i}\n\u00e9\"\\", "i": i, "neg": -i - 1, "b": bool(i % 2), "one": 1, "f": 0.25,
              "big": 1 << 64, "l": ["a", 1, True], "m": {"k": "v"}, "raw": b"\xff"},
             res, status_code=i % 3, status_message="boom\t" if i % 4 == 0 else "",
             parent_span_id=new_span_id() if i % 2 else b"", trace_state="k=v" if i == 3 else "",
             events=[SpanEvent("stderr", 7, {"message": "x"})] if i % 5 == 0 else None)
        for i in range(50)
    ]


def test_direct_protobuf_encoding_is_byte_identical() -> None:
    from service.model import spans_to_otlp_bytes
    spans = _tricky_spans()
    for _ in range(2):  # the second pass hits the attribute cache
        data = spans_to_otlp_bytes(spans)
        assert data == spans_to_otlp(spans).SerializeToString()
        assert ExportTraceServiceRequest.FromString(data) == spans_to_otlp(spans)


def test_bool_and_int_attributes_do_not_share_cache_entries() -> None:
    from service.model import spans_to_otlp_bytes
    a = Span("a", SpanKind.CLIENT, 0, 1, {"k": 1})
    b = Span("b", SpanKind.CLIENT, 0, 1, {"k": True})
    req = ExportTraceServiceRequest.FromString(spans_to_otlp_bytes([a, b]))
    vals = [s.attributes[0].value for s in req.resource_spans[0].scope_spans[0].spans]
    assert vals[0].WhichOneof("value") == "int_value"
    assert vals[1].WhichOneof("value") == "bool_value"
    j = json.loads(spans_to_otlp_json([a, b]))
    got = [s["attributes"][0]["value"] for s in j["resourceSpans"][0]["scopeSpans"][0]["spans"]]
    assert got == [{"intValue": "1"}, {"boolValue": True}]


def test_fast_json_equals_dict_form() -> None:
    spans = _tricky_spans()
    for _ in range(2):
        line = spans_to_otlp_json(spans)
        assert json.loads(line) == spans_to_otlp_dict(spans)
        assert otlp_json_to_proto(line) == spans_to_otlp(spans)


# -- the C span encoder (service/_otlp.c) against the Python one ------------------------
_scalar = st.one_of(
    st.text(max_size=40),  # any code point, surrogates included (Python's surrogatepass path)
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False),
    st.binary(max_size=8),
)
_value = st.one_of(_scalar, st.lists(_scalar, max_size=3), st.dictionaries(st.text(max_size=5), _scalar, max_size=2))
#: What the C encoder writes itself (most spans); the rest it hands to the Python encoder.
_c_scalar = st.one_of(st.text(max_size=40), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
                      st.floats(allow_nan=False))
_c_value = st.one_of(_c_scalar, _c_scalar, st.lists(_c_scalar, max_size=4), st.tuples(_c_scalar, _c_scalar),
                     st.lists(st.just("x"), min_size=63, max_size=66))  # the C writer's array bound (64)


@st.composite
def _any_span(draw: st.DrawFn) -> Span:
    simple = draw(st.booleans())
    return Span(
        draw(st.text(max_size=30)),
        draw(st.one_of(st.sampled_from(list(SpanKind)), st.integers(0, 300))),
        draw(st.integers(0, (1 << 64) - 1)),
        draw(st.integers(0, (1 << 64) - 1)),
        draw(st.dictionaries(st.text(max_size=20), _c_value if simple else _value, max_size=6)),
        trace_id=draw(st.binary(min_size=16, max_size=16)),
        span_id=draw(st.binary(min_size=8, max_size=8)),
        parent_span_id=draw(st.sampled_from([b"", b"\x01" * 8])),
        status_code=draw(st.one_of(st.sampled_from(list(StatusCode)), st.integers(0, 300))),
        status_message=draw(st.text(max_size=10)),
        events=None if simple else draw(st.one_of(st.none(), st.just([]), st.just([SpanEvent("e", 5, {"k": "v"})]))),
        trace_state=draw(st.sampled_from(["", "k=v"])),
        flags=draw(st.integers(-(1 << 66), 1 << 66)),
    )


def _c_encoder() -> Any:
    """The C span encoder, imported directly (also under WIRESPAN_PURE_PYTHON, to compare)."""
    import importlib

    from service import speedups
    try:
        return importlib.import_module("service._otlp").span_fields
    except ImportError:
        if speedups.REQUIRED:
            raise
        pytest.skip("service._otlp is not built (no C compiler or Python headers); the Python encoder is in use")


def _both_encoders(spans: list[Span]) -> tuple[Any, Any]:
    """(C result, Python result); either may be an exception (type), compared as such."""
    import service.model as m

    def run() -> Any:
        try:
            return m.spans_to_otlp_bytes(spans)
        except Exception as e:  # the two must fail alike
            return type(e)

    saved = m._c_span_fields
    try:
        m._c_span_fields = _c_encoder()
        c = run()
        m._c_span_fields = None
        py = run()
    finally:
        m._c_span_fields = saved
    return c, py


@settings(max_examples=300, deadline=None)
@given(st.lists(_any_span(), max_size=5))
def test_c_span_encoder_matches_python(spans: list[Span]) -> None:
    c, py = _both_encoders(spans)
    assert c == py


def test_c_span_encoder_writes_arrays_of_scalars_itself() -> None:
    """A list attribute (MQTT's topic filters) is the C encoder's, not the fallback's; the bytes
    are Python's, and the official messages read the array back."""
    import service.model as m
    called: list[Span] = []

    def fallback(s: Span) -> bytes:
        called.append(s)
        return m._span_bytes(s)

    flat = Span("sub", SpanKind.CLIENT, 1, 2, {"f": ["a/#", "b/+"], "t": ("x", 1, True, 2.5), "e": []},
                trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    assert _c_encoder()([flat], fallback) == b"\x12" + m._varint(len(m._span_bytes(flat))) + m._span_bytes(flat)
    assert not called
    for odd in ([["a"]], ["x"] * 65, [b"raw"]):  # nested, over the bound, bytes: Python's
        _c_encoder()([Span("n", SpanKind.CLIENT, 1, 2, {"f": odd})], fallback)
    assert len(called) == 3
    c, py = _both_encoders([flat])
    assert c == py
    req = m._pb()[0].ExportTraceServiceRequest.FromString(c)
    vals = {kv.key: kv.value for kv in req.resource_spans[0].scope_spans[0].spans[0].attributes}
    assert [v.string_value for v in vals["f"].array_value.values] == ["a/#", "b/+"]
    assert vals["t"].array_value.values[3].double_value == 2.5 and not vals["e"].array_value.values


def test_c_span_encoder_on_the_tricky_spans_and_big_bodies() -> None:
    spans = _tricky_spans()
    # bodies whose length varint is 1, 2, 3 and 4 bytes (the C writer reserves 3 and moves)
    for n in (10, 200, 20_000, 3_000_000):
        spans.append(Span("big", SpanKind.CLIENT, 1, 2, {"v": "x" * n}))
    c, py = _both_encoders(spans)
    assert isinstance(c, bytes) and c == py
    assert ExportTraceServiceRequest.FromString(c) == spans_to_otlp(spans)


def test_c_span_encoder_fails_like_python_on_odd_objects() -> None:
    class Boom:
        def __bool__(self) -> bool:
            raise RuntimeError("no truth")

    odd = [Span("e", SpanKind.CLIENT, 1, 2, events=Boom()),  # type: ignore[arg-type]
           Span("neg", SpanKind.CLIENT, -1, 2), Span(b"bytes name", SpanKind.CLIENT, 1, 2),  # type: ignore[arg-type]
           Span("id", SpanKind.CLIENT, 1, 2, trace_id=b"short")]
    for s in odd:
        c, py = _both_encoders([s])
        assert c == py, s.name


def test_c_span_encoder_writes_the_usual_span_itself() -> None:
    """The protocols' spans (scalar attributes, no events) never reach the Python fallback:
    a C function that handed every span back would pass the equivalence tests above."""
    spans = [s for s in _tricky_spans() if not s.events]
    for s in spans:
        for k in ("l", "m", "raw", "big"):  # non-scalar and beyond-int64 values: Python's to write
            s.attributes.pop(k)

    def refuse(span: Span) -> bytes:
        raise AssertionError(f"fell back for {span!r}")

    fields = _c_encoder()(spans, refuse)
    import service.model as m
    assert fields == b"".join(b"\x12" + m._varint(len(b)) + b for b in map(m._span_bytes, spans))


# -- the C OTLP/JSON writer (service/_otlp.c json_spans) against _json_span --------------
def _c_json() -> Any:
    import importlib

    from service import speedups
    try:
        return importlib.import_module("service._otlp").json_spans
    except ImportError:
        if speedups.REQUIRED:
            raise
        pytest.skip("service._otlp is not built (no C compiler or Python headers); the Python writer is in use")


def _both_json(spans: list[Span]) -> tuple[Any, Any]:
    """(C line, Python line) of ``spans_to_otlp_json``; either may be an exception type."""
    import service.model as m

    def run() -> Any:
        try:
            return m.spans_to_otlp_json(spans)
        except Exception as e:  # the two must fail alike
            return type(e)

    saved = m._c_json_spans
    try:
        m._c_json_spans = _c_json()
        c = run()
        m._c_json_spans = None
        py = run()
    finally:
        m._c_json_spans = saved
    return c, py


_json_scalar = st.one_of(_c_value, st.floats(), st.text(alphabet=st.characters(max_codepoint=0x20), max_size=8),
                         st.sampled_from(["\ud800", "a\udfffb", '"\\\x7f\x00\x1f'])).filter(lambda v: v is not None)


#: Attribute values: scalars, and arrays of them (the C writer's), tuples and nested arrays (nested: Python's).
_json_attr = st.one_of(_json_scalar, _json_scalar, st.lists(_json_scalar, max_size=4),
                       st.tuples(_json_scalar, _json_scalar), st.lists(st.lists(_json_scalar, max_size=2), max_size=2))


@st.composite
def _json_span_st(draw: st.DrawFn) -> Span:
    s = draw(_any_span())
    if draw(st.booleans()):  # controls, surrogates, NaN and friends in the attributes the C side writes
        s.attributes = draw(st.dictionaries(st.text(max_size=6), _json_attr, max_size=5))
    if draw(st.booleans()):
        s.name = draw(_json_scalar.filter(lambda v: isinstance(v, str)))
    return s


@settings(max_examples=400, deadline=None)
@given(st.lists(_json_span_st(), max_size=5))
def test_c_json_writer_matches_python(spans: list[Span]) -> None:
    c, py = _both_json(spans)
    assert c == py


def test_c_json_writer_writes_arrays_of_scalars_itself() -> None:
    """A list attribute (MQTT's topic filters) is the C writer's, not the fallback's; a nested
    list is the fallback's; the text is Python's either way."""
    called: list[Span] = []

    def fallback(s: Span) -> str:
        called.append(s)
        return m._json_span(s)

    flat = Span("sub", SpanKind.CLIENT, 1, 2, {"f": ["a/#", "b/+"], "t": ("x", 1, True, 2.5), "e": []})
    nested = Span("n", SpanKind.CLIENT, 1, 2, {"f": [["a"]]})
    import service.model as m
    assert _c_json()([flat], fallback) == m._json_span(flat) and not called
    _c_json()([nested], fallback)
    assert called == [nested]
    c, py = _both_json([flat, nested])
    assert c == py and '"arrayValue":{"values":[{"stringValue":"a/#"},{"stringValue":"b/+"}]}' in c


def test_c_json_writer_on_the_tricky_spans_and_odd_objects() -> None:
    spans = [*_tricky_spans(), Span("big", SpanKind.CLIENT, 1, 2, {"v": "x\n" * 300_000})]
    c, py = _both_json(spans)
    assert isinstance(c, str) and c == py
    odd = [Span("neg", SpanKind.CLIENT, -1, -(1 << 70)), Span(b"bytes", SpanKind.CLIENT, 1, 2),  # type: ignore[arg-type]
           Span("id", SpanKind.CLIENT, 1, 2, trace_id=b"short"), Span("k", 1 << 70, 1, 2),
           Span("m", SpanKind.CLIENT, 1, 2, status_message=b"x"),  # type: ignore[arg-type]
           Span("e", SpanKind.CLIENT, 1, 2, {1: "int key", "s": "\udc80"}),  # type: ignore[dict-item]
           Span("\udc80", SpanKind.CLIENT, 1, 2, events=[])]
    for s in odd:
        c, py = _both_json([s])
        assert c == py, s.name


def test_c_json_writer_writes_the_usual_span_itself() -> None:
    """The protocols' spans never reach the Python fallback (a C function that handed every
    span back would pass the tests above)."""
    spans = [s for s in _tricky_spans() if not s.events and not s.trace_state]
    for s in spans:
        for k in ("l", "m", "raw", "big"):
            s.attributes.pop(k)

    def refuse(span: Span) -> str:
        raise AssertionError(f"fell back for {span!r}")

    import service.model as m
    assert _c_json()(spans, refuse) == ",".join(m._json_span(s) for s in spans)
