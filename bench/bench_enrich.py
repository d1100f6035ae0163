"""The HTTP enrichers' cost (processors/protocols/enrich/): plain HTTP with them on vs off,
and what an enriched exchange costs.

Run: ``python -m bench enrich``.

1. Plain HTTP, A/B in the same run: bench_http1's message sets (recorded clients and
   servers, the small GET of the replay bench) through one keep-alive ``http1.Session``
   fed as the stage feeds it, with ``conn.enrich`` None (off) and the default
   ``Enricher`` (on, as every HTTP connection gets it), alternating off/on per repeat.
   Plain requests are not selected: the cost on is the inline pre-test (three string
   tests a request). Medians of process CPU time, µs per exchange, and on/off.
   When valgrind is installed, the same loop also runs under callgrind (off and on, each at
   0 and N rounds, so interpreter start-up cancels out): instructions per exchange, which
   no other session's load on the machine changes.
2. Enriched exchanges: an OpenAI chat completion (1 KB request, gzip response), the same
   streamed (40 SSE events, chunked), a GraphQL query, an Elasticsearch search: µs per
   exchange with the enrichers on, beside the same bytes with them off (a plain span).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_http1 import exchanges
from processors.protocols import http1
from processors.protocols.base import Conn
from processors.protocols.enrich import Enricher

REPEATS = 15


def _run(msgs: list[tuple[bytes, bytes]], rounds: int, enricher: Enricher | None) -> float:
    spans: list = []
    conn = Conn("b", "10.0.0.1", 40000, "10.0.0.2", 8080, spans.append, protocol="http")
    conn.enrich = enricher
    s = http1.Session(conn)
    cb, sb = conn.client_buf, conn.server_buf
    feed, whole = s.feed, s.feed_whole
    views = [(memoryview(q), memoryview(r)) for q, r in msgs]
    t0 = time.process_time()
    for _ in range(rounds):
        for q, r in views:
            if len(cb) or not whole(True, q, 1):
                cb.append(q, 1)
                feed(True, cb, 1)
            if len(sb) or not whole(False, r, 2):
                sb.append(r, 2)
                feed(False, sb, 2)
        spans.clear()
    return time.process_time() - t0


def ab(msgs: list[tuple[bytes, bytes]], rounds: int, enricher: Enricher) -> tuple[float, float, float]:
    """(off, on) medians in µs per exchange, measured alternately, and the median of the
    per-pair on/off ratios (steadier than the ratio of medians on a busy machine)."""
    _run(msgs, max(1, rounds // 10), None)
    _run(msgs, max(1, rounds // 10), enricher)
    off, on = [], []
    for _ in range(REPEATS):
        off.append(_run(msgs, rounds, None))
        on.append(_run(msgs, rounds, enricher))
    k = 1e6 / (rounds * len(msgs))
    ratio = statistics.median(b / a for a, b in zip(off, on, strict=True))
    return statistics.median(off) * k, statistics.median(on) * k, ratio


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: api.example\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n"
            % (path.encode(), extra, len(body))) + body


def enriched_sets() -> dict[str, list[tuple[bytes, bytes]]]:
    msgs = [{"role": "user", "content": "Summarise the following text in one line: " + "lorem ipsum " * 70}]
    chat = json.dumps({"model": "gpt-4o", "messages": msgs, "temperature": 0.2}).encode()
    answer = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "A summary."},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 180, "completion_tokens": 4, "total_tokens": 184}}).encode()
    gz = gzip.compress(answer)
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(gz)) + gz
    ev = b"".join(b"data: %s\n\n" % json.dumps({"id": "c", "model": "gpt-4o", "choices": [
        {"index": 0, "delta": {"content": "tok"}, "finish_reason": None}]}).encode() for _ in range(40))
    ev += b"data: [DONE]\n\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(ev[i:i + 300]), ev[i:i + 300]) for i in range(0, len(ev), 300))
    stream = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
              + chunks + b"0\r\n\r\n")
    gql = json.dumps({"query": "query Book($id: ID!) { book(id: $id) { title author { name } } }",
                      "operationName": "Book", "variables": {"id": "1"}}).encode()
    gresp = b'{"data": {"book": {"title": "Dune", "author": {"name": "Herbert"}}}}'
    es_resp = (b"HTTP/1.1 200 OK\r\nX-Elastic-Product: Elasticsearch\r\nContent-Type: application/json\r\n"
               b"Content-Length: 40\r\n\r\n" + b'{"took": 1, "hits": {"hits": []}}'.ljust(40))
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return {
        "openai chat (1 KB, gzip answer)": [(_post("/v1/chat/completions", chat), resp)],
        "openai chat streamed (40 events)": [(_post("/v1/chat/completions", chat[:-1] + b', "stream": true}'),
                                              stream)],
        "graphql query": [(_post("/graphql", gql), ok % len(gresp) + gresp)],
        "elasticsearch search": [(_post("/books/_search", b'{"query": {"match_all": {}}}',
                                        b"User-Agent: elasticsearch-py/9.1.0\r\n"), es_resp)],
    }


_CHILD = r'''
import sys
sys.path.insert(0, sys.argv[3])
from bench.bench_http1 import exchanges
from processors.protocols import http1
from processors.protocols.base import Conn
from processors.protocols.enrich import Enricher
mode, n = sys.argv[1], int(sys.argv[2])
msgs = [(memoryview(q), memoryview(r)) for _, q, r, _ in exchanges()]
conn = Conn("b", "10.0.0.1", 40000, "10.0.0.2", 8080, lambda s: None, protocol="http")
conn.enrich = Enricher() if mode == "on" else None
w = http1.Session(conn).feed_whole
for _ in range(n):
    for q, r in msgs:
        w(True, q, 1)
        w(False, r, 2)
'''


def instructions(rounds: int = 1500) -> tuple[float, float] | None:
    """(off, on) instructions per plain exchange under callgrind, or None without valgrind."""
    vg = shutil.which("valgrind")
    if vg is None:
        return None
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    n_msgs = len(exchanges())
    got: dict[tuple[str, int], int] = {}
    with tempfile.TemporaryDirectory() as d:
        for mode in ("off", "on"):
            for n in (0, rounds):
                out = os.path.join(d, f"cg.{mode}.{n}")
                subprocess.run([vg, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", _CHILD,
                                mode, str(n), root], check=True, capture_output=True, timeout=900)
                with open(out) as f:
                    m = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
                got[(mode, n)] = int(m.group(1)) if m else 0
    per = rounds * n_msgs
    return ((got[("off", rounds)] - got[("off", 0)]) / per, (got[("on", rounds)] - got[("on", 0)]) / per)


def main() -> None:
    en = Enricher()
    ex = exchanges()
    plain = {"all recorded + small GET": [(q, r) for _, q, r, _ in ex],
             "small GET only (replay bench)": [(ex[-1][1], ex[-1][2])]}
    print(f"{'plain HTTP/1 (not selected)':<36} {'off':>8} {'on':>8} {'on/off':>7} {'pairs':>7}")
    for label, msgs in plain.items():
        off, on, ratio = ab(msgs, 20000 // len(msgs), en)
        print(f"{label:<36} {off:>6.2f}us {on:>6.2f}us {on / off:>6.3f}x {ratio:>6.3f}x")
    ins = instructions()
    if ins is None:
        print("(valgrind not installed: no instruction counts)")
    else:
        print(f"{'instructions per exchange (callgrind)':<36} {ins[0]:>8.0f} {ins[1]:>8.0f} {ins[1] / ins[0]:>6.3f}x")
    print(f"\n{'enriched exchange':<36} {'plain span':>10} {'enriched':>9} {'extra':>8}")
    for label, msgs in enriched_sets().items():
        off, on, _r = ab(msgs, 2000, en)
        print(f"{label:<36} {off:>8.2f}us {on:>7.2f}us {on - off:>6.2f}us")
    print(f"(medians of {REPEATS} alternating repeats of process CPU time, µs per request+response exchange; "
          "off = no enricher on the connection, on = the default enrichers; pairs = median of the "
          "per-repeat on/off ratios)")


if __name__ == "__main__":
    main()
