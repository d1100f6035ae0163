"""``otlphttp`` exporter: OTLP/HTTP (protobuf or JSON) with httpx.

Contract: ``POST {endpoint}/v1/traces`` (or ``traces_endpoint`` verbatim) with
the request encoded once (``spans_to_otlp_bytes`` for
``encoding: proto``, ``spans_to_otlp_json`` for ``json``) and gzip-compressed
per attempt when ``compression: gzip``. Per the OTLP/HTTP spec, 429, 502, 503
and 504 are retryable and ``Retry-After`` (seconds or an HTTP date) is honoured;
connection errors and timeouts are retryable; any other status is permanent and
counted. A 200 with ``partial_success`` is logged and its rejected spans counted.
Options are named as the Collector's otlphttp exporter.
"""

from __future__ import annotations

import email.utils
import gzip
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Any, Literal

import httpx
from pydantic import Field, field_validator, model_validator

from exporters.credentials import consent_error, plaintext_credentials
from exporters.otlp_env import apply_env
from exporters.sender import (
    DEFAULT_TIMEOUT,
    MAX_SERVER_DELAY,
    Compression,
    Duration,
    QueueConfig,
    QueuedExporter,
    RetryConfig,
    SendError,
    TlsConfig,
)
from service.component import ComponentConfig
from service.metrics import metrics_to_otlp_bytes, metrics_to_otlp_json
from service.model import SCOPE_VERSION, spans_to_otlp_bytes, spans_to_otlp_json

__all__ = ["OtlpHttpExporter", "OtlpHttpConfig", "RETRYABLE_STATUS", "parse_retry_after"]

log = logging.getLogger("wirespan.exporter.otlphttp")

DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"
METRICS_PATH = "/v1/metrics"
#: OTLP/HTTP spec, "Retryable Response Codes".
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
#: Compression level: zlib's 6 is ~3x slower than 1 for ~10% smaller OTLP; the Collector's
#: gzip default (BestSpeed in confighttp) makes the same choice.
GZIP_LEVEL = 1
#: A Retry-After longer than this is capped: it would otherwise outlast any sensible drain
#: (the sender caps a gRPC RetryInfo delay the same way).
MAX_RETRY_AFTER = MAX_SERVER_DELAY
_CONTENT_TYPES = {"proto": "application/x-protobuf", "json": "application/json"}


class HttpTlsConfig(TlsConfig):
    insecure_skip_verify: bool = False


class OtlpHttpConfig(ComponentConfig):
    @model_validator(mode="before")
    @classmethod
    def _otel_env(cls, values: Any) -> Any:
        """Options the config does not give, from OTEL_EXPORTER_OTLP_* (exporters/otlp_env.py)."""
        return apply_env(values, "http")

    endpoint: str = DEFAULT_ENDPOINT
    #: Full URL for traces; overrides ``endpoint`` + /v1/traces.
    traces_endpoint: str | None = None
    #: Full URL for metrics; overrides ``endpoint`` + /v1/metrics.
    metrics_endpoint: str | None = None
    encoding: Literal["proto", "json"] = "proto"
    #: An HTTP(S) proxy for the requests (environment proxy variables are not used).
    proxy_url: str | None = None
    tls: HttpTlsConfig = Field(default_factory=HttpTlsConfig)
    headers: dict[str, str] = Field(default_factory=dict)
    compression: Compression = "gzip"
    timeout: Duration = DEFAULT_TIMEOUT
    retry_on_failure: RetryConfig = Field(default_factory=RetryConfig)
    sending_queue: QueueConfig = Field(default_factory=QueueConfig)

    @field_validator("endpoint", "traces_endpoint", "metrics_endpoint", "proxy_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> OtlpHttpConfig:
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")
        lowered = {k.lower() for k in self.headers}
        if "content-type" in lowered or "content-encoding" in lowered:
            raise ValueError("headers: content-type and content-encoding are set by the exporter")
        found = self.plaintext_credentials()
        if found and not self.tls.insecure_credentials:
            raise ValueError(consent_error(found))
        return self

    def plaintext_credentials(self) -> list[str]:
        """Credentials this config sends unencrypted off the machine (exporters/credentials.py)."""
        url = self.url()
        found = plaintext_credentials(self.headers, url, url.startswith("http://"), self.proxy_url)
        if self.metrics_endpoint:
            murl = self.metrics_url()
            found += [f for f in plaintext_credentials(self.headers, murl, murl.startswith("http://"), self.proxy_url)
                      if f not in found]
        return found

    def url(self) -> str:
        return self.traces_endpoint or self.endpoint.rstrip("/") + TRACES_PATH

    def metrics_url(self) -> str:
        return self.metrics_endpoint or self.endpoint.rstrip("/") + METRICS_PATH


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """RFC 9110 §10.2.3 Retry-After: delay-seconds or an HTTP-date -> seconds (capped), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), MAX_RETRY_AFTER)


class OtlpHttpExporter(QueuedExporter):
    """OTLP/HTTP exporter (type ``otlphttp``)."""

    type = "otlphttp"
    Config = OtlpHttpConfig

    def __init__(self, id: str, config: OtlpHttpConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._client: httpx.Client | None = None
        self._url = config.url()
        self._metrics_url = config.metrics_url()
        #: The name sent in SNI and verified in the certificate, when not the URL's host.
        self._sni = config.tls.server_name_override
        self._headers = {"User-Agent": f"wirespan/{SCOPE_VERSION}", **config.headers,
                         "Content-Type": _CONTENT_TYPES[config.encoding]}
        if config.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"

    def _open(self) -> None:
        cfg: OtlpHttpConfig = self.config
        t = cfg.tls
        found = cfg.plaintext_credentials()
        if found:  # validation let it through: tls::insecure_credentials is set
            log.warning("%s: sending credentials in plaintext (tls::insecure_credentials: true): %s",
                        self.id, "; ".join(found))
        verify: Any = True
        if self._url.startswith("https://"):
            if t.insecure_skip_verify:
                verify = False
            else:
                ctx = ssl.create_default_context(cafile=t.ca_file)
                if t.cert_file:
                    ctx.load_cert_chain(t.cert_file, t.key_file)
                verify = ctx
        limits = httpx.Limits(max_connections=cfg.sending_queue.num_consumers,
                              max_keepalive_connections=cfg.sending_queue.num_consumers)
        self._client = httpx.Client(verify=verify, timeout=cfg.timeout, limits=limits, headers=self._headers,
                                    trust_env=False, proxy=cfg.proxy_url)

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _encode(self, spans: Sequence[Any]) -> bytes:
        if self.config.encoding == "json":
            return spans_to_otlp_json(spans).encode()
        return spans_to_otlp_bytes(spans)

    def _encode_metrics(self, batch: Sequence[Any]) -> bytes:
        if self.config.encoding == "json":
            return metrics_to_otlp_json(batch).encode()
        return metrics_to_otlp_bytes(batch)

    def _send(self, data: bytes) -> int:
        return self._post(self._url, data, metrics=False)

    def _send_metrics(self, data: bytes) -> int:
        return self._post(self._metrics_url, data, metrics=True)

    def _post(self, url: str, data: bytes, metrics: bool) -> int:
        assert self._client is not None
        body = gzip.compress(data, GZIP_LEVEL) if self.config.compression == "gzip" else data
        ext = {"sni_hostname": self._sni} if self._sni else None
        try:
            resp = self._client.post(url, content=body, extensions=ext)
        except httpx.TimeoutException as e:
            raise SendError("timeout", True, None, str(e))
        except httpx.TransportError as e:
            raise SendError("transport", True, None, str(e) or type(e).__name__)
        code = resp.status_code
        if 200 <= code < 300:
            return self._partial_success(resp, metrics)
        msg = self._error_message(resp)
        if code in RETRYABLE_STATUS:
            raise SendError(f"http_{code}", True, parse_retry_after(resp.headers.get("retry-after")), msg)
        raise SendError(f"http_{code}", False, None, msg)

    def _partial_success(self, resp: httpx.Response, metrics: bool = False) -> int:
        if not resp.content:
            return 0
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        try:
            if resp.headers.get("content-type", "").startswith("application/json"):
                import json
                ps = json.loads(resp.content).get("partialSuccess") or {}
                rejected = int(ps.get("rejectedDataPoints" if metrics else "rejectedSpans", 0))
                message = ps.get("errorMessage", "")
            elif metrics:
                m = metrics_service_pb2.ExportMetricsServiceResponse.FromString(resp.content)
                rejected, message = m.partial_success.rejected_data_points, m.partial_success.error_message
            else:
                r = trace_service_pb2.ExportTraceServiceResponse.FromString(resp.content)
                rejected, message = r.partial_success.rejected_spans, r.partial_success.error_message
        except Exception:  # a 2xx whose body we cannot read is still a success
            log.debug("%s: unparsable success response body ignored", self.id)
            return 0
        if rejected or message:
            log.warning("%s: backend rejected %d %s: %s", self.id, rejected, "metric points" if metrics else "spans",
                        message)
        return int(rejected)

    @staticmethod
    def _error_message(resp: httpx.Response) -> str:
        """The google.rpc.Status message of an error body, if any (OTLP/HTTP §Failures)."""
        body = resp.content[:4096]
        if not body:
            return resp.reason_phrase
        try:
            if resp.headers.get("content-type", "").startswith("application/x-protobuf"):
                from google.rpc import status_pb2
                return status_pb2.Status.FromString(body).message or resp.reason_phrase
        except Exception:
            pass
        return body.decode("utf-8", "replace")[:256]
