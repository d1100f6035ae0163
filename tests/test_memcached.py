"""memcached binary + text protocols and Couchbase KV traits; bad input; real memcached.

Couchbase KV frames are built here by hand (no Couchbase server package exists for
this machine); memcached itself is real, driven by python-binary-memcached and pymemcache.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.protocols import memcached as mc
from processors.protocols.base import Detection
from processors.protocols.errors import ProtocolError
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.driver import SessionDriver, peak_allocation

HDR = struct.Struct(">BBHBBHIIQ")


def req(op: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 0) -> bytes:
    return HDR.pack(0x80, op, len(key), len(extras), 0, 0, len(extras) + len(key) + len(value), opaque, 0) \
        + extras + key + value


def res(op: int, status: int = 0, value: bytes = b"", opaque: int = 0, extras: bytes = b"", key: bytes = b"") -> bytes:
    return HDR.pack(0x81, op, len(key), len(extras), 0, status, len(extras) + len(key) + len(value), opaque, 0) \
        + extras + key + value


def alt_req(op: int, key: bytes, framing: bytes = b"", opaque: int = 0) -> bytes:
    return struct.pack(">BBBBBBHIIQ", 0x08, op, len(framing), len(key), 0, 0, 0, len(framing) + len(key),
                       opaque, 0) + framing + key


class Driver(SessionDriver):
    def __init__(self, **settings: object) -> None:
        super().__init__(mc, 11211, ts_step=10, **settings)


@pytest.mark.parametrize("step", [None, 1, 5])
def test_binary_get_set_miss_exists_incr(step: int | None) -> None:
    d = Driver()
    d.send(True, req(0x01, b"user:1", struct.pack(">II", 0, 0), b"alice", 1) + req(0x00, b"user:1", opaque=2)
           + req(0x00, b"nokey", opaque=3) + req(0x02, b"user:1", struct.pack(">II", 0, 0), b"x", 4)
           + req(0x05, b"n", struct.pack(">QQI", 1, 0, 0), opaque=5), step)
    d.send(False, res(0x01, opaque=1) + res(0x00, 0, b"alice", 2, struct.pack(">I", 0))
           + res(0x00, 1, b"Not found", 3) + res(0x02, 2, b"Data exists for key.", 4)
           + res(0x05, 0, struct.pack(">Q", 1), 5), step)
    names = [s.name for s in d.spans]
    assert names == ["SET", "GET", "GET", "ADD", "INCREMENT"]
    st_ = [s.status_code for s in d.spans]
    assert st_ == [StatusCode.UNSET, StatusCode.UNSET, StatusCode.UNSET, StatusCode.ERROR, StatusCode.UNSET]
    assert d.spans[2].attributes["db.response.status_code"] == "KEY_ENOENT"  # a miss: recorded, not an error
    assert d.spans[3].attributes["error.type"] == "KEY_EEXISTS"
    for s in d.spans:
        assert s.kind == SpanKind.CLIENT and s.attributes["db.system.name"] == "memcached"
        assert "user:1" not in s.attributes["db.query.text"]
    assert d.spans[0].attributes["db.query.text"] == "SET ?"


def test_quiet_ops_complete_at_the_next_response() -> None:
    d = Driver(show_keys=True)
    d.send(True, req(0x0D, b"a", opaque=1) + req(0x0D, b"b", opaque=2) + req(0x11, b"c", b"\0" * 8, b"v", 3)
           + req(0x0A, opaque=4))
    d.send(False, res(0x0D, 0, b"A", 1, b"\0" * 4, b"a") + res(0x0A, opaque=4))  # b missed, c stored
    by = {(s.name, s.attributes["db.query.text"]): s for s in d.spans}
    assert set(by) == {("GETKQ", "GETKQ a"), ("GETKQ", "GETKQ b"), ("SETQ", "SETQ c"), ("NOOP", "NOOP")}
    miss = by[("GETKQ", "GETKQ b")]
    assert miss.status_code == StatusCode.UNSET and miss.attributes["memcached.quiet"] is True
    assert not d.drops


def test_repeated_opaques_pair_in_order() -> None:
    """python-binary-memcached numbers a batch from 0 and sends its NOOP with opaque 0 too."""
    d = Driver()
    d.send(True, req(0x11, b"a", b"\0" * 8, b"1", 0) + req(0x11, b"b", b"\0" * 8, b"2", 1) + req(0x0A, opaque=0))
    d.send(False, res(0x0A, opaque=0))  # both SETQ succeeded silently; the NOOP answers
    assert [s.name for s in d.spans] == ["SETQ", "SETQ", "NOOP"]
    assert all(s.status_code == StatusCode.UNSET for s in d.spans) and not d.drops
    d.send(True, req(0x00, b"x", opaque=7) + req(0x00, b"y", opaque=7))
    d.send(False, res(0x00, 1, opaque=7) + res(0x00, 0, b"v", 7, b"\0" * 4))
    assert [s.attributes.get("db.response.status_code") for s in d.spans[3:]] == ["KEY_ENOENT", None]


def test_couchbase_traits_bucket_collections_alt_framing() -> None:
    d = Driver()
    d.send(True, req(0x1F, b"client", value=struct.pack(">HH", 0x12, 0x0B), opaque=1) + req(0x89, b"travel", opaque=2)
           + req(0xBB, b"inventory.hotels", opaque=3))
    d.send(False, res(0x1F, 0, struct.pack(">HH", 0x12, 0x0B), 1) + res(0x89, 0, opaque=2)
           + res(0xBB, 0, opaque=3, extras=struct.pack(">QI", 1, 8)))
    # a GET in collection 8 (LEB128 prefix) with alternative framing (a durability frame)
    d.send(True, alt_req(0x00, b"\x08hotel_1", framing=b"\x11\x01", opaque=4))
    d.send(False, res(0x00, 0x88, b"", 4))
    get = d.spans[-1]
    assert len(d.spans) == 1  # HELLO, SELECT_BUCKET and GET_COLLECTION_ID set up: spans only if they fail
    assert get.attributes["db.system.name"] == "couchbase"
    assert get.attributes["db.namespace"] == "travel"
    assert get.attributes["db.collection.name"] == "hotels"
    assert get.name == "GET hotels"
    assert get.status_code == StatusCode.ERROR and get.attributes["error.type"] == "UNKNOWN_COLLECTION"


@pytest.mark.parametrize("step", [None, 1, 3])
def test_text_protocol(step: int | None) -> None:
    d = Driver()
    d.send(True, b"set k1 0 0 5\r\nhello\r\nget k1 k2\r\nget nope\r\nadd k1 0 0 1\r\nx\r\n"
           b"incr n 1\r\ndelete k1 noreply\r\n", step)
    d.send(False, b"STORED\r\nVALUE k1 0 5\r\nhello\r\nEND\r\nEND\r\nNOT_STORED\r\nNOT_FOUND\r\n", step)
    names = [s.name for s in d.spans]
    assert names == ["delete", "set", "get", "get", "add", "incr"]  # noreply delete ends at once; as sent
    by = dict(zip(names[1:], d.spans[1:], strict=False))
    assert d.spans[2].status_code == StatusCode.UNSET  # hit
    assert d.spans[3].status_code == StatusCode.UNSET  # a miss is not an error
    assert d.spans[3].attributes["db.response.status_code"] == "KEY_ENOENT"
    assert by["add"].status_code == StatusCode.ERROR
    assert by["incr"].status_code == StatusCode.ERROR


def test_text_server_errors() -> None:
    d = Driver()
    d.send(True, b"set k 0 0 2\r\nab\r\n")
    d.send(False, b"SERVER_ERROR out of memory storing object\r\n")
    assert d.spans[0].status_code == StatusCode.ERROR
    assert d.spans[0].attributes["error.type"] == "SERVER_ERROR"


def test_detect() -> None:
    assert mc.detect(LargeBuffer(req(0x00, b"k")), None) == Detection.REQUEST
    assert mc.detect(LargeBuffer(res(0x00, 1)), None) == Detection.RESPONSE
    assert mc.detect(LargeBuffer(b"get foo\r\n"), None) == Detection.REQUEST
    assert mc.detect(LargeBuffer(b"set foo 0 0 3\r\nabc\r\n"), None) == Detection.REQUEST
    assert mc.detect(LargeBuffer(b"set foo bar baz\r\n"), None) == Detection.NO
    assert mc.detect(LargeBuffer(b"GET / HTTP/1.1\r\n\r\n"), None) == Detection.NO
    assert mc.detect(LargeBuffer(b"\x80\x00\x00\x05" + b"\0" * 20), None) == Detection.NO  # key > body


@pytest.mark.parametrize("data", [
    b"\x99" + b"\0" * 23,                                   # wrong magic after binary start
    HDR.pack(0x80, 0, 10, 0, 0, 0, 5, 0, 0),                 # key longer than the body
    HDR.pack(0x80, 0, 0, 0, 0, 0, 2**31, 0, 0),              # 2 GiB body
])
def test_malformed_binary(data: bytes) -> None:
    d = Driver()
    d.send(True, req(0x0A))
    with pytest.raises(ProtocolError):
        d.send(True, data)


def test_unknown_opcode_is_a_span_not_a_crash() -> None:
    d = Driver()
    d.send(True, req(0x7E, opaque=9))
    d.send(False, res(0x7E, 0x81, opaque=9))
    assert d.spans[0].name == "OP_0x7e" and d.spans[0].attributes["error.type"] == "UNKNOWN_COMMAND"


def _alloc(size: int) -> int:
    d = Driver()
    d.send(True, req(0x00, b"big", opaque=1))
    data = res(0x00, 0, b"v" * size, 1, struct.pack(">I", 0))
    peak = peak_allocation(lambda: d.send(False, data, 1400))
    assert len(d.spans) == 1
    return peak


def test_allocation_is_flat_when_values_grow_100x() -> None:
    small, large = _alloc(10_000), _alloc(1_000_000)
    assert large < small * 1.5 + 4096, (small, large)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40), st.booleans())
def test_fuzz_only_protocol_errors_escape(data: bytes, step: int, binary: bool) -> None:
    d = Driver()
    d.send(True, req(0x0A) if binary else b"version\r\n")
    d.fuzz(data, step)


def test_real_memcached_binary_and_text() -> None:
    bmemcached = pytest.importorskip("bmemcached")
    pymemcache = pytest.importorskip("pymemcache.client.base")
    from tests.support.capture import tcpdump
    from tests.support.memcached_server import memcached
    from tests.support.replay import replay_spans

    with memcached("binary") as bport, memcached("ascii") as tport, tcpdump([bport, tport]) as pcap:
        b = bmemcached.Client((f"127.0.0.1:{bport}",))
        assert b.set("user:1", "alice")
        assert b.get("user:1") == "alice"
        assert b.get("missing") is None
        assert not b.add("user:1", "again")
        b.set("n", 1)
        assert b.incr("n", 5) == 6
        assert b.delete("user:1")
        b.set_multi({"q1": "a", "q2": "b"})
        assert b.get_multi(["q1", "q2", "q3"]) == {"q1": "a", "q2": "b"}
        b.disconnect_all()
        t = pymemcache.Client(("127.0.0.1", tport))
        t.set("k", "v")
        assert t.get("k") == b"v"
        assert t.get("nope") is None
        assert t.add("k", "x", noreply=False) is False
        t.delete("k")
        t.close()
    spans = replay_spans(pcap)
    binary = [s for s in spans if s.attributes["server.port"] == bport]
    text = [s for s in spans if s.attributes["server.port"] == tport]
    bops = [s.attributes["db.operation.name"] for s in binary]
    for op in ("SET", "GET", "ADD", "INCREMENT", "DELETE"):
        assert op in bops, bops
    misses = [s for s in binary if s.attributes.get("db.response.status_code") == "KEY_ENOENT"]
    assert misses and all(s.status_code == StatusCode.UNSET for s in misses)
    add = [s for s in binary if s.attributes["db.operation.name"] == "ADD"]
    assert add[0].status_code == StatusCode.ERROR
    # set_multi: two SETQ answered by nothing (a success), completed when the NOOP's answer comes
    setq = [s for s in binary if s.attributes["db.operation.name"] == "SETQ"]
    assert len(setq) == 2 and all(s.attributes.get("memcached.quiet") for s in setq)
    assert all(s.status_code == StatusCode.UNSET for s in setq) and "NOOP" in bops
    # get_multi: GETKQ q1, GETKQ q2 (hits, answered), then GETK q3 (a miss, not an error)
    getkq = [s for s in binary if s.attributes["db.operation.name"] == "GETKQ"]
    assert len(getkq) == 2 and not any(s.attributes.get("memcached.quiet") for s in getkq)
    getk = [s for s in binary if s.attributes["db.operation.name"] == "GETK"]
    assert len(getk) == 1 and getk[0].attributes["db.response.status_code"] == "KEY_ENOENT"
    assert getk[0].status_code == StatusCode.UNSET
    tops = [s.attributes["db.operation.name"] for s in text]
    assert tops == ["set", "get", "get", "add", "delete"]
    assert text[3].status_code == StatusCode.ERROR and text[2].status_code == StatusCode.UNSET
    for s in spans:
        assert s.attributes["db.system.name"] == "memcached" and s.kind == SpanKind.CLIENT


def test_a_quiet_get_flood_is_bounded_by_the_stage_budget_and_pairing_survives() -> None:
    """GETQ misses get no answer (issue 20: 20 MB of them held 3.0 GiB): the budget drops the
    oldest, counts them, and what is kept still pairs by opaque afterwards."""
    from processors.protocols.processor import ProtocolsProcessor
    from service.model import EventKind, TcpEvent

    spans: list = []

    class Sink:
        def consume_spans(self, s: list) -> None:
            spans.extend(s)

    p = ProtocolsProcessor("protocols", {"enabled": ["memcached"], "pending": {
        "max_entries": 5000, "max_entries_per_connection": 1000}}, Sink())
    flood = b"".join(req(0x09, b"k%06d" % i, opaque=i) for i in range(3000))  # GETQ
    tail = req(0x0A, opaque=99999) + req(0x00, b"user:1", opaque=4242)  # NOOP, then a plain GET
    p.consume_events([TcpEvent(EventKind.DATA, 1, "10.0.0.1", 40000, "10.0.0.2", 11211, 1000,
                               memoryview(flood + tail), client_is_src=True)])
    assert p._budget.entries <= 1000
    assert p.stats["drops"]["memcached:pending_limit"] == 3002 - 1000
    p.consume_events([TcpEvent(EventKind.DATA, 1, "10.0.0.2", 11211, "10.0.0.1", 40000, 2000,
                               memoryview(res(0x0A, opaque=99999) + res(0x00, value=b"alice", opaque=4242)),
                               client_is_src=False)])
    got = [s for s in spans if s.attributes.get("db.operation.name") == "GET"]
    assert len(got) == 1 and got[0].status_code == StatusCode.UNSET
    p.shutdown()
    assert p._budget.entries == 0


# -- OBI's vectors decided by the spec (issue 16 class 7) ----------------------------------------------
def test_couchbase_collection_opcodes_follow_kv_engine() -> None:
    """0xBA is GET_COLLECTIONS_MANIFEST, 0xBB GET_COLLECTION_ID (kv_engine's opcode.h): the id
    learnt from 0xBB's extras names the collection of the keys that carry it."""
    assert mc._OPS[0xBA][0] == "GET_COLLECTIONS_MANIFEST" and mc._OPS[0xBB][0] == "GET_COLLECTION_ID"
    d = Driver()
    d.send(True, req(0x1F, b"c", value=struct.pack(">H", 0x12), opaque=1) + req(0xBA, opaque=2)
           + req(0xBB, b"myscope.mycollection", opaque=3))
    d.send(False, res(0x1F, 0, struct.pack(">H", 0x12), 1) + res(0xBA, 0, b"{}", 2)
           + res(0xBB, 0, opaque=3, extras=struct.pack(">QI", 1, 9)))
    d.send(True, req(0x00, b"\x09doc", opaque=4))
    d.send(False, res(0x00, 0, b"v", 4, b"\0" * 4))
    assert [(s.name, s.attributes.get("db.collection.name")) for s in d.spans] == [("GET mycollection", "mycollection")]
    d.send(True, req(0x89, b"nosuchbucket", opaque=5))
    d.send(False, res(0x89, 0x08, opaque=5))  # a set-up step that fails is a span
    assert d.spans[-1].name == "SELECT_BUCKET" and d.spans[-1].status_code == StatusCode.ERROR


@pytest.mark.parametrize("step", [None, 1])
def test_gat_takes_the_key_after_the_expiry(step) -> None:
    d = Driver(show_keys=True)
    d.send(True, b"gat 60 session\r\ngats 0 a b\r\ntouch k 10\r\n", step)
    d.send(False, b"VALUE session 0 1\r\nx\r\nEND\r\nEND\r\nTOUCHED\r\n", step)
    assert [s.attributes["db.query.text"] for s in d.spans] == ["gat session", "gats a", "touch k"]


def test_an_unknown_reply_line_completes_nothing() -> None:
    d = Driver()
    d.send(True, b"get session-key\r\n")
    with pytest.raises(ProtocolError) as e:
        d.send(False, b"set other-key 0 300 1\r\nx\r\n")
    assert e.value.reason == "unknown_reply" and d.spans == [] and len(d.session.text_pending) == 1


@pytest.mark.parametrize("line", [b"get\r\n", b"gat session\r\n", b"gat notanumber key\r\n", b"delete\r\n",
                                  b"delete session extra\r\n", b"touch session\r\n", b"touch session 60 extra\r\n",
                                  b"incr counter\r\n", b"incr counter 1 extra\r\n", b"version extra\r\n",
                                  b"flush_all 10 extra unexpected\r\n", b"set k 0 0\r\n", b"cas k 0 0 5\r\n"])
def test_detection_refuses_commands_memcached_itself_refuses(line) -> None:
    assert mc.detect(LargeBuffer(line), None) == Detection.NO


@pytest.mark.parametrize("line", [b"get a b c\r\n", b"gat 60 k\r\n", b"delete k noreply\r\n", b"touch k 10\r\n",
                                  b"incr n 5\r\n", b"version\r\n", b"flush_all\r\n", b"flush_all 10 noreply\r\n",
                                  b"set k 0 0 5\r\n", b"cas k 0 0 5 99\r\n"])
def test_detection_takes_well_formed_commands(line) -> None:
    assert mc.detect(LargeBuffer(line), None) == Detection.REQUEST


def test_dns_starting_with_0x08_is_not_couchbase() -> None:
    """A DNS message whose id starts with 0x08 looks like the alternative-framing magic: its
    "frame infos" do not parse, and what follows its "packet" is no packet."""
    for hexs in ("081a0100000100000000000104686f7374076578616d706c6503636f6d00001c000100002904d0000000000000",
                 "081d0100000100000000000104686f737400001c000100002904d0000000000000"):
        assert mc.detect(LargeBuffer(bytes.fromhex(hexs)), None) == Detection.NO
    ok = alt_req(0x00, b"k", framing=b"\x11\x01", opaque=1)  # a durability frame: id 1, one byte
    assert mc.detect(LargeBuffer(ok), None) == Detection.REQUEST
    assert mc.detect(LargeBuffer(ok[:25]), None) == Detection.NEED_MORE
    barrier_with_value = alt_req(0x00, b"k", framing=b"\x01\x01")  # a barrier frame info has no value
    assert mc.detect(LargeBuffer(barrier_with_value), None) == Detection.NO


def test_reply_cut_by_the_end_of_the_capture_is_an_incomplete_span() -> None:
    d = Driver()
    d.send(True, b"get a b\r\nget c\r\n")
    d.send(False, b"VALUE a 0 3\r\nabc\r\nVALUE b 0 1000\r\nxy")  # the capture ends inside b's value
    d.session.close(d.ts)
    (s,) = d.spans
    assert s.name == "get" and s.attributes["wirespan.incomplete"] is True and s.status_code == StatusCode.UNSET
    assert d.drops == ["no_response"]
    d = Driver()
    d.send(True, req(0x00, b"k", opaque=5) + req(0x00, b"j", opaque=6))
    d.send(False, res(0x00, 0, b"v" * 100, 5, b"\0" * 4)[:20])
    d.session.close(d.ts)
    assert [s.attributes["wirespan.incomplete"] for s in d.spans] == [True] and d.drops == ["no_response"]


def _conversation() -> list[tuple[bool, bytes]]:
    """Binary exchanges: a batch with quiet ops and a NOOP fence, repeated opaques, a
    Couchbase setup (HELLO with collections, SELECT_BUCKET, GET_COLLECTION_ID: the buffered
    path) and then collection-id keys (the buffered path too), and a value across segments."""
    return [(True, req(0x01, b"user:1", struct.pack(">II", 0, 0), b"alice", 1) + req(0x00, b"user:1", opaque=2)
             + req(0x0D, b"a", opaque=3) + req(0x11, b"c", b"\0" * 8, b"v", 4) + req(0x0A, opaque=5)),
            (False, res(0x01, opaque=1) + res(0x00, 1, b"Not found", 2) + res(0x0D, 0, b"A", 3, b"\0" * 4, b"a")
             + res(0x0A, opaque=5)),
            (True, req(0x00, b"x", opaque=7) + req(0x00, b"y", opaque=7)),
            (False, res(0x00, 1, opaque=7) + res(0x00, 0, b"v" * 40, 7, b"\0" * 4)),
            (True, req(0x1F, b"client", value=struct.pack(">HH", 0x12, 0x0B), opaque=8)
             + req(0x89, b"travel", opaque=9) + req(0xBB, b"inventory.hotels", opaque=10)),
            (False, res(0x1F, 0, struct.pack(">HH", 0x12, 0x0B), 8) + res(0x89, 0, opaque=9)
             + res(0xBB, 0, opaque=10, extras=struct.pack(">QI", 1, 8))),
            (True, req(0x00, b"\x08hotel_1", opaque=11) + req(0x89, b"travel", opaque=12)),
            (False, res(0x00, 0x88, b"", 11) + res(0x89, 0x20, b"", 12))]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                max_size=3))
def test_feed_whole_matches_the_buffered_path(mutations: list) -> None:
    """The buffer-less path (feed_whole) gives the buffered path's spans and drops, for the
    conversation as sent, with bytes changed and with segments split in two."""
    from tests.support.whole import mutate, run_both_ways
    segs = mutate(_conversation(), mutations)
    spans, _drops = run_both_ways(mc.Session, 11211, segs)
    if not mutations:
        assert [s[0].split()[0] for s in spans] == ["SET", "GET", "GETKQ", "SETQ", "NOOP", "GET", "GET", "GET",
                                                    "SELECT_BUCKET"]
