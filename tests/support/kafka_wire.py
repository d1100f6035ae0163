"""Real Kafka wire bytes for tests and benchmarks, encoded by kafka-python's own protocol
classes (kafka.protocol.producer / consumer / metadata, generated from Apache Kafka's
message JSON), plus a tiny driver feeding bytes to a Kafka ``Session`` as the protocols
stage does (append to the connection's buffer, call ``feed``).
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from kafka.protocol.consumer import FetchRequest, FetchResponse
from kafka.protocol.metadata import MetadataRequest, MetadataResponse
from kafka.protocol.producer import ProduceRequest, ProduceResponse
from kafka.record.memory_records import MemoryRecordsBuilder

from processors.protocols import kafka
from processors.protocols.base import Conn, Perspective
from service.model import Span

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def records(n: int = 1, value: bytes = b"v", key: bytes | None = b"k", headers: list | None = None,
            magic: int = 2, compression: int = 0, offset: int = 0, producer_id: int = -1) -> bytes:
    """A record batch (magic 2) or message set (magic 0/1) of ``n`` records."""
    idem = {"producer_id": producer_id, "producer_epoch": 0, "base_sequence": 0} if producer_id >= 0 else {}
    b = MemoryRecordsBuilder(magic=magic, compression_type=compression, batch_size=1 << 30, offset=offset, **idem)
    for i in range(n):
        b.append(timestamp=1_700_000_000_000 + i, key=key, value=value,
                 headers=(headers or []) if magic == 2 else None)
    b.close()
    return bytes(b.buffer())


def _topic_field(version: int, since: int, name: str, ids: dict[str, bytes] | None) -> dict[str, Any]:
    if version >= since:
        tid = (ids or {}).get(name) or uuid.uuid5(uuid.NAMESPACE_DNS, name).bytes
        return {"topic_id": uuid.UUID(bytes=tid)}
    return {}


def produce_request(version: int, topics: dict[str, dict[int, bytes | None]], corr: int = 1,
                    client_id: str | None = "producer-1", acks: int = 1,
                    ids: dict[str, bytes] | None = None) -> bytes:
    td = []
    for name, parts in topics.items():
        key = _topic_field(version, 13, name, ids) or {"name": name}
        td.append(ProduceRequest.TopicProduceData(
            **key, partition_data=[ProduceRequest.TopicProduceData.PartitionProduceData(index=p, records=r)
                                   for p, r in parts.items()]))
    kw: dict[str, Any] = {"acks": acks, "timeout_ms": 1000, "topic_data": td}
    if version >= 3:
        kw["transactional_id"] = None
    req = ProduceRequest(version=version, **kw)
    req.with_header(correlation_id=corr, client_id=client_id)
    return bytes(req.encode(header=True, framed=True))


def produce_response(version: int, topics: dict[str, list[tuple[int, int, int]]], corr: int = 1,
                     ids: dict[str, bytes] | None = None) -> bytes:
    """``topics``: name -> [(partition, error_code, base_offset)]."""
    rs = []
    T = ProduceResponse.TopicProduceResponse
    for name, parts in topics.items():
        key = _topic_field(version, 13, name, ids) or {"name": name}
        rs.append(T(**key, partition_responses=[
            T.PartitionProduceResponse(index=p, error_code=e, base_offset=o) for p, e, o in parts]))
    resp = ProduceResponse(version=version, responses=rs, throttle_time_ms=0)
    resp.with_header(correlation_id=corr)
    return bytes(resp.encode(header=True, framed=True))


def fetch_request(version: int, topics: dict[str, list[tuple[int, int]]], corr: int = 2,
                  client_id: str | None = "consumer-1", ids: dict[str, bytes] | None = None) -> bytes:
    """``topics``: name -> [(partition, fetch_offset)]."""
    ts = []
    T = FetchRequest.FetchTopic
    for name, parts in topics.items():
        key = _topic_field(version, 13, name, ids) or {"topic": name}
        ts.append(T(**key, partitions=[T.FetchPartition(partition=p, fetch_offset=o, partition_max_bytes=1 << 20)
                                       for p, o in parts]))
    req = FetchRequest(version=version, max_wait_ms=500, min_bytes=1, topics=ts)
    req.with_header(correlation_id=corr, client_id=client_id)
    return bytes(req.encode(header=True, framed=True))


def fetch_response(version: int, topics: dict[str, list[tuple[int, int, int, bytes | None]]], corr: int = 2,
                   ids: dict[str, bytes] | None = None, error: int = 0) -> bytes:
    """``topics``: name -> [(partition, error_code, high_watermark, records)]."""
    rs = []
    T = FetchResponse.FetchableTopicResponse
    for name, parts in topics.items():
        key = _topic_field(version, 13, name, ids) or {"topic": name}
        rs.append(T(**key, partitions=[
            T.PartitionData(partition_index=p, error_code=e, high_watermark=hw, records=r,
                            aborted_transactions=[] if version >= 4 else None)
            for p, e, hw, r in parts]))
    resp = FetchResponse(version=version, throttle_time_ms=0, error_code=error, session_id=0, responses=rs)
    resp.with_header(correlation_id=corr)
    return bytes(resp.encode(header=True, framed=True))


def metadata_request(version: int, topics: list[str] | None, corr: int = 3, client_id: str = "admin-1") -> bytes:
    ts = None if topics is None else [MetadataRequest.MetadataRequestTopic(name=t) for t in topics]
    req = MetadataRequest(version=version, topics=ts, allow_auto_topic_creation=True)
    req.with_header(correlation_id=corr, client_id=client_id)
    return bytes(req.encode(header=True, framed=True))


def metadata_response(version: int, topics: dict[str, bytes], corr: int = 3) -> bytes:
    """``topics``: name -> 16-byte topic id."""
    T = MetadataResponse.MetadataResponseTopic
    B = MetadataResponse.MetadataResponseBroker
    resp = MetadataResponse(
        version=version, throttle_time_ms=0, brokers=[B(node_id=1, host="127.0.0.1", port=9092, rack=None)],
        cluster_id="c1", controller_id=1,
        topics=[T(error_code=0, name=n, topic_id=uuid.UUID(bytes=i), is_internal=False, partitions=[
            T.MetadataResponsePartition(error_code=0, partition_index=0, leader_id=1, leader_epoch=0,
                                        replica_nodes=[1], isr_nodes=[1], offline_replicas=[])])
                for n, i in topics.items()])
    resp.with_header(correlation_id=corr)
    return bytes(resp.encode(header=True, framed=True))


class Driver:
    """Feeds one connection's bytes to a Kafka session like the protocols stage does."""

    def __init__(self, settings: kafka.Settings | None = None, perspective: Perspective = Perspective.PASSIVE,
                 server_port: int = 9092) -> None:
        self.spans: list[Span] = []
        self.drops: Counter[str] = Counter()
        self.conn = Conn(("c", 1), "127.0.0.1", 50000, "127.0.0.1", server_port, self.spans.append,
                         drop=lambda proto, reason: self.drops.update([reason]), perspective=perspective,
                         settings=settings or kafka.Settings(), protocol="kafka")
        self.session = kafka.Session(self.conn)
        self.ts = 1_000_000_000

    def send(self, from_client: bool, data: bytes | memoryview, chunk: int | None = None,
             sizes: list[int] | None = None) -> None:
        buf = self.conn.client_buf if from_client else self.conn.server_buf
        mv = memoryview(data)
        pieces: list[memoryview] = []
        if sizes:
            pos = 0
            for s in sizes:
                pieces.append(mv[pos:pos + s])
                pos += s
            if pos < len(mv):
                pieces.append(mv[pos:])
        elif chunk:
            pieces = [mv[i:i + chunk] for i in range(0, len(mv), chunk)]
        else:
            pieces = [mv]
        for p in pieces:
            self.ts += 1000
            buf.append(p, self.ts)
            self.session.feed(from_client, buf, self.ts)

    def request(self, data: bytes, **kw: Any) -> None:
        self.send(True, data, **kw)

    def response(self, data: bytes, **kw: Any) -> None:
        self.send(False, data, **kw)
