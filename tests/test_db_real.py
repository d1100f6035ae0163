"""Real servers, real clients: PostgreSQL (psycopg) and MariaDB (PyMySQL,
mysql-connector-python with server-side prepared statements), recorded over TCP on
127.0.0.1 with tcpdump, replayed through the pcap receiver and the protocols stage;
every span is asserted (operation, collection, namespace, sanitised text, error)."""

from __future__ import annotations

import shutil
import subprocess

import mysql.connector
import psycopg
import pymysql
import pytest

from processors.protocols.sql import analyze
from service.model import SpanKind, StatusCode
from tests.support.capture import tcpdump
from tests.support.mariadb import mariadb_server
from tests.support.postgres import postgres_server
from tests.support.replay import replay

KEYS = ("db.operation.name", "db.collection.name", "db.namespace", "db.query.text")


def _rows(spans):
    out = []
    for s in spans:
        a = s.attributes
        assert s.kind == SpanKind.CLIENT
        assert s.name == a.get("db.query.summary", s.name)
        out.append((s.name, *(a.get(k) for k in KEYS), a.get("error.type")))
    return out


def _tshark(path, port: int, proto: str, display: str, fields: list[str]) -> list[list[str]]:
    """tshark (Wireshark's dissectors) as an independent oracle: one row per packet."""
    tshark = shutil.which("tshark")
    assert tshark, "tshark is required (Debian package tshark)"
    cmd = [tshark, "-r", str(path), "-n", "-d", f"tcp.port=={port},{proto}", "-Y", display, "-T", "fields",
           "-E", "occurrence=a", "-E", "aggregator=~"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [line.split("\t") for line in out.splitlines()]


def _pg_oracle(path, port: int, spans) -> None:
    """As many spans as tshark sees Simple query + Execute messages, with the same texts."""
    rows = _tshark(path, port, "pgsql", f"pgsql and tcp.dstport == {port}", ["pgsql.type", "pgsql.query"])
    types = [t for r in rows for t in r[0].split("~")]
    texts = {analyze(q).text for r in rows if len(r) > 1 and r[1] for q in r[1].split("~")}
    assert types.count("Simple query") + types.count("Execute") == len(spans)
    assert {sp.attributes["db.query.text"] for sp in spans} == texts


def _my_oracle(path, port: int, spans) -> None:
    """One span per COM_QUERY / COM_STMT_EXECUTE tshark sees, with the same (prepared) texts."""
    rows = _tshark(path, port, "mysql", "mysql.command", ["mysql.command", "mysql.query"])
    want = []
    prepared = ""
    for r in rows:
        cmd, text = r[0], r[1] if len(r) > 1 else ""
        if cmd == "3":
            want.append(analyze(text, "mysql").text)
        elif cmd == "22":
            prepared = text
        elif cmd == "23":
            want.append(analyze(prepared, "mysql").text)
    assert [sp.attributes["db.query.text"] for sp in spans] == want


@pytest.fixture(scope="module")
def pg_server():
    with postgres_server() as s:
        yield s


def test_postgresql_psycopg(pg_server):
    s = pg_server
    with tcpdump(s.port) as path:
        with psycopg.connect(s.dsn(application_name="wirespan-test")) as c:
            c.execute("CREATE TABLE orders (id int PRIMARY KEY, item text, qty int)")
            c.execute("INSERT INTO orders VALUES (%s, %s, %s)", (1, "apple", 3))          # extended
            c.execute("INSERT INTO orders VALUES (2, 'pear', 5); INSERT INTO orders VALUES (3, 'fig', 7)")  # simple
            for q in (2, 4):                                                                # prepared (named)
                c.execute("SELECT * FROM orders WHERE qty > %s", (q,), prepare=True).fetchall()
            with c.pipeline():                                                              # pipeline mode
                c.execute("UPDATE orders SET qty = qty + %s WHERE id = %s", (1, 1))
                c.execute("SELECT item FROM orders WHERE id = %s", (2,))
                c.execute("DELETE FROM orders WHERE id = %s", (99,))
            with c.cursor().copy("COPY orders (id, item, qty) FROM STDIN") as cp:          # COPY in
                for i in range(10, 20):
                    cp.write_row((i, f"x{i}", i))
            with c.cursor().copy("COPY orders TO STDOUT") as cp:                           # COPY out
                for _ in cp:
                    pass
            c.commit()
            with pytest.raises(psycopg.errors.UndefinedTable):
                c.execute("SELECT * FROM nosuch WHERE a = 'secret'")
            c.rollback()
            with pytest.raises(psycopg.errors.UniqueViolation):
                c.execute("INSERT INTO orders VALUES (%s, %s, %s)", (1, "dup", 1))
            c.rollback()
    spans, _, pstats = replay(path)
    _pg_oracle(path, s.port, spans)
    ns = "postgres"
    assert _rows(spans) == [
        ("BEGIN", "BEGIN", None, ns, "BEGIN", None),
        ("CREATE TABLE orders", "CREATE TABLE", "orders", ns,
         "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int)", None),
        ("INSERT orders", "INSERT", "orders", ns, "INSERT INTO orders VALUES ($1, $2, $3)", None),
        ("INSERT orders; INSERT orders", "BATCH INSERT", "orders", ns,
         "INSERT INTO orders VALUES (?, ?, ?); INSERT INTO orders VALUES (?, ?, ?)", None),
        ("SELECT orders", "SELECT", "orders", ns, "SELECT * FROM orders WHERE qty > $1", None),
        ("SELECT orders", "SELECT", "orders", ns, "SELECT * FROM orders WHERE qty > $1", None),
        ("UPDATE orders", "UPDATE", "orders", ns, "UPDATE orders SET qty = qty + $1 WHERE id = $2", None),
        ("SELECT orders", "SELECT", "orders", ns, "SELECT item FROM orders WHERE id = $1", None),
        ("DELETE orders", "DELETE", "orders", ns, "DELETE FROM orders WHERE id = $1", None),
        ("COPY orders", "COPY", "orders", ns, "COPY orders (id, item, qty) FROM STDIN", None),
        ("COPY orders", "COPY", "orders", ns, "COPY orders TO STDOUT", None),
        ("COMMIT", "COMMIT", None, ns, "COMMIT", None),
        ("BEGIN", "BEGIN", None, ns, "BEGIN", None),
        ("SELECT nosuch", "SELECT", "nosuch", ns, "SELECT * FROM nosuch WHERE a = ?", "42P01"),
        ("ROLLBACK", "ROLLBACK", None, ns, "ROLLBACK", None),
        ("DEALLOCATE", "DEALLOCATE", None, ns, "DEALLOCATE ALL", None),  # psycopg drops its prepared statements
        ("BEGIN", "BEGIN", None, ns, "BEGIN", None),
        ("INSERT orders", "INSERT", "orders", ns, "INSERT INTO orders VALUES ($1, $2, $3)", "23505"),
        ("ROLLBACK", "ROLLBACK", None, ns, "ROLLBACK", None),
    ]
    by_text = {sp.attributes["db.query.text"]: sp for sp in spans}
    assert by_text["SELECT * FROM nosuch WHERE a = ?"].status_code == StatusCode.ERROR
    assert by_text["SELECT * FROM nosuch WHERE a = ?"].status_message == "relation ? does not exist"  # sanitized
    assert by_text["SELECT item FROM orders WHERE id = $1"].attributes["db.response.returned_rows"] == 1
    assert all(sp.attributes["server.port"] == s.port for sp in spans)
    assert all("secret" not in str(sp.attributes) for sp in spans)
    assert not pstats["drops"], pstats


def test_postgresql_tls_is_counted_not_parsed():
    with postgres_server(ssl=True) as s:
        with tcpdump(s.port) as path:
            with psycopg.connect(s.dsn(sslmode="require")) as c:
                c.execute("SELECT 1")
    spans, _, pstats = replay(path)
    assert spans == []
    assert pstats["drops"] == {"postgresql:tls": 1}, pstats


@pytest.fixture(scope="module")
def maria():
    with mariadb_server() as m:
        yield m


def test_mariadb_pymysql_and_mysql_connector(maria):
    m = maria
    with tcpdump(m.port) as path:
        c = pymysql.connect(host=m.host, port=m.port, user=m.user, password=m.password, database=m.database,
                            autocommit=True)
        cur = c.cursor()
        cur.execute("CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(50), qty INT)")
        cur.execute("INSERT INTO orders VALUES (%s, %s, %s)", (1, "apple", 3))
        cur.executemany("INSERT INTO orders VALUES (%s, %s, %s)", [(2, "pear", 5), (3, "fig", 7)])
        cur.execute("SELECT * FROM orders WHERE qty > %s", (2,))
        assert len(cur.fetchall()) == 3
        with pytest.raises(pymysql.err.ProgrammingError):
            cur.execute("SELECT * FROM nosuch WHERE a = 'secret'")
        c.select_db("mysql")                       # COM_INIT_DB
        cur.execute("SELECT COUNT(*) FROM user")
        c.ping()                                   # no span by default
        c.close()
        c2 = mysql.connector.connect(host=m.host, port=m.port, user=m.user, password=m.password,
                                     database=m.database, use_pure=True)
        cur2 = c2.cursor(prepared=True)            # COM_STMT_PREPARE / EXECUTE / CLOSE
        for i in (2, 3):
            cur2.execute("SELECT item, qty FROM orders WHERE id = %s", (i,))
            assert len(cur2.fetchall()) == 1
        cur2.execute("UPDATE orders SET qty = %s WHERE id = %s", (9, 1))
        with pytest.raises(mysql.connector.errors.IntegrityError):
            cur2.execute("INSERT INTO orders VALUES (%s, %s, %s)", (1, "dup", 1))
        c2.commit()
        cur2.close()
        c2.close()
    spans, _, pstats = replay(path)
    _my_oracle(path, m.port, spans)
    rows = _rows(spans)
    shop = m.database
    assert rows == [
        ("SET", "SET", None, shop, "SET NAMES utf8mb4", None),
        ("CREATE TABLE orders", "CREATE TABLE", "orders", shop,
         "CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(?), qty INT)", None),
        ("INSERT orders", "INSERT", "orders", shop, "INSERT INTO orders VALUES (?, ?, ?)", None),
        ("INSERT orders", "INSERT", "orders", shop, "INSERT INTO orders VALUES (?, ?, ?)", None),
        ("SELECT orders", "SELECT", "orders", shop, "SELECT * FROM orders WHERE qty > ?", None),
        ("SELECT nosuch", "SELECT", "nosuch", shop, "SELECT * FROM nosuch WHERE a = ?", "42S02"),
        ("SELECT user", "SELECT", "user", "mysql", "SELECT COUNT(*) FROM user", None),
        ("SET", "SET", None, shop, "SET NAMES ? COLLATE ?", None),
        ("SET", "SET", None, shop, "SET @@session.autocommit = OFF", None),
        ("SELECT orders", "SELECT", "orders", shop, "SELECT item, qty FROM orders WHERE id = ?", None),
        ("SELECT orders", "SELECT", "orders", shop, "SELECT item, qty FROM orders WHERE id = ?", None),
        ("UPDATE orders", "UPDATE", "orders", shop, "UPDATE orders SET qty = ? WHERE id = ?", None),
        ("INSERT orders", "INSERT", "orders", shop, "INSERT INTO orders VALUES (?, ?, ?)", "23000"),
        ("COMMIT", "COMMIT", None, shop, "COMMIT", None),
    ]
    err = spans[5]
    assert err.status_code == StatusCode.ERROR and err.attributes["db.response.status_code"] == "1146"
    assert spans[12].attributes["db.response.status_code"] == "1062"
    assert spans[4].attributes["db.response.returned_rows"] == 3
    assert spans[9].attributes["db.response.returned_rows"] == 1
    assert all(sp.attributes["server.port"] == m.port for sp in spans)
    assert all("secret" not in str(sp.attributes) for sp in spans)
    assert not pstats["drops"], pstats


def test_postgresql_picked_up_mid_stream(pg_server):
    """The capture starts after the connection's startup: detection by message framing."""
    s = pg_server
    with psycopg.connect(s.dsn(), autocommit=True) as c:
        c.execute("CREATE TABLE mid (a int)")
        with tcpdump(s.port) as path:
            c.execute("INSERT INTO mid VALUES (%s)", (1,))
            c.execute("SELECT a FROM mid WHERE a = 5").fetchall()
            c.execute("SELECT a FROM mid WHERE a = %s", (1,)).fetchall()
    spans, _, pstats = replay(path)
    assert _rows(spans) == [
        ("INSERT mid", "INSERT", "mid", None, "INSERT INTO mid VALUES ($1)", None),
        ("SELECT mid", "SELECT", "mid", None, "SELECT a FROM mid WHERE a = ?", None),
        ("SELECT mid", "SELECT", "mid", None, "SELECT a FROM mid WHERE a = $1", None),
    ]
    assert spans[2].attributes["db.response.returned_rows"] == 1
    assert all(sp.attributes["server.port"] == s.port for sp in spans)
    assert not pstats["drops"], pstats


def test_mariadb_picked_up_mid_stream(maria):
    m = maria
    c = pymysql.connect(host=m.host, port=m.port, user=m.user, password=m.password, database=m.database,
                        autocommit=True)
    cur = c.cursor()
    cur.execute("CREATE TABLE mid (a INT)")
    with tcpdump(m.port) as path:
        cur.execute("INSERT INTO mid VALUES (%s)", (1,))
        cur.execute("SELECT a FROM mid WHERE a = %s", (1,))
        assert cur.fetchall() == ((1,),)
        cur.execute("SELECT a FROM mid")
        cur.fetchall()
    c.close()
    spans, _, pstats = replay(path)
    assert _rows(spans) == [
        ("INSERT mid", "INSERT", "mid", None, "INSERT INTO mid VALUES (?)", None),
        ("SELECT mid", "SELECT", "mid", None, "SELECT a FROM mid WHERE a = ?", None),
        ("SELECT mid", "SELECT", "mid", None, "SELECT a FROM mid", None),
    ]
    assert [sp.attributes.get("db.response.returned_rows") for sp in spans] == [None, 1, 1]
    assert all(sp.attributes["server.port"] == m.port for sp in spans)
    assert not pstats["drops"], pstats


def test_mariadb_cli_multi_results_and_empty_results(maria):
    """The mariadb command-line client (libmariadb): a CALL with two result sets, an empty one."""
    m = maria
    c = pymysql.connect(host=m.host, port=m.port, user=m.user, password=m.password, database=m.database,
                        autocommit=True)
    cur = c.cursor()
    cur.execute("CREATE TABLE cli (a INT, b VARCHAR(10))")
    cur.execute("INSERT INTO cli VALUES (1, 'x'), (2, 'y')")
    cur.execute("CREATE PROCEDURE two() BEGIN SELECT a FROM cli; SELECT b FROM cli WHERE a = 2; END")
    c.close()
    with tcpdump(m.port) as path:
        r = subprocess.run(["mariadb", "--no-defaults", "-h", m.host, "-P", str(m.port), "-u", m.user,
                            f"-p{m.password}", m.database, "-e",
                            "SELECT a, b FROM cli WHERE a > 0; SELECT a FROM cli WHERE a = 99; CALL two(); "
                            "SELECT * FROM nosuch"], capture_output=True, text=True)
    assert "1146" in r.stderr
    spans, _, pstats = replay(path)
    _my_oracle(path, m.port, spans)
    assert [(sp.name, sp.attributes.get("db.response.returned_rows"), sp.attributes.get("error.type"))
            for sp in spans] == [("SELECT cli", 2, None), ("SELECT cli", None, None), ("CALL", 3, None),
                                 ("SELECT nosuch", None, "42S02")]
    assert not pstats["drops"], pstats


def test_mariadb_tls_is_counted_not_parsed():
    with mariadb_server(ssl=True) as m:
        with tcpdump(m.port) as path:
            c = pymysql.connect(host=m.host, port=m.port, user=m.user, password=m.password, database=m.database,
                                ssl={"ca": f"{m.tmpdir}/server.crt", "check_hostname": False})
            cur = c.cursor()
            cur.execute("SHOW STATUS LIKE 'Ssl_cipher'")
            assert cur.fetchone()[1]  # really encrypted
            c.close()
    spans, _, pstats = replay(path)
    assert spans == []
    assert pstats["drops"] == {"mysql:tls": 1}, pstats


def test_mariadb_compressed_protocol_whole_and_joined_mid_stream(maria):
    """mysql-connector with compress=True (CLIENT_COMPRESS, zlib) against MariaDB: every
    query is a span from the handshake on, and from a capture that starts after the
    connection opened (no handshake seen: the first client frame says it is compressed)."""
    m = maria
    big = "x" * 3000  # compressible: the server's rows come zlib-compressed
    with tcpdump(m.port) as whole:
        c = mysql.connector.connect(host=m.host, port=m.port, user=m.user, password=m.password,
                                    database=m.database, use_pure=True, compress=True, autocommit=True)
        cur = c.cursor()
        cur.execute("CREATE TABLE zc (id INT, v TEXT)")
        cur.execute("INSERT INTO zc VALUES (1, %s), (2, %s)", (big, big))
        cur.execute("SELECT id, v FROM zc WHERE id > 0")
        assert len(cur.fetchall()) == 2
        with tcpdump(m.port) as late:
            cur.execute("SELECT v FROM zc WHERE id = 2")
            cur.fetchall()
            cur.execute("UPDATE zc SET v = 'y' WHERE id = 1")
            with pytest.raises(mysql.connector.errors.ProgrammingError):
                cur.execute("SELECT * FROM nosuch_zc")
        c.close()
    spans, _, pstats = replay(whole)
    got = [(s.name, s.attributes.get("db.response.returned_rows")) for s in spans]
    assert ("CREATE TABLE zc", None) in got and ("INSERT zc", None) in got and ("SELECT zc", 2) in got, got
    assert got[-3:] == [("SELECT zc", 1), ("UPDATE zc", None), ("SELECT nosuch_zc", None)], got
    assert spans[-1].attributes["error.type"] == "42S02"
    assert not [k for k in pstats["drops"] if k.startswith("mysql:")], pstats["drops"]
    spans, _, pstats = replay(late)
    assert [s.name for s in spans] == ["SELECT zc", "UPDATE zc", "SELECT nosuch_zc"], [s.name for s in spans]
    assert spans[0].attributes["db.response.returned_rows"] == 1
