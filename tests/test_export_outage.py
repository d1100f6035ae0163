"""Export failures are visible while retrying (issue 19 item 4), against real endpoints.

The otlp and otlphttp exporters send to real loopback servers (tests/support/otlp_sink.py)
or to a port where nothing listens: the first failure of an outage is one warning with the
cause (connection refused, HTTP status and the body's message, a TLS error), further
failures are rate limited, and the first success after it says the export recovered.
The rate limit itself is checked with ``Outage`` on a stepped clock (30 s would be a long test).
"""

from __future__ import annotations

import itertools
import logging
import time

import pytest

from exporters.otlp import OtlpConfig, OtlpExporter
from exporters.otlphttp import OtlpHttpConfig, OtlpHttpExporter
from exporters.sender import Outage, SendError
from tests.support.capture import free_port
from tests.support.otlp_sink import FAST_RETRY, INVALID_ARGUMENT, GrpcSink, HttpSink, feed, make_tls

_ids = itertools.count()


def http_exporter(endpoint: str, **over) -> OtlpHttpExporter:
    cfg = {"endpoint": endpoint, "retry_on_failure": FAST_RETRY, **over}
    e = OtlpHttpExporter(f"otlphttp/outage{next(_ids)}", OtlpHttpConfig.model_validate(cfg))
    e.start()
    return e


def grpc_exporter(endpoint: str, **over) -> OtlpExporter:
    cfg = {"endpoint": endpoint, "tls": {"insecure": True}, "retry_on_failure": FAST_RETRY, **over}
    e = OtlpExporter(f"otlp/outage{next(_ids)}", OtlpConfig.model_validate(cfg))
    e.start()
    return e


def warnings_of(caplog: pytest.LogCaptureFixture, exporter_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith(f"{exporter_id}: ")]


def wait_for(pred, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("kind", ["otlphttp", "otlp"])
def test_closed_port_warns_once_with_the_cause_then_recovery(kind: str, caplog) -> None:
    port = free_port()
    caplog.set_level(logging.DEBUG, logger="wirespan.exporter")
    if kind == "otlphttp":
        e, sink, target = http_exporter(f"http://127.0.0.1:{port}"), HttpSink(port=port), \
            f"http://127.0.0.1:{port}/v1/traces"
    else:
        e, sink, target = grpc_exporter(f"127.0.0.1:{port}"), GrpcSink(port=port), f"127.0.0.1:{port}"
    try:
        feed(e, 24, 8)                                  # three batches, four consumers: concurrent failures
        assert wait_for(lambda: e.sender._m_retries._value.get() >= 6)
        warned = warnings_of(caplog, e.id)
        assert len(warned) == 1, warned                 # the first failure of the outage, once
        assert warned[0].startswith(f"{e.id}: export to {target} failed: ")
        assert "onnection refused" in warned[0] and warned[0].endswith("will retry; the spans are kept")
        with sink:
            assert sink.wait_spans(24, 15)
            assert wait_for(lambda: any("recovered" in m for m in warnings_of(caplog, e.id)))
            e.shutdown()
        warned = warnings_of(caplog, e.id)
        assert len(warned) == 2, warned
        assert warned[1].startswith(f"{e.id}: export to {target} recovered after ") and "0 spans dropped" in warned[1]
    finally:
        e.shutdown()


def test_http_error_status_shows_the_body_message(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wirespan.exporter")
    with HttpSink() as sink:
        sink.fail_next(2, message="backend overloaded, slow down")
        e = http_exporter(sink.endpoint)
        feed(e, 10, 10)
        assert sink.wait_spans(10, 15)
        e.shutdown()
    warned = warnings_of(caplog, e.id)
    assert warned[0].endswith("failed: HTTP 503: backend overloaded, slow down; will retry; the spans are kept")
    assert "recovered after" in warned[-1] and len(warned) == 2


def test_permanent_http_4xx_says_spans_dropped(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wirespan.exporter")
    with HttpSink() as sink:
        sink.fail_next(3, INVALID_ARGUMENT, message="span name too long")
        e = http_exporter(sink.endpoint, sending_queue={"enabled": False})
        for _ in range(3):
            feed(e, 5, 5)
        e.shutdown()
    warned = warnings_of(caplog, e.id)
    # three permanent failures in a row are one outage: one line, not one per batch
    assert warned == [f"{e.id}: export to {sink.endpoint}/v1/traces failed: HTTP 400: span name too long; "
                      "5 spans dropped (not retryable)"]


def test_tls_error_is_named(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wirespan.exporter")
    tls = make_tls(tmp_path / "tls")
    with HttpSink(tls=tls) as sink:                     # a CA the exporter does not trust
        e = http_exporter(f"https://localhost:{sink.port}")
        feed(e, 4, 4)
        assert wait_for(lambda: e.sender._m_retries._value.get() >= 1)
        e.shutdown()
    warned = warnings_of(caplog, e.id)
    assert len(warned) == 1 and "failed: TLS error: " in warned[0] and "CERTIFICATE_VERIFY_FAILED" in warned[0]


def test_outage_rate_limit_on_a_stepped_clock(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="wirespan.exporter")
    now = [100.0]
    o = Outage("otlp/x", "collector:4317", interval=30.0, clock=lambda: now[0])
    refused = SendError("transport", True, None, "[Errno 111] Connection refused")
    for _ in range(50):                                 # 50 failures within 10 s: one warning
        o.failed(refused)
        now[0] += 0.2
    now[0] += 25.0                                      # 35 s into the outage: one summary
    o.failed(SendError("http_503", True, None, "overloaded"), dropped=7, why="max_elapsed_time")
    o.failed(refused)
    now[0] += 5.0
    o.succeeded()
    o.succeeded()                                       # a second success says nothing more
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "otlp/x: export to collector:4317 failed: connection refused; will retry; the spans are kept",
        "otlp/x: export to collector:4317 still failing after 35s (51 failed attempts, 7 spans dropped): "
        "HTTP 503: overloaded",
        "otlp/x: export to collector:4317 recovered after 40.0s (52 failed attempts, 7 spans dropped meanwhile)",
    ]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 50   # every other attempt, at debug
    o.failed(refused)                                   # a new outage is said again
    last = caplog.records[-1]
    assert last.levelno == logging.WARNING and "failed: connection refused" in last.getMessage()


def test_causes_in_a_users_words() -> None:
    assert SendError("http_502", True, None, "").cause() == "HTTP 502"
    assert SendError("timeout", True, None, "read timed out").cause() == "timed out: read timed out"
    assert SendError("UNAVAILABLE", True, None, "no route").cause() == "gRPC UNAVAILABLE: no route"
    assert SendError("transport", True, None, "[SSL: WRONG_VERSION_NUMBER] wrong version number").cause() \
        .startswith("TLS error: [SSL: WRONG_VERSION_NUMBER]")
