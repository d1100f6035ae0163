"""Kafka request parsing: our zero-copy walker vs kafka-python's protocol classes, same bytes.

Run: ``python -m bench kafka`` (or ``python bench/bench_kafka.py``). Prints the median
(of REPEATS runs of N parses) per request, and the ratio.

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
  topics in every request, and here the same request is parsed again and again).
- ours (cold): the fast path with that name cache emptied before every call: each name
  is checked against the pattern and decoded, as for the first request on a topic.
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
    print(f"{'request':50} {'bytes':>6} {'fast':>7} {'cold':>7} {'topics':>7} {'stream':>7} {'kp3':>7} "
          f"{'legacy':>7}   {'kp3/fast':>8} {'kp3/cold':>8} {'kp3/topics':>10} {'legacy/fast':>11}"
          "   (µs per request, medians)")
    r_fast, r_cold, r_topics, r_legacy, r_stream = [], [], [], [], []
    names = flat._NAMES

    def cold(v: memoryview) -> Any:
        names.clear()
        return flat.parse_request(v, 1 << 20)

    for name, data, cls, version in workloads():
        mv = memoryview(data)
        chunked = LargeBuffer(*[mv[i:i + 1460] for i in range(0, len(mv), 1460)])
        m = flat.parse_request(mv, 1 << 20)
        ms = parse_request(chunked)
        assert [(t.key, t.partitions, t.records) for t in m.topics] == \
            [(t.key, t.partitions, t.records) for t in ms.topics]
        peer = cls.decode(data, version=version, header=True, framed=True)
        assert len(getattr(peer, "topic_data", None) or getattr(peer, "topics", [])) == len(m.topics)
        legacy = _legacy(cls, version)
        fns: list[tuple[Any, int]] = [
            (lambda v=mv: flat.parse_request(v, 1 << 20), N),
            (lambda v=mv: cold(v), N),
            (lambda v=mv: flat.parse_request(v, 0), N),
            (lambda b=chunked: parse_request(b), N // 4),
            (lambda c=cls, d=data, v=version: c.decode(d, version=v, header=True, framed=True), N // 4),
        ]
        if legacy:
            fns.append((lambda c=legacy, d=data: c.decode(d, header=True, framed=True), N // 4))
        fast, cold_us, topics, stream, kp3, *rest = _medians_us(fns)
        leg = rest[0] if rest else 0.0
        r_fast.append(kp3 / fast)
        r_cold.append(kp3 / cold_us)
        r_topics.append(kp3 / topics)
        r_stream.append(kp3 / stream)
        if legacy:
            r_legacy.append(leg / fast)
        print(f"{name:50} {len(data):>6} {fast:>7.1f} {cold_us:>7.1f} {topics:>7.1f} {stream:>7.1f} {kp3:>7.1f} "
              f"{(f'{leg:.1f}' if legacy else '-'):>7}   {kp3 / fast:>7.1f}x {kp3 / cold_us:>7.1f}x "
              f"{kp3 / topics:>9.1f}x "
              f"{(f'{leg / fast:.1f}x' if legacy else '-'):>11}")
    med = statistics.median
    print(f"median speed-up vs kafka-python 3.x: fast path {med(r_fast):.1f}x (with record counting and "
          f"traceparent; {med(r_cold):.1f}x with a cold name cache), topics only {med(r_topics):.1f}x, "
          f"streaming path {med(r_stream):.2f}x; "
          f"vs kafka-python legacy classes: {med(r_legacy):.1f}x")


if __name__ == "__main__":
    main()
