"""Soak: replay a capture in a loop into a local OTLP/gRPC endpoint; RSS must stay flat.

Run: ``python -m bench.soak_export [--minutes 10] [--interval 10]``. The real runtime
runs pcap (``loop: true``) -> protocols -> batch -> otlp (gzip, in-memory queue) into
a grpcio endpoint in another process (the small-HTTP-exchange capture of
bench/gen_http_capture.py, 20 connections x 500 GETs). Every ``interval`` seconds it
prints this process's RSS and the spans sent/received so far; at the end, the RSS
spread after the first minute of warm-up (must be within 10 %) and the drop counters
(must be zero: a looping capture is a finite producer, so a full queue waits).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_export import _pin, _sink_proc

WARMUP_S = 60.0
# What is in flight bounds how far RSS swings between samples: a batch being encoded holds
# its spans and their bytes at once (~1.8 KB a span), so 8192-span batches and a 20k-span
# queue swung single samples by ~15 % around a flat median. 2048-span batches and a queue
# of four of them keep the swing small; throughput is the same (batches above ~512 spans
# cost no more per span, `python -m bench export`).
BATCH_SPANS = 2048
QUEUE_SPANS = 4 * BATCH_SPANS
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE / (1 << 20)


def rss_parts_mib() -> tuple[float, float]:
    """(RssAnon, RssFile) in MiB: heap vs file pages mapped (the replayed capture is mmap'ed)."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                k, v = line.split(":")
                got[k] = int(v.split()[0]) / 1024
    return got.get("RssAnon", 0.0), got.get("RssFile", 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=10.0)
    args = ap.parse_args(argv)
    _pin(0)
    from bench.gen_http_capture import generate
    from service import config as c
    from service import telemetry as tm
    from service.pipeline import Service

    ctx = mp.get_context("spawn")
    port_q, stop_ev, counter = ctx.Queue(), ctx.Event(), ctx.Value("q", 0)
    proc = ctx.Process(target=_sink_proc, args=(port_q, stop_ev, counter), daemon=True)
    proc.start()
    d = tempfile.mkdtemp()
    cap = os.path.join(d, "http.pcap")
    generate(cap, connections=20, requests=500)
    endpoint = f"127.0.0.1:{port_q.get(timeout=30)}"
    raw = {
        "receivers": {"pcap": {"path": cap, "loop": True}},
        "processors": {"protocols": {}, "batch": {"timeout": "200ms", "send_batch_size": BATCH_SPANS,
                                                    "send_batch_max_size": BATCH_SPANS}},
        # A queue of ~2 batches: the replay is a finite producer, so it waits rather than drops, and
        # RSS is not dominated by how full a 100k-span queue happens to be at each sample.
        "exporters": {"otlp": {"endpoint": endpoint, "tls": {"insecure": True},
                               "sending_queue": {"queue_size": QUEUE_SPANS}}},
        "service": {"pipelines": {"traces": {"receivers": ["pcap"], "processors": ["protocols", "batch"],
                                             "exporters": ["otlp"]}},
                    "telemetry": {"metrics": {"address": ""}, "health": {"address": ""}}},
    }
    svc = Service(c.validate(raw))
    t0 = time.monotonic()
    svc.start()
    samples: list[tuple[float, float]] = []
    print(f"{'t(s)':>6} {'RSS MiB':>8} {'anon':>6} {'file':>6} {'sent':>10} {'received':>10} {'spans/s':>8}",
          flush=True)
    last_n, last_t = 0, t0
    try:
        while time.monotonic() - t0 < args.minutes * 60:
            time.sleep(args.interval)
            now = time.monotonic()
            r = rss_mib()
            sent = tm.REGISTRY.get_sample_value("wirespan_exporter_sent_spans_total", {"exporter": "otlp"}) or 0
            got = counter.value
            samples.append((now - t0, r))
            anon, fil = rss_parts_mib()
            rate = (got - last_n) / (now - last_t)
            print(f"{now - t0:6.0f} {r:8.1f} {anon:6.1f} {fil:6.1f} {sent:10.0f} {got:10d} {rate:8.0f}", flush=True)
            last_n, last_t = got, now
    finally:
        svc.shutdown()
        time.sleep(1)
        stop_ev.set()
        proc.join(10)
    after = [r for t, r in samples if t >= WARMUP_S] or [r for _, r in samples]
    lo, hi = min(after), max(after)
    spread = (hi - lo) / lo * 100
    k = max(1, int(60 / args.interval))
    first, last = sorted(after[:k])[len(after[:k]) // 2], sorted(after[-k:])[len(after[-k:]) // 2]
    drift = (last - first) / first * 100
    g = tm.REGISTRY.get_sample_value
    dropped = {
        "enqueue_failed": g("wirespan_exporter_enqueue_failed_spans_total", {"exporter": "otlp"}) or 0,
        "send_failed": sum(g("wirespan_exporter_send_failed_spans_total", {"exporter": "otlp", "reason": r}) or 0
                           for r in ("shutdown", "retries_exhausted", "UNAVAILABLE", "rejected", "internal")),
    }
    sent = g("wirespan_exporter_sent_spans_total", {"exporter": "otlp"}) or 0
    print(f"RSS after warm-up: {lo:.1f}..{hi:.1f} MiB (spread {spread:.1f} %, limit 10 %), "
          f"median of the first minute {first:.1f} -> of the last {last:.1f} MiB (drift {drift:+.1f} %); "
          f"sent {sent:.0f}, received {counter.value}, drops {dropped}")
    ok = spread <= 10.0 and not any(dropped.values()) and sent == counter.value
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
