"""OTEL_EXPORTER_OTLP_* environment variables as the otlp/otlphttp exporters' defaults (exporters/otlp_env.py)."""

from __future__ import annotations

import pytest

from exporters.otlp import OtlpConfig, OtlpExporter
from exporters.otlp_env import apply_env, parse_headers
from exporters.otlphttp import OtlpHttpConfig, OtlpHttpExporter
from service.model import Span, SpanKind
from tests.support.otlp_sink import GrpcSink, HttpSink


def test_parse_headers() -> None:
    assert parse_headers("api-key=a%20b, x=1,bad,=v") == {"api-key": "a b", "x": "1"}


def test_config_wins_and_signal_specific_wins_over_generic() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
           "http://t:1/custom", "OTEL_EXPORTER_OTLP_TIMEOUT": "1500", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "700",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "none", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca.pem"}
    h = apply_env({"compression": "gzip"}, "http", environ=env)
    assert h == {"compression": "gzip", "endpoint": "http://generic:4318", "traces_endpoint": "http://t:1/custom",
                 "encoding": "json", "timeout": 0.7, "tls": {"ca_file": "/ca.pem"}}
    g = apply_env({"tls": {"ca_file": "/mine.pem"}}, "grpc", environ=env)
    assert g["endpoint"] == "http://t:1/custom" and g["tls"] == {"ca_file": "/mine.pem", "insecure": True}
    assert apply_env({"endpoint": "x:1"}, "grpc", environ={}) == {"endpoint": "x:1"}


def test_a_bad_value_is_named_by_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli")
    with pytest.raises(ValueError, match="compression"):
        OtlpConfig.model_validate({})


@pytest.mark.parametrize("kind", ["otlp", "otlphttp"])
def test_an_exporter_configured_by_the_environment_alone(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = GrpcSink(required_headers={"x-team": "red"}) if kind == "otlp" else HttpSink(
        required_headers={"x-team": "red"})
    with sink:
        ep = f"http://127.0.0.1:{sink.port}"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", ep)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-team=red")
        e = (OtlpExporter("otlp/env", OtlpConfig.model_validate({})) if kind == "otlp"
             else OtlpHttpExporter("otlphttp/env", OtlpHttpConfig.model_validate({})))
        e.start()
        try:
            e.consume_spans([Span("GET", SpanKind.SERVER, 0, 1, {})])
            assert sink.wait_spans(1, 15)
        finally:
            e.shutdown()
