"""prometheus exporter: OTel-to-Prometheus names, text vs OpenMetrics over real HTTP (the Accept
header decides), exemplars, delta accumulation, expiration, and prometheus_client's parser as an oracle."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families as text_parse

from exporters.prometheus import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    PrometheusConfig,
    PrometheusExporter,
    prometheus_name,
)
from service.metrics import (
    AGGREGATION_TEMPORALITY_DELTA,
    GAUGE,
    HISTOGRAM,
    SUM,
    Exemplar,
    HistogramPoint,
    Metric,
    NumberPoint,
    ResourceMetrics,
)
from service.model import Resource
from tests.support.capture import free_port

RES = Resource({"service.name": "shop", "service.namespace": "eu", "service.instance.id": "i-1", "host.name": "h"})


@pytest.mark.parametrize("name,unit,type,mono,want", [
    ("http.server.request.duration", "s", HISTOGRAM, True, "http_server_request_duration_seconds"),
    ("traces.span.metrics.calls", "{call}", SUM, True, "traces_span_metrics_calls"),
    ("traces_service_graph_request_total", "{request}", SUM, True, "traces_service_graph_request"),
    ("traces_service_graph_request_server_seconds", "s", HISTOGRAM, True,
     "traces_service_graph_request_server_seconds"),
    ("queue.size", "By", SUM, False, "queue_size_bytes"),
    ("cpu.utilization", "1", GAUGE, True, "cpu_utilization_ratio"),
    ("rate", "By/s", GAUGE, True, "rate_bytes_per_second"),
    ("2xx", "", GAUGE, True, "_2xx"),
])
def test_names(name: str, unit: str, type: str, mono: bool, want: str) -> None:
    assert prometheus_name(name, unit, type, mono) == want


def hist(count: int, exemplar: bool = True, temporality: int = 2) -> ResourceMetrics:
    bounds = (0.01, 0.1, 1.0)
    ex = [Exemplar(0.05, 1_700_000_000_000_000_000, bytes(range(16)), bytes(range(8)))] if exemplar else []
    p = HistogramPoint({"http.route": "/u/{id}", "http.response.status_code": 200}, 1, 2, count, 0.05 * count,
                       bounds, [0, count, 0, 0], 0.05, 0.05, ex)
    calls = NumberPoint({"span.name": 'GET "x"\n'}, 1, 2, count)
    return ResourceMetrics(RES, [Metric("http.server.request.duration", HISTOGRAM, [p], "s", "Duration.",
                                        temporality),
                                 Metric("calls", SUM, [calls], "{call}", "Calls.", temporality)])


def get(port: int, accept: str | None) -> tuple[str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def test_served_over_http_text_and_openmetrics_with_exemplars() -> None:
    port = free_port()
    e = PrometheusExporter("prometheus", PrometheusConfig(endpoint=f"127.0.0.1:{port}", const_labels={"env": "ci"}))
    e.start()
    try:
        e.consume_metrics([hist(7)])
        ctype, text = get(port, None)
        assert ctype == TEXT_CONTENT_TYPE
        fams = {f.name: f for f in text_parse(text)}
        h = fams["http_server_request_duration_seconds"]
        buckets = {s.labels["le"]: s.value for s in h.samples if s.name.endswith("_bucket")}
        assert buckets == {"0.01": 0, "0.1": 7, "1.0": 7, "+Inf": 7}
        s0 = h.samples[0]
        assert s0.labels["job"] == "eu/shop" and s0.labels["instance"] == "i-1" and s0.labels["env"] == "ci"
        assert s0.labels["http_route"] == "/u/{id}" and s0.labels["http_response_status_code"] == "200"
        calls = fams["calls"]
        assert calls.type == "counter" and calls.samples[0].value == 7
        assert calls.samples[0].labels["span_name"] == 'GET "x"\n'          # escaped and read back
        assert "# {" not in text                                         # no exemplars in 0.0.4
        info = fams["target_info"].samples[0].labels
        assert info["host_name"] == "h" and info["job"] == "eu/shop"
        ctype, om = get(port, "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        assert ctype == OPENMETRICS_CONTENT_TYPE and om.endswith("# EOF\n")
        ofams = {f.name: f for f in om_parse(om)}
        b = next(s for s in ofams["http_server_request_duration_seconds"].samples if s.labels.get("le") == "0.1")
        assert b.exemplar is not None and b.exemplar.labels == {"trace_id": bytes(range(16)).hex(),
                                                                 "span_id": bytes(range(8)).hex()}
        assert b.exemplar.value == 0.05
        assert ofams["calls"].type == "counter" and ofams["target"].type == "info"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    finally:
        e.shutdown()


def test_delta_points_accumulate_and_cumulative_replace() -> None:
    e = PrometheusExporter("prometheus", PrometheusConfig())
    for n in (3, 4):
        e.consume_metrics([hist(n, temporality=AGGREGATION_TEMPORALITY_DELTA)])
    fams = {f.name: f for f in text_parse(e.render())}
    assert [s.value for s in fams["http_server_request_duration_seconds"].samples
            if s.name.endswith("_count")] == [7]
    assert fams["calls"].samples[0].value == 7
    e.consume_metrics([hist(5)])   # cumulative: the value as given
    fams = {f.name: f for f in text_parse(e.render())}
    assert fams["calls"].samples[0].value == 5


def test_series_expire() -> None:
    e = PrometheusExporter("prometheus", PrometheusConfig(metric_expiration="50ms"))
    e.consume_metrics([hist(1)])
    assert "calls_total" in e.render()
    time.sleep(0.1)
    assert e.render() == "\n"


def test_a_taken_port_fails_the_start() -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        e = PrometheusExporter("prometheus", PrometheusConfig(endpoint=f"127.0.0.1:{s.getsockname()[1]}"))
        with pytest.raises(OSError):
            e.start()


@pytest.mark.parametrize("bad,msg", [
    ({"endpoint": "localhost"}, "must be host:port"),
    ({"path": "metrics"}, "path must start with /"),
    ({"const_labels": {"a.b": "x"}}, "not a valid label name"),
    ({"metric_expiration": "0s"}, "metric_expiration must be > 0"),
])
def test_config_errors(bad: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        PrometheusConfig.model_validate(bad)
