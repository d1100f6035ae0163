"""Export cost: encoding per span, throughput to a local OTLP/gRPC endpoint, queue storage.

Run: ``python -m bench.bench_export`` (or ``python bench/bench_export.py``). Measured in
the same run, medians of several repeats:

1. Encoding, µs per span, on 512-span batches of HTTP server spans (12 attributes):
   ``spans_to_otlp(...).SerializeToString()`` (the message path), ``spans_to_otlp_bytes``
   (the direct wire encoder the exporters use), and the opentelemetry-sdk's
   ``encode_spans(...).SerializeToString()`` on equivalent ``ReadableSpan``s.
2. Export throughput, spans/s, batches of 512 and 8192, to a real grpcio OTLP endpoint
   in a separate process pinned to the other core (this process is pinned to one core):
   our ``otlp`` exporter (gzip and none; encode + queue + send) vs the SDK's
   ``OTLPSpanExporter.export`` (encode + send) on the same spans.
3. Sending-queue storage, 512-span requests: the append-only segment log vs sqlite3
   (WAL, synchronous=NORMAL, one transaction per request), put and get+ack per second.
4. End to end on one core: the small-HTTP-exchange capture (bench/gen_http_capture.py,
   100 connections x 500 GETs = 50k spans) through the real runtime, pcap -> protocols ->
   batch -> otlp -> the endpoint, with gzip (the default) and without compression (what a
   node-local collector on loopback is usually sent): spans/s of wall time and of this
   process's CPU time; with the C accelerators (the default where they are built) and
   on the pure-Python paths, in the same run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import median_seconds

REPEATS = 5


def _pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu % os.cpu_count()})
    except (AttributeError, OSError):
        pass


def make_spans(n: int) -> list[Any]:
    from service.model import Resource, Span, SpanKind, StatusCode
    res = Resource({"service.name": "shop", "host.name": "node-1", "telemetry.sdk.name": "wirespan",
                    "telemetry.sdk.language": "python", "telemetry.sdk.version": "0.1.0"})
    t0 = 1_764_000_000_000_000_000
    out = []
    for i in range(n):
        out.append(Span("GET /api/v1/users/{id}", SpanKind.SERVER, t0 + i * 1000, t0 + i * 1000 + 350_000, {
            "http.request.method": "GET", "url.path": f"/api/v1/users/{i}", "url.scheme": "http",
            "server.address": "shop.internal", "server.port": 8080, "client.address": "10.1.0.7",
            "http.response.status_code": 200 if i % 10 else 500, "network.protocol.version": "1.1",
            "http.request.body.size": 0, "http.response.body.size": 42, "user_agent.original": "curl/8.5.0",
            "http.route": "/api/v1/users/{id}"}, resource=res,
            status_code=StatusCode.ERROR if i % 10 == 0 else StatusCode.UNSET))
    return out


def to_readable(spans: list[Any]) -> list[Any]:
    from opentelemetry.sdk.resources import Resource as SdkResource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
    res = SdkResource(dict(spans[0].resource.attributes))
    scope = InstrumentationScope("wirespan", "0.1.0")
    out = []
    for s in spans:
        ctx = SpanContext(int.from_bytes(s.trace_id, "big"), int.from_bytes(s.span_id, "big"), False,
                          TraceFlags(1))
        out.append(ReadableSpan(s.name, context=ctx, resource=res, attributes=dict(s.attributes),
                                kind=SpanKind.SERVER, start_time=s.start_ns, end_time=s.end_ns,
                                status=Status(StatusCode.ERROR if int(s.status_code) == 2 else StatusCode.UNSET),
                                instrumentation_scope=scope))
    return out


def _median_time(fn: Any) -> float:
    return median_seconds(fn, REPEATS)


# ---------------------------------------------------------------------------
def bench_encoding() -> dict[str, float]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from service.model import spans_to_otlp, spans_to_otlp_bytes
    spans = make_spans(512)
    ro = to_readable(spans)
    assert spans_to_otlp(spans).SerializeToString() == spans_to_otlp_bytes(spans)
    n = len(spans)
    res = {
        "message path (spans_to_otlp + Serialize)": _median_time(lambda: spans_to_otlp(spans).SerializeToString()),
        "wire encoder (spans_to_otlp_bytes)": _median_time(lambda: spans_to_otlp_bytes(spans)),
        "opentelemetry-sdk encode_spans + Serialize": _median_time(lambda: encode_spans(ro).SerializeToString()),
    }
    return {k: v / n * 1e6 for k, v in res.items()}


# ---------------------------------------------------------------------------
def _sink_proc(port_q: Any, stop_ev: Any, counter: Any) -> None:
    _pin(1)
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Svc(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with counter.get_lock():
                counter.value += n
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Svc(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_q.put(port)
    stop_ev.wait()
    server.stop(0)


def _wait_count(counter: Any, want: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while counter.value < want and time.monotonic() < deadline:
        time.sleep(0.001)


def bench_throughput(endpoint: str, counter: Any) -> dict[tuple[str, int], float]:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    from exporters.otlp import OtlpConfig, OtlpExporter
    out: dict[tuple[str, int], float] = {}
    total = 65536
    spans = make_spans(total)
    ro = to_readable(spans)
    for batch in (512, 8192):
        batches = [spans[i:i + batch] for i in range(0, total, batch)]
        ro_batches = [ro[i:i + batch] for i in range(0, total, batch)]
        for comp in ("gzip", "none"):
            e = OtlpExporter(f"bench/{comp}{batch}", OtlpConfig.model_validate({
                "endpoint": endpoint, "tls": {"insecure": True}, "compression": comp,
                "sending_queue": {"queue_size": total * 2, "num_consumers": 4}}))
            e.start()

            def run(e=e, batches=batches) -> None:
                base = counter.value
                for b in batches:
                    e.consume_spans(b)
                _wait_count(counter, base + total)
            run()  # warm-up: channel connected, caches filled
            out[(f"wirespan otlp ({comp})", batch)] = total / _median_time(run)
            e.shutdown()
        from grpc import Compression
        sdk = OTLPSpanExporter(endpoint=endpoint, insecure=True, compression=Compression.Gzip)
        sdk_none = OTLPSpanExporter(endpoint=endpoint, insecure=True, compression=Compression.NoCompression)
        for label, x in (("opentelemetry-sdk OTLPSpanExporter (gzip)", sdk),
                         ("opentelemetry-sdk OTLPSpanExporter (none)", sdk_none)):
            def run_sdk(x=x, ro_batches=ro_batches) -> None:
                base = counter.value
                for b in ro_batches:
                    x.export(b)
                _wait_count(counter, base + total)
            run_sdk()
            out[(label, batch)] = total / _median_time(run_sdk)
            x.shutdown()
    return out


# ---------------------------------------------------------------------------
def bench_queue() -> dict[str, tuple[float, float]]:
    from exporters.persistent_queue import PersistentQueue
    from service.model import spans_to_otlp_bytes
    req = spans_to_otlp_bytes(make_spans(512))
    n = 400
    out = {}

    def log_run() -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as d:
            q = PersistentQueue(d, 10**9, "bench")
            t = time.perf_counter()
            for _ in range(n):
                q.put(req, 512)
            t_put = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(n):
                it = q.get(timeout=0)
                q.ack(it)
            t_get = time.perf_counter() - t
            q.close()
            return t_put, t_get

    def sqlite_run() -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as d:
            db = sqlite3.connect(os.path.join(d, "q.db"), isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, n INTEGER, data BLOB)")
            t = time.perf_counter()
            for _ in range(n):
                db.execute("BEGIN")
                db.execute("INSERT INTO q (n, data) VALUES (?, ?)", (512, req))
                db.execute("COMMIT")
            t_put = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(n):
                row = db.execute("SELECT id, n, data FROM q ORDER BY id LIMIT 1").fetchone()
                db.execute("BEGIN")
                db.execute("DELETE FROM q WHERE id = ?", (row[0],))
                db.execute("COMMIT")
            t_get = time.perf_counter() - t
            db.close()
            return t_put, t_get

    for label, fn in (("segment log (ours)", log_run), ("sqlite3 WAL", sqlite_run)):
        runs = [fn() for _ in range(REPEATS)]
        out[label] = (n / statistics.median(r[0] for r in runs), n / statistics.median(r[1] for r in runs))
    return out, len(req)


class _PurePython:
    """The HTTP/1 parser and the OTLP encoder without their C accelerators (what a machine
    without a C compiler runs), by swapping the module globals they are reached through."""

    def __enter__(self) -> None:
        from processors.protocols import http1
        from service import model
        self._saved = [(m, n, getattr(m, n)) for m, n in (
            (http1, "_C_REQUEST"), (http1, "_C_RESPONSE"), (http1, "_C_CHUNKED"), (model, "_c_span_fields"))]
        for m, n, _ in self._saved:
            setattr(m, n, None)

    def __exit__(self, *exc: Any) -> None:
        for m, n, v in self._saved:
            setattr(m, n, v)


def bench_end_to_end(endpoint: str, counter: Any, compression: str = "gzip") -> tuple[int, float, float]:
    from bench.gen_http_capture import generate
    from service import config as c
    from service.pipeline import Service
    with tempfile.TemporaryDirectory() as d:
        cap = os.path.join(d, "http.pcap")
        generate(cap)
        raw = {
            "receivers": {"pcap": {"path": cap}},
            "processors": {"protocols": {}, "batch": {"timeout": "200ms", "send_batch_size": 8192}},
            "exporters": {"otlp": {"endpoint": endpoint, "tls": {"insecure": True}, "compression": compression}},
            "service": {"pipelines": {"traces": {"receivers": ["pcap"], "processors": ["protocols", "batch"],
                                                 "exporters": ["otlp"]}},
                        "telemetry": {"metrics": {"address": ""}, "health": {"address": ""}}},
        }
        runs = []
        for _ in range(3):
            base = counter.value
            svc = Service(c.validate(raw))
            t, cpu = time.perf_counter(), time.process_time()
            svc.start()
            svc.wait_receivers(600)
            svc.shutdown()
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            runs.append((counter.value - base, wall, cpu))
        n = runs[0][0]
        return n, statistics.median(r[0] / r[1] for r in runs), statistics.median(r[0] / r[2] for r in runs)


def main() -> None:
    _pin(0)
    print(f"1. encoding, 512-span batches (µs/span, median of {REPEATS})")
    enc = bench_encoding()
    ref = enc["opentelemetry-sdk encode_spans + Serialize"]
    for k, v in enc.items():
        print(f"   {k:<46} {v:8.2f} µs/span   x{ref / v:5.2f} vs SDK")

    print("2. export throughput to a local OTLP/gRPC endpoint (spans/s, this process on one core)")
    ctx = mp.get_context("spawn")
    port_q, stop_ev, counter = ctx.Queue(), ctx.Event(), ctx.Value("q", 0)
    proc = ctx.Process(target=_sink_proc, args=(port_q, stop_ev, counter), daemon=True)
    proc.start()
    try:
        endpoint = f"127.0.0.1:{port_q.get(timeout=30)}"
        tp = bench_throughput(endpoint, counter)
        e2e = {}
        for comp in ("gzip", "none"):
            e2e[(comp, "C accelerators")] = bench_end_to_end(endpoint, counter, comp)
            with _PurePython():
                e2e[(comp, "pure Python")] = bench_end_to_end(endpoint, counter, comp)
    finally:
        stop_ev.set()
        proc.join(10)
    for batch in (512, 8192):
        sdk = tp[("opentelemetry-sdk OTLPSpanExporter (gzip)", batch)]
        for (label, b), v in tp.items():
            if b == batch:
                print(f"   batch {batch:<5} {label:<44} {v:10.0f} spans/s   x{v / sdk:5.2f} vs SDK (gzip)")

    print("3. sending-queue storage, 512-span requests")
    q, size = bench_queue()
    print(f"   (request size {size} bytes)")
    base_put, base_get = q["sqlite3 WAL"]
    for label, (put, get) in q.items():
        print(f"   {label:<20} put {put:8.0f}/s (x{put / base_put:4.2f})   "
              f"get+ack {get:8.0f}/s (x{get / base_get:4.2f})")
    for (comp, path), (n, per_wall, per_cpu) in e2e.items():
        print(f"4. end to end, capture -> protocols -> batch -> otlp (compression {comp}, {path}): {n} spans "
              "per run (median of 3)")
        print(f"   {per_wall:10.0f} spans/s wall time (pinned to one core)   {per_cpu:10.0f} spans/s per CPU-second")


if __name__ == "__main__":
    main()
