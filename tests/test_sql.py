"""SQL sanitiser and summariser: a table of statements per dialect, cut input, and
properties (never raises, literals never survive, bounded output)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.protocols import sql
from processors.protocols.sql import analyze, decode_query, sanitize

# (statement, sanitised text, operation, collection, summary)
PG_CASES = [
    ("SELECT * FROM orders WHERE id = 42 AND name = 'bob''s'", "SELECT * FROM orders WHERE id = ? AND name = ?",
     "SELECT", "orders", "SELECT orders"),
    ("select a.x from public.orders a join \"Items\" b on a.id = b.oid where a.id in (1, 2, 3)",
     'select a.x from public.orders a join "Items" b on a.id = b.oid where a.id IN (?)',
     "SELECT", "public.orders", "SELECT public.orders Items"),
    ("INSERT INTO t (a, b) VALUES (1, E'x\\'y'), (2, $$body ' $$)", "INSERT INTO t (a, b) VALUES (?, ?)",
     "INSERT", "t", "INSERT t"),
    ("UPDATE users SET name = $1 WHERE id = $2", "UPDATE users SET name = $1 WHERE id = $2",
     "UPDATE", "users", "UPDATE users"),
    ("DELETE FROM t1 WHERE x = 0x1F -- secret 5\n AND y = 1.5e3", "DELETE FROM t1 WHERE x = ? AND y = ?",
     "DELETE", "t1", "DELETE t1"),
    ("SELECT $fn$ body $1 $fn$, 1e5, .5, t1.c2 FROM t1 /* note 'x' */", "SELECT ?, ?, ?, t1.c2 FROM t1",
     "SELECT", "t1", "SELECT t1"),
    ("WITH x AS (SELECT * FROM a) SELECT * FROM x JOIN b USING (id)",
     "WITH x AS (SELECT * FROM a) SELECT * FROM x JOIN b USING (id)", "SELECT", "a", "SELECT a b"),
    ("CREATE TABLE IF NOT EXISTS foo (id int)", "CREATE TABLE IF NOT EXISTS foo (id int)",
     "CREATE TABLE", "foo", "CREATE TABLE foo"),
    ("CREATE UNIQUE INDEX i ON bar (x)", "CREATE UNIQUE INDEX i ON bar (x)", "CREATE INDEX", "bar",
     "CREATE INDEX bar"),
    ("DROP TABLE t", "DROP TABLE t", "DROP TABLE", "t", "DROP TABLE t"),
    ("TRUNCATE logs", "TRUNCATE logs", "TRUNCATE", "logs", "TRUNCATE logs"),
    ("COPY items (a, b) FROM STDIN", "COPY items (a, b) FROM STDIN", "COPY", "items", "COPY items"),
    ("COPY (SELECT * FROM z) TO STDOUT", "COPY (SELECT * FROM z) TO STDOUT", "COPY", "z", "COPY z"),
    ("BEGIN", "BEGIN", "BEGIN", "", "BEGIN"),
    ("SET search_path TO 'a'", "SET search_path TO ?", "SET", "", "SET"),
    ("SELECT 1", "SELECT ?", "SELECT", "", "SELECT"),
    ("select * from a, b where a.x = 'unterminated", "select * from a, b where a.x = ?", "SELECT", "a",
     "SELECT a b"),
    ("SELECT U&'d\\0061t' FROM x", "SELECT ? FROM x", "SELECT", "x", "SELECT x"),
    ("SELECT B'101', X'ff' FROM x", "SELECT ?, ? FROM x", "SELECT", "x", "SELECT x"),
    ('SELECT "a""b" FROM "My Table"', 'SELECT "a""b" FROM "My Table"', "SELECT", "My Table",
     "SELECT My Table"),
    ("INSERT INTO t VALUES (1, 2), (3, 4), (5, 6)", "INSERT INTO t VALUES (?, ?)", "INSERT", "t", "INSERT t"),
    ("SELECT * FROM t WHERE s = 'a\\' OR 1=1 --'", "SELECT * FROM t WHERE s = ? OR ?=? --'".split(" --")[0],
     "SELECT", "t", "SELECT t"),
]

MY_CASES = [
    ("SELECT `x` FROM `shop`.`t` WHERE a = \"s\\\"q\" # c", "SELECT `x` FROM `shop`.`t` WHERE a = ?",
     "SELECT", "shop.t", "SELECT shop.t"),
    ("SELECT * FROM t WHERE s = 'it\\'s' AND n = -3", "SELECT * FROM t WHERE s = ? AND n = -?",
     "SELECT", "t", "SELECT t"),
    ("INSERT IGNORE INTO logs VALUES (0xDEADBEEF, b'01', _utf8mb4'x')", "INSERT IGNORE INTO logs VALUES (?, ?, ?)",
     "INSERT", "logs", "INSERT logs"),
    ("REPLACE INTO kv VALUES (1, 'a')", "REPLACE INTO kv VALUES (?, ?)", "REPLACE", "kv", "REPLACE kv"),
    ("UPDATE LOW_PRIORITY t SET a = 1", "UPDATE LOW_PRIORITY t SET a = ?", "UPDATE", "t", "UPDATE t"),
    ("CALL report(1, 'x')", "CALL report(?, ?)", "CALL", "", "CALL"),
    ("USE shop", "USE shop", "USE", "", "USE"),
]


@pytest.mark.parametrize("q,text,op,coll,summary", PG_CASES)
def test_postgresql_dialect(q, text, op, coll, summary):
    info = analyze(q, "postgresql")
    assert info.text == text
    assert (info.operation, info.collection, info.summary) == (op, coll, summary)


@pytest.mark.parametrize("q,text,op,coll,summary", MY_CASES)
def test_mysql_dialect(q, text, op, coll, summary):
    info = analyze(q, "mysql")
    assert info.text == text
    assert (info.operation, info.collection, info.summary) == (op, coll, summary)


def test_standard_strings_differ_between_dialects():
    # PostgreSQL: backslash is an ordinary character in '...'; MySQL: an escape.
    q = "SELECT 'a\\' FROM t WHERE b = 'c'"
    assert analyze(q, "postgresql").text == "SELECT ? FROM t WHERE b = ?"
    assert analyze(q, "mysql").text == "SELECT ?c?"  # one string up to b = ', then an unterminated one


def test_batches():
    info = analyze("BEGIN; UPDATE a SET x = 1; UPDATE a SET y = 2; COMMIT;")
    assert info.operation == "BATCH" and info.summary == "BEGIN; UPDATE a; UPDATE a; COMMIT"
    assert info.statements == 4
    same = analyze("INSERT INTO a VALUES (1); INSERT INTO a VALUES (2)")
    assert (same.operation, same.collection) == ("BATCH INSERT", "a")
    many = analyze("; ".join(["SELECT 1"] * 40))
    assert many.summary.endswith("; ...") and len(many.summary) <= sql.MAX_SUMMARY_CHARS


def test_sanitize_off_keeps_text_but_still_analyses():
    info = analyze("SELECT * FROM t WHERE a = 'x'", sanitize_text=False)
    assert info.text == "SELECT * FROM t WHERE a = 'x'" and info.summary == "SELECT t"


def test_input_is_bounded():
    q = "SELECT * FROM t WHERE a IN (" + ", ".join(str(i) for i in range(100000)) + ")"
    info = analyze(q)
    assert len(info.text) <= sql.MAX_QUERY_CHARS and info.summary == "SELECT t"
    assert decode_query(memoryview(b"x" * 100000)) == "x" * sql.MAX_QUERY_BYTES
    assert decode_query(memoryview(b"SELECT \xff\xfe")) == "SELECT \ufffd\ufffd"


_SECRET = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 _-", min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(_SECRET, st.sampled_from(["postgresql", "mysql"]),
       st.sampled_from(["'{}'", "E'{}'", "$$ {} $$", "$q$ {} $q$", "'{}", "\"{}\""]))
def test_literals_never_survive(secret, dialect, form):
    if dialect == "mysql" and form.startswith(("E", "$")):
        return
    if dialect == "postgresql" and form.startswith('"'):
        return  # an identifier in PostgreSQL
    lit = form.format("zq" + secret)
    out = sanitize(f"SELECT * FROM t WHERE a = {lit} AND b = 1", dialect)
    assert "zq" not in out


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=400), st.sampled_from(["postgresql", "mysql"]), st.booleans())
def test_never_raises(text, dialect, clean):
    info = analyze(text, dialect, clean)
    assert len(info.summary) <= sql.MAX_SUMMARY_CHARS
    assert len(info.text) <= max(len(text), 1) + 1
