"""Redis: RESP2/RESP3 parsing, pairing, pub/sub, transactions, bad input, and a real redis-server."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.protocols import redis as r
from processors.protocols.base import Detection
from processors.protocols.errors import ProtocolError
from service.largebuf import LargeBuffer
from service.model import SpanKind, StatusCode
from tests.support.driver import SessionDriver, peak_allocation


def cmd(*args: bytes | str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class Driver(SessionDriver):
    def __init__(self, **settings: object) -> None:
        super().__init__(r, 6379, ts_step=10, **settings)


@pytest.mark.parametrize("step", [None, 1, 3, 7])
def test_get_set_pipeline_any_chunking(step: int | None) -> None:
    d = Driver()
    d.send(True, cmd("SET", "user:1", "secret-value") + cmd("GET", "user:1") + cmd("GET", "nokey")
           + cmd("HSET", "h", "f", "v"), step)
    d.send(False, b"+OK\r\n$12\r\nsecret-value\r\n$-1\r\n:1\r\n", step)
    assert [s.name for s in d.spans] == ["SET", "GET", "GET", "HSET"]
    texts = [s.attributes["db.query.text"] for s in d.spans]
    assert texts == ["SET user:1 ?", "GET user:1", "GET nokey", "HSET h ? ?"]
    for s in d.spans:
        assert s.kind == SpanKind.CLIENT
        assert s.attributes["db.system.name"] == "redis"
        assert s.attributes["server.port"] == 6379
        assert s.status_code == StatusCode.UNSET
        assert s.end_ns >= s.start_ns
    assert "secret-value" not in repr([s.attributes for s in d.spans])
    assert len(d.conn.client_buf) == 0 and len(d.conn.server_buf) == 0


def test_trailing_bytes_stay_for_the_next_feed() -> None:
    d = Driver()
    d.send(True, cmd("GET", "a") + b"*2\r\n$3\r\nGE")
    d.send(False, b"$1\r\nx\r\n")
    assert [s.name for s in d.spans] == ["GET"]
    # the array header is consumed (the scanner keeps its place); the element that has
    # not fully arrived waits in the buffer
    assert bytes(d.conn.client_buf.view_at(0, len(d.conn.client_buf))) == b"$3\r\nGE"
    d.send(True, b"T\r\n$1\r\nb\r\n")
    d.send(False, b"$-1\r\n")
    assert [s.attributes["db.query.text"] for s in d.spans] == ["GET a", "GET b"]


def test_errors_and_namespace() -> None:
    d = Driver()
    d.send(True, cmd("SELECT", "3") + cmd("LPUSH", "k", "v") + cmd("BOGUS"))
    d.send(False, b"+OK\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
           b"-ERR unknown command 'BOGUS'\r\n")
    sel, lp, bog = d.spans
    assert sel.status_code == StatusCode.UNSET
    assert lp.attributes["db.namespace"] == "3"
    assert lp.status_code == StatusCode.ERROR
    assert lp.attributes["error.type"] == "WRONGTYPE"
    assert lp.attributes["db.response.status_code"] == "WRONGTYPE"
    assert lp.status_message.startswith("WRONGTYPE Operation")
    assert bog.attributes["error.type"] == "ERR"


@pytest.mark.parametrize("sanitize, want", [
    (True, "ERR unknown command ?, with args beginning with: ? ? "),
    (False, "ERR unknown command 'STE', with args beginning with: 'session:9' 's3cr3t' "),
])
def test_error_replies_echoing_arguments_are_sanitized_by_default(sanitize: bool, want: str) -> None:
    d = Driver(sanitize_errors=sanitize)
    d.send(True, cmd("STE", "session:9", "s3cr3t") + cmd("GET", "k"))
    bulk_err = b"ERR 'bulk' error s3cr3t"
    d.send(False, b"-ERR unknown command 'STE', with args beginning with: 'session:9' 's3cr3t' \r\n"
           + b"!%d\r\n%s\r\n" % (len(bulk_err), bulk_err))
    bad, bulk = d.spans
    assert bad.status_message == want and bad.attributes["error.type"] == "ERR"
    assert bulk.status_message == ("ERR ? error s3cr3t" if sanitize else "ERR 'bulk' error s3cr3t")


def test_resp3_types_and_bulk_error() -> None:
    d = Driver()
    d.send(True, cmd("HELLO", "3", "AUTH", "u", "pw") + cmd("HGETALL", "h") + cmd("SMEMBERS", "s")
           + cmd("GET", "x") + cmd("OBJECT", "FREQ", "k") + cmd("DEBUG", "X") + cmd("GET", "v"))
    d.send(False, b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n"
           b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
           b"~2\r\n+a\r\n,3.14\r\n"
           b"_\r\n"
           b"|1\r\n+ttl\r\n:3600\r\n(3492890328409238509324850943850943825024385\r\n"
           b"!21\r\nSYNTAX invalid syntax\r\n"
           b"=15\r\ntxt:Some string\r\n")
    assert [s.name for s in d.spans] == ["HELLO", "HGETALL", "SMEMBERS", "GET", "OBJECT FREQ", "DEBUG X", "GET"]
    assert d.spans[0].attributes["db.query.text"] == "HELLO ? ? ? ?"  # credentials never shown
    assert d.spans[5].status_code == StatusCode.ERROR
    assert d.spans[5].attributes["error.type"] == "SYNTAX"
    assert all(s.status_code == StatusCode.UNSET for i, s in enumerate(d.spans) if i != 5)


def test_push_messages_are_not_replies() -> None:
    d = Driver()
    d.send(True, cmd("SUBSCRIBE", "news", "sports"))
    d.send(False, b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$6\r\nsports\r\n:2\r\n")
    d.send(False, b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n")
    d.send(False, b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$3\r\nbye\r\n")
    d.send(True, cmd("PING"))
    d.send(False, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    assert [s.name for s in d.spans] == ["SUBSCRIBE", "PING"]
    assert d.conn.extra["redis_pushes"] == 2
    assert not d.drops


def test_multi_exec_and_aborted_exec() -> None:
    d = Driver()
    d.send(True, cmd("MULTI") + cmd("INCR", "a") + cmd("INCR", "b") + cmd("EXEC"))
    d.send(False, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n:1\r\n")
    d.send(True, cmd("WATCH", "a") + cmd("MULTI") + cmd("INCR", "a") + cmd("EXEC"))
    d.send(False, b"+OK\r\n+OK\r\n+QUEUED\r\n*-1\r\n")
    names = [s.name for s in d.spans]
    assert names == ["MULTI", "INCR", "INCR", "EXEC", "WATCH", "MULTI", "INCR", "EXEC"]
    assert d.spans[1].attributes["db.redis.transaction"] is True
    assert d.spans[3].status_code == StatusCode.UNSET
    assert d.spans[7].status_code == StatusCode.ERROR


def test_inline_commands() -> None:
    d = Driver()
    d.send(True, b"PING\r\nSET k v\r\n")
    d.send(False, b"+PONG\r\n+OK\r\n")
    assert [s.attributes["db.query.text"] for s in d.spans] == ["PING", "SET k ?"]


def test_sanitize_off_shows_values() -> None:
    d = Driver(sanitize_query=False)
    d.send(True, cmd("SET", "k", "v1"))
    d.send(False, b"+OK\r\n")
    assert d.spans[0].attributes["db.query.text"] == "SET k v1"


def test_detect() -> None:
    assert r.detect(LargeBuffer(cmd("GET", "a")), None) == Detection.REQUEST
    assert r.detect(LargeBuffer(b"*1\r\n$4\r\nPI"), None) == Detection.NEED_MORE
    assert r.detect(LargeBuffer(b"PING\r\n"), None) == Detection.REQUEST
    assert r.detect(LargeBuffer(b"+OK\r\n"), False) == Detection.RESPONSE
    assert r.detect(LargeBuffer(b"GET / HTTP/1.1\r\n"), None) == Detection.NO
    assert r.detect(LargeBuffer(b"set k 0 0 5 noreply\r\n"), None) == Detection.NO  # memcached text
    assert r.detect(LargeBuffer(b"get k1 k2\r\n"), None) == Detection.NO
    assert r.detect(LargeBuffer(b"SET k v\r\n"), None) == Detection.REQUEST
    assert r.detect(LargeBuffer(b"\x16\x03\x01\x02\x00"), None) == Detection.NO
    assert r.detect(LargeBuffer(b"*1\r\n$4\r\n\x00\x01\x02\x03\r\n"), None) == Detection.NO


@pytest.mark.parametrize("data,reason", [
    (b"*99999999999999\r\n", "aggregate_too_large"),
    (b"$600000000\r\n", "bulk_too_large"),
    (b"*1\r\n" * 100, "too_deep"),
    (b"$abc\r\n", "bad_length"),
    (b"\x00\x01garbage\r\n", "bad_type"),
    (b"+" + b"x" * (70 * 1024), "line_too_long"),
])
def test_hostile_replies_raise_counted_protocol_errors(data: bytes, reason: str) -> None:
    d = Driver()
    d.send(True, cmd("GET", "a"))
    with pytest.raises(ProtocolError) as e:
        d.send(False, data)
    assert e.value.reason == reason


def test_huge_bulk_is_skipped_as_it_arrives() -> None:
    d = Driver()
    d.send(True, cmd("GET", "big"))
    size = 50 * 1024 * 1024
    d.send(False, b"$%d\r\n" % size)
    chunk = bytes(65536)
    for _ in range(size // len(chunk)):
        d.send(False, chunk)
        assert len(d.conn.server_buf) == 0  # nothing held
    d.send(False, b"\r\n")
    assert [s.name for s in d.spans] == ["GET"]


def _alloc(n_elems: int) -> int:
    reply = b"*%d\r\n" % n_elems + b"$10\r\n0123456789\r\n" * n_elems
    d = Driver()
    d.send(True, cmd("LRANGE", "l", "0", "-1"))
    peak = peak_allocation(lambda: d.send(False, reply, 1400))
    assert len(d.spans) == 1
    return peak


def test_allocation_is_flat_when_the_reply_grows_100x() -> None:
    small = _alloc(100)
    large = _alloc(10_000)
    assert large < small * 1.5 + 4096, (small, large)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40))
def test_fuzz_garbage_never_escapes_except_protocol_errors(data: bytes, step: int) -> None:
    d = Driver()
    d.fuzz(data, step)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["GET", "SET", "DEL", "INCR"]), st.binary(max_size=40)),
                min_size=1, max_size=10), st.integers(1, 30))
def test_fuzz_valid_pipelines_pair_exactly(cmds: list[tuple[str, bytes]], step: int) -> None:
    d = Driver()
    d.send(True, b"".join(cmd(c, k) for c, k in cmds), step)
    d.send(False, b"".join(b"$3\r\nabc\r\n" for _ in cmds), step)
    assert [s.name for s in d.spans] == [c for c, _ in cmds]


# ---------------------------------------------------------------------------
# real redis-server, real redis-py, recorded with tcpdump, replayed
# ---------------------------------------------------------------------------
def test_real_redis_server_replay() -> None:
    redis = pytest.importorskip("redis")
    from tests.support.capture import tcpdump
    from tests.support.redis_server import redis_server
    from tests.support.replay import replay_spans

    with redis_server() as port, tcpdump(port) as pcap:
        c = redis.Redis(host="127.0.0.1", port=port)
        c.set("user:1", "alice")
        assert c.get("user:1") == b"alice"
        c.get("missing")
        c.hset("h", mapping={"a": "1", "b": "2"})
        with pytest.raises(redis.ResponseError):
            c.lpush("user:1", "x")
        p = c.pipeline(transaction=False)
        p.incr("n").incr("n").get("n")
        p.execute()
        t = c.pipeline(transaction=True)
        t.incr("t").incr("t")
        t.execute()
        c3 = redis.Redis(host="127.0.0.1", port=port, protocol=3, db=2)
        c3.set("k3", "v")
        c3.hgetall("h")
        ps = c.pubsub()
        ps.subscribe("news")
        ps.get_message(timeout=1)
        c.publish("news", "hello")
        msg = None
        for _ in range(20):
            msg = ps.get_message(timeout=0.2)
            if msg and msg["type"] == "message":
                break
        assert msg and msg["data"] == b"hello"
        ps.close()
        c.close()
        c3.close()
    spans = replay_spans(pcap)
    ops = [s.attributes["db.operation.name"] for s in spans]
    texts = [s.attributes["db.query.text"] for s in spans]
    assert "SET user:1 ?" in texts and "GET user:1" in texts and "GET missing" in texts
    assert ops.count("INCRBY") == 4 and "MULTI" in ops and "EXEC" in ops  # redis-py sends INCRBY
    err = [s for s in spans if s.attributes["db.operation.name"] == "LPUSH"]
    assert len(err) == 1 and err[0].status_code == StatusCode.ERROR
    assert err[0].attributes["error.type"] == "WRONGTYPE"
    ns = [s for s in spans if s.attributes.get("db.query.text") == "SET k3 ?"]
    assert len(ns) == 1 and ns[0].attributes["db.namespace"] == "2"
    assert "SUBSCRIBE" in ops and "PUBLISH" in ops
    for s in spans:
        assert s.kind == SpanKind.CLIENT
        assert s.attributes["server.port"] == port
        assert 0 <= s.end_ns - s.start_ns < 5_000_000_000
    assert "alice" not in repr([s.attributes for s in spans])


def test_resp3_subscribe_confirmation_push_answers_the_request() -> None:
    d = Driver()
    d.send(True, cmd("SUBSCRIBE", "news"))
    d.send(False, b">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
    d.send(False, b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n")
    d.send(True, cmd("UNSUBSCRIBE", "news"))
    d.send(False, b">3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n")
    assert [s.name for s in d.spans] == ["SUBSCRIBE", "UNSUBSCRIBE"]
    assert d.conn.extra["redis_pushes"] == 1 and not d.drops


def test_hostile_lengths_are_counted_drops_never_escapes() -> None:
    """Issue 20: ``*1\\r\\n$-1\\r\\nX`` made detect raise, and ``$-2147483648`` inside a nested
    aggregate sent the scanner to a negative offset; ``--1`` made int() raise."""
    from processors.protocols.processor import ProtocolsProcessor
    from service.model import EventKind, TcpEvent

    class Sink:
        spans: list = []

        def consume_spans(self, s: list) -> None:
            self.spans.extend(s)

    for data in (b"*1\r\n$-1\r\nX", b"*1\r\n$--1\r\nX", b"*1\r\n$0\r\n\r\n",
                 b"*2\r\n$3\r\nGET\r\n*2\r\n$-2147483648\r\n$1\r\nx\r\n",
                 b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$-2147483648\r\n",
                 b"*2\r\n$3\r\nGET\r\n$99999999999999999999\r\n"):
        assert r.detect(LargeBuffer(data), None) in (Detection.NO, Detection.NEED_MORE, Detection.REQUEST)
        d = Driver()
        with contextlib.suppress(ProtocolError):
            d.send(True, data)
        p = ProtocolsProcessor("protocols", {"enabled": ["redis"]}, Sink())
        p.consume_events([TcpEvent(EventKind.DATA, 1, "10.0.0.1", 40000, "10.0.0.2", 6379, 1, memoryview(data),
                                   client_is_src=True),
                          TcpEvent(EventKind.DATA, 1, "10.0.0.2", 6379, "10.0.0.1", 40000, 2,
                                   memoryview(b"*2\r\n$-1\r\n$-1\r\n"), client_is_src=False)])
        p.shutdown()
        assert "internal_error" not in str(p.stats["drops"]), (data, p.stats["drops"])


def test_a_negative_bulk_inside_an_aggregate_is_a_null_element() -> None:
    d = Driver()
    d.send(True, b"*2\r\n$4\r\nMGET\r\n$1\r\na\r\n")
    d.send(False, b"*3\r\n$-1\r\n$-2147483648\r\n$1\r\nb\r\n")
    assert [s.name for s in d.spans] == ["MGET"]


# -- real-world shapes (issue 16 class 6) ---------------------------------------------------------------
def _stage_spans(stream: list[tuple[bool, bytes]], step: int | None) -> tuple[list, dict]:
    from processors.protocols.processor import ProtocolsProcessor
    from service.model import EventKind, TcpEvent
    from tests.support.replay import _Collect

    sink = _Collect()
    proc = ProtocolsProcessor("protocols", {}, sink)
    cli, srv = ("127.0.0.1", 62283), ("127.0.0.1", 6379)
    ts = 1_000
    for from_client, data in stream:
        a, b = (cli, srv) if from_client else (srv, cli)
        for i in range(0, len(data), step or len(data)):
            ts += 10
            proc.consume_events([TcpEvent(EventKind.DATA, 1, a[0], a[1], b[0], b[1], ts,
                                          memoryview(data[i:i + (step or len(data))]))])
    proc.shutdown()
    return sink.spans, proc.stats


@pytest.mark.parametrize("step", [None, 1, 3])
def test_inline_unknown_command_first_is_confirmed_by_the_resp_answer(step) -> None:
    """A connection's first bytes an inline command no list knows (a module's, a test
    server's): detection waits for the server's RESP answer, then both are parsed. RESP3
    attributes before the reply and inside it annotate, they are no elements of their own."""
    spans, stats = _stage_spans([
        (True, b"FAKE COMMAND\r\n"),
        (False, b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n"
                b"*2\r\n:2039123\r\n:9543892\r\n"),
        (True, b"FAKE2 COMMAND2\r\n"),
        (False, b"*3\r\n:1\r\n:2\r\n|1\r\n+ttl\r\n:3600\r\n:3\r\n"),
        (True, b"PUBLISH news hello\r\n"),
        (False, b":1\r\n"),
    ], step)
    assert [s.attributes["db.operation.name"] for s in spans] == ["FAKE", "FAKE2", "PUBLISH"]
    assert all(s.status_code == StatusCode.UNSET for s in spans)
    assert not any(k.startswith("redis:") or k == "undetected" for k in stats["drops"]), stats["drops"]
    # an inline line alone is no proof: random text is not taken for Redis
    assert r.detect(LargeBuffer(b"FAKE COMMAND\r\n"), None) == Detection.NEED_MORE
    assert r.detect(LargeBuffer(b"FAKE \x01COMMAND\r\n"), None) == Detection.NO
    assert r.detect(LargeBuffer(b"PUBLISH x y\r\n"), None) == Detection.REQUEST


@pytest.mark.parametrize("step", [None, 1])
def test_empty_lines_between_commands_are_skipped(step) -> None:
    d = Driver()
    d.send(True, cmd("SET", "k", "v") + b"\r\n" + b"\n" + cmd("GET", "k"), step)
    d.send(False, b"+OK\r\n$1\r\nv\r\n", step)
    assert [s.name for s in d.spans] == ["SET", "GET"] and not d.drops


@pytest.mark.parametrize("step", [None, 1])
def test_client_reply_off_skip_on(step) -> None:
    """CLIENT REPLY OFF / SKIP: the server answers nothing for those commands (spans of the
    request alone); CLIENT REPLY ON is answered +OK, even right after SKIP."""
    d = Driver()
    d.send(True, b"PING\r\nCLIENT REPLY OFF\r\nPING\r\nCLIENT REPLY SKIP\r\nCLIENT REPLY ON\r\nPING\r\nPING\r\n", step)
    d.send(False, b"+PONG\r\n+OK\r\n+PONG\r\n+PONG\r\n", step)
    answered = sorted(s.name for s in d.spans if s.end_ns > s.start_ns)
    silent = sorted(s.name for s in d.spans if s.end_ns == s.start_ns)
    assert answered == ["CLIENT REPLY", "PING", "PING", "PING"] and silent == ["CLIENT REPLY", "CLIENT REPLY", "PING"]
    assert not d.drops and not d.session.pending


def test_command_names_keep_the_case_the_client_sent() -> None:
    """Semantic conventions ask for the operation name as the protocol has it, not upper-cased:
    Redis takes any case, so the span says what the client sent (rules compare case-blind)."""
    d = Driver()
    d.send(True, cmd("get", "k") + cmd("client", "setinfo", "LIB-NAME", "x") + cmd("multi") + cmd("set", "a", "1")
           + cmd("exec"))
    d.send(False, b"$-1\r\n+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n")
    assert [(s.name, s.attributes["db.query.text"]) for s in d.spans] == [
        ("get", "get k"), ("client setinfo", "client setinfo ? ?"), ("multi", "multi"), ("set", "set a ?"),
        ("exec", "exec")]
    assert d.spans[3].attributes["db.redis.transaction"] is True and "db.redis.transaction" not in d.spans[4].attributes


def test_reply_cut_by_the_end_of_the_capture_is_an_incomplete_span() -> None:
    d = Driver()
    d.send(True, cmd("LRANGE", "big", "0", "-1") + cmd("GET", "k"))
    d.send(False, b"*1000\r\n" + b"$3\r\nabc\r\n" * 10)
    d.session.close(d.ts)
    (s,) = d.spans
    assert s.name == "LRANGE" and s.attributes["wirespan.incomplete"] is True and s.status_code == StatusCode.UNSET
    assert d.drops == ["no_reply"]


# -- the in-place paths (_whole_values, feed_whole) decide exactly as the scanner ------------
_REPLIES = [b"+OK\r\n", b"-ERR no such key\r\n", b":42\r\n", b"$3\r\nabc\r\n", b"$-1\r\n", b"$0\r\n\r\n",
            b"*2\r\n$1\r\na\r\n$-1\r\n", b"*3\r\n+x\r\n:1\r\n$2\r\nyz\r\n", b"*-1\r\n", b"*0\r\n",
            b"*2\r\n*1\r\n:1\r\n$1\r\nb\r\n", b"_\r\n", b"%1\r\n+k\r\n:1\r\n",
            b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
            b"!9\r\nERR bulky\r\n", b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n", b"-" + b"E" * 700 + b"\r\n",
            b"$5\r\nab\r\n", b"$abc\r\n", b"*2\r\n-e\r\n:1\r\n", b"\r\n", b"*1\r\n$600000000\r\n",
            b"$007\r\nabcdefg\r\n",
            b"*01\r\n:1\r\n", b"*1\r\n$-0\r\n\r\n", b"#t\r\n", b"*1\r\n+" + b"s" * 200 + b"\r\n"]
_ARG = st.one_of(st.sampled_from([b"GET", b"SET", b"MGET", b"SELECT", b"CLIENT", b"AUTH", b"SUBSCRIBE", b"MULTI",
                                  b"EXEC", b"k", b"REPLY", b"OFF", b"2"]),
                 st.binary(max_size=200))
_REQUEST = st.one_of(st.lists(_ARG, min_size=1, max_size=12).map(lambda a: cmd(*a)),
                     st.sampled_from([b"PING\r\n", b"*1\r\n$4\r\nPING\r\n", b"*2\r\n$3\r\nGET\r\n$-1\r\n",
                                      b"*2\r\n$3\r\nGET\r\n:7\r\n", b"*x\r\n", b"$3\r\nGET\r\n"]))


def _no_whole_values(c: memoryview, p: int, *_a: object) -> int:
    return p


def _outcome(steps: list[tuple[bool, bytes]], step: int | None) -> tuple:
    d = Driver()
    err = None
    try:
        for fc, data in steps:
            d.send(fc, data, step)
        d.session.close(d.ts)
    except ProtocolError as e:
        err = (e.reason, e.offset)
    spans = [(s.name, s.start_ns, s.end_ns, int(s.status_code), s.status_message, sorted(s.attributes.items(), key=str))
             for s in d.spans]
    return spans, d.drops, err


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(_REQUEST, min_size=1, max_size=4),
                          st.lists(st.sampled_from(_REPLIES), min_size=1, max_size=4)), min_size=1, max_size=4),
       st.sampled_from([None, 5, 64]))
def test_whole_values_match_the_scanner(exchanges: list, step: int | None) -> None:
    steps = [s for reqs, reps in exchanges for s in ((True, b"".join(reqs)), (False, b"".join(reps)))]
    fast = _outcome(steps, step)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(r, "_C", None)  # feed_whole calls _C's reader itself, not through _whole_values
        m.setattr(r, "_whole_values", _no_whole_values)
        assert _outcome(steps, step) == fast


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(_REQUEST, min_size=1, max_size=3),
                          st.lists(st.sampled_from(_REPLIES), min_size=1, max_size=3),
                          st.integers(0, 60)), min_size=1, max_size=5))
def test_feed_whole_matches_the_buffered_path(exchanges: list) -> None:
    from tests.support.whole import run_both_ways
    segs: list[tuple[bool, bytes]] = [(True, cmd("SET", "k", "v")), (False, b"+OK\r\n")]  # detected as Redis
    for reqs, reps, cut in exchanges:
        req, rep = b"".join(reqs), b"".join(reps)
        segs.append((True, req))
        if 0 < cut < len(rep):  # a reply cut in two segments: the second is no whole value
            segs += [(False, rep[:cut]), (False, rep[cut:])]
        else:
            segs.append((False, rep))
    run_both_ways(r.Session, 6379, segs)


def test_feed_whole_takes_the_common_segments() -> None:
    from tests.support.whole import run_both_ways
    calls: list[bool] = []
    orig = r.Session.feed_whole

    def spy(self: r.Session, fc: bool, d: memoryview, ts: int) -> bool:
        calls.append(orig(self, fc, d, ts))
        return calls[-1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(r.Session, "feed_whole", spy)
        segs = [(True, cmd("SET", "k", "v")), (False, b"+OK\r\n"), (True, cmd("MGET", "a", "b")),
                (False, b"*2\r\n$-1\r\n$1\r\nx\r\n")]
        spans, drops = run_both_ways(r.Session, 6379, segs)
    assert [s[0] for s in spans] == ["SET", "MGET"] and not drops
    assert calls[:3] == [True, True, True]  # the first request went through detection


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([b"*1\r\n$4\r\nPING\r\n", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
                        b"*2\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n", b"*1\r\n$10\r\nCLUSTER|XY\r\n",
                        b"*999999\r\n$3\r\nGET\r\n", b"*01\r\n$3\r\nGET\r\n"]),
       st.lists(st.tuples(st.integers(0, 40), st.sampled_from(b"*$\r\n0123456789-_|Aa \x00"), st.booleans()),
                max_size=3),
       st.sampled_from([True, None, False]))
def test_detect_fast_path_answers_as_the_walk(base: bytes, edits: list, from_client: bool | None) -> None:
    """detect's one-regex path for a one-chunk command gives the general walk's answer."""
    data = bytearray(base)
    for pos, byte, insert in edits:
        pos %= len(data) + 1
        if insert or pos == len(data):
            data.insert(pos, byte)
        else:
            data[pos] = byte

    def det() -> Detection:
        b = LargeBuffer()
        b.append(memoryview(bytes(data)), 1)
        return r.detect(b, from_client)

    fast = det()
    saved = r._DETECT_COMMAND
    r._DETECT_COMMAND = re.compile(rb"(?!)")  # matches nothing: the walk alone
    try:
        assert det() == fast
    finally:
        r._DETECT_COMMAND = saved
