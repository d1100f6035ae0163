"""processors/protocols/processor.py: config, detection, roles, limits, errors, perspectives.

Events are built by hand here (the stage's input type is TcpEvent); the
end-to-end path from real captures is in tests/test_http_real.py.
"""

from __future__ import annotations

import os
import sys
import threading
import types

import pytest
from pydantic import ValidationError

import processors.protocols as protocols
from processors.protocols.base import Detection, ProtocolSettings, Session
from processors.protocols.errors import Malformed
from processors.protocols.processor import Config, ProtocolsProcessor, parse_duration
from service.model import EventKind, SpanKind, StatusCode, TcpEvent
from service.telemetry import CONNECTIONS_EVICTED, PARSER_MESSAGES
from tests.support.driver import pieces

C = ("10.0.0.1", 40000)
S = ("10.0.0.2", 8080)
REQ = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Sink:
    def __init__(self) -> None:
        self.calls: list[list] = []

    def consume_spans(self, spans: list) -> None:
        self.calls.append(list(spans))

    @property
    def spans(self) -> list:
        return [s for c in self.calls for s in c]


def ev(kind: EventKind, from_client: bool, data: bytes = b"", ts: int = 1_000, cid: object = 1,
       client: tuple[str, int] = C, server: tuple[str, int] = S, **kw: object) -> TcpEvent:
    a, b = (client, server) if from_client else (server, client)
    return TcpEvent(kind, cid, a[0], a[1], b[0], b[1], ts, memoryview(data) if data else None, **kw)


def data(from_client: bool, payload: bytes, ts: int = 1_000, **kw: object) -> TcpEvent:
    return ev(EventKind.DATA, from_client, payload, ts, **kw)


def metric(protocol: str, result: str) -> float:
    return PARSER_MESSAGES.labels(protocol=protocol, result=result)._value.get()


def stage(cfg: dict | None = None) -> tuple[ProtocolsProcessor, Sink]:
    sink = Sink()
    return ProtocolsProcessor("protocols", cfg or {"enabled": ["http"]}, sink), sink


# -- config --------------------------------------------------------------------------------
def test_config_defaults_and_validation() -> None:
    c = Config()
    assert c.enabled is None and c.default_service_name == "unknown_service"
    assert Config.model_validate({"idle_timeout": "5m"}).idle_timeout == 300.0
    assert parse_duration("200ms") == 0.2
    with pytest.raises(ValidationError, match="extra"):
        Config.model_validate({"enabeld": ["http"]})  # typo
    with pytest.raises(ValidationError, match="unknown protocol"):
        Config.model_validate({"enabled": ["htp"]})
    with pytest.raises(ValidationError):
        Config.model_validate({"http": {"max_headers": 0}})
    with pytest.raises(ValidationError, match="max_header: Extra inputs"):  # the path is kept
        Config.model_validate({"http": {"max_header": 10}})
    with pytest.raises(ValidationError, match="at least one"):
        Config.model_validate({"service_name": [{"name": "x"}]})
    with pytest.raises(ValidationError):
        Config.model_validate({"service_name": [{"address": "10.0.0.300/8", "name": "x"}]})
    c = Config.model_validate({"http": {"max_headers": 50, "ports": [9999]}})
    assert c.protocol_settings("http").max_headers == 50


def test_unavailable_protocol_is_skipped_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(protocols.PROTOCOLS, "nosuch", "processors.protocols.nosuch_module")
    monkeypatch.delitem(protocols._cache, "nosuch", raising=False)
    p, _ = stage({"enabled": ["http", "nosuch"]})
    assert p.protocols == ["http"]


# -- the basic path --------------------------------------------------------------------------
def test_spans_batched_once_per_call_and_stats() -> None:
    p, sink = stage()
    ok0 = metric("http", "ok")
    p.consume_events([data(True, REQ + REQ, 1000), data(False, RESP, 2000), data(False, RESP, 3000)])
    assert len(sink.calls) == 1 and len(sink.calls[0]) == 2
    s = sink.spans[0]
    assert s.kind == SpanKind.SERVER and s.resource.attributes["service.name"] == "unknown_service"
    assert (s.start_ns, s.end_ns) == (1000, 2000)
    assert p.stats["spans"] == 2 and p.stats["connections"] == 1 and p.stats["protocols"] == {"http": 1}
    assert metric("http", "ok") == ok0 + 2
    p.consume_events([])
    assert len(sink.calls) == 1  # nothing to send: no call


def test_detection_from_response_first_and_roles_from_receiver() -> None:
    # The response is seen first (capture started mid-way): the sender is the server.
    p, sink = stage()
    p.consume_events([data(False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), data(True, REQ),
                      data(False, RESP)])
    assert len(sink.spans) == 1
    assert sink.spans[0].attributes["client.address"] == C[0]
    # The receiver says who connected: that wins.
    p2, sink2 = stage()
    p2.consume_events([ev(EventKind.OPEN, True, client_is_src=True), data(True, REQ, client_is_src=True),
                       data(False, RESP, client_is_src=False)])
    assert sink2.spans[0].attributes["client.port"] == C[1]


def test_garbage_gives_no_span_and_a_counted_drop() -> None:
    p, sink = stage({"enabled": ["http"], "max_detect_bytes": 1024})
    before = metric("none", "undetected")
    junk = bytes(range(256)) * 2
    p.consume_events([data(True, junk, ts=1000 + i) for i in range(4)])
    p.consume_events([data(True, REQ), data(False, RESP)])  # later bytes are ignored too
    assert sink.spans == []
    assert p.stats["drops"]["undetected"] == 1
    assert metric("none", "undetected") == before + 1


def test_garbage_then_close_is_counted_and_skipped_prefix_too() -> None:
    p, sink = stage()
    p.consume_events([data(True, b"\x16\x03\x01garbage"), ev(EventKind.RESET, True, ts=2_000)])
    assert p.stats["drops"]["undetected"] == 1 and len(p._conns) == 0
    # Joined mid-connection: a body tail, then a real exchange; the tail is counted, the exchange kept.
    p.consume_events([data(False, b"}]} end of some body", cid=2), data(True, REQ, cid=2), data(False, RESP, cid=2)])
    assert p.stats["drops"]["undetected"] == 2 and len(sink.spans) == 1


def test_joined_after_the_first_message_a_later_segment_starts_the_protocol() -> None:
    """A capture of MySQL started after the greeting: the client's login comes first, which
    no detector takes for MySQL's start but PostgreSQL and Redis take for the start of a long
    message. The next segments are each tried alone, so the query is still traced (before,
    the connection waited on those two until max_detect_bytes and was lost)."""
    from tests.support.exchanges import EXCHANGES
    ex = EXCHANGES["mysql"][0](300)
    srv = ("10.0.0.2", 3306)
    for client_known in (False, True):
        p, sink = stage({"max_detect_bytes": 65536})
        evs = [data(c, b, ts=1_000 + i, server=srv, **({"client_is_src": c} if client_known else {}))
               for i, (c, b) in enumerate(ex.steps[1:])]
        p.consume_events(evs)
        p.shutdown()
        assert [s.name for s in sink.spans] == ["SELECT orders"], (client_known, p.stats)
        assert p.stats["drops"] == {"undetected": 1}  # the login and its OK, counted once
    # A port-named protocol still waiting keeps the connection: a long first MySQL command in
    # three segments, the middle one alone an HTTP request, stays MySQL.
    p, sink = stage({"max_detect_bytes": 65536})
    q = b"\x03SELECT '" + b"x" * 40 + b"\nGET / HTTP/1.1\r\n\r\n' AS a"
    pkt = len(q).to_bytes(3, "little") + b"\x00" + q
    c1, c2 = pkt.index(b"GET /"), pkt.index(b"' AS a")
    ok = b"\x07\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00"
    p.consume_events([data(True, pkt[:c1], server=srv), data(True, pkt[c1:c2], ts=1_001, server=srv),
                      data(True, pkt[c2:], ts=1_002, server=srv), data(False, ok, ts=1_003, server=srv)])
    p.shutdown()
    assert [s.name for s in sink.spans] == ["SELECT"] and p.stats["drops"] == {}, p.stats


def test_port_hint_only_orders_detection() -> None:
    # HTTP on an unusual port is still detected by content.
    p, sink = stage()
    srv = ("10.0.0.2", 5432)
    p.consume_events([data(True, REQ, server=srv), data(False, RESP, server=srv)])
    assert len(sink.spans) == 1 and sink.spans[0].attributes["server.port"] == 5432


def test_protocol_errors_counted_then_connection_abandoned() -> None:
    p, sink = stage({"enabled": ["http"], "max_consecutive_errors": 2})
    before = metric("http", "bad_request_line")
    ev0 = CONNECTIONS_EVICTED.labels(component="protocols", reason="too_many_errors")._value.get()
    p.consume_events([data(True, REQ), data(False, RESP)])
    p.consume_events([data(True, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")])
    assert p.stats["drops"]["http:bad_header"] == 1
    p.consume_events([data(True, b"GET x\r\n\r\n")])  # resync: not a request line, dropped quietly
    p.consume_events([data(True, b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")])
    assert p.stats["drops"]["http:bad_content_length"] == 1
    assert CONNECTIONS_EVICTED.labels(component="protocols", reason="too_many_errors")._value.get() == ev0 + 1
    p.consume_events([data(True, REQ), data(False, RESP)])
    assert len(sink.spans) == 1  # abandoned: later exchanges on it are ignored
    assert metric("http", "bad_request_line") == before


def test_gap_event_resyncs() -> None:
    p, sink = stage()
    # 50 bytes lost where only 8 of the body remain: the place is lost, resync
    p.consume_events([data(True, REQ), data(False, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab"),
                      ev(EventKind.GAP, False, gap=50), data(False, b"xyz"),
                      data(True, REQ), data(False, RESP)])
    assert len(sink.spans) == 1 and p.stats["drops"]["http:gap"] == 1


def test_gap_inside_a_content_length_body_is_stepped_over() -> None:
    """eBPF's message cap loses the middle of big bodies: the exchange stays whole."""
    p, sink = stage()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n"
    upload = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    p.consume_events([data(True, REQ, ts=1_000), data(False, head + b"a" * 1000, ts=2_000),
                      ev(EventKind.GAP, False, gap=198_000, ts=3_000), data(False, b"z" * 1000, ts=4_000),
                      data(True, upload + b"u" * 500, ts=5_000), ev(EventKind.GAP, True, gap=99_500, ts=6_000),
                      data(False, RESP, ts=7_000), data(True, REQ, ts=8_000), data(False, RESP, ts=9_000)])
    get, post, again = sink.spans
    assert get.attributes["http.response.body.size"] == 200_000 and get.end_ns == 4_000
    assert post.attributes["http.request.body.size"] == 100_000
    assert again.attributes["url.path"] == get.attributes["url.path"]
    assert p.stats["drops"].get("http:gap_skipped") == 2 and "http:gap" not in p.stats["drops"]


def test_message_limit_clears_direction() -> None:
    p, sink = stage({"enabled": ["http"], "max_message_bytes": 1024, "http": {"max_header_bytes": 65536}})
    p.consume_events([data(True, REQ), data(False, RESP), data(True, b"GET / HTTP/1.1\r\nX: " + b"a" * 2000)])
    assert p.stats["drops"]["http:message_too_large"] == 1
    p.consume_events([data(True, REQ), data(False, RESP)])
    assert len(sink.spans) == 2


def test_reset_and_close_end_connections() -> None:
    p, sink = stage()
    p.consume_events([data(True, REQ), data(False, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"),
                      ev(EventKind.RESET, False, ts=5000)])
    (s,) = sink.spans
    assert s.status_code == StatusCode.ERROR and s.attributes["error.type"] == "connection_reset"
    assert len(p._conns) == 0
    # Close-delimited body: the server's FIN ends it.
    p2, sink2 = stage()
    p2.consume_events([data(True, b"GET / HTTP/1.0\r\n\r\n"), data(False, b"HTTP/1.0 200 OK\r\n\r\nbody"),
                       ev(EventKind.CLOSE, False, ts=6000)])
    assert sink2.spans[0].attributes["http.response.body.size"] == 4
    p2.consume_events([ev(EventKind.CLOSE, True, ts=6001)])
    assert len(p2._conns) == 0


def test_shutdown_flushes_open_connections() -> None:
    p, sink = stage()
    p.consume_events([data(True, b"GET / HTTP/1.0\r\n\r\n"), data(False, b"HTTP/1.0 200 OK\r\n\r\nbody")])
    assert sink.spans == []
    p.shutdown()
    assert len(sink.spans) == 1


def test_lru_and_idle_eviction_are_counted() -> None:
    p, _ = stage({"enabled": ["http"], "max_connections": 2, "idle_timeout": "10s"})
    for i in range(3):
        p.consume_events([data(True, REQ, cid=i, client=("10.0.0.1", 1000 + i))])
    assert len(p._conns) == 2 and p.stats["drops"]["evicted:max_connections"] == 1
    assert p.stats["drops"]["http:unanswered"] == 1
    p.consume_events([data(True, REQ, ts=60 * 10**9, cid=9, client=("10.0.0.1", 9))])
    # cid 9 pushed one more out by LRU; the sweep expired the last idle one.
    assert p.stats["drops"]["evicted:max_connections"] == 2
    assert p.stats["drops"]["evicted:idle_timeout"] == 1
    assert list(p._conns) == [9]


def test_service_name_rules() -> None:
    cfg = {"enabled": ["http"], "service_name": [
        {"port": 9090, "name": "metrics"}, {"address": "10.0.0.0/24", "name": "shop"}],
        "default_service_name": "other"}
    p, sink = stage(cfg)
    p.consume_events([data(True, REQ), data(False, RESP),
                      data(True, REQ, cid=2, server=("10.0.0.5", 9090)),
                      data(False, RESP, cid=2, server=("10.0.0.5", 9090)),
                      data(True, REQ, cid=3, server=("192.168.1.1", 80)),
                      data(False, RESP, cid=3, server=("192.168.1.1", 80))])
    assert [s.resource.attributes["service.name"] for s in sink.spans] == ["shop", "metrics", "other"]


def test_ebpf_perspectives_and_process_resource() -> None:
    """One process's view: egress requests -> CLIENT span; egress responses -> SERVER span."""
    p, sink = stage()
    kw = {"pid": 42, "comm": "curl"}
    p.consume_events([data(True, REQ, cid=(42, 1), egress=True, **kw),
                      data(False, b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", cid=(42, 1), egress=False, **kw)])
    kw2 = {"pid": 7, "comm": "nginx"}
    p.consume_events([data(True, REQ, cid=(7, 1), egress=False, **kw2),
                      data(False, RESP, cid=(7, 1), egress=True, **kw2)])
    c, s = sink.spans
    assert c.kind == SpanKind.CLIENT and c.status_code == StatusCode.ERROR
    assert c.resource.attributes["service.name"] == "curl"
    assert c.resource.attributes["process.pid"] == 42
    assert c.resource.attributes["process.executable.name"] == "curl"
    assert s.kind == SpanKind.SERVER and s.resource.attributes["service.name"] == "nginx"


def test_upgrade_to_unavailable_or_websocket_is_counted() -> None:
    p, sink = stage()
    before = metric("http", "upgraded")
    p.consume_events([
        data(True, b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
        data(False, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"),
        data(True, b"\x81\x85abcdefghi")])
    assert len(sink.spans) == 1 and metric("http", "upgraded") == before + 1
    assert p.stats["drops"]["http:upgraded"] == 1


def _fake_module(name: str, feed: object) -> types.ModuleType:
    mod = types.ModuleType(f"fake_{name}")

    class S(Session):
        protocol = name

        def feed(self, from_client, buf, ts_ns):  # type: ignore[override]
            feed(self, from_client, buf, ts_ns)  # type: ignore[operator]

    mod.NAME = name  # type: ignore[attr-defined]
    mod.DEFAULT_PORTS = frozenset()  # type: ignore[attr-defined]
    mod.Settings = ProtocolSettings  # type: ignore[attr-defined]
    mod.detect = lambda buf, fc: Detection.REQUEST if len(buf) and buf.u8_at(0) == 0x5A else Detection.NO  # type: ignore[attr-defined]
    mod.Session = S  # type: ignore[attr-defined]
    return mod


def test_internal_errors_never_escape(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def boom(self, fc, buf, ts):
        raise KeyError("bug")

    monkeypatch.setitem(protocols.PROTOCOLS, "zz", "fake_zz")
    monkeypatch.setitem(protocols._cache, "zz", _fake_module("zz", boom))
    p, sink = stage({"enabled": ["zz", "http"]})
    before = metric("zz", "internal_error")
    p.consume_events([data(True, b"Z1", cid=1), data(True, b"Z2", cid=2), data(True, REQ, cid=3),
                      data(False, RESP, cid=3)])
    assert metric("zz", "internal_error") == before + 2
    assert len(sink.spans) == 1  # other connections unaffected
    assert sum("internal error" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_a_detector_that_raises_is_counted_logged_once_and_skipped(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """detect and detect_datagram alike: a bug in one protocol's detector costs it an
    internal_error a call, one log line a protocol, and nothing else (the next is asked)."""
    mod = _fake_module("zy", lambda *a: None)

    def bad(*_a: object) -> Detection:
        raise ValueError("detector bug")

    mod.detect = bad  # type: ignore[attr-defined]
    mod.detect_datagram = bad  # type: ignore[attr-defined]
    monkeypatch.setitem(protocols.PROTOCOLS, "zy", "fake_zy")
    monkeypatch.setitem(protocols._cache, "zy", mod)
    p, sink = stage({"enabled": ["zy", "http", "dns"]})
    before = metric("zy", "internal_error")
    srv = ("10.0.0.2", 7777)  # no protocol's port: zy is asked before HTTP
    p.consume_events([data(True, REQ, cid=1, server=srv), data(False, RESP, cid=1, server=srv),
                      data(True, REQ, cid=2, server=srv), data(False, RESP, cid=2, server=srv)])
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01"
    p.consume_events([TcpEvent(EventKind.DATAGRAM, 9, "10.0.0.1", 40001, "10.0.0.2", 7777, 2_000, memoryview(q))])
    assert len(sink.spans) == 2  # HTTP still detected after the raising detector
    assert metric("zy", "internal_error") == before + 3
    logged = [r.getMessage() for r in caplog.records if "raised (logged once)" in r.getMessage()]
    assert logged == ["protocols: zy.detect raised (logged once)"]  # once a protocol, either kind


def test_protocol_error_from_fake_module_counts_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def bad(self, fc, buf, ts):
        raise Malformed("yy", "weird")

    monkeypatch.setitem(protocols.PROTOCOLS, "yy", "fake_yy")
    monkeypatch.setitem(protocols._cache, "yy", _fake_module("yy", bad))
    p, _ = stage({"enabled": ["yy"]})
    p.consume_events([data(True, b"Z1")])
    assert p.stats["drops"]["yy:weird"] == 1


def test_thread_safety() -> None:
    p, sink = stage()

    def run(base: int) -> None:
        for i in range(200):
            cid = base + i
            cl = ("10.0.0.1", cid % 60000 + 1)
            p.consume_events([data(True, REQ, cid=cid, client=cl), data(False, RESP, cid=cid, client=cl)])

    ts = [threading.Thread(target=run, args=(k * 1000,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(sink.spans) == 800 and p.stats["spans"] == 800


def test_h2c_upgrade_hands_buffers_to_http2_when_available() -> None:
    """HTTP/1.1 Upgrade: h2c -> 101 -> the http2 module's session gets the remaining bytes."""
    from tests.support.exchanges import h2c_upgrade

    assert protocols.load("http2") is not None, "processors/protocols/http2.py must import"

    p, sink = stage({"enabled": ["http", "http2"]})
    p.consume_events([data(fc, b) for fc, b in h2c_upgrade()])
    # The upgraded request is answered on HTTP/2 stream 1: one span, made by the http2 session.
    (span,) = sink.spans
    assert span.attributes["url.path"] == "/h2" and span.attributes["http.response.status_code"] == 200
    assert span.attributes["network.protocol.version"] == "2"
    assert p.stats.get("switched") == {"http->http2": 1}
    st = next(iter(p._conns.values()))
    assert st.conn.protocol == "http2" and type(st.session).__module__ == "processors.protocols.http2"


def test_module_has_no_stale_import() -> None:
    assert "processors.protocols.processor" in sys.modules


# -- fuzz: whatever the events, nothing escapes and state stays bounded ------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PAYLOADS = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([REQ, RESP, b"HTTP/1.1 101 S\r\nUpgrade: h2c\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                     b"GET / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
                     b"*1\r\n$4\r\nPING\r\n", b"+OK\r\n", b"Q\x00\x00\x00\x0dSELECT 1;\x00"]),
)
_EVENTS = st.lists(st.tuples(st.sampled_from([EventKind.DATA] * 6 + [EventKind.GAP, EventKind.CLOSE,
                                                                     EventKind.RESET, EventKind.OPEN]),
                             st.integers(0, 2), st.booleans(), _PAYLOADS), max_size=40)


@given(_EVENTS)
@settings(max_examples=int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_events_never_escape(steps: list) -> None:
    p, sink = stage({"max_connections": 2})  # every available protocol
    ts = 1_000
    for kind, cid, from_client, payload in steps:
        ts += 1_000
        client = ("10.0.0.1", 40000 + cid)
        p.consume_events([ev(kind, from_client, payload if kind == EventKind.DATA else b"", ts, cid=cid,
                             client=client, gap=5 if kind == EventKind.GAP else 0)])
    p.shutdown()
    assert len(p._conns) <= 2
    assert p.stats["spans"] == len(sink.spans)


def _stage_alloc(body_size: int) -> int:
    import tracemalloc

    body = bytes(body_size)
    seg = 16384
    head = b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % body_size
    events = [data(True, head, 2_000)]
    events += [data(True, body[i:i + seg], 3_000 + i) for i in range(0, body_size, seg)]
    events += [data(False, RESP, 10**9)]
    p, sink = stage()
    p.consume_events([data(True, REQ, 1_000), data(False, RESP, 1_500)])  # warm: detection, resources
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for i in range(0, len(events), 8):
            p.consume_events(events[i:i + 8])
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert sink.spans[-1].attributes["http.request.body.size"] == body_size
    return peak


def test_stage_allocation_flat_when_body_grows_100x() -> None:
    """Bodies pass through the stage without being held: a 100x body allocates about the same."""
    small = _stage_alloc(64 * 1024)
    large = _stage_alloc(6400 * 1024)
    assert large < small * 1.5 + 8192, (small, large)


# -- Session.feed_whole: the buffer-less path decides exactly as the buffered one ---------------
_WHOLE_REQS = [
    b"GET /a?q=1 HTTP/1.1\r\nHost: h:81\r\nUser-Agent: ua\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /u HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /bad HTTP/1.1\r\nHo st: x\r\n\r\n",
    b"PUT /t HTTP/1.0\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
    b"garbage\r\n\r\n",
]
_WHOLE_RESPS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope!extra",
    b"HTTP/1.0 200 OK\r\n\r\nclose-delimited",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
]


def _http_results() -> dict[str, float]:
    """Every ``wirespan_parser_messages{protocol="http"}`` count, by result."""
    return {smp.labels["result"]: smp.value for fam in PARSER_MESSAGES.collect() for smp in fam.samples
            if smp.name.endswith("_total") and smp.labels.get("protocol") == "http"}


def _run_stage(segments: list[tuple[bool, bytes]], whole: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    from processors.protocols import http1
    with monkeypatch.context() as m:
        if not whole:
            m.setattr(http1.Http1Session, "feed_whole", None)
        before = _http_results()
        p, sink = stage()
        for i, (fc, payload) in enumerate(segments):
            p.consume_events([data(fc, payload, ts=1_000 + i)])
        p.consume_events([ev(EventKind.CLOSE, False, ts=9_000), ev(EventKind.CLOSE, True, ts=9_001)])
        p.shutdown()
        after = _http_results()
        counts = {r: v - before.get(r, 0.0) for r, v in after.items() if v != before.get(r, 0.0)}
    spans = [(s.name, int(s.kind), s.start_ns, s.end_ns, int(s.status_code), s.status_message,
              sorted(s.attributes.items()), s.trace_id if s.parent_span_id else b"", s.parent_span_id)
             for s in sink.spans]
    return spans, counts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exchanges=st.lists(st.tuples(st.sampled_from(_WHOLE_REQS), st.sampled_from(_WHOLE_RESPS)),
                          min_size=1, max_size=4),
       cuts=st.lists(st.integers(1, 40), min_size=0, max_size=6), pipeline=st.booleans())
def test_feed_whole_matches_the_buffered_path(exchanges: list, cuts: list, pipeline: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    segs: list[tuple[bool, bytes]] = []
    if pipeline:  # all requests in one segment, then the responses, split at the cuts
        segs.append((True, b"".join(r for r, _ in exchanges)))
        segs += [(False, piece) for piece in pieces(b"".join(r for _, r in exchanges), cuts)]
    else:
        for r, s in exchanges:
            segs += [(True, r), (False, s)]
    assert _run_stage(segs, True, monkeypatch) == _run_stage(segs, False, monkeypatch)


def test_feed_whole_takes_the_common_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual segment goes through feed_whole, and no buffer ever holds it."""
    from processors.protocols import http1
    calls: list[bool] = []
    orig = http1.Http1Session.feed_whole

    def spy(self: object, fc: bool, d: memoryview, ts: int) -> bool:
        r = orig(self, fc, d, ts)
        calls.append(r)
        return r

    monkeypatch.setattr(http1.Http1Session, "feed_whole", spy)
    p, sink = stage()
    for i in range(3):
        p.consume_events([data(True, REQ, ts=10 * i), data(False, RESP, ts=10 * i + 5)])
    assert [s.attributes["http.response.status_code"] for s in sink.spans] == [200] * 3
    assert [(s.start_ns, s.end_ns) for s in sink.spans] == [(0, 5), (10, 15), (20, 25)]
    assert calls.count(True) >= 4  # the first request goes through detection, the rest whole


# -- the pending budget (issue 20: an MQTT flood of unacked publishes reached 1,450 MiB) ------
def _mqtt_flood(n_conns: int, per_conn: int, start_port: int = 41000, tag: str = "m") -> list[TcpEvent]:
    def pkt(b0: int, body: bytes) -> bytes:
        assert len(body) < 128
        return bytes([b0, len(body)]) + body

    connect = pkt(0x10, b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x03dev")
    evs = []
    for c in range(n_conns):
        cl = (f"10.0.1.{c % 250 + 1}", start_port + c)
        evs.append(data(True, connect, ts=1000, cid=(tag, c), client=cl, server=("10.0.0.9", 1883),
                        client_is_src=True))
        body = b"".join(pkt(0x32, b"\x00\x05t/abc" + (i % 60000 + 1).to_bytes(2, "big") + b"x" * 40)
                        for i in range(per_conn))
        evs.append(data(True, body, ts=2000 + c, cid=(tag, c), client=cl, server=("10.0.0.9", 1883),
                        client_is_src=True))
    return evs


def test_pending_budget_bounds_an_unacked_flood_and_counts_every_drop() -> None:
    import tracemalloc

    cfg = {"enabled": ["mqtt"], "pending": {"max_entries": 3000, "max_bytes": 64 << 20,
                                             "max_entries_per_connection": 300}}
    p, sink = stage(cfg)
    before_limit, before_budget = metric("mqtt", "pending_limit"), metric("mqtt", "pending_budget")
    evs = _mqtt_flood(20, 800)
    tracemalloc.start()
    p.consume_events(evs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    b = p._budget
    assert b.entries <= 3000 and not b.over
    # 20 x 800 publishes: each connection keeps at most 300, all together at most 3000.
    dropped_limit = metric("mqtt", "pending_limit") - before_limit
    dropped_budget = metric("mqtt", "pending_budget") - before_budget
    assert dropped_limit == 20 * (800 - 300)
    assert dropped_budget > 0 and dropped_limit + dropped_budget + b.entries == 20 * 800
    assert peak < 6 << 20, peak  # unbounded, the 16,000 pending publishes held 9.6 MB (~600 B each)
    held = b.entries
    p.shutdown()
    assert b.entries == 0 and b.bytes == 0  # every store gave back what it held
    # and what was still held comes out at the end: unacknowledged publishes were still
    # published, so they are spans marked incomplete (base.py's rule for the end of a capture)
    cut = [s for s in sink.spans if s.attributes.get("wirespan.incomplete")]
    assert len(cut) == held and "mqtt:no_ack" not in p.stats["drops"]


def test_pending_budget_sheds_the_least_recently_active_connection_first() -> None:
    p, _ = stage({"enabled": ["mqtt"], "pending": {"max_entries": 100, "max_entries_per_connection": 100}})
    p.consume_events(_mqtt_flood(1, 80, start_port=42000, tag="old"))
    p.consume_events(_mqtt_flood(1, 80, start_port=43000, tag="new"))
    kept = {cid: sum(len(s) for s in st.conn.stores) for cid, st in p._conns.items()}
    # 160 entries against a budget of 100: shed to 90, all from the older connection.
    assert kept == {("old", 0): 10, ("new", 0): 80}
    p.shutdown()
    assert p._budget.entries == 0


def test_pending_budget_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="max_entries_per_connection must be <= max_entries"):
        Config.model_validate({"pending": {"max_entries": 10, "max_entries_per_connection": 20}})
    with pytest.raises(ValidationError, match="extra"):
        Config.model_validate({"pending": {"max_entrys": 10}})
