"""The stored AMQP 0-9-1 capture (tests/fixtures/amqp/pika_rabbitmq_session.pcap, recorded by
tests/fixtures/amqp/record.py from a real RabbitMQ and pika): its exact spans, nothing dropped,
tshark's dissection of the same file agreeing; and the settlement fix it showed (a basic.get's ack
named by its queue), on pika's frames.

The fixture is the benchmark's real-server AMQP traffic, so a change of what wirespan makes of it is
seen here first: the list is exact (names, kinds, ends, messaging attributes, trace linkage)."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

from pika import spec

from processors.protocols import amqp as a
from service.model import SpanKind, StatusCode
from tests.fixtures.amqp.record import CLIENT_NAME, MESSAGES, TRACEPARENTS
from tests.support import amqp_wire as w
from tests.support.driver import SessionDriver
from tests.support.replay import replay
from tests.test_amqp import _tshark_frames

PCAP = Path(__file__).parent / "fixtures" / "amqp" / "pika_rabbitmq_session.pcap"


def _tshark(*args: str) -> str:
    return subprocess.run(["tshark", "-r", str(PCAP), *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def _server_port() -> int:
    """The broker's port: the first SYN's destination (a free port at recording)."""
    return int(_tshark("-Y", "tcp.flags.syn==1 && tcp.flags.ack==0", "-T", "fields", "-e", "tcp.dstport").split()[0])


def _frame_ns() -> list[int]:
    """Each packet's capture time (ns), by frame number - 1: a span's ends are packets' times."""
    return [int(x.replace(".", "")) for x in _tshark("-T", "fields", "-e", "frame.time_epoch").split()]


def _messaging(s) -> dict:
    return {k: v for k, v in s.attributes.items() if k.startswith(("messaging.", "error."))}


def _msg(i: int) -> dict:
    """A message's fields in its publish, get and delivery spans."""
    mid, corr, body = MESSAGES[i]
    return {"messaging.system": "rabbitmq", "messaging.destination.name": "orders",
            "messaging.rabbitmq.destination.routing_key": "order.created", "messaging.message.body.size": len(body),
            "messaging.message.conversation_id": corr, "messaging.message.id": mid,
            "messaging.client.id": CLIENT_NAME}


def _pub(i: int) -> dict:
    return {**_msg(i), "messaging.operation.name": "publish", "messaging.operation.type": "send"}


def _got(i: int, op: str, dtag: int) -> dict:
    return {**_msg(i), "messaging.operation.name": op, "messaging.operation.type": op,
            "messaging.rabbitmq.message.delivery_tag": dtag, "messaging.destination.subscription.name": "orders.q"}


def _ack(dtag: int) -> dict:
    return {"messaging.system": "rabbitmq", "messaging.operation.name": "ack", "messaging.operation.type": "settle",
            "messaging.rabbitmq.message.delivery_tag": dtag, "messaging.destination.subscription.name": "orders.q",
            "messaging.client.id": CLIENT_NAME}


#: (name, kind, first packet, last packet (frame numbers, as tshark shows them), message of the
#: trace (None: a trace of its own), messaging attributes), in the order wirespan emits them. A
#: re-recording may move the frame numbers (TCP's bare ACKs come and go): check them with tshark.
EXPECTED = [
    ("queue.declare orders.q", SpanKind.CLIENT, 18, 19, None,
     {"messaging.system": "rabbitmq", "messaging.operation.name": "queue.declare",
      "messaging.destination.name": "orders.q", "messaging.client.id": CLIENT_NAME}),
    # confirm mode: each publish ends at the broker's basic.ack (frames 28, 33, 38)
    ("publish orders", SpanKind.PRODUCER, 24, 28, 0, _pub(0)),
    ("publish orders", SpanKind.PRODUCER, 29, 33, 1, _pub(1)),
    ("publish orders", SpanKind.PRODUCER, 34, 38, 2, _pub(2)),
    ("receive orders.q", SpanKind.CONSUMER, 39, 40, 0, _got(0, "receive", 1)),  # basic.get -> get-ok
    ("ack orders.q", SpanKind.CLIENT, 41, 41, None, _ack(1)),
    # consume-ok and both deliveries in one segment (frame 46)
    ("process orders.q", SpanKind.CONSUMER, 46, 46, 1, _got(1, "process", 2)),
    ("process orders.q", SpanKind.CONSUMER, 46, 46, 2, _got(2, "process", 3)),
    ("ack orders.q", SpanKind.CLIENT, 47, 47, None, _ack(2)),
    ("ack orders.q", SpanKind.CLIENT, 48, 48, None, _ack(3)),
    ("receive orders.q", SpanKind.CONSUMER, 52, 53, None,  # basic.get -> get-empty
     {"messaging.system": "rabbitmq", "messaging.operation.name": "receive", "messaging.operation.type": "receive",
      "messaging.destination.subscription.name": "orders.q", "messaging.batch.message_count": 0,
      "messaging.client.id": CLIENT_NAME}),
]


def test_the_fixtures_spans_exactly() -> None:
    """(Run both ways: WIRESPAN_PURE_PYTHON=1 replays through the pure-Python frame walk.)"""
    spans, rstats, stats = replay(PCAP)
    assert rstats["packets"] == 59 and rstats["connections"] == 1 and rstats["drops"] == {}
    assert stats["protocols"] == {"amqp": 1} and stats["connections"] == 1
    assert stats["drops"] == {}, stats["drops"]
    ts, port = _frame_ns(), _server_port()
    assert len(spans) == len(EXPECTED) == 11
    for s, (name, kind, first, last, msg, attrs) in zip(spans, EXPECTED, strict=True):
        assert (s.name, s.kind, s.status_code) == (name, kind, StatusCode.UNSET), s.name
        assert _messaging(s) == attrs, s.name
        assert (s.start_ns, s.end_ns) == (ts[first - 1], ts[last - 1]), s.name
        assert s.attributes["server.address"] == "127.0.0.1" and s.attributes["server.port"] == port
        if msg is None:  # no traceparent: a root span of its own trace
            assert s.parent_span_id == b"", s.name
        else:  # the message's traceparent: its publish and its get or delivery are children of it
            tp = TRACEPARENTS[msg]
            assert (s.trace_id.hex(), s.parent_span_id.hex()) == (tp[3:35], tp[36:52]), s.name
    # every trace is its own apart from the messages' (one each: publish, then get or delivery)
    traces = Counter(s.trace_id for s in spans)
    assert sorted(traces.values()) == [1] * 5 + [2] * 3


def test_tshark_dissects_the_same_messages_settlements_and_queues() -> None:
    """tshark's amqp dissector of the stored file, frame by frame: the same publishes and gets or
    deliveries (exchange, routing key, body size, message and correlation ids, traceparent,
    delivery tag), the same settlements and the same declared queue."""
    port = _server_port()
    spans, _, _ = replay(PCAP)
    arg = "amqp.method.arguments."
    last: dict = {}
    ts_pub, ts_got, ts_acks, ts_decl, ts_empty = [], [], [], [], 0
    for f in _tshark_frames(PCAP, port):
        key = (f["_from_client"], f.get("amqp.channel"))
        cm = (f.get("amqp.method.class"), f.get("amqp.method.method"))
        if f.get("amqp.type") == "1":
            last[key] = (cm, f)
            if cm == ("60", "80") and f["_from_client"]:
                ts_acks.append(int(f[arg + "delivery_tag"]))
            elif cm == ("50", "11"):
                ts_decl.append(f[arg + "queue"])
            elif cm == ("60", "72"):
                ts_empty += 1
        elif f.get("amqp.type") == "2":
            mcm, m = last[key]
            tp = f.get("traceparent")
            common = (m.get(arg + "exchange", ""), m.get(arg + "routing_key", ""), int(f["amqp.header.body-size"]),
                      f.get("amqp.method.properties.message_id"), f.get("amqp.method.properties.correlation_id"),
                      tp[3:35] if tp else None)
            if mcm == ("60", "40"):
                ts_pub.append(common)
            elif mcm in (("60", "60"), ("60", "71")):
                ts_got.append((*common, int(m[arg + "delivery_tag"])))

    def common(s) -> tuple:
        at = s.attributes
        return (at["messaging.destination.name"], at.get("messaging.rabbitmq.destination.routing_key", ""),
                at["messaging.message.body.size"], at.get("messaging.message.id"),
                at.get("messaging.message.conversation_id"), s.trace_id.hex() if s.parent_span_id else None)

    assert len(ts_pub) == 3 and len(ts_got) == 3 and ts_acks == [1, 2, 3] and ts_empty == 1
    assert [common(s) for s in spans if s.kind == SpanKind.PRODUCER] == ts_pub
    assert [(*common(s), s.attributes["messaging.rabbitmq.message.delivery_tag"]) for s in spans
            if s.kind == SpanKind.CONSUMER and "messaging.message.body.size" in s.attributes] == ts_got
    assert [s.attributes["messaging.rabbitmq.message.delivery_tag"] for s in spans
            if s.attributes.get("messaging.operation.type") == "settle"] == ts_acks
    assert [s.attributes["messaging.destination.name"] for s in spans if s.name.startswith("queue.declare")] == ts_decl
    assert sum(1 for s in spans if s.attributes.get("messaging.batch.message_count") == 0) == ts_empty


# -- the fix the fixture showed: a basic.get's settlement is named by the get's queue -------------
class Driver(SessionDriver):
    def __init__(self) -> None:
        super().__init__(a, 5672, ts_step=100)
        c, s = w.handshake_client(), w.handshake_server()
        self.send(True, c[0])
        self.send(False, s[0])
        self.send(True, c[1] + c[2])
        self.send(False, s[1])


def M(m: object) -> bytes:
    return w.method(1, m)


def test_an_ack_of_a_got_message_names_the_gets_queue() -> None:
    """Before any basic.consume the channel has no consumer to name a settlement by; the queue
    of its basic.get is the one the message came from (the fixture's frame 41 was ``ack``)."""
    d = Driver()
    d.send(True, M(spec.Basic.Get(queue="jobs.q")))
    d.send(False, M(spec.Basic.GetOk(1, False, "", "jobs.q", 0)) + w.content(1, b"job"))
    d.send(True, M(spec.Basic.Ack(1)))
    assert [(s.name, s.attributes.get("messaging.destination.subscription.name")) for s in d.spans] == \
        [("receive jobs.q", "jobs.q"), ("ack jobs.q", "jobs.q")]


def test_a_settlement_of_a_channel_with_messages_of_two_queues_names_none() -> None:
    """A consumer of one queue and a get of another on the channel: the delivery tag alone does not
    tell which queue a settlement's message came from, so no queue is claimed."""
    d = Driver()
    d.send(True, M(spec.Basic.Consume(queue="a.q", consumer_tag="t1")))
    d.send(False, M(spec.Basic.ConsumeOk("t1")))
    d.send(True, M(spec.Basic.Get(queue="b.q")))
    d.send(False, M(spec.Basic.GetOk(1, False, "", "b.q", 0)) + w.content(1, b"b"))
    d.send(True, M(spec.Basic.Ack(1)))
    ack = d.spans[-1]
    assert ack.name == "ack" and "messaging.destination.subscription.name" not in ack.attributes
    # a get of the consumer's own queue: one queue again
    d.send(True, M(spec.Basic.Get(queue="a.q")))
    d.send(False, M(spec.Basic.GetOk(2, False, "", "a.q", 0)) + w.content(1, b"a"))
    d.send(True, M(spec.Basic.Ack(2)))
    assert d.spans[-1].name == "ack a.q"
