"""HTTP/1 request+response parsing: wirespan's http1 session vs httptools (C) and h11.

Run: ``python -m bench.bench_http1`` (or ``python bench/bench_http1.py``).

Each contender parses the same messages, recorded from real clients and
servers (tests/fixtures/http1) plus the replay benchmark's small GET exchange:
- wirespan: one keep-alive ``http1.Session`` fed as the protocols stage feeds it:
  each message through ``feed_whole`` (no buffering) when it is whole, else appended
  to the connection's buffer and ``feed``. This *includes*
  building the span (attributes, ids, trace context), which the peers don't do.
  Measured twice: with the C head parser (processors/protocols/_http1.c) and on the
  pure-Python path (the regexes; what ``WIRESPAN_PURE_PYTHON=1`` runs).
- httptools: one reused ``HttpRequestParser`` + ``HttpResponseParser`` with the
  callbacks a span needs (url, headers, status), values kept as bytes.
- h11: a fresh server ``Connection`` for the request and a fresh client one for the
  response (h11 only reads a response after it has sent the request, so the
  client side sends a prebuilt request first); events pulled to EndOfMessage.

Prints median µs per exchange (request + response) over repeats and the
ratios. Times are process CPU time (``time.process_time``): on a shared
machine that is far steadier than wall time, and every contender is
single-threaded. Goal (issue 4): no slower than httptools, >= 10x faster than h11.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from processors.protocols import http1
from processors.protocols.base import Conn

FIX = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "http1"
REPEATS = 7


def _split(stream: bytes, responses: bool) -> list[bytes]:
    """Cut a recorded request stream into messages with httptools' framing (a neutral referee)."""
    import httptools

    out: list[bytes] = []

    class P:
        def on_message_complete(self) -> None:
            out.append(b"")

    p = httptools.HttpResponseParser(P()) if responses else httptools.HttpRequestParser(P())
    # Feed byte by byte to learn the message boundaries.
    start = 0
    for i in range(len(stream)):
        n = len(out)
        p.feed_data(stream[i:i + 1])
        if len(out) > n:
            out[-1] = stream[start:i + 1]
            start = i + 1
    return out


def exchanges() -> list[tuple[str, bytes, bytes, bool]]:
    """(label, request, response, is_head) triples."""
    ex: list[tuple[str, bytes, bytes, bool]] = []
    for name in ("curl_nginx", "httpx_nginx"):
        reqs = _split((FIX / f"{name}.client.bin").read_bytes(), False)
        server = (FIX / f"{name}.server.bin").read_bytes()
        rs = _split_responses(server, [r.split(b" ", 1)[0] == b"HEAD" for r in reqs])
        for q, r in zip(reqs, rs, strict=True):
            if q.startswith(b"HEAD"):  # a peer parser would need telling that it has no body
                continue
            ex.append((f"{name}:{q.split(b' ', 2)[1][:20].decode()}", q, r, False))
    small_req = (b"GET /api/v1/users/7 HTTP/1.1\r\nHost: shop.internal:8080\r\nUser-Agent: curl/8.5.0\r\n"
                 b"Accept: application/json\r\n"
                 b"traceparent: 00-0000000000000001000000000000000f-0000000000000010-01\r\n\r\n")
    body = b'{"id": 7, "conn": 1, "ok": true}'
    small_resp = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0\r\nDate: Tue, 24 Nov 2026 20:00:00 GMT\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
                  % len(body)) + body
    ex.append(("replay-bench small GET", small_req, small_resp, False))
    return ex


def _split_responses(stream: bytes, heads: list[bool]) -> list[bytes]:
    """Responses from a stream (HEAD responses end at their head)."""
    import httptools

    out: list[bytes] = []
    done = [False]

    class P:
        def on_headers_complete(self) -> None:
            return None

        def on_message_complete(self) -> None:
            done[0] = True

    start = 0
    i = 0
    for is_head in heads:
        if is_head:
            end = stream.index(b"\r\n\r\n", start) + 4
            out.append(stream[start:end])
            start = i = end
            continue
        p = httptools.HttpResponseParser(P())
        done[0] = False
        while not done[0]:
            p.feed_data(stream[i:i + 1])
            i += 1
        out.append(stream[start:i])
        start = i
    return out


def _with_c(use_c: bool):
    """Switch http1's C head parser on or off for one measurement (module globals read per call)."""
    c = http1._C
    http1._C_REQUEST = c.parse_request if use_c and c is not None else None
    http1._C_RESPONSE = c.parse_response if use_c and c is not None else None
    http1._C_CHUNKED = c.chunked_body if use_c and c is not None else None


def bench_wirespan(msgs: list[tuple[bytes, bytes]], rounds: int) -> float:
    spans: list = []
    conn = Conn("b", "10.0.0.1", 40000, "10.0.0.2", 8080, spans.append, protocol="http")
    s = http1.Session(conn)
    cb, sb = conn.client_buf, conn.server_buf
    feed, whole = s.feed, s.feed_whole
    views = [(memoryview(q), memoryview(r)) for q, r in msgs]
    t0 = time.process_time()
    for _ in range(rounds):
        for q, r in views:
            # What the protocols stage does with a segment: the buffer-less path when the
            # direction's buffer is empty and the segment is whole messages, else buffer it.
            if len(cb) or not whole(True, q, 1):
                cb.append(q, 1)
                feed(True, cb, 1)
            if len(sb) or not whole(False, r, 2):
                sb.append(r, 2)
                feed(False, sb, 2)
        spans.clear()
    return time.process_time() - t0


def bench_wirespan_no_span(msgs: list[tuple[bytes, bytes]], rounds: int) -> float:
    """The same session with span building replaced by a no-op: the parse alone."""
    orig = http1.Http1Session._span
    http1.Http1Session._span = lambda self, *a: None  # type: ignore[method-assign]
    try:
        return bench_wirespan(msgs, rounds)
    finally:
        http1.Http1Session._span = orig  # type: ignore[method-assign]


def bench_httptools(msgs: list[tuple[bytes, bytes]], rounds: int) -> float:
    import httptools

    class Proto:
        __slots__ = ("done", "headers", "url")

        def __init__(self) -> None:
            self.url = b""
            self.headers: list[tuple[bytes, bytes]] = []
            self.done = 0

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_message_complete(self) -> None:
            self.done += 1
            self.headers = []

    pq, pr = Proto(), Proto()
    req_p = httptools.HttpRequestParser(pq)
    resp_p = httptools.HttpResponseParser(pr)
    t0 = time.process_time()
    for _ in range(rounds):
        for q, r in msgs:
            req_p.feed_data(q)
            req_p.get_method()
            resp_p.feed_data(r)
            resp_p.get_status_code()
    return time.process_time() - t0


def bench_h11(msgs: list[tuple[bytes, bytes]], rounds: int) -> float:
    import h11

    req_ev = h11.Request(method="GET", target="/", headers=[("Host", "x")])
    eom = h11.EndOfMessage()
    t0 = time.process_time()
    for _ in range(rounds):
        for q, r in msgs:
            srv = h11.Connection(h11.SERVER)
            srv.receive_data(q)
            while type(srv.next_event()) is not h11.EndOfMessage:
                pass
            cli = h11.Connection(h11.CLIENT)
            cli.send(req_ev)
            cli.send(eom)
            cli.receive_data(r)
            while type(cli.next_event()) is not h11.EndOfMessage:
                pass
    return time.process_time() - t0


def _median_us(fn, msgs: list[tuple[bytes, bytes]], rounds: int, use_c: bool = True) -> float:
    _with_c(use_c)
    try:
        fn(msgs, max(1, rounds // 10))  # warm up
        times = [fn(msgs, rounds) for _ in range(REPEATS)]
    finally:
        _with_c(True)
    return statistics.median(times) / (rounds * len(msgs)) * 1e6


def main() -> None:
    ex = exchanges()
    sets = {"all recorded + small GET": [(q, r) for _, q, r, _ in ex]}
    sets["small GET only (replay bench)"] = [(ex[-1][1], ex[-1][2])]
    if http1._C is None:
        print("NOTE: the C head parser is not in use (WIRESPAN_PURE_PYTHON=1 or not built): "
              "the 'C' columns show the pure-Python path too")
    print(f"{'message set':<31} {'C span':>8} {'C parse':>8} {'py span':>8} {'py parse':>8} {'httptools':>9} "
          f"{'h11':>8} | {'C/httptools':>11} {'C parse/ht':>10} {'h11/C':>6} {'py/C':>5}")
    for label, msgs in sets.items():
        rounds = 20000 // len(msgs)
        w = _median_us(bench_wirespan, msgs, rounds)
        wp = _median_us(bench_wirespan_no_span, msgs, rounds)
        pw = _median_us(bench_wirespan, msgs, rounds, use_c=False)
        pwp = _median_us(bench_wirespan_no_span, msgs, rounds, use_c=False)
        h = _median_us(bench_httptools, msgs, rounds)
        e = _median_us(bench_h11, msgs, max(1, rounds // 10))
        print(f"{label:<31} {w:>6.2f}us {wp:>6.2f}us {pw:>6.2f}us {pwp:>6.2f}us {h:>7.2f}us {e:>6.2f}us | "
              f"{w / h:>10.2f}x {wp / h:>9.2f}x {e / w:>5.1f}x {pw / w:>4.1f}x")
    print(f"(median µs per request+response exchange over {REPEATS} repeats of CPU time; 'span' includes "
          "building the span, 'parse' stubs that out; C = with _http1.c, py = the pure-Python path)")
    for label, q, r, _ in ex:
        print(f"  message: {label:<40} request {len(q):>5} B, response {len(r):>6} B")


if __name__ == "__main__":
    main()
