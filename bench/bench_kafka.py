"""Kafka request parsing: our zero-copy walker vs kafka-python's protocol classes, same bytes.

Run: ``python -m bench kafka`` (or ``python bench/bench_kafka.py``). Prints the median
(of REPEATS runs of N parses) per request, and the ratio.

Each "ours" fast-path column is measured twice, side by side: "C" is
``flat.parse_request`` with the C accelerator (processors/protocols/kafka/_flat.c, what
a session runs when it is built), "py" is flat.py's own walk (``flat.parse_request_py``,
what ``WIRESPAN_PURE_PYTHON=1`` runs). They give identical results (asserted below, and
by tests/test_kafka_fast.py).

- ours (fast): ``processors.protocols.kafka.flat.parse_request`` on the framed request's
  view, what a session does when a request arrives whole: the header, then every topic
  and every partition, validated as strictly as the walkers (lengths in bounds, topic
  names matching Kafka's pattern, partition indexes >= 0, tagged fields), plus for
  Produce each partition's record count (from the v2 batch header) and the first
  record's ``traceparent`` header (searched for with one ``re`` search of the first
  record's bytes, then confirmed by walking that record's fields). What it does NOT do
  that kafka-python does: it builds no per-partition objects -- a Fetch topic's
  partition indexes and fetch offsets stay in the tuple one ``struct`` call unpacked
  (spans read them there), and record bytes are skipped, not copied.
  Topic names come from a bounded cache of validated names (clients repeat the same
  topics in every request, and here the same request is parsed again and again): C's
  own direct-mapped cache (1024 names), or flat.py's dict.
- ours (cold): the fast path with that name cache (and C's client-id cache) emptied
  before every call: each name is checked against the pattern and decoded, as for the
  first request on a topic.
- ours (streaming): ``session.parse_request`` -- the resumable walker used when a request
  arrives split or is large -- on a ``LargeBuffer`` of 1460-byte chunks (MSS-sized).
- ours (topics only): the fast path with ``max_records_scan_bytes=0``: header, topics and
  partitions, record data skipped -- the same work kafka-python does.
- peer "kp3": ``kafka.protocol.producer.ProduceRequest.decode`` / ``consumer.FetchRequest.decode``
  (kafka-python 3.x: decoders code-generated from Apache Kafka's message JSON) with
  ``header=True, framed=True``; it decodes header, topics and partitions into objects and
  keeps record data as bytes; it validates less (no name pattern, no sign checks).
- peer "kp-legacy": kafka-python's older Struct-schema classes (``kafka.protocol.old``,
  what kafka-python 2.x ships), for the versions they define (Produce <= v8, Fetch <= v11).

Workloads (bytes encoded by kafka-python itself, tests/support/kafka_wire.py):
  Produce v3 / v9 (flexible) / v13 (topic ids): 5 topics x 3 partitions, 10 records each
  Fetch v4 / v12 (flexible) / v13 (topic ids): 10 topics x 4 partitions
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kafka.protocol.consumer import FetchRequest
from kafka.protocol.old import fetch as old_fetch
from kafka.protocol.old import produce as old_produce
from kafka.protocol.producer import ProduceRequest

from processors.protocols.kafka import flat
from processors.protocols.kafka.session import parse_request
from service.largebuf import LargeBuffer
from tests.support.kafka_wire import TRACEPARENT, fetch_request, produce_request, records

REPEATS = 7
N = 1000


def _medians_us(fns: list[tuple[Any, int]]) -> list[float]:
    """Median µs per call of each (fn, n); the candidates take turns in each of REPEATS
    rounds, so load on this shared machine drifts over all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(REPEATS):
        for i, (fn, n) in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[i].append((time.perf_counter() - t0) / n * 1e6)
    return [statistics.median(t) for t in times]


def workloads() -> list[tuple[str, bytes, Any, int]]:
    ids = {f"topic-{i}": uuid.uuid5(uuid.NAMESPACE_DNS, f"topic-{i}").bytes for i in range(10)}
    batch = records(10, value=b"v" * 100, headers=[("traceparent", TRACEPARENT.encode())])
    out = []
    for v in (3, 9, 13):
        topics = {f"topic-{i}": {p: batch for p in range(3)} for i in range(5)}
        out.append((f"Produce v{v} (5 topics x 3 partitions x 10 records)",
                    produce_request(v, topics, corr=1, ids=ids), ProduceRequest, v))
    for v in (4, 12, 13):
        topics = {f"topic-{i}": [(p, 1000 * p) for p in range(4)] for i in range(10)}
        out.append((f"Fetch v{v} (10 topics x 4 partitions)", fetch_request(v, topics, corr=1, ids=ids),
                    FetchRequest, v))
    return out


def _legacy(cls: Any, version: int) -> Any:
    mod, base = (old_produce, "ProduceRequest") if cls is ProduceRequest else (old_fetch, "FetchRequest")
    return getattr(mod, f"{base}_v{version}", None)


def main() -> None:
    c = flat._C
    if c is None:
        print("note: the C accelerator is not in use (not built, or WIRESPAN_PURE_PYTHON=1): "
              "the C columns run flat.py too")
    print(f"{'request':50} {'bytes':>6} | {'C fast':>6} {'cold':>5} {'topics':>6} | {'py fast':>7} {'cold':>5} "
          f"{'topics':>6} | {'stream':>6} {'kp3':>6} {'legacy':>6} | kp3/C: {'fast':>5} {'cold':>5} {'topics':>6} "
          f"| kp3/py: {'fast':>5} {'topics':>6} | {'legacy/C':>8}")
    cols = ("C fast", "C cold", "C topics", "py fast", "py cold", "py topics", "stream")
    ratios: dict[str, list[float]] = {k: [] for k in cols}
    r_legacy: list[float] = []
    names = flat._NAMES
    clear_c = c.clear_caches if c is not None else (lambda: None)
    fast_c, fast_py = flat.parse_request, flat.parse_request_py

    def cold_c(v: memoryview) -> Any:
        clear_c()
        return fast_c(v, 1 << 20)

    def cold_py(v: memoryview) -> Any:
        names.clear()
        return fast_py(v, 1 << 20)

    for name, data, cls, version in workloads():
        mv = memoryview(data)
        chunked = LargeBuffer(*[mv[i:i + 1460] for i in range(0, len(mv), 1460)])
        m = fast_c(mv, 1 << 20)
        mp = fast_py(mv, 1 << 20)
        ms = parse_request(chunked)
        summary = [(t.key, t.partitions, t.offsets, t.records, t.traceparent) for t in m.topics]
        assert summary == [(t.key, t.partitions, t.offsets, t.records, t.traceparent) for t in mp.topics]
        assert summary == [(t.key, t.partitions, t.offsets, t.records, t.traceparent) for t in ms.topics]
        peer = cls.decode(data, version=version, header=True, framed=True)
        assert len(getattr(peer, "topic_data", None) or getattr(peer, "topics", [])) == len(m.topics)
        legacy = _legacy(cls, version)
        fns: list[tuple[Any, int]] = [
            (lambda v=mv: fast_c(v, 1 << 20), N),
            (lambda v=mv: cold_c(v), N),
            (lambda v=mv: fast_c(v, 0), N),
            (lambda v=mv: fast_py(v, 1 << 20), N // 2),
            (lambda v=mv: cold_py(v), N // 2),
            (lambda v=mv: fast_py(v, 0), N // 2),
            (lambda b=chunked: parse_request(b), N // 8),
            (lambda c=cls, d=data, v=version: c.decode(d, version=v, header=True, framed=True), N // 4),
        ]
        if legacy:
            fns.append((lambda c=legacy, d=data: c.decode(d, header=True, framed=True), N // 4))
        res = _medians_us(fns)
        ours, kp3, leg = res[:7], res[7], (res[8] if legacy else 0.0)
        for k, us in zip(cols, ours, strict=True):
            ratios[k].append(kp3 / us)
        if legacy:
            r_legacy.append(leg / ours[0])
        cf, cc, ct, pf, pc, pt, st = ours
        print(f"{name:50} {len(data):>6} | {cf:>6.1f} {cc:>5.1f} {ct:>6.1f} | {pf:>7.1f} {pc:>5.1f} {pt:>6.1f} | "
              f"{st:>6.1f} {kp3:>6.1f} {(f'{leg:.1f}' if legacy else '-'):>6} | "
              f"{'':7}{kp3 / cf:>4.1f}x {kp3 / cc:>4.1f}x {kp3 / ct:>5.1f}x | "
              f"{'':8}{kp3 / pf:>4.1f}x {kp3 / pt:>5.1f}x | {(f'{leg / cf:.1f}x' if legacy else '-'):>8}")
    med = statistics.median
    print("µs per request, medians; ratios = kafka-python 3.x (kp3) time / ours")
    print("median speed-up vs kafka-python 3.x: " + ", ".join(f"{k} {med(v):.1f}x" for k, v in ratios.items())
          + f"; vs kafka-python legacy classes: C fast {med(r_legacy):.1f}x")
    print("minimum speed-up vs kafka-python 3.x: " + ", ".join(f"{k} {min(v):.1f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
