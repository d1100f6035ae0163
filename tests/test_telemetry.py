"""Self-telemetry endpoints over real HTTP on free loopback ports: /metrics and health."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from service import config as c
from service import telemetry as tm
from service.pipeline import Runner
from service.registry import Registry
from tests.support import pipeline_fakes as fk
from tests.support.capture import free_port


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


class GateExporter(fk.RecordingExporter):
    """start() and shutdown() wait for the test to open a gate, so health can be read mid-way."""

    type = "gate"
    start_gate = threading.Event()
    stop_gate = threading.Event()

    def start(self) -> None:
        assert self.start_gate.wait(10)
        super().start()

    def shutdown(self) -> None:
        assert self.stop_gate.wait(10)
        super().shutdown()


@pytest.fixture
def reg() -> Registry:
    r = Registry(entry_points=False)
    r.register("receiver", "fake_live", fk.FakeLiveReceiver)
    r.register("processor", "fake_events", fk.FakeEventProcessor)
    r.register("exporter", "recording", fk.RecordingExporter)
    r.register("exporter", "gate", GateExporter)
    return r


def make_load(reg: Registry, telemetry: dict, exporter: str = "recording", rid: str = "fake_live") -> Any:
    def load() -> c.Config:
        return c.validate({
            "receivers": {rid: {"interval": 0.005}} if rid == "fake_live" else
            {rid: {"class": "tests.support.pipeline_fakes:FakeLiveReceiver", "interval": 0.005}},
            "processors": {"fake_events": {}},
            "exporters": {exporter: {}},
            "service": {"telemetry": telemetry,
                        "pipelines": {"traces": {"receivers": [rid], "processors": ["fake_events"],
                                                 "exporters": [exporter]}}},
        }, reg)
    return load


def test_metrics_endpoint_serves_pipeline_and_process_metrics(reg: Registry) -> None:
    mport, hport = free_port(), free_port()
    r = Runner(make_load(reg, {"metrics": {"address": f"127.0.0.1:{mport}"},
                               "health": {"address": f"127.0.0.1:{hport}"}}, rid="tele_rcv"))
    r.start()
    try:
        assert r.metrics_port == mport and r.health_port == hport
        deadline = time.monotonic() + 10
        while tm.counter_value(tm.RECEIVER_ACCEPTED, receiver="tele_rcv") < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, ctype, body = get(f"http://127.0.0.1:{mport}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        lines = body.splitlines()

        def sample(prefix: str) -> float:
            return float(next(ln for ln in lines if ln.startswith(prefix)).rsplit(" ", 1)[1])
        assert sample('wirespan_receiver_accepted_events_total{receiver="tele_rcv"}') >= 5
        assert sample('wirespan_processor_incoming_items_total{processor="fake_events"}') >= 5
        assert sample('wirespan_processor_outgoing_items_total{processor="fake_events"}') >= 5
        assert sample('wirespan_exporter_sent_spans_total{exporter="recording"}') >= 5
        assert sample("wirespan_process_memory_rss ") > 10 * 1024 * 1024
        assert sample("wirespan_process_cpu_seconds ") > 0
        assert sample("wirespan_process_uptime ") > 0
        assert sample("process_resident_memory_bytes ") > 0       # prometheus_client's own
        for name in ("wirespan_receiver_dropped_events_total counter", "wirespan_parser_messages_total counter",
                     "wirespan_exporter_send_failed_spans_total counter",
                     "wirespan_exporter_enqueue_failed_spans_total counter",
                     "wirespan_exporter_queue_size gauge", "wirespan_exporter_queue_capacity gauge"):
            assert f"# TYPE {name}" in body, name
        assert get(f"http://127.0.0.1:{mport}/other")[0] == 404
        status, ctype, body = get(f"http://127.0.0.1:{hport}/")
        assert status == 200 and ctype == "application/json"
        assert json.loads(body)["status"] == "Server available"
    finally:
        assert r.stop() == []
    # nothing listens after stop
    for p in (mport, hport):
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", p))


def test_health_is_503_while_starting_and_stopping(reg: Registry) -> None:
    hport = free_port()
    GateExporter.start_gate.clear()
    GateExporter.stop_gate.clear()
    r = Runner(make_load(reg, {"metrics": {"address": ""}, "health": {"address": f"127.0.0.1:{hport}"}}, "gate"))
    t = threading.Thread(target=r.start)
    t.start()
    deadline = time.monotonic() + 10
    while r.health_port is None and time.monotonic() < deadline:
        time.sleep(0.01)
    status, _, body = get(f"http://127.0.0.1:{hport}/")
    assert status == 503 and json.loads(body)["status"] == "Server not available"
    GateExporter.start_gate.set()
    t.join(10)
    assert get(f"http://127.0.0.1:{hport}/")[0] == 200
    t = threading.Thread(target=r.stop)
    t.start()
    deadline = time.monotonic() + 10
    while r.state != "stopping" and time.monotonic() < deadline:
        time.sleep(0.01)
    status, _, body = get(f"http://127.0.0.1:{hport}/")
    assert status == 503 and json.loads(body)["state"] == "stopping"
    GateExporter.stop_gate.set()
    t.join(10)
    assert r.state == "stopped"


def test_endpoints_can_be_disabled(reg: Registry) -> None:
    r = Runner(make_load(reg, {"metrics": {"level": "none"}, "health": {"address": ""}}))
    r.start()
    try:
        assert r.metrics_port is None and r.health_port is None
    finally:
        r.stop()


def test_port_in_use_is_a_warning_and_the_pipelines_run(reg: Registry, caplog: pytest.LogCaptureFixture) -> None:
    """A port taken (a Collector next door) is said once; the pipelines run without that endpoint,
    the other endpoint serves, and a reload once the port is free opens it (issue 19 item 6)."""
    hport = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = Runner(make_load(reg, {"metrics": {"address": f"127.0.0.1:{port}"},
                                   "health": {"address": f"127.0.0.1:{hport}"}}))
        with caplog.at_level(logging.WARNING, logger="wirespan.pipeline"):
            r.start()
        try:
            assert r.ready()[0] and r.metrics_port is None and r.health_port == hport
            assert get(f"http://127.0.0.1:{hport}/")[0] == 200
            warned = [m for m in caplog.messages if "cannot listen" in m]
            assert warned == [f"service::telemetry::metrics::address: cannot listen on 127.0.0.1:{port}: address "
                              "already in use; running without the metrics endpoint (free the port or set another "
                              "address, then SIGHUP)"]
        except BaseException:
            r.stop()
            raise
    try:
        assert r.reload() is True                   # the port is free now: the same config opens it
        assert r.metrics_port == port and get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        r.stop()


def test_malformed_telemetry_address_is_a_config_error(reg: Registry) -> None:
    r = Runner(make_load(reg, {"metrics": {"address": "localhost"}, "health": {"address": ""}}))
    with pytest.raises(c.ConfigError, match=r"service::telemetry::metrics::address: address 'localhost' must be"):
        r.start()


def test_parse_address() -> None:
    assert tm.parse_address("localhost:8888") == ("localhost", 8888)
    assert tm.parse_address(":13133") == ("localhost", 13133)
    assert tm.parse_address("[::1]:9") == ("::1", 9)
    for bad in ("8888", "host:port", "h:70000"):
        with pytest.raises(ValueError):
            tm.parse_address(bad)


def test_counter_value_sums_matching_labels() -> None:
    tm.RECEIVER_DROPPED.labels(receiver="cv_test", reason="a").inc(2)
    tm.RECEIVER_DROPPED.labels(receiver="cv_test", reason="b").inc(3)
    assert tm.counter_value(tm.RECEIVER_DROPPED, receiver="cv_test") == 5
    assert tm.counter_value(tm.RECEIVER_DROPPED, receiver="cv_test", reason="b") == 3
