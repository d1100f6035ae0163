"""MQTT 3.1.1 and 5.0: framing, pairing, properties, bad input, and a real mosquitto with paho-mqtt."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.protocols import mqtt as m
from processors.protocols.base import Detection
from processors.protocols.errors import ProtocolError
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.driver import SessionDriver, peak_allocation
from tests.support.exchanges import mqtt_vbi

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(b)) + b


def pkt(b0: int, body: bytes) -> bytes:
    return bytes([b0]) + mqtt_vbi(len(body)) + body


def props(*items: bytes) -> bytes:
    body = b"".join(items)
    return mqtt_vbi(len(body)) + body


def connect(client_id: str, v: int = 4, user: str | None = None, pw: str | None = None) -> bytes:
    flags = 0x02 | (0x80 if user else 0) | (0x40 if pw else 0)
    body = s("MQTT") + bytes([v, flags]) + struct.pack(">H", 60) + (props() if v == 5 else b"") + s(client_id)
    if user:
        body += s(user)
    if pw:
        body += s(pw)
    return pkt(0x10, body)


def publish(topic: str, payload: bytes, qos: int = 0, pid: int = 0, v: int = 4, pr: bytes | None = None,
            retain: bool = False) -> bytes:
    body = s(topic) + (struct.pack(">H", pid) if qos else b"")
    if v == 5:
        body += pr if pr is not None else props()
    return pkt(0x30 | (qos << 1) | int(retain), body + payload)


class Driver(SessionDriver):
    def __init__(self, **settings: object) -> None:
        super().__init__(m, 1883, ts_step=100, **settings)


@pytest.mark.parametrize("step", [None, 1, 4])
def test_v311_qos_levels_and_subscribe(step: int | None) -> None:
    d = Driver()
    d.send(True, connect("sensor-7", user="bob", pw="hunter2"), step)
    d.send(False, pkt(0x20, b"\x00\x00"), step)
    d.send(True, publish("a/t0", b"zero") + publish("a/t1", b"one", 1, 10) + publish("a/t2", b"two", 2, 11), step)
    d.send(False, pkt(0x40, struct.pack(">H", 10)) + pkt(0x50, struct.pack(">H", 11)), step)
    d.send(True, pkt(0x62, struct.pack(">H", 11)), step)
    d.send(False, pkt(0x70, struct.pack(">H", 11)), step)
    d.send(True, pkt(0x82, struct.pack(">H", 12) + s("a/#") + b"\x01" + s("b/+") + b"\x00"), step)
    d.send(False, pkt(0x90, struct.pack(">H", 12) + b"\x01\x80"), step)
    d.send(True, pkt(0xA2, struct.pack(">H", 13) + s("a/#")), step)
    d.send(False, pkt(0xB0, struct.pack(">H", 13)), step)
    d.send(True, b"\xc0\x00\xe0\x00", step)  # PINGREQ, DISCONNECT: no spans
    names = [x.name for x in d.spans]
    assert names == ["publish a/t0", "publish a/t1", "publish a/t2", "subscribe a/#", "unsubscribe a/#"]
    p0, p1, p2, sub, unsub = d.spans
    for sp in (p0, p1, p2):
        assert sp.kind == SpanKind.PRODUCER
        assert sp.attributes["messaging.system"] == "mqtt"
        assert sp.attributes["messaging.operation.name"] == "publish"
        assert sp.attributes["messaging.operation.type"] == "send"
        assert sp.attributes["messaging.client.id"] == "sensor-7"
    assert [p.attributes["messaging.mqtt.qos"] for p in (p0, p1, p2)] == [0, 1, 2]
    assert p2.end_ns > p1.end_ns  # QoS 2 ends at PUBCOMP
    assert p1.attributes["messaging.message.body.size"] == 3
    assert sub.status_code == StatusCode.ERROR  # one filter refused (0x80)
    assert sub.attributes["messaging.mqtt.topic_filters"] == ["a/#", "b/+"]
    assert unsub.status_code == StatusCode.UNSET
    text = repr([x.attributes for x in d.spans])
    assert "hunter2" not in text and "bob" not in text
    assert not d.drops


def test_broker_to_client_delivery_is_a_consumer_span() -> None:
    d = Driver()
    d.send(True, connect("c1"))
    d.send(False, pkt(0x20, b"\x00\x00"))
    d.send(False, publish("news", b"hello", 1, 77, retain=True))
    d.send(True, pkt(0x40, struct.pack(">H", 77)))
    (sp,) = d.spans
    assert sp.kind == SpanKind.CONSUMER and sp.name == "publish news"
    assert sp.attributes["messaging.operation.type"] == "receive"
    assert sp.attributes["messaging.mqtt.retain"] is True


def test_v5_properties_traceparent_alias_and_reason_codes() -> None:
    d = Driver()
    d.send(True, connect("v5client", v=5))
    d.send(False, pkt(0x20, b"\x00\x00" + props()))
    user_prop = b"\x26" + s("traceparent") + s(TP)
    d.send(True, publish("sensors/temp", b"21.5", 1, 1, v=5, pr=props(b"\x23\x00\x05", user_prop,
                                                                      b"\x03" + s("text/plain"))))
    d.send(True, publish("", b"22.0", 1, 2, v=5, pr=props(b"\x23\x00\x05")))  # alias only
    d.send(False, pkt(0x40, struct.pack(">H", 1) + b"\x00" + props()))
    d.send(False, pkt(0x40, struct.pack(">H", 2) + b"\x87" + props(b"\x1f" + s("Not authorized"))))
    a, b = d.spans
    assert a.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert a.parent_span_id.hex() == "00f067aa0ba902b7"
    assert a.attributes["messaging.mqtt.content_type"] == "text/plain"
    assert b.name == "publish sensors/temp"  # resolved from the alias
    assert b.status_code == StatusCode.ERROR and b.attributes["error.type"] == "135"


def test_refused_connect_is_an_error_span() -> None:
    d = Driver()
    d.send(True, connect("intruder", user="x", pw="y"))
    d.send(False, pkt(0x20, b"\x00\x05"))  # 3.1.1: not authorized
    (sp,) = d.spans
    assert sp.name == "connect" and sp.status_code == StatusCode.ERROR
    d5 = Driver()
    d5.send(True, connect("intruder", v=5))
    d5.send(False, pkt(0x20, b"\x00\x86" + props(b"\x1f" + s("Bad user name or password"))))
    assert d5.spans[0].status_message == "Bad user name or password"
    ok = Driver()
    ok.send(True, connect("fine"))
    ok.send(False, pkt(0x20, b"\x00\x00"))
    assert ok.spans == []


def test_detect() -> None:
    assert m.detect(LargeBuffer(connect("x")), None) == Detection.REQUEST
    assert m.detect(LargeBuffer(connect("x", v=5)), None) == Detection.REQUEST
    assert m.detect(LargeBuffer(connect("x")[:5]), None) == Detection.NEED_MORE
    assert m.detect(LargeBuffer(publish("a/b", b"x")), None) == Detection.REQUEST
    assert m.detect(LargeBuffer(b"GET / HTTP/1.1\r\n\r\n"), None) == Detection.NO
    assert m.detect(LargeBuffer(b"\x30\x05\x00\x03a\x00b"), None) == Detection.NO  # control char topic
    assert m.detect(LargeBuffer(b"\x10\xff\xff\xff\xff\x01"), None) == Detection.NO


@pytest.mark.parametrize("data", [
    b"\x30\xff\xff\xff\xff\x7f",             # 5-byte remaining length
    b"\x60\x02\x00\x01",                      # PUBREL with wrong flags (must be 0010)
    b"\x36\x05\x00\x01a\x00\x01",             # QoS 3
    b"\x30\x04\x00\x09ab",                    # topic overruns the packet
    b"\x82\x02\x00\x01",                      # SUBSCRIBE with no filter
    b"\x00\x00",                              # reserved type 0
    b"\x82" + mqtt_vbi(2 * 1024 * 1024) + b"\x00",  # control packet too large
    b"p\x00",                                 # PUBCOMP without a packet id (found by the fuzzer)
    b"\x10\x0a\x00\x20MQTT\x04\x02\x00\x3c",  # CONNECT whose protocol name overruns it
])
def test_malformed_packets_raise_protocol_errors(data: bytes) -> None:
    d = Driver()
    with pytest.raises(ProtocolError):
        d.send(True, data)


def test_v5_bad_property_is_malformed() -> None:
    d = Driver()
    d.send(True, connect("c", v=5))
    with pytest.raises(ProtocolError):
        d.send(True, publish("t", b"", 0, v=5, pr=props(b"\x7f\x00")))


@pytest.mark.parametrize("step", [None, 1])
@pytest.mark.parametrize("tail", [b"", b"\x80"], ids=["no_length", "cut_length"])
def test_v5_publish_without_its_property_length_is_malformed_not_a_wait(step: int | None, tail: bytes) -> None:
    """An MQTT 5 PUBLISH that ends where its property length should start (or inside it): the
    whole packet is here, so no later byte can help; it was a wait for ever, and the connection
    stalled behind it (whole or a byte a segment, the buffered path reads it)."""
    d = Driver()
    d.send(True, connect("c", v=5))
    bad = pkt(0x30, s("t") + tail)
    with pytest.raises(ProtocolError):
        if step is None:
            d.send(True, bad)
        else:
            for i in range(0, len(bad), step):
                d.send(True, bad[i:i + step])


def _alloc(size: int) -> int:
    d = Driver()
    data = publish("big/blob", b"\x00" * size, 1, 5)

    def feed() -> None:
        for i in range(0, len(data), 1400):
            d.send(True, data[i:i + 1400])
            assert len(d.conn.client_buf) <= 1400  # the payload is never held

    peak = peak_allocation(feed)
    d.send(False, pkt(0x40, struct.pack(">H", 5)))
    assert d.spans[0].attributes["messaging.message.body.size"] == size
    return peak


def test_publish_allocation_is_flat_when_the_payload_grows_100x() -> None:
    small, large = _alloc(20_000), _alloc(2_000_000)
    assert large < small * 1.5 + 4096, (small, large)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40), st.booleans())
def test_fuzz_only_protocol_errors_escape(data: bytes, step: int, v5: bool) -> None:
    d = Driver()
    if v5:
        d.send(True, connect("f", v=5))
    d.fuzz(data, step)


def test_real_mosquitto_with_paho() -> None:
    mqtt = pytest.importorskip("paho.mqtt.client")
    from tests.support.capture import tcpdump
    from tests.support.mosquitto import mosquitto
    from tests.support.replay import replay_spans

    def client(cid: str, proto: int, port: int, user: tuple[str, str] | None = None) -> tuple[object, list]:
        got: list = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto)
        if user:
            c.username_pw_set(*user)
        c.on_message = lambda cl, ud, msg: got.append(msg)
        c.connect("127.0.0.1", port)
        c.loop_start()
        return c, got

    with mosquitto() as broker, tcpdump([broker.port, broker.auth_port]) as pcap:
        for proto, tag in ((mqtt.MQTTv311, "v311"), (mqtt.MQTTv5, "v5")):
            sub, got = client(f"sub-{tag}", proto, broker.port)
            sub.subscribe(f"{tag}/#", qos=2)
            time.sleep(0.3)
            pub, _ = client(f"pub-{tag}", proto, broker.port)
            for qos in (0, 1, 2):
                pub.publish(f"{tag}/q{qos}", f"m{qos}".encode(), qos=qos).wait_for_publish(5)
            pub.publish(f"{tag}/retained", b"keep", qos=1, retain=True).wait_for_publish(5)
            deadline = time.time() + 5
            while len(got) < 4 and time.time() < deadline:
                time.sleep(0.05)
            assert len(got) == 4, tag
            sub.unsubscribe(f"{tag}/#")
            time.sleep(0.3)
            for c in (pub, sub):
                c.disconnect()
                c.loop_stop()
        bad = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv311)
        bad.username_pw_set("alice", "wrong")
        bad.connect("127.0.0.1", broker.auth_port)
        bad.loop_start()
        time.sleep(0.5)
        bad.loop_stop()
    spans = replay_spans(pcap)
    for tag in ("v311", "v5"):
        prod = [x for x in spans if x.kind == SpanKind.PRODUCER and x.name.startswith(f"publish {tag}/")]
        cons = [x for x in spans if x.kind == SpanKind.CONSUMER and x.name.startswith(f"publish {tag}/")]
        assert sorted(x.name for x in prod) == sorted(f"publish {tag}/{t}" for t in ("q0", "q1", "q2", "retained"))
        assert len(cons) == 4, [x.name for x in cons]
        assert all(x.attributes["messaging.client.id"] == f"pub-{tag}" for x in prod)
        assert all(x.attributes["messaging.client.id"] == f"sub-{tag}" for x in cons)
        assert {x.attributes["messaging.mqtt.qos"] for x in prod} == {0, 1, 2}
        subs = [x for x in spans if x.name == f"subscribe {tag}/#"]
        unsubs = [x for x in spans if x.name == f"unsubscribe {tag}/#"]
        assert len(subs) == 1 and len(unsubs) == 1
        assert subs[0].status_code == StatusCode.UNSET
    refused = [x for x in spans if x.name == "connect"]
    assert len(refused) == 1 and refused[0].status_code == StatusCode.ERROR
    assert "wrong" not in repr([x.attributes for x in spans])


# -- joined mid-stream, roles from the ports, the end of the capture (issue 16 classes 3, 4, 7) ---------
def _stage(events: list, config: dict | None = None) -> tuple[list, dict]:
    from processors.protocols.processor import ProtocolsProcessor
    from tests.support.replay import _Collect

    sink = _Collect()
    proc = ProtocolsProcessor("protocols", config or {}, sink)
    for i in range(0, len(events), 1):
        proc.consume_events(events[i:i + 1])
    proc.shutdown()
    return sink.spans, proc.stats


def _ev(src: tuple[str, int], dst: tuple[str, int], payload: bytes, ts: int, kind=None):
    from service.model import EventKind, TcpEvent

    return TcpEvent(kind or EventKind.DATA, (min(src, dst), max(src, dst)), src[0], src[1], dst[0], dst[1], ts,
                    memoryview(payload) if payload else None)


BROKER, SUBSCRIBER = ("10.0.0.2", 17501), ("10.0.0.1", 53524)


@pytest.mark.parametrize("step", [None, 1, 3])
def test_joined_on_a_broker_delivery_roles_come_from_the_ports(step) -> None:
    """No SYN, and the first packet is the broker's PUBLISH to its subscriber: the non-standard
    but non-ephemeral port is the broker's, so it is a CONSUMER span, not a producer's."""
    assert m.ambiguous_role(LargeBuffer(publish("Bus17Cmd", b"x", qos=1, pid=9)))
    assert not m.ambiguous_role(LargeBuffer(connect("x")))
    stream = [(BROKER, SUBSCRIBER, publish("Bus17Cmd", b"go", qos=1, pid=9)),
              (SUBSCRIBER, BROKER, pkt(0x40, struct.pack(">H", 9))),
              (SUBSCRIBER, BROKER, publish("Bus17Info", b"state", qos=1, pid=3)),
              (BROKER, SUBSCRIBER, pkt(0x40, struct.pack(">H", 3)))]
    events, ts = [], 1_000
    for src, dst, payload in stream:
        for piece in ([payload] if step is None else [payload[i:i + step] for i in range(0, len(payload), step)]):
            ts += 10
            events.append(_ev(src, dst, piece, ts))
    spans, stats = _stage(events)
    got = [(x.name, x.kind, x.attributes["messaging.operation.type"], x.attributes["server.port"]) for x in spans]
    assert got == [("publish Bus17Cmd", SpanKind.CONSUMER, "receive", 17501),
                   ("publish Bus17Info", SpanKind.PRODUCER, "send", 17501)], got
    assert not any(k.startswith("mqtt:") for k in stats["drops"]), stats["drops"]


def test_server_side_by_ports() -> None:
    from processors.protocols.base import server_side_by_ports

    assert server_side_by_ports(53524, 17501) == 1          # ephemeral vs not
    assert server_side_by_ports(1883, 40000) == 0           # and the protocol's port
    assert server_side_by_ports(5000, 1883, frozenset({1883})) == 1
    assert server_side_by_ports(443, 8080) == 0             # system port vs not
    assert server_side_by_ports(50000, 50001) is None       # both ephemeral: the content decides
    assert server_side_by_ports(1883, 1883) is None


@pytest.mark.parametrize("step", [None, 1, 4])
def test_subscribe_joined_mid_stream(step) -> None:
    sub = pkt(0x82, struct.pack(">H", 1) + s("hello/+/world") + b"\x00")
    ack = pkt(0x90, struct.pack(">H", 1) + b"\x00")
    assert m.detect(LargeBuffer(sub), None) == Detection.REQUEST
    assert m.detect(LargeBuffer(ack), None) == Detection.RESPONSE
    for k in range(1, len(sub)):
        assert m.detect(LargeBuffer(sub[:k]), None) == Detection.NEED_MORE, k
    for junk in (sub + b"x", pkt(0x82, struct.pack(">H", 1) + s("a\x00b") + b"\x00"),
                 pkt(0x82, struct.pack(">H", 1) + s("a") + b"\x03"), pkt(0x90, b"\x00\x01\x07")):
        assert m.detect(LargeBuffer(junk), None) == Detection.NO, junk
    client, broker = ("10.33.49.25", 34404), ("5.196.95.208", 1883)
    events = []
    for i, (src, dst, payload) in enumerate(((client, broker, sub), (broker, client, ack))):
        pieces = [payload] if step is None else [payload[j:j + step] for j in range(0, len(payload), step)]
        events += [_ev(src, dst, p, 1_000 + 100 * i + j) for j, p in enumerate(pieces)]
    spans, _ = _stage(events)
    assert [(x.name, x.attributes["messaging.destination.name"]) for x in spans] == [
        ("subscribe hello/+/world", "hello/+/world")]


def test_publish_left_without_its_ack_is_an_incomplete_span() -> None:
    """The capture ends before the PUBACK: the publish was on the wire, so it is a span
    marked wirespan.incomplete, without an error; a subscribe without its SUBACK is counted."""
    d = Driver()
    d.send(True, connect("car-17"))
    d.send(False, pkt(0x20, b"\x00\x00"))
    d.send(True, publish("Bus17Info", b"pos", qos=1, pid=7))
    d.send(True, pkt(0x82, struct.pack(">H", 8) + s("cmd/#") + b"\x01"))
    d.session.close(d.ts)
    (sp,) = d.spans
    assert sp.name == "publish Bus17Info" and sp.status_code == StatusCode.UNSET
    assert sp.attributes["wirespan.incomplete"] is True and "error.type" not in sp.attributes
    assert sp.attributes["messaging.client.id"] == "car-17" and sp.end_ns == sp.start_ns
    assert d.drops == ["no_ack"]


@pytest.mark.parametrize("topic", [b"a/\xff\xfe", b"a\x00b", b"sport/+/score", b"sport/#", b""])
def test_invalid_publish_topic_is_a_counted_violation(topic: bytes) -> None:
    """Invalid UTF-8, U+0000 and wildcards are not allowed in a PUBLISH topic (MQTT 3.1.1
    §1.5.3, §4.7.1; 5.0 likewise): no span, a counted drop, and the next packet still parses."""
    d = Driver()
    bad = pkt(0x30, struct.pack(">H", len(topic)) + topic + b"payload")
    with pytest.raises(ProtocolError) as e:
        d.send(True, bad)
    assert e.value.reason == "bad_topic" and d.spans == []
    d.send(True, publish("ok/topic", b"x"))
    assert [x.name for x in d.spans] == ["publish ok/topic"]


def test_real_mosquitto_capture_started_after_the_subscriber_connected() -> None:
    """tcpdump starts after the subscriber connected and subscribed: on its connection the
    first packet seen is mosquitto's delivery. With the broker's port configured, that is a
    CONSUMER span; the publisher, seen from its SYN, is a PRODUCER; both QoS 1."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    from tests.support.capture import tcpdump
    from tests.support.mosquitto import mosquitto
    from tests.support.replay import replay

    with mosquitto() as broker:
        got: list = []
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="late-sub", protocol=mqtt.MQTTv311)
        sub.on_message = lambda cl, ud, msg: got.append(msg)
        sub.connect("127.0.0.1", broker.port)
        sub.loop_start()
        sub.subscribe("fleet/#", qos=1)
        time.sleep(0.3)
        with tcpdump(broker.port) as pcap:
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv311)
            pub.connect("127.0.0.1", broker.port)
            pub.loop_start()
            for i in range(3):
                pub.publish(f"fleet/bus{i}", b"pos", qos=1).wait_for_publish(5)
            deadline = time.time() + 5
            while len(got) < 3 and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    assert len(got) == 3
    spans, _, pstats = replay(pcap, {"mqtt": {"ports": [broker.port]}})
    cons = sorted(x.name for x in spans if x.kind == SpanKind.CONSUMER)
    prod = sorted(x.name for x in spans if x.kind == SpanKind.PRODUCER)
    assert cons == prod == [f"publish fleet/bus{i}" for i in range(3)], [(x.name, x.kind) for x in spans]
    assert all(x.attributes["server.port"] == broker.port for x in spans)
    assert all(x.attributes["messaging.operation.type"] == "receive" for x in spans if x.kind == SpanKind.CONSUMER)
    assert not any(k.startswith("mqtt:") for k in pstats["drops"]), pstats["drops"]


def test_detect_refuses_a_publish_topic_with_invalid_utf8() -> None:
    assert m.detect(LargeBuffer(bytes.fromhex("30030001ff")), None) == Detection.NO
    assert m.detect(LargeBuffer(publish("caf\u00e9/temp", b"1")), None) == Detection.REQUEST


def _conversation() -> list[tuple[bool, bytes]]:
    """3.1.1: QoS 0/1/2, a payload with a two-byte remaining length, subscribe, acks."""
    return [(True, connect("sensor-7", user="bob", pw="hunter2")), (False, pkt(0x20, b"\x00\x00")),
            (True, publish("a/t0", b"zero") + publish("a/t1", b"one" * 100, 1, 10) + publish("a/t2", b"two", 2, 11)),
            (False, pkt(0x40, struct.pack(">H", 10)) + pkt(0x50, struct.pack(">H", 11))),
            (True, pkt(0x62, struct.pack(">H", 11))), (False, pkt(0x70, struct.pack(">H", 11))),
            (True, pkt(0x82, struct.pack(">H", 12) + s("a/#") + b"\x01" + s("b/+") + b"\x00")),
            (False, pkt(0x90, struct.pack(">H", 12) + b"\x01\x80") + publish("ok", b"k" * 300, 1, 3)),
            (True, pkt(0x40, struct.pack(">H", 3)) + b"\xc0\x00\xe0\x00")]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 400), max_size=8), st.integers(0, 8))
def test_cuts_anywhere_give_the_same_spans(cuts: list, which: int) -> None:
    """The cursor walk (a fixed header's one-byte length read from the chunk, a longer or
    straddling one through the buffer) gives the same spans and drops wherever a segment
    is cut (times left out: the driver's clock steps with each send)."""
    def run(split: bool) -> list:
        from tests.support.driver import send_cut
        d = Driver()
        send_cut(d.send, _conversation(), which if split else -1, cuts)
        return [(x.name, x.status_code, sorted(x.attributes.items(), key=str)) for x in d.spans] + [d.drops]
    got = run(True)
    assert got == run(False)
    assert len(got) == 6 and got[-1] == []  # five spans, no drops


def _conversation_v5() -> list[tuple[bool, bytes]]:
    """5.0: empty property lists and non-empty ones (both read in place by feed_whole),
    reason codes, a refused subscription, unsubscribe, a retained QoS 0."""
    tp = props(b"\x26" + s("traceparent") + s(TP))
    return [(True, connect("dev-5", v=5) + pkt(0x82, struct.pack(">H", 1) + props() + s("x/#") + b"\x01")),
            (False, pkt(0x20, b"\x00\x00\x00") + pkt(0x90, struct.pack(">H", 1) + props() + b"\x01")),
            (True, publish("x/a", b"p", v=5, retain=True) + publish("x/b", b"q" * 200, 1, 7, v=5)),
            (False, pkt(0x40, struct.pack(">H", 7) + b"\x00")),
            (True, publish("x/c", b"r", 2, 8, v=5, pr=tp)), (False, pkt(0x50, struct.pack(">H", 8) + b"\x87")),
            (True, publish("x/d", b"s", 1, 9, v=5)), (False, pkt(0x40, struct.pack(">H", 9) + b"\x80")),
            (True, pkt(0x82, struct.pack(">H", 2) + props() + s("y/+") + b"\x02" + s("z") + b"\x00")),
            (False, pkt(0x90, struct.pack(">H", 2) + props() + b"\x02\x80")),
            (True, pkt(0xA2, struct.pack(">H", 3) + props() + s("y/+") + s("z"))),
            (False, pkt(0xB0, struct.pack(">H", 3) + props() + b"\x00\x00") + pkt(0xD0, b"")),
            (True, pkt(0xE0, b"\x00\x00"))]


def _connack_conversations() -> list[list[tuple[bool, bytes]]]:
    """CONNACK codes read by version (5 refuses at 0x80 and up, 3.1.1 at any non-zero), and
    topics cut at 1024 characters."""
    long = "t/" + "\u00e9" * 1100
    return [[(True, connect("old", v=4)), (False, pkt(0x20, b"\x00\x05")), (True, publish(long, b"1"))],
            [(True, connect("new", v=5)), (False, pkt(0x20, b"\x00\x05\x00")), (True, publish(long, b"2", v=5)),
             (True, connect("again", v=5)), (False, pkt(0x20, b"\x00\x87\x00"))]]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 14), st.integers(0, 10_000), st.integers(0, 255),
                                             st.booleans()), max_size=3))
def test_feed_whole_matches_the_buffered_path(which: int, mutations: list) -> None:
    """The buffer-less path (feed_whole) gives the buffered path's spans and drops, for the
    conversations as sent, with bytes changed and with segments split in two."""
    from tests.support.whole import mutate, run_both_ways
    convs = [_conversation(), _conversation_v5(), *_connack_conversations()]
    spans, drops = run_both_ways(m.Session, 1883, mutate(convs[which], mutations))
    if not mutations:
        names = [x[0] for x in spans]
        assert not drops
        if which == 1:
            assert names == ["subscribe x/#", "publish x/a", "publish x/b", "publish x/c", "publish x/d",
                             "subscribe y/+", "unsubscribe y/+"], names
        elif which == 0:
            assert len(names) == 5, names
        else:
            cut = "publish t/" + "\u00e9" * 1022
            assert names == (["connect", cut] if which == 2 else [cut, "connect"]), names


def test_feed_whole_reads_what_it_can_in_place() -> None:
    """Which segments feed_whole takes (True) and which it leaves to the buffered path."""
    from processors.protocols.base import Conn
    conn = Conn(1, "127.0.0.1", 50000, "127.0.0.1", 1883, lambda _s: None, settings=m.Settings(), protocol="mqtt")
    sess = m.Session(conn)
    assert sess.feed_whole(True, memoryview(connect("c1", v=5)), 1)
    assert sess.version == 5 and sess.client_id == "c1"
    assert sess.feed_whole(True, publish("t", b"x" * 300, 1, 1, v=5), 2)  # a two-byte remaining length
    assert sess.feed_whole(True, publish("t", b"x", 1, 2, v=5, pr=props(b"\x23\x00\x01")), 3)  # properties
    assert sess.dirs[True].aliases == {1: "t"}
    assert not sess.feed_whole(True, publish("t", b"x", 1, 3, v=5, pr=props(b"\x05\x00")), 3)  # no such property
    assert not sess.feed_whole(True, publish("t", b"x", 1, 3, v=5, pr=props(b"\x23\x00")), 3)  # one cut short
    assert not sess.feed_whole(True, publish("t", b"x" * 10, 0, v=5)[:-1], 4)  # the payload goes on
    assert not sess.feed_whole(True, publish("t/#", b"x", v=5), 5)  # a wildcard: the buffered path counts it
    assert not sess.feed_whole(True, publish("a", b"") + b"\x30", 6)  # a packet cut short after a whole one
    assert len(sess.pending) == 2  # declined segments changed nothing


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=14), st.lists(st.tuples(st.integers(0, 13), st.integers(0, 255)), max_size=3),
       st.sampled_from([True, False, None]))
def test_detect_reads_the_usual_connect_in_place_as_the_walk_does(tail: bytes, edits: list, from_client) -> None:
    """detect's in-place CONNECT check (the first chunk) answers as its walk through the buffer
    (the same bytes with the first chunk one byte long, where the check does not apply)."""
    b = bytearray(b"\x10\x10\x00\x04MQTT\x04\x02" + tail)
    for i, v in edits:
        b[i % len(b)] = v
    data = bytes(b)
    assert m.detect(LargeBuffer(data), from_client) == m.detect(LargeBuffer(data[:1], data[1:]), from_client)
    for k in range(2, 11):  # cut short
        assert m.detect(LargeBuffer(data[:k]), from_client) == m.detect(LargeBuffer(data[:1], data[1:k]), from_client)
