"""Metrics pipelines in the running graph: connectors between pipelines, metric processors,
start/stop order, draining at shutdown, the delivery check in points, a reload keeping a connector.

The receiver and the events->spans processor are the runtime's fakes (tests/support/pipeline_fakes.py:
wiring is what is tested); connectors, processors and exporters are the real ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service import config as c
from service.metrics import otlp_json_to_metrics_proto
from service.pipeline import Runner, Service
from service.registry import Registry
from tests.support import pipeline_fakes as fk


@pytest.fixture
def reg() -> Registry:
    r = Registry(entry_points=False)
    r.register("receiver", "fake_finite", fk.FakeFiniteReceiver)
    r.register("processor", "fake_events", fk.FakeEventProcessor)
    r.register("exporter", "recording", fk.RecordingExporter)
    return r


def raw(out: Path, events: int = 20, metrics_procs: list[str] | None = None) -> dict[str, Any]:
    return {
        "receivers": {"fake_finite": {"events": events, "per_batch": 5}},
        "processors": {"fake_events": {}, "batch": {},
                       "resource/env": {"attributes": [{"key": "env", "action": "upsert", "value": "test"}]}},
        "connectors": {"spanmetrics": {"metrics": ["calls"]}},
        "exporters": {"recording": {}, "file": {"path": str(out)}},
        "service": {"pipelines": {
            "traces": {"receivers": ["fake_finite"], "processors": ["fake_events"],
                       "exporters": ["recording", "spanmetrics"]},
            "metrics": {"receivers": ["spanmetrics"], "processors": metrics_procs or ["resource/env", "batch"],
                        "exporters": ["file"]},
            "metrics/raw": {"receivers": ["spanmetrics"], "exporters": ["file"]}},
            "telemetry": {"metrics": {"address": ""}, "health": {"address": ""}}},
    }


def metric_lines(out: Path) -> list[Any]:
    return [otlp_json_to_metrics_proto(line) for line in out.read_text().splitlines()
            if json.loads(line).get("resourceMetrics")]


def calls_total(req: Any) -> int:
    return sum(p.as_int for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
               if m.name == "traces.span.metrics.calls" for p in m.sum.data_points)


def test_connector_feeds_every_metrics_pipeline_and_drains_at_shutdown(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    svc = Service(c.validate(raw(out), reg))
    fk.LOG.clear()
    svc.start()
    assert svc.wait_receivers(10)
    assert svc.shutdown() == []
    assert svc.undelivered() == []
    reqs = metric_lines(out)
    assert len(reqs) == 2 and [calls_total(r) for r in reqs] == [20, 20]   # one line per metrics pipeline
    envs = sorted(any(kv.key == "env" for kv in r.resource_metrics[0].resource.attributes) for r in reqs)
    assert envs == [False, True]   # the resource processor changed its pipeline's copy only
    st = svc.stats()["exporters"]["file"]
    assert st["points_offered"] == 4 and st["offered"] == 0   # calls + duration, from both pipelines
    # stop order: the receiver, the traces pipeline, the connector (its flush emits), then metrics, exporters
    order = [e for e in fk.LOG if e.startswith(("shutdown", "flush"))]
    assert order[:2] == ["shutdown fake_finite", "flush fake_finite"]
    assert svc._order[0][1].startswith("exporters::") and svc._order[-1][1] == "receivers::fake_finite"
    kinds = [k for k, _, _ in svc._order]
    assert kinds.index("connector") < kinds.index("receiver")
    assert max(i for i, (_, p, _) in enumerate(svc._order) if "pipeline metrics" in p) < kinds.index("connector")


def test_undelivered_metric_points_are_reported(reg: Registry, tmp_path: Path) -> None:
    from tests.support.capture import free_port
    r = raw(tmp_path / "m.jsonl", metrics_procs=["batch"])
    r["exporters"]["otlphttp"] = {"endpoint": f"http://127.0.0.1:{free_port()}",   # nothing listens
                                  "retry_on_failure": {"enabled": False}, "sending_queue": {"enabled": False}}
    r["service"]["pipelines"]["metrics"]["exporters"] = ["otlphttp"]
    svc = Service(c.validate(r, reg))
    svc.start()
    assert svc.wait_receivers(10)
    svc.shutdown()
    assert svc.undelivered() == ["exporters::otlphttp: 2 of 2 metric points not delivered "
                                 "(2 failed, 0 refused by a full queue, 0 still pending)"]


def test_reload_keeps_an_unchanged_connector(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    conf = raw(out, events=10)
    conf["receivers"]["fake_finite"]["delay"] = 0.0
    r = Runner(lambda: c.validate(conf, reg))
    r.start()
    try:
        assert r.service is not None and r.service.wait_receivers(10)
        first = r.service.connectors["spanmetrics"]
        conf["exporters"]["recording"] = {"path": str(tmp_path / "rec.jsonl")}   # the exporter changes only
        assert r.reload()
        assert r.service.connectors["spanmetrics"] is first
    finally:
        assert r.stop() == []
    assert calls_total(metric_lines(out)[-1]) == 10
