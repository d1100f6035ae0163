"""Metrics to real OTLP endpoints (tests/support/otlp_sink.py), parsed with opentelemetry-proto;
the file and debug exporters' metrics; a 60 s backend outage loses no metric point."""

from __future__ import annotations

import io
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.spanmetrics import SpanMetricsConfig, SpanMetricsConnector
from exporters.debug import DebugConfig, DebugExporter
from exporters.file import FileConfig, FileExporter
from exporters.otlp import OtlpConfig, OtlpExporter
from exporters.otlphttp import OtlpHttpConfig, OtlpHttpExporter
from service.metrics import metrics_to_otlp, otlp_json_to_metrics_proto, point_count
from service.model import Span, SpanKind
from tests.support.capture import free_port
from tests.support.otlp_sink import FAST_RETRY, GrpcSink, HttpSink, metric

_ids = itertools.count()


def spans(n: int, route: str = "/users/{}") -> list[Span]:
    return [Span("GET", SpanKind.SERVER, 0, (i % 50 + 1) * 1_000_000,
                 {"http.request.method": "GET", "url.path": route.format(i), "http.response.status_code": 200,
                  "url.scheme": "http"}) for i in range(n)]


def batch_of(n: int, **cfg: Any) -> list:
    c = SpanMetricsConnector("spanmetrics", SpanMetricsConfig.model_validate({"metrics": ["semconv", "calls"],
                                                                            **cfg}))
    c.consume_spans(spans(n))
    return c.collect()


def histogram_total(reqs: list[Any], name: str = "http.server.request.duration") -> int:
    return sum(p.count for r in reqs for rm in r.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
               if m.name == name for p in m.histogram.data_points)


def test_encoding_round_trips_through_the_official_messages() -> None:
    b = batch_of(30)
    req = metrics_to_otlp(b)
    again = type(req).FromString(req.SerializeToString())
    (m,) = [m for m in again.resource_metrics[0].scope_metrics[0].metrics if m.name == "http.server.request.duration"]
    assert m.unit == "s" and m.histogram.aggregation_temporality == 2
    p = m.histogram.data_points[0]
    assert p.count == 30 and len(p.bucket_counts) == len(p.explicit_bounds) + 1
    assert p.exemplars and len(p.exemplars[0].trace_id) == 16 and len(p.exemplars[0].span_id) == 8
    calls = next(m for m in again.resource_metrics[0].scope_metrics[0].metrics
                 if m.name == "traces.span.metrics.calls")
    assert calls.sum.is_monotonic and calls.sum.data_points[0].as_int == 30


@pytest.mark.parametrize("kind", ["otlp", "otlphttp-proto", "otlphttp-json"])
def test_metrics_reach_a_real_otlp_endpoint(kind: str) -> None:
    sink: Any = GrpcSink() if kind == "otlp" else HttpSink()
    with sink:
        if kind == "otlp":
            e: Any = OtlpExporter(f"otlp/m{next(_ids)}", OtlpConfig.model_validate(
                {"endpoint": sink.endpoint, "tls": {"insecure": True}}))
        else:
            e = OtlpHttpExporter(f"otlphttp/m{next(_ids)}", OtlpHttpConfig.model_validate(
                {"endpoint": sink.endpoint, "encoding": kind.rsplit("-", 1)[1]}))
        e.start()
        try:
            b = batch_of(40)
            e.consume_spans(spans(3))            # spans and metrics through the same exporter
            e.consume_metrics(b)
            assert sink.wait_metrics(lambda reqs: len(reqs) >= 1, 15) and sink.wait_spans(3)
            e.flush()
        finally:
            e.shutdown()
        assert histogram_total(sink.metric_requests) == 40
        ex = sink.metric_requests[0].resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points[0]
        assert ex.exemplars[0].trace_id and ex.exemplars[0].span_id
        assert metric("wirespan_exporter_sent_metric_points_total", exporter=e.id) == point_count(b)
        assert metric("wirespan_exporter_sent_spans_total", exporter=e.id) == 3


@pytest.mark.slow
def test_a_60s_outage_loses_no_metric_point(tmp_path: Path) -> None:
    """Delta metrics every 0.5 s for the 60 s the backend is down, then it comes up: every point
    arrives (each delta point is unique, so their counts sum to the spans). OTLP/gRPC and
    OTLP/HTTP side by side, in one minute (two minutes one after the other were the suite's
    slowest part)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(_outage, kind, tmp_path / kind) for kind in ("otlp", "otlphttp")]
        for r in runs:
            r.result()  # a failure of either is raised here, with its own assertion


def _outage(kind: str, tmp_path: Path) -> None:
    tmp_path.mkdir()
    port = free_port()
    queue = {"storage": str(tmp_path / "queue")} if kind == "otlp" else {}
    retry = {**FAST_RETRY, "max_interval": "2s", "max_elapsed_time": "0s"}
    if kind == "otlp":
        sink: Any = GrpcSink(port=port)
        e: Any = OtlpExporter(f"otlp/outage{next(_ids)}", OtlpConfig.model_validate(
            {"endpoint": sink.endpoint, "tls": {"insecure": True}, "retry_on_failure": retry,
             "sending_queue": queue}))
    else:
        sink = HttpSink(port=port)
        e = OtlpHttpExporter(f"otlphttp/outage{next(_ids)}", OtlpHttpConfig.model_validate(
            {"endpoint": sink.endpoint, "retry_on_failure": retry}))
    conn = SpanMetricsConnector(f"spanmetrics/outage{next(_ids)}", SpanMetricsConfig.model_validate(
        {"aggregation_temporality": "delta", "metrics_flush_interval": "0.5s"}), e)
    e.start()
    conn.start()
    fed = 0
    try:
        t_end = time.monotonic() + 60
        while time.monotonic() < t_end:
            conn.consume_spans(spans(7, route=f"/r{fed % 3}/{{}}"))
            fed += 7
            time.sleep(0.25)
        conn.shutdown()   # the last interval
        assert sink.calls == 0
        sink.start()
        offered = metric("wirespan_exporter_sent_metric_points_total", exporter=e.id)
        assert offered == 0
        assert sink.wait_metrics(lambda reqs: histogram_total(reqs) >= fed, 60), (histogram_total(
            sink.metric_requests), fed)
        e.flush()
    finally:
        e.shutdown()
        sink.stop()
    assert histogram_total(sink.metric_requests) == fed
    assert metric("wirespan_exporter_send_failed_metric_points_total", exporter=e.id, reason="shutdown") == 0
    assert metric("wirespan_exporter_enqueue_failed_metric_points_total", exporter=e.id) == 0


def test_file_exporter_writes_one_metrics_request_a_line(tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    f = FileExporter("file/m", FileConfig(path=str(out), flush_interval=0))
    f.start()
    f.consume_metrics(batch_of(5))
    f.consume_spans(spans(2))
    f.consume_metrics(batch_of(6))
    f.shutdown()
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["resourceSpans"]
    reqs = [otlp_json_to_metrics_proto(lines[0]), otlp_json_to_metrics_proto(lines[2])]
    assert [histogram_total([r]) for r in reqs] == [5, 6]
    ex = json.loads(lines[0])["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["histogram"]["dataPoints"][0]
    assert len(ex["exemplars"][0]["traceId"]) == 32   # hex in OTLP/JSON


def test_debug_exporter_prints_metrics() -> None:
    buf = io.StringIO()
    d = DebugExporter("debug/m", DebugConfig(verbosity="detailed"), stream=buf)
    d.consume_metrics(batch_of(4))
    text = buf.getvalue()
    assert "http.server.request.duration histogram unit=s points=1" in text
    assert "http.route='/users/{id}'" in text and "count=4" in text
    b = io.StringIO()
    DebugExporter("debug/b", DebugConfig(), stream=b).consume_metrics(batch_of(4))
    assert b.getvalue() == "debug/b: 3 metrics, 3 data points\n"
