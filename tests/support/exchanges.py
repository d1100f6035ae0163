"""One valid exchange per protocol of the table, of any size, for tests that hold every
protocol to the same rule (the drip test: linear time whatever the segmentation).

``EXCHANGES[name](size)`` returns an ``Exchange``: the steps (who sends what, in order)
of a short but complete conversation whose largest message is about ``size`` bytes,
with the part that grows being the kind the parser really reads (header lines, SQL
text, command arguments, keys) where the protocol has one, else a body the parser
skips. ``spans`` is how many spans the conversation must give. The bytes are built
here from each protocol's specification (kafka-python's protocol classes for Kafka,
the ``hpack`` package for HTTP/2 header blocks), so a test of a new protocol only adds
its line to ``EXCHANGES``; ``test_every_protocol_has_an_exchange`` keeps the table whole.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EXCHANGES", "Exchange", "h2c_upgrade"]


@dataclass
class Exchange:
    port: int
    steps: list[tuple[bool, bytes]]  # (from_client, bytes), in order
    spans: int
    #: step index -> spans the request(s) of that step give (default: every client step
    #: after the handshake gives spans / number of such steps; see ``requests_of``).
    requests: dict[int, int] | None = None

    def requests_of(self) -> dict[int, int]:
        if self.requests is not None:
            return self.requests
        client = [i for i, (c, _) in enumerate(self.steps) if c]
        client = client[-self.spans:] if self.spans else []
        return {i: 1 for i in client}

    @property
    def nbytes(self) -> int:
        return sum(len(b) for _, b in self.steps)


# -- HTTP/1 -----------------------------------------------------------------------------------
def _http(size: int) -> Exchange:
    # Header lines the parser reads (a quarter, under its 64 KiB head limit), a body it skips.
    nh = max(1, min(size // 4, 12 * 1024) // 64)  # under the parser's 256-header limit
    heads = b"".join(b"X-Field-%04d: %s\r\n" % (i, b"v" * 48) for i in range(nh))
    body = b"b" * max(0, size - len(heads))
    req = (b"POST /upload/" + b"p" * 200 + b"?q=1 HTTP/1.1\r\nHost: example\r\n" + heads
           + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[i:i + 4000] for i in range(0, len(body), 4000)))
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    return Exchange(8080, [(True, req), (False, resp), (True, b"GET / HTTP/1.1\r\n\r\n"),
                           (False, b"HTTP/1.1 204 No Content\r\n\r\n")], 2)


def _http_genai(size: int) -> Exchange:
    # A streamed OpenAI-style chat call (processors/protocols/enrich/): the request body the GenAI
    # enricher captures (its prompt grows, within the 256 KiB bound) and an SSE answer in chunked
    # coding whose events it parses one by one (their number grows).
    prompt = b"p" * max(1, size // 2)
    body = b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "' + prompt + b'"}]}'
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body) + body)
    event = b'data: {"model": "gpt-4o-1", "choices": [{"index": 0, "delta": {"content": "tok"}}]}\n\n'
    events = event * max(1, size // 2 // len(event)) + (
        b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}\n\ndata: [DONE]\n\n')
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(events[i:i + 1000]), events[i:i + 1000])
                      for i in range(0, len(events), 1000))
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks + b"0\r\n\r\n")
    return Exchange(8080, [(True, req), (False, resp)], 1)


# -- HTTP/2 -----------------------------------------------------------------------------------
def _h2frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBI", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _http2(size: int) -> Exchange:
    import hpack

    enc_c, enc_s = hpack.Encoder(), hpack.Encoder()
    nh = max(1, min(size // 4, 12 * 1024) // 64)
    req_h = [(":method", "POST"), (":scheme", "http"), (":path", "/api/items?x=1"), (":authority", "example")]
    req_h += [(f"x-field-{i:04d}", "v" * 48) for i in range(nh)]
    block = enc_c.encode(req_h)
    body = b"d" * max(0, size - len(block))
    client = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2frame(4, 0, 0)
    # The header block in HEADERS + CONTINUATION frames of 4 KiB, the body in DATA frames of 16 KiB.
    parts = [block[i:i + 4096] for i in range(0, len(block), 4096)] or [b""]
    client += _h2frame(1, 0 if len(parts) > 1 else 4, 1, parts[0])
    for j, p in enumerate(parts[1:], 1):
        client += _h2frame(9, 4 if j == len(parts) - 1 else 0, 1, p)
    datas = [body[i:i + 16384] for i in range(0, len(body), 16384)] or [b""]
    for j, d in enumerate(datas):
        client += _h2frame(0, 1 if j == len(datas) - 1 else 0, 1, d)
    server = _h2frame(4, 0, 0) + _h2frame(4, 1, 0)
    server += _h2frame(1, 4, 1, enc_s.encode([(":status", "200"), ("content-type", "text/plain")]))
    server += _h2frame(0, 0, 1, body[:16384]) + _h2frame(0, 1, 1, b"")
    return Exchange(8080, [(True, client), (False, server)], 1)


# -- PostgreSQL ------------------------------------------------------------------------------
def h2c_upgrade(path: str = "/h2") -> list[tuple[bool, bytes]]:
    """An HTTP/1.1 ``Upgrade: h2c`` request, the 101, then h2's own client and server bytes (the
    preface and SETTINGS; the server's 200 on stream 1, the upgraded request's answer)."""
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings_header = client.initiate_upgrade_connection()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_upgrade_connection(settings_header)
    client_bytes = client.data_to_send()
    server_bytes = server.data_to_send()
    server.send_headers(1, [(":status", "200"), ("content-length", "0")], end_stream=True)
    server_bytes += server.data_to_send()
    up = (f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
          "HTTP2-Settings: ").encode() + settings_header + b"\r\n\r\n"
    return [(True, up), (False, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"),
            (True, client_bytes), (False, server_bytes)]


def _pg_msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack(">i", len(body) + 4) + body


def _sql_in_list(size: int) -> bytes:
    n = max(1, size // 8)
    return b"SELECT id, name FROM orders WHERE id IN (" + b",".join(b"%d" % (100000 + i) for i in range(n)) + b")"


def _postgresql(size: int) -> Exchange:
    body = struct.pack(">i", 196608) + b"user\0alice\0database\0shop\0\0"
    startup = struct.pack(">i", len(body) + 4) + body
    ready = _pg_msg(b"Z", b"I")
    auth = _pg_msg(b"R", struct.pack(">i", 0)) + _pg_msg(b"S", b"server_version\x0016.1\0") + ready
    q = _pg_msg(b"Q", _sql_in_list(size) + b"\0")
    rowdesc = _pg_msg(b"T", struct.pack(">h", 1) + b"id\0" + struct.pack(">ihihih", 0, 0, 23, 4, -1, 0))
    rows = b"".join(_pg_msg(b"D", struct.pack(">hi", 1, 6) + b"%06d" % i) for i in range(max(1, size // 64)))
    result = rowdesc + rows + _pg_msg(b"C", b"SELECT 1\0") + ready
    return Exchange(5432, [(True, startup), (False, auth), (True, q), (False, result)], 1)


# -- MySQL -----------------------------------------------------------------------------------
def _my_pkt(payload: bytes, seq: int) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload


def _mysql(size: int) -> Exchange:
    caps = 0x000FA685 | 0x01000000  # protocol 41, secure connection, plugin auth, deprecate EOF, ...
    greet = (b"\x0a" + b"8.0.36\0" + struct.pack("<I", 7) + b"abcdefgh\0" + struct.pack("<H", caps & 0xFFFF)
             + b"\x2d" + struct.pack("<H", 2) + struct.pack("<H", caps >> 16) + b"\x15" + b"\0" * 10
             + b"ijklmnopqrst\0" + b"mysql_native_password\0")
    login_caps = 0x00000200 | 0x00008000 | 0x00080000 | 0x01000000 | 0x00000008  # 41, secure, plugin, EOF, db
    login = (struct.pack("<IIB", login_caps, 1 << 24, 45) + b"\0" * 23 + b"app\0" + b"\x14" + b"x" * 20
             + b"shop\0" + b"mysql_native_password\0")
    ok = b"\x00\x00\x00" + struct.pack("<HH", 2, 0)
    q = b"\x03" + _sql_in_list(size)
    # A payload of 16 MiB - 1 or more would be split; the sizes used here are far below it.
    steps = [(False, _my_pkt(greet, 0)), (True, _my_pkt(login, 1)), (False, _my_pkt(ok, 2)),
             (True, _my_pkt(q, 0)), (False, _my_pkt(ok, 1))]
    return Exchange(3306, steps, 1)


# -- MongoDB ---------------------------------------------------------------------------------
def _mongodb(size: int) -> Exchange:
    import bson

    doc = {"insert": "orders", "$db": "shop",
           "documents": [{"_id": i, "note": "n" * 40} for i in range(max(1, size // 64))]}
    body = struct.pack("<I", 0) + b"\0" + bson.encode(doc)
    req = struct.pack("<iiii", 16 + len(body), 7, 0, 2013) + body
    rbody = struct.pack("<I", 0) + b"\0" + bson.encode({"n": 1, "ok": 1.0})
    resp = struct.pack("<iiii", 16 + len(rbody), 8, 7, 2013) + rbody
    return Exchange(27017, [(True, req), (False, resp)], 1)


# -- MQTT ------------------------------------------------------------------------------------
def mqtt_vbi(n: int) -> bytes:
    """MQTT's variable byte integer (the tests', the fuzz seeds' and the benchmark's one writer)."""
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_pkt(b0: int, body: bytes) -> bytes:
    return bytes([b0]) + mqtt_vbi(len(body)) + body


def _mqtt_str(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _mqtt(size: int) -> Exchange:
    connect = _mqtt_pkt(0x10, _mqtt_str(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 60) + _mqtt_str(b"dev-1"))
    connack = _mqtt_pkt(0x20, b"\x00\x00")
    pub = _mqtt_pkt(0x32, _mqtt_str(b"sensors/" + b"t" * 100) + struct.pack(">H", 1) + b"p" * size)
    puback = _mqtt_pkt(0x40, struct.pack(">H", 1))
    return Exchange(1883, [(True, connect), (False, connack), (True, pub), (False, puback)], 1)  # CONNECT: no span


# -- FastCGI ---------------------------------------------------------------------------------
def _fcgi_rec(t: int, rid: int, content: bytes = b"") -> bytes:
    return struct.pack(">BBHHBB", 1, t, rid, len(content), 0, 0) + content


def _fcgi_nv(n: bytes, v: bytes) -> bytes:
    def enc(x: int) -> bytes:
        return bytes([x]) if x < 128 else struct.pack(">I", x | 0x80000000)

    return enc(len(n)) + enc(len(v)) + n + v


def _fastcgi(size: int) -> Exchange:
    pairs = {b"REQUEST_METHOD": b"POST", b"REQUEST_URI": b"/shop/item.php?id=7", b"QUERY_STRING": b"id=7",
             b"SCRIPT_NAME": b"/shop/item.php", b"SERVER_PROTOCOL": b"HTTP/1.1", b"HTTP_HOST": b"example",
             b"CONTENT_LENGTH": b"%d" % size}
    stream = b"".join(_fcgi_nv(k, v) for k, v in pairs.items())
    stream += b"".join(_fcgi_nv(b"HTTP_X_FIELD_%d" % i, b"v" * 48) for i in range(max(1, size // 256)))
    req = _fcgi_rec(1, 1, struct.pack(">HB5x", 1, 0))
    req += b"".join(_fcgi_rec(4, 1, stream[i:i + 60000]) for i in range(0, len(stream), 60000)) + _fcgi_rec(4, 1)
    stdin = b"i" * size
    req += b"".join(_fcgi_rec(5, 1, stdin[i:i + 60000]) for i in range(0, len(stdin), 60000)) + _fcgi_rec(5, 1)
    out = b"Status: 200 OK\r\nContent-Type: text/html\r\n\r\n" + b"o" * size
    resp = b"".join(_fcgi_rec(6, 1, out[i:i + 60000]) for i in range(0, len(out), 60000)) + _fcgi_rec(6, 1)
    resp += _fcgi_rec(3, 1, struct.pack(">IB3x", 0, 0))
    return Exchange(9000, [(True, req), (False, resp)], 1)


# -- memcached (binary and text) ---------------------------------------------------------------
def _memcached(size: int) -> Exchange:
    hdr = struct.Struct(">BBHBBHIIQ")
    key, extras, value = b"user:1", struct.pack(">II", 0, 0), b"x" * size
    set_req = hdr.pack(0x80, 0x01, len(key), 8, 0, 0, 8 + len(key) + len(value), 1, 0) + extras + key + value
    set_res = hdr.pack(0x81, 0x01, 0, 0, 0, 0, 0, 1, 0)
    return Exchange(11211, [(True, set_req), (False, set_res)], 1)


def _memcached_text(size: int) -> Exchange:
    keys = b" ".join(b"key:%06d" % i for i in range(max(1, min(size // 2, 7000) // 11)))
    value = b"x" * max(1, size // 2)
    steps = [(True, b"set big 0 0 %d\r\n%s\r\n" % (len(value), value)), (False, b"STORED\r\n"),
             (True, b"get " + keys + b"\r\n"), (False, b"VALUE key:000000 0 1\r\nz\r\nEND\r\n")]
    return Exchange(11211, steps, 2)


# -- Redis -----------------------------------------------------------------------------------
def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _redis(size: int) -> Exchange:
    value = b"v" * max(1, size // 2)
    keys = [b"key:%06d" % i for i in range(max(1, size // 2 // 16))]
    steps = [(True, _resp(b"SET", b"big", value)), (False, b"+OK\r\n"),
             (True, _resp(b"MGET", *keys)),
             (False, b"*%d\r\n" % len(keys) + b"$-1\r\n" * len(keys))]
    return Exchange(6379, steps, 2)


def _redis_pipeline(size: int) -> Exchange:
    n = max(1, size // 32)
    cmds = b"".join(_resp(b"INCR", b"counter:%06d" % i) for i in range(n))
    replies = b"".join(b":%d\r\n" % i for i in range(n))
    return Exchange(6379, [(True, cmds), (False, replies)], n, {0: n})


# -- Kafka -----------------------------------------------------------------------------------
def _kafka(size: int) -> Exchange:
    from tests.support import kafka_wire as kw

    recs = kw.records(n=max(1, size // 1024), value=b"r" * 1000)
    req = kw.produce_request(9, {"orders": {0: recs}}, corr=5)
    resp = kw.produce_response(9, {"orders": [(0, 0, 42)]}, corr=5)
    return Exchange(9092, [(True, req), (False, resp)], 1)


# -- NATS ------------------------------------------------------------------------------------
def _nats(size: int) -> Exchange:
    # docs.nats.io "Client Protocol": the server's INFO, the client's CONNECT, a SUB, an HPUB with
    # a header block the parser reads (traceparent) and a payload it skips, its delivery (HMSG).
    info = b'INFO {"server_id":"NDX","version":"2.9.10","proto":1,"headers":true,"max_payload":1048576}\r\n'
    connect = b'CONNECT {"verbose":false,"pedantic":false,"lang":"python3","version":"2.6.0","protocol":1,' \
              b'"headers":true,"name":"orders-svc"}\r\nPING\r\n'
    hdrs = (b"NATS/1.0\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
            + b"".join(b"X-Field-%04d: %s\r\n" % (i, b"v" * 40) for i in range(max(1, min(size // 4, 8000) // 56)))
            + b"\r\n")
    body = b"p" * size
    hpub = b"HPUB orders.created %d %d\r\n%s%s\r\n" % (len(hdrs), len(hdrs) + len(body), hdrs, body)
    hmsg = b"HMSG orders.created 1 %d %d\r\n%s%s\r\n" % (len(hdrs), len(hdrs) + len(body), hdrs, body)
    steps = [(False, info), (True, connect), (False, b"PONG\r\n"), (True, b"SUB orders.* 1\r\n" + hpub),
             (False, hmsg)]
    return Exchange(4222, steps, 3, {3: 2, 4: 1})


# -- AMQP 0-9-1 ------------------------------------------------------------------------------
def _amqp(size: int) -> Exchange:
    # pika's encoder: the handshake, a publish whose headers table the parser reads (it grows)
    # and whose body it skips (in frames of 4 KiB), its delivery, the client's ack.
    from pika import spec

    from tests.support import amqp_wire as w

    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    headers.update({f"x-field-{i:04d}": "v" * 40 for i in range(max(1, min(size // 4, 30000) // 56))})
    props = spec.BasicProperties(message_id="m-1", headers=headers)
    body = b"b" * size
    c, s = w.handshake_client(), w.handshake_server()
    pub = w.method(1, spec.Basic.Publish(exchange="orders", routing_key="order.created")) + w.content(
        1, body, props, 4096)
    deliver = w.method(1, spec.Basic.Deliver("ctag", 1, False, "orders", "order.created")) + w.content(
        1, body, props, 4096)
    steps = [(True, c[0]), (False, s[0]), (True, c[1] + c[2]), (False, s[1]), (True, pub), (False, deliver),
             (True, w.method(1, spec.Basic.Ack(1)))]
    return Exchange(5672, steps, 3, {4: 1, 5: 1, 6: 1})


# -- DNS over TCP -----------------------------------------------------------------------------
def _dns_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def _dns_msg(mid: int, flags: int, qname: str, qtype: int, answers: list[tuple[int, bytes]]) -> bytes:
    # RFC 1035 §4.1: header, one question, answers whose names point at the question's (0xC00C).
    rrs = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", t, 1, 60, len(rd)) + rd for t, rd in answers)
    return (struct.pack("!6H", mid, flags, 1, len(answers), 0, 0) + _dns_name(qname)
            + struct.pack("!HH", qtype, 1) + rrs)


def _dns(size: int) -> Exchange:
    # RFC 7766: two pipelined queries on one connection, each after its 2-byte length, answered
    # out of order; the second's TXT answer grows (strings of 255 bytes, stepped over), capped
    # under the 64 KiB a DNS message can be.
    q1 = _dns_msg(0x1111, 0x0100, "www.example.com", 1, [])
    q2 = _dns_msg(0x2222, 0x0100, "big.example.com", 16, [])
    n = max(1, min(size, 60_000))
    txt = b"".join(bytes([len(c)]) + c for c in (b"t" * min(255, n - i) for i in range(0, n, 255)))
    r2 = _dns_msg(0x2222, 0x8180, "big.example.com", 16, [(16, txt)])
    r1 = _dns_msg(0x1111, 0x8180, "www.example.com", 1, [(1, bytes([10, 0, 0, 1])), (1, bytes([10, 0, 0, 2]))])

    def framed(m: bytes) -> bytes:
        return struct.pack("!H", len(m)) + m

    return Exchange(53, [(True, framed(q1) + framed(q2)), (False, framed(r2) + framed(r1))], 2, {0: 2})


# -- AMQP 1.0 -----------------------------------------------------------------------------------
def _amqp10(size: int) -> Exchange:
    # python-qpid-proton's codec: SASL, open, begin, a sender and a receiver link, a transfer whose
    # application properties the parser reads (they grow, within its 64 KiB look) and whose body
    # it skips (in frames of 16 KiB), its disposition, the delivery back and the client's accept.
    from tests.support import amqp10_wire as w

    props = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    props.update({f"x-field-{i:04d}": "v" * 40 for i in range(max(1, min(size // 4, 30000) // 56))})
    m = w.message(b"b" * size, id="m-1", properties=props)
    steps = [(True, w.SASL_HEADER), (False, w.SASL_HEADER + w.sasl_mechanisms()), (True, w.sasl_init()),
             (False, w.sasl_outcome(0)),
             (True, w.HEADER + w.open_("orders-svc") + w.begin(0) + w.attach(0, "p", 0, False, target="/queue/q")
              + w.attach(0, "s", 1, True, source="/queue/q") + w.flow(0, 1, 10)),
             (False, w.HEADER + w.open_("rabbit", "RabbitMQ") + w.begin(1, remote=0)
              + w.attach(1, "p", 0, True, target="/queue/q") + w.flow(1, 0, 10)
              + w.attach(1, "s", 1, False, source="/queue/q")),
             (True, w.transfer(0, 0, 0, b"t0", m, frame_max=16384)),
             (False, w.disposition(1, True, 0) + w.transfer(1, 1, 0, b"d0", m, frame_max=16384)),
             (True, w.disposition(0, True, 0))]
    return Exchange(5672, steps, 2, {6: 1, 7: 1})


#: protocol name (as in processors/protocols/__init__.PROTOCOLS) -> exchanges of any size.
EXCHANGES: dict[str, list[Callable[[int], Exchange]]] = {
    "http": [_http, _http_genai],
    "http2": [_http2],
    "postgresql": [_postgresql],
    "mysql": [_mysql],
    "mongodb": [_mongodb],
    "mqtt": [_mqtt],
    "fastcgi": [_fastcgi],
    "memcached": [_memcached, _memcached_text],
    "redis": [_redis, _redis_pipeline],
    "kafka": [_kafka],
    "nats": [_nats],
    "dns": [_dns],
    "amqp": [_amqp, _amqp10],
}
