"""The stored mosquitto + paho-mqtt capture (tests/fixtures/mqtt/record.py), replayed: span for span.

The capture is real traffic, so the span list below is what wirespan must make of what
real clients and a real broker say (MQTT 3.1.1 and 5, all three QoS flows both ways, a
retained message, a topic alias, user properties); tshark's dissection of the same file
is the oracle the second test derives the spans from independently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest

from service.model import Span, SpanKind, StatusCode
from tests.fixtures.mqtt.record import TRACEPARENT
from tests.support.replay import conversations, replay, server_port

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mqtt", "paho_mosquitto_session.pcap")
P, C, S = SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.CLIENT

# (name, kind, destination, QoS, retain, body size, traceparent carried, content type), in the
# order the spans end. None where the attribute does not apply (a (un)subscribe).
_V311: list[tuple[Any, ...]] = [
    ("publish", P, "sensors/v311/status", 1, True, 6, False, None),
    ("subscribe", S, "sensors/v311/+", None, None, None, False, None),
    ("publish", C, "sensors/v311/status", 1, True, 6, False, None),  # the retained status, on subscribing
    ("publish", P, "sensors/v311/temp", 0, False, 4, False, None),
    ("publish", C, "sensors/v311/temp", 0, False, 4, False, None),
    ("publish", P, "sensors/v311/humidity", 1, False, 2, False, None),
    ("publish", C, "sensors/v311/humidity", 1, False, 2, False, None),
    ("publish", C, "sensors/v311/pressure", 1, False, 4, False, None),  # granted QoS 1: acked before
    ("publish", P, "sensors/v311/pressure", 2, False, 4, False, None),  # ... the publisher's PUBCOMP
    ("publish", P, "commands/v311/reboot", 2, False, 3, False, None),
    ("publish", C, "commands/v311/reboot", 2, False, 3, False, None),
    ("publish", P, "audit/v311/login", 1, False, 8, False, None),
    ("unsubscribe", S, "sensors/v311/+", None, None, None, False, None),
    ("publish", P, "sensors/v311/status", 0, True, 0, False, None),  # clears the retained status
]
_V5: list[tuple[Any, ...]] = [
    ("publish", P, "sensors/v5/status", 1, True, 6, True, None),
    ("subscribe", S, "sensors/v5/+", None, None, None, False, None),
    ("publish", C, "sensors/v5/status", 1, True, 6, True, None),  # mosquitto forwards user properties
    ("publish", P, "sensors/v5/temp", 0, False, 11, True, "application/json"),
    ("publish", C, "sensors/v5/temp", 0, False, 11, True, "application/json"),
    ("publish", P, "sensors/v5/humidity", 1, False, 2, False, None),  # sets topic alias 1
    ("publish", C, "sensors/v5/humidity", 1, False, 2, False, None),
    ("publish", C, "sensors/v5/humidity", 1, False, 2, False, None),  # the broker names the topic
    ("publish", P, "sensors/v5/humidity", 1, False, 2, False, None),  # an empty topic: alias 1
    ("publish", C, "sensors/v5/pressure", 1, False, 4, True, None),
    ("publish", P, "sensors/v5/pressure", 2, False, 4, True, None),
    ("publish", P, "commands/v5/reboot", 2, False, 3, True, None),
    ("publish", C, "commands/v5/reboot", 2, False, 3, True, None),
    ("publish", P, "audit/v5/login", 1, False, 8, True, None),  # PUBACK 0x10, no subscribers: a success
    ("unsubscribe", S, "sensors/v5/+", None, None, None, False, None),
    ("publish", P, "sensors/v5/status", 0, True, 0, False, None),
]
_FILTERS = {"v311": ["sensors/v311/+", "commands/v311/#"], "v5": ["sensors/v5/+", "commands/v5/#"]}


def _row(s: Span) -> tuple[Any, ...]:
    a = s.attributes
    op = a["messaging.operation.name"]
    pub = op == "publish"
    traced = s.trace_id.hex() == TRACEPARENT[3:35] and s.parent_span_id.hex() == TRACEPARENT[36:52]
    return (op, s.kind, a["messaging.destination.name"], a.get("messaging.mqtt.qos"),
            a.get("messaging.mqtt.retain", False) if pub else None,
            a.get("messaging.message.body.size"), traced, a.get("messaging.mqtt.content_type"))


@pytest.fixture(scope="module")
def replayed() -> tuple[list[Span], dict[str, Any], dict[str, Any]]:
    return replay(FIXTURE)


def test_replay_makes_exactly_the_sessions_spans(replayed) -> None:
    spans, recv, stage = replayed
    assert [_row(s) for s in spans] == _V311 + _V5
    assert len(spans) == 30
    assert recv["connections"] == 2 and recv["drops"] == {} and not recv["errors"] and not recv["gap_bytes"]
    assert stage["drops"] == {} and stage["protocols"] == {"mqtt": 2} and stage["spans"] == 30
    port = spans[0].attributes["server.port"]
    for s in spans:
        a = s.attributes
        tag = "v5" if "/v5/" in s.name else "v311"
        assert s.name == f"{a['messaging.operation.name']} {a['messaging.destination.name']}"
        assert s.status_code == StatusCode.UNSET and s.start_ns <= s.end_ns
        assert a["messaging.system"] == "mqtt" and a["messaging.client.id"] == f"fixture-{tag}"
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == port
        if a["messaging.operation.name"] == "publish":
            assert a["messaging.operation.type"] == ("send" if s.kind == P else "receive")
            assert "messaging.mqtt.topic_filters" not in a
        else:
            assert a["messaging.mqtt.topic_filters"] == _FILTERS[tag]
            assert "messaging.operation.type" not in a and "messaging.mqtt.qos" not in a
        if s.kind != S and a["messaging.mqtt.qos"] == 0:
            assert s.start_ns == s.end_ns  # a QoS 0 publish ends where it is sent


def _tshark_spans(path: str) -> list[tuple[Any, ...]]:
    """The spans the MQTT exchanges tshark dissects make, by the pairing rules of MQTT itself.

    A PUBLISH ends at itself (QoS 0), at the other side's PUBACK (QoS 1) or PUBCOMP (QoS 2)
    of its packet id; a (UN)SUBSCRIBE at its (UN)SUBACK. Client-to-broker publishes and
    broker deliveries have separate packet ids, so pairing keys on the sender too.
    """
    tshark = shutil.which("tshark")
    assert tshark is not None
    port = subprocess.run([tshark, "-r", path, "-Y", "tcp.flags.syn==1 && tcp.flags.ack==0", "-T", "fields",
                           "-e", "tcp.dstport", "-c", "1"], capture_output=True, text=True, check=True).stdout.strip()
    fields = ["frame.time_epoch", "tcp.stream", "tcp.dstport", "mqtt.msgtype", "mqtt.topic", "mqtt.qos",
              "mqtt.retain", "mqtt.msgid", "mqtt.msg", "mqtt.property.content_type", "mqtt.prop_key",
              "mqtt.prop_value", "mqtt.clientid"]
    cmd = [tshark, "-r", path, "-d", f"tcp.port=={port},mqtt", "-Y", "mqtt", "-T", "fields", "-E", "separator=\t",
           "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    client: dict[str, str] = {}
    pending: dict[tuple[str, bool, str], tuple[Any, ...]] = {}
    spans: list[tuple[Any, ...]] = []
    for line in out.splitlines():
        ts, stream, dport, types, topic, qos, retain, msgid, msg, ctype, keys, values, cid = line.split("\t")
        sec, _, frac = ts.partition(".")
        ns = int(sec) * 1_000_000_000 + int(frac.ljust(9, "0"))
        up = dport == port
        assert ";" not in types, "one MQTT packet a segment in this capture"
        t = int(types)
        if t == 1:
            client[stream] = cid
        elif t == 3:
            props = dict(zip(keys.split(";"), values.split(";"), strict=True)) if keys else {}
            size = 0 if msg in ("", "<MISSING>") else len(msg) // 2
            row = ("publish", P if up else C, topic, int(qos), retain == "1", size,
                   props.get("traceparent") == TRACEPARENT, ctype or None, client[stream], ns)
            if qos == "0":
                spans.append((*row, ns))
            else:
                pending[(stream, up, msgid)] = (*row, 4 if qos == "1" else 7)
        elif t in (8, 10):
            pending[(stream, up, msgid)] = ("subscribe" if t == 8 else "unsubscribe", S, topic.split(";")[0],
                                            None, None, None, False, None, client[stream], ns, t + 1)
        elif t in (4, 7, 9, 11):
            *row, want = pending.pop((stream, not up, msgid))
            assert want == t
            spans.append((*row, ns))
        elif t in (5, 6):  # PUBREC from the receiver, PUBREL from the sender: the flow goes on
            assert pending[(stream, up if t == 6 else not up, msgid)][-1] == 7
    assert not pending
    return spans


def test_spans_agree_with_tshark(replayed) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed: the oracle needs it")
    spans = replayed[0]
    ours = [(*_row(s), s.attributes["messaging.client.id"], s.start_ns, s.end_ns) for s in spans]
    theirs = _tshark_spans(FIXTURE)
    # The same spans, each with the start and end of its first and last packet; in the same order
    # (the order exchanges end), but for two ending in one packet batch's timestamp.
    assert sorted(ours, key=repr) == sorted(theirs, key=repr)
    assert [r[-1] for r in ours] == sorted(r[-1] for r in ours)



def _conversations() -> tuple[int, list[list[tuple[bool, bytes]]]]:
    """(broker port, each connection as its segments: (from client, bytes), in capture order)."""
    return server_port(FIXTURE), conversations(FIXTURE)


@pytest.mark.parametrize("step", [None, 1, 2, 3, 7])
def test_the_sessions_bytes_cut_anywhere_make_the_same_spans(step: int | None) -> None:
    """The real bytes fed to the session directly, whole segments or cut into pieces of
    ``step`` bytes (packets split across reads: the buffered path, never the in-place one)."""
    from processors.protocols import mqtt
    from tests.support.driver import SessionDriver

    port, convs = _conversations()
    assert len(convs) == 2
    rows = []
    for conv in convs:
        d = SessionDriver(mqtt, port)
        for from_client, data in conv:
            d.send(from_client, data, step)
        d.session.close(d.ts)
        assert d.drops == []
        rows += [_row(s) for s in d.spans]
    assert rows == _V311 + _V5
