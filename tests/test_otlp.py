"""otlp exporter against a real OTLP/gRPC endpoint (grpcio + official TraceService).

Every scenario asserts exact span counts at the endpoint and in the self-metrics.
"""

from __future__ import annotations

import itertools
import re
import time
import tracemalloc

import grpc
import pytest

from exporters.otlp import OtlpConfig, OtlpExporter
from tests.support.capture import free_port
from tests.support.otlp_sink import (
    FAST_RETRY,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    GrpcSink,
    failed,
    feed,
    make_spans,
    make_tls,
    metric,
    sent,
)

_ids = itertools.count()


def exporter(endpoint: str, **over) -> OtlpExporter:
    eid = f"otlp/t{next(_ids)}"
    cfg = {"endpoint": endpoint, "tls": {"insecure": True}, "retry_on_failure": FAST_RETRY, **over}
    e = OtlpExporter(eid, OtlpConfig.model_validate(cfg))
    e.start()
    return e


def test_endpoint_up():
    with GrpcSink() as sink:
        e = exporter(sink.endpoint)
        spans = feed(e, 1000, 100)
        assert sink.wait_spans(1000, 10)
        e.flush()
        e.shutdown()
        assert sink.span_count == 1000
        assert sink.unique_spans() == {s.span_id for s in spans}
        assert sent(e) == 1000
        assert "wirespan/" in sink.headers_seen[0]["user-agent"]


def test_endpoint_down_at_start_then_up_after_5s():
    port = free_port()
    e = exporter(f"127.0.0.1:{port}", retry_on_failure={**FAST_RETRY, "max_interval": "500ms"})
    spans = feed(e, 500, 50)
    time.sleep(5)
    assert sent(e) == 0
    assert metric("wirespan_exporter_queue_size", exporter=e.id) == 500
    with GrpcSink(port=port) as sink:
        assert sink.wait_spans(500, 15)
        e.shutdown()
        assert sink.unique_spans() == {s.span_id for s in spans}
        assert sink.span_count == 500
    assert sent(e) == 500
    assert failed(e, "UNAVAILABLE") == 0 and failed(e, "retries_exhausted") == 0
    assert metric("wirespan_exporter_retries_total", exporter=e.id) > 0


def test_refuses_first_n_with_unavailable():
    with GrpcSink() as sink:
        sink.fail_next(3)
        e = exporter(sink.endpoint, sending_queue={"num_consumers": 1})
        feed(e, 200, 200)
        assert sink.wait_spans(200, 10)
        e.shutdown()
        assert sink.calls == 4 and sink.span_count == 200
        assert metric("wirespan_exporter_retries_total", exporter=e.id) == 3
        assert sent(e) == 200


def test_resource_exhausted_with_retry_info_is_retried_after_the_delay():
    with GrpcSink() as sink:
        sink.fail_next(1, RESOURCE_EXHAUSTED, retry_delay=1.0)
        e = exporter(sink.endpoint)
        t0 = time.monotonic()
        feed(e, 100, 100)
        assert sink.wait_spans(100, 10)
        assert time.monotonic() - t0 >= 1.0  # the server's delay, not our 20 ms backoff
        e.shutdown()
        assert sink.calls == 2 and sink.span_count == 100 and sent(e) == 100


@pytest.mark.parametrize("code", ["UNAVAILABLE", "ABORTED"])
def test_retry_info_on_any_retryable_code_is_honoured(code):
    with GrpcSink() as sink:
        sink.fail_next(1, (getattr(grpc.StatusCode, code), 503), retry_delay=1.0)
        e = exporter(sink.endpoint, sending_queue={"num_consumers": 1})
        t0 = time.monotonic()
        feed(e, 100, 100)
        assert sink.wait_spans(100, 10)
        assert time.monotonic() - t0 >= 1.0  # the server's delay, not our 20 ms backoff
        e.shutdown()
        assert sink.calls == 2 and sink.span_count == 100 and sent(e) == 100
        assert metric("wirespan_exporter_retries_total", exporter=e.id) == 1


def test_resource_exhausted_without_retry_info_is_permanent():
    with GrpcSink() as sink:
        sink.fail_next(1, RESOURCE_EXHAUSTED)
        e = exporter(sink.endpoint)
        feed(e, 100, 100)
        e.flush()
        e.shutdown()
        assert sink.calls == 1 and sink.span_count == 0
        assert failed(e, "RESOURCE_EXHAUSTED") == 100


def test_permanent_error_is_counted_not_retried():
    with GrpcSink() as sink:
        sink.fail_next(1, INVALID_ARGUMENT)
        e = exporter(sink.endpoint, sending_queue={"num_consumers": 1})
        feed(e, 300, 100)  # first request refused for good, the next two accepted
        assert sink.wait_spans(200, 10)
        e.shutdown()
        assert sink.calls == 3 and sink.span_count == 200
        assert failed(e, "INVALID_ARGUMENT") == 100
        assert metric("wirespan_exporter_retries_total", exporter=e.id) == 0
        assert sent(e) == 200


def test_partial_success_counts_rejected():
    with GrpcSink() as sink:
        sink.partial(7)
        e = exporter(sink.endpoint)
        feed(e, 50, 50)
        e.flush()
        e.shutdown()
        assert sink.span_count == 43
        assert sent(e) == 43 and failed(e, "rejected") == 7


def test_queue_overflow_drops_are_counted_and_memory_bounded():
    port = free_port()
    e = exporter(f"127.0.0.1:{port}", sending_queue={"queue_size": 1000, "num_consumers": 2},
                 retry_on_failure={**FAST_RETRY, "max_interval": "200ms"})
    feed(e, 1000, 100)  # fills the queue exactly
    spans = make_spans(100)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for _ in range(200):  # 20,000 more spans against a full queue: all refused
        e.consume_spans(spans)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert metric("wirespan_exporter_enqueue_failed_spans_total", exporter=e.id) == 20_000
    assert metric("wirespan_exporter_queue_size", exporter=e.id) == 1000
    assert metric("wirespan_exporter_queue_capacity", exporter=e.id) == 1000
    assert grown < 256 * 1024, f"refused data must not be kept: grew {grown} bytes"
    with GrpcSink(port=port) as sink:
        assert sink.wait_spans(1000, 15)
        e.shutdown()
        assert sink.span_count == 1000
    assert sent(e) == 1000


def test_block_on_overflow_waits_instead_of_dropping():
    with GrpcSink() as sink:
        sink.fail_next(5)
        e = exporter(sink.endpoint, sending_queue={"queue_size": 200, "num_consumers": 1, "block_on_overflow": True})
        feed(e, 1000, 100)  # blocks until consumers make room; nothing refused
        assert sink.wait_spans(1000, 15)
        e.shutdown()
        assert sink.span_count == 1000
        assert metric("wirespan_exporter_enqueue_failed_spans_total", exporter=e.id) == 0


def test_tls_with_self_signed_ca_and_required_header(tmp_path, monkeypatch):
    tls = make_tls(tmp_path)
    with GrpcSink(tls=tls, required_headers={"api-key": "s3cret"}) as sink:
        e = exporter(f"localhost:{sink.port}", tls={"ca_file": str(tls.ca_cert)}, headers={"API-Key": "s3cret"})
        feed(e, 300, 100)
        assert sink.wait_spans(300, 10)
        e.shutdown()
        assert sink.span_count == 300 and sent(e) == 300
        assert all(h.get("api-key") == "s3cret" for h in sink.headers_seen)
        # Without the header: UNAUTHENTICATED is permanent, counted, never retried.
        calls = sink.calls
        e2 = exporter(f"localhost:{sink.port}", tls={"ca_file": str(tls.ca_cert)})
        feed(e2, 10, 10)
        e2.flush()
        e2.shutdown()
        assert sink.calls == calls + 1 and failed(e2, "UNAUTHENTICATED") == 10
        # server_name_override: connect by IP, verify the certificate's name.
        e3 = exporter(f"127.0.0.1:{sink.port}", tls={"ca_file": str(tls.ca_cert), "server_name_override": "localhost"},
                      headers={"api-key": "s3cret"})
        feed(e3, 10, 10)
        e3.flush()
        e3.shutdown()
        assert sent(e3) == 10 and sink.span_count == 310


def test_tls_untrusted_server_is_not_accepted(tmp_path):
    tls = make_tls(tmp_path / "a")
    other = make_tls(tmp_path / "b")
    with GrpcSink(tls=tls) as sink:
        e = exporter(f"localhost:{sink.port}", tls={"ca_file": str(other.ca_cert)},
                     retry_on_failure={**FAST_RETRY, "max_elapsed_time": "300ms", "initial_interval": "50ms"})
        feed(e, 10, 10)
        e.flush()
        e.shutdown()
        assert sink.calls == 0 and failed(e, "retries_exhausted") == 10


def test_graceful_shutdown_drains_the_memory_queue():
    with GrpcSink() as sink:
        sink.fail_next(4)
        e = exporter(sink.endpoint, sending_queue={"num_consumers": 2})
        spans = feed(e, 2000, 100)
        e.shutdown()  # no flush first: shutdown itself must drain
        assert sink.span_count == 2000 and sink.unique_spans() == {s.span_id for s in spans}
        assert sent(e) == 2000


def test_shutdown_with_endpoint_down_counts_what_is_left():
    port = free_port()
    e = exporter(f"127.0.0.1:{port}", sending_queue={"drain_timeout": "300ms", "num_consumers": 1})
    feed(e, 500, 100)
    e.shutdown()
    assert failed(e, "shutdown") == 500 and sent(e) == 0


def test_no_queue_sends_synchronously():
    with GrpcSink() as sink:
        sink.fail_next(2)
        e = exporter(sink.endpoint, sending_queue={"enabled": False}, compression="none")
        feed(e, 100, 50)
        assert sink.span_count == 100  # consume_spans returned only after the backend accepted
        e.shutdown()


@pytest.mark.parametrize("bad", [
    {"endpoint": "localhost"},
    {"compression": "zstd"},
    {"timeout": "5 parsecs"},
    {"retry_on_failure": {"initial_interval": "10s", "max_interval": "1s"}},
    {"sending_queue": {"queue_size": 0}},
    {"tls": {"cert_file": "/nonexistent"}},
    {"headers": {"bad key": "x"}},
    {"endpiont": "localhost:4317"},
])
def test_config_errors(bad):
    with pytest.raises(ValueError):
        OtlpConfig.model_validate(bad)


def test_config_durations_and_defaults():
    c = OtlpConfig.model_validate({"timeout": "1m30s", "retry_on_failure": {"initial_interval": "200ms"}})
    assert c.timeout == 90.0 and c.retry_on_failure.initial_interval == 0.2
    assert c.compression == "gzip" and c.retry_on_failure.max_elapsed_time == 300.0
    assert c.target_and_secure() == ("localhost:4317", True)
    assert OtlpConfig(endpoint="http://h:1").target_and_secure() == ("h:1", False)


def test_end_to_end_capture_through_span_processors_to_grpc(tmp_path):
    """pcap -> protocols -> memory_limiter, attributes, filter, redaction, batch -> otlp + file (real runtime)."""
    import json

    from bench.gen_http_capture import generate
    from service import config as c
    from service.pipeline import Service

    cap = tmp_path / "http.pcap"
    conns, reqs = 4, 50
    generate(str(cap), connections=conns, requests=reqs)
    health = sum(1 for ci in range(conns) for i in range(reqs) if (ci + i) % 5 == 2)  # "/health" requests
    with GrpcSink() as sink:
        raw = {
            "receivers": {"pcap": {"path": str(cap)}},
            "processors": {
                "protocols": {},
                "memory_limiter": {"check_interval": "1s", "limit_percentage": 90},
                "attributes": {"actions": [{"key": "deployment.environment.name", "action": "insert",
                                            "value": "test"}]},
                "filter": {"spans": {"exclude": [{"attributes": {"url.path": "/health"}}]}},
                "redaction": {},
                "batch": {"timeout": "50ms", "send_batch_size": 64},
            },
            "exporters": {
                "otlp": {"endpoint": sink.endpoint, "tls": {"insecure": True}},
                "file": {"path": str(tmp_path / "spans.jsonl")},
            },
            "service": {"pipelines": {"traces": {
                "receivers": ["pcap"],
                "processors": ["protocols", "memory_limiter", "attributes", "filter", "redaction", "batch"],
                "exporters": ["otlp", "file"]}},
                "telemetry": {"metrics": {"address": ""}, "health": {"address": ""}}},
        }
        svc = Service(c.validate(raw))
        svc.start()
        assert svc.wait_receivers(30)
        svc.shutdown()
        want = conns * reqs - health
        assert sink.span_count == want
        lines = (tmp_path / "spans.jsonl").read_text().splitlines()
        in_file = sum(len(ss["spans"]) for ln in lines for rs in json.loads(ln)["resourceSpans"]
                      for ss in rs["scopeSpans"])
        assert in_file == want
        assert metric("wirespan_processor_dropped_items_total", processor="filter", reason="filtered") >= health


# Config cases for the export components: one YAML per case in tests/testdata/export (typos included),
# loaded through the real config loader and registry, with the exact Collector-style error expected.
EXPORT_CASES = {
    "attributes_extract_no_groups.yaml": "processors::attributes::actions::0: action extract: pattern needs named",
    "filter_kind_typo.yaml": "processors::filter::spans::exclude::0::kind: unknown span kind(s) ['sever']",
    "memory_limiter_two_limits.yaml": "processors::memory_limiter: set exactly one of limit_mib or limit_percentage",
    "otlp_compression_typo.yaml": "exporters::otlp::compression: Input should be 'gzip' or 'none'",
    "otlp_no_port.yaml": "exporters::otlp::endpoint: endpoint must be host:port",
    "otlp_queue_storage_without_queue.yaml": "exporters::otlp::sending_queue: storage needs the sending queue enabled",
    "otlp_retry_typo.yaml": "exporters::otlp::retry_on_failure: unknown option 'initial_intervall'",
    "otlphttp_encoding_typo.yaml": "exporters::otlphttp::encoding: Input should be 'proto' or 'json'",
    "redaction_option_typo.yaml": "processors::redaction: unknown option 'blocked_key'",
    "otlp_credentials_plaintext.yaml": "exporters::otlp: credentials would be sent in plaintext: header "
                                       "authorization to collector.example.com. Use TLS, or set "
                                       "tls::insecure_credentials: true",
    "otlphttp_credentials_plaintext.yaml": "exporters::otlphttp/vendor: credentials would be sent in plaintext: "
                                           "the user name/password of the endpoint to 10.1.2.3.",
}


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_export_config_cases(name):
    from pathlib import Path

    from service import config as c
    from service.config import ConfigError
    with pytest.raises(ConfigError) as ei:
        c.load([Path(__file__).parent / "testdata" / "export" / name])
    assert any(e.startswith(EXPORT_CASES[name]) for e in ei.value.errors), ei.value.errors


def test_export_config_valid_and_every_case_listed():
    from pathlib import Path

    from service import config as c
    data = Path(__file__).parent / "testdata" / "export"
    assert {p.name for p in data.glob("*.yaml")} == set(EXPORT_CASES) | {"valid.yaml"}
    cfg = c.load([data / "valid.yaml"])
    otlp = cfg.exporters["otlp"].config
    assert otlp.retry_on_failure.initial_interval == 0.2 and otlp.retry_on_failure.max_elapsed_time == 120
    assert otlp.sending_queue.storage == "/var/lib/wirespan/queue" and otlp.headers == {"api-key": "abc"}
    assert cfg.exporters["otlphttp"].config.url() == "https://collector:4318/v1/traces"
    assert cfg.processors["memory_limiter"].config.limits_bytes() == (384 << 20, 512 << 20)
    assert cfg.pipelines["traces"].processors[1:6] == ["memory_limiter", "attributes", "resource", "filter",
                                                       "redaction"]


@pytest.mark.parametrize("endpoint, tls, headers, found", [
    ("collector:4317", {"insecure": True}, {"Authorization": "Bearer x"}, ["header authorization to collector"]),
    ("http://10.0.0.7:4317", {}, {"x-api-key": "k", "X-SF-Token": "t", "x-tenant": "a"},
     ["headers x-api-key, x-sf-token to 10.0.0.7"]),
    ("[2001:db8::1]:4317", {"insecure": True}, {"lightstep-access-token": "t"},
     ["header lightstep-access-token to 2001:db8::1"]),
    ("127.0.0.2:4317", {"insecure": True}, {"authorization": "x"}, []),      # loopback: exempt
    ("[::1]:4317", {"insecure": True}, {"authorization": "x"}, []),
    ("localhost:4317", {"insecure": True}, {"authorization": "x"}, []),
    ("collector:4317", {}, {"authorization": "x"}, []),                        # TLS
    ("collector:4317", {"insecure": True}, {"x-tenant": "a", "authorization": ""}, []),  # no credential
])
def test_plaintext_credentials_are_refused_without_consent(endpoint, tls, headers, found):
    cfg = {"endpoint": endpoint, "tls": tls, "headers": headers}
    if found:
        with pytest.raises(ValueError, match="credentials would be sent in plaintext: " + re.escape(found[0])):
            OtlpConfig.model_validate(cfg)
    consented = OtlpConfig.model_validate({**cfg, "tls": {**tls, "insecure_credentials": True}})
    assert consented.plaintext_credentials() == found


def test_consent_warns_once_at_start_naming_the_exporter(caplog):
    cfg = OtlpConfig.model_validate({"endpoint": "192.0.2.1:4317", "headers": {"authorization": "Bearer x"},
                                     "tls": {"insecure": True, "insecure_credentials": True}})
    e = OtlpExporter("otlp/plain", cfg)
    with caplog.at_level("WARNING", logger="wirespan.exporter.otlp"):
        e.start()
        e.shutdown()
    warned = [r.getMessage() for r in caplog.records if "plaintext" in r.getMessage()]
    assert warned == ["otlp/plain: sending credentials in plaintext (tls::insecure_credentials: true): "
                      "header authorization to 192.0.2.1"]
    assert "Bearer" not in warned[0]  # the secret itself is never logged


def test_tls_with_a_ca_made_by_the_openssl_command(tmp_path):
    """The fallback of make_tls when ``cryptography`` is missing, checked against a real TLS endpoint."""
    import shutil

    from tests.support.otlp_sink import _make_tls_openssl
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed")
    tls = _make_tls_openssl(tmp_path, "localhost")
    with GrpcSink(tls=tls) as sink:
        e = exporter(f"localhost:{sink.port}", tls={"ca_file": str(tls.ca_cert)})
        feed(e, 20, 10)
        e.flush()
        e.shutdown()
        assert sink.span_count == 20 and sent(e) == 20
