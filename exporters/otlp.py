"""``otlp`` exporter: OTLP/gRPC to any backend (Collector, Tempo, Jaeger, vendors).

Contract: spans are encoded once by ``service.model.spans_to_otlp_bytes`` (the
single conversion, byte-identical to ``spans_to_otlp(...).SerializeToString()``);
the bytes go on the sending queue (in memory or on disk) and are
sent as-is on every attempt through a raw ``unary_unary`` on the official
``TraceService/Export`` method (no re-serialization per retry). Retry policy is
the OTLP specification's: the retryable gRPC codes below, RESOURCE_EXHAUSTED
only when the server attaches ``google.rpc.RetryInfo``, every other code
permanent and counted. A RetryInfo delay is honoured on every retryable code
(UNAVAILABLE included), as the Collector does. ``partial_success`` is logged and its
rejected spans counted. Options are named as the Collector's otlp exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
from pydantic import Field, field_validator, model_validator

from exporters.credentials import consent_error, plaintext_credentials
from exporters.otlp_env import apply_env
from exporters.sender import (
    DEFAULT_TIMEOUT,
    Compression,
    Duration,
    QueueConfig,
    QueuedExporter,
    RetryConfig,
    SendError,
    TlsConfig,
)
from service.component import ComponentConfig
from service.metrics import metrics_to_otlp_bytes
from service.model import SCOPE_VERSION, spans_to_otlp_bytes

__all__ = ["OtlpExporter", "OtlpConfig", "RETRYABLE_CODES", "retry_delay_from_metadata", "EXPORT_METHOD"]

log = logging.getLogger("wirespan.exporter.otlp")

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS_EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
DEFAULT_ENDPOINT = "localhost:4317"
#: OTLP spec, "Failures" (otlp.md): these are transient; everything else is permanent.
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DATA_LOSS,
})
#: Reconnect backoff of the channel itself (gRPC core defaults: 1 s growing to 120 s). Capped
#: low so a backend that comes back is found within one of our retry intervals.
MIN_RECONNECT_BACKOFF_MS = 200
MAX_RECONNECT_BACKOFF_MS = 5_000
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_RETRY_INFO_KEY = "google.rpc.retryinfo-bin"  # what opentelemetry-python servers/clients also use
_RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


class OtlpConfig(ComponentConfig):
    @model_validator(mode="before")
    @classmethod
    def _otel_env(cls, values: Any) -> Any:
        """Options the config does not give, from OTEL_EXPORTER_OTLP_* (exporters/otlp_env.py)."""
        return apply_env(values, "grpc")

    endpoint: str = DEFAULT_ENDPOINT
    tls: TlsConfig = Field(default_factory=TlsConfig)
    headers: dict[str, str] = Field(default_factory=dict)
    compression: Compression = "gzip"
    timeout: Duration = DEFAULT_TIMEOUT
    retry_on_failure: RetryConfig = Field(default_factory=RetryConfig)
    sending_queue: QueueConfig = Field(default_factory=QueueConfig)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        host = v.split("://", 1)[-1]
        if not host or "/" in host.rstrip("/") or ":" not in host:
            raise ValueError(f"endpoint must be host:port (optionally http:// or https://), got {v!r}")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        # gRPC metadata keys are lower-case ASCII; "-bin" keys would need bytes values.
        out = {}
        for k, val in v.items():
            key = k.strip().lower()
            if not key or key.endswith("-bin") or not all(c.isalnum() or c in "-_." for c in key):
                raise ValueError(f"invalid gRPC metadata key {k!r}")
            out[key] = str(val)
        return out

    @model_validator(mode="after")
    def _check(self) -> OtlpConfig:
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")
        found = self.plaintext_credentials()
        if found and not self.tls.insecure_credentials:
            raise ValueError(consent_error(found))
        return self

    def plaintext_credentials(self) -> list[str]:
        """Credentials this config sends unencrypted off the machine (exporters/credentials.py)."""
        target, secure = self.target_and_secure()
        return plaintext_credentials(self.headers, target, not secure)

    def target_and_secure(self) -> tuple[str, bool]:
        """The gRPC target and whether TLS is used (an explicit scheme decides, as in the Collector)."""
        ep = self.endpoint
        if ep.startswith("https://"):
            return ep[8:].rstrip("/"), True
        if ep.startswith("http://"):
            return ep[7:].rstrip("/"), False
        return ep.split("://", 1)[-1].rstrip("/"), not self.tls.insecure


def retry_delay_from_metadata(md: Sequence[tuple[str, Any]] | None) -> float | None:
    """The server's RetryInfo delay in seconds, from gRPC trailing metadata, or None."""
    if not md:
        return None
    from google.rpc import error_details_pb2, status_pb2
    for key, value in md:
        try:
            if key == _STATUS_DETAILS_KEY:
                st = status_pb2.Status.FromString(value)
                for d in st.details:
                    if d.type_url == _RETRY_INFO_TYPE:
                        ri = error_details_pb2.RetryInfo.FromString(d.value)
                        return ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
            elif key == _RETRY_INFO_KEY:
                ri = error_details_pb2.RetryInfo.FromString(value)
                return ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
        except Exception:  # a garbled detail is no reason to fail the export decision
            log.debug("unparsable %s trailer ignored", key)
    return None


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


class OtlpExporter(QueuedExporter):
    """OTLP/gRPC exporter (type ``otlp``)."""

    type = "otlp"
    Config = OtlpConfig

    def __init__(self, id: str, config: OtlpConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._metadata = tuple(config.headers.items())

    def _open(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        cfg: OtlpConfig = self.config
        target, secure = cfg.target_and_secure()
        found = cfg.plaintext_credentials()
        if found:  # validation let it through: tls::insecure_credentials is set
            log.warning("%s: sending credentials in plaintext (tls::insecure_credentials: true): %s",
                        self.id, "; ".join(found))
        options: list[tuple[str, Any]] = [
            ("grpc.primary_user_agent", f"wirespan/{SCOPE_VERSION}"),
            ("grpc.enable_retries", 0),  # one retry policy: ours
            ("grpc.min_reconnect_backoff_ms", MIN_RECONNECT_BACKOFF_MS),
            ("grpc.initial_reconnect_backoff_ms", MIN_RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ]
        compression = grpc.Compression.Gzip if cfg.compression == "gzip" else grpc.Compression.NoCompression
        if secure:
            t = cfg.tls
            if t.server_name_override:
                options.append(("grpc.ssl_target_name_override", t.server_name_override))
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(t.ca_file), private_key=_read(t.key_file),
                certificate_chain=_read(t.cert_file))
            self._channel = grpc.secure_channel(target, creds, options=options, compression=compression)
        else:
            self._channel = grpc.insecure_channel(target, options=options, compression=compression)
        # Raw bytes in (already serialized, possibly read back from disk), parsed response out.
        self._call = self._channel.unary_unary(
            EXPORT_METHOD, request_serializer=None,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        self._metrics_call = self._channel.unary_unary(
            METRICS_EXPORT_METHOD, request_serializer=None,
            response_deserializer=metrics_service_pb2.ExportMetricsServiceResponse.FromString)

    def _close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _encode(self, spans: Sequence[Any]) -> bytes:
        return spans_to_otlp_bytes(spans)

    def _encode_metrics(self, batch: Sequence[Any]) -> bytes:
        return metrics_to_otlp_bytes(batch)

    def _send(self, data: bytes) -> int:
        resp = self._attempt(self._call, data)
        ps = resp.partial_success
        if ps.rejected_spans or ps.error_message:
            log.warning("%s: backend rejected %d spans: %s", self.id, ps.rejected_spans, ps.error_message)
        return int(ps.rejected_spans)

    def _send_metrics(self, data: bytes) -> int:
        resp = self._attempt(self._metrics_call, data)
        ps = resp.partial_success
        if ps.rejected_data_points or ps.error_message:
            log.warning("%s: backend rejected %d metric points: %s", self.id, ps.rejected_data_points,
                        ps.error_message)
        return int(ps.rejected_data_points)

    def _attempt(self, call: Any, data: bytes) -> Any:
        """One Export call; a failure is a ``SendError`` by the OTLP spec's retry rules."""
        try:
            return call(data, timeout=self.config.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            # The server's RetryInfo delay applies to every retryable code, as in the Collector's
            # otlpexporter (throttle on UNAVAILABLE too); RESOURCE_EXHAUSTED is retryable only with it.
            delay = None
            if code in RETRYABLE_CODES or code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                delay = retry_delay_from_metadata(e.trailing_metadata() if hasattr(e, "trailing_metadata") else None)
            if code in RETRYABLE_CODES:
                raise SendError(code.name, True, delay, details or "")
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None:
                raise SendError(code.name, True, delay, details or "")
            raise SendError(code.name if code is not None else "UNKNOWN", False, None, details or "")
