"""MySQL's in-place path (``Session.feed_whole``, issue 21) against the buffered ``feed``.

``feed_whole`` reads a segment of whole packets without buffering it and must give, through
the real stage, the spans (every field) and drop counters the buffered path gives for the
same segments (tests/support/whole.py runs both). Held to it: the recorded PyMySQL and
mysql-connector sessions, the shared exchange (tests/support/exchanges.py) and hand-built
conversations covering each state of the answer machine (text and binary result sets with
and without EOF packets, PREPARE answers, multi-results, errors, LOCAL INFILE, COM_FIELD_LIST,
COM_CHANGE_USER, query attributes, TLS, the compressed protocol it declines, a connection
joined mid-stream), as sent, a byte a segment, in random pieces, with same-direction
segments joined, and with bytes changed, cut or inserted. A declined segment leaves the
session as it was.
"""

from __future__ import annotations

import copy
import os
import struct
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.protocols import mysql as my
from processors.protocols.base import Conn
from processors.protocols.errors import ProtocolError
from tests.support.dbdrive import pcap_script
from tests.support.exchanges import EXCHANGES
from tests.support.whole import mutate, run_both_ways, run_stage
from tests.test_mysql import (
    ATTRS,
    BASE_CAPS,
    DEPRECATE_EOF,
    EOF,
    ERR,
    OK,
    QA_CAPS,
    coldef,
    greeting,
    lenenc,
    lstr,
    pkt,
    qa_query,
    query,
    response,
    resultset,
    zframes,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "mysql")
PORT = 3306
EXAMPLES = int(os.environ.get("WIRESPAN_FUZZ_EXAMPLES", "300"))
Script = list[tuple[bool, bytes]]


def _login(deprecate: bool = True, caps: int = 0, db: str | None = "shop") -> Script:
    c = BASE_CAPS | (DEPRECATE_EOF if deprecate else 0) | caps
    return [(False, greeting()), (True, response(db=db, caps=c)), (False, OK(2))]


def _prepare_ok(sid: int, ncols: int, nparams: int, deprecate: bool) -> bytes:
    out = pkt(b"\x00" + struct.pack("<IHHBH", sid, ncols, nparams, 0, 0), 1)
    seq = 2
    for i in range(nparams):
        out += pkt(coldef(f"p{i}"), seq)
        seq += 1
    if nparams and not deprecate:
        out += EOF(seq)
        seq += 1
    for i in range(ncols):
        out += pkt(coldef(f"c{i}"), seq)
        seq += 1
    if ncols and not deprecate:
        out += EOF(seq)
    return out


def _binary_rows(cols: int, rows: int, deprecate: bool) -> bytes:
    """A COM_STMT_EXECUTE's binary result set: column count, definitions, (EOF,) rows
    (0x00 header, NULL bitmap, values), EOF or OK."""
    out = pkt(lenenc(cols), 1)
    seq = 2
    for i in range(cols):
        out += pkt(coldef(f"c{i}"), seq)
        seq += 1
    if not deprecate:
        out += EOF(seq)
        seq += 1
    for r in range(rows):
        out += pkt(b"\x00" + b"\x00" * ((cols + 9) // 8) + b"".join(lstr(b"%d" % (r * i)) for i in range(cols)), seq)
        seq += 1
    return out + (OK(seq, 2, 0xFE) if deprecate else EOF(seq))


def _conversation(deprecate: bool) -> Script:
    """Every common state once, logged in: text and binary result sets, PREPARE answers with
    and without parameters or columns, EXECUTE of known and unknown statements, an error, a
    multi-statement answer, INIT_DB and USE, PING, STATISTICS, FIELD_LIST, LOCAL INFILE,
    STMT_CLOSE pipelined with the next PREPARE, and a COM_QUIT."""
    s = _login(deprecate)
    s += [(True, query("SELECT id, name FROM users WHERE id = 7")),
          (False, resultset(["id", "name"], [[b"7", b"bob"], [b"8", b""]], deprecate))]
    s += [(True, query("SELECT 1 FROM dual WHERE 0")), (False, resultset(["1"], [], deprecate))]
    s += [(True, query("INSERT INTO t VALUES (1)")), (False, OK(1))]
    s += [(True, query("SELECT nosuch")), (False, ERR(1054, "42S22", "Unknown column 'nosuch' in 'field list'"))]
    s += [(True, query("SELECT 1; SELECT 2")),
          (False, resultset(["1"], [[b"1"]], deprecate, status=2 | my.SERVER_MORE_RESULTS_EXISTS)
           + resultset(["2"], [[b"2"]], deprecate, seq=5 if deprecate else 6))]
    s += [(True, query("CALL p()")), (False, OK(1, 2 | my.SERVER_MORE_RESULTS_EXISTS) + OK(2))]
    s += [(True, pkt(b"\x02other", 0)), (False, OK(1))]
    s += [(True, query("USE `third`")), (False, OK(1))]
    s += [(True, pkt(b"\x0e", 0)), (False, OK(1))]
    s += [(True, pkt(b"\x09", 0)), (False, pkt(b"Uptime: 5  Threads: 1", 1))]
    s += [(True, pkt(b"\x04t\0", 0)), (False, pkt(coldef("a"), 1) + pkt(coldef("b"), 2) + EOF(3))]
    s += [(True, pkt(b"\x16SELECT a FROM t WHERE id = ?", 0)), (False, _prepare_ok(5, 1, 1, deprecate))]
    s += [(True, pkt(b"\x17" + struct.pack("<IBI", 5, 0, 1) + b"\x00\x01\x08\x00" + struct.pack("<q", 9), 0)),
          (False, _binary_rows(1, 3, deprecate))]
    s += [(True, pkt(b"\x16INSERT INTO t VALUES (?, ?)", 0)), (False, _prepare_ok(6, 0, 2, deprecate))]
    s += [(True, pkt(b"\x17" + struct.pack("<IBI", 6, 0, 1), 0)), (False, OK(1))]
    s += [(True, pkt(b"\x16SELECT now()", 0)), (False, _prepare_ok(7, 1, 0, deprecate))]
    s += [(True, pkt(b"\x16DO 1", 0)), (False, _prepare_ok(8, 0, 0, deprecate))]
    s += [(True, pkt(b"\x16SELECT broken(", 0)), (False, ERR(1064, "42000", "You have an error near 'broken('"))]
    s += [(True, pkt(b"\x17" + struct.pack("<IBI", 99, 0, 1), 0)), (False, ERR(1243, "HY000", "Unknown stmt"))]
    s += [(True, pkt(b"\x19" + struct.pack("<I", 5), 0) + pkt(b"\x16SELECT 2", 0)),
          (False, _prepare_ok(9, 1, 0, deprecate))]
    s += [(True, pkt(b"\x1a" + struct.pack("<I", 9), 0)), (False, OK(1))]
    s += [(True, query("LOAD DATA LOCAL INFILE 'x' INTO TABLE t")), (False, pkt(b"\xfbx", 1)),
          (True, pkt(b"1,2\n", 2) + pkt(b"", 3)), (False, OK(4))]
    s += [(True, query("SELECT b FROM big")),
          (False, resultset(["b"], [[b"x" * 300] * 1, [b"y" * 2000]], deprecate))]
    s += [(True, pkt(b"\x01", 0))]
    return s


def _runs(deprecate: bool, out_of_step: int = -1) -> Script:
    """What ends a run of rows or definitions (a result set's, a PREPARE answer's parameters
    and columns) that feed_whole steps over inline: an ERR among the rows, an empty packet
    among the definitions and the rows, a definition count ending exactly at the segment's
    end, a row that looks like an EOF (0xFE, 9 bytes or more), the same error message again
    (remembered); then, with ``out_of_step``, one answer whose sequence ids skip one among
    the column definitions (0), the rows (1) or a PREPARE's parameters (2)."""
    s = _login(deprecate)
    many = resultset(["a", "b", "c"], [[b"%d" % i, b"x", b""] for i in range(6)], deprecate)
    s += [(True, query("SELECT a, b, c FROM t")), (False, many)]
    err_row = resultset(["a"], [[b"1"], [b"2"]], deprecate)
    cut = len(err_row) - len(OK(0, 2, 0xFE) if deprecate else EOF(0))  # where its terminator starts
    s += [(True, query("SELECT a FROM t")),
          (False, err_row[:cut] + ERR(1317, "70100", "Query execution was interrupted", err_row[cut + 3]))]
    empty = pkt(lenenc(2), 1) + pkt(coldef("a"), 2) + pkt(b"", 3) + pkt(coldef("b"), 4)
    seq = 5
    if not deprecate:
        empty += EOF(seq)
        seq += 1
    empty += pkt(lstr(b"1") + lstr(b"2"), seq) + pkt(b"", seq + 1) + pkt(lstr(b"3") + lstr(b"4"), seq + 2)
    empty += OK(seq + 3, 2, 0xFE) if deprecate else EOF(seq + 3)
    s += [(True, query("SELECT a, b FROM t")), (False, empty)]
    s += [(True, query("SELECT a, b FROM t")),
          (False, pkt(lenenc(2), 1) + pkt(coldef("a"), 2) + pkt(coldef("b"), 3)),
          (False, (b"" if deprecate else EOF(4)) + pkt(lstr(b"y" * 300), 4 if deprecate else 5)
           + pkt(b"\xfe" + b"z" * 12, 5 if deprecate else 6)
           + (OK(6, 2, 0xFE) if deprecate else EOF(7)))]
    s += [(True, pkt(b"\x16SELECT a, b, c FROM t WHERE a = ? AND b = ? AND c = ?", 0)),
          (False, _prepare_ok(11, 3, 3, deprecate))]
    for _ in range(2):
        s += [(True, query("SELECT * FROM nosuch")),
              (False, ERR(1146, "42S02", "Table 'shop.nosuch' doesn't exist"))]
    if out_of_step == 0:
        s += [(True, query("SELECT a FROM t")), (False, pkt(lenenc(2), 1) + pkt(coldef("a"), 2) + pkt(coldef("b"), 4))]
    elif out_of_step == 1:
        s += [(True, query("SELECT a FROM t")), (False, err_row[:cut] + pkt(lstr(b"3"), err_row[cut + 3] + 1))]
    elif out_of_step == 2:
        bad = _prepare_ok(12, 2, 3, deprecate)
        at = 4 + 12 + 3  # the second parameter definition's sequence id
        s += [(True, pkt(b"\x16SELECT a, b FROM t WHERE a = ? AND b = ? AND c = ?", 0)),
              (False, bad[:at] + bytes([bad[at] + 1]) + bad[at + 1:])]
    return s


def _change_user() -> Script:
    """COM_CHANGE_USER's auth exchange (an auth switch and its answer), then commands."""
    s = _login()
    s += [(True, pkt(b"\x11bob\0" + b"\x14" + b"x" * 20 + b"shop\0", 0)),
          (False, pkt(b"\xfemysql_native_password\0" + b"s" * 20 + b"\0", 1)),
          (True, pkt(b"y" * 20, 2)), (False, OK(3))]
    return [*s, (True, query("SELECT 3")), (False, resultset(["3"], [[b"3"]]))]


def _query_attributes() -> Script:
    s = [(False, greeting()), (True, response(caps=QA_CAPS)), (False, OK(2))]
    s += [(True, qa_query("SELECT name FROM users WHERE id = 1", ATTRS)), (False, resultset(["name"], [[b"bob"]]))]
    s += [(True, qa_query("UPDATE users SET a = 2", ATTRS[2:3])), (False, OK())]
    s += [(True, pkt(b"\x03\x01\x05SELECT 1", 0)), (True, qa_query("SELECT 2")), (False, resultset(["2"], [[b"2"]]))]
    return s


def _mid_stream() -> Script:
    """Joined after the handshake: caps unknown, an answer's tail first."""
    return [(False, pkt(b"\x03def", 4) + EOF(5)), (True, query("SELECT 1")), (False, resultset(["1"], [[b"1"]])),
            (True, query("SELECT 2")), (False, resultset(["2"], [[b"2"]], False)), (True, pkt(b"\x0e", 0)),
            (False, OK(1))]


def _tls() -> Script:
    return [(False, greeting()), (True, response(ssl=True)), (False, b"\x16\x03\x03\x00\x10" + b"t" * 16),
            (True, b"\x16\x03\x03\x00\x05hello")]


def _compressed() -> Script:
    caps = BASE_CAPS | DEPRECATE_EOF | my.CLIENT_COMPRESS
    s = [(False, greeting()), (True, response(caps=caps)), (False, OK(2))]
    return [*s, (True, zframes(query("SELECT 5"))), (False, zframes(resultset(["5"], [[b"5"]]), seq=1)),
            (True, zframes(pkt(b"\x0e", 0))), (False, zframes(OK(1), seq=1))]


@cache
def _recorded() -> list[Script]:
    return pcap_script(os.path.join(FIXTURES, "pymysql_connector_session.pcap"))


def _exchange(size: int) -> Script:
    return list(EXCHANGES["mysql"][0](size).steps)


CONVERSATIONS: dict[str, object] = {
    "recorded-pymysql": lambda: _recorded()[0],
    "recorded-connector": lambda: _recorded()[1],
    "exchange-small": lambda: _exchange(64),
    "exchange-capped-query": lambda: _exchange(20000),
    "states-deprecate-eof": lambda: _conversation(True),
    "states-eof": lambda: _conversation(False),
    "runs-deprecate-eof": lambda: _runs(True),
    "runs-eof": lambda: _runs(False),
    "runs-out-of-step-columns": lambda: _runs(True, 0),
    "runs-out-of-step-rows": lambda: _runs(False, 1),
    "runs-out-of-step-params": lambda: _runs(True, 2),
    "change-user": _change_user,
    "query-attributes": _query_attributes,
    "mid-stream": _mid_stream,
    "tls": _tls,
    "compressed": _compressed,
}


def _script(name: str) -> Script:
    return list(CONVERSATIONS[name]())  # type: ignore[operator]


def _drip(script: Script) -> Script:
    return [(fc, data[i:i + 1]) for fc, data in script for i in range(len(data))]


def _joined(script: Script) -> Script:
    """Consecutive segments of one direction as one (a client's pipelined commands, a
    server's answers sent together)."""
    out: Script = []
    for fc, data in script:
        if out and out[-1][0] == fc:
            out[-1] = (fc, out[-1][1] + data)
        else:
            out.append((fc, data))
    return out


def _cut(script: Script, cuts: list[int]) -> Script:
    """Each segment cut at the successive offsets (modulo its length)."""
    out: Script = []
    for j, (fc, data) in enumerate(script):
        k = cuts[j % len(cuts)] % (len(data) + 1) if cuts else 0
        out += [(fc, data[:k]), (fc, data[k:])] if 0 < k < len(data) else [(fc, data)]
    return out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("shape", ["as-sent", "drip", "joined"])
def test_feed_whole_gives_the_buffered_spans_and_drops(name: str, shape: str) -> None:
    script = _script(name)
    if shape == "drip":
        script = _drip(script)
    elif shape == "joined":
        script = _joined(script)
    spans, drops = run_both_ways(my.Session, PORT, script)
    if shape == "as-sent" and name.startswith("recorded"):
        assert not drops, drops
        assert len(spans) == (6 if name.endswith("pymysql") else 8)
    if shape == "as-sent" and name.startswith("runs"):
        assert [s[0] for s in spans] == ["SELECT t"] * 4 + ["SELECT nosuch"] * 2, spans
    if name.startswith("states"):
        names = [s[0] for s in spans]
        assert "SELECT users" in names and "EXECUTE" in names and "LOAD" in names, names


def test_recorded_sessions_are_read_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """The speedup is real: every segment of the recorded sessions (whole packets, as real
    drivers send them) goes through feed_whole, none through the buffer."""
    fed: list[bool] = []
    orig = my.Session.feed

    def feed(self: my.Session, from_client: bool, buf: object, ts: int) -> None:
        fed.append(from_client)
        orig(self, from_client, buf, ts)  # type: ignore[arg-type]

    monkeypatch.setattr(my.Session, "feed", feed)
    for script in _recorded():
        fed.clear()
        run_stage(PORT, script)
        assert fed == [], fed


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CONVERSATIONS)), st.lists(st.integers(0, 5000), min_size=1, max_size=6),
       st.booleans())
def test_random_pieces(name: str, cuts: list[int], join: bool) -> None:
    script = _script(name)
    if join:
        script = _joined(script)
    run_both_ways(my.Session, PORT, _cut(script, cuts))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CONVERSATIONS)),
       st.lists(st.tuples(st.integers(0, 80), st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                min_size=1, max_size=4),
       st.booleans())
def test_mutated_conversations(name: str, mutations: list, join: bool) -> None:
    """Bytes changed (a length, a sequence id, a status byte, a flag) and segments split."""
    script = _script(name)
    if join:
        script = _joined(script)
    run_both_ways(my.Session, PORT, mutate(script, mutations))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CONVERSATIONS)), st.data())
def test_truncated_and_garbage_segments(name: str, data: st.DataObject) -> None:
    """A segment cut short, dropped, or with garbage inserted or appended."""
    script = _script(name)
    i = data.draw(st.integers(0, len(script) - 1))
    fc, seg = script[i]
    mode = data.draw(st.sampled_from(["cut", "drop", "insert", "append", "replace"]))
    junk = data.draw(st.binary(min_size=1, max_size=40))
    pos = data.draw(st.integers(0, len(seg)))
    if mode == "cut":
        script[i] = (fc, seg[:pos])
    elif mode == "drop":
        del script[i]
    elif mode == "insert":
        script[i] = (fc, seg[:pos] + junk + seg[pos:])
    elif mode == "append":
        script.insert(i + 1, (fc, junk))
    else:
        script[i] = (fc, junk)
    run_both_ways(my.Session, PORT, [s for s in script if s[1]])


# -- a declined segment changes nothing ----------------------------------------------------
def _state(s: my.Session) -> dict:
    out = {k: copy.copy(v) for k, v in vars(s).items() if k not in ("conn", "_pending")}
    out["_pending"] = [tuple(getattr(c, f) for f in my._Cmd.__slots__) for c in s._pending]
    return out


def _session_after(script: Script) -> tuple[my.Session, list, list]:
    spans: list = []
    drops: list = []
    conn = Conn("c1", "10.0.0.1", 40000, "10.0.0.2", PORT, spans.append, lambda p, r: drops.append(r),
                protocol=my.NAME)
    s = my.Session(conn)
    for fc, data in script:
        buf = conn.client_buf if fc else conn.server_buf
        buf.append(data, 1)
        try:
            s.feed(fc, buf, 1)
        except ProtocolError:  # as the stage: clear that direction and resync
            buf.reset()
            s.gap(fc, 1)
    return s, spans, drops


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["states-deprecate-eof", "states-eof", "recorded-pymysql", "query-attributes"]),
       st.data())
def test_a_declined_segment_leaves_the_session_unchanged(name: str, data: st.DataObject) -> None:
    """After any prefix of a conversation, feed_whole either takes a segment or leaves every
    field of the session as it was, emitting and counting nothing: a whole segment cut
    short, one with bytes after it, or random bytes."""
    script = _script(name)
    k = data.draw(st.integers(0, len(script) - 1))
    s, spans, drops = _session_after(script[:k])
    fc, seg = script[k]
    kind = data.draw(st.sampled_from(["cut", "extra", "random"]))
    if kind == "cut":
        seg = seg[:data.draw(st.integers(0, max(len(seg) - 1, 0)))]
    elif kind == "extra":
        seg = seg + data.draw(st.binary(min_size=1, max_size=8))
    else:
        seg = data.draw(st.binary(max_size=64))
    before = _state(s)
    n_spans, n_drops = len(spans), len(drops)
    try:
        took = s.feed_whole(fc, memoryview(seg), 2)
    except ProtocolError:
        return  # raised as feed would (the whole-stage tests hold it to that)
    if not took:
        assert _state(s) == before
        assert (len(spans), len(drops)) == (n_spans, n_drops)


def test_declines_what_it_does_not_read() -> None:
    s, _, _ = _session_after(_login())
    q = query("SELECT 1")
    assert not s.feed_whole(True, memoryview(q[:5]), 2)          # a packet cut short
    assert not s.feed_whole(True, memoryview(q + q[:3]), 2)      # a whole packet, then a header's start
    assert not s.feed_whole(True, memoryview(b""), 2)
    big = b"\xff\xff\xff\x00"                                    # 16 MiB - 1: continued in the next packet
    assert not s.feed_whole(True, memoryview(big), 2)
    assert s.feed_whole(True, memoryview(q), 2) and s.feed_whole(False, memoryview(resultset(["1"], [[b"1"]])), 3)
    fresh, _, _ = _session_after([])
    assert not fresh.feed_whole(True, memoryview(q), 2)        # a client's first bytes: feed sniffs compression
    assert fresh.feed_whole(False, memoryview(greeting()), 2)


def test_error_messages_are_sanitised_once() -> None:
    """sanitize_error's memo (every protocol's) gives what its unremembered work gives, and stays
    bounded."""
    from processors.protocols import sanitize as sz

    sz._MEMO.clear()
    msgs = [f"Duplicate entry '{i}' for key 'PRIMARY'" for i in range(sz.MEMO_MAX + 5)]
    for m in msgs + msgs[:3] + ["no quotes", 'dup key: { email: "a@b.c" }', "near 'x' at line 1"]:
        assert sz.sanitize_error(m) == sz._sanitize_error(m)
        assert sz.sanitize_error(m) == sz._sanitize_error(m)  # the remembered answer too
    assert len(sz._MEMO) <= sz.MEMO_MAX
    long = "x '" + "y" * sz.MEMO_TEXT + "'"
    assert sz.sanitize_error(long) == "x ?" and long not in sz._MEMO  # a long text: never kept
    assert sz.sanitize_error(5) == 5  # type: ignore[arg-type]  # a hostile errmsg: any BSON value
