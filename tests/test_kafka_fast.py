"""The whole-request fast path's shortcuts (flat.py) against the streaming walkers.

flat.py skips work the walkers do: a Fetch topic's partitions are unpacked in one
call at a fixed stride (flexible versions: only while every partition's tagged-field
count is 0), a produce partition holding exactly one v2 batch is read with one header
unpack, the first record is walked only when the bytes of a ``traceparent`` header key
occur in it, and topic names come from a bounded cache. Each shortcut must give
exactly the walkers' result, on requests encoded by kafka-python (hypothesis picks the
shapes) and on hand-made edge cases.

The C accelerator (_flat.c) is held to flat.py's own walk (``parse_request_py``, the
reference): wherever C returns a result it must equal Python's exactly (same values,
same representations), and wherever Python raises Malformed C must return None --
on valid requests, mutated and truncated ones, and random bodies. The C tests load
the extension directly, so they run with ``WIRESPAN_PURE_PYTHON=1`` too;
``WIRESPAN_KAFKA_FLAT_SO=/tmp/x.so`` loads another build (the ASAN pass, see the
kafka README).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import struct
import tracemalloc
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols.errors import Malformed
from processors.protocols.kafka import flat
from processors.protocols.kafka.session import parse_request
from processors.protocols.kafka.state import Msg
from service import speedups
from service.largebuf import LargeBuffer
from tests.support.kafka_wire import TRACEPARENT, fetch_request, produce_request, records

TP = TRACEPARENT.encode()
#: Raise for a long run: WIRESPAN_FUZZ_EXAMPLES=3000 pytest tests/test_kafka_fast.py
EXAMPLES = max(80, int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "80")) // 4)
#: The traceparent header key as it appears inside a record (varint 11, zigzag: 0x16).
TP_WIRE = b"\x16traceparent"


def _summary(m):
    return (m.api_key, m.version, m.corr, m.client_id, m.acks if m.api_key == 0 else None,
            [(t.name, t.topic_id, t.partitions, t.offsets, t.records, t.records_unknown, t.traceparent)
             for t in m.topics])


def _load_c():
    """The accelerator module, set up as flat.py does, or None (printed reason) when not built."""
    path = os.environ.get("WIRESPAN_KAFKA_FLAT_SO")
    if path:
        spec = importlib.util.spec_from_file_location("processors.protocols.kafka._flat", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module("processors.protocols.kafka._flat")
        except ImportError as e:
            if speedups.REQUIRED:
                raise
            print(f"kafka _flat accelerator not built ({e}): C equivalence tests skip")
            return None
    mod.setup(*flat.C_SETUP)
    return mod


C = _load_c()
needs_c = pytest.mark.skipif(C is None, reason="the _flat C accelerator is not built (python setup.py build_ext -i)")
#: C-vs-Python examples per property test; raise for a long local run (e.g. 20000).
C_EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "150"))


def _exact(m: Msg):
    """Everything a parse leaves on a Msg and its topics, representations included."""
    d = dict(vars(m))
    topics = d.pop("topics")
    return d, [(type(t), t.name, t.topic_id, type(t._p), t._p, vars(t), t.records, t.traceparent) for t in topics]


def c_check(data: bytes, scan: int = 1 << 20, want_tp: bool = True) -> str:
    """Hold C to Python on ``data``: 'same' (C's result equals Python's), 'declined'
    (C returned None: Python's walk decides), or 'rejected' (Python raised, C declined)."""
    mv = memoryview(data)
    try:
        py = _exact(flat.parse_request_py(mv, scan))
    except Malformed:
        py = None
    r = C.request(mv, scan, want_tp)
    if r is None:
        return "rejected" if py is None else "declined"
    assert py is not None, "C accepted a request flat.py rejects"
    assert _exact(flat._c_msg(r)) == py
    return "same"


def both(data: bytes, seg: int = 7, scan: int = 1 << 20):
    """(fast path result, streaming walker result over ``seg``-byte chunks); the fast
    path (C when built) also equals flat.py's own walk exactly."""
    mv = memoryview(data)
    fast = flat.parse_request(mv, scan)
    assert _exact(fast) == _exact(flat.parse_request_py(mv, scan))
    if C is not None and data[4:6] in (b"\x00\x00", b"\x00\x01"):
        assert c_check(data, scan) == "same"  # every valid Produce/Fetch here is C's to parse
    slow = parse_request(LargeBuffer(*[mv[i:i + seg] for i in range(0, len(mv), seg)]), scan)
    return _summary(fast), _summary(slow)


def _ids(names):
    return {n: uuid.uuid5(uuid.NAMESPACE_DNS, n).bytes for n in names}


_names = st.sampled_from(["orders", "audit", "a", "t.x_y-z", "n" * 130, "n" * 249])
_fetch_topics = st.dictionaries(
    _names, st.lists(st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**63 - 1)), max_size=70), max_size=4)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.integers(0, 18), topics=_fetch_topics)
def test_fetch_fixed_stride_skip_agrees_with_walker(version, topics):
    """Up to 70 partitions per topic: both the generated checks (<= 64) and the generic ones."""
    fast, slow = both(fetch_request(version, topics, ids=_ids(topics)))
    assert fast == slow
    assert [t[2] for t in fast[5]] == [[p for p, _ in parts] for parts in topics.values()]


_headers = st.lists(st.tuples(st.sampled_from(["traceparent", "tracestate", "x", "traceparentx", "b3"]),
                              st.sampled_from([TP, b"", b"v" * 200, TP_WIRE + b"n" + TP])), max_size=3)
_payload = st.sampled_from([b"", b"k", b"v" * 100, b"v" * 300, TP_WIRE + b"n" + TP, b"x" + TP_WIRE * 2])
_batch = st.builds(lambda n, k, v, h, c: records(n, key=k, value=v, headers=h, compression=c),
                   st.integers(1, 4), st.one_of(st.none(), _payload), _payload, _headers, st.sampled_from([0, 0, 1]))
_batch_strategy = _batch  # (the name is reused below for a hand-made batch builder)
_parts = st.dictionaries(st.integers(0, 1000), st.one_of(st.none(), _batch,
                                                         st.builds(lambda a, b: a + b, _batch, _batch)), max_size=3)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.integers(3, 13), topics=st.dictionaries(_names, _parts, min_size=1, max_size=3),
       scan=st.sampled_from([0, 100, 1 << 20]))
def test_produce_shortcuts_agree_with_walker(version, topics, scan):
    """One-batch partitions, the traceparent search (hits inside keys, values and other
    headers), several batches, compressed ones and the scan cap."""
    fast, slow = both(produce_request(version, topics, ids=_ids(topics)), scan=scan)
    assert fast == slow


def _one_record_produce(key: bytes | None, value: bytes, headers: list, version: int = 9) -> bytes:
    return produce_request(version, {"orders": {0: records(1, key=key, value=value, headers=headers)}})


@pytest.mark.parametrize("version", [3, 9])
def test_traceparent_bytes_in_a_value_or_key_are_not_a_header(version):
    fake = TP_WIRE + b"n" + TP
    for key, value, headers in ((None, fake, []), (fake, b"v", []), (b"k", fake, [("other", fake)])):
        fast, slow = both(_one_record_produce(key, value, headers, version))
        assert fast == slow
        assert fast[5][0][6] is None
    # The real header is found even behind a false hit in the value.
    fast, slow = both(_one_record_produce(b"k", fake, [("traceparent", TP)], version))
    assert fast == slow and fast[5][0][6] == TP


def test_only_the_first_records_headers_count():
    batch = records(1, headers=[]) + records(1, headers=[("traceparent", TP)], offset=1)
    both_ = both(produce_request(9, {"orders": {0: batch}}))
    assert both_[0] == both_[1] and both_[0][5][0][6] is None
    # A second partition's first record still counts for the topic.
    both_ = both(produce_request(9, {"orders": {0: records(1), 1: records(2, headers=[("traceparent", TP)])}}))
    assert both_[0] == both_[1] and both_[0][5][0][6] == TP


def _with_partition_tags(data: bytes, partition_max: bytes = b"\x00\x10\x00\x00") -> bytes:
    """Give the first partition of a flexible Fetch request one unknown tagged field."""
    i = data.index(partition_max + b"\x00") + 4  # the partition's tagged-field count byte
    out = data[:i] + b"\x01\x05\x02hi" + data[i + 1:]
    return (len(out) - 4).to_bytes(4, "big") + out[4:]


@pytest.mark.parametrize("version", [12, 13, 15, 18])
def test_fetch_partition_with_tagged_fields_falls_back_to_the_walk(version):
    data = _with_partition_tags(fetch_request(version, {"orders": [(3, 7), (4, 8), (5, 9)], "audit": [(1, 2)]},
                                              ids=_ids(["orders", "audit"])))
    fast, slow = both(data)
    assert fast == slow
    assert fast[5][0][2:4] == ([3, 4, 5], {3: 7, 4: 8, 5: 9})


def test_negative_partition_in_a_fixed_stride_topic_is_malformed():
    for v in (4, 12):
        data = bytearray(fetch_request(v, {"orders": [(1, 7), (0x01020304, 8)]}))
        i = data.index(b"\x01\x02\x03\x04")  # the second partition's index
        data[i:i + 4] = b"\xff\xff\xff\xfe"
        flat.parse_request(memoryview(fetch_request(v, {"orders": [(1, 7), (0x01020304, 8)]})), 0)
        with pytest.raises(Malformed):
            flat.parse_request(memoryview(bytes(data)), 1 << 20)


def test_topic_name_cache_holds_only_valid_names_and_is_bounded(monkeypatch):
    monkeypatch.setattr(flat, "MAX_NAME_CACHE", 8)
    flat._NAMES.clear()
    for i in range(20):
        m = flat.parse_request_py(memoryview(fetch_request(4, {f"t{i}": [(0, 1)]})), 0)
        assert m.topics[0].name == f"t{i}"
        assert len(flat._NAMES) <= 8
    bad = bytearray(fetch_request(4, {"ab": [(0, 1)]}))
    bad[bad.index(b"ab")] = ord("*")
    for _ in range(2):  # rejected each time, never cached
        with pytest.raises(Malformed):
            flat.parse_request(memoryview(bytes(bad)), 0)
    assert b"*b" not in flat._NAMES


@needs_c
def test_c_name_caches_hold_only_valid_names_and_are_bounded():
    C.clear_caches()
    assert C.cache_sizes() == (0, 0)
    bad = bytearray(fetch_request(4, {"ab": [(0, 1)]}, client_id="c"))
    bad[bad.index(b"ab")] = ord("*")
    assert c_check(bytes(bad)) == "rejected"
    assert C.cache_sizes()[0] == 0  # the invalid name was not cached
    for i in range(3000):  # more distinct names and client ids than slots
        data = fetch_request(4, {f"t{i}": [(0, 1)]}, client_id=f"client-{i}")
        r = C.request(memoryview(data), 0, True)
        assert r[4] == f"client-{i}" and r[8][0].name == f"t{i}"
    names, cids = C.cache_sizes()
    assert 0 < names <= 1024 and 0 < cids <= 256
    long_cid = "x" * 200  # longer than MAX_CACHED_CLIENT_ID: decoded, not cached
    C.clear_caches()
    assert C.request(memoryview(fetch_request(4, {"a": [(0, 1)]}, client_id=long_cid)), 0, True)[4] == long_cid
    assert C.cache_sizes() == (1, 0)


def test_lazy_partitions_and_offsets_merge_with_responses():
    """The fast path's unpacked tuple becomes a list/dict on first use, in either order."""
    m = flat.parse_request(memoryview(fetch_request(4, {"orders": [(1, 10), (2, 20)]})), 0)
    t = m.topics[0]
    assert t.offsets == {1: 10, 2: 20}
    t.partitions.append(3)
    assert t.partitions == [1, 2, 3] and t.offsets == {1: 10, 2: 20}
    m = flat.parse_request(memoryview(fetch_request(12, {"orders": [(1, 10), (2, 20)]})), 0)
    t = m.topics[0]
    assert t.partitions == [1, 2] and t.offsets == {1: 10, 2: 20}


@pytest.mark.parametrize("version", [4, 12])
def test_span_reads_served_from_the_unpacked_tuple_match_the_list_and_dict(version):
    parts = [(5, 50), (6, 60), (5, 55)]  # a repeated partition: the last offset wins, as in a dict
    m = flat.parse_request(memoryview(fetch_request(version, {"orders": parts})), 0)
    t = m.topics[0]
    reads = (t.partition_count, t.first_partition, t.offset_of(5), t.offset_of(6), t.offset_of(7),
             t.has_partition(6), t.has_partition(7))
    assert type(t._p) is tuple  # nothing materialized by those reads
    t.partitions  # noqa: B018 (materialize)
    assert reads == (t.partition_count, t.first_partition, t.offset_of(5), t.offset_of(6), t.offset_of(7),
                     t.has_partition(6), t.has_partition(7)) == (3, 5, 55, 60, None, True, False)
    assert t.offsets == {5: 55, 6: 60}


def test_poll_span_offset_of_the_only_partition_that_returned_records():
    from tests.support.kafka_wire import Driver, fetch_response

    d = Driver()
    d.request(fetch_request(12, {"orders": [(0, 100), (1, 200), (2, 300)]}, corr=7))
    d.response(fetch_response(12, {"orders": [(0, 0, 9, None), (1, 0, 9, records(2)), (2, 0, 9, None)]}, corr=7))
    (s,) = d.spans
    assert s.attributes["messaging.destination.partition.id"] == "1"
    assert s.attributes["messaging.kafka.offset"] == 200
    assert s.attributes["messaging.kafka.partition.count"] == 3


@pytest.mark.parametrize("version", [4, 12, 13])
def test_many_partitions_are_walked_and_unpackers_stay_bounded(version):
    """A topic with more partitions than MAX_LAYOUT_PARTITIONS builds no unpacker for
    its count (a hostile message cannot grow the cache with the counts it declares)."""
    for np in (flat.MAX_LAYOUT_PARTITIONS + 1, 300, 1000):
        parts = [(i, 10 * i) for i in range(np)]
        fast, slow = both(fetch_request(version, {"orders": parts, "audit": [(1, 2)]}, ids=_ids(["orders", "audit"])))
        assert fast == slow and fast[5][0][2] == list(range(np))
    for layouts in flat._FETCH_N.values():
        assert max(layouts, default=0) <= flat.MAX_LAYOUT_PARTITIONS


def _zz(n: int) -> bytes:
    """A zigzag varint, as Kafka record fields are encoded."""
    u = (n << 1) ^ (n >> 63)
    out = bytearray()
    while u >= 0x80:
        out.append(u & 0x7F | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def _batch(ts_delta: int, offset_delta: int, key: bytes | None, headers: list[tuple[bytes, bytes]]) -> bytes:
    """One v2 batch of one record, written by hand for field values kafka-python's
    builder never makes for a first record (non-zero timestamp/offset deltas)."""
    import struct

    body = (b"\x00" + _zz(ts_delta) + _zz(offset_delta) + (_zz(-1) if key is None else _zz(len(key)) + key)
            + _zz(1) + b"v" + _zz(len(headers)) + b"".join(_zz(len(k)) + k + _zz(len(v)) + v for k, v in headers))
    rec = _zz(len(body)) + body
    head = struct.pack(">ibIhiqqqhii", 0, 2, 0, 0, offset_delta, 0, 0, -1, -1, -1, 1)
    return struct.pack(">qi", 0, len(head) + len(rec)) + head + rec


@pytest.mark.parametrize("ts_delta,offset_delta", [(0, 0), (1 << 40, 0), (-5, 300), (100, 1)])
@pytest.mark.parametrize("first", [True, False])
def test_first_record_walk_with_multibyte_prefix_fields(ts_delta, offset_delta, first):
    headers = [(b"traceparent", TP), (b"x", b"y")] if first else [(b"x", b"y" * 200), (b"traceparent", TP)]
    for key in (None, b"", b"k" * 70):
        data = produce_request(9, {"orders": {0: _batch(ts_delta, offset_delta, key, headers)}})
        fast, slow = both(data)
        assert fast == slow and fast[5][0][6] == TP


# -- the C accelerator against flat.py's walk ---------------------------------------------
_small_names = st.sampled_from(["orders", "audit", "a", "t.x_y-z", "n" * 249])
_fetch_small = st.dictionaries(
    _small_names, st.lists(st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**63 - 1)), max_size=6), max_size=3)
#: Partitions as _parts, plus legacy message sets (magic 0/1) and several batches.
_legacy_set = st.builds(lambda n, m: records(n, magic=m), st.integers(1, 3), st.sampled_from([0, 1]))
_parts_c = st.dictionaries(st.integers(0, 1000), st.one_of(
    st.none(), _batch_strategy, _legacy_set,
    st.builds(lambda a, b: a + b, st.one_of(_batch_strategy, _legacy_set), _batch_strategy)), max_size=3)
_produce_small = st.dictionaries(_small_names, _parts_c, min_size=1, max_size=3)
_client_ids = st.sampled_from([None, "", "producer-1", "x" * 200, "caf\u00e9"])


@st.composite
def _valid_request(draw) -> bytes:
    """A Produce (v0-v13) or Fetch (v0-v18) request encoded by kafka-python."""
    cid = draw(_client_ids)
    if draw(st.booleans()):
        topics = draw(_produce_small)
        return produce_request(draw(st.integers(0, 13)), topics, ids=_ids(topics), client_id=cid,
                               corr=draw(st.integers(0, 2**31 - 1)), acks=draw(st.sampled_from([-1, 0, 1])))
    topics = draw(_fetch_small)
    return fetch_request(draw(st.integers(0, 18)), topics, ids=_ids(topics), client_id=cid,
                         corr=draw(st.integers(0, 2**31 - 1)))


_fuzz = settings(max_examples=C_EXAMPLES, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_SCANS = st.sampled_from([0, 1, 100, 1 << 20])


@needs_c
@_fuzz
@given(data=_valid_request(), scan=_SCANS)
def test_c_equals_python_on_valid_requests(data, scan):
    """Every valid request (no repeated topic) is C's, with exactly Python's result."""
    assert c_check(data, scan) == "same"


#: Bytes that sit on the edges of Kafka's encodings: 0, varint continuation, sign bits,
#: the traceparent key's length byte.
_EDGE_BYTES = st.one_of(st.sampled_from([0, 1, 2, 0x16, 0x7F, 0x80, 0xFE, 0xFF]), st.integers(0, 255))


@needs_c
@_fuzz
@given(data=st.data(), scan=_SCANS)
def test_c_agrees_on_mutated_and_truncated_requests(data, scan):
    """Byte flips (mostly in the header and topic structure, some in record data) and
    cuts: C either gives Python's result or declines; never accepts what Python rejects."""
    b = bytearray(data.draw(_valid_request()))
    n = len(b)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.one_of(st.integers(4, min(n - 1, 160)), st.integers(4, n - 1)))
        b[i] = data.draw(_EDGE_BYTES)
    if data.draw(st.booleans()):
        del b[data.draw(st.integers(14, n)):]
    if data.draw(st.integers(0, 3)) == 0:  # an inserted or deleted byte shifts everything after it
        i = data.draw(st.integers(14, len(b)))
        if data.draw(st.booleans()):
            b[i:i] = bytes([data.draw(_EDGE_BYTES)])
        else:
            del b[i:i + 1]
    c_check(bytes(b), scan)


_MOSTLY_ZERO = st.sampled_from([0] * 12 + [1, 2, 3, 0x16, 0x61, 0x7F, 0x80, 0xFF])


@needs_c
@_fuzz
@given(key=st.sampled_from([0, 1]), version=st.integers(-1, 19), cid=st.integers(-2, 20),
       body=st.one_of(st.binary(max_size=300), st.lists(_MOSTLY_ZERO, max_size=120).map(bytes)), scan=_SCANS)
def test_c_agrees_on_random_bodies(key, version, cid, body, scan):
    """Random bytes after a plausible header; edge bytes (runs of 0, 1, 0xFF) often make
    small valid requests (empty or null topic arrays, empty names rejected)."""
    head = struct.pack(">ihhih", 10 + len(body), key, version, 1, cid)
    c_check(head + body, scan)


@needs_c
@_fuzz
@given(key=st.integers(-1, 95), version=st.integers(-1, 19), corr=st.sampled_from([-1, 0, 7]),
       cid=st.integers(-2, 20), body=st.one_of(st.binary(max_size=40), st.lists(_MOSTLY_ZERO, max_size=40).map(bytes)),
       scan=_SCANS)
def test_c_reads_other_requests_headers_as_python_does(key, version, corr, cid, body, scan):
    """Any API key: C takes the header (key and version known, correlation id, client id,
    tagged fields) exactly as flat.request_header does, or declines."""
    head = struct.pack(">ihhih", 10 + len(body), key, version, corr, cid)
    c_check(head + body, scan)


@needs_c
def test_c_reads_the_headers_of_requests_that_make_no_span():
    """ApiVersions, Metadata, Heartbeat (flexible and not, with and without a client id) are C's."""
    from tests.support.kafka_wire import metadata_request
    for v in (0, 4, 9, 12):
        assert c_check(metadata_request(v, ["orders"], client_id="admin-1")) == "same"
        assert c_check(metadata_request(v, None, client_id="caf\u00e9")) == "same"
    assert c_check(_api_versions(3)[0]) == "same"
    assert c_check(_heartbeat(4)[0]) == "same"
    assert flat.parse_request(memoryview(_heartbeat(4)[0]), 0).client_id == "c"


@needs_c
@pytest.mark.parametrize("want_tp", [True, False])
def test_c_honours_want_tp_as_python_does(monkeypatch, want_tp):
    monkeypatch.setattr(Msg, "want_tp", want_tp)
    data = produce_request(9, {"orders": {0: records(2, headers=[("traceparent", TP)])}})
    assert c_check(data, want_tp=want_tp) == "same"
    assert C.request(memoryview(data), 1 << 20, want_tp)[8][0].traceparent == (TP if want_tp else None)


@needs_c
def test_c_declines_what_it_does_not_handle():
    """Unknown API keys, repeated topics, non-contiguous views, huge scan caps: Python's."""
    assert C.request(memoryview(struct.pack(">ihhih", 10, 93, 0, 1, -1)), 0, True) is None
    assert C.request(memoryview(struct.pack(">ihhih", 10, -1, 0, 1, -1)), 0, True) is None
    dup = fetch_request(4, {"orders": [(0, 1)], "ordert": [(1, 2)]})
    dup = dup.replace(b"ordert", b"orders")
    assert c_check(dup) == "declined"
    assert [t.partitions for t in flat.parse_request(memoryview(dup), 0).topics] == [[0, 1]]
    data = fetch_request(4, {"orders": [(0, 1)]})
    assert C.request(memoryview(data)[::1], 0, True) is not None
    assert C.request(memoryview(data + data)[::2], 0, True) is None  # strided: not a simple buffer
    assert C.request(memoryview(data), 1 << 70, True) is None
    with pytest.raises(TypeError):
        C.request(memoryview(data), 0)


@needs_c
@pytest.mark.parametrize("version", [4, 12, 13])
def test_c_many_and_tagged_partitions(version):
    """Topics past MAX_LAYOUT_PARTITIONS and partitions with tagged fields: C walks them
    (list + dict, as flat.py) instead of the fixed-stride tuple."""
    parts = [(i, 10 * i) for i in range(flat.MAX_LAYOUT_PARTITIONS + 6)]
    assert c_check(fetch_request(version, {"orders": parts, "audit": [(1, 2)]}, ids=_ids(["orders", "audit"]))) \
        == "same"
    if version >= 12:
        data = _with_partition_tags(fetch_request(version, {"orders": [(3, 7), (4, 8)]}, ids=_ids(["orders"])))
        assert c_check(data) == "same"
        assert type(C.request(memoryview(data), 0, True)[8][0]._p) is list


@needs_c
def test_c_allocates_nothing_that_outlives_a_parse():
    """Reference leaks on any path (results, declines, errors) would grow traced memory."""
    inputs = [fetch_request(v, {"orders": [(0, 1000), (1, 2000)], "audit": [(2, 5)]}, ids=_ids(["orders", "audit"]))
              for v in (4, 12, 13)]
    inputs += [produce_request(v, {"orders": {0: records(3, headers=[("traceparent", TP)]), 1: records(1) * 2}},
                               ids=_ids(["orders"])) for v in (3, 9, 13)]
    inputs += [d[:len(d) - 9] for d in inputs]  # truncated: declined mid-walk
    inputs.append(_with_partition_tags(fetch_request(12, {"orders": [(3, 7), (4, 8)]})))
    views = [memoryview(d) for d in inputs]
    for v in views:
        C.request(v, 1 << 20, True)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            for v in views:
                C.request(v, 1 << 20, True)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 4096, grown


@needs_c
@pytest.mark.parametrize("version,at,null", [(0, -4, b"\xff\xff\xff\xff"), (4, -4, b"\xff\xff\xff\xff"),
                                             (12, -4, b"\x00")])
def test_c_null_and_empty_topic_arrays(version, at, null):
    """A null topics array (-1; compact: 0) is zero topics in flat.py; C agrees. ``at``:
    where the topics array of an empty request is (v12: then forgotten topics, rack, tags)."""
    data = fetch_request(version, {})
    assert c_check(data) == "same"
    n = len(null)
    for repl, verdict in ((null, "same"), (b"\x7f" * n, "rejected")):  # the latter proves ``at``
        assert c_check(data[:at] + repl + data[at + n:]) == verdict


@needs_c
@pytest.mark.parametrize("version", [3, 8, 9, 13])
def test_c_transactional_produce(version):
    from kafka.protocol.producer import ProduceRequest

    T = ProduceRequest.TopicProduceData
    key = {"topic_id": uuid.uuid5(uuid.NAMESPACE_DNS, "orders")} if version >= 13 else {"name": "orders"}
    req = ProduceRequest(version=version, transactional_id="tx-1", acks=-1, timeout_ms=10, topic_data=[
        T(**key, partition_data=[T.PartitionProduceData(index=2, records=records(3, headers=[("traceparent", TP)]))])])
    req.with_header(correlation_id=5, client_id="p")
    data = bytes(req.encode(header=True, framed=True))
    assert c_check(data) == "same"
    assert C.request(memoryview(data), 1 << 20, True)[8][0].traceparent == TP


@needs_c
@pytest.mark.parametrize("data", [produce_request(9, {"orders": {0: records(1)}}, client_id="c"),
                                  fetch_request(12, {"orders": [(0, 1)]}, client_id="c")])
def test_c_request_header_tagged_fields(data):
    """A flexible request header with a tagged field (count 1, tag 0, 2 bytes), and a
    hostile count (> 64 tags): Python's verdict either way."""
    i = 14 + 1  # size, key, version, corr, client id length 1, "c": the header's tag count
    for tags in (b"\x01\x00\x02hi", b"\x02\x00\x00\x05\x01z", b"\x41" + b"\x00\x00" * 65, b"\x01\x00\x7f"):
        mutated = data[:i] + tags + data[i + 1:]
        assert c_check(mutated) == ("same" if tags[0] < 0x40 and tags[-1:] != b"\x7f" else "rejected")


@needs_c
@_fuzz
@given(data=st.data(), version=st.sampled_from([3, 9, 13]), scan=_SCANS)
def test_c_agrees_on_mutated_first_records(data, version, scan):
    """Flips around the first record's fields and headers (the traceparent walk's
    bounds: lengths running past the record, the batch or the view)."""
    key = data.draw(st.sampled_from([None, b"", b"k", b"k" * 70]))
    headers = data.draw(st.sampled_from([[("traceparent", TP)], [("x", b"y"), ("traceparent", TP)],
                                         [("traceparentx", TP), ("traceparent", TP)]]))
    b = bytearray(produce_request(version, {"orders": {0: records(data.draw(st.integers(1, 2)), key=key,
                                                                   headers=headers)}}, ids=_ids(["orders"])))
    at = b.index(TP_WIRE)
    lo, hi = max(14, at - 90), min(len(b) - 1, at + 80)
    for _ in range(data.draw(st.integers(1, 3))):
        b[data.draw(st.integers(lo, hi))] = data.draw(_EDGE_BYTES)
    if data.draw(st.booleans()):
        del b[data.draw(st.integers(lo, len(b))):]
    c_check(bytes(b), scan)


@needs_c
@pytest.mark.parametrize("version", [4, 12, 13])
@pytest.mark.parametrize("count", [2, 32, 33, 200])
def test_c_repeated_topic_among_many_is_declined(version, count):
    """The repeated-topic check (pairwise up to 32 topics, a set beyond) finds the one
    repeat wherever it is; without one, C parses all the topics."""
    names = [f"t{i:03d}" for i in range(count)]
    ids = _ids(names)
    data = fetch_request(version, {n: [(0, 1)] for n in names}, ids=ids)
    assert c_check(data) == "same"
    assert len(C.request(memoryview(data), 0, True)[8]) == count
    last, first = names[-1], names[0]
    old, new = (ids[last], ids[first]) if version >= 13 else (last.encode(), first.encode())
    assert c_check(data.replace(old, new)) == "declined"
    pdata = produce_request(9 if version < 13 else 13, {n: {0: records(1)} for n in names}, ids=ids)
    assert c_check(pdata) == "same"
    assert c_check(pdata.replace(old, new)) == "declined"


def _metadata_run(version: int, resp: bytes, other: bool, walker: bool, monkeypatch) -> tuple:
    from processors.protocols import kafka
    from processors.protocols.errors import ProtocolError
    from tests.support.kafka_wire import Driver, metadata_request
    with monkeypatch.context() as m:
        if walker:
            m.setattr(flat, "metadata_response", lambda *a: None)
        d = Driver(settings=kafka.Settings(other_api_spans=other))
        d.request(metadata_request(version, ["orders", "audit"], corr=5))
        err = None
        try:
            d.response(resp)
        except ProtocolError as e:
            err = (type(e), e.reason)
        cache = d.conn.settings.topic_ids
        return (err, dict(d.drops), [(s.name, sorted(s.attributes.items())) for s in d.spans],
                sorted(cache._d.items()), sorted(d.session._k.pending))


@settings(max_examples=4 * EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 13), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
       st.integers(0, 3), st.booleans())
def test_flat_metadata_response_agrees_with_the_walker(monkeypatch, version, mutations, cut, other):
    """flat.metadata_response (a complete Metadata response read from one view) caches
    what metadata.py's walker caches, and declines whatever the walker might refuse: the
    session ends in the same state (cache, drops, spans, errors, pending) either way, on
    valid, mutated and cut responses (the size kept, so the message is complete)."""
    from tests.support.kafka_wire import metadata_response
    ids = {"orders": uuid.UUID(int=1).bytes, "audit": uuid.UUID(int=2).bytes, "bad name": uuid.UUID(int=3).bytes}
    resp = bytearray(metadata_response(version, ids, corr=5))
    for pos, byte in mutations:
        pos = 4 + pos % (len(resp) - 4)  # the size stays, so the message stays whole
        resp[pos] = byte
    if cut:
        resp = resp[:len(resp) - cut]
        resp[:4] = struct.pack(">i", len(resp) - 4)
    got = _metadata_run(version, bytes(resp), other, False, monkeypatch)
    want = _metadata_run(version, bytes(resp), other, True, monkeypatch)
    assert got == want
    if not mutations and not cut and version >= 10:
        assert len(got[3]) == 2


# -- feed_whole: a segment of whole messages read without the buffer ----------------
def _api_versions(corr: int) -> tuple[bytes, bytes]:
    """ApiVersions v3 (flexible request header; the response header is v0, KIP-511)."""
    body = struct.pack(">hhih", 18, 3, corr, 1) + b"c\x00" + b"\x02k\x021\x00"
    resp = struct.pack(">ih", corr, 0) + b"\x01" + struct.pack(">i", 0) + b"\x00"
    return struct.pack(">i", len(body)) + body, struct.pack(">i", len(resp)) + resp


def _heartbeat(corr: int) -> tuple[bytes, bytes]:
    """Heartbeat v4 (flexible both ways): group, generation, member, no instance id."""
    body = struct.pack(">hhih", 12, 4, corr, 1) + b"c\x00" + b"\x02g" + struct.pack(">i", 1) + b"\x02m\x00\x00"
    resp = struct.pack(">i", corr) + b"\x00" + struct.pack(">ih", 0, 0) + b"\x00"
    return struct.pack(">i", len(body)) + body, struct.pack(">i", len(resp)) + resp


def _conversation() -> list[tuple[bool, bytes]]:
    """What kafka-python does on a connection: ApiVersions, Metadata (topic ids), then Produce,
    Fetch by id and a heartbeat; some requests and responses pipelined in one segment, and an
    unpaired response after a paired one in a segment (the rest goes to the walkers)."""
    from tests.support.kafka_wire import fetch_response, metadata_request, metadata_response, produce_response
    ids = {"orders": uuid.UUID(int=7).bytes}
    av_req, av_resp = _api_versions(1)
    hb_req, hb_resp = _heartbeat(6)
    fetch = fetch_request(13, {"orders": [(0, 3)]}, corr=5, ids=ids)
    produce = produce_request(9, {"orders": {0: records(2, headers=[("traceparent", TRACEPARENT.encode())])}},
                              corr=4)
    return [(True, av_req), (False, av_resp),
            (True, metadata_request(12, ["orders"], corr=2)), (False, metadata_response(12, ids, corr=2)),
            (True, produce_request(9, {"orders": {0: records(1)}}, corr=3)),
            (False, produce_response(9, {"orders": [(0, 0, 41)]}, corr=3)),
            (True, produce + fetch + hb_req),
            (False, produce_response(9, {"orders": [(0, 0, 42)]}, corr=4)
             + fetch_response(13, {"orders": [(0, 0, 9, records(3))]}, corr=5, ids=ids)),
            (False, hb_resp + produce_response(9, {"orders": [(0, 0, 43)]}, corr=99) + hb_resp)]


def test_feed_whole_matches_the_buffered_path_on_a_conversation():
    from processors.protocols import kafka
    from tests.support.whole import run_both_ways
    spans, drops = run_both_ways(kafka.Session, 9092, _conversation())
    assert [s[0] for s in spans] == ["send orders", "send orders", "poll orders"]
    assert drops == {"kafka:unpaired_response": 2}  # corr 99, then the heartbeat answered twice


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=3))
def test_feed_whole_matches_the_buffered_path(mutations: list) -> None:
    """The buffer-less path (feed_whole) gives the buffered path's spans and drops, for the
    conversation with bytes changed and with segments split in two."""
    from processors.protocols import kafka
    from tests.support.whole import mutate, run_both_ways
    run_both_ways(kafka.Session, 9092, mutate(_conversation(), mutations))


def _c_metadata_check(data: bytes, version: int, flex: bool, header_tags: bool) -> str:
    """Hold C's Metadata walk to metadata_response_py: 'same', or 'declined' (Python decides)."""
    mv = memoryview(data)
    py = flat.metadata_response_py(mv, version, flex, header_tags)
    got = C.metadata(mv, version, flex, header_tags)
    if got is None:
        return "declined"
    assert got == py, "C's pairs differ from Python's"
    return "same"


@needs_c
@pytest.mark.parametrize("version", range(14))
def test_c_metadata_equals_python_on_valid_responses(version):
    """Every valid Metadata response is C's, with Python's pairs (bad names and zero ids left out)."""
    from tests.support.kafka_wire import metadata_response
    ids = {"orders": uuid.UUID(int=1).bytes, "audit": uuid.UUID(int=2).bytes, "bad name": uuid.UUID(int=3).bytes,
           "zero": bytes(16), "n" * 249: uuid.UUID(int=4).bytes}
    flex = version >= 9
    for topics in ({}, ids):
        data = metadata_response(version, topics, corr=5)
        assert _c_metadata_check(data, version, flex, flex) == "same"
    pairs = C.metadata(memoryview(data), version, flex, flex)
    assert [n for _t, n in pairs] == (["orders", "audit", "n" * 249] if version >= 10 else [])


@needs_c
@_fuzz
@given(data=st.data(), version=st.integers(0, 13))
def test_c_metadata_agrees_on_mutated_and_cut_responses(data, version):
    """Byte flips, cuts and shifted bytes: C gives Python's pairs or declines, never others."""
    from tests.support.kafka_wire import metadata_response
    ids = {"orders": uuid.UUID(int=1).bytes, "audit": uuid.UUID(int=2).bytes}
    b = bytearray(metadata_response(version, ids, corr=5))
    n = len(b)
    for _ in range(data.draw(st.integers(0, 4))):
        b[data.draw(st.integers(8, n - 1))] = data.draw(_EDGE_BYTES)
    if data.draw(st.booleans()):
        del b[data.draw(st.integers(8, n)):]
    if data.draw(st.integers(0, 3)) == 0:
        i = data.draw(st.integers(8, len(b)))
        if data.draw(st.booleans()):
            b[i:i] = bytes([data.draw(_EDGE_BYTES)])
        else:
            del b[i:i + 1]
    flex = data.draw(st.booleans()) if data.draw(st.integers(0, 4)) == 0 else version >= 9
    _c_metadata_check(bytes(b), version, flex, data.draw(st.booleans()) if flex else False)


@needs_c
@_fuzz
@given(version=st.integers(0, 13), flex=st.booleans(), header_tags=st.booleans(),
       body=st.one_of(st.binary(max_size=200), st.lists(_MOSTLY_ZERO, max_size=120).map(bytes)))
def test_c_metadata_agrees_on_random_bodies(version, flex, header_tags, body):
    _c_metadata_check(struct.pack(">ii", 4 + len(body), 5) + body, version, flex, header_tags)


@needs_c
def test_c_metadata_declines_a_non_contiguous_view():
    from tests.support.kafka_wire import metadata_response
    data = metadata_response(12, {"orders": uuid.UUID(int=1).bytes})
    assert C.metadata(memoryview(data)[::2], 12, True, True) is None
    assert C.metadata(memoryview(data), 1 << 40, True, True) is None
