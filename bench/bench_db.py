"""PostgreSQL and MySQL parser throughput and the SQL sanitiser's cost per statement.

Run: ``python -m bench db`` (or ``python bench/bench_db.py``). Prints medians of REPEATS:

- PostgreSQL: psycopg-like traffic (extended Parse/Bind/Describe/Execute/Sync with a
  5-row answer, simple Query with 5 rows, a pipelined batch of 10 Executes), fed in
  1400-byte segments through our ``Session`` (frame, pair, resolve statements, build
  spans): messages/s and spans/s. Peer: ``tshark`` dissecting a pcap of the same bytes.
- MySQL: COM_QUERY with a 5-row text result set and COM_STMT_EXECUTE with a binary one
  (CLIENT_DEPRECATE_EOF): packets/s and spans/s. Peers: PyMySQL's own packet decoder
  (``MysqlPacket`` + its OK/EOF/length-coded reads, server packets only) on the same
  packets, and ``tshark`` on a pcap of them.
- SQL: ``sql.analyze`` per statement, cold (distinct statements, memo cleared) and warm
  (memo hits), and ``sql.sanitize`` alone, on realistic statements.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median_seconds
from processors.protocols import mysql, postgresql, sql
from processors.protocols.base import Conn

REPEATS = 5
SEGMENT = 1400


# -- PostgreSQL workload -------------------------------------------------------------------
def _m(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack(">i", len(body) + 4) + body


def _row(*vals: bytes) -> bytes:
    return _m(b"D", struct.pack(">h", len(vals)) + b"".join(struct.pack(">i", len(v)) + v for v in vals))


def _rowdesc(n: int) -> bytes:
    return _m(b"T", struct.pack(">h", n) + (b"col\0" + struct.pack(">ihihih", 0, 0, 25, -1, -1, 0)) * n)


def pg_workload(n: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """(client bytes, server bytes) per exchange, and the number of protocol messages."""
    ex: list[tuple[bytes, bytes]] = []
    msgs = 0
    rows5 = _rowdesc(3) + b"".join(_row(b"%d" % i, b"item-name", b"2024-01-01") for i in range(5))
    for i in range(n):
        k = i % 3
        if k == 0:
            sql_text = b"SELECT id, item, created FROM orders WHERE customer_id = $1 AND status = $2\0"
            c = (_m(b"P", b"\0" + sql_text + b"\0\0") + _m(b"B", b"\0\0\0\0\0\2" + b"\0\0\0\3123\0\0\0\4open"
                 + b"\0\0") + _m(b"D", b"P\0") + _m(b"E", b"\0\0\0\0\0") + _m(b"S"))
            s = _m(b"1") + _m(b"2") + rows5 + _m(b"C", b"SELECT 5\0") + _m(b"Z", b"I")
            msgs += 5 + 4 + 5 + 1
        elif k == 1:
            c = _m(b"Q", b"SELECT id, item, created FROM orders WHERE customer_id = 42 AND note = 'hello'\0")
            s = rows5 + _m(b"C", b"SELECT 5\0") + _m(b"Z", b"I")
            msgs += 1 + 6 + 2
        else:
            c = b""
            s = b""
            for _ in range(10):
                c += (_m(b"P", b"\0UPDATE stock SET qty = qty - $1 WHERE sku = $2\0\0\0")
                      + _m(b"B", b"\0\0\0\0\0\2\0\0\0\0011\0\0\0\3abc\0\0") + _m(b"D", b"P\0")
                      + _m(b"E", b"\0\0\0\0\0"))
                s += _m(b"1") + _m(b"2") + _m(b"n") + _m(b"C", b"UPDATE 1\0")
                msgs += 8
            c += _m(b"S")
            s += _m(b"Z", b"I")
            msgs += 2
        ex.append((c, s))
    return ex, msgs


# -- MySQL workload ----------------------------------------------------------------------------
def _pkt(payload: bytes, seq: int) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload


def _lstr(b: bytes) -> bytes:
    return bytes([len(b)]) + b


_COLDEF = (_lstr(b"def") + _lstr(b"shop") + _lstr(b"orders") + _lstr(b"orders") + _lstr(b"item") + _lstr(b"item")
           + b"\x0c" + struct.pack("<HIBHB", 45, 255, 0xFD, 0, 0) + b"\0\0")
_OK_EOF = b"\xfe\0\0\2\0\0\0"


def my_workload(n: int) -> tuple[list[tuple[bytes, bytes]], int, list[bytes]]:
    """Exchanges, packet count, and the server packets' payloads (for the PyMySQL peer)."""
    ex: list[tuple[bytes, bytes]] = []
    payloads: list[bytes] = []
    packets = 0
    prep = "SELECT id, item, created FROM orders WHERE customer_id = ?"
    c = _pkt(b"\x16" + prep.encode(), 0)
    s = _pkt(b"\0" + struct.pack("<IHHBH", 1, 3, 1, 0, 0), 1) + _pkt(_COLDEF, 2) + b"".join(
        _pkt(_COLDEF, 3 + j) for j in range(3))
    ex.append((c, s))
    for i in range(n):
        if i % 2 == 0:
            c = _pkt(b"\x03SELECT id, item, created FROM orders WHERE customer_id = 42 AND note = 'hello'", 0)
            pl = [b"\x03"] + [_COLDEF] * 3 + [_lstr(b"%d" % j) + _lstr(b"item-name") + _lstr(b"2024-01-01")
                                              for j in range(5)] + [_OK_EOF]
        else:
            c = _pkt(b"\x17" + struct.pack("<IBI", 1, 0, 1) + b"\0\x01\x08\0" + struct.pack("<q", 42), 0)
            pl = [b"\x03"] + [_COLDEF] * 3 + [b"\0\0" + struct.pack("<q", j) + _lstr(b"item-name")
                                              + _lstr(b"2024-01-01") for j in range(5)] + [_OK_EOF]
        s = b"".join(_pkt(p, k + 1) for k, p in enumerate(pl))
        payloads.extend(pl)
        packets += 1 + len(pl)
        ex.append((c, s))
    return ex, packets, payloads


# -- drivers ---------------------------------------------------------------------------------
def _run_session(mod: Any, ex: list[tuple[bytes, bytes]], port: int) -> int:
    spans: list[Any] = []
    conn = Conn("b", "10.0.0.1", 40000, "10.0.0.2", port, spans.append)
    sess = mod.Session(conn)
    cb, sb = conn.client_buf, conn.server_buf
    ts = 0
    for c, s in ex:
        for data, buf, fc in ((c, cb, True), (s, sb, False)):
            mv = memoryview(data)
            for i in range(0, len(data), SEGMENT):
                ts += 1000
                buf.append(mv[i:i + SEGMENT], ts)
                sess.feed(fc, buf, ts)
    return len(spans)


def _pymysql_decode(payloads: list[bytes]) -> int:
    from pymysql.protocol import MysqlPacket

    n = 0
    for p in payloads:
        pk = MysqlPacket(p, "utf8")
        if pk.is_ok_packet() or pk.is_eof_packet() or pk.is_error_packet():
            n += 1
        else:
            pk.read_length_encoded_integer()
    return n


def _tshark(ex: list[tuple[bytes, bytes]], port: int, proto: str) -> float | None:
    tshark = shutil.which("tshark")
    if tshark is None:
        return None
    from tests.support.pcapgen import LINKTYPE_RAW, TcpFlow, write_pcap

    flow = TcpFlow(("10.0.0.1", 40000), ("10.0.0.2", port))
    frames = flow.handshake()
    for c, s in ex:
        for data, fc in ((c, True), (s, False)):
            for i in range(0, len(data), SEGMENT):
                frames.append(flow.send(fc, data[i:i + SEGMENT]))
    d = tempfile.mkdtemp(prefix="wirespan-bench-")
    path = os.path.join(d, "db.pcap")
    write_pcap(path, frames, LINKTYPE_RAW)
    try:
        return median_seconds(lambda: subprocess.run(
            [tshark, "-r", path, "-n", "-d", f"tcp.port=={port},{proto}", "-T", "fields", "-e", "frame.number"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), 3)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- SQL -------------------------------------------------------------------------------------
def sql_statements(n: int) -> list[str]:
    rnd = random.Random(7)
    forms = [
        "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id "
        "WHERE o.id = {i} AND c.email = 'user{i}@example.com' ORDER BY o.created DESC LIMIT 10",
        "INSERT INTO events (kind, payload, created_at) VALUES ('click', '{{\"x\": {i}}}', '2024-05-0{d} 10:00:00')",
        "UPDATE accounts SET balance = balance - {i}.50, updated_at = now() WHERE id = {i} AND version = {d}",
        "DELETE FROM sessions WHERE expires < {i} OR user_id IN ({i}, {d}, 7, 8, 9)",
        "SELECT count(*) FROM logs WHERE message LIKE '%error {i}%' /* dashboard {d} */",
    ]
    return [forms[k % len(forms)].format(i=rnd.randrange(10**6), d=rnd.randrange(1, 9)) for k in range(n)]


def main() -> None:
    n = 3000
    ex, msgs = pg_workload(n)
    spans = _run_session(postgresql, ex, 5432)
    t = median_seconds(lambda: _run_session(postgresql, ex, 5432))
    print(f"postgresql Session: {msgs / t:,.0f} messages/s, {spans / t:,.0f} spans/s "
          f"({msgs} messages, {spans} spans, median {t * 1e3:.1f} ms)")
    tt = _tshark(ex, 5432, "pgsql")
    if tt is not None:
        print(f"  tshark (pgsql dissector, same bytes as a pcap): {msgs / tt:,.0f} messages/s "
              f"-> ours is {tt / t:.1f}x tshark")

    mex, packets, payloads = my_workload(n)
    spans = _run_session(mysql, mex, 3306)
    t = median_seconds(lambda: _run_session(mysql, mex, 3306))
    print(f"mysql Session: {packets / t:,.0f} packets/s, {spans / t:,.0f} spans/s "
          f"({packets} packets, {spans} spans, median {t * 1e3:.1f} ms)")
    tp = median_seconds(lambda: _pymysql_decode(payloads))
    print(f"  PyMySQL MysqlPacket decode (server packets only, no framing/pairing): "
          f"{len(payloads) / tp:,.0f} packets/s -> ours (whole job) is {tp / t * packets / len(payloads):.2f}x")
    tt = _tshark(mex, 3306, "mysql")
    if tt is not None:
        print(f"  tshark (mysql dissector): {packets / tt:,.0f} packets/s -> ours is {tt / t:.1f}x tshark")

    stmts = sql_statements(5000)

    def cold() -> None:
        sql._cache.clear()
        for s in stmts:
            sql.analyze(s)

    def warm() -> None:
        for s in stmts[:400]:
            sql.analyze(s)

    def sanitize_only() -> None:
        for s in stmts:
            sql.sanitize(s)

    for s in stmts[:400]:
        sql.analyze(s)
    tc = median_seconds(cold)
    sql._cache.clear()
    for s in stmts[:400]:
        sql.analyze(s)
    tw = median_seconds(warm)
    ts = median_seconds(sanitize_only)
    avg = sum(map(len, stmts)) / len(stmts)
    print(f"sql.analyze cold: {tc / len(stmts) * 1e6:.1f} us/statement (avg {avg:.0f} chars); "
          f"warm (memo hit): {tw / 400 * 1e6:.2f} us; sanitize alone: {ts / len(stmts) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
