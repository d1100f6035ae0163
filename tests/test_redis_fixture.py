"""The stored real Redis capture (tests/fixtures/redis, re-recorded by record.py), replayed.

redis-py 8 against redis-server 7.0 on one connection: a RESP3 handshake (HELLO 3, then
CLIENT subcommands this server refuses), single commands, a pipeline and a MULTI/EXEC in
one segment each, an error reply, a SELECT. The exact spans are asserted, and tshark's
dissection of the same file is the oracle for which commands were sent in which frame,
and which replies were errors.
"""

from __future__ import annotations

import os

import pytest

from service.model import Span, SpanKind, StatusCode
from tests.support.replay import assert_clean, epoch_ns, replay, tshark_rows

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "redis", "redis_py_session.pcap")
#: The server's port in the stored capture (record.py prints it when it re-records).
PORT = 34705

_SETINFO_ERR = "ERR unknown subcommand ?. Try CLIENT HELP."
#: (name = db.operation.name, db.query.text, db.namespace, error.type, status message, in MULTI)
EXPECTED: list[tuple[str, str, str | None, str | None, str, bool]] = [
    ("HELLO", "HELLO ?", None, None, "", False),
    ("CLIENT MAINT_NOTIFICATIONS", "CLIENT MAINT_NOTIFICATIONS ? ? ?", None, "ERR", _SETINFO_ERR, False),
    ("CLIENT SETINFO", "CLIENT SETINFO ? ?", None, "ERR", _SETINFO_ERR, False),
    ("CLIENT SETINFO", "CLIENT SETINFO ? ?", None, "ERR", _SETINFO_ERR, False),
    ("SET", "SET session:42 ? ? ?", None, None, "", False),
    ("GET", "GET session:42", None, None, "", False),
    ("GET", "GET session:missing", None, None, "", False),
    ("INCRBY", "INCRBY page:views ?", None, None, "", False),  # redis-py sends INCRBY for incr()
    ("HSET", "HSET user:42 ? ? ? ?", None, None, "", False),
    ("HGETALL", "HGETALL user:42", None, None, "", False),
    ("LPUSH", "LPUSH queue:jobs ? ? ?", None, None, "", False),
    ("LRANGE", "LRANGE queue:jobs ? ?", None, None, "", False),
    ("EXPIRE", "EXPIRE queue:jobs ?", None, None, "", False),
    ("TTL", "TTL queue:jobs", None, None, "", False),
    ("EXISTS", "EXISTS session:42 user:42 nope", None, None, "", False),
    # the pipeline: one segment of five commands, one segment of five replies
    ("SET", "SET cart:42 ?", None, None, "", False),
    ("INCRBY", "INCRBY cart:42 ?", None, None, "", False),
    ("SADD", "SADD tags:42 ? ?", None, None, "", False),
    ("SMEMBERS", "SMEMBERS tags:42", None, None, "", False),
    ("MGET", "MGET cart:42 nope", None, None, "", False),
    # the transaction: queued commands are answered +QUEUED, EXEC by the results
    ("MULTI", "MULTI", None, None, "", False),
    ("DECRBY", "DECRBY stock:7 ?", None, None, "", True),
    ("HINCRBY", "HINCRBY user:42 ? ?", None, None, "", True),
    ("RPUSH", "RPUSH orders:42 ?", None, None, "", True),
    ("EXEC", "EXEC", None, None, "", False),
    ("INCRBY", "INCRBY session:42 ?", None, "ERR", "ERR value is not an integer or out of range", False),
    ("DEL", "DEL cart:42 tags:42", None, None, "", False),
    # no SELECT before here: the database is unknown (redis-py's db 0 is never said on the wire)
    ("SELECT", "SELECT 2", "2", None, "", False),
    ("SET", "SET audit:1 ?", "2", None, "", False),
    ("GET", "GET audit:1", "2", None, "", False),
    ("DBSIZE", "DBSIZE", "2", None, "", False),
]


def _row(s: Span) -> tuple[str, str, str | None, str | None, str, bool]:
    a = s.attributes
    return (s.name, a["db.query.text"], a.get("db.namespace"), a.get("error.type"), s.status_message,
            bool(a.get("db.redis.transaction")))


@pytest.fixture(scope="module")
def replayed() -> tuple[list[Span], dict, dict]:
    return replay(FIXTURE, {"enabled": ["redis"]})


def test_replay_gives_exactly_these_spans(replayed) -> None:
    spans = replayed[0]
    assert [_row(s) for s in spans] == EXPECTED
    for s in spans:
        a = s.attributes
        assert s.kind == SpanKind.CLIENT
        assert a["db.system.name"] == "redis"
        assert a["db.operation.name"] == s.name
        assert a["server.port"] == PORT and a["server.address"] == "127.0.0.1"
        assert s.status_code == (StatusCode.ERROR if a.get("error.type") else StatusCode.UNSET)
        assert a.get("db.response.status_code") == a.get("error.type")
        assert 0 < s.end_ns - s.start_ns < 1_000_000_000
    assert "alice" not in repr([s.attributes for s in spans])  # values sanitised, keys kept


def test_nothing_is_dropped(replayed) -> None:
    _, recv, stats = replayed
    assert_clean(recv, stats, "redis", connections=1, packets=55, spans=len(EXPECTED))


def test_every_protocol_enabled_still_detects_redis(replayed) -> None:
    """The default configuration: detection picks Redis (by content: the port is no Redis port)."""
    spans, _, stats = replay(FIXTURE, {})
    assert [_row(s) for s in spans] == [_row(s) for s in replayed[0]]
    assert stats["drops"] == {} and stats["protocols"] == {"redis": 1}


#: What tshark joins a field's occurrences with (-E aggregator): no comma, which error text may hold.
_SEP = "\x1f"


def _tshark(*args: str) -> list[list[str]]:
    return tshark_rows(FIXTURE, *args)


def test_spans_agree_with_tshark(replayed) -> None:
    """tshark's RESP dissector (RESP2: it shows RESP3 maps, sets and nulls as fragments) on the same
    file: the commands each client frame carries, in order, and the error replies."""
    spans = replayed[0]
    (port,) = _tshark("-Y", "tcp.flags.syn==1 && tcp.flags.ack==0", "-T", "fields", "-e", "tcp.dstport")[0]
    assert int(port) == PORT
    rows = _tshark("-d", f"tcp.port=={PORT},resp", "-Y", "resp", "-T", "fields", "-e", "tcp.srcport",
                   "-e", "frame.time_epoch", "-e", "resp.array.length", "-e", "resp.bulk_string.value",
                   "-e", "resp.error", "-E", f"aggregator={_SEP}")
    commands: list[tuple[str, int]] = []  # (name as a span names it, the time of its frame)
    server_frames: list[tuple[int, list[str]]] = []  # (time, the error replies in it)
    for src, t, lengths, values, errors in ((r + [""] * 5)[:5] for r in rows):
        if int(src) != PORT:
            words = [bytes.fromhex(v).decode() for v in values.split(_SEP) if v]
            for n in (int(x) for x in lengths.split(_SEP) if x):
                cmd, words = words[:n], words[n:]
                name = cmd[0].upper()
                commands.append((f"{cmd[0]} {cmd[1]}" if name == "CLIENT" else cmd[0], epoch_ns(t)))
            assert not words
        else:
            server_frames.append((epoch_ns(t), [e for e in errors.split(_SEP) if e]))
    assert [s.name for s in spans] == [c[0] for c in commands]
    for s, (_, t) in zip(spans, commands, strict=True):
        assert s.start_ns == t  # the frame that carried the command
        # every batch of commands is answered in one segment before the next batch is sent
        assert s.end_ns == next(ts for ts, _ in server_frames if ts > t)
    tshark_errors = [(ts, e) for ts, errs in server_frames for e in errs]
    ours = [s for s in spans if s.status_code == StatusCode.ERROR]
    assert [(s.end_ns, s.attributes["error.type"]) for s in ours] == [(ts, e.split(" ")[0]) for ts, e in tshark_errors]
    assert ours[-1].status_message == tshark_errors[-1][1]  # nothing echoed: the message unchanged

