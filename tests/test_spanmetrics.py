"""spanmetrics connector: semconv histograms, the calls style, cardinality, temporality, exemplars,
and replays of captures through metrics pipelines (wirespan replay --output: spans and metrics lines)."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.spanmetrics import DB_BUCKETS, HTTP_BUCKETS, SpanMetricsConfig, SpanMetricsConnector, classify
from service import config as c
from service import telemetry as tm
from service.cli import main as cli_main
from service.metrics import AGGREGATION_TEMPORALITY_DELTA, HistogramPoint, otlp_json_to_metrics_proto
from service.model import Resource, Span, SpanKind, StatusCode, otlp_json_to_proto
from tests.support.pcapgen import ACK, FIN, PSH, PcapWriter, TcpFlow, ether

FIXTURES = Path(__file__).parent / "fixtures"


class Sink:
    def __init__(self) -> None:
        self.batches: list[Any] = []

    def consume_metrics(self, batch: list) -> None:
        self.batches.append(batch)


def connector(**cfg: Any) -> tuple[SpanMetricsConnector, Sink]:
    sink = Sink()
    return SpanMetricsConnector(f"spanmetrics/t{id(sink)}", SpanMetricsConfig.model_validate(cfg), sink), sink


def http(path: str, status: int = 200, ms: float = 3.0, kind: SpanKind = SpanKind.SERVER, **extra: Any) -> Span:
    a = {"http.request.method": "GET", "url.path": path, "url.scheme": "http", "http.response.status_code": status,
         "server.address": "shop", "server.port": 8080, **extra}
    st = StatusCode.ERROR if status >= 500 else StatusCode.UNSET
    return Span("GET", kind, 0, int(ms * 1e6), a, status_code=st)


def points(conn: SpanMetricsConnector, name: str) -> list[Any]:
    return [p for rm in conn.collect() for m in rm.metrics if m.name == name for p in m.points]


def test_classify() -> None:
    S, C, P, K = SpanKind.SERVER, SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER
    assert classify(S, {"http.request.method": "GET"}) == "http.server.request.duration"
    assert classify(C, {"http.request.method": "GET"}) == "http.client.request.duration"
    assert classify(S, {"http.request.method": "POST", "rpc.system.name": "grpc"}) == "rpc.server.duration"
    assert classify(C, {"rpc.system.name": "grpc"}) == "rpc.client.duration"
    assert classify(C, {"db.system.name": "postgresql"}) == "db.client.operation.duration"
    assert classify(P, {"messaging.system": "kafka"}) == "messaging.client.operation.duration"
    assert classify(K, {"messaging.system": "kafka", "messaging.operation.type": "process"}) == \
        "messaging.process.duration"
    assert classify(S, {"messaging.system": "kafka"}) is None      # a broker's view: no client metric
    assert classify(S, {}) is None


def test_http_server_histogram_by_route_and_status() -> None:
    conn, _ = connector()
    conn.consume_spans([http(f"/users/{i}", 200, ms=i % 40) for i in range(100)] +
                       [http("/users/7", 404), http("/boom", 500, ms=120)])
    pts = {(p.attributes.get("http.route"), p.attributes["http.response.status_code"]): p
           for p in points(conn, "http.server.request.duration")}
    assert set(pts) == {("/users/{id}", 200), ("/users/{id}", 404), ("/boom", 500)}
    ok = pts[("/users/{id}", 200)]
    assert isinstance(ok, HistogramPoint) and ok.count == 100 and ok.bounds == HTTP_BUCKETS
    assert sum(ok.bucket_counts) == 100 and len(ok.bucket_counts) == len(HTTP_BUCKETS) + 1
    assert ok.min == 0.0 and ok.max == pytest.approx(0.039)
    assert ok.attributes == {"http.request.method": "GET", "http.route": "/users/{id}",
                             "http.response.status_code": 200, "url.scheme": "http"}  # semconv's, no server.*
    err = pts[("/boom", 500)]
    assert err.attributes["error.type"] == "_OTHER"   # an ERROR span naming no type
    # exemplars: one per bucket that holds a span, the trace/span id of a span in it
    assert ok.exemplars and all(e.trace_id and e.span_id for e in ok.exemplars)
    for e in ok.exemplars:
        i = next(i for i, b in enumerate(HTTP_BUCKETS) if e.value <= b)
        assert ok.bucket_counts[i] > 0


def test_db_and_client_attributes() -> None:
    conn, _ = connector(exclude_dimensions=["server.port"])
    db = Span("SELECT orders", SpanKind.CLIENT, 0, 2_000_000,
              {"db.system.name": "postgresql", "db.operation.name": "SELECT", "db.collection.name": "orders",
               "db.namespace": "shop", "db.query.text": "SELECT * FROM orders WHERE id = ?",
               "server.address": "127.0.0.1", "server.port": 5432})
    conn.consume_spans([db, http("/x", 503, kind=SpanKind.CLIENT, **{"error.type": "503"})])
    (p,) = points(conn, "db.client.operation.duration")
    assert p.bounds == DB_BUCKETS and p.count == 1
    assert p.attributes == {"db.system.name": "postgresql", "db.operation.name": "SELECT",
                            "db.collection.name": "orders", "db.namespace": "shop", "server.address": "127.0.0.1"}
    (h,) = points(conn, "http.client.request.duration")
    assert h.attributes["server.address"] == "shop" and h.attributes["error.type"] == "503"
    assert "http.route" not in h.attributes and "url.path" not in h.attributes


def test_cardinality_limit_and_overflow_series() -> None:
    conn, _ = connector(aggregation_cardinality_limit=5, routes={"unmatched": "path"})
    before = tm.counter_value(tm.CONNECTOR_OVERFLOW, connector=conn.id)
    conn.consume_spans([http(f"/p{i}") for i in range(50)])
    pts = points(conn, "http.server.request.duration")
    assert len(pts) == 6
    over = [p for p in pts if p.attributes == {"otel.metric.overflow": True}]
    assert len(over) == 1 and over[0].count == 45
    assert sum(p.count for p in pts) == 50
    assert tm.counter_value(tm.CONNECTOR_OVERFLOW, connector=conn.id) - before == 45


def test_delta_temporality_resets_and_cumulative_keeps() -> None:
    cum, _ = connector()
    delta, _ = connector(aggregation_temporality="AGGREGATION_TEMPORALITY_DELTA")
    for conn in (cum, delta):
        conn.consume_spans([http("/a")] * 3)
    first_cum, first_delta = points(cum, "http.server.request.duration"), points(delta, "http.server.request.duration")
    assert first_cum[0].count == 3 and first_delta[0].count == 3
    for conn in (cum, delta):
        conn.consume_spans([http("/a")] * 2)
    (pc,), (pd,) = points(cum, "http.server.request.duration"), points(delta, "http.server.request.duration")
    assert pc.count == 5 and pc.start_ns == first_cum[0].start_ns
    assert pd.count == 2 and pd.start_ns == first_delta[0].time_ns
    assert points(delta, "http.server.request.duration") == []     # nothing since the last flush
    delta.consume_spans([http("/a")])
    (rm,) = delta.collect()
    assert rm.metrics[0].temporality == AGGREGATION_TEMPORALITY_DELTA


def test_calls_style_as_the_collector() -> None:
    conn, _ = connector(metrics=["calls"], dimensions=[{"name": "deployment.environment.name", "default": "none"}])
    r = Resource({"service.name": "shop"})
    spans = [http("/a"), http("/a"), http("/b", 500)]
    for s in spans:
        s.resource = r
    spans[0].attributes["deployment.environment.name"] = "prod"
    conn.consume_spans(spans)
    (batch,) = [conn.collect()]
    names = {m.name: m for rm in batch for m in rm.metrics}
    assert set(names) == {"traces.span.metrics.calls", "traces.span.metrics.duration"}
    calls = {(p.attributes["status.code"], p.attributes["deployment.environment.name"]): p.value
             for p in names["traces.span.metrics.calls"].points}
    assert calls == {("STATUS_CODE_UNSET", "prod"): 1, ("STATUS_CODE_UNSET", "none"): 1,
                     ("STATUS_CODE_ERROR", "none"): 1}
    p = names["traces.span.metrics.calls"].points[0]
    assert p.attributes["service.name"] == "shop" and p.attributes["span.kind"] == "SPAN_KIND_SERVER"
    assert names["traces.span.metrics.duration"].unit == "ms"
    assert names["traces.span.metrics.duration"].points[0].bounds[0] == 2.0


def test_resources_are_kept_apart_and_bounded() -> None:
    conn, _ = connector(resource_metrics_cache_size=2)
    spans = []
    for i in range(3):
        s = http("/a")
        s.resource = Resource({"service.name": f"svc{i}"})
        spans.append(s)
    conn.consume_spans(spans)
    assert {rm.resource.attributes["service.name"] for rm in conn.collect()} == {"svc0", "svc1"}
    assert conn.stats["dropped_resources"] == 1


@pytest.mark.parametrize("body,msg", [
    ({"metrics": []}, "connectors::spanmetrics: metrics: at least one"),
    ({"metrics": ["red"]}, "connectors::spanmetrics::metrics::0: Input should be 'semconv' or 'calls'"),
    ({"histogram": {"explicit": {"buckets": ["1s", "10ms"]}}}, "strictly increasing"),
    ({"histogram": {"explicit": {"buckets": ["five"]}}}, "connectors::spanmetrics::histogram::explicit::buckets"),
    ({"aggregation_temporality": "sometimes"}, "connectors::spanmetrics::aggregation_temporality"),
    ({"routes": {"patterns": ["x"]}}, "connectors::spanmetrics::routes::patterns"),
    ({"no_such": 1}, "connectors::spanmetrics: unknown option 'no_such'"),
])
def test_config_errors_name_their_path(body: dict, msg: str) -> None:
    raw = pipeline_config({"spanmetrics": body})
    with pytest.raises(c.ConfigError) as ei:
        c.validate(raw)
    assert any(msg in e for e in ei.value.errors), ei.value.errors


# ---------------------------------------------------------------------------
# Metrics pipelines in a config, replayed
# ---------------------------------------------------------------------------
def pipeline_config(connectors: dict, metrics_exporters: list[str] | None = None) -> dict:
    return {
        "receivers": {"pcap": {"path": "x.pcap"}},
        "processors": {"protocols": {}, "batch": {}},
        "exporters": {"debug": {}},
        "connectors": connectors,
        "service": {"pipelines": {
            "traces": {"receivers": ["pcap"], "processors": ["protocols", "batch"],
                       "exporters": ["debug", *connectors]},
            "metrics": {"receivers": list(connectors), "exporters": metrics_exporters or ["debug"]}}},
    }


def test_pipeline_validation_errors() -> None:
    def errors(raw: dict) -> list[str]:
        with pytest.raises(c.ConfigError) as ei:
            c.validate(raw)
        return ei.value.errors
    raw = pipeline_config({"spanmetrics": {}})
    raw["service"]["pipelines"]["metrics"]["exporters"] = ["nope"]
    assert 'service::pipelines::metrics: references exporter "nope" which is not configured' in errors(raw)
    raw = pipeline_config({"spanmetrics": {}})
    del raw["service"]["pipelines"]["metrics"]
    assert ("connectors::spanmetrics: must be used as an exporter of a traces pipeline and as a receiver of a "
            "metrics pipeline") in errors(raw)
    raw = pipeline_config({"spanmetrics": {}})
    raw["exporters"]["prometheus"] = {}
    raw["service"]["pipelines"]["traces"]["exporters"].append("prometheus")
    assert any(e.startswith('service::pipelines::traces: exporter "prometheus" does not support traces')
               for e in errors(raw))
    raw = pipeline_config({"spanmetrics": {}})
    raw["service"]["pipelines"]["metrics"]["processors"] = ["protocols"]
    assert any(e.startswith('service::pipelines::metrics: processor "protocols" does not support metrics')
               for e in errors(raw))
    raw = pipeline_config({"spanmetrics": {}})
    raw["service"]["pipelines"]["metrics"]["receivers"] = ["pcap"]
    assert any("receiver \"pcap\" produces TCP events" in e for e in errors(raw))
    raw = pipeline_config({"spanmetrics": {}})
    raw["service"]["pipelines"]["traces"]["receivers"] = ["spanmetrics"]
    assert any('connector "spanmetrics" produces metrics; it cannot be a receiver of a traces pipeline' in e
               for e in errors(raw))
    raw = pipeline_config({"spanmetrics": {}})
    raw["receivers"]["spanmetrics"] = {"path": "y"}
    assert any("ambiguous id" in e for e in errors(raw))
    ok = pipeline_config({"spanmetrics": {}, "servicegraph": {}})
    cfg = c.validate(ok)
    assert set(cfg.connectors) == {"spanmetrics", "servicegraph"} and cfg.pipelines["metrics"].signal == "metrics"


def replay_with_metrics(tmp_path: Path, capture: Path, connectors: dict | None = None,
                        protocols: dict | None = None) -> tuple[list[Any], list[Any]]:
    """``wirespan replay capture --config <spanmetrics pipeline> --output out``: (spans, metric requests)."""
    raw = pipeline_config(connectors or {"spanmetrics": {}})
    raw["processors"]["protocols"] = protocols or {}
    conf = tmp_path / "metrics.yaml"
    conf.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out.jsonl"
    rc = cli_main(["replay", str(capture), "--config", str(conf), "--output", str(out)])
    assert rc == 0
    spans, metrics = [], []
    for line in out.read_text().splitlines():
        if line.startswith('{"resourceSpans"'):
            spans += [s for rs in otlp_json_to_proto(line).resource_spans for ss in rs.scope_spans for s in ss.spans]
        else:
            assert json.loads(line)["resourceMetrics"]
            metrics.append(otlp_json_to_metrics_proto(line))
    return spans, metrics


def _attr(kvs: Any, key: str) -> Any:
    for kv in kvs:
        if kv.key == key:
            v = kv.value
            return getattr(v, v.WhichOneof("value"))
    return None


def histogram_counts(reqs: list[Any], name: str, keys: tuple[str, ...]) -> dict[tuple, int]:
    """Counts of the last (cumulative) request's points of ``name``, by the attributes ``keys``."""
    out: collections.Counter = collections.Counter()
    for rm in reqs[-1].resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    for p in m.histogram.data_points:
                        assert sum(p.bucket_counts) == p.count
                        out[tuple(_attr(p.attributes, k) for k in keys)] += p.count
    return dict(out)


def test_replay_counts_per_route_and_status_equal_the_spans(tmp_path: Path) -> None:
    from bench.gen_http_capture import generate

    cap = tmp_path / "http.pcap"
    generate(str(cap), connections=20, requests=60)
    spans, reqs = replay_with_metrics(tmp_path, cap)
    assert len(spans) == 1200
    want = collections.Counter((_attr(s.attributes, "http.route"), _attr(s.attributes, "http.response.status_code"))
                               for s in spans)
    got = histogram_counts(reqs, "http.server.request.duration", ("http.route", "http.response.status_code"))
    assert got == dict(want)
    assert len(got) <= 5 * 3   # five path shapes, ids templated


@pytest.mark.parametrize("capture,metric", [
    ("pcap/http_server_lo.pcap", "http.server.request.duration"),
    ("http2/nginx_curl.pcap", "http.server.request.duration"),
    ("http2/grpc_calls.pcap", "rpc.server.duration"),
    ("postgresql/psycopg_session.pcap", "db.client.operation.duration"),
    ("mysql/pymysql_connector_session.pcap", "db.client.operation.duration"),
    ("kafka/tansu_kafka_python.pcap", "messaging.client.operation.duration"),
])
def test_fixture_captures_histogram_counts_equal_span_counts(tmp_path: Path, capture: str, metric: str) -> None:
    spans, reqs = replay_with_metrics(tmp_path, FIXTURES / capture)
    attrs = [{kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in s.attributes} for s in spans]
    fed = [a for a, s in zip(attrs, spans, strict=True) if classify(s.kind, a) == metric]
    assert fed, f"no span of {capture} feeds {metric}"
    got = histogram_counts(reqs, metric, ())
    assert got == {(): len(fed)}


def _many_ids_capture(path: Path, exchanges: int) -> None:
    flows = [TcpFlow(client=(f"10.9.0.{c + 1}", 41000 + c), server=("10.9.1.1", 8080)) for c in range(10)]
    t = 1_764_000_000_000_000_000
    with PcapWriter(str(path)) as w:
        def put(p: bytes) -> None:
            nonlocal t
            w.packet(ether(p), t)
            t += 5_000
        for f in flows:
            for p in f.handshake():
                put(p)
        for i in range(exchanges):
            f = flows[i % 10]
            shape = ("/api/users/{}", "/api/users/{}/orders", "/api/orders/{}/items/{}", "/img/{}.png")[i % 4]
            path_ = shape.format(100_000 + i, 7 * i + 3)
            put(f.send(True, f"GET {path_} HTTP/1.1\r\nHost: api\r\n\r\n".encode(), PSH | ACK))
            code = (200, 200, 404, 500)[i % 4]
            put(f.send(False, f"HTTP/1.1 {code} X\r\nContent-Length: 2\r\n\r\nok".encode(), PSH | ACK))
        for f in flows:
            put(f.send(True, b"", FIN | ACK))
            put(f.send(False, b"", FIN | ACK))


def test_100k_distinct_ids_give_a_handful_of_series(tmp_path: Path) -> None:
    cap = tmp_path / "ids.pcap"
    _many_ids_capture(cap, 100_000)
    spans, reqs = replay_with_metrics(tmp_path, cap)
    assert len(spans) == 100_000
    got = histogram_counts(reqs, "http.server.request.duration", ("http.route", "http.response.status_code"))
    assert got == {("/api/users/{id}", 200): 25_000, ("/api/users/{id}/orders", 200): 25_000,
                   ("/api/orders/{id}/items/{id}", 404): 25_000, ("/img/{id}.png", 500): 25_000}, got


def test_overflow_series_past_the_limit(tmp_path: Path) -> None:
    cap = tmp_path / "ids.pcap"
    _many_ids_capture(cap, 2_000)
    spans, reqs = replay_with_metrics(tmp_path, cap, {"spanmetrics": {"aggregation_cardinality_limit": 100,
                                                                      "routes": {"unmatched": "path"}}},
                                      protocols={"routes": {"unmatched": "unset"}})
    got = histogram_counts(reqs, "http.server.request.duration", ("http.route", "otel.metric.overflow"))
    assert len(got) == 101 and got[(None, True)] == 2_000 - 100
    assert sum(got.values()) == len(spans) == 2_000


def test_metrics_expiration_forgets_stale_cumulative_series() -> None:
    import time as _t
    conn, _ = connector(metrics_expiration="50ms")
    conn.consume_spans([http("/old/1")])
    _t.sleep(0.1)
    conn.consume_spans([http("/new/1")])
    routes = {p.attributes["http.route"] for p in points(conn, "http.server.request.duration")}
    assert routes == {"/new/{id}"}


def test_replay_summary_counts_metric_points(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sample = Path(__file__).resolve().parents[1] / "config" / "samples" / "http-sample.pcap"
    spans, reqs = replay_with_metrics(tmp_path, sample)
    err = capsys.readouterr().err
    n = sum(len(getattr(m, m.WhichOneof("data")).data_points) for r in reqs for rm in r.resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics)
    assert f"replay: exporters::file: {len(spans)} spans, {n} metric points" in err
