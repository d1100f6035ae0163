"""otlphttp exporter against a real OTLP/HTTP endpoint (http.server decoding protobuf and JSON)."""

from __future__ import annotations

import itertools
import time

import pytest

from exporters.otlphttp import OtlpHttpConfig, OtlpHttpExporter, parse_retry_after
from tests.support.capture import free_port
from tests.support.otlp_sink import (
    FAST_RETRY,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    HttpSink,
    failed,
    feed,
    make_tls,
    metric,
    sent,
)

_ids = itertools.count()


def exporter(endpoint: str, **over) -> OtlpHttpExporter:
    cfg = {"endpoint": endpoint, "retry_on_failure": FAST_RETRY, **over}
    e = OtlpHttpExporter(f"otlphttp/t{next(_ids)}", OtlpHttpConfig.model_validate(cfg))
    e.start()
    return e


@pytest.mark.parametrize("encoding,compression", [("proto", "gzip"), ("proto", "none"), ("json", "gzip")])
def test_endpoint_up(encoding, compression):
    with HttpSink() as sink:
        e = exporter(sink.endpoint, encoding=encoding, compression=compression)
        spans = feed(e, 1000, 100)
        assert sink.wait_spans(1000, 10)
        e.shutdown()
        assert sink.span_count == 1000 and sink.unique_spans() == {s.span_id for s in spans}
        assert sent(e) == 1000
        h = sink.headers_seen[0]
        assert h["content-type"] == ("application/json" if encoding == "json" else "application/x-protobuf")
        assert h.get("content-encoding") == ("gzip" if compression == "gzip" else None)


def test_endpoint_down_at_start_then_up_after_5s():
    port = free_port()
    e = exporter(f"http://127.0.0.1:{port}", retry_on_failure={**FAST_RETRY, "max_interval": "500ms"})
    spans = feed(e, 500, 50)
    time.sleep(5)
    assert sent(e) == 0
    with HttpSink(port=port) as sink:
        assert sink.wait_spans(500, 15)
        e.shutdown()
        assert sink.span_count == 500 and sink.unique_spans() == {s.span_id for s in spans}
    assert sent(e) == 500 and failed(e, "retries_exhausted") == 0


def test_503_first_n_then_ok():
    with HttpSink() as sink:
        sink.fail_next(3)
        e = exporter(sink.endpoint, sending_queue={"num_consumers": 1})
        feed(e, 200, 200)
        assert sink.wait_spans(200, 10)
        e.shutdown()
        assert sink.calls == 4 and sink.span_count == 200
        assert metric("wirespan_exporter_retries_total", exporter=e.id) == 3


def test_429_retry_after_is_honoured():
    with HttpSink() as sink:
        sink.fail_next(1, RESOURCE_EXHAUSTED, retry_delay=1)
        e = exporter(sink.endpoint)
        t0 = time.monotonic()
        feed(e, 100, 100)
        assert sink.wait_spans(100, 10)
        assert time.monotonic() - t0 >= 1.0
        e.shutdown()
        assert sink.calls == 2 and sink.span_count == 100


def test_503_retry_after_is_honoured():
    with HttpSink() as sink:
        sink.fail_next(1, retry_delay=1)  # 503 Service Unavailable with Retry-After: 1
        e = exporter(sink.endpoint)
        t0 = time.monotonic()
        feed(e, 100, 100)
        assert sink.wait_spans(100, 10)
        assert time.monotonic() - t0 >= 1.0
        e.shutdown()
        assert sink.calls == 2 and sink.span_count == 100


def test_400_is_permanent():
    with HttpSink() as sink:
        sink.fail_next(1, INVALID_ARGUMENT)
        e = exporter(sink.endpoint, sending_queue={"num_consumers": 1})
        feed(e, 300, 100)
        assert sink.wait_spans(200, 10)
        e.shutdown()
        assert sink.calls == 3 and sink.span_count == 200
        assert failed(e, "http_400") == 100 and metric("wirespan_exporter_retries_total", exporter=e.id) == 0


@pytest.mark.parametrize("encoding", ["proto", "json"])
def test_partial_success(encoding):
    with HttpSink() as sink:
        sink.partial(5)
        e = exporter(sink.endpoint, encoding=encoding)
        feed(e, 40, 40)
        e.flush()
        e.shutdown()
        assert sink.span_count == 35 and sent(e) == 35 and failed(e, "rejected") == 5


def test_tls_with_self_signed_ca_and_required_header(tmp_path):
    tls = make_tls(tmp_path)
    with HttpSink(tls=tls, required_headers={"authorization": "Bearer t0k"}) as sink:
        e = exporter(f"https://localhost:{sink.port}", tls={"ca_file": str(tls.ca_cert)},
                     headers={"Authorization": "Bearer t0k"})
        feed(e, 300, 100)
        assert sink.wait_spans(300, 10)
        e.shutdown()
        assert sink.span_count == 300 and sent(e) == 300
        e2 = exporter(f"https://localhost:{sink.port}", tls={"ca_file": str(tls.ca_cert)})
        feed(e2, 10, 10)
        e2.flush()
        e2.shutdown()
        assert failed(e2, "http_401") == 10


def test_graceful_shutdown_drains():
    with HttpSink() as sink:
        sink.fail_next(3)
        e = exporter(sink.endpoint, sending_queue={"num_consumers": 2})
        feed(e, 2000, 200)
        e.shutdown()
        assert sink.span_count == 2000 and sent(e) == 2000


def test_retry_after_forms():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("999999") == 300.0


@pytest.mark.parametrize("bad", [
    {"endpoint": "localhost:4318"},
    {"encoding": "xml"},
    {"headers": {"Content-Type": "text/plain"}},
    {"tls": {"insecure_skip_verify": "maybe"}},
])
def test_config_errors(bad):
    with pytest.raises(ValueError):
        OtlpHttpConfig.model_validate(bad)


@pytest.mark.parametrize("cfg, found", [
    ({"endpoint": "http://collector:4318", "headers": {"Authorization": "Basic x"}},
     ["header authorization to collector"]),
    ({"endpoint": "http://collector:4318", "headers": {"X-Honeycomb-Team": "k", "DD-API-KEY": "k"}},
     ["headers dd-api-key, x-honeycomb-team to collector"]),
    ({"endpoint": "http://u:p@collector:4318"}, ["the user name/password of the endpoint to collector"]),
    ({"endpoint": "https://a/", "traces_endpoint": "http://b:4318/v1/traces", "headers": {"api-key": "k"}},
     ["header api-key to b"]),
    # a plaintext request through a proxy crosses the network even to a loopback endpoint
    ({"endpoint": "http://localhost:4318", "proxy_url": "http://proxy:3128", "headers": {"api-key": "k"}},
     ["header api-key to proxy"]),
    # TLS to the endpoint through a CONNECT tunnel: only the proxy's own password is exposed
    ({"endpoint": "https://collector", "proxy_url": "http://u:p@proxy:3128", "headers": {"api-key": "k"}},
     ["the user name/password of proxy_url to proxy"]),
    ({"endpoint": "http://127.0.0.1:4318", "headers": {"authorization": "x"}}, []),
    ({"endpoint": "http://u:p@localhost:4318"}, []),
    ({"endpoint": "https://collector:4318", "headers": {"authorization": "x"}}, []),
    ({"endpoint": "https://collector", "proxy_url": "https://u:p@proxy:3128"}, []),
])
def test_plaintext_credentials_are_refused_without_consent(cfg, found):
    if found:
        with pytest.raises(ValueError, match="credentials would be sent in plaintext: " + found[0]):
            OtlpHttpConfig.model_validate(cfg)
    consented = OtlpHttpConfig.model_validate({**cfg, "tls": {"insecure_credentials": True}})
    assert consented.plaintext_credentials() == found


def test_consent_warns_once_at_start_naming_the_exporter(caplog):
    cfg = OtlpHttpConfig.model_validate({"endpoint": "http://192.0.2.1:4318", "headers": {"x-api-key": "s3cret"},
                                         "tls": {"insecure_credentials": True}})
    e = OtlpHttpExporter("otlphttp/plain", cfg)
    with caplog.at_level("WARNING", logger="wirespan.exporter.otlphttp"), \
            HttpSink(required_headers={"authorization": "Bearer x"}) as sink:
        e.start()
        e.shutdown()
        # plaintext to loopback: credentials allowed without consent, sent, and no warning
        quiet = exporter(sink.endpoint, headers={"authorization": "Bearer x"})
        feed(quiet, 10, 10)
        assert sink.wait_spans(10, 10)
        quiet.shutdown()
    warned = [r.getMessage() for r in caplog.records if "plaintext" in r.getMessage()]
    assert warned == ["otlphttp/plain: sending credentials in plaintext (tls::insecure_credentials: true): "
                      "header x-api-key to 192.0.2.1"]
    assert "s3cret" not in warned[0]


def test_traces_endpoint_overrides():
    assert OtlpHttpConfig(endpoint="http://a:1/").url() == "http://a:1/v1/traces"
    assert OtlpHttpConfig(traces_endpoint="https://b/otlp/traces").url() == "https://b/otlp/traces"
