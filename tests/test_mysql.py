"""MySQL/MariaDB parser: hand-built packets fed whole, in pieces and byte by byte, bad
input, fuzzing, allocation, and the recorded PyMySQL + mysql-connector session re-fed."""

from __future__ import annotations

import gc
import os
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import mysql as my
from processors.protocols.base import Detection
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.dbdrive import Driver, pcap_script

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "mysql")
DEPRECATE_EOF = my.CLIENT_DEPRECATE_EOF
BASE_CAPS = my.CLIENT_PROTOCOL_41 | my.CLIENT_SECURE_CONNECTION | my.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA


# -- packet builders (MySQL "Client/Server Protocol") ----------------------------------------
def pkt(payload: bytes, seq: int) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload


def lenenc(n: int) -> bytes:
    if n < 0xFB:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfc" + struct.pack("<H", n)
    if n < 1 << 24:
        return b"\xfd" + struct.pack("<I", n)[:3]
    return b"\xfe" + struct.pack("<Q", n)


def lstr(b: bytes) -> bytes:
    return lenenc(len(b)) + b


def greeting(caps: int = 0xFFFFFFFF) -> bytes:
    body = (b"\x0a" + b"10.11.6-MariaDB\0" + struct.pack("<I", 7) + b"abcdefgh" + b"\0"
            + struct.pack("<H", caps & 0xFFFF) + b"\x2d" + struct.pack("<H", 2) + struct.pack("<H", caps >> 16)
            + b"\x15" + b"\0" * 10 + b"ijklmnopqrst\0" + b"mysql_native_password\0")
    return pkt(body, 0)


def response(user: str = "app", db: str | None = "shop", caps: int = BASE_CAPS | DEPRECATE_EOF,
             ssl: bool = False) -> bytes:
    if db is not None:
        caps |= my.CLIENT_CONNECT_WITH_DB
    if ssl:
        return pkt(struct.pack("<IIB", caps | my.CLIENT_SSL, 1 << 24, 45) + b"\0" * 23, 1)
    body = struct.pack("<IIB", caps, 1 << 24, 45) + b"\0" * 23 + user.encode() + b"\0" + lstr(b"x" * 20)
    if db is not None:
        body += db.encode() + b"\0"
    return pkt(body + b"mysql_native_password\0", 1)


def OK(seq: int = 1, status: int = 2, header: int = 0) -> bytes:
    return pkt(bytes([header]) + b"\0\0" + struct.pack("<HH", status, 0), seq)


def ERR(code: int, state: str, text: str, seq: int = 1) -> bytes:
    return pkt(b"\xff" + struct.pack("<H", code) + b"#" + state.encode() + text.encode(), seq)


def EOF(seq: int, status: int = 2) -> bytes:
    return pkt(b"\xfe" + struct.pack("<HH", 0, status), seq)


def query(sql: str) -> bytes:
    return pkt(b"\x03" + sql.encode(), 0)


def coldef(name: str) -> bytes:
    return (lstr(b"def") + lstr(b"shop") + lstr(b"t") + lstr(b"t") + lstr(name.encode()) + lstr(name.encode())
            + b"\x0c" + struct.pack("<HIBHB", 45, 255, 0xFD, 0, 0) + b"\0\0")


def resultset(cols: list[str], rows: list[list[bytes]], deprecate: bool = True, seq: int = 1,
              status: int = 2) -> bytes:
    out = pkt(lenenc(len(cols)), seq)
    seq += 1
    for c in cols:
        out += pkt(coldef(c), seq)
        seq += 1
    if not deprecate:
        out += EOF(seq)
        seq += 1
    for r in rows:
        out += pkt(b"".join(lstr(v) for v in r), seq)
        seq += 1
    out += OK(seq, status, 0xFE) if deprecate else EOF(seq, status)
    return out


def connect(d: Driver, deprecate: bool = True, db: str | None = "shop") -> None:
    d.feed(False, greeting())
    d.feed(True, response(db=db, caps=BASE_CAPS | (DEPRECATE_EOF if deprecate else 0)))
    d.feed(False, OK(2))


CHUNKINGS = [None, 1, 5]


@pytest.mark.parametrize("chunk", CHUNKINGS)
@pytest.mark.parametrize("deprecate", [True, False])
def test_query_with_result_set(chunk, deprecate):
    d = Driver(my, port=3306)
    connect(d, deprecate)
    d.feed(True, query("SELECT id, name FROM users WHERE name = 'bob' AND id IN (1, 2, 3)"), chunk)
    d.feed(False, resultset(["id", "name"], [[b"1", b"bob"], [b"2", b"bob"]], deprecate), chunk)
    assert len(d.spans) == 1
    s = d.spans[0]
    a = s.attributes
    assert s.name == "SELECT users" and s.kind == SpanKind.CLIENT
    assert a["db.system.name"] == "mysql"
    assert a["db.namespace"] == "shop"
    assert a["db.operation.name"] == "SELECT"
    assert a["db.collection.name"] == "users"
    assert a["db.query.text"] == "SELECT id, name FROM users WHERE name = ? AND id IN (?)"
    assert a["db.response.returned_rows"] == 2
    assert a["server.port"] == 3306
    assert not d.drops and d.buffered() == 0 and not d.session._pending


@pytest.mark.parametrize("sanitize, want", [
    (True, "Duplicate entry ? for key ?"),
    (False, "Duplicate entry 'apple' for key 'fruits.PRIMARY'"),
])
def test_error_message_literals_are_sanitized_by_default(sanitize, want):
    d = Driver(my, my.Settings(sanitize_errors=sanitize), port=3306)
    connect(d)
    d.feed(True, query("INSERT INTO fruits (name) VALUES ('apple')"))
    d.feed(False, ERR(1062, "23000", "Duplicate entry 'apple' for key 'fruits.PRIMARY'"))
    d.feed(True, query("SELECT * FROM t WHERE"))
    d.feed(False, ERR(1064, "42000", "You have an error in your SQL syntax; check the manual that corresponds to "
                                     "your MariaDB server version for the right syntax to use near 'pw = 'hunter2''"
                                     " at line 1"))
    dup, syntax = d.spans
    assert dup.status_message == want and dup.attributes["db.query.text"] == "INSERT INTO fruits (name) VALUES (?)"
    assert dup.attributes["error.type"] == "23000" and dup.attributes["db.response.status_code"] == "1062"
    assert ("hunter2" in syntax.status_message) is not sanitize
    if sanitize:
        assert syntax.status_message.endswith("for the right syntax to use near ? at line 1")


def test_error_and_namespace_changes():
    d = Driver(my, port=3306)
    connect(d)
    d.feed(True, query("SELECT * FROM nosuch"))
    d.feed(False, ERR(1146, "42S02", "Table 'shop.nosuch' doesn't exist"))
    d.feed(True, pkt(b"\x02other", 0))  # COM_INIT_DB
    d.feed(False, OK())
    d.feed(True, query("INSERT INTO t VALUES (1)"))
    d.feed(False, OK())
    d.feed(True, query("USE `third`"))
    d.feed(False, OK())
    d.feed(True, query("DELETE FROM t"))
    d.feed(False, OK())
    s = d.spans
    assert [x.name for x in s] == ["SELECT nosuch", "INSERT t", "USE", "DELETE t"]
    assert s[0].status_code == StatusCode.ERROR and s[0].status_message == "Table ? doesn't exist"  # sanitized
    assert s[0].attributes["db.response.status_code"] == "1146" and s[0].attributes["error.type"] == "42S02"
    assert s[1].attributes["db.namespace"] == "other"
    assert s[3].attributes["db.namespace"] == "third"


def test_ping_quit_close_make_no_span_by_default():
    d = Driver(my, port=3306)
    connect(d)
    d.feed(True, pkt(b"\x0e", 0))
    d.feed(False, OK())
    d.feed(True, pkt(b"\x19" + struct.pack("<I", 1), 0))
    d.feed(True, pkt(b"\x01", 0))
    d.close()
    assert d.spans == [] and not d.drops
    d = Driver(my, my.Settings(trace_ping=True), port=3306)
    connect(d)
    d.feed(True, pkt(b"\x0e", 0))
    d.feed(False, OK())
    assert [s.name for s in d.spans] == ["PING"]


@pytest.mark.parametrize("deprecate", [True, False])
@pytest.mark.parametrize("chunk", [None, 3])
def test_prepared_statements(deprecate, chunk):
    d = Driver(my, port=3306)
    connect(d, deprecate)
    sql = "SELECT item FROM orders WHERE id = ? AND qty > ?"
    d.feed(True, pkt(b"\x16" + sql.encode(), 0), chunk)
    prep = pkt(b"\0" + struct.pack("<IHHBH", 7, 1, 2, 0, 0), 1)
    seq = 2
    for _ in range(2):
        prep += pkt(coldef("?"), seq)
        seq += 1
    if not deprecate:
        prep += EOF(seq)
        seq += 1
    prep += pkt(coldef("item"), seq)
    seq += 1
    if not deprecate:
        prep += EOF(seq)
    d.feed(False, prep, chunk)
    assert d.spans == [] and not d.session._pending
    for _ in range(2):
        d.feed(True, pkt(b"\x17" + struct.pack("<IBI", 7, 0, 1) + b"\0\x01" + b"\x08\0\x08\0" + b"\0" * 16, 0),
               chunk)
        k = 3 if deprecate else 4
        rows = pkt(lenenc(1), 1) + pkt(coldef("item"), 2)
        rows += (b"" if deprecate else EOF(3)) + pkt(b"\0\0" + lstr(b"pear"), k) + (
            OK(k + 1, 2, 0xFE) if deprecate else EOF(k + 1))
        d.feed(False, rows, chunk)
    d.feed(True, pkt(b"\x17" + struct.pack("<IBI", 7, 0, 1) + b"\0\x01" + b"\x08\0\x08\0" + b"\0" * 16, 0))
    d.feed(False, ERR(1062, "23000", "Duplicate entry"))
    assert [s.name for s in d.spans] == ["SELECT orders"] * 3
    assert all(s.attributes["db.query.text"] == sql for s in d.spans)
    assert d.spans[0].attributes["db.response.returned_rows"] == 1
    assert d.spans[2].attributes["error.type"] == "23000"
    d.feed(True, pkt(b"\x19" + struct.pack("<I", 7), 0))
    assert 7 not in d.session._stmts


def test_prepare_error_gives_a_span_and_unknown_execute_is_named():
    d = Driver(my, port=3306)
    connect(d)
    d.feed(True, pkt(b"\x16SELEC 1", 0))
    d.feed(False, ERR(1064, "42000", "You have an error in your SQL syntax"))
    d.feed(True, pkt(b"\x17" + struct.pack("<IBI", 99, 0, 1), 0))
    d.feed(False, OK())
    assert [s.name for s in d.spans] == ["SELEC", "EXECUTE"]  # the verb as written
    assert d.spans[0].attributes["db.response.status_code"] == "1064"


def test_multi_results_one_span():
    d = Driver(my, port=3306)
    connect(d)
    d.feed(True, query("CALL report(1)"))
    more = 2 | my.SERVER_MORE_RESULTS_EXISTS
    d.feed(False, resultset(["a"], [[b"1"]], status=more) + resultset(["b"], [[b"2"], [b"3"]], seq=5, status=more))
    assert len(d.spans) == 0
    d.feed(False, OK(10))  # final OK of a CALL
    assert len(d.spans) == 1 and d.spans[0].attributes["db.response.returned_rows"] == 3


def test_ssl_request_stops_and_counts():
    d = Driver(my, port=3306)
    d.feed(False, greeting())
    d.feed(True, response(ssl=True))
    d.feed(True, b"\x16\x03\x01\x02\x00" + os.urandom(200))
    d.feed(False, b"\x16\x03\x03" + os.urandom(300))
    assert d.drops == {"tls": 1} and d.spans == [] and d.buffered() == 0


def test_over_16mb_payloads_are_split_and_skipped():
    d = Driver(my, port=3306)
    connect(d)
    big = b"\x03INSERT INTO blobs VALUES ('" + b"a" * (my.MAX_PACKET_PAYLOAD + 100) + b"')"
    first, rest = big[:my.MAX_PACKET_PAYLOAD], big[my.MAX_PACKET_PAYLOAD:]
    wire = pkt(first, 0) + pkt(rest, 1)
    peak = 0
    for i in range(0, len(wire), 1 << 20):
        d.feed(True, wire[i:i + (1 << 20)])
        peak = max(peak, len(d.conn.client_buf))
    d.feed(False, OK(2))  # the answer follows the continuation packet's sequence id
    # a 16 MiB row split across two packets counts as one row
    row = lstr(b"r" * (my.MAX_PACKET_PAYLOAD + 10))
    d.feed(True, query("SELECT b FROM blobs"))
    wire = pkt(lenenc(1), 1) + pkt(coldef("b"), 2) + pkt(row[:my.MAX_PACKET_PAYLOAD], 3) + pkt(
        row[my.MAX_PACKET_PAYLOAD:], 4) + OK(5, 2, 0xFE)
    for i in range(0, len(wire), 1 << 20):
        d.feed(False, wire[i:i + (1 << 20)])
        peak = max(peak, len(d.conn.server_buf))
    assert peak <= 1 << 20
    assert [s.name for s in d.spans] == ["INSERT blobs", "SELECT blobs"]
    assert d.spans[0].attributes["db.query.text"] == "INSERT INTO blobs VALUES (?"
    assert d.spans[1].attributes["db.response.returned_rows"] == 1


def _buf(b: bytes) -> LargeBuffer:
    return LargeBuffer(b)


def test_detect():
    assert my.detect(_buf(greeting()), None) == Detection.RESPONSE
    assert my.detect(_buf(greeting()), False) == Detection.RESPONSE
    assert my.detect(_buf(greeting()[:20]), None) == Detection.NEED_MORE
    assert my.detect(_buf(query("SELECT 1")), None) == Detection.REQUEST
    assert my.detect(_buf(pkt(b"\x0e", 0)), True) == Detection.REQUEST
    assert my.detect(_buf(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None) == Detection.NO
    assert my.detect(_buf(b"Q\x00\x00\x00\x0dSELECT 1\x00"), None) == Detection.NO
    assert my.detect(_buf(pkt(b"\x03SELECT \x01\x02", 0)), None) == Detection.NO
    assert my.detect(_buf(pkt(b"\x0e", 3)), None) == Detection.NO


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from([True, False, None]))
def test_detect_random_bytes(data, from_client):
    assert my.detect(_buf(data), from_client) in tuple(Detection)


def test_mid_stream_pickup():
    d = Driver(my, port=3306)
    d.feed(False, resultset(["a"], [[b"1"]] * 3)[9:])   # tail of an answer we never saw asked
    d.feed(True, query("UPDATE t SET a = 2"))
    d.feed(False, OK())
    d.feed(True, query("SELECT a FROM t"))
    d.feed(False, resultset(["a"], [[b"2"]]))
    assert [s.name for s in d.spans] == ["UPDATE t", "SELECT t"]


def test_gap_resyncs_on_next_command():
    d = Driver(my, port=3306)
    connect(d)
    d.feed(True, query("SELECT a FROM t"))
    d.session.gap(False, 0)
    d.feed(False, resultset(["a"], [[b"1"]] * 3)[7:])
    d.feed(True, query("SELECT b FROM u"))
    d.feed(False, resultset(["b"], [[b"2"]]))
    assert [s.name for s in d.spans] == ["SELECT u"] and d.drops["gap"] == 1
    d.session.gap(True, 0)
    d.feed(True, query("SELECT c FROM v")[2:] + query("SELECT d FROM w"))
    d.feed(False, OK())
    assert d.spans[-1].name == "SELECT w"


def test_unknown_command_is_malformed():
    d = Driver(my, port=3306)
    connect(d)
    d.feed(True, pkt(b"\x77junk", 0))
    assert d.drops["bad_command"] == 1


def _alloc(rows: int) -> int:
    d = Driver(my, port=3306)
    connect(d)
    q = query("SELECT a FROM t WHERE b = 'x'")
    reply = resultset(["a"], [[b"v" * 100]] * rows)
    d.feed(True, q)  # warm caches
    d.feed(False, reply)
    peak = d.exchange_peak(q, reply)
    assert d.spans[-1].attributes["db.response.returned_rows"] == rows
    return peak


def test_allocation_is_flat_when_result_grows_100x():
    small, large = _alloc(100), _alloc(10000)
    assert large < small * 1.5 + 4096, (small, large)


_SEED: list | None = None


def _seed() -> list[list[tuple[bool, bytes]]]:
    global _SEED
    if _SEED is None:
        _SEED = pcap_script(os.path.join(FIXTURES, "pymysql_connector_session.pcap"))
    return _SEED


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=12))
def test_fuzz_random_streams(script):
    d = Driver(my, port=3306)
    d.run(script)
    d.close()
    assert d.buffered() <= 200 * 12


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_real_session(data):
    script = list(_seed()[data.draw(st.integers(0, 1))])
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
    d = Driver(my, port=3306)
    d.run(script, chunk=data.draw(st.sampled_from([None, 1, 13])))
    d.close()
    assert len(d.spans) <= 20


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_recorded_sessions_any_chunking(chunk):
    names = []
    for script in _seed():
        d = Driver(my, port=3306)
        d.run(script, chunk)
        assert not d.drops and not d.errors
        names.append([s.name for s in d.spans])
    assert names == [
        ["SET", "CREATE TABLE orders", "INSERT orders", "INSERT orders", "SELECT orders", "SELECT nosuch"],
        ["SET", "SET", "SELECT orders", "SELECT orders", "UPDATE orders", "INSERT orders", "COMMIT",
         "SELECT orders"],
    ]


def test_regression_header_only_packet_before_greeting():
    # Found by test_fuzz_mutated_real_session: a bare 4-byte header read past its end.
    d = Driver(my, port=3306)
    d.feed(False, b"\x07\x00\x00\x00")
    d.feed(False, b"\x00\x00\x00\x02\x00\x00\x00")
    d.feed(True, query("SELECT 1"))
    d.feed(False, OK())
    assert not d.errors and [s.name for s in d.spans] == ["SELECT"]


def _alloc_query(size: int) -> int:
    d = Driver(my, port=3306)
    connect(d)
    q = query("INSERT INTO t VALUES ('" + "s" * size + "')")
    chunks = [q[i:i + 8192] for i in range(0, len(q), 8192)]
    cli = d.conn.client_buf
    gc.collect()
    tracemalloc.start()
    for c in chunks:
        cli.append(c, 0)
        d.session.feed(True, cli, 0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    d.feed(False, OK())
    assert d.spans[-1].name == "INSERT t"
    return peak


def test_allocation_is_flat_when_query_grows_100x():
    small, large = _alloc_query(20_000), _alloc_query(2_000_000)
    assert large < small * 1.5 + 4096, (small, large)


def test_mariadb_bulk_execute_carries_the_prepared_text():
    d = Driver(my, port=3306)
    connect(d)
    d.feed(True, pkt(b"\x16INSERT INTO t VALUES (?)", 0))
    d.feed(False, pkt(b"\0" + struct.pack("<IHHBH", 3, 0, 1, 0, 0), 1) + pkt(coldef("?"), 2))
    d.feed(True, pkt(b"\xfa" + struct.pack("<IH", 3, 0x80) + b"\x08\0" + b"\0" + struct.pack("<q", 1), 0))
    d.feed(False, OK())
    assert [s.name for s in d.spans] == ["INSERT t"]
    assert d.spans[0].attributes["db.query.text"] == "INSERT INTO t VALUES (?)"


@pytest.mark.parametrize("prefix", [True, False])
def test_garbage_on_the_port_through_the_protocols_stage(tmp_path, prefix):
    """Real receiver + stage: garbage (after a valid start, or alone) is counted, never a crash."""
    import random

    from tests.support.pcapgen import LINKTYPE_RAW, TcpFlow, write_pcap
    from tests.support.replay import replay

    rnd = random.Random(9)
    flow = TcpFlow(("10.0.0.1", 40000), ("10.0.0.2", 3306))
    frames = flow.handshake()
    if prefix:
        frames += [flow.send(False, greeting()), flow.send(True, response()), flow.send(False, OK(2)),
                   flow.send(True, query("SELECT 1")), flow.send(False, OK())]
    for _ in range(40):
        frames.append(flow.send(True, rnd.randbytes(rnd.randrange(1, 3000))))
        frames.append(flow.send(False, rnd.randbytes(rnd.randrange(1, 3000))))
    path = tmp_path / "garbage.pcap"
    write_pcap(path, frames, LINKTYPE_RAW)
    spans, _, stats = replay(path)
    assert len(spans) == (1 if prefix else 0)
    assert stats["drops"] and not any("internal_error" in k for k in stats["drops"]), stats


def test_sequence_ids_are_checked():
    d = Driver(my, port=3306)
    connect(d)
    d.feed(True, query("SELECT a FROM t"))
    d.feed(False, OK(7))                       # not an answer to that command
    assert d.drops["bad_sequence"] == 1
    d.feed(True, pkt(b"\x03SELECT 1", 3))      # a client packet in the middle of nowhere
    assert d.drops["bad_sequence"] == 2
    d.feed(False, OK(1))                       # nothing pending any more: ignored until a command
    d.feed(True, query("SELECT b FROM u"))
    d.feed(False, OK(1))
    assert [s.name for s in d.spans] == ["SELECT u"]


# -- the compressed protocol (CLIENT_COMPRESS: zlib; CLIENT_ZSTD_COMPRESSION_ALGORITHM) ----------
def zframes(data: bytes, seq: int = 0, codec: str = "zlib", split: int = 0) -> bytes:
    """``data`` (whole packets) as compressed-protocol frames: 3-byte compressed length,
    sequence id, 3-byte uncompressed length (0: stored as is), payload; ``split`` cuts the
    packets across two frames at that offset (a packet may span frames)."""
    import zlib

    parts = [data[:split], data[split:]] if split else [data]
    out = b""
    for i, part in enumerate(parts):
        if codec == "stored":
            body, ulen = part, 0
        elif codec == "zstd":
            import zstandard
            body, ulen = zstandard.ZstdCompressor().compress(part), len(part)
        else:
            body, ulen = zlib.compress(part), len(part)
        out += struct.pack("<I", len(body))[:3] + bytes([(seq + i) & 0xFF]) + struct.pack("<I", ulen)[:3] + body
    return out


def connect_compressed(d: Driver, caps: int) -> None:
    d.feed(False, greeting())
    d.feed(True, response(caps=BASE_CAPS | DEPRECATE_EOF | caps))
    d.feed(False, OK(2))


@pytest.mark.parametrize("chunk", CHUNKINGS)
@pytest.mark.parametrize("codec, flag", [("zlib", my.CLIENT_COMPRESS), ("stored", my.CLIENT_COMPRESS),
                                         ("zstd", my.CLIENT_ZSTD_COMPRESSION_ALGORITHM)])
def test_compressed_protocol_is_followed(codec, flag, chunk):
    d = Driver(my, port=3306)
    connect_compressed(d, flag)
    rows = [[b"%d" % i, b"item-%d" % i] for i in range(40)]
    d.feed(True, zframes(query("SELECT id, item FROM orders WHERE qty > 2"), codec=codec), chunk)
    reply = resultset(["id", "item"], rows)
    d.feed(False, zframes(reply, seq=1, codec=codec, split=len(reply) // 3), chunk)  # a row spans two frames
    d.feed(True, zframes(query("UPDATE orders SET qty = 1"), codec=codec), chunk)
    d.feed(False, zframes(OK(1), seq=1, codec=codec), chunk)
    d.feed(True, zframes(query("SELECT * FROM nosuch"), codec=codec), chunk)
    d.feed(False, zframes(ERR(1146, "42S02", "Table 'shop.nosuch' doesn't exist"), seq=1, codec=codec), chunk)
    assert [s.name for s in d.spans] == ["SELECT orders", "UPDATE orders", "SELECT nosuch"]
    assert d.spans[0].attributes["db.response.returned_rows"] == 40
    assert d.spans[0].attributes["db.namespace"] == "shop"
    assert d.spans[2].status_code == StatusCode.ERROR and d.spans[2].attributes["error.type"] == "42S02"
    assert not d.drops and d.buffered() == 0 and not d.session._pending


@pytest.mark.parametrize("chunk", CHUNKINGS)
@pytest.mark.parametrize("codec", ["zlib", "stored"])
def test_compressed_protocol_joined_mid_stream(codec, chunk):
    """No handshake seen: the client's first frame says the connection is compressed."""
    req = zframes(query("SELECT * FROM `az_controller_connection`"), codec=codec)
    assert my.detect(_buf(req), None) == Detection.REQUEST
    assert my.detect(_buf(req), True) == Detection.REQUEST
    for n in range(1, len(req)):
        assert my.detect(_buf(req[:n]), None) == Detection.NEED_MORE, n
    d = Driver(my, port=3306)
    d.feed(False, zframes(resultset(["a"], [[b"1"]] * 3)[20:], seq=3, codec=codec), chunk)  # an old tail
    d.feed(True, req, chunk)
    d.feed(False, zframes(resultset(["id", "name"], [[b"1", b"x"], [b"2", b"y"]]), seq=1, codec=codec), chunk)
    d.feed(True, zframes(query("SELECT 1"), codec=codec), chunk)
    d.feed(False, zframes(resultset(["1"], [[b"1"]]), seq=1, codec=codec), chunk)
    assert [s.name for s in d.spans] == ["SELECT az_controller_connection", "SELECT"]
    assert d.spans[0].attributes["db.response.returned_rows"] == 2


def test_compressed_frame_that_does_not_inflate_is_counted():
    d = Driver(my, port=3306)
    connect_compressed(d, my.CLIENT_COMPRESS)
    d.feed(True, b"\x10\x00\x00\x00\x40\x00\x00" + b"x" * 16)  # declares 64 bytes zlib, is not zlib
    assert d.drops == {"bad_compressed_frame": 1} and d.spans == []
    d.feed(True, zframes(query("SELECT 2"), seq=0))
    d.feed(False, zframes(resultset(["2"], [[b"2"]]), seq=1))
    assert [s.name for s in d.spans] == ["SELECT"]


def test_a_compression_bomb_is_refused_not_parsed():
    """Issue 20's rule (bounded work per wire byte): 16 MiB of COM_PING in a 24 KB zlib frame."""
    import time

    from processors.protocols.errors import LimitExceeded

    d = Driver(my, port=3306)
    connect_compressed(d, my.CLIENT_COMPRESS)
    bomb = zframes(b"\x01\x00\x00\x00\x0e" * (16 * 1024 * 1024 // 5 - 1))
    t = time.process_time()
    with pytest.raises(LimitExceeded, match="inflate_ratio"):
        d.session.feed(True, _buf(bomb), 1)
    assert time.process_time() - t < 0.5
    d2 = Driver(my, port=3306)  # a well compressible but sane frame still inflates
    connect_compressed(d2, my.CLIENT_COMPRESS)
    d2.feed(True, zframes(query("SELECT 1 FROM t WHERE x IN (" + ",".join(["1"] * 20000) + ")")))
    d2.feed(False, zframes(resultset(["1"], [[b"1"]]), seq=1))
    assert [s.name for s in d2.spans] == ["SELECT t"]


def test_compressed_detection_is_strict():
    for junk in (b"Q\x00\x00\x00\x0dSELECT 1\x00", b"\x05\x00\x00\x00\x00\x00\x00abcde",
                 b"\x0c\x00\x00\x00\x20\x00\x00" + b"\x41" * 12):
        assert my.detect(_buf(junk), None) == Detection.NO, junk


# -- query attributes (CLIENT_QUERY_ATTRIBUTES, MySQL 8.0.23+) ----------------------------------------
def qa_query(sql: str, attrs: list[tuple[str, int, bytes | None]] = ()) -> bytes:
    """COM_QUERY with query attributes: (name, field type, binary value or None for NULL)."""
    body = b"\x03" + lenenc(len(attrs)) + b"\x01"
    if attrs:
        bitmap = bytearray((len(attrs) + 7) // 8)
        for i, (_n, _t, v) in enumerate(attrs):
            if v is None:
                bitmap[i // 8] |= 1 << (i % 8)
        body += bytes(bitmap) + b"\x01"
        for name, ftype, _v in attrs:
            body += bytes([ftype, 0]) + lstr(name.encode())
        body += b"".join(v for _n, _t, v in attrs if v is not None)
    return pkt(body + sql.encode(), 0)


TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ATTRS = [("traceparent", 0xFE, lstr(TRACEPARENT)), ("n", 0x08, struct.pack("<q", 7)), ("gone", 0x06, None),
         ("when", 0x0C, b"\x07" + struct.pack("<HBBBBB", 2024, 5, 6, 7, 8, 9)), ("d", 0xF6, lstr(b"1.50")),
         ("t", 0x01, b"\x2a"), ("y", 0x0D, b"\xe8\x07"), ("f", 0x05, struct.pack("<d", 0.5))]
QA_CAPS = BASE_CAPS | DEPRECATE_EOF | my.CLIENT_QUERY_ATTRIBUTES


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_query_attributes_come_before_the_text(chunk):
    d = Driver(my, port=3306)
    d.feed(False, greeting())
    d.feed(True, response(caps=QA_CAPS))
    d.feed(False, OK(2))
    d.feed(True, qa_query("select @@version_comment limit 1"), chunk)
    d.feed(False, resultset(["@@version_comment"], [[b"MySQL"]]), chunk)
    d.feed(True, qa_query("SELECT name FROM users WHERE id = 1", ATTRS), chunk)
    d.feed(False, resultset(["name"], [[b"bob"]]), chunk)
    d.feed(True, qa_query("UPDATE users SET a = 2", ATTRS[2:3]), chunk)  # only a NULL attribute
    d.feed(False, OK())
    assert [s.name for s in d.spans] == ["SELECT", "SELECT users", "UPDATE users"]
    assert [s.attributes["db.query.text"] for s in d.spans] == [
        "select @@version_comment limit ?", "SELECT name FROM users WHERE id = ?", "UPDATE users SET a = ?"]
    assert not d.drops and d.buffered() == 0


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_query_attributes_joined_mid_stream(chunk):
    """Caps unknown: a text that starts with an attribute block (count, set count 1) is one."""
    first = qa_query("show databases")
    assert my.detect(_buf(first), None) == Detection.REQUEST
    assert my.detect(_buf(qa_query("SELECT 1", ATTRS)), True) == Detection.REQUEST
    d = Driver(my, port=3306)
    d.feed(True, first, chunk)
    d.feed(False, resultset(["Database"], [[b"shop"]]), chunk)
    d.feed(True, qa_query("DELETE FROM t WHERE id = 3", ATTRS), chunk)
    d.feed(False, OK(), chunk)
    assert [s.name for s in d.spans] == ["SHOW", "DELETE t"]
    assert not d.drops


def test_query_attributes_real_client_library_bytes():
    """mysql-connector-python (pure) against a scripted MySQL 8 greeting that offers
    CLIENT_QUERY_ATTRIBUTES: its own COM_QUERY bytes, with and without attributes."""
    from tests.support.mysql_responder import client_packets

    def work(cn):
        cur = cn.cursor()
        cur.add_attribute("traceparent", TRACEPARENT.decode())
        cur.add_attribute("n", 42)
        cur.execute("SELECT name FROM users WHERE id = 1")
        cur.clear_attributes()
        cur.execute("UPDATE users SET a = 2")

    packets = client_packets(work)
    assert any(p[4] == 3 and p[5:7] == b"\x02\x01" for p in packets)  # the library did send attributes
    for chunk in CHUNKINGS:
        d = Driver(my, port=3306)
        d.feed(False, greeting())
        for p in packets:
            d.feed(True, p, chunk)
            if p[3] == 1:
                d.feed(False, OK(2))
            elif p[4] != 1:
                d.feed(False, OK(), chunk)
        texts = [s.attributes["db.query.text"] for s in d.spans]
        assert texts[-2:] == ["SELECT name FROM users WHERE id = ?", "UPDATE users SET a = ?"], texts
        assert all("\x00" not in t and "\x01" not in t for t in texts)


def test_query_attributes_that_do_not_parse_are_counted():
    d = Driver(my, port=3306)
    d.feed(False, greeting())
    d.feed(True, response(caps=QA_CAPS))
    d.feed(False, OK(2))
    d.feed(True, pkt(b"\x03\x01\x05SELECT 1", 0))  # parameter_set_count must be 1
    assert d.drops == {"bad_query_attributes": 1}
    d.feed(True, qa_query("SELECT 2"))
    d.feed(False, resultset(["2"], [[b"2"]]))
    assert [s.attributes["db.query.text"] for s in d.spans] == ["SELECT ?"]


def test_execute_with_query_attributes_keeps_the_prepared_text():
    d = Driver(my, port=3306)
    d.feed(False, greeting())
    d.feed(True, response(caps=QA_CAPS))
    d.feed(False, OK(2))
    d.feed(True, pkt(b"\x16SELECT a FROM t WHERE id = ?", 0))
    d.feed(False, pkt(b"\x00" + struct.pack("<IHHBH", 9, 1, 1, 0, 0), 1) + pkt(coldef("id"), 2) + pkt(coldef("a"), 3))
    # flags PARAMETER_COUNT_AVAILABLE (0x08), iteration 1, parameter_count 2 (1 + an attribute) ...
    d.feed(True, pkt(b"\x17" + struct.pack("<IBI", 9, 0x08, 1) + b"\x02\x00\x01" + b"\x08\x00\x00\xfe\x00\x01x"
                     + struct.pack("<q", 5) + lstr(b"v"), 0))
    d.feed(False, resultset(["a"], [[b"1"]]))
    assert [(s.name, s.attributes["db.query.text"]) for s in d.spans] == [("SELECT t", "SELECT a FROM t WHERE id = ?")]


def test_settings_validation_and_config_through_the_stage():
    from pydantic import ValidationError

    from tests.support.replay import replay

    assert my.Settings().trace_ping is False
    with pytest.raises(ValidationError):
        my.Settings.model_validate({"trace_pings": True})  # typo: unknown keys are errors
    with pytest.raises(ValidationError):
        my.Settings.model_validate({"max_statements": -1})
    spans, _, _ = replay(os.path.join(FIXTURES, "pymysql_connector_session.pcap"),
                         {"mysql": {"sanitize_query": False, "trace_ping": True}})
    names = [s.name for s in spans]
    assert "PING" in names
    assert "SELECT * FROM nosuch WHERE a = 'secret'" in [s.attributes.get("db.query.text") for s in spans]


# -- the end of a capture is not a failure (issue 16 class 4) ----------------------------------------
@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_result_set_cut_by_the_end_of_the_capture_is_an_incomplete_span(chunk):
    d = Driver(my, port=3306)
    connect(d)
    d.feed(True, query("SELECT id FROM orders"), chunk)
    full = resultset(["id"], [[b"%d" % i] for i in range(10)])
    d.feed(False, full[:-20], chunk)  # the last rows and the final OK never came
    d.feed(True, query("SELECT 1"), chunk)
    d.close()
    (s,) = d.spans
    assert s.name == "SELECT orders" and s.status_code == StatusCode.UNSET
    assert s.attributes["wirespan.incomplete"] is True and "error.type" not in s.attributes
    assert 0 < s.attributes["db.response.returned_rows"] < 10
    assert d.drops["no_response"] == 1
