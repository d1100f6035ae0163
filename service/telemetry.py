"""Self-metrics: every drop is counted with a reason.

Names follow the Collector's own metrics where they mean the same thing
(design.md §5). Components import the metric objects from here and label them
with their component id; nothing else defines metrics, so the list stays in one
place. Counters are incremented per batch, not per event, on hot paths.

The objects keep prometheus_client's small API (``.labels(...).inc()``, ``.set()``) but
measure through the OpenTelemetry metrics SDK (``service.selftelemetry``): the ``/metrics``
endpoint is its Prometheus (pull) reader, ``service.telemetry.metrics.readers`` may add
periodic OTLP readers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.selftelemetry import REGISTRY, Counter, Gauge

__all__ = [
    "REGISTRY",
    "RECEIVER_ACCEPTED",
    "RECEIVER_DROPPED",
    "PARSER_MESSAGES",
    "PARSER_DROPPED",
    "PROCESSOR_INCOMING",
    "PROCESSOR_OUTGOING",
    "PROCESSOR_DROPPED",
    "EXPORTER_SENT",
    "EXPORTER_SEND_FAILED",
    "EXPORTER_ENQUEUE_FAILED",
    "EXPORTER_RETRIES",
    "EXPORTER_QUEUE_SIZE",
    "EXPORTER_QUEUE_CAPACITY",
    "CONNECTIONS_EVICTED",
]

_registry: CollectorRegistry = REGISTRY

RECEIVER_ACCEPTED = Counter(
    "wirespan_receiver_accepted_events", "TCP events a receiver handed on.", ["receiver"], registry=_registry)
RECEIVER_DROPPED = Counter(
    "wirespan_receiver_dropped_events", "Packets or events a receiver dropped, by reason.",
    ["receiver", "reason"], registry=_registry)
PARSER_MESSAGES = Counter(
    "wirespan_parser_messages", "Protocol messages parsed (result=ok) or dropped (result=reason).",
    ["protocol", "result"], registry=_registry)
PARSER_DROPPED = PARSER_MESSAGES  # same metric: drops are results other than "ok"
PROCESSOR_INCOMING = Counter(
    "wirespan_processor_incoming_items", "Items (events or spans) a processor received.",
    ["processor"], registry=_registry)
PROCESSOR_OUTGOING = Counter(
    "wirespan_processor_outgoing_items", "Items a processor passed on.", ["processor"], registry=_registry)
PROCESSOR_DROPPED = Counter(
    "wirespan_processor_dropped_items", "Items a processor dropped, by reason.",
    ["processor", "reason"], registry=_registry)
EXPORTER_SENT = Counter(
    "wirespan_exporter_sent_spans", "Spans the backend accepted.", ["exporter"], registry=_registry)
EXPORTER_SEND_FAILED = Counter(
    "wirespan_exporter_send_failed_spans", "Spans that failed to send for good, by reason.",
    ["exporter", "reason"], registry=_registry)
EXPORTER_ENQUEUE_FAILED = Counter(
    "wirespan_exporter_enqueue_failed_spans", "Spans refused by a full sending queue.",
    ["exporter"], registry=_registry)
EXPORTER_RETRIES = Counter(
    "wirespan_exporter_retries", "Send attempts that were retried.", ["exporter"], registry=_registry)
EXPORTER_QUEUE_SIZE = Gauge(
    "wirespan_exporter_queue_size", "Spans waiting in the sending queue.", ["exporter"], registry=_registry)
EXPORTER_QUEUE_CAPACITY = Gauge(
    "wirespan_exporter_queue_capacity", "Sending queue capacity in spans.", ["exporter"], registry=_registry)
CONNECTIONS_EVICTED = Counter(
    "wirespan_connections_evicted", "Connection state dropped before the connection ended, by reason.",
    ["component", "reason"], registry=_registry)
TRACE_UNATTRIBUTED = Counter(
    "wirespan_trace_unattributed_spans",
    "Calls trace assembly could not attribute to the request they were made for, by reason "
    "(processors/protocols/assembly.py): they stay roots rather than risk a wrong parent.",
    ["processor", "reason"], registry=_registry)
TRACE_LINKS = Counter(
    "wirespan_trace_links", "Parent links trace assembly made, by how (thread, process, host).",
    ["processor", "how"], registry=_registry)
TRACE_CONFLICTS = Counter(
    "wirespan_trace_context_conflicts",
    "Requests whose wire traceparent disagreed with the assembled parent (the wire's won).",
    ["processor"], registry=_registry)
__all__ += ["TRACE_CONFLICTS", "TRACE_LINKS", "TRACE_UNATTRIBUTED"]

# ---------------------------------------------------------------------------
# Added by the exporters work (issue 5): persistent sending queue integrity.
# ---------------------------------------------------------------------------
EXPORTER_QUEUE_CORRUPT = Counter(
    "wirespan_exporter_queue_corrupt_records",
    "Persistent-queue records skipped because they were corrupt or truncated on disk.",
    ["exporter"], registry=_registry)
__all__ += ["EXPORTER_QUEUE_CORRUPT"]


# ===========================================================================
# Runtime additions (issue 3): batch metrics, process metrics, the HTTP
# endpoints for /metrics and health, and a reader for counter values.
# Nothing above this line is changed.
# ===========================================================================
import json as _json  # noqa: E402
import logging as _logging  # noqa: E402
import os as _os  # noqa: E402
import threading as _threading  # noqa: E402
import time as _time  # noqa: E402
from collections.abc import Callable as _Callable  # noqa: E402
from http.server import BaseHTTPRequestHandler as _Handler  # noqa: E402
from http.server import ThreadingHTTPServer as _HTTPServer  # noqa: E402

from prometheus_client import CONTENT_TYPE_LATEST as _CONTENT_TYPE  # noqa: E402
from prometheus_client import generate_latest as _generate_latest  # noqa: E402

from service.selftelemetry import observe as _observe  # noqa: E402

__all__ += [
    "BATCH_SIZE_TRIGGER_SEND",
    "BATCH_TIMEOUT_TRIGGER_SEND",
    "BATCH_SEND_SIZE",
    "TelemetryServer",
    "start_metrics_server",
    "start_health_server",
    "counter_value",
    "parse_address",
]

_log = _logging.getLogger("wirespan.telemetry")

# The Collector's batch processor metrics (otelcol_processor_batch_*).
BATCH_SIZE_TRIGGER_SEND = Counter(
    "wirespan_processor_batch_batch_size_trigger_send", "Batches sent because they reached send_batch_size.",
    ["processor"], registry=_registry)
BATCH_TIMEOUT_TRIGGER_SEND = Counter(
    "wirespan_processor_batch_timeout_trigger_send", "Batches sent because the timeout fired.",
    ["processor"], registry=_registry)
BATCH_SEND_SIZE = Counter(
    "wirespan_processor_batch_sent_items", "Items sent in batches (divide by the trigger counts for the mean size).",
    ["processor"], registry=_registry)


_PAGE = _os.sysconf("SC_PAGE_SIZE") if hasattr(_os, "sysconf") else 4096
_STARTED = _time.time()


def _rss() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            return float(int(f.read().split()[1]) * _PAGE)
    except (OSError, ValueError, IndexError):
        return 0.0


def _cpu() -> float:
    t = _os.times()
    return t.user + t.system


# RSS, CPU seconds and uptime under the Collector's names (otelcol_process_*), observed by the
# SDK at each collection from /proc (no psutil dependency); prometheus_client's own
# ``process_*`` metrics are served beside them on /metrics.
_observe("wirespan_process_memory_rss", "Resident set size in bytes.", _rss)
_observe("wirespan_process_cpu_seconds", "User plus system CPU time in seconds.", _cpu)
_observe("wirespan_process_uptime", "Seconds since the process started.", lambda: _time.time() - _STARTED)


def counter_value(metric: Counter, **labels: str) -> float:
    """Sum of a counter's samples whose labels include ``labels``.

    One of ours (service/selftelemetry.py) is summed from its label sets' running values: its
    ``collect`` is a whole collection of every instrument by the SDK (observable gauges read
    /proc), and a replay's end asks a dozen of these, which cost it 0.1 s of CPU."""
    children = getattr(metric, "_children", None)
    if children is not None and getattr(metric, "_counter", False):
        return float(sum(c.value for c in list(children.values())
                         if all(c.attrs.get(k) == v for k, v in labels.items())))
    total = 0.0
    for fam in metric.collect():
        for s in fam.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def parse_address(address: str, default_host: str = "localhost") -> tuple[str, int]:
    """``host:port`` (``[v6]:port``, ``:port``) -> (host, port). Raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep:
        raise ValueError(f"address {address!r} must be host:port")
    host = host.strip("[]") or default_host
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"address {address!r}: port {port!r} is not a number")
    if not 0 <= p <= 65535:
        raise ValueError(f"address {address!r}: port out of range")
    return host, p


class _Server(_HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type, route: str, respond: _Callable[[], tuple]) -> None:
        import socket
        infos = socket.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
        # "localhost" may resolve to ::1 first; 127.0.0.1 is what scrapers and curl try first.
        infos.sort(key=lambda i: i[0] != socket.AF_INET)
        self.address_family = infos[0][0]
        self.route = route
        self.respond = respond
        super().__init__(infos[0][4][:2], handler)


class _RouteHandler(_Handler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != self.server.route and not (self.server.route == "/" and path == ""):
            status, ctype, body = 404, "text/plain; charset=utf-8", b"not found\n"
        else:
            status, ctype, body = self.server.respond()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def log_message(self, fmt: str, *args) -> None:  # quiet: scrapes are not news
        _log.debug("telemetry http: " + fmt, *args)


class TelemetryServer:
    """A tiny HTTP server on its own daemon thread; ``close()`` frees the port."""

    def __init__(self, name: str, address: str, route: str, respond: _Callable[[], tuple]) -> None:
        host, port = parse_address(address)
        self.name = name
        self._srv = _Server((host, port), _RouteHandler, route, respond)
        self.host, self.port = self._srv.server_address[:2]
        self._thread = _threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.2},
                                         name=f"wirespan-{name}-http", daemon=True)
        self._thread.start()
        _log.info("%s endpoint listening on http://%s:%d%s", name, self.host, self.port, route)

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(5)


def start_metrics_server(address: str, path: str = "/metrics") -> TelemetryServer:
    """Prometheus text exposition of the process registry on ``address`` + ``path``."""
    def respond() -> tuple:
        return 200, _CONTENT_TYPE, _generate_latest(_registry)
    return TelemetryServer("metrics", address, path, respond)


def start_health_server(address: str, ready: _Callable[[], tuple[bool, str]], path: str = "/") -> TelemetryServer:
    """Health in the Collector's health_check form: 200 when ``ready()`` says so, else 503."""
    def respond() -> tuple:
        ok, state = ready()
        body = {"status": "Server available" if ok else "Server not available", "state": state,
                "upSince": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(_STARTED)),
                "uptime": f"{_time.time() - _STARTED:.3f}s"}
        return (200 if ok else 503), "application/json", _json.dumps(body).encode()
    return TelemetryServer("health", address, path, respond)

# ---------------------------------------------------------------------------
# eBPF receiver (receivers/ebpf, issue 9)
# ---------------------------------------------------------------------------
EBPF_KERNEL_COUNTERS = Counter(
    "wirespan_ebpf_kernel_events",
    "Counters kept by the BPF program, by counter: ringbuf_reserve_failures (records lost to a full "
    "ring), truncated_calls/truncated_bytes (beyond the per-syscall copy bound), records, "
    "user_read_failures, inflight_table_full.",
    ["receiver", "counter"], registry=_registry)
EBPF_TRUNCATED_BYTES = Counter(
    "wirespan_ebpf_truncated_bytes",
    "Payload bytes turned into gaps: where=message_cap (beyond max_message_bytes), kernel (not copied) "
    "or ring_full (records lost to a full ring buffer).",
    ["receiver", "where"], registry=_registry)
__all__ += ["EBPF_KERNEL_COUNTERS", "EBPF_TRUNCATED_BYTES"]

# ---------------------------------------------------------------------------
# Metrics pipelines, connectors and the prometheus exporter (issue 17). The Collector
# counts metrics in data points (otelcol_exporter_sent_metric_points, ...).
# ---------------------------------------------------------------------------
EXPORTER_SENT_POINTS = Counter(
    "wirespan_exporter_sent_metric_points", "Metric data points the backend accepted.", ["exporter"],
    registry=_registry)
EXPORTER_SEND_FAILED_POINTS = Counter(
    "wirespan_exporter_send_failed_metric_points", "Metric data points that failed to send for good, by reason.",
    ["exporter", "reason"], registry=_registry)
EXPORTER_ENQUEUE_FAILED_POINTS = Counter(
    "wirespan_exporter_enqueue_failed_metric_points", "Metric data points refused by a full sending queue.",
    ["exporter"], registry=_registry)
EXPORTER_METRICS_QUEUE_SIZE = Gauge(
    "wirespan_exporter_metrics_queue_size", "Metric data points waiting in the metrics sending queue.",
    ["exporter"], registry=_registry)
EXPORTER_METRICS_QUEUE_CAPACITY = Gauge(
    "wirespan_exporter_metrics_queue_capacity", "Metrics sending queue capacity in data points.",
    ["exporter"], registry=_registry)
CONNECTOR_DROPPED = Counter(
    "wirespan_connector_dropped_items", "Spans a connector could not take (it raised), by reason.",
    ["connector", "reason"], registry=_registry)
CONNECTOR_OVERFLOW = Counter(
    "wirespan_connector_overflow_spans",
    "Spans counted into a metric's overflow series (otel.metric.overflow=true): the metric had reached "
    "its cardinality limit.", ["connector", "metric"], registry=_registry)
CONNECTOR_SERIES = Gauge(
    "wirespan_connector_series", "Series (attribute sets) a connector holds, by metric.",
    ["connector", "metric"], registry=_registry)
SERVICEGRAPH_EDGES = Counter(
    "wirespan_connector_servicegraph_edges",
    "Service graph edges by outcome: paired (client and server span met), peer (a client span mapped to a "
    "known server by its peer address), expired (unpaired past the TTL), store_full (the edge store was full).",
    ["connector", "outcome"], registry=_registry)
__all__ += ["EXPORTER_SENT_POINTS", "EXPORTER_SEND_FAILED_POINTS", "EXPORTER_ENQUEUE_FAILED_POINTS",
            "EXPORTER_METRICS_QUEUE_SIZE", "EXPORTER_METRICS_QUEUE_CAPACITY", "CONNECTOR_DROPPED",
            "CONNECTOR_OVERFLOW", "CONNECTOR_SERIES", "SERVICEGRAPH_EDGES"]
