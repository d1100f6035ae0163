"""Self-telemetry on the OpenTelemetry SDK (service/selftelemetry.py): the readers configuration
(the Collector's service::telemetry::metrics::readers), a periodic OTLP reader delivering the
self-metrics to a real OTLP endpoint, OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES on their
resource and OTEL_EXPORTER_OTLP_* for their endpoint (a `wirespan run` process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from service import config as c
from service import telemetry as tm
from service.selftelemetry import PROVIDER, snapshot
from tests.support.capture import free_port
from tests.support.otlp_sink import GrpcSink, HttpSink

ROOT = Path(__file__).resolve().parents[1]


def telemetry(metrics: dict) -> c.TelemetryConfig:
    return c.TelemetryConfig.model_validate({"metrics": metrics})


def test_readers_config_and_the_address_shorthand() -> None:
    assert telemetry({}).metrics.pull_endpoints() == [("localhost:8898", "/metrics")]
    assert telemetry({"address": "127.0.0.1:9"}).metrics.pull_endpoints() == [("127.0.0.1:9", "/metrics")]
    t = telemetry({"readers": [{"pull": {"exporter": {"prometheus": {"host": "::1", "port": 7}}}},
                               {"periodic": {"interval": 5000,
                                             "exporter": {"otlp": {"protocol": "grpc",
                                                                   "endpoint": "http://localhost:4317",
                                                                   "headers": [{"name": "a", "value": "b"}]}}}}]})
    assert t.metrics.pull_endpoints() == [("[::1]:7", "/metrics")]
    (p,) = t.metrics.periodic_readers()
    assert p.interval == 5000 and p.exporter.otlp.header_map() == {"a": "b"}
    assert telemetry({"level": "none", "readers": t.metrics.model_dump()["readers"]}).metrics.periodic_readers() == []


@pytest.mark.parametrize("metrics,msg", [
    ({"address": "localhost:1", "readers": []}, "give address (one Prometheus endpoint) or readers, not both"),
    ({"readers": [{}]}, "a reader is exactly one of pull or periodic"),
    ({"readers": [{"periodic": {"exporter": {"otlp": {"protocol": "http/json"}}}}]},
     "service::telemetry::metrics::readers::0::periodic::exporter::otlp::protocol"),
    ({"readers": [{"pull": {"exporter": {"prometheus": {"prot": 1}}}}]},
     "service::telemetry::metrics::readers::0::pull::exporter::prometheus: unknown option 'prot'"),
])
def test_readers_config_errors_name_their_path(metrics: dict, msg: str) -> None:
    raw = {"receivers": {"pcap": {"path": "x"}}, "processors": {"protocols": {}}, "exporters": {"debug": {}},
           "service": {"telemetry": {"metrics": metrics},
                       "pipelines": {"traces": {"receivers": ["pcap"], "processors": ["protocols"],
                                                "exporters": ["debug"]}}}}
    with pytest.raises(c.ConfigError) as ei:
        c.validate(raw)
    assert any(msg in e for e in ei.value.errors), ei.value.errors


def test_measurements_go_through_the_sdk() -> None:
    tm.EXPORTER_RETRIES.labels(exporter="sdk-check").inc(3)
    tm.EXPORTER_QUEUE_CAPACITY.labels(exporter="sdk-check").set(42)
    data = snapshot()
    pts = {m.name: [p for p in m.data.data_points if dict(p.attributes or {}).get("exporter") == "sdk-check"]
           for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert pts["wirespan_exporter_retries"][0].value == 3
    assert pts["wirespan_exporter_queue_capacity"][0].value == 42
    assert data.resource_metrics[0].resource.attributes["service.name"] == os.environ.get("OTEL_SERVICE_NAME",
                                                                                          "wirespan")
    assert PROVIDER is not None


def _sum_points(reqs: list[Any], name: str) -> list[Any]:
    return [p for r in reqs for rm in r.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == name for p in m.sum.data_points]


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kvs}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_periodic_otlp_reader_delivers_the_self_metrics(tmp_path: Path, protocol: str) -> None:
    """`wirespan run` with a pull reader and a periodic one whose endpoint comes from
    OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name its resource."""
    sink: Any = GrpcSink() if protocol == "grpc" else HttpSink()
    mport = free_port()
    cfg = {
        "receivers": {"beat": {"class": "tests.support.pipeline_fakes:FakeLiveReceiver", "interval": 0.01}},
        "processors": {"ev": {"class": "tests.support.pipeline_fakes:FakeEventProcessor"}},
        "exporters": {"debug": {}},
        "service": {"pipelines": {"traces": {"receivers": ["beat"], "processors": ["ev"], "exporters": ["debug"]}},
                    "telemetry": {"health": {"address": ""}, "metrics": {"readers": [
                        {"pull": {"exporter": {"prometheus": {"host": "127.0.0.1", "port": mport}}}},
                        {"periodic": {"interval": 300, "exporter": {"otlp": {"protocol": protocol}}}}]}}},
    }
    conf = tmp_path / "w.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OTEL_SERVICE_NAME": "node-7", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=ci",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    with sink:
        p = subprocess.Popen([sys.executable, "-m", "service.cli", "run", "--config", str(conf)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            def accepted(reqs: list[Any]) -> bool:
                return any(_attrs(pt.attributes).get("receiver") == "beat" and pt.as_double >= 5
                           for pt in _sum_points(reqs, "wirespan_receiver_accepted_events"))
            assert sink.wait_metrics(accepted, 30), p.stderr.read1(4096) if p.poll() is not None else "no metrics"
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                body = r.read().decode()
            assert 'wirespan_receiver_accepted_events_total{receiver="beat"}' in body
        finally:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(30)
    req = sink.metric_requests[-1]
    res = _attrs(req.resource_metrics[0].resource.attributes)
    assert res["service.name"] == "node-7" and res["deployment.environment.name"] == "ci"
    assert res["service.version"] and res["service.instance.id"]
    names = {m.name for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"wirespan_processor_outgoing_items", "wirespan_exporter_sent_spans", "wirespan_process_memory_rss",
            "wirespan_process_uptime"} <= names
    (sent,) = [m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
               if m.name == "wirespan_exporter_sent_spans"]
    assert sent.sum.is_monotonic and sent.sum.aggregation_temporality == 2   # cumulative, as the pull reader's



_FORK_CHILD = """
import os, sys, time
from service import selftelemetry  # the provider registers its fork hook here
import concurrent.futures.thread  # noqa: F401  imported later, so its fork hooks run after the provider's
pid = os.fork()
if pid == 0:
    os._exit(7)
end = time.monotonic() + 10
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(0 if os.waitstatus_to_exitcode(status) == 7 else 1)
    if time.monotonic() > end:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        sys.exit(2)
    time.sleep(0.01)
"""


def test_a_forked_child_runs() -> None:
    """The SDK's fork hook re-detects the resource on a thread pool; when concurrent.futures.thread
    was first imported after the provider was made, its lock (taken by its own before-fork hook)
    was still held in the child, which hung for good (CI stuck in test_ebpf_ring's fork;
    replay --workers forks too). Deterministic in a fresh interpreter; with the SDK's own
    MeterProvider the child hangs."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FORK_CHILD], cwd=os.path.dirname(os.path.dirname(__file__)),
                       timeout=60)
    assert r.returncode == 0, "the forked child hung in an at-fork hook" if r.returncode == 2 else r.returncode


def test_counter_value_sums_the_running_values_as_a_collection_would() -> None:
    """telemetry.counter_value reads our counters' label sets directly (a collection of every
    instrument cost a replay's end 0.1 s): the same sums as the collected samples give."""
    from service import selftelemetry as st
    from service import telemetry as tm

    c = st.Counter("wirespan_test_counter_value", "a test counter", ["a", "b"])
    c.labels(a="x", b="1").inc(3)
    c.labels(a="x", b="2").inc(4.5)
    c.labels(a="y", b="1").inc(1)

    def collected(**labels: str) -> float:
        return sum(s.value for fam in c.collect() for s in fam.samples
                   if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()))

    for labels in ({}, {"a": "x"}, {"b": "1"}, {"a": "y", "b": "1"}, {"a": "z"}, {"c": "1"}):
        assert tm.counter_value(c, **labels) == collected(**labels), labels
    assert tm.counter_value(c, a="x") == 7.5
