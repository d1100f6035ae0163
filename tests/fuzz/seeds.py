"""Seed corpus per protocol: valid conversations built here, each under a few segmentations.

``seeds(name)`` returns encoded inputs (tests/fuzz/encoding.py). The conversations are
tests/support/exchanges.py's exchange(s) for the protocol at two (small) sizes, plus the ones below
(other message kinds the parser follows: pipelined HTTP, gRPC, extended query, prepared
statements, MQTT 5, fetch and metadata, ...). A protocol with none of its own still gets the
exchanges' conversations; one missing from both gets a generic seed, so every protocol of the
table is fuzzed.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable

from tests.fuzz.encoding import END_FIN, END_FIN_SERVER, END_RST, END_SHIFT, F_ALL, F_DIR, F_PORT, F_ROLES, Input, Step
from tests.fuzz.encoding import encode as _encode
from tests.support.exchanges import mqtt_vbi

__all__ = ["seeds", "conversations"]

Conv = list[tuple[bool, bytes]]
F_SMALL = 0x40  # harness.F_SMALL and F_DIRECT (not imported: the harness imports the parsers)
F_DIRECT = 0x80

#: (flags, segmentation) each conversation is encoded under.
VARIANTS: list[tuple[int, list[int]]] = [
    (F_ROLES | F_PORT, []),
    (F_ROLES | F_PORT | F_DIRECT, []),                        # the session alone
    (F_ROLES | F_PORT, [1]),                                  # a byte a segment
    (F_ROLES | F_DIRECT, [1]),
    (F_PORT | F_DIR, [3, 1, 7, 200]),                         # roles unknown, odd cuts
    (F_ALL | F_ROLES | (END_FIN << END_SHIFT), [64]),         # every protocol, FIN at the end
    (F_ALL | F_SMALL | (END_RST << END_SHIFT), [2, 255]),     # smallest limits, RST
    (F_ROLES | (END_FIN_SERVER << END_SHIFT), [193]),         # unhinted port, 384-byte pieces
]


# -- HTTP/1 --------------------------------------------------------------------------------------
def _http() -> list[Conv]:
    tp = b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    return [
        [(True, b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: ua\r\n" + tp + b"\r\n"
                b"HEAD /b HTTP/1.1\r\nHost: h\r\n\r\n"),
         (False, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                 b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\n")],
        [(True, b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4;ext=1\r\nabcd\r\n0\r\nT: v\r\n\r\n"),
         (False, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nbody until close")],
        [(True, b"GET / HTTP/1.0\r\n\r\n"), (False, b"HTTP/1.0 304 Not Modified\r\nETag: x\r\n\r\n")],
        [(True, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
         (False, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                 + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")],
        [(True, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
         (False, b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01\x00\x05hello")],
        [(True, b"OPTIONS * HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"),
         (False, b"HTTP/1.1 204 No Content\r\nX: a\r\n b\r\n\r\n")],
        *_http_enriched(),
    ]


def _http_enriched() -> list[Conv]:
    """What the HTTP enrichers read (processors/protocols/enrich/): a GenAI call answered gzip'd,
    one streamed as SSE in chunks, GraphQL, Elasticsearch, a JSON-RPC batch, an MCP SSE answer."""
    def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: h\r\n%sContent-Length: %d\r\n\r\n%s" % (path, extra, len(body), body)

    def ok(body: bytes, extra: bytes = b"") -> bytes:
        return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)

    chat = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": %s}'
    answer = gzip.compress(b'{"id": "c1", "model": "gpt-4o-1", "choices": [{"index": 0, "finish_reason": "stop"}],'
                           b' "usage": {"prompt_tokens": 3, "completion_tokens": 1}}')
    events = (b'data: {"model": "m", "choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
              b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\ndata: [DONE]\n\n')
    sse = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(events[i:i + 40]), events[i:i + 40]) for i in range(0, len(events), 40)) + b"0\r\n\r\n"
    mcp = (b'event: message\ndata: {"jsonrpc": "2.0", "id": 1, "result": {"isError": true}}\n\n')
    return [
        [(True, post(b"/v1/chat/completions", chat % b"false")),
         (False, ok(answer, b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"))],
        [(True, post(b"/v1/chat/completions", chat % b"true")), (False, sse)],
        [(True, post(b"/graphql", b'{"query": "mutation M($a: I = {x: 1}) { f }", "operationName": "M"}')),
         (False, ok(b'{"errors": [{"extensions": {"code": "E"}}], "data": null}'))],
        [(True, b"GET /books/_search?q=x HTTP/1.1\r\nHost: h\r\nUser-Agent: elasticsearch-py/9\r\n\r\n"),
         (False, ok(b'{"error": {"type": "index_not_found_exception"}}', b"X-Elastic-Product: Elasticsearch\r\n")
          .replace(b"200 OK", b"404 Not Found"))],
        [(True, post(b"/", b'[{"jsonrpc": "2.0", "method": "a", "id": 1}, {"jsonrpc": "2.0", "method": "b"}]')),
         (False, ok(b'[{"jsonrpc": "2.0", "id": 1, "error": {"code": -32601}}]'))],
        [(True, post(b"/mcp", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t"}}',
                     b"Mcp-Session-Id: s1\r\n")),
         (False, ok(mcp, b"Content-Type: text/event-stream\r\n"))],
    ]


# -- HTTP/2 and gRPC ---------------------------------------------------------------------------------
def _h2(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBI", n >> 8, n & 0xFF, ftype, flags, sid) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _http2() -> list[Conv]:
    import hpack

    ec, es = hpack.Encoder(), hpack.Encoder()
    req = ec.encode([(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Do"), (":authority", "h"),
                     ("content-type", "application/grpc"), ("te", "trailers"),
                     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")])
    msg = b"\x00" + struct.pack(">I", 3) + b"abc"
    resp = es.encode([(":status", "200"), ("content-type", "application/grpc")])
    trailers = es.encode([("grpc-status", "5"), ("grpc-message", "not found")])
    grpc = [(True, PREFACE + _h2(4, 0, 0, struct.pack(">HI", 3, 100)) + _h2(1, 4, 1, req) + _h2(0, 1, 1, msg)),
            (False, _h2(4, 0, 0) + _h2(4, 1, 0) + _h2(1, 4, 1, resp) + _h2(0, 0, 1, msg) + _h2(1, 5, 1, trailers))]
    ec2, es2 = hpack.Encoder(), hpack.Encoder()
    get = ec2.encode([(":method", "GET"), (":scheme", "https"), (":path", "/x"), (":authority", "h")])
    padded = bytes([4]) + get + b"\0" * 4
    other = [(True, PREFACE + _h2(4, 0, 0) + _h2(1, 0x0D, 1, padded) + _h2(1, 0x25, 3, b"\x00\x00\x00\x00\x10" + get)
              + _h2(6, 0, 0, b"12345678") + _h2(8, 0, 0, struct.pack(">I", 1000)) + _h2(3, 0, 3, struct.pack(">I", 8))
              + _h2(2, 0, 1, struct.pack(">IB", 0, 16))),
             (False, _h2(4, 0, 0) + _h2(1, 4, 1, es2.encode([(":status", "503")]))
              + _h2(7, 0, 0, struct.pack(">II", 1, 0))),
             (True, _h2(1, 0, 5, get[:3]) + _h2(9, 4, 5, get[3:]))]
    # What the HTTP enrichers read on HTTP/2 (processors/protocols/enrich/): a chat call in DATA
    # frames answered gzip'd, a streamed one (SSE in two DATA frames) on stream 3.
    ec3, es3 = hpack.Encoder(), hpack.Encoder()
    chat = ec3.encode([(":method", "POST"), (":scheme", "http"), (":path", "/v1/chat/completions"),
                       (":authority", "api"), ("content-type", "application/json")])
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    gz = gzip.compress(b'{"model": "gpt-4o-1", "choices": [{"finish_reason": "stop"}], "usage": {"prompt_tokens": 1}}')
    ok = es3.encode([(":status", "200"), ("content-type", "application/json"), ("content-encoding", "gzip")])
    ev = es3.encode([(":status", "200"), ("content-type", "text/event-stream")])
    genai = [(True, PREFACE + _h2(4, 0, 0) + _h2(1, 4, 1, chat) + _h2(0, 1, 1, body) + _h2(1, 4, 3, chat)
              + _h2(0, 1, 3, body[:-1] + b', "stream": true}')),
             (False, _h2(4, 0, 0) + _h2(1, 4, 1, ok) + _h2(0, 1, 1, gz) + _h2(1, 4, 3, ev)
              + _h2(0, 0, 3, b'data: {"model": "m", "choices": [{"index": 0, "finish_') + _h2(
                  0, 1, 3, b'reason": "stop"}]}\n\ndata: [DONE]\n\n'))]
    return [grpc, other, genai]


# -- PostgreSQL --------------------------------------------------------------------------------------
def _pg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack(">i", len(body) + 4) + body


def _postgresql() -> list[Conv]:
    body = struct.pack(">i", 196608) + b"user\0alice\0database\0shop\0\0"
    startup = struct.pack(">i", len(body) + 4) + body
    ready = _pg(b"Z", b"I")
    auth = _pg(b"R", struct.pack(">i", 0)) + ready
    parse = _pg(b"P", b"s1\0SELECT * FROM t WHERE id = $1\0" + struct.pack(">hi", 1, 23))
    bind = _pg(b"B", b"\0s1\0" + struct.pack(">hh", 1, 0) + struct.pack(">hi", 1, 2) + b"42" + struct.pack(">hh", 1, 0))
    ext = parse + bind + _pg(b"D", b"P\0") + _pg(b"E", b"\0" + struct.pack(">i", 0)) + _pg(b"S")
    ext_ok = (_pg(b"1") + _pg(b"2") + _pg(b"n") + _pg(b"C", b"SELECT 0\0") + ready)
    err = _pg(b"E", b"SERROR\0C42P01\0Mrelation does not exist\0\0") + ready
    return [
        [(True, struct.pack(">ii", 8, 80877103)), (False, b"N"), (True, startup), (False, auth),
         (True, ext), (False, ext_ok), (True, _pg(b"Q", b"SELECT * FROM nope\0")), (False, err),
         (True, _pg(b"X"))],
        [(True, startup), (False, _pg(b"R", struct.pack(">i", 10)) + b"SCRAM-SHA-256\0\0"),
         (True, _pg(b"p", b"SCRAM-SHA-256\0" + struct.pack(">i", 4) + b"n,,x")),
         (False, auth), (True, _pg(b"Q", b"BEGIN; INSERT INTO t VALUES (1, 'a'); COMMIT\0")),
         (False, _pg(b"C", b"BEGIN\0") + _pg(b"C", b"INSERT 0 1\0") + _pg(b"C", b"COMMIT\0") + ready)],
    ]


# -- MySQL -----------------------------------------------------------------------------------------
def _my(payload: bytes, seq: int) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload


def _lenc(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def _mysql() -> list[Conv]:
    caps = 0x000FA685 | 0x01000000
    greet = (b"\x0a8.0.36\0" + struct.pack("<I", 7) + b"abcdefgh\0" + struct.pack("<H", caps & 0xFFFF)
             + b"\x2d" + struct.pack("<H", 2) + struct.pack("<H", caps >> 16) + b"\x15" + b"\0" * 10
             + b"ijklmnopqrst\0mysql_native_password\0")
    lc = 0x00000200 | 0x00008000 | 0x00080000 | 0x01000000 | 0x00000008
    login = (struct.pack("<IIB", lc, 1 << 24, 45) + b"\0" * 23 + b"app\0\x14" + b"x" * 20
             + b"shop\0mysql_native_password\0")
    ok = lambda seq: _my(b"\x00\x00\x00" + struct.pack("<HH", 2, 0), seq)  # noqa: E731
    col = (_lenc(b"def") + _lenc(b"shop") + _lenc(b"t") + _lenc(b"t") + _lenc(b"id") + _lenc(b"id")
           + b"\x0c" + struct.pack("<HIBHB", 45, 11, 3, 0, 0) + b"\0\0")
    rs = (_my(b"\x01", 1) + _my(col, 2) + _my(_lenc(b"7"), 3) + _my(_lenc(b"8"), 4)
          + _my(b"\xfe\x00\x00" + struct.pack("<HH", 2, 0), 5))
    prep_ok = _my(b"\x00" + struct.pack("<IHHxH", 1, 1, 1, 0), 1) + _my(col, 2) + _my(col, 3)
    execute = _my(b"\x17" + struct.pack("<IBI", 1, 0, 1) + b"\x00\x01" + b"\x03\x00" + struct.pack("<i", 7), 0)
    err = _my(b"\xff" + struct.pack("<H", 1146) + b"#42S02Table 'shop.x' doesn't exist", 1)
    return [[(False, _my(greet, 0)), (True, _my(login, 1)), (False, ok(2)),
             (True, _my(b"\x03SELECT id FROM t WHERE id IN (7, 8)", 0)), (False, rs),
             (True, _my(b"\x16SELECT id FROM t WHERE id = ?", 0)), (False, prep_ok),
             (True, execute), (False, rs),
             (True, _my(b"\x02other", 0)), (False, ok(1)),
             (True, _my(b"\x03SELECT * FROM x", 0)), (False, err),
             (True, _my(b"\x0e", 0)), (False, ok(1)), (True, _my(b"\x19" + struct.pack("<I", 1), 0)),
             (True, _my(b"\x01", 0))]]


# -- MongoDB ---------------------------------------------------------------------------------------
def _mongodb() -> list[Conv]:
    import bson

    def msg(rid: int, to: int, doc: dict, seq: tuple[str, list] | None = None, flags: int = 0) -> bytes:
        body = struct.pack("<I", flags) + b"\0" + bson.encode(doc)
        if seq is not None:
            ident = seq[0].encode() + b"\0" + b"".join(bson.encode(d) for d in seq[1])
            body += b"\x01" + struct.pack("<i", 4 + len(ident)) + ident
        return struct.pack("<iiii", 16 + len(body), rid, to, 2013) + body

    q = bson.encode({"find": "orders", "filter": {"a": 1}})
    op_query = struct.pack("<i", 0) + b"shop.$cmd\0" + struct.pack("<ii", 0, -1) + q
    op_query = struct.pack("<iiii", 16 + len(op_query), 3, 0, 2004) + op_query
    rdoc = bson.encode({"ok": 1.0, "cursor": {"firstBatch": [], "id": 0, "ns": "shop.orders"}})
    op_reply = struct.pack("<iqii", 0, 0, 0, 1) + rdoc
    op_reply = struct.pack("<iiii", 16 + len(op_reply), 4, 3, 1) + op_reply
    return [[(True, msg(1, 0, {"insert": "orders", "$db": "shop"}, ("documents", [{"_id": 1}, {"_id": 2}]))),
             (False, msg(2, 1, {"n": 2, "ok": 1.0})),
             (True, msg(5, 0, {"find": "x", "$db": "shop"})),
             (False, msg(6, 5, {"ok": 0.0, "errmsg": "bad", "code": 2, "codeName": "BadValue"})),
             (True, op_query), (False, op_reply)]]


# -- MQTT ------------------------------------------------------------------------------------------
def _mq(b0: int, body: bytes) -> bytes:
    return bytes([b0]) + mqtt_vbi(len(body)) + body


def _s(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _mqtt() -> list[Conv]:
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    props5 = b"\x26" + _s(b"traceparent") + _s(tp) + b"\x23\x00\x01"  # user property, topic alias
    v5 = [(True, _mq(0x10, _s(b"MQTT") + bytes([5, 0xC2]) + struct.pack(">H", 30) + b"\x05\x11\x00\x00\x00\x0a"
                     + _s(b"dev-5") + _s(b"user") + _s(b"pw"))),
          (False, _mq(0x20, b"\x00\x00\x03\x22\x00\x0a")),
          (True, _mq(0x34, _s(b"a/b") + struct.pack(">H", 7) + mqtt_vbi(len(props5)) + props5 + b"payload")),
          (False, _mq(0x50, struct.pack(">H", 7) + b"\x00")),
          (True, _mq(0x62, struct.pack(">H", 7) + b"\x00")), (False, _mq(0x70, struct.pack(">H", 7))),
          (True, _mq(0x82, struct.pack(">H", 8) + b"\x00" + _s(b"s/#") + b"\x01")),
          (False, _mq(0x90, struct.pack(">H", 8) + b"\x00\x01")),
          (False, _mq(0x30, _s(b"s/x") + b"\x00" + b"delivered")),
          (True, _mq(0xA2, struct.pack(">H", 9) + b"\x00" + _s(b"s/#"))),
          (False, _mq(0xB0, struct.pack(">H", 9) + b"\x00\x00")),
          (True, b"\xc0\x00"), (False, b"\xd0\x00"), (True, b"\xe0\x00")]
    v311 = [(True, _mq(0x10, _s(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 60) + _s(b"dev-1"))),
            (False, _mq(0x20, b"\x00\x00")),
            (True, _mq(0x82, struct.pack(">H", 1) + _s(b"t/1") + b"\x00" + _s(b"t/2") + b"\x02")),
            (False, _mq(0x90, struct.pack(">H", 1) + b"\x00\x80")),
            (True, _mq(0x30, _s(b"t/1") + b"qos0")), (True, _mq(0x32, _s(b"t/2") + struct.pack(">H", 2) + b"q1")),
            (False, _mq(0x40, struct.pack(">H", 2)))]
    refused = [(True, _mq(0x10, _s(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 60) + _s(b"x"))),
               (False, _mq(0x20, b"\x00\x05"))]
    return [v5, v311, refused]


# -- FastCGI -----------------------------------------------------------------------------------------
def _fc(t: int, rid: int, content: bytes = b"", pad: int = 0) -> bytes:
    return struct.pack(">BBHHBB", 1, t, rid, len(content), pad, 0) + content + b"\0" * pad


def _nv(n: bytes, v: bytes) -> bytes:
    enc = lambda x: bytes([x]) if x < 128 else struct.pack(">I", x | 0x80000000)  # noqa: E731
    return enc(len(n)) + enc(len(v)) + n + v


def _fastcgi() -> list[Conv]:
    params = (_nv(b"REQUEST_METHOD", b"GET") + _nv(b"REQUEST_URI", b"/i.php?a=1") + _nv(b"SCRIPT_NAME", b"/i.php")
              + _nv(b"HTTP_TRACEPARENT", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
              + _nv(b"X" * 130, b"long name"))
    begin = lambda rid: _fc(1, rid, struct.pack(">HB5x", 1, 1))  # noqa: E731
    req = (begin(1) + begin(2) + _fc(4, 1, params, pad=3) + _fc(4, 2, params) + _fc(4, 1) + _fc(4, 2)
           + _fc(5, 1) + _fc(5, 2))
    resp = (_fc(6, 2, b"Status: 404 Not Found\r\n\r\nnope") + _fc(7, 1, b"PHP Warning") + _fc(6, 1, b"\r\nok")
            + _fc(6, 1) + _fc(3, 1, struct.pack(">IB3x", 0, 0)) + _fc(3, 2, struct.pack(">IB3x", 0, 0)))
    mgmt = [(True, _fc(9, 0, _nv(b"FCGI_MAX_CONNS", b""))), (False, _fc(10, 0, _nv(b"FCGI_MAX_CONNS", b"10"))),
            (True, _fc(2, 1))]
    return [[(True, req), (False, resp)], mgmt]


# -- memcached ---------------------------------------------------------------------------------------
def _memcached() -> list[Conv]:
    h = struct.Struct(">BBHBBHIIQ")

    def req(op: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 1, vb: int = 0) -> bytes:
        return h.pack(0x80, op, len(key), len(extras), 0, vb, len(extras) + len(key) + len(value), opaque, 0) \
            + extras + key + value

    def res(op: int, status: int = 0, value: bytes = b"", extras: bytes = b"", opaque: int = 1) -> bytes:
        return h.pack(0x81, op, 0, len(extras), 0, status, len(extras) + len(value), opaque, 0) + extras + value

    binary = [(True, req(0x00, b"k1", opaque=1) + req(0x09, b"k2", opaque=2) + req(0x0a, opaque=3)),
              (False, res(0x00, 1, b"Not found", opaque=1) + res(0x0a, opaque=3)),
              (True, req(0x05, b"ctr", struct.pack(">QQI", 1, 0, 0), opaque=4)),
              (False, res(0x05, 0, struct.pack(">Q", 2), opaque=4)),
              (True, req(0x89, b"sasl", opaque=5)), (False, res(0x89, 0x20, opaque=5))]
    text = [(True, b"gets a b\r\n"), (False, b"VALUE a 0 1 9\r\nx\r\nEND\r\n"),
            (True, b"incr n 5\r\ndelete a noreply\r\ntouch b 10\r\n"), (False, b"6\r\nNOT_FOUND\r\n"),
            (True, b"cas a 0 0 1 9\r\nz\r\n"), (False, b"EXISTS\r\n"), (True, b"stats\r\n"),
            (False, b"STAT pid 1\r\nEND\r\n"), (True, b"bogus\r\n"), (False, b"ERROR\r\n"),
            (True, b"mg foo v\r\n"), (False, b"VA 2\r\nhi\r\n")]
    return [binary, text]


# -- Redis -----------------------------------------------------------------------------------------
def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _redis() -> list[Conv]:
    return [[(True, _resp(b"HELLO", b"3")),
             (False, b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n"),
             (True, _resp(b"SELECT", b"2") + _resp(b"HGETALL", b"h")),
             (False, b"+OK\r\n%1\r\n$1\r\nf\r\n$1\r\nv\r\n"),
             (True, b"PING\r\n"), (False, b"+PONG\r\n"),
             (True, _resp(b"LRANGE", b"l", b"0", b"-1")),
             (False, b"*2\r\n*1\r\n:1\r\n~1\r\n,1.5\r\n"),
             (True, _resp(b"EVAL", b"return 1", b"0")), (False, b"-ERR unknown\r\n"),
             (True, _resp(b"GET", b"x")), (False, b"!21\r\nSYNTAX invalid syntax\r\n"),
             (True, _resp(b"GET", b"y")), (False, b"_\r\n"),
             (True, _resp(b"DEBUG", b"x")), (False, b"=15\r\ntxt:Some string\r\n"),
             (True, _resp(b"OBJECT", b"y")), (False, b"(3492890328409238509324850943850943825024385\r\n"),
             (True, _resp(b"CLIENT", b"z")), (False, b"|1\r\n+a\r\n+b\r\n#t\r\n"),
             (True, _resp(b"SUBSCRIBE", b"c")), (False, b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n")]]


# -- Kafka -----------------------------------------------------------------------------------------
def _kafka() -> list[Conv]:
    from tests.support import kafka_wire as kw

    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    recs = kw.records(n=2, value=b"val", headers=[("traceparent", tp)])
    out = []
    for v in (3, 9):
        out.append([(True, kw.produce_request(v, {"orders": {0: recs, 1: None}}, corr=5)),
                    (False, kw.produce_response(v, {"orders": [(0, 0, 42), (1, 6, -1)]}, corr=5))])
    for v in (4, 12):
        out.append([(True, kw.fetch_request(v, {"orders": [(0, 10), (1, 0)]}, corr=7)),
                    (False, kw.fetch_response(v, {"orders": [(0, 0, 12, recs), (1, 1, -1, None)]}, corr=7))])
    out.append([(True, kw.metadata_request(12, ["orders"], corr=3)),
                (False, kw.metadata_response(12, {"orders": b"\x01" * 16}, corr=3)),
                (True, kw.fetch_request(13, {"orders": [(0, 0)]}, corr=8) if _has_v13(kw) else b"")])
    return [[(fc, d) for fc, d in c if d] for c in out]


def _has_v13(kw) -> bool:
    try:
        kw.fetch_request(13, {"orders": [(0, 0)]}, corr=8)
        return True
    except Exception:
        return False


# -- NATS -----------------------------------------------------------------------------------------
def _nats() -> list[Conv]:
    info = b'INFO {"server_id":"N","version":"2.9.10","headers":true,"client_id":3}\r\n'
    hdr = b"NATS/1.0\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n"
    return [
        [(False, info), (True, b'CONNECT {"verbose":true,"lang":"go","name":"v"}\r\nPING\r\n'),
         (False, b"+OK\r\nPONG\r\n"), (True, b"PUB a.b _INBOX.x.1 3\r\nabc\r\nSUB c q 7\r\nUNSUB 7 2\r\n"),
         (False, b"+OK\r\n-ERR 'Permissions Violation for Subscription to \"c\"'\r\n+OK\r\n")],
        [(False, info), (True, b'CONNECT {"verbose":false,"lang":"python3"}\r\nPING\r\n'),
         (False, b"-ERR 'Authorization Violation'\r\n")],
        [(True, b"HPUB t.x %d %d\r\n%sxyz\r\n" % (len(hdr), len(hdr) + 3, hdr)),
         (False, b"HMSG _INBOX.r.2 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\nMSG t.x 1 3\r\nxyz\r\n"
                 b"-ERR 'Slow Consumer'\r\nPING\r\n")],
    ]


# -- AMQP 0-9-1 ----------------------------------------------------------------------------------
def _amqp() -> list[Conv]:
    from pika import spec

    from tests.support import amqp_wire as w

    c, s = w.handshake_client(), w.handshake_server()
    pub = w.method(2, spec.Basic.Publish(exchange="x", routing_key="k", mandatory=True)) + w.content(
        2, b"abc", spec.BasicProperties(headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-"
                                                                "00f067aa0ba902b7-01", "n": 5, "l": [1, "a"]}))
    ret = w.method(2, spec.Basic.Return(312, "NO_ROUTE", "x", "k")) + w.content(2, b"abc")
    return [
        [(True, c[0]), (False, s[0]), (True, c[1] + c[2]), (False, s[1]),
         (True, w.method(2, spec.Channel.Open()) + w.method(2, spec.Confirm.Select())),
         (False, w.method(2, spec.Channel.OpenOk()) + w.method(2, spec.Confirm.SelectOk())),
         (True, pub + pub), (False, ret + w.method(2, spec.Basic.Ack(1)) + w.method(2, spec.Basic.Nack(2))),
         (True, w.method(1, spec.Queue.Declare(queue="q1")) + w.method(1, spec.Basic.Get(queue="q1"))),
         (False, w.method(1, spec.Queue.DeclareOk("q1", 0, 0)) + w.method(1, spec.Basic.GetEmpty())),
         (True, w.method(1, spec.Basic.Consume(queue="q1", consumer_tag="t1"))),
         (False, w.method(1, spec.Basic.ConsumeOk("t1")) + w.method(1, spec.Basic.Deliver("t1", 7, True, "", "q1"))
          + w.content(1, b"")),
         (True, w.method(1, spec.Basic.Reject(7, False))
          + w.method(1, spec.Exchange.Declare(exchange="nope", type="topic", passive=True))),
         (False, w.method(1, spec.Channel.Close(404, "NOT_FOUND - no exchange", 40, 10)))],
        [(True, c[0]), (False, s[0]), (True, c[1]),
         (False, w.method(0, spec.Connection.Close(403, "ACCESS_REFUSED - Login was refused", 0, 0)))],
    ]


def _amqp10() -> list[Conv]:
    # AMQP 1.0 (the same protocol name: amqp/__init__.py dispatches by the header); proton's codec.
    from tests.support import amqp10_wire as w

    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    m = w.message(b"abc" * 40, id="m-1", correlation_id=7, properties={"traceparent": tp})
    return [
        [(True, w.SASL_HEADER), (False, w.SASL_HEADER + w.sasl_mechanisms()), (True, w.sasl_init()),
         (False, w.sasl_outcome(0)),
         (True, w.HEADER + w.open_("c1") + w.begin(0) + w.attach(0, "p", 0, False, target="/queue/q")
          + w.attach(0, "s", 1, True, source="/queue/q") + w.flow(0, 1, 5)),
         (False, w.HEADER + w.open_("r", "RabbitMQ") + w.begin(2, remote=0)
          + w.attach(2, "p", 4, True, target="/queue/q") + w.flow(2, 4, 9)
          + w.attach(2, "s", 5, False, source="/queue/q")),
         (True, w.transfer(0, 0, 0, b"t0", m, frame_max=64) + w.transfer(0, 0, 1, b"t1", w.message("v"), settled=True)),
         (False, w.disposition(2, True, 0, 1) + w.transfer(2, 5, 0, b"d", m)
          + w.detach(2, 4, w.error("amqp:not-found", "gone"))),
         (True, w.disposition(0, True, 0, state="rejected", err=w.error("amqp:decode-error", "x"))
          + w.attach(0, "x", 3, False, target="/exchange/none")),
         (False, w.end(2, w.error("amqp:not-found", "no exchange")) + w.close(w.error("amqp:internal-error")))],
        [(True, w.SASL_HEADER), (False, w.SASL_HEADER + w.sasl_mechanisms()), (True, w.sasl_init()),
         (False, w.sasl_outcome(1))],
    ]


OWN: dict[str, Callable[[], list[Conv]]] = {
    "http": _http, "http2": _http2, "postgresql": _postgresql, "mysql": _mysql, "mongodb": _mongodb,
    "mqtt": _mqtt, "fastcgi": _fastcgi, "memcached": _memcached, "redis": _redis, "kafka": _kafka,
    "nats": _nats, "amqp": lambda: _amqp() + _amqp10(),
}


def conversations(name: str) -> list[Conv]:
    from tests.support.exchanges import EXCHANGES

    convs: list[Conv] = []
    for fn in EXCHANGES.get(name, []):
        for size in (1, 64):
            convs.append(list(fn(size).steps))
    if name in OWN:
        convs.extend(OWN[name]())
    if not convs:  # a protocol new to the table: start from nothing but odd bytes
        convs = [[(True, b"\0\0\0\x10" + bytes(range(12))), (False, b"\r\n")]]
    return convs


def encode_conv(conv: Conv, flags: int, seg: list[int]) -> bytes:
    return _encode(Input(flags, list(seg), [Step(fc, 0, d) for fc, d in conv]))


def seeds(name: str) -> list[bytes]:
    out = []
    for conv in conversations(name):
        for flags, seg in VARIANTS:
            out.append(encode_conv(conv, flags, seg))
        # Each message alone too: short seeds mutate fastest.
        for fc, d in conv[:4]:
            out.append(encode_conv([(fc, d)], F_ROLES | F_PORT, []))
    return out
