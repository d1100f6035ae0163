"""Real OTLP endpoints for exporter tests: gRPC (official TraceService and MetricsService) and HTTP.

``GrpcSink`` is a grpcio server with the ``TraceServiceServicer`` from
opentelemetry-proto; ``HttpSink`` is an ``http.server`` that decodes
``ExportTraceServiceRequest`` from protobuf or OTLP/JSON (gzip or not). Both
listen on a free loopback port, record every span id they accept, and follow
a script of failures: ``fail_next(n, ...)`` answers the next n calls with an
error (UNAVAILABLE/503, RESOURCE_EXHAUSTED with RetryInfo / 429 with
Retry-After, a permanent INVALID_ARGUMENT/400), ``partial(k)`` rejects k spans of
the next call, ``required_headers`` refuses calls without them (UNAUTHENTICATED
/ 401). ``start()`` may be called late on a port chosen earlier, for
down-then-up scenarios. ``make_tls(dir)`` writes a self-signed CA and a
localhost server certificate signed by it (with ``cryptography``).
"""

from __future__ import annotations

import datetime
import gzip
import http.server
import ssl
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from service.model import otlp_json_to_proto
from tests.support.capture import free_port

__all__ = ["GrpcSink", "HttpSink", "Failure", "make_tls", "TlsFiles", "make_spans", "metric", "FAST_RETRY",
           "sent", "failed", "feed"]


@dataclass
class Failure:
    """One scripted answer: a gRPC code (or HTTP status) and an optional retry delay."""

    grpc_code: grpc.StatusCode
    http_status: int
    retry_delay: float | None = None
    message: str = "scripted failure"


UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, 503)
RESOURCE_EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 429)
INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, 400)


class _Base:
    def __init__(self, port: int | None = None, required_headers: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.required_headers = {k.lower(): v for k, v in (required_headers or {}).items()}
        self.lock = threading.Lock()
        self.span_ids: list[bytes] = []      # every accepted span, duplicates included
        self.calls = 0                       # every Export call that reached the handler
        self.failed_calls = 0
        self.headers_seen: list[dict[str, str]] = []
        #: every accepted ExportMetricsServiceRequest (MetricsService / /v1/metrics), parsed
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self._script: list[Failure] = []
        self._partial: list[int] = []
        self.got = threading.Condition(self.lock)

    # -- script ----------------------------------------------------------------------
    def fail_next(self, n: int, kind: tuple[grpc.StatusCode, int] = UNAVAILABLE, retry_delay: float | None = None,
                  message: str = "scripted failure") -> None:
        with self.lock:
            self._script.extend(Failure(kind[0], kind[1], retry_delay, message) for _ in range(n))

    def partial(self, rejected: int) -> None:
        with self.lock:
            self._partial.append(rejected)

    # -- observations ----------------------------------------------------------------
    @property
    def span_count(self) -> int:
        with self.lock:
            return len(self.span_ids)

    def unique_spans(self) -> set[bytes]:
        with self.lock:
            return set(self.span_ids)

    def wait_spans(self, n: int, timeout: float = 30.0) -> bool:
        """Wait until at least n distinct spans arrived."""
        with self.got:
            return self.got.wait_for(lambda: len(set(self.span_ids)) >= n, timeout)

    # -- shared handler logic ---------------------------------------------------------
    def _decide(self, headers: dict[str, str], req: trace_service_pb2.ExportTraceServiceRequest
                ) -> tuple[Failure | None, int]:
        """(failure to answer, spans rejected by partial success); records accepted spans."""
        with self.lock:
            self.calls += 1
            self.headers_seen.append(headers)
            for k, v in self.required_headers.items():
                if headers.get(k) != v:
                    self.failed_calls += 1
                    return Failure(grpc.StatusCode.UNAUTHENTICATED, 401, None, f"missing header {k}"), 0
            if self._script:
                self.failed_calls += 1
                return self._script.pop(0), 0
            rejected = self._partial.pop(0) if self._partial else 0
            if isinstance(req, metrics_service_pb2.ExportMetricsServiceRequest):
                self.metric_requests.append(req)
                self.got.notify_all()
                return None, rejected
            ids = [s.span_id for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
            self.span_ids.extend(ids[rejected:])
            self.got.notify_all()
            return None, rejected

    def metric_points(self, name: str | None = None) -> int:
        """Data points accepted so far (of the metric ``name``, or of all)."""
        with self.lock:
            return sum(len(getattr(m, m.WhichOneof("data")).data_points)
                       for r in self.metric_requests for rm in r.resource_metrics for sm in rm.scope_metrics
                       for m in sm.metrics if name is None or m.name == name)

    def wait_metrics(self, pred: Any, timeout: float = 30.0) -> bool:
        """Wait until ``pred(metric_requests)`` holds."""
        with self.got:
            return self.got.wait_for(lambda: pred(self.metric_requests), timeout)


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: GrpcSink) -> None:
        self.sink = sink

    def Export(self, request, context):
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        failure, rejected = self.sink._decide(headers, request)
        if failure is not None:
            if failure.retry_delay is not None:
                d = duration_pb2.Duration()
                d.FromTimedelta(datetime.timedelta(seconds=failure.retry_delay))
                detail = status_pb2.Status(code=failure.grpc_code.value[0], message=failure.message)
                detail.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=d))
                context.set_trailing_metadata((("grpc-status-details-bin", detail.SerializeToString()),))
            context.abort(failure.grpc_code, failure.message)
        resp = trace_service_pb2.ExportTraceServiceResponse()
        if rejected:
            resp.partial_success.rejected_spans = rejected
            resp.partial_success.error_message = "scripted partial success"
        return resp


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink: GrpcSink) -> None:
        self.sink = sink

    def Export(self, request, context):
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        failure, rejected = self.sink._decide(headers, request)
        if failure is not None:
            context.abort(failure.grpc_code, failure.message)
        resp = metrics_service_pb2.ExportMetricsServiceResponse()
        if rejected:
            resp.partial_success.rejected_data_points = rejected
        return resp


class GrpcSink(_Base):
    """A real OTLP/gRPC endpoint on 127.0.0.1."""

    def __init__(self, port: int | None = None, required_headers: dict[str, str] | None = None,
                 tls: TlsFiles | None = None) -> None:
        super().__init__(port, required_headers)
        self.tls = tls
        self.server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GrpcSink:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), server)
        addr = f"127.0.0.1:{self.port}"
        if self.tls is not None:
            creds = grpc.ssl_server_credentials([(self.tls.server_key.read_bytes(), self.tls.server_cert.read_bytes())])
            server.add_secure_port(addr, creds)
        else:
            server.add_insecure_port(addr)
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0.5).wait()
            self.server = None

    def __enter__(self) -> GrpcSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    sink: HttpSink
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        if self.path not in ("/v1/traces", "/v1/metrics"):
            self._reply(404, b"", "text/plain")
            return
        metrics = self.path == "/v1/metrics"
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        ctype = self.headers.get("Content-Type", "")
        try:
            if metrics:
                from service.metrics import otlp_json_to_metrics_proto
                req = otlp_json_to_metrics_proto(body) if ctype == "application/json" else \
                    metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
            elif ctype == "application/json":
                req = otlp_json_to_proto(body)
            else:
                req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        except Exception as e:
            self._reply(400, status_pb2.Status(code=3, message=f"bad request: {e}").SerializeToString(),
                        "application/x-protobuf")
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        failure, rejected = self.sink._decide(headers, req)
        if failure is not None:
            extra = {}
            if failure.retry_delay is not None:
                extra["Retry-After"] = str(int(failure.retry_delay))
            self._reply(failure.http_status,
                        status_pb2.Status(code=failure.grpc_code.value[0], message=failure.message).SerializeToString(),
                        "application/x-protobuf", extra)
            return
        resp: Any = metrics_service_pb2.ExportMetricsServiceResponse() if metrics else \
            trace_service_pb2.ExportTraceServiceResponse()
        if rejected:
            if metrics:
                resp.partial_success.rejected_data_points = rejected
            else:
                resp.partial_success.rejected_spans = rejected
            resp.partial_success.error_message = "scripted partial success"
        if ctype == "application/json":
            from google.protobuf import json_format
            self._reply(200, json_format.MessageToJson(resp).encode(), "application/json")
        else:
            self._reply(200, resp.SerializeToString(), "application/x-protobuf")

    def _reply(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class HttpSink(_Base):
    """A real OTLP/HTTP endpoint on 127.0.0.1 (``/v1/traces``)."""

    def __init__(self, port: int | None = None, required_headers: dict[str, str] | None = None,
                 tls: TlsFiles | None = None) -> None:
        super().__init__(port, required_headers)
        self.tls = tls
        self.httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> HttpSink:
        handler = type("Handler", (_HttpHandler,), {"sink": self})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls.server_cert, self.tls.server_key)
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        self.httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self) -> HttpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# TLS material generated in the test: a self-signed CA and a server cert it signs.
# ---------------------------------------------------------------------------
@dataclass
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls(directory: Path, hostname: str = "localhost") -> TlsFiles:
    """Write ca.pem, server.pem, server.key (SAN: hostname, 127.0.0.1) under ``directory``.

    Uses ``cryptography`` when installed, else the ``openssl`` command.
    """
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _make_tls_openssl(directory, hostname)
    return _make_tls_cryptography(directory, hostname)


def _make_tls_openssl(directory: Path, hostname: str) -> TlsFiles:
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca_key, csr, ext = directory / "ca.key", directory / "server.csr", directory / "server.ext"
    ext.write_text(f"subjectAltName=DNS:{hostname},IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", files.ca_cert, "-days", "1",
         "-subj", "/CN=wirespan test CA"],
        ["openssl", "req", *ec, "-keyout", files.server_key, "-out", csr, "-subj", f"/CN={hostname}"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", files.ca_cert, "-CAkey", ca_key, "-CAcreateserial",
         "-out", files.server_cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=60)
    return files


def _make_tls_cryptography(directory: Path, hostname: str) -> TlsFiles:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wirespan test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return files


def iter_span_ids(req: trace_service_pb2.ExportTraceServiceRequest) -> Iterator[bytes]:
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield s.span_id


def make_spans(n: int, name: str = "GET /x") -> list:
    """n distinct spans (unique span ids) for export tests."""
    from service.model import Span, SpanKind

    t0 = 1_700_000_000_000_000_000
    return [Span(name, SpanKind.SERVER, t0 + i, t0 + i + 1000, {"http.request.method": "GET", "i": i})
            for i in range(n)]


def metric(name: str, **labels: str) -> float:
    """Current value of a wirespan self-metric sample (0 when never set)."""
    from service.telemetry import REGISTRY

    v = REGISTRY.get_sample_value(name, labels)
    return 0.0 if v is None else v


#: Retries fast enough for tests, jittered like production.
FAST_RETRY = {"initial_interval": "20ms", "max_interval": "100ms", "randomization_factor": 0.1}


def sent(exporter: Any) -> float:
    """Spans the exporter counted as accepted by the backend."""
    return metric("wirespan_exporter_sent_spans_total", exporter=exporter.id)


def failed(exporter: Any, reason: str) -> float:
    """Spans the exporter counted as failed for good, with ``reason``."""
    return metric("wirespan_exporter_send_failed_spans_total", exporter=exporter.id, reason=reason)


def feed(exporter: Any, n: int, batch: int) -> list:
    """Hand ``n`` fresh spans to ``exporter`` in batches of ``batch``; returns them."""
    spans = make_spans(n)
    for i in range(0, n, batch):
        exporter.consume_spans(spans[i:i + batch])
    return spans
