"""MongoDB: lazy BSON, OP_MSG/OP_QUERY/OP_REPLY/OP_COMPRESSED, pairing, bad input, real pymongo.

The real-client tests drive ``pymongo`` against tests/support/mongo_responder.py, a
scripted responder, because no MongoDB server package exists for this machine.
"""

from __future__ import annotations

import struct
import zlib

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.protocols import mongodb as m
from processors.protocols.base import Detection
from processors.protocols.errors import ProtocolError
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.driver import SessionDriver, peak_allocation

HDR = struct.Struct("<iiii")


def op_msg(req_id: int, resp_to: int, doc: dict, flags: int = 0, seq: tuple[str, list[dict]] | None = None,
           checksum: bool = False) -> bytes:
    body = struct.pack("<I", flags | (1 if checksum else 0)) + b"\0" + bson.encode(doc)
    if seq is not None:
        ident, docs = seq
        payload = ident.encode() + b"\0" + b"".join(bson.encode(d) for d in docs)
        body += b"\1" + struct.pack("<i", 4 + len(payload)) + payload
    if checksum:
        body += b"\0\0\0\0"
    return HDR.pack(16 + len(body), req_id, resp_to, m.OP_MSG) + body


def compressed(msg: bytes) -> bytes:
    _length, rid, rto, op = HDR.unpack_from(msg)
    inner = msg[16:]
    body = struct.pack("<iiB", op, len(inner), 2) + zlib.compress(inner)
    return HDR.pack(16 + len(body), rid, rto, m.OP_COMPRESSED) + body


class Driver(SessionDriver):
    def __init__(self, **settings: object) -> None:
        super().__init__(m, 27017, ts_step=1000, **settings)


@pytest.mark.parametrize("sanitize, want", [
    (True, "DuplicateKey: E11000 duplicate key error collection: shop.users index: email_1 dup key: { ? }"),
    (False, 'DuplicateKey: E11000 duplicate key error collection: shop.users index: email_1 dup key: '
            '{ email: "bob@example.com" }'),
])
def test_error_messages_are_sanitized_by_default(sanitize: bool, want: str) -> None:
    d = Driver(sanitize_errors=sanitize)
    d.send(True, op_msg(1, 0, {"insert": "users", "$db": "shop"}, seq=("documents", [{"email": "bob@example.com"}]))
           + op_msg(2, 0, {"find": "users", "$db": "shop"}))
    d.send(False, op_msg(11, 1, {"ok": 0.0, "code": 11000, "codeName": "DuplicateKey",
                                 "errmsg": 'E11000 duplicate key error collection: shop.users index: email_1 '
                                           'dup key: { email: "bob@example.com" }'})
           + op_msg(12, 2, {"ok": 0.0, "code": 2, "codeName": "BadValue", "errmsg": 17}))  # hostile: not a string
    dup, odd = d.spans
    assert dup.status_message == want and dup.attributes["error.type"] == "DuplicateKey"
    assert odd.status_message == "BadValue: 17"


@pytest.mark.parametrize("step", [None, 1, 5, 13])
def test_find_insert_error_paired_any_order(step: int | None) -> None:
    d = Driver()
    d.send(True, op_msg(1, 0, {"find": "users", "filter": {"a": {"$gt": 1}}, "$db": "shop"})
           + op_msg(2, 0, {"insert": "orders", "$db": "shop"}, seq=("documents", [{"x": 1}, {"x": 2}]))
           + op_msg(3, 0, {"update": "broken", "$db": "shop"}), step)
    # replies out of order
    d.send(False, op_msg(12, 2, {"n": 2, "ok": 1.0}) + op_msg(13, 3, {"ok": 0.0, "errmsg": "bad", "code": 2,
                                                                        "codeName": "BadValue"})
           + op_msg(11, 1, {"cursor": {"firstBatch": [], "id": bson.Int64(0)}, "ok": 1}), step)
    by = {s.name: s for s in d.spans}
    assert set(by) == {"find users", "insert orders", "update broken"}
    f = by["find users"]
    assert f.kind == SpanKind.CLIENT
    assert f.attributes["db.system.name"] == "mongodb"
    assert f.attributes["db.operation.name"] == "find"
    assert f.attributes["db.collection.name"] == "users"
    assert f.attributes["db.namespace"] == "shop"
    assert f.status_code == StatusCode.UNSET
    u = by["update broken"]
    assert u.status_code == StatusCode.ERROR and u.status_message == "BadValue: bad"
    assert u.attributes["db.response.status_code"] == "2" and u.attributes["error.type"] == "BadValue"
    assert len(d.conn.client_buf) == 0 and len(d.conn.server_buf) == 0 and not d.drops


def test_checksum_more_to_come_and_heartbeats() -> None:
    d = Driver()
    d.send(True, op_msg(1, 0, {"hello": 1, "$db": "admin"}, checksum=True))
    d.send(False, op_msg(9, 1, {"ok": 1.0}, checksum=True))
    d.send(True, op_msg(2, 0, {"insert": "logs", "$db": "app"}, flags=m.FLAG_MORE_TO_COME))
    assert [s.name for s in d.spans] == ["insert logs"]  # heartbeat hidden; w:0 insert has no reply
    d2 = Driver(trace_heartbeats=True)
    d2.send(True, op_msg(1, 0, {"hello": 1, "$db": "admin"}))
    d2.send(False, op_msg(9, 1, {"ok": 1.0}))
    assert [s.name for s in d2.spans] == ["hello"]


def test_exhaust_replies_are_not_unpaired() -> None:
    d = Driver()
    d.send(True, op_msg(1, 0, {"getMore": bson.Int64(5), "collection": "c", "$db": "x"}, flags=m.FLAG_EXHAUST))
    d.send(False, op_msg(10, 1, {"ok": 1.0}, flags=m.FLAG_MORE_TO_COME)
           + op_msg(11, 10, {"ok": 1.0}, flags=m.FLAG_MORE_TO_COME) + op_msg(12, 11, {"ok": 1.0}))
    assert len(d.spans) == 1 and not d.drops


def test_legacy_op_query_and_op_reply() -> None:
    d = Driver(trace_heartbeats=True)
    q = struct.pack("<i", 0) + b"admin.$cmd\0" + struct.pack("<ii", 0, -1) + bson.encode({"isMaster": 1})
    d.send(True, HDR.pack(16 + len(q), 7, 0, m.OP_QUERY) + q)
    r = struct.pack("<iqii", 8, 0, 0, 1) + bson.encode({"ismaster": True, "ok": 1.0})
    d.send(False, HDR.pack(16 + len(r), 8, 7, m.OP_REPLY) + r)
    q2 = struct.pack("<i", 0) + b"shop.users\0" + struct.pack("<ii", 0, 1) + bson.encode({"a": 1})
    d.send(True, HDR.pack(16 + len(q2), 9, 0, m.OP_QUERY) + q2)
    r2 = struct.pack("<iqii", 2, 0, 0, 1) + bson.encode({"$err": "not authorized", "code": 13})
    d.send(False, HDR.pack(16 + len(r2), 10, 9, m.OP_REPLY) + r2)
    assert [s.name for s in d.spans] == ["isMaster", "find users"]
    assert d.spans[1].status_code == StatusCode.ERROR
    assert d.spans[1].attributes["db.namespace"] == "shop"


def test_op_compressed_zlib() -> None:
    d = Driver()
    d.send(True, compressed(op_msg(1, 0, {"count": "items", "$db": "inv"})), 3)
    d.send(False, compressed(op_msg(2, 1, {"n": 3, "ok": 1.0})))
    assert [s.name for s in d.spans] == ["count items"]


def test_op_compressed_shorter_than_its_own_header_is_malformed() -> None:
    # Found by the fuzz harness (tests/fuzz/): a length of 23 sent _decompress to view_at(25, -2),
    # a BufferBoundsError out of feed (the stage's internal_error).
    msg = HDR.pack(23, 6, 5, m.OP_COMPRESSED) + b"\0" * 7
    for tail in (b"", b"\0" * 40):  # alone, and with the next message's bytes behind it
        d = Driver()
        with pytest.raises(ProtocolError):
            d.send(False, msg + tail)


def test_decompression_bomb_is_bounded() -> None:
    d = Driver(max_decompressed_bytes=1024)
    inner = op_msg(1, 0, {"find": "x", "pad": "a" * 100_000, "$db": "y"})
    d.send(True, compressed(inner))
    assert "decompressed_too_large" in d.drops and not d.spans


def test_detect() -> None:
    assert m.detect(LargeBuffer(op_msg(1, 0, {"ping": 1, "$db": "a"})), None) == Detection.REQUEST
    assert m.detect(LargeBuffer(op_msg(1, 5, {"ok": 1.0})), None) == Detection.RESPONSE
    assert m.detect(LargeBuffer(b"\x10\x00"), None) == Detection.NEED_MORE
    assert m.detect(LargeBuffer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None) == Detection.NO
    assert m.detect(LargeBuffer(HDR.pack(2**30, 1, 0, m.OP_MSG) + b"\0" * 10), None) == Detection.NO
    assert m.detect(LargeBuffer(HDR.pack(100, 1, 0, 9999) + b"\0" * 10), None) == Detection.NO


@pytest.mark.parametrize("data", [
    HDR.pack(2**31 - 1, 1, 0, m.OP_MSG),
    HDR.pack(40, 1, 0, m.OP_MSG) + struct.pack("<I", 0x8000) + b"\0" * 20,
    HDR.pack(40, 1, 0, m.OP_MSG) + struct.pack("<I", 0) + b"\x07" + b"\0" * 19,
    HDR.pack(30, 1, 0, m.OP_MSG) + struct.pack("<I", 0) + b"\0" + struct.pack("<i", 9) + b"\x02a\0\x00\x00",
])
def test_hostile_messages_raise_protocol_errors(data: bytes) -> None:
    d = Driver()
    with pytest.raises(ProtocolError):
        d.send(True, data)


def test_deeply_nested_bson_is_not_recursed() -> None:
    doc: dict = {"leaf": 1}
    for _ in range(90):
        doc = {"n": doc}
    d = Driver()
    d.send(True, op_msg(1, 0, {"find": "deep", "filter": doc, "$db": "x"}))
    d.send(False, op_msg(2, 1, {"ok": 1.0}))
    assert [s.name for s in d.spans] == ["find deep"]


def _alloc(ndocs: int) -> int:
    docs = [{"i": i, "payload": "x" * 100} for i in range(ndocs)]
    msg = op_msg(1, 0, {"insert": "big", "$db": "x"}, seq=("documents", docs))
    d = Driver()
    peak = peak_allocation(lambda: d.send(True, msg, 1400))
    d.send(False, op_msg(2, 1, {"n": ndocs, "ok": 1.0}))
    assert [s.name for s in d.spans] == ["insert big"]
    return peak


def test_allocation_is_flat_when_the_insert_grows_100x() -> None:
    small = _alloc(50)
    large = _alloc(5000)
    assert large < small * 1.5 + 4096, (small, large)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_fuzz_only_protocol_errors_escape(data: bytes, step: int) -> None:
    d = Driver()
    d.fuzz(data, step)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 200))
def test_fuzz_mutated_valid_messages(patch: bytes, pos: int) -> None:
    msg = bytearray(op_msg(1, 0, {"find": "users", "filter": {"a": 1}, "$db": "shop"}))
    msg[pos % len(msg):pos % len(msg) + len(patch)] = patch
    d = Driver()
    try:
        d.send(True, bytes(msg), 7)
    except ProtocolError:
        pass


def test_real_pymongo_through_capture_replay() -> None:
    pymongo = pytest.importorskip("pymongo")
    from tests.support.capture import tcpdump
    from tests.support.mongo_responder import mongo_responder
    from tests.support.replay import replay_spans

    with mongo_responder() as srv, tcpdump(srv.port) as pcap:
        for comp in ("zlib", "snappy", "zstd", None):
            kw = {"compressors": comp} if comp else {}
            c = pymongo.MongoClient("127.0.0.1", srv.port, directConnection=True, serverSelectionTimeoutMS=5000,
                                    heartbeatFrequencyMS=500, **kw)
            db = c[f"shop_{comp or 'plain'}"]
            db.users.insert_one({"name": "alice", "secret": "s3cr3t"})
            list(db.users.find({"name": "alice"}))
            db.orders.update_one({"_id": 1}, {"$set": {"x": 1}})
            with pytest.raises(pymongo.errors.OperationFailure):
                db.broken.insert_one({"a": 1})
            db.get_collection("logs", write_concern=pymongo.WriteConcern(w=0)).insert_one({"l": 1})
            c.close()
        assert srv.compressors == {1, 2, 3}  # pymongo really compressed with snappy, zlib and zstd
    spans = replay_spans(pcap)
    for comp in ("zlib", "snappy", "zstd", "plain"):
        ns = f"shop_{comp}"
        mine = [s for s in spans if s.attributes.get("db.namespace") == ns]
        names = [s.name for s in mine]
        assert "insert users" in names and "find users" in names and "update orders" in names, (comp, names)
        assert "insert logs" in names, (comp, names)
        err = [s for s in mine if s.name == "insert broken"]
        assert len(err) == 1 and err[0].status_code == StatusCode.ERROR, comp
        assert err[0].attributes["error.type"] == "BadValue"
        for s in mine:
            assert s.kind == SpanKind.CLIENT and s.attributes["server.port"] == srv.port
    assert not [s for s in spans if s.attributes["db.operation.name"] in ("hello", "isMaster", "ismaster")]


@pytest.mark.parametrize("step", [None, 1, 9])
def test_reply_cut_by_the_end_of_the_capture_is_an_incomplete_span(step) -> None:
    """A find whose (large) reply began but did not end before the capture did: a span of
    what was seen, marked wirespan.incomplete (base.py's rule); an unanswered one is counted."""
    d = Driver()
    d.send(True, op_msg(7, 0, {"find": "orders", "$db": "shop"}), step)
    d.send(True, op_msg(8, 0, {"count": "users", "$db": "shop"}), step)
    reply = op_msg(99, 7, {"cursor": {"firstBatch": [{"x": "y" * 50}] * 40, "id": 0, "ns": "shop.orders"}, "ok": 1})
    d.send(False, reply[:len(reply) // 2], step)
    d.session.close(d.ts)
    (s,) = d.spans
    assert s.name == "find orders" and s.status_code == StatusCode.UNSET
    assert s.attributes["wirespan.incomplete"] is True and "error.type" not in s.attributes
    assert d.drops == ["no_reply"]


def test_collection_only_for_commands_whose_argument_is_one() -> None:
    """createUser, dropUser, ping, hello...: their first value is a user, a number or a flag,
    not a collection (OBI puts it in db.collection.name); getMore names its collection aside."""
    d = Driver(trace_heartbeats=True)
    docs = [{"createUser": "alice", "pwd": "x", "roles": [], "$db": "admin"}, {"dropUser": "bob", "$db": "admin"},
            {"ping": 1, "$db": "admin"}, {"hello": 1, "$db": "admin"}, {"find": "orders", "$db": "shop"},
            {"getMore": bson.Int64(5), "collection": "orders", "$db": "shop"}, {"drop": "tmp", "$db": "shop"}]
    for i, doc in enumerate(docs, 1):
        d.send(True, op_msg(i, 0, doc))
        d.send(False, op_msg(100 + i, i, {"ok": 1.0}))
    assert [(s.attributes["db.operation.name"], s.attributes.get("db.collection.name")) for s in d.spans] == [
        ("createUser", None), ("dropUser", None), ("ping", None), ("hello", None), ("find", "orders"),
        ("getMore", "orders"), ("drop", "tmp")]
    assert "x" not in repr([s.attributes for s in d.spans])


_DOCS = [{"insert": "orders", "$db": "shop", "documents": [{"_id": 1}]}, {"ok": 1.0, "n": 1},
         {"ok": 0.0, "errmsg": "E11000 dup key: { _id: 1 }", "code": 11000, "codeName": "DuplicateKey"},
         {"find": "users", "filter": {"age": {"$gt": 3}}, "limit": 10, "$db": "shop", "big": 2 ** 40,
          "flag": True, "none": None, "re": bson.Regex("a.*b", "i"), "bin": b"\x00\x01"}]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_DOCS), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
       st.integers(0, 6))
def test_bson_fields_in_one_chunk_match_the_buffer_walk(doc: dict, flips: list, lead: int) -> None:
    """A document whole in one chunk is read in place (_fields_in_view): the same fields, or the
    same error at the same offset, as the buffer walk that reads it a byte a chunk."""
    data = bytearray(b"\x07" * lead + bson.encode(doc))
    for pos, byte in flips:
        data[pos % len(data)] = byte
    data = bytes(data)

    def read(buf: LargeBuffer) -> object:
        try:
            return m.bson_fields(buf, lead, frozenset({"ok", "errmsg", "code", "codeName", "$db", "limit", "big"}))
        except ProtocolError as e:
            return (e.reason, e.offset, str(e))
    # repr: a flipped byte can make a double NaN, which equals nothing, itself included
    assert repr(read(LargeBuffer(data))) == repr(read(LargeBuffer(*[data[i:i + 1] for i in range(len(data))])))


def _conversation() -> list[tuple[bool, bytes]]:
    """OP_MSG exchanges as segments: one message a segment, two in one, a document sequence
    before the command, a checksum, moreToCome and exhaust replies, an error reply, a
    heartbeat, and the legacy and compressed opcodes (the buffered path)."""
    q = struct.pack("<i", 0) + b"shop.users\0" + struct.pack("<ii", 0, 1) + bson.encode({"a": 1})
    r = struct.pack("<iqii", 2, 0, 0, 1) + bson.encode({"$err": "not authorized", "code": 13})
    return [(True, op_msg(1, 0, {"insert": "orders", "$db": "shop", "documents": [{"_id": 1, "n": "x" * 40}]})),
            (False, op_msg(11, 1, {"n": 1, "ok": 1.0})),
            (True, op_msg(2, 0, {"find": "users", "filter": {"a": 1}, "$db": "shop"})
             + op_msg(3, 0, {"update": "u", "$db": "shop"}, seq=("updates", [{"q": {}, "u": {"x": 1}}]))),
            (False, op_msg(13, 3, {"ok": 0.0, "errmsg": "bad 'x'", "code": 2, "codeName": "BadValue"})
             + op_msg(12, 2, {"cursor": {"id": bson.Int64(0)}, "ok": 1}, checksum=True)),
            (True, op_msg(4, 0, {"hello": 1, "$db": "admin"}) + op_msg(5, 0, {"insert": "logs", "$db": "app"},
                                                                      flags=m.FLAG_MORE_TO_COME)),
            (False, op_msg(14, 4, {"ok": 1.0})),
            (True, op_msg(6, 0, {"getMore": bson.Int64(5), "collection": "c", "$db": "x"}, flags=m.FLAG_EXHAUST)),
            (False, op_msg(15, 6, {"ok": 1.0}, flags=m.FLAG_MORE_TO_COME) + op_msg(16, 15, {"ok": 1.0})),
            (True, HDR.pack(16 + len(q), 7, 0, m.OP_QUERY) + q),
            (False, HDR.pack(16 + len(r), 17, 7, m.OP_REPLY) + r),
            (True, compressed(op_msg(8, 0, {"delete": "d", "$db": "shop"}))),
            (False, op_msg(18, 8, {"ok": 1}))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=3))
def test_feed_whole_matches_the_buffered_path(mutations: list) -> None:
    """The buffer-less path (feed_whole, _msg_in_view) gives the buffered path's spans and
    drops, for the conversation as sent, with bytes changed and with segments split in two."""
    from tests.support.whole import mutate, run_both_ways
    spans, _drops = run_both_ways(m.Session, 27017, mutate(_conversation(), mutations))
    if not mutations:
        assert [(s[0], s[5]) for s in spans] == [
            ("insert orders", ""), ("update u", "BadValue: bad ?"), ("find users", ""), ("insert logs", ""),
            ("getMore c", ""), ("find users", "not authorized"), ("delete d", "")]


_KEYS = ["ok", "$db", "code", "errmsg", "codeName", "$err", "collection", "OK", "oj", "o\xe9", "\xffk", "x" * 200,
         "n", ""]
_VALUES = st.one_of(st.integers(-2 ** 31, 2 ** 31 - 1), st.integers(2 ** 40, 2 ** 41), st.floats(allow_nan=False),
                    st.text(max_size=20), st.booleans(), st.none(), st.just({"a": 1}), st.just([1, "b"]),
                    st.just(b"\x01"), st.just(bson.Regex("a", "i")))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=2), st.booleans())
def test_keys_decoded_only_at_wanted_lengths_read_as_the_walk(items: list, flips: list, reply: bool) -> None:
    """``_fields_in_view`` decodes a key only for the first element and at a wanted name's
    length: on documents of wanted, near-wanted, non-UTF-8 (bytes 0xff written over a key)
    and over-long keys, duplicates, every scalar type, and bytes changed, it gives the buffer
    walk's fields or its error at its offset."""
    # the key "\xffk" is written as the byte 0xff and "k": not UTF-8
    raw = bytearray(b"".join(bson.encode({k: v})[4:-1].replace("\xffk".encode(), b"\xffk") for k, v in items))
    raw = bytearray(struct.pack("<i", len(raw) + 5)) + raw + b"\0"
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    data = bytes(raw)
    wanted = m._REPLY_FIELDS if reply else m._CMD_FIELDS

    def read(buf: LargeBuffer) -> object:
        try:
            return m.bson_fields(buf, 0, wanted)
        except ProtocolError as e:
            return (e.reason, e.offset, str(e))
    assert read(LargeBuffer(data)) == read(LargeBuffer(*[data[i:i + 1] for i in range(len(data))]))
