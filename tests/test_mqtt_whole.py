"""MQTT's in-place path (``feed_whole`` and its property reader ``_props_in``) held to the
buffered one it shortcuts, on the traffic the benchmark replays.

Why: the real paho + mosquitto capture is half MQTT 5, whose packets mostly carry properties
(a traceparent user property, a topic alias, a subscription identifier, CONNECT's and CONNACK's
limits). feed_whole now reads them in place; these tests hold every span field and every drop
to the buffered path's, for the capture's connections whole, a byte a segment, in random
pieces and damaged; for exchanges.py's conversation; and hold ``_props_in`` to ``_properties``
on generated and damaged property lists.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import mqtt as m
from processors.protocols.errors import ProtocolError
from service.largebuf import BufferBoundsError, LargeBuffer
from tests.support.exchanges import EXCHANGES, mqtt_vbi
from tests.support.speedup import damage
from tests.support.whole import cut, mutate, run_both_ways
from tests.test_mqtt_fixture import _conversations

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _s(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


# -- _props_in against _properties ------------------------------------------------------------
_NAMES = [b"traceparent", b"TraceParent", b"tracestate", b"TRACESTATE", b"app", b"traceparen",
          b"traceparent2", b"\xe2\x84\xaaey", b"trace\xffarent", b"x" * 70, b""]


@st.composite
def _prop(draw: st.DrawFn) -> bytes:
    """One property of any known kind (or an unknown id), its value well-formed."""
    pid = draw(st.sampled_from([*sorted(m._PROPS), 0x05, 0x7F, 0x80]))
    kind = m._PROPS.get(pid)
    head = bytes([pid])
    if kind in (1, 2, 4):
        return head + draw(st.binary(min_size=kind, max_size=kind))
    if kind == "v":
        return head + mqtt_vbi(draw(st.integers(0, 268_435_455)))
    if kind in ("s", "b"):
        value = st.one_of(st.binary(max_size=300), st.sampled_from([b"text/plain", "\u00e9t\u00e9".encode()]))
        return head + _s(draw(value))
    if kind == "p":
        value = st.one_of(st.just(TP.encode()), st.just(TP.encode() * 6), st.binary(max_size=300))
        return head + _s(draw(st.sampled_from(_NAMES))) + _s(draw(value))
    return head


@st.composite
def _prop_list(draw: st.DrawFn) -> bytes:
    body = b"".join(draw(st.lists(_prop(), max_size=6)))
    data = mqtt_vbi(len(body)) + body + draw(st.binary(max_size=3))  # what follows the list
    return damage(draw, data)


def _reference(data: bytes, want_user: bool) -> tuple[dict, int] | None:
    try:
        return m._properties(LargeBuffer(data), 0, len(data), want_user)
    except (ProtocolError, BufferBoundsError):
        return None


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_prop_list(), st.booleans())
def test_props_in_reads_a_list_as_properties_does(data: bytes, want_user: bool) -> None:
    """The same keys and strings and the same end, or None exactly where _properties raises."""
    assert m._props_in(memoryview(data), 0, len(data), want_user) == _reference(data, want_user)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40), st.booleans())
def test_props_in_on_random_bytes(data: bytes, want_user: bool) -> None:
    assert m._props_in(memoryview(data), 0, len(data), want_user) == _reference(data, want_user)


def test_props_in_reads_the_usual_lists() -> None:
    tp = b"\x26" + _s(b"traceparent") + _s(TP.encode())
    body = b"\x23\x00\x07" + b"\x03" + _s(b"text/plain") + tp + b"\x0b\x81\x01"
    data = mqtt_vbi(len(body)) + body
    got = m._props_in(memoryview(data), 0, len(data), True)
    assert got == ({"topic_alias": 7, "content_type": "text/plain", "traceparent": TP}, len(data))
    assert got == _reference(data, True)
    assert m._props_in(memoryview(data), 0, len(data), False) == ({"topic_alias": 7, "content_type": "text/plain"},
                                                                  len(data))


@pytest.mark.parametrize("data", [b"\x80\x80\x80\x80\x00", b"\x80\x80\x80\x80", b"\x81", b"\x02\x0b\x80",
                                  b"\x05\x0b\x80\x80\x80\x80", b"\x02\x23\x00", b"\x01\x00", b"\x01"])
def test_props_in_refuses_what_properties_raises_on(data: bytes) -> None:
    """Five-byte and cut varints, a topic alias or a list cut short, an unknown id."""
    assert _reference(data, True) is None
    assert m._props_in(memoryview(data), 0, len(data), True) is None


def _pkt(b0: int, body: bytes) -> bytes:
    return bytes([b0]) + mqtt_vbi(len(body)) + body


def _props(*items: bytes) -> bytes:
    body = b"".join(items)
    return mqtt_vbi(len(body)) + body


def _rich_v5() -> list[tuple[bool, bytes]]:
    """5.0 with properties everywhere a span reads them: CONNECT's, a CONNACK's and a SUBACK's
    reason strings, content types, user properties (a traceparent among others), topic
    aliases set and used in one segment, acks with reason codes and properties, a refused
    CONNACK after a good one."""
    reason = b"\x1f" + _s(b"quota exceeded")
    user = b"\x26" + _s(b"app") + _s(b"x")
    tp = b"\x26" + _s(b"TraceParent") + _s(TP.encode())
    alias = b"\x23\x00\x02"
    conn = _pkt(0x10, _s(b"MQTT") + bytes([5, 0x02]) + struct.pack(">H", 60)
                + _props(b"\x11\x00\x00\x00\x3c", b"\x21\x00\x14", user) + _s(b"rich-5"))
    pub = [_pkt(0x32, _s(b"a/b") + struct.pack(">H", 1) + _props(alias, b"\x03" + _s(b"text/plain"), tp) + b"xy"),
           _pkt(0x32, _s(b"") + struct.pack(">H", 2) + _props(alias, b"\x01\x01") + b"z"),
           _pkt(0x30, _s(b"") + _props(b"\x23\x00\x09") + b"q")]  # an alias never set
    return [(True, conn), (False, _pkt(0x20, b"\x00\x00" + _props(b"\x22\x00\x0a", b"\x24\x01", reason))),
            (True, _pkt(0x82, struct.pack(">H", 5) + _props(b"\x0b\x81\x01", user) + _s(b"a/#") + b"\x01")),
            (False, _pkt(0x90, struct.pack(">H", 5) + _props(reason) + b"\x97")),
            (True, b"".join(pub)),
            (False, _pkt(0x40, struct.pack(">H", 1) + b"\x10" + _props(reason))
             + _pkt(0x40, struct.pack(">H", 2) + b"\x97" + _props(reason, user))),
            (True, _pkt(0xA2, struct.pack(">H", 6) + _props(user) + _s(b"a/#"))),
            (False, _pkt(0xB0, struct.pack(">H", 6) + _props(reason) + b"\x11")),
            (False, _pkt(0x32, _s(b"c/d") + struct.pack(">H", 1) + _props(b"\x0b\x05", tp, alias) + b"in")),
            (True, _pkt(0x40, struct.pack(">H", 1) + b"\x00")),
            (True, conn), (False, _pkt(0x20, b"\x00\x87" + _props(reason)))]


@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
def test_properties_everywhere_give_the_same_spans(how: str) -> None:
    spans, drops = run_both_ways(m.Session, 1883, cut(_rich_v5(), how, random.Random(how)))
    assert [(x[0], x[4], x[5]) for x in spans] == [
        ("subscribe a/#", 2, "quota exceeded"), ("publish alias:9", 0, ""), ("publish a/b", 0, ""),
        ("publish a/b", 2, "reason code 0x97"), ("unsubscribe a/#", 0, ""), ("publish c/d", 0, ""),
        ("connect", 2, "quota exceeded")], spans
    assert drops == {}


def test_properties_everywhere_are_read_in_place() -> None:
    took, declined = _taken(_rich_v5())
    assert declined == 0 and took == len(_rich_v5())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                min_size=1, max_size=3))
def test_properties_everywhere_damaged_give_the_same_spans(mutations: list) -> None:
    run_both_ways(m.Session, 1883, mutate(_rich_v5(), mutations))


# -- the stage, feed_whole on and off -------------------------------------------------------------
_PORT, _CONVS = _conversations()


def _taken(segments: list[tuple[bool, bytes]]) -> tuple[int, int]:
    """(segments feed_whole took, declined) running ``segments`` through the stage."""
    from tests.support.whole import run_stage
    orig = m.Session.feed_whole
    count = [0, 0]

    def spy(self: m.Session, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        took = orig(self, from_client, data, ts_ns)
        count[0 if took else 1] += 1
        return took

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m.Session, "feed_whole", spy)
        run_stage(_PORT, segments)
    return count[0], count[1]


@pytest.mark.parametrize("which", range(len(_CONVS)))
@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
def test_the_capture_gives_the_same_spans_with_and_without_feed_whole(which: int, how: str) -> None:
    segs = cut(_CONVS[which], how, random.Random(f"{which}{how}"))
    spans, drops = run_both_ways(m.Session, _PORT, segs)
    assert drops == {}
    assert len(spans) == (14 if which == 0 else 16)


@pytest.mark.parametrize("which", range(len(_CONVS)))
def test_every_segment_of_the_capture_is_read_in_place(which: int) -> None:
    """The capture's segments are all whole packets, MQTT 5 properties and all: none is left
    to the buffer (the benchmark's fifth of a stage, issue 21)."""
    took, declined = _taken(_CONVS[which])
    assert declined == 0 and took > 20


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 1), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 10_000), st.integers(0, 255),
                                             st.booleans()), min_size=1, max_size=3))
def test_the_capture_damaged_gives_the_same_spans(which: int, mutations: list) -> None:
    run_both_ways(m.Session, _PORT, mutate(_CONVS[which], mutations))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 1), st.integers(0, 200), st.data())
def test_the_capture_with_one_segment_damaged(which: int, i: int, data: st.DataObject) -> None:
    segs = list(_CONVS[which])
    i %= len(segs)
    fc, raw = segs[i]
    segs[i] = (fc, damage(data.draw, raw))
    run_both_ways(m.Session, _PORT, segs)


def test_the_capture_packed_into_fewer_segments() -> None:
    """Several packets a segment (a client's pipelined publishes, a broker's acks): each side's
    run of segments joined, and joined in pairs."""
    for conv in _CONVS:
        for k in (2, 3, 100):
            segs: list[tuple[bool, bytes]] = []
            for fc, data in conv:
                if segs and segs[-1][0] == fc and _run_len(segs) < k:
                    segs[-1] = (fc, segs[-1][1] + data)
                else:
                    segs.append((fc, data))
            assert len(segs) < len(conv)
            spans, drops = run_both_ways(m.Session, _PORT, segs)
            assert drops == {} and len(spans) == (14 if conv is _CONVS[0] else 16)


def _run_len(segs: list[tuple[bool, bytes]]) -> int:
    """How many packets the last segment holds (its fixed headers walked)."""
    data = segs[-1][1]
    off = count = 0
    while off < len(data):
        p = off + 1
        rl = shift = 0
        while True:
            b = data[p]
            p += 1
            rl |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        off = p + rl
        count += 1
    return count


@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
@pytest.mark.parametrize("size", [16, 700, 20_000])
def test_exchanges_give_the_same_spans_with_and_without_feed_whole(how: str, size: int) -> None:
    for make in EXCHANGES["mqtt"]:
        ex = make(size)
        spans, drops = run_both_ways(m.Session, ex.port, cut(ex.steps, how, random.Random(f"{size}{how}")))
        assert len(spans) == ex.spans and drops == {}


@pytest.mark.parametrize("v", [4, 5])
def test_an_ack_alone_in_its_segment(v: int) -> None:
    """A lone ack (feed_whole's shortcut): 3.1.1 has no reason code, so a byte after the packet
    id is not one; PUBREL with the wrong flags is the buffered path's to refuse."""
    conn = _pkt(0x10, _s(b"MQTT") + bytes([v, 0x02]) + struct.pack(">H", 60) + (b"\x00" if v == 5 else b"")
                + _s(b"acks"))
    pub = _pkt(0x32, _s(b"t") + struct.pack(">H", 1) + (b"\x00" if v == 5 else b"") + b"x")
    pub2 = _pkt(0x34, _s(b"u") + struct.pack(">H", 2) + (b"\x00" if v == 5 else b"") + b"y")
    segs = [(True, conn), (False, b"\x20\x02\x00\x00"), (True, pub), (False, b"\x40\x03\x00\x01\x80"),
            (True, pub2), (False, b"\x50\x02\x00\x02"), (True, b"\x60\x02\x00\x02"), (True, b"\x62\x02\x00\x02"),
            (False, b"\x70\x02\x00\x02")]
    spans, drops = run_both_ways(m.Session, 1883, segs)
    assert [(x[0], x[4]) for x in spans] == [("publish t", 2 if v == 5 else 0), ("publish u", 0)], spans
    assert drops, drops  # the bad PUBREL, counted
    assert _taken(segs)[1] == 1  # that PUBREL, declined
