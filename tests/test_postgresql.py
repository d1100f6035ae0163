"""PostgreSQL parser: hand-built protocol messages fed whole, in pieces and byte by byte,
bad input, fuzzing, allocation, and the recorded psycopg session re-fed in any chunking."""

from __future__ import annotations

import gc
import os
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import postgresql as pg
from processors.protocols.base import Detection
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.dbdrive import Driver, pcap_script

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "postgresql")


# -- message builders (PostgreSQL docs, "Message Formats") -------------------------------
def msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack(">i", len(body) + 4) + body


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def startup(user: str = "alice", database: str | None = "shop") -> bytes:
    body = struct.pack(">i", 196608) + cstr("user") + cstr(user)
    if database is not None:
        body += cstr("database") + cstr(database)
    body += b"\0"
    return struct.pack(">i", len(body) + 4) + body


SSL_REQUEST = struct.pack(">ii", 8, 80877103)


def Q(sql: str) -> bytes:
    return msg(b"Q", cstr(sql))


def P(name: str, sql: str) -> bytes:
    return msg(b"P", cstr(name) + cstr(sql) + b"\0\0")


def B(portal: str = "", stmt: str = "", params: tuple[bytes, ...] = ()) -> bytes:
    body = cstr(portal) + cstr(stmt) + b"\0\0" + struct.pack(">h", len(params))
    for p in params:
        body += struct.pack(">i", len(p)) + p
    return msg(b"B", body + b"\0\0")


def DESCRIBE(kind: bytes = b"P", name: str = "") -> bytes:
    return msg(b"D", kind + cstr(name))


def E(portal: str = "") -> bytes:
    return msg(b"E", cstr(portal) + b"\0\0\0\0")


SYNC = msg(b"S")
TERMINATE = msg(b"X")
AUTH_OK = msg(b"R", b"\0\0\0\0")
READY = msg(b"Z", b"I")
PARSE_OK = msg(b"1")
BIND_OK = msg(b"2")
NO_DATA = msg(b"n")


def ROWDESC(*names: str) -> bytes:
    body = struct.pack(">h", len(names))
    for n in names:
        body += cstr(n) + struct.pack(">ihihih", 0, 0, 25, -1, -1, 0)
    return msg(b"T", body)


def ROW(*vals: bytes) -> bytes:
    body = struct.pack(">h", len(vals))
    for v in vals:
        body += struct.pack(">i", len(v)) + v
    return msg(b"D", body)


def DONE(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


def ERROR(code: str, text: str, t: bytes = b"E") -> bytes:
    return msg(t, b"SERROR\0" + b"C" + cstr(code) + b"M" + cstr(text) + b"\0")


def connect(d: Driver) -> None:
    d.feed(True, startup())
    d.feed(False, AUTH_OK + msg(b"S", cstr("server_version") + cstr("15")) + msg(b"K", b"\0" * 8) + READY)


CHUNKINGS = [None, 1, 7]


# -- simple query ------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_simple_query(chunk):
    d = Driver(pg)
    connect(d)
    d.feed(True, Q("SELECT id, name FROM users WHERE email = 'bob@example.com'"), chunk)
    d.feed(False, ROWDESC("id", "name") + ROW(b"1", b"bob") + ROW(b"2", b"eve") + DONE("SELECT 2") + READY, chunk)
    assert len(d.spans) == 1
    s = d.spans[0]
    a = s.attributes
    assert s.name == "SELECT users"
    assert s.kind == SpanKind.CLIENT
    assert a["db.system.name"] == "postgresql"
    assert a["db.namespace"] == "shop"
    assert a["db.operation.name"] == "SELECT"
    assert a["db.collection.name"] == "users"
    assert a["db.query.text"] == "SELECT id, name FROM users WHERE email = ?"
    assert a["db.response.returned_rows"] == 2
    assert a["server.port"] == 5432
    assert s.status_code == StatusCode.UNSET
    assert d.drops == {} and d.buffered() == 0


def test_multi_statement_query_is_one_span_with_summary_and_error():
    d = Driver(pg)
    connect(d)
    d.feed(True, Q("BEGIN; INSERT INTO t VALUES (1); INSERT INTO nosuch VALUES (2); COMMIT"))
    d.feed(False, DONE("BEGIN") + DONE("INSERT 0 1") + ERROR("42P01", 'relation "nosuch" does not exist')
           + msg(b"Z", b"E"))
    assert len(d.spans) == 1
    s = d.spans[0]
    assert s.name == "BEGIN; INSERT t; INSERT nosuch; COMMIT"
    assert s.attributes["db.operation.name"] == "BATCH"
    assert s.attributes["db.response.status_code"] == "42P01"
    assert s.attributes["error.type"] == "42P01"
    assert s.status_code == StatusCode.ERROR
    assert s.status_message == "relation ? does not exist"  # quoted text sanitized (sanitize_errors)


@pytest.mark.parametrize("sanitize, want", [
    (True, "invalid input syntax for type integer: ?"),
    (False, 'invalid input syntax for type integer: "4111-1111"'),
])
def test_error_message_literals_are_sanitized_by_default(sanitize, want):
    d = Driver(pg, pg.Settings(sanitize_errors=sanitize))
    connect(d)
    d.feed(True, Q("SELECT * FROM cards WHERE id = '4111-1111'"))
    d.feed(False, ERROR("22P02", 'invalid input syntax for type integer: "4111-1111"') + READY)
    (s,) = d.spans
    assert s.status_code == StatusCode.ERROR and s.status_message == want
    assert s.attributes["db.query.text"] == "SELECT * FROM cards WHERE id = ?"
    assert s.attributes["error.type"] == "22P02"


def test_notice_is_not_an_error_and_terminate_makes_no_span():
    d = Driver(pg)
    connect(d)
    d.feed(True, Q("DROP TABLE IF EXISTS x"))
    d.feed(False, ERROR("00000", "table does not exist, skipping", b"N") + DONE("DROP TABLE") + READY)
    d.feed(True, TERMINATE)
    d.close()
    assert len(d.spans) == 1
    assert d.spans[0].status_code == StatusCode.UNSET
    assert "error.type" not in d.spans[0].attributes
    assert d.spans[0].name == "DROP TABLE x"


def test_namespace_defaults_to_user():
    d = Driver(pg)
    d.feed(True, startup("carol", None))
    d.feed(False, AUTH_OK + READY)
    d.feed(True, Q("SELECT 1"))
    d.feed(False, ROWDESC("x") + ROW(b"1") + DONE("SELECT 1") + READY)
    assert d.spans[0].attributes["db.namespace"] == "carol"


def test_sanitize_off():
    d = Driver(pg, pg.Settings(sanitize_query=False))
    connect(d)
    d.feed(True, Q("SELECT * FROM t WHERE a = 'x'"))
    d.feed(False, DONE("SELECT 0") + READY)
    assert d.spans[0].attributes["db.query.text"] == "SELECT * FROM t WHERE a = 'x'"


# -- extended protocol ------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_named_statement_execute_gets_its_text(chunk):
    d = Driver(pg)
    connect(d)
    d.feed(True, P("s1", "SELECT * FROM orders WHERE id = $1") + DESCRIBE(b"S", "s1") + SYNC, chunk)
    d.feed(False, PARSE_OK + msg(b"t", b"\0\1\0\0\0\x17") + ROWDESC("id") + READY, chunk)
    assert d.spans == []  # a successful Parse alone is no query
    for i in range(2):
        d.feed(True, B("", "s1", (str(i).encode(),)) + E("") + SYNC, chunk)
        d.feed(False, BIND_OK + ROW(b"1") + DONE("SELECT 1") + READY, chunk)
    assert [s.name for s in d.spans] == ["SELECT orders", "SELECT orders"]
    assert all(s.attributes["db.query.text"] == "SELECT * FROM orders WHERE id = $1" for s in d.spans)
    assert all(s.attributes["db.response.returned_rows"] == 1 for s in d.spans)
    assert d.buffered() == 0 and not d.drops


def test_pipelined_extended_queries_pair_by_order_and_error_skips_to_sync():
    d = Driver(pg)
    connect(d)
    req = b""
    for sql in ("UPDATE a SET x = $1", "SELECT * FROM b", "INSERT INTO c VALUES ($1)", "DELETE FROM e"):
        req += P("", sql) + B() + DESCRIBE() + E()
        if sql.startswith("SELECT"):
            req += SYNC
    req += SYNC
    d.feed(True, req)
    d.feed(False, PARSE_OK + BIND_OK + NO_DATA + DONE("UPDATE 3"))
    d.feed(False, PARSE_OK + BIND_OK + ROWDESC("x") + ROW(b"1") + ROW(b"2") + ROW(b"3") + DONE("SELECT 3") + READY)
    d.feed(False, PARSE_OK + BIND_OK + NO_DATA + ERROR("23505", "duplicate key") + READY)
    names = [s.name for s in d.spans]
    assert names == ["UPDATE a", "SELECT b", "INSERT c"]
    assert d.spans[1].attributes["db.response.returned_rows"] == 3
    assert d.spans[2].status_code == StatusCode.ERROR
    assert d.spans[2].attributes["error.type"] == "23505"
    assert not d.session._pending  # the skipped DELETE was never run: no span, nothing left


def test_parse_error_gives_a_span():
    d = Driver(pg)
    connect(d)
    d.feed(True, P("", "SELEC 1") + B() + DESCRIBE() + E() + SYNC)
    d.feed(False, ERROR("42601", 'syntax error at or near "SELEC"') + READY)
    assert len(d.spans) == 1
    assert d.spans[0].attributes["db.response.status_code"] == "42601"


def test_close_and_lru_bounds():
    d = Driver(pg, pg.Settings(max_statements=8, max_portals=4))
    connect(d)
    for i in range(20):
        d.feed(True, P(f"s{i}", f"SELECT {i} FROM t{i}") + SYNC)
        d.feed(False, PARSE_OK + READY)
    assert len(d.session._stmts) == 8
    d.feed(True, msg(b"C", b"S" + cstr("s19")) + SYNC)
    d.feed(False, msg(b"3") + READY)
    assert b"s19" not in d.session._stmts
    d.feed(True, B("p", "s18") + E("p") + SYNC)
    d.feed(False, BIND_OK + DONE("SELECT 1") + READY)
    assert d.spans[-1].attributes["db.collection.name"] == "t18"


def test_copy_in_and_out():
    d = Driver(pg)
    connect(d)
    d.feed(True, Q("COPY items (a, b) FROM STDIN"))
    d.feed(False, msg(b"G", b"\0\0\2\0\0\0\0"))
    d.feed(True, msg(b"d", b"1\tx\n" * 1000) + msg(b"d", b"2\ty\n") + msg(b"c"))
    d.feed(False, DONE("COPY 1001") + READY)
    d.feed(True, Q("COPY items TO STDOUT"))
    d.feed(False, msg(b"H", b"\0\0\1\0\0") + msg(b"d", b"1\n") * 50 + msg(b"c") + DONE("COPY 50") + READY)
    assert [s.name for s in d.spans] == ["COPY items", "COPY items"]
    assert d.buffered() == 0


# -- TLS -----------------------------------------------------------------------------------------
def test_ssl_refused_carries_on():
    d = Driver(pg)
    d.feed(True, SSL_REQUEST)
    d.feed(False, b"N")
    connect(d)
    d.feed(True, Q("SELECT 1"))
    d.feed(False, DONE("SELECT 1") + READY)
    assert len(d.spans) == 1 and not d.drops


@pytest.mark.parametrize("walker", [True, False])
def test_handshake_segments_skip_the_buffer(walker: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the stage, the N answer and the startup packet go through feed_whole (the buffer
    only for the SSLRequest the connection is detected on), the server's first segment too with
    the walker (its resync scan is C's); the spans are those feed gives, user and database read."""
    from tests.support.whole import run_both_ways, run_stage
    if not walker:
        monkeypatch.setattr(pg, "_C", None)
    feeds: list[bool] = []
    feed = pg.Session.feed

    def counted(self, from_client, buf, ts):  # type: ignore[no-untyped-def]
        feeds.append(from_client)
        return feed(self, from_client, buf, ts)

    first = AUTH_OK + msg(b"S", cstr("server_version") + cstr("15")) + msg(b"K", b"\0" * 8) + READY
    segs = [(True, SSL_REQUEST), (False, b"N"), (True, startup("bob", "crm")), (False, first),
            (True, Q("SELECT 1")), (False, DONE("SELECT 1") + READY)]
    spans, drops = run_both_ways(pg.Session, 5432, segs)  # the same as the buffer gives
    assert [(s[0], dict(s[6])["db.namespace"]) for s in spans] == [("SELECT", "crm")] and not drops
    monkeypatch.setattr(pg.Session, "feed", counted)
    assert run_stage(5432, segs) == (spans, drops)
    assert feeds == ([True] if walker and pg._C is not None else [True, False]), feeds


def test_ssl_accepted_stops_and_counts():
    d = Driver(pg)
    d.feed(True, SSL_REQUEST)
    d.feed(False, b"S")
    d.feed(True, b"\x16\x03\x01\x02\x00" + os.urandom(300))
    d.feed(False, b"\x16\x03\x03" + os.urandom(500))
    assert d.drops == {"tls": 1}
    assert d.spans == [] and d.buffered() == 0 and not d.errors


# -- detection -------------------------------------------------------------------------------------
def _buf(b: bytes) -> LargeBuffer:
    return LargeBuffer(b)


def test_detect():
    assert pg.detect(_buf(startup()), True) == Detection.REQUEST
    assert pg.detect(_buf(startup()), None) == Detection.REQUEST
    assert pg.detect(_buf(startup()[:10]), None) == Detection.NEED_MORE
    assert pg.detect(_buf(SSL_REQUEST), None) == Detection.REQUEST
    # mid-stream: typed messages, checked per type
    assert pg.detect(_buf(Q("SELECT 1")), None) == Detection.REQUEST
    assert pg.detect(_buf(P("", "SELECT 1") + B() + E() + SYNC), None) == Detection.REQUEST
    assert pg.detect(_buf(ROW(b"1") + DONE("SELECT 1") + READY), None) == Detection.RESPONSE
    assert pg.detect(_buf(ROW(b"1") + DONE("SELECT 1") + READY), False) == Detection.RESPONSE
    # not PostgreSQL
    assert pg.detect(_buf(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None) == Detection.NO
    assert pg.detect(_buf(b"*1\r\n$4\r\nPING\r\n"), None) == Detection.NO
    assert pg.detect(_buf(struct.pack(">ii", 2**31 - 1, 196608) + b"user\0x\0\0"), None) == Detection.NO
    assert pg.detect(_buf(struct.pack(">ii", 4, 196608)), None) == Detection.NO
    assert pg.detect(_buf(b"Q\x7f\xff\xff\xffSELECT"), None) == Detection.NO
    assert pg.detect(_buf(b"Q\x00\x00\x00\x09SELE\x01"), None) == Detection.NO


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from([True, False, None]))
def test_detect_random_bytes(data, from_client):
    assert pg.detect(_buf(data), from_client) in (Detection.NO, Detection.NEED_MORE, Detection.REQUEST,
                                                   Detection.RESPONSE)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,reason", [
    (b"Q\x80\x00\x00\x00SELECT", "bad_message"),        # length 2^31 (negative int32)
    (b"Q\x7f\xff\xff\xffSELECT", "message_too_large"),  # 2 GiB
    (b"\x01\x02\x03\x04\x05\x06", "bad_message"),      # garbage
])
def test_bad_lengths_are_counted_and_parsing_resumes(bad, reason):
    d = Driver(pg)
    connect(d)
    d.feed(True, bad)
    assert d.drops[reason] == 1
    d.feed(True, b"\xff" * 50)  # more garbage while resynchronising: dropped
    d.feed(True, Q("SELECT 2"))
    d.feed(False, DONE("SELECT 1") + READY)
    assert [s.name for s in d.spans] == ["SELECT"]


def test_bogus_startup_length():
    d = Driver(pg)
    d.feed(True, struct.pack(">ii", 2**31 - 1, 196608) + b"user\0x\0\0")
    assert d.drops["bad_startup"] == 1
    d.feed(True, Q("SELECT 1"))
    d.feed(False, DONE("SELECT 1") + READY)
    assert len(d.spans) == 1


def test_mid_stream_pickup_resyncs_at_next_message():
    full = ROW(b"x" * 40) + ROW(b"y" * 40) + DONE("SELECT 2") + READY
    d = Driver(pg)
    # Joined in the middle: the client's next query, the server's tail of an older answer.
    d.feed(False, full[13:])
    d.feed(True, Q("SELECT * FROM t"))
    d.feed(False, ROW(b"1") + DONE("SELECT 1") + READY)
    assert [s.name for s in d.spans] == ["SELECT t"]
    assert d.drops["resync"] == 1
    assert "db.namespace" not in d.spans[0].attributes


def test_gap_forgets_requests_and_resyncs():
    d = Driver(pg)
    connect(d)
    d.feed(True, Q("SELECT 1"))
    d.session.gap(False, 0)
    assert d.drops["gap"] == 1
    d.feed(False, ROW(b"1")[3:] + DONE("SELECT 1") + READY)   # tail of the lost answer
    d.feed(True, Q("SELECT * FROM z"))
    d.feed(False, DONE("SELECT 0") + READY)
    assert [s.name for s in d.spans] == ["SELECT z"]


def test_large_messages_are_skipped_not_held():
    d = Driver(pg)
    connect(d)
    d.feed(True, Q("SELECT blob FROM files"))
    big = ROW(b"z" * (4 << 20))
    peak = 0
    srv = d.conn.server_buf
    for i in range(0, len(big), 65536):
        d.feed(False, big[i:i + 65536])
        peak = max(peak, len(srv))
    d.feed(False, DONE("SELECT 1") + READY)
    assert peak <= 65536
    assert d.spans[0].attributes["db.response.returned_rows"] == 1
    # A huge Bind (bytea parameter) is also consumed as it arrives.
    d.feed(True, P("", "INSERT INTO files VALUES ($1)") + B(params=(b"q" * (2 << 20),)) + E() + SYNC, 65536)
    d.feed(False, PARSE_OK + BIND_OK + DONE("INSERT 0 1") + READY)
    assert d.spans[-1].name == "INSERT files" and d.buffered() == 0


def test_huge_query_text_is_cut_and_sanitised():
    d = Driver(pg)
    connect(d)
    d.feed(True, Q("INSERT INTO t VALUES ('" + "s" * 100000 + "')"), 4096)
    d.feed(False, DONE("INSERT 0 1") + READY)
    text = d.spans[0].attributes["db.query.text"]
    assert text == "INSERT INTO t VALUES (?" and d.spans[0].name == "INSERT t"


def _alloc(rows: int) -> int:
    d = Driver(pg)
    connect(d)
    reply = ROWDESC("a") + ROW(b"v" * 100) * rows + DONE(f"SELECT {rows}") + READY
    q = Q("SELECT a FROM t WHERE b = 'x'")
    d.feed(True, q)  # warm caches
    d.feed(False, reply)
    peak = d.exchange_peak(q, reply)
    assert d.spans[-1].attributes["db.response.returned_rows"] == rows
    return peak


def test_allocation_is_flat_when_result_grows_100x():
    small, large = _alloc(100), _alloc(10000)
    assert large < small * 1.5 + 4096, (small, large)


# -- fuzzing -------------------------------------------------------------------------------------
def _session_bytes() -> list[tuple[bool, bytes]]:
    return pcap_script(os.path.join(FIXTURES, "psycopg_session.pcap"))[0]


_SEED = None


def _seed() -> list[tuple[bool, bytes]]:
    global _SEED
    if _SEED is None:
        _SEED = _session_bytes()
    return _SEED


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=12))
def test_fuzz_random_streams(script):
    d = Driver(pg)
    d.run(script)
    d.close()
    assert d.buffered() <= 200 * 12


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_real_session(data):
    script = list(_seed())
    i = data.draw(st.integers(0, len(script) - 1))
    side, payload = script[i]
    pos = data.draw(st.integers(0, max(len(payload) - 1, 0)))
    mode = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if mode == "flip" and payload:
        payload = payload[:pos] + bytes([payload[pos] ^ data.draw(st.integers(1, 255))]) + payload[pos + 1:]
    elif mode == "cut":
        payload = payload[:pos]
    else:
        payload = payload[:pos] + data.draw(st.binary(min_size=1, max_size=16)) + payload[pos:]
    script[i] = (side, payload)
    d = Driver(pg)
    d.run(script, chunk=data.draw(st.sampled_from([None, 1, 13])))
    d.close()
    assert len(d.spans) <= 20


# -- the recorded psycopg session -------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 1, 5, 1000])
def test_recorded_session_any_chunking(chunk):
    d = Driver(pg)
    d.run(_seed(), chunk)
    names = [s.name for s in d.spans]
    assert names == ["BEGIN", "CREATE TABLE orders", "INSERT orders", "INSERT orders; INSERT orders",
                     "SELECT orders", "SELECT orders", "UPDATE orders", "SELECT orders", "COPY orders",
                     "COPY orders", "SELECT nosuch", "ROLLBACK", "DEALLOCATE"]
    assert not d.drops and not d.errors


def _alloc_query(size: int) -> int:
    d = Driver(pg)
    connect(d)
    q = Q("INSERT INTO t VALUES ('" + "s" * size + "')")
    chunks = [q[i:i + 8192] for i in range(0, len(q), 8192)]
    cli = d.conn.client_buf
    gc.collect()
    tracemalloc.start()
    for c in chunks:
        cli.append(c, 0)
        d.session.feed(True, cli, 0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    d.feed(False, DONE("INSERT 0 1") + READY)
    assert d.spans[-1].name == "INSERT t"
    return peak


def test_allocation_is_flat_when_query_grows_100x():
    small, large = _alloc_query(20_000), _alloc_query(2_000_000)
    assert large < small * 1.5 + 4096, (small, large)


@pytest.mark.parametrize("prefix", [True, False])
def test_garbage_on_the_port_through_the_protocols_stage(tmp_path, prefix):
    """Real receiver + stage: garbage (after a valid start, or alone) is counted, never a crash."""
    import random

    from tests.support.pcapgen import LINKTYPE_RAW, TcpFlow, write_pcap
    from tests.support.replay import replay

    rnd = random.Random(5)
    flow = TcpFlow(("10.0.0.1", 40000), ("10.0.0.2", 5432))
    frames = flow.handshake()
    if prefix:
        frames += [flow.send(True, startup()), flow.send(False, AUTH_OK + READY),
                   flow.send(True, Q("SELECT 1")), flow.send(False, DONE("SELECT 1") + READY)]
    for _ in range(40):
        frames.append(flow.send(True, rnd.randbytes(rnd.randrange(1, 3000))))
        frames.append(flow.send(False, rnd.randbytes(rnd.randrange(1, 3000))))
    path = tmp_path / "garbage.pcap"
    write_pcap(path, frames, LINKTYPE_RAW)
    spans, _, stats = replay(path)
    assert len(spans) == (1 if prefix else 0)
    assert stats["drops"] and not any("internal_error" in k for k in stats["drops"]), stats


def test_settings_validation_and_config_through_the_stage():
    from pydantic import ValidationError

    from tests.support.replay import replay

    assert pg.Settings().sanitize_query is True
    with pytest.raises(ValidationError):
        pg.Settings.model_validate({"sanitize_querry": False})  # typo: unknown keys are errors
    with pytest.raises(ValidationError):
        pg.Settings.model_validate({"max_statements": 0})
    spans, _, _ = replay(os.path.join(FIXTURES, "psycopg_session.pcap"),
                         {"postgresql": {"sanitize_query": False}})
    texts = [s.attributes["db.query.text"] for s in spans]
    assert "SELECT * FROM nosuch WHERE a = 'secret'" in texts


# -- the end of a capture is not a failure (issue 16 class 4) ----------------------------------------
@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_answer_cut_by_the_end_of_the_capture_is_an_incomplete_span(chunk):
    """An error whose ReadyForQuery never came, rows without their CommandComplete: spans of
    what was seen, marked wirespan.incomplete, with the status the answer gave; a query never
    answered is counted."""
    d = Driver(pg)
    connect(d)
    d.feed(True, Q("INSERT INTO t VALUES (1)"), chunk)
    d.feed(False, ERROR("23505", "duplicate key value violates unique constraint \"t_pkey\""), chunk)
    d.close()
    (s,) = d.spans
    assert s.name == "INSERT t" and s.status_code == StatusCode.ERROR
    assert s.attributes["error.type"] == "23505" and s.attributes["wirespan.incomplete"] is True
    d = Driver(pg)
    connect(d)
    d.feed(True, Q("SELECT a FROM t"), chunk)
    d.feed(False, ROWDESC("a") + ROW(b"1") + ROW(b"2"), chunk)
    d.feed(True, Q("SELECT 2"), chunk)  # pipelined, never answered
    d.close()
    (s,) = d.spans
    assert s.name == "SELECT t" and s.status_code == StatusCode.UNSET and "error.type" not in s.attributes
    assert s.attributes["db.response.returned_rows"] == 2 and s.attributes["wirespan.incomplete"] is True
    assert d.drops["no_response"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"\1")), st.lists(st.integers(0, 40), max_size=4),
       st.lists(st.integers(1, 12), max_size=6), st.integers(0, 40), st.integers(0, 45))
def test_cstr_end_in_place_matches_the_buffer_find(data: bytes, nuls: list, cuts: list, off: int, end: int) -> None:
    """_cstr_end reads the chunk in place: the offset past the NUL (or -1) that a buffer find gives,
    however the bytes are cut into chunks."""
    from processors.protocols.postgresql import _cstr_end
    from service.largebuf import LargeBuffer
    from tests.support.driver import pieces
    b = bytearray(data or b"x")
    for i in nuls:
        b[i % len(b)] = 0
    buf = LargeBuffer(*pieces(bytes(b), cuts))
    end = min(end, len(b))
    z = bytes(b).find(b"\0", off, end)
    assert _cstr_end(buf, off, end) == (-1 if off >= end or z < 0 else z + 1)
    assert pg._cstr_end_view(memoryview(bytes(b)), off, end) == _cstr_end(buf, off, end)  # feed_whole's


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=8),
       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40),
       st.integers(0, 80), st.booleans())
def test_error_fields_read_what_the_server_wrote(code: str, message: str, cap: int, straddle: bool) -> None:
    """ErrorResponse's SQLSTATE (its first five characters) and message, from a body in one view or
    in a buffer whose chunks cut it (the buffered path takes the buffer's view), whatever the
    head cap leaves of it: the message is then a prefix of what was written."""
    from tests.support.driver import pieces
    c, m = code.encode(), message.encode()
    body = b"SERROR\0" + b"C" + c + b"\0" + b"M" + m + b"\0\0"
    end = min(cap, len(body))
    if straddle:
        buf = LargeBuffer(*pieces(body, [3, 5, 7, 11]))
        view = buf.view_at(0, end)
    else:
        view = memoryview(body)
    got_code, got_msg = pg._error_fields_view(view, 0, end)
    c_at = body.index(b"C")
    if end > c_at:
        assert got_code == str(c[:min(5, end - c_at - 1)], "ascii", "replace")
    else:
        assert got_code == ""
    m_at = body.index(b"\0M") + 1
    if end > m_at:
        whole = str(m, "utf-8", "replace")
        assert whole.startswith(got_msg.rstrip("\ufffd")) and (end < len(body) - 1 or got_msg == whole)
    else:
        assert got_msg == ""


def _extended_conversation() -> list[tuple[bool, bytes]]:
    """Named and unnamed statements and portals, Close, Describe, an error skipping to Sync, a
    Parse error, a simple query's error, COPY, a notice, a function call, a suspended portal."""
    return [(True, startup()),
            (False, AUTH_OK + msg(b"S", cstr("server_version") + cstr("15")) + msg(b"K", b"\0" * 8) + READY),
            (True, P("s1", "SELECT * FROM users WHERE id = $1") + B("p1", "s1", (b"7",)) + DESCRIBE(b"P", "p1")
             + E("p1") + SYNC),
            (False, PARSE_OK + BIND_OK + ROWDESC("id") + ROW(b"7") + DONE("SELECT 1") + READY),
            (True, B("", "s1", (b"8",)) + E() + B("p2", "nosuch") + E("p2") + SYNC),
            (False, BIND_OK + ROW(b"8") + msg(b"s") + ERROR("26000", "prepared statement \"nosuch\" does not exist")
             + READY),
            (True, msg(b"C", b"S" + cstr("s1")) + P("", "INSERT INTO t VALUES ('x')") + B()), (True, E() + SYNC),
            (False, msg(b"3") + PARSE_OK + BIND_OK + DONE("INSERT 0 1") + READY),
            (True, B("p3", "s1") + E("p3") + SYNC), (False, BIND_OK + DONE("SELECT 0") + READY),
            (True, P("", "SELEC oops") + B() + E() + SYNC),
            (False, ERROR("42601", "syntax error at or near 'SELEC'") + READY),
            (True, Q("SELECT 1; SELECT 2")),
            (False, ROWDESC("a") + ROW(b"1") + DONE("SELECT 1") + ERROR("22012", "division by zero") + READY),
            (True, Q("COPY t FROM STDIN")), (False, msg(b"G", b"\0\0\0")),
            (True, msg(b"d", b"1\n") + msg(b"c")), (False, DONE("COPY 1") + ERROR("01000", "careful", b"N") + READY),
            (True, msg(b"F", b"\0\0\0\1" + b"\0\0\0\0\0\0")), (False, msg(b"V", b"\xff\xff\xff\xff") + READY),
            (True, msg(b"H") + Q("")), (False, msg(b"I") + READY),
            (True, TERMINATE)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10_000), st.integers(0, 255),
                                         st.booleans()), max_size=3))
def test_feed_whole_matches_the_buffered_path(recorded: bool, mutations: list) -> None:
    """The buffer-less path (feed_whole) gives the buffered path's spans and drops, for the
    recorded psycopg session and the hand-built extended-protocol one, as sent, with bytes
    changed and with segments split in two."""
    from tests.support.whole import mutate, run_both_ways
    segs = mutate(_seed() if recorded else _extended_conversation(), mutations)
    spans, drops = run_both_ways(pg.Session, 5432, segs)
    if not mutations:
        assert not drops, drops
        names = [x[0] for x in spans]
        if recorded:
            assert len(names) == 13, names
        else:
            assert names == ["SELECT users", "SELECT users", "postgresql", "INSERT t", "postgresql", "SELEC",
                             "SELECT; SELECT",
                             "COPY t", "postgresql"], names


@settings(max_examples=600, deadline=None)
@given(st.integers(1, 80), st.lists(st.tuples(st.integers(0, 79), st.one_of(
    st.sampled_from([0, 8, 9, 10, 11, 12, 13, 14, 31, 32]), st.integers(0, 255))), max_size=2),
       st.lists(st.integers(1, 30), max_size=4), st.integers(0, 80), st.integers(-5, 90), st.booleans())
def test_printable_scan_matches_the_byte_rule(size: int, marks: list, cuts: list, off: int, end: int,
                                              nul: bool) -> None:
    """_printable's regex scan gives the byte rule's answer (no byte < 0x20 in the first 64
    but tab, LF, CR, and NUL when allowed), however the bytes are cut into chunks: printable
    text with a byte or two of any value written in."""
    from tests.support.driver import pieces
    b = bytearray(b"select 1" * 10)[:size]
    for i, v in marks:
        b[i % size] = v
    data = bytes(b)
    off = min(off, len(data))
    end = min(end, len(data))
    n = min(end - off, 64)
    want = n <= 0 or all(not (b < 0x20 and b not in (9, 10, 13) and not (nul and b == 0)) for b in data[off:off + n])
    assert pg._printable(LargeBuffer(*pieces(data, cuts)), off, end, nul) == want
