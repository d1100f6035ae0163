"""Kafka parser tests: every Produce/Fetch/Metadata version, pairing, chunking, limits,
zero-copy proof, detection strictness and fuzzing.

Wire bytes come from kafka-python's own protocol classes (tests/support/kafka_wire.py),
fed through a small driver doing what the protocols stage does. Real-broker captures
are in test_kafka_real.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import tracemalloc
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import kafka
from processors.protocols.base import Detection, Perspective
from processors.protocols.errors import ProtocolError
from processors.protocols.kafka import apis
from processors.protocols.kafka.header import RequestHeader
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.kafka_wire import (
    TRACEPARENT,
    Driver,
    fetch_request,
    fetch_response,
    metadata_request,
    metadata_response,
    produce_request,
    produce_response,
    records,
)

IDS = {"orders": uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8").bytes,
       "audit": uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8").bytes}
#: Raise for a long fuzzing run: WIRESPAN_FUZZ_EXAMPLES=5000 pytest tests/test_kafka.py -k fuzz
FUZZ = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "300"))
TP_HEADERS = [("traceparent", TRACEPARENT.encode()), ("other", b"x" * 10)]


@contextlib.contextmanager
def walkers_only():
    """Send every message through the streaming walkers (no whole-message fast path)."""
    from processors.protocols.kafka import flat
    saved = flat.MAX_GATHER
    flat.MAX_GATHER = 0
    try:
        yield
    finally:
        flat.MAX_GATHER = saved


def by_name(spans):
    return {s.name: s for s in spans}


# -- Produce ------------------------------------------------------------------------
@pytest.mark.parametrize("version", range(14))
def test_produce_every_version_all_topics_and_partitions(version):
    d = Driver()
    # magic 2 record batches need Produce v3+; older versions carry message sets.
    magic = 2 if version >= 3 else 1
    hdrs = TP_HEADERS if magic == 2 else None
    req = produce_request(version, {"orders": {0: records(3, headers=hdrs, magic=magic)},
                                    "audit": {0: records(1, magic=magic), 1: records(2, magic=magic)}},
                          corr=7, ids=IDS)
    d.request(req)
    assert d.spans == [] and d.session.pending == 1
    d.response(produce_response(version, {"orders": [(0, 0, 42)], "audit": [(0, 0, 1), (1, 3, 7)]},
                                corr=7, ids=IDS))
    assert d.session.pending == 0 and not d.drops
    assert len(d.spans) == 2
    orders, audit = d.spans
    for s in d.spans:
        assert s.kind == SpanKind.PRODUCER
        a = s.attributes
        assert a["messaging.system"] == "kafka"
        assert a["messaging.operation.type"] == "send" and a["messaging.operation.name"] == "send"
        assert a["messaging.client.id"] == "producer-1"
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == 9092
    if version >= 13:  # topic ids, never seen in Metadata: the id itself is the name
        oid = kafka.codec.uuid_str(IDS["orders"])
        assert orders.name == f"send {oid}" and orders.attributes["messaging.destination.name"] == oid
        assert "*" not in orders.name
    else:
        assert orders.name == "send orders" and audit.name == "send audit"
    assert orders.attributes["messaging.destination.partition.id"] == "0"
    assert orders.attributes["messaging.kafka.offset"] == 42
    assert orders.attributes["messaging.batch.message_count"] == 3
    assert orders.status_code == StatusCode.UNSET
    assert audit.attributes["messaging.batch.message_count"] == 3
    assert audit.attributes["messaging.kafka.partition.count"] == 2
    assert "messaging.destination.partition.id" not in audit.attributes
    assert audit.status_code == StatusCode.ERROR
    assert audit.attributes["error.type"] == "UNKNOWN_TOPIC_OR_PARTITION"
    assert audit.status_message == "UNKNOWN_TOPIC_OR_PARTITION"
    if magic == 2:  # the first record's traceparent joins the trace
        assert orders.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
        assert orders.parent_span_id.hex() == "b7ad6b7169203331"
        assert audit.parent_span_id == b""
    assert orders.start_ns < orders.end_ns


def test_produce_acks0_has_no_response_and_is_emitted_at_once():
    d = Driver()
    d.request(produce_request(8, {"orders": {2: records(5)}}, corr=1, acks=0))
    assert len(d.spans) == 1 and d.session.pending == 0
    s = d.spans[0]
    assert s.name == "send orders" and s.attributes["messaging.destination.partition.id"] == "2"
    assert s.attributes["messaging.batch.message_count"] == 5
    assert "messaging.kafka.offset" not in s.attributes


def test_null_client_id_and_null_records():
    d = Driver()
    d.request(produce_request(9, {"orders": {0: None}}, corr=3, client_id=None))
    d.response(produce_response(9, {"orders": [(0, 0, 0)]}, corr=3))
    (s,) = d.spans
    assert "messaging.client.id" not in s.attributes
    assert s.attributes["messaging.batch.message_count"] == 0


def test_compressed_batch_counted_not_opened_and_legacy_message_sets():
    d = Driver()
    d.request(produce_request(7, {"orders": {0: records(4, headers=TP_HEADERS, compression=1)}}, corr=1))
    d.response(produce_response(7, {"orders": [(0, 0, 9)]}, corr=1))
    (s,) = d.spans
    assert s.attributes["messaging.batch.message_count"] == 4
    assert s.parent_span_id == b""  # gzip batch: headers are not decompressed
    d.request(produce_request(2, {"orders": {0: records(1, magic=0) + records(1, magic=0, offset=1)}}, corr=2))
    d.response(produce_response(2, {"orders": [(0, 0, 10)]}, corr=2))
    assert d.spans[-1].attributes["messaging.batch.message_count"] == 2


def test_several_batches_in_one_partition_are_all_counted():
    d = Driver()
    data = records(3, headers=TP_HEADERS) + records(4, offset=3) + records(5, offset=7)
    d.request(produce_request(9, {"orders": {0: data}}, corr=1))
    d.response(produce_response(9, {"orders": [(0, 0, 0)]}, corr=1))
    assert d.spans[0].attributes["messaging.batch.message_count"] == 12
    assert d.spans[0].trace_id.hex() == TRACEPARENT[3:35]


# -- Fetch --------------------------------------------------------------------------
@pytest.mark.parametrize("version", range(19))
def test_fetch_every_version(version):
    d = Driver()
    magic = 2 if version >= 4 else 1
    hdrs = TP_HEADERS if magic == 2 else None
    d.request(fetch_request(version, {"orders": [(0, 5)], "audit": [(0, 1), (1, 2)]}, corr=11, ids=IDS))
    d.response(fetch_response(version, {
        "orders": [(0, 0, 42, records(4, headers=hdrs, magic=magic, offset=5))],
        "audit": [(0, 0, 1, None), (1, 1, 7, records(2, magic=magic))]}, corr=11, ids=IDS))
    assert not d.drops and len(d.spans) == 2
    orders, audit = d.spans
    for s in d.spans:
        assert s.kind == SpanKind.CONSUMER
        assert s.attributes["messaging.operation.type"] == "receive"
        assert s.attributes["messaging.operation.name"] == "poll"
        assert s.attributes["messaging.client.id"] == "consumer-1"
    if version < 13:
        assert orders.name == "poll orders" and audit.name == "poll audit"
    else:
        assert orders.name == "poll " + kafka.codec.uuid_str(IDS["orders"])
    assert orders.attributes["messaging.kafka.offset"] == 5
    assert orders.attributes["messaging.destination.partition.id"] == "0"
    assert orders.attributes["messaging.batch.message_count"] == 4
    assert audit.attributes["messaging.batch.message_count"] == 2
    assert audit.status_code == StatusCode.ERROR and audit.attributes["error.type"] == "OFFSET_OUT_OF_RANGE"
    if magic == 2:
        assert orders.parent_span_id.hex() == "b7ad6b7169203331"


def test_fetch_top_level_error_marks_every_topic():
    d = Driver()
    d.request(fetch_request(11, {"orders": [(0, 5)]}, corr=1))
    d.response(fetch_response(11, {"orders": [(0, 0, 0, None)]}, corr=1, error=70))
    assert d.spans[0].attributes["error.type"] == "FETCH_SESSION_ID_NOT_FOUND"


def test_incremental_fetch_topics_only_in_response():
    d = Driver()
    d.request(fetch_request(11, {}, corr=1))
    d.response(fetch_response(11, {"orders": [(3, 0, 9, records(2))]}, corr=1))
    (s,) = d.spans
    assert s.name == "poll orders" and s.attributes["messaging.destination.partition.id"] == "3"
    assert "messaging.kafka.offset" not in s.attributes


def test_fetch_response_with_partial_trailing_batch():
    d = Driver()
    d.request(fetch_request(11, {"orders": [(0, 0)]}, corr=1))
    full = records(3)
    d.response(fetch_response(11, {"orders": [(0, 0, 9, full + records(2)[:40])]}, corr=1))
    assert not d.drops
    assert d.spans[0].attributes["messaging.batch.message_count"] == 3


# -- Metadata and the topic-id cache ------------------------------------------------
@pytest.mark.parametrize("version", range(14))
def test_metadata_every_version_fills_cache_from_v10(version):
    d = Driver()
    d.request(metadata_request(version, ["orders", "audit"], corr=5))
    d.response(metadata_response(version, IDS, corr=5))
    assert not d.drops and d.spans == []  # Metadata makes no span by default
    cache = d.conn.settings.topic_ids
    if version >= 10:
        assert cache.get(IDS["orders"]) == "orders" and cache.get(IDS["audit"]) == "audit"
        d.request(fetch_request(13, {"orders": [(0, 1)]}, corr=6, ids=IDS))
        d.response(fetch_response(13, {"orders": [(0, 0, 5, records(1))]}, corr=6, ids=IDS))
        assert d.spans[-1].name == "poll orders"
        assert d.spans[-1].attributes["messaging.kafka.topic.id"] == kafka.codec.uuid_str(IDS["orders"])
    else:
        assert len(cache) == 0


def test_topic_cache_is_shared_by_connections_of_one_processor_and_bounded():
    s = kafka.Settings(topic_id_cache_size=2)
    a, b = Driver(settings=s), Driver(settings=s)
    a.request(metadata_request(12, ["orders"], corr=1))
    a.response(metadata_response(12, IDS, corr=1))
    b.request(produce_request(13, {"orders": {0: records(1)}}, corr=1, ids=IDS))
    b.response(produce_response(13, {"orders": [(0, 0, 1)]}, corr=1, ids=IDS))
    assert b.spans[0].name == "send orders"
    for i in range(5):
        s.topic_ids.put(uuid.uuid4().bytes, f"t{i}")
    assert len(s.topic_ids) == 2


# -- Pairing ----------------------------------------------------------------------
def test_responses_pair_by_correlation_id_in_any_order():
    d = Driver()
    d.request(produce_request(9, {"a": {0: records(1)}}, corr=1))
    d.request(fetch_request(12, {"b": [(0, 10)]}, corr=2))
    d.request(produce_request(9, {"c": {0: records(2)}}, corr=3))
    d.response(produce_response(9, {"c": [(0, 0, 30)]}, corr=3))
    d.response(fetch_response(12, {"b": [(0, 0, 11, records(1))]}, corr=2))
    d.response(produce_response(9, {"a": [(0, 0, 10)]}, corr=1))
    assert [s.name for s in d.spans] == ["send c", "poll b", "send a"]
    assert d.spans[0].attributes["messaging.kafka.offset"] == 30


def test_unpaired_response_is_skipped_and_counted():
    d = Driver()
    d.response(produce_response(9, {"a": [(0, 0, 10)]}, corr=99))
    assert d.drops["unpaired_response"] == 1 and not d.spans
    d.request(produce_request(9, {"a": {0: records(1)}}, corr=1))
    d.response(produce_response(9, {"a": [(0, 0, 10)]}, corr=1))
    assert len(d.spans) == 1


def test_other_apis_no_span_by_default_option_enables():
    d = Driver(settings=kafka.Settings(other_api_spans=True))
    d.request(metadata_request(4, None, corr=1, client_id="adm"))
    d.response(metadata_response(4, {}, corr=1))
    (s,) = d.spans
    assert s.name == "Metadata" and s.kind == SpanKind.CLIENT and s.attributes["messaging.client.id"] == "adm"


def test_pending_requests_are_bounded():
    d = Driver(settings=kafka.Settings(max_pending_requests=4))
    for i in range(10):
        d.request(produce_request(9, {"a": {0: records(1)}}, corr=i))
    assert d.session.pending == 4 and d.drops["pending_evicted"] == 6
    d.session.close(0)
    assert d.drops["unanswered"] == 4


@pytest.mark.parametrize("perspective,kind", [(Perspective.PASSIVE, SpanKind.PRODUCER),
                                              (Perspective.CLIENT, SpanKind.PRODUCER),
                                              (Perspective.SERVER, SpanKind.SERVER)])
def test_perspective(perspective, kind):
    d = Driver(perspective=perspective)
    d.request(produce_request(9, {"a": {0: records(1)}}, corr=1))
    d.response(produce_response(9, {"a": [(0, 0, 10)]}, corr=1))
    assert d.spans[0].kind == kind
    if kind == SpanKind.SERVER:
        assert d.spans[0].attributes["client.address"] == "127.0.0.1"


# -- Chunking, streaming, limits ----------------------------------------------------
def test_byte_by_byte_and_several_messages_per_chunk():
    d = Driver()
    req = produce_request(11, {"orders": {0: records(2, headers=TP_HEADERS)}}, corr=1)
    resp = produce_response(11, {"orders": [(0, 0, 5)]}, corr=1)
    d.request(req, chunk=1)
    d.response(resp, chunk=1)
    req2 = req.replace(b"\x00\x00\x00\x01", b"\x00\x00\x00\x02", 1)
    d.request(req2 + fetch_request(12, {"orders": [(0, 7)]}, corr=3))
    d.response(produce_response(11, {"orders": [(0, 0, 6)]}, corr=2)
               + fetch_response(12, {"orders": [(0, 0, 9, None)]}, corr=3))
    assert [s.name for s in d.spans] == ["send orders", "send orders", "poll orders"]
    assert d.spans[0].parent_span_id.hex() == "b7ad6b7169203331"
    assert len(d.conn.client_buf) == 0 and len(d.conn.server_buf) == 0


def test_big_produce_over_1500_segments_with_split_size_prefix_then_small_request():
    d = Driver()
    value = os.urandom(1_100_000)
    req = produce_request(9, {"orders": {0: records(1, value=value, headers=TP_HEADERS)}}, corr=1)
    assert len(req) > 1_100_000
    step = (len(req) - 4) // 1499 + 1
    sizes = [3, 1] + [step] * 1498
    d.request(req, sizes=sizes)
    assert len(sizes) + 1 >= 1500
    # Bounded: nothing of the 1.1 MB body is held while it streams.
    assert len(d.conn.client_buf) == 0
    d.request(produce_request(9, {"small": {0: records(1)}}, corr=2), sizes=[3, 1])
    d.response(produce_response(9, {"orders": [(0, 0, 77)]}, corr=1))
    d.response(produce_response(9, {"small": [(0, 0, 78)]}, corr=2))
    assert [s.name for s in d.spans] == ["send orders", "send small"]
    assert d.spans[0].trace_id.hex() == TRACEPARENT[3:35]  # headers come after the 1.1 MB value
    assert d.spans[0].attributes["messaging.kafka.offset"] == 77
    assert not d.drops


def test_buffered_bytes_stay_bounded_while_a_large_body_streams():
    d = Driver()
    req = produce_request(9, {"orders": {0: records(40, value=b"x" * 100_000)}}, corr=1)
    buf = d.conn.client_buf
    peak = 0
    mv = memoryview(req)
    for i in range(0, len(req), 1460):
        buf.append(mv[i:i + 1460], i)
        d.session.feed(True, buf, i)
        peak = max(peak, len(buf))
    assert peak <= 2 * 1460
    assert d.session.pending == 1


def test_record_scan_cap_skips_and_counts():
    d = Driver(settings=kafka.Settings(max_records_scan_bytes=1000))
    batches = b"".join(records(2, value=b"y" * 300, offset=i * 2) for i in range(5))
    d.request(produce_request(9, {"orders": {0: batches}}, corr=1))
    d.response(produce_response(9, {"orders": [(0, 0, 1)]}, corr=1))
    assert d.drops["records_over_scan_cap"] == 1
    assert "messaging.batch.message_count" not in d.spans[0].attributes
    assert d.spans[0].name == "send orders"


def _alloc(data: bytes, chunked: bool) -> int:
    d = Driver()
    buf = d.conn.client_buf
    mv = memoryview(data)
    pieces = [mv[i:i + 16384] for i in range(0, len(mv), 16384)] if chunked else [mv]
    d.request(produce_request(9, {"warm": {0: records(1)}}, corr=99))  # warm caches, imports
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for i, p in enumerate(pieces):
            buf.append(p, i)
            d.session.feed(True, buf, i)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert d.session.pending == 2
    return peak


@pytest.mark.parametrize("chunked", [False, True])
def test_zero_copy_allocation_flat_when_payload_grows(chunked):
    small = produce_request(9, {"orders": {0: records(1, value=b"a" * 1024, headers=TP_HEADERS)}}, corr=1)
    big = produce_request(9, {"orders": {0: records(1, value=b"a" * (1 << 20), headers=TP_HEADERS)}}, corr=1)
    a_small = _alloc(small, chunked)
    a_big = _alloc(big, chunked)
    # Chunked: the big message has 64x more chunks, each a list slot in the buffer.
    slack = 4096 if not chunked else 8192
    assert a_big <= a_small + slack, (a_small, a_big)


# -- Header view --------------------------------------------------------------------
def test_request_header_view_decodes_on_access():
    raw = fetch_request(12, {"orders": [(0, 1)]}, corr=1234, client_id="rdkafka")
    buf = LargeBuffer(raw[:5], raw[5:9], raw[9:])
    h = RequestHeader(buf)
    assert (h.message_size, h.api_key, h.api_version, h.correlation_id) == (len(raw) - 4, 1, 12, 1234)
    assert h.client_id == "rdkafka" and h.flexible
    assert h.body_offset() == 14 + 7 + 1  # one byte of (empty) header tagged fields
    h.validate()
    r = h.body_reader()
    assert r.read_i32be() == -1  # replica id
    assert "RequestHeader" in repr(h)


def test_api_tables():
    assert apis.known(0, 13) and not apis.known(0, 14) and apis.known(1, 18) and not apis.known(1, 19)
    assert apis.known(3, 13) and not apis.known(3, 14) and not apis.known(200, 0)
    assert apis.flexible(0, 9) and not apis.flexible(0, 8) and apis.flexible(1, 12) and not apis.flexible(3, 8)
    assert not apis.response_header_flexible(18, 3) and apis.response_header_flexible(3, 9)
    assert apis.error_name(3) == "UNKNOWN_TOPIC_OR_PARTITION" and apis.error_name(9999) == "KAFKA_ERROR_9999"


def test_error_names_match_kafka_python():
    """Our table is Apache Kafka's Errors enum; kafka-python keeps a few pre-2.x names."""
    import kafka.errors as ke
    older = {-1: "UNKNOWN", 0: "NO_ERROR", 6: "NOT_LEADER_FOR_PARTITION", 10: "MESSAGE_SIZE_TOO_LARGE",
             17: "INVALID_TOPIC", 39: "INVALID_REPLICATION_ASSIGNMENT"}
    checked = 0
    for code, name in apis.ERRORS.items():
        cls = ke.for_code(code)
        if cls is ke.UnknownError and code != -1:
            continue
        assert cls.message == older.get(code, name), (code, name, cls.message)
        checked += 1
    assert checked > 100


# -- Detection ---------------------------------------------------------------------
def test_detect_real_requests_and_need_more():
    reqs = [produce_request(v, {"t": {0: records(1)}}) for v in (0, 3, 9, 13)]
    reqs += [fetch_request(v, {"t": [(0, 1)]}) for v in (0, 4, 12, 18)]
    reqs += [metadata_request(v, ["t"]) for v in (0, 9, 13)]
    for r in reqs:
        assert kafka.detect(LargeBuffer(r), True) == Detection.REQUEST
        assert kafka.detect(r, None) == Detection.REQUEST
        assert kafka.detect(r[:6], None) == Detection.NEED_MORE
    resp = produce_response(9, {"t": [(0, 0, 1)]})
    assert kafka.detect(resp, False) == Detection.RESPONSE
    assert kafka.detect(resp + resp[:5], False) == Detection.NEED_MORE
    assert kafka.detect(resp, None) == Detection.NO  # roles unknown: a response alone is too weak


@pytest.mark.parametrize("other", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"*1\r\n$4\r\nPING\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, b"SSH-2.0-OpenSSH_9.2\r\n",
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL SSLRequest
    b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00database\x00x\x00\x00",  # PostgreSQL startup
    b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",  # MQTT CONNECT
    # FastCGI BEGIN_REQUEST + PARAMS: its header reads as a ~16 MiB OffsetCommit v0
    bytes([1, 1, 0, 1, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 4, 0, 1, 0, 20, 4, 0]) + b"\x0b\x05SCRIPT_NAMEindex",
    # HTTP/2 SETTINGS (mid-stream pickup): reads as a Produce v0 with acks 25600
    b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64\x00\x04\x00\x01\x00\x00\x00\x02\x00\x00\x00\x00",
    b"\x00\x00\x20\x01\x05\x00\x00\x00\x01\x82\x86\x84\x41\x8a" + b"x" * 27,  # HTTP/2 HEADERS
])
def test_detect_other_protocols_are_not_kafka(other):
    assert kafka.detect(other, True) != Detection.REQUEST
    assert kafka.detect(other, False) != Detection.RESPONSE


def test_detect_random_bytes_never_kafka():
    rnd = random.Random(1234)
    hits = 0
    for _ in range(100_000):
        b = rnd.randbytes(64)
        if kafka.detect(b, True) == Detection.REQUEST:
            hits += 1
    assert hits == 0


# -- Bad input: counted, never a crash ------------------------------------------------
def _feed_all(d: Driver, from_client: bool, data: bytes, chunk: int | None) -> None:
    try:
        d.send(from_client, data, chunk=chunk)
    except ProtocolError:
        buf = d.conn.client_buf if from_client else d.conn.server_buf
        buf.reset()
        d.session.gap(from_client, 0)


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.booleans(), st.sampled_from([None, 1, 7, 64]), st.booleans())
def test_fuzz_random_bytes_only_protocol_errors(data, from_client, chunk, walkers):
    with walkers_only() if walkers else contextlib.nullcontext():
        d = Driver()
        _feed_all(d, from_client, data, chunk)
        _feed_all(d, True, produce_request(9, {"a": {0: records(1)}}, corr=1), None)


_VALID = [
    (True, produce_request(9, {"orders": {0: records(2, headers=TP_HEADERS)}, "b": {1: None}}, corr=1)),
    (True, produce_request(13, {"orders": {0: records(2)}}, corr=1, ids=IDS)),
    (True, produce_request(3, {"orders": {0: records(2)}}, corr=1)),
    (True, fetch_request(18, {"orders": [(0, 1), (1, 2)]}, corr=1, ids=IDS)),
    (True, fetch_request(4, {"orders": [(0, 1)]}, corr=1)),
]


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(_VALID))), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                     min_size=1, max_size=6),
       st.sampled_from([None, 3, 50]), st.booleans())
def test_fuzz_mutated_messages_only_protocol_errors(which, flips, chunk, walkers):
    with walkers_only() if walkers else contextlib.nullcontext():
        _mutated(which, flips, chunk)


def _mutated(which, flips, chunk):
    from_client, msg = _VALID[which]
    data = bytearray(msg)
    for pos, val in flips:
        data[pos % len(data)] = val
    d = Driver()
    _feed_all(d, from_client, bytes(data), chunk)
    # and a response for whatever got pending
    resp = bytearray(produce_response(9, {"orders": [(0, 0, 1)]}, corr=1))
    for pos, val in flips:
        resp[pos % len(resp)] = val
    _feed_all(d, False, bytes(resp), chunk)


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([(9, 1), (12, 2), (13, 3)]), st.binary(max_size=200), st.integers(0, 400), st.booleans())
def test_fuzz_response_bodies_only_protocol_errors(vk, body, cut, walkers):
    with walkers_only() if walkers else contextlib.nullcontext():
        _response_body(vk, body, cut)


def _response_body(vk, body, cut):
    version, kind = vk
    d = Driver()
    if kind == 1:
        d.request(produce_request(version, {"orders": {0: records(1)}}, corr=5))
        resp = produce_response(version, {"orders": [(0, 0, 1)]}, corr=5)
    elif kind == 2:
        d.request(fetch_request(version, {"orders": [(0, 1)]}, corr=5))
        resp = fetch_response(version, {"orders": [(0, 0, 1, records(2))]}, corr=5)
    else:
        d.request(metadata_request(version, ["orders"], corr=5))
        resp = metadata_response(version, IDS, corr=5)
    framed_body = resp[8:][:cut] + body
    data = (len(framed_body) + 4).to_bytes(4, "big") + resp[4:8] + framed_body
    _feed_all(d, False, data, None)


# The fuzzers above (also run at 6,000 examples each) found no crash; these are hostile
# inputs written by hand: each must end in a counted ProtocolError or a bounded wait.
def _framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


_HDR9 = b"\x00\x00\x00\x09\x00\x00\x00\x01\xff\xff\x00"  # Produce v9, corr 1, null client id, no tags


@pytest.mark.parametrize("data,reason", [
    (_framed(_HDR9 + b"\x00" + b"\x00\x01" + b"\x00\x00\x00\x00" + b"\xff\xff\xff\xff\x07"),
     "bad_length"),  # topic array count ~2^35: larger than the message
    (_framed(_HDR9 + b"\x00\x00\x01\x00\x00\x00\x00\x02\x06orders\x02\x00\x00\x00\x00\xff\xff\xff\x7f"),
     "bad_length"),  # records length 256 MiB inside a 40-byte message
    (_framed(_HDR9[:8] + b"\xff\xfe"), "bad_header"),  # client id length -2
    (b"\x7f\xff\xff\xff" + _HDR9, "bad_size"),  # 2 GiB declared
    (_framed(b"\x00\x63\x00\x00\x00\x00\x00\x01\x00\x00"), "unknown_api"),  # api key 99
    (_framed(b"\x00\x00\x00\x0e\x00\x00\x00\x01\x00\x00"), "unknown_api"),  # Produce v14
    (_framed(b"\x00\x00\x00\x09\xff\xff\xff\xff\x00\x00"), "bad_header"),  # negative correlation id
])
def test_hostile_requests(data, reason):
    d = Driver()
    with pytest.raises(ProtocolError) as e:
        d.request(data)
    assert e.value.reason == reason


def test_huge_declared_message_waits_with_bounded_memory():
    d = Driver()
    hdr = produce_request(9, {"orders": {0: records(1)}}, corr=1)
    body_len = 90 * 1024 * 1024
    fake = body_len.to_bytes(4, "big") + hdr[4:-1]  # claims 90 MiB, then a partition's records run on
    d.request(fake)
    for _ in range(100):  # 100 segments of filler arrive: all streamed past, nothing kept
        d.request(b"\x00" * 1460)
    assert len(d.conn.client_buf) <= 1460 and d.session.pending == 0


def test_gap_resyncs_on_next_message_start():
    d = Driver()
    req = produce_request(9, {"orders": {0: records(3)}}, corr=1)
    d.request(req[:30])
    d.conn.client_buf.reset()
    d.session.gap(True, 0)
    d.request(req[30:])  # the rest of a message we lost the start of: skipped
    assert d.drops["resync_skipped"] == 1
    d.request(produce_request(9, {"orders": {0: records(3)}}, corr=2))
    d.response(produce_response(9, {"orders": [(0, 0, 1)]}, corr=2))
    assert [s.name for s in d.spans] == ["send orders"]


def test_malformed_examples_raise_protocol_errors():
    d = Driver()
    with pytest.raises(ProtocolError):
        d.request(b"\x00\x00\x00\x02ab")  # size below a header
    d = Driver()
    bad_topic = produce_request(9, {"orders": {0: None}}, corr=1).replace(b"orders", b"or ers")
    with pytest.raises(ProtocolError):
        d.request(bad_topic)


def test_settings_reject_typos():
    with pytest.raises(Exception, match="extra"):
        kafka.Settings.model_validate({"max_records_scan_byte": 5})
    assert kafka.Settings.model_validate({"ports": [19092]}).ports == [19092]


# -- Stored real capture (tests/fixtures/kafka, re-recorded by make_fixtures.py) --------
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "kafka", "tansu_kafka_python.pcap")


def test_stored_capture_replay_matches_tshark():
    import shutil
    import subprocess

    from tests.support.replay import replay_spans

    spans = replay_spans(FIXTURE, {"enabled": ["kafka"]})
    # With every protocol enabled (the default), detection still picks Kafka on each connection.
    assert sorted(s.name for s in replay_spans(FIXTURE, {})) == sorted(s.name for s in spans)
    sends = [s for s in spans if s.kind == SpanKind.PRODUCER]
    polls = [s for s in spans if s.kind == SpanKind.CONSUMER]
    assert {s.name for s in sends} == {"send payments", "send ledger"}
    pay = next(s for s in sends if s.name == "send payments")
    assert pay.attributes["messaging.batch.message_count"] == 4
    assert pay.attributes["messaging.kafka.partition.count"] == 2
    assert pay.attributes["messaging.client.id"] == "fixture-producer"
    assert pay.trace_id.hex() == TRACEPARENT[3:35]
    assert sum(s.attributes.get("messaging.batch.message_count", 0) for s in polls
               if s.name == "poll payments") == 4
    assert all(s.attributes["messaging.client.id"] == "fixture-consumer" for s in polls)
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark not installed: the oracle half of this test needs it")
    port = subprocess.run([tshark, "-r", FIXTURE, "-Y", "tcp.flags.syn==1 && tcp.flags.ack==0", "-T", "fields",
                           "-e", "tcp.dstport", "-c", "1"], capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run([tshark, "-r", FIXTURE, "-d", f"tcp.port=={port},kafka", "-Y",
                          "kafka.request_key==0 || kafka.request_key==1", "-T", "fields", "-e", "kafka.request_key",
                          "-e", "kafka.correlation_id", "-e", "kafka.client_id"],
                         capture_output=True, text=True, check=True).stdout
    reqs = [line.split("\t") for line in out.splitlines() if line.strip()]
    # One span per topic per request: each tshark request start is one of our span starts.
    assert len([r for r in reqs if r[0] == "0"]) == len({s.start_ns for s in sends})
    assert len([r for r in reqs if r[0] == "1"]) == len({s.start_ns for s in polls})
    assert {r[2] for r in reqs} == {"fixture-producer", "fixture-consumer"}


def _summary(m):
    return (m.api_key, m.version, m.corr, m.client_id, m.acks if m.api_key == 0 else None,
            [(t.name, t.topic_id, t.partitions, t.offsets, t.records, t.records_unknown, t.traceparent)
             for t in m.topics])


@pytest.mark.parametrize("seg", [1, 7, 1460])
def test_fast_path_and_streaming_walker_agree(seg):
    """Whole requests take flat.py, split ones the walkers: same result for every version."""
    from processors.protocols.kafka import flat
    from processors.protocols.kafka.session import parse_request

    reqs = [produce_request(v, {"orders": {0: records(3, headers=TP_HEADERS), 1: None},
                                "audit": {2: records(1, compression=1) + records(2, offset=1)}}, ids=IDS)
            for v in range(3, 14)]
    reqs += [produce_request(v, {"orders": {0: records(1, magic=1)}}) for v in range(3)]
    reqs += [fetch_request(v, {"orders": [(0, 5), (1, 6)], "audit": [(3, 9)], "empty": []}, ids=IDS)
             for v in range(19)]
    reqs += [metadata_request(v, ["orders"]) for v in (0, 9, 13)]
    for r in reqs:
        mv = memoryview(r)
        fast = flat.parse_request(mv, 1 << 20)
        slow = parse_request(LargeBuffer(*[mv[i:i + seg] for i in range(0, len(mv), seg)]))
        assert _summary(fast) == _summary(slow)


def test_fast_path_and_streaming_walker_agree_on_responses():
    def run(pairs, chunk):
        d = Driver()
        for req, resp in pairs:
            d.request(req, chunk=chunk)
            d.response(resp, chunk=chunk)
        assert not d.drops
        return [(s.name, s.attributes, s.status_code, s.trace_id if s.parent_span_id else None) for s in d.spans]

    pairs = []
    for v in range(14):
        magic = 2 if v >= 3 else 1
        pairs.append((produce_request(v, {"orders": {0: records(2, magic=magic)}, "audit": {1: None, 2: None}},
                                      corr=v, ids=IDS),
                      produce_response(v, {"orders": [(0, 0, 5)], "audit": [(1, 0, 6), (2, 6, 7)]}, corr=v, ids=IDS)))
    for v in range(19):
        magic = 2 if v >= 4 else 1
        pairs.append((fetch_request(v, {"orders": [(0, 5), (1, 6)]}, corr=100 + v, ids=IDS),
                      fetch_response(v, {"orders": [(0, 0, 9, records(3, headers=TP_HEADERS if magic == 2 else None,
                                                                           magic=magic)),
                                                    (1, 1, 9, None)], "audit": [(4, 0, 1, records(1, magic=magic))]},
                                     corr=100 + v, ids=IDS, error=0)))
    fast = run(pairs, None)
    assert len(fast) == 2 * 14 + 2 * 19
    with walkers_only():
        assert fast == run(pairs, 5)


def test_whole_small_message_split_over_chunks_before_feed_uses_scratch_gather():
    d = Driver()
    req = produce_request(9, {"orders": {0: records(2, headers=TP_HEADERS)}}, corr=1)
    resp = produce_response(9, {"orders": [(0, 0, 5)]}, corr=1)
    for data, buf, fc in ((req, d.conn.client_buf, True), (resp, d.conn.server_buf, False)):
        mv = memoryview(data)
        for i in range(0, len(mv), 50):
            buf.append(mv[i:i + 50], i)
        d.session.feed(fc, buf, 0)
    (s,) = d.spans
    assert s.name == "send orders" and s.attributes["messaging.kafka.offset"] == 5
    assert s.trace_id.hex() == TRACEPARENT[3:35]


@pytest.mark.parametrize("chunk", [None, 3])
def test_zero_topic_id_in_response_matches_the_only_request_topic(chunk):
    d = Driver()
    zero = {"orders": bytes(16)}
    d.request(fetch_request(13, {"orders": [(0, 0)]}, corr=1, ids=IDS), chunk=chunk)
    d.response(fetch_response(13, {"orders": [(0, 3, 0, None)]}, corr=1, ids=zero), chunk=chunk)
    (s,) = d.spans
    assert s.name == "poll " + kafka.codec.uuid_str(IDS["orders"])
    assert s.attributes["error.type"] == "UNKNOWN_TOPIC_OR_PARTITION"


@pytest.mark.parametrize("capture", [
    "http2/grpc_calls.pcap", "http2/nginx_curl.pcap", "mysql/pymysql_connector_session.pcap",
    "postgresql/psycopg_session.pcap", "pcap/http_server_lo.pcap",
])
def test_other_protocols_real_captures_never_detected_as_kafka(capture):
    """Kafka alone enabled: every segment of these real conversations (HTTP/2 frames after the
    preface, gRPC, MySQL, PostgreSQL, HTTP/1) is offered to its detection; none may pass."""
    from tests.support.replay import replay

    path = os.path.join(os.path.dirname(__file__), "fixtures", capture)
    if not os.path.exists(path):
        pytest.fail(f"fixture {capture} missing")
    spans, _, stats = replay(path, {"enabled": ["kafka"]})
    assert stats["protocols"].get("kafka", 0) == 0 and spans == []


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(_VALID))), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                     max_size=4),
       st.integers(1, 600), st.sampled_from([True, False, None]), st.binary(max_size=40))
def test_fuzz_detect_never_raises(which, flips, cut, from_client, tail):
    data = bytearray(_VALID[which][1])
    for pos, val in flips:
        data[pos % len(data)] = val
    chunk = bytes(data[:cut]) + tail
    d = kafka.detect(LargeBuffer(chunk[:7], chunk[7:]), from_client)
    assert d in (Detection.NO, Detection.NEED_MORE, Detection.REQUEST, Detection.RESPONSE)


# -- the end of a capture is not a failure (issue 16 class 4) --------------------------------------------
@pytest.mark.parametrize("walk", [False, True])
def test_fetch_response_cut_by_the_end_of_the_capture_is_incomplete(walk):
    """A Fetch whose (large) response began before the capture ended: spans of what was seen,
    marked wirespan.incomplete, per topic; a Produce never answered is counted."""
    ctx = walkers_only() if walk else contextlib.nullcontext()
    with ctx:
        d = Driver()
        d.request(fetch_request(11, {"orders": [(0, 5)]}, corr=21))
        d.request(produce_request(9, {"audit": {0: records(1)}}, corr=22))
        resp = fetch_response(11, {"orders": [(0, 0, 42, records(50, offset=5))]}, corr=21)
        d.response(resp[:len(resp) // 2])
        d.session.close(10**12)
    (s,) = d.spans
    assert s.name == "poll orders" and s.attributes["wirespan.incomplete"] is True
    assert s.status_code == StatusCode.UNSET
    assert d.drops["unanswered"] == 1
