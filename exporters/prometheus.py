"""``prometheus`` exporter: the metrics of a metrics pipeline on a scrape endpoint.

Contract: as the Collector's prometheus exporter. Metrics arriving from the pipeline are
kept (cumulative points replace what is held, delta points are added to it, so a scrape
always sees running totals) and served on ``http://{endpoint}{path}`` in the Prometheus
text format 0.0.4, or in OpenMetrics 1.0 with exemplars (the trace and span id on
histogram buckets) when the scraper asks for it (``Accept: application/openmetrics-text``,
as Prometheus does) and ``enable_open_metrics`` is on. A series not updated for
``metric_expiration`` is dropped.

Names follow the OpenTelemetry specification's Prometheus compatibility rules: characters
outside ``[a-zA-Z0-9_:]`` become ``_``; the unit is appended (``s`` -> ``_seconds``, ``ms`` ->
``_milliseconds``, ``By`` -> ``_bytes``; ``{annotations}`` dropped) unless the name already
ends with it; monotonic sums end in ``_total``; non-monotonic sums are gauges. Each series
carries ``job`` (``service.namespace/service.name``) and ``instance``
(``service.instance.id``) from its resource, and ``target_info`` holds the other resource
attributes (all of them become labels with ``resource_to_telemetry_conversion``).
"""

from __future__ import annotations

import http.server
import logging
import math
import re
import socket
import threading
import time
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from service import telemetry as tm
from service.component import ComponentConfig, Exporter
from service.config import Duration
from service.metrics import AGGREGATION_TEMPORALITY_DELTA, GAUGE, HISTOGRAM, SUM, MetricBatch, point_count

__all__ = ["PrometheusExporter", "PrometheusConfig", "prometheus_name", "label_name", "DEFAULT_ENDPOINT",
           "TEXT_CONTENT_TYPE", "OPENMETRICS_CONTENT_TYPE"]

log = logging.getLogger("wirespan.exporter.prometheus")

#: wirespan's own port, one off the Collector's usual 8889 for this exporter (and beside our 8898).
DEFAULT_ENDPOINT = "localhost:8899"
DEFAULT_EXPIRATION = 300.0   # the Collector's metric_expiration: 5m
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
#: OpenMetrics: an exemplar's label set is at most 128 UTF-8 characters.
MAX_EXEMPLAR_LABELS = 128

_UNITS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds", "min": "minutes",
          "h": "hours", "d": "days", "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "KBy": "kilobytes",
          "MBy": "megabytes", "%": "percent", "Hz": "hertz", "V": "volts", "A": "amperes", "J": "joules",
          "W": "watts", "Cel": "celsius"}
#: Denominators of rate units (``By/s`` -> ``bytes_per_second``), as the specification names them.
_PER = {"s": "second", "m": "minute", "min": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month",
        "y": "year"}
_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_BAD_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_MULTI = re.compile(r"__+")


def _unit_suffix(unit: str, gauge: bool) -> str:
    unit = re.sub(r"\{[^}]*\}", "", unit or "").strip()
    if not unit:
        return ""
    if unit == "1":
        return "ratio" if gauge else ""
    if "/" in unit:
        a, _, b = unit.partition("/")
        a2, b2 = _UNITS.get(a, a), _PER.get(b, b)
        return f"{a2}_per_{b2}" if a else f"per_{b2}"
    return _UNITS.get(unit, unit)


def prometheus_name(name: str, unit: str, type: str, monotonic: bool, namespace: str = "",
                    suffixes: bool = True) -> str:
    """The Prometheus metric name of an OTLP metric (the family name: no _bucket/_total)."""
    n = _MULTI.sub("_", _BAD.sub("_", name))
    if namespace:
        n = f"{_MULTI.sub('_', _BAD.sub('_', namespace))}_{n}"
    if n[:1].isdigit():
        n = "_" + n
    if suffixes:
        suffix = _MULTI.sub("_", _BAD.sub("_", _unit_suffix(unit, type == GAUGE or (type == SUM and not monotonic))))
        if suffix and not n.endswith("_" + suffix) and not (n.endswith("_total") and n[:-6].endswith("_" + suffix)):
            if n.endswith("_total"):
                n = f"{n[:-6]}_{suffix}_total"
            else:
                n = f"{n}_{suffix}"
    if n.endswith("_total") and (type == SUM and monotonic):
        n = n[:-6]  # the family name; samples get _total back
    return n


def label_name(key: str) -> str:
    """A Prometheus label name for an attribute key (``http.route`` -> ``http_route``)."""
    n = _BAD_LABEL.sub("_", key)
    if n[:1].isdigit():
        n = "key_" + n
    if n.startswith("__") and not key.startswith("__"):
        n = "key" + n
    return n


def _escape(v: Any) -> str:
    if isinstance(v, bool):
        v = "true" if v else "false"
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class ResourceConversionConfig(ComponentConfig):
    #: Every resource attribute becomes a label of every series.
    enabled: bool = False


class PrometheusConfig(ComponentConfig):
    #: host:port to serve on (localhost by default: set ``0.0.0.0:8899`` for other hosts).
    endpoint: str = DEFAULT_ENDPOINT
    path: str = "/metrics"
    #: A prefix for every metric name.
    namespace: str = ""
    #: Labels added to every series.
    const_labels: dict[str, str] = Field(default_factory=dict)
    #: Write each sample's timestamp (the point's time).
    send_timestamps: bool = False
    #: A series not updated for this long is dropped.
    metric_expiration: Duration = DEFAULT_EXPIRATION
    resource_to_telemetry_conversion: ResourceConversionConfig = Field(default_factory=ResourceConversionConfig)
    #: Serve OpenMetrics (with exemplars) to scrapers that ask for it.
    enable_open_metrics: bool = True
    #: Unit and _total suffixes on names.
    add_metric_suffixes: bool = True

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        tm.parse_address(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> PrometheusConfig:
        if not self.path.startswith("/"):
            raise ValueError("path must start with /")
        if self.metric_expiration <= 0:
            raise ValueError("metric_expiration must be > 0")
        for k in self.const_labels:
            if label_name(k) != k:
                raise ValueError(f"const_labels: {k!r} is not a valid label name")
        return self


class _Entry:
    """One series as served: a value, or a histogram's bounds, counts, sum and exemplars."""

    __slots__ = ("bounds", "counts", "count", "exemplars", "seen", "sum", "time_ns", "value")

    def __init__(self) -> None:
        self.value: float = 0.0
        self.bounds: tuple[float, ...] = ()
        self.counts: list[int] = []
        self.count = 0
        self.sum = 0.0
        self.exemplars: list[Any] = []
        self.time_ns = 0
        self.seen = 0.0


class _Family:
    __slots__ = ("help", "name", "series", "type")

    def __init__(self, name: str, type: str, help: str) -> None:
        self.name = name
        self.type = type        # counter | gauge | histogram
        self.help = help
        self.series: dict[tuple[tuple[str, str], ...], _Entry] = {}


class PrometheusExporter(Exporter):
    type: ClassVar[str] = "prometheus"
    signals: ClassVar[tuple[str, ...]] = ("metrics",)
    Config = PrometheusConfig

    def __init__(self, id: str, config: PrometheusConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        self._targets: dict[tuple[tuple[str, str], ...], tuple[dict[str, Any], float]] = {}
        self._conflicts: set[str] = set()
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        host, port = tm.parse_address(self.config.endpoint)
        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != exporter.config.path:
                    body, ctype, status = b"not found\n", "text/plain; charset=utf-8", 404
                else:
                    om = exporter.config.enable_open_metrics and "application/openmetrics-text" in (
                        self.headers.get("Accept") or "")
                    body = exporter.render(openmetrics=om).encode()
                    ctype, status = (OPENMETRICS_CONTENT_TYPE if om else TEXT_CONTENT_TYPE), 200
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("prometheus http: " + fmt, *args)

        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        infos.sort(key=lambda i: i[0] != socket.AF_INET)   # 127.0.0.1 first for "localhost"

        class Server(http.server.ThreadingHTTPServer):
            address_family = infos[0][0]
            daemon_threads = True
            allow_reuse_address = True

        self._httpd = Server(infos[0][4][:2], Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"wirespan-{self.id}-http", daemon=True)
        self._thread.start()
        log.info("%s: serving metrics on http://%s:%d%s", self.id, host, self.port, self.config.path)

    def shutdown(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # -- data ----------------------------------------------------------------------------
    def _resource_labels(self, attrs: dict[str, Any]) -> dict[str, str]:
        labels: dict[str, str] = {}
        name = attrs.get("service.name")
        if name is not None:
            ns = attrs.get("service.namespace")
            labels["job"] = f"{ns}/{name}" if ns else str(name)
        inst = attrs.get("service.instance.id")
        if inst is not None:
            labels["instance"] = str(inst)
        if self.config.resource_to_telemetry_conversion.enabled:
            for k, v in attrs.items():
                labels.setdefault(label_name(k), _escape(v) if not isinstance(v, str) else v)
        return labels

    def consume_metrics(self, batch: MetricBatch) -> None:
        cfg = self.config
        seen = time.monotonic()
        with self._lock:
            for rm in batch:
                base = self._resource_labels(rm.resource.attributes)
                base.update(cfg.const_labels)
                tkey = tuple(sorted(base.items()))
                if base:
                    self._targets[tkey] = (rm.resource.attributes, seen)
                for m in rm.metrics:
                    monotonic = m.type == SUM and m.monotonic
                    ptype = "histogram" if m.type == HISTOGRAM else "counter" if monotonic else "gauge"
                    fname = prometheus_name(m.name, m.unit, m.type, m.monotonic, cfg.namespace,
                                            cfg.add_metric_suffixes)
                    fam = self._families.get(fname)
                    if fam is None:
                        fam = self._families[fname] = _Family(fname, ptype, m.description or m.name)
                    elif fam.type != ptype:
                        if fname not in self._conflicts:
                            self._conflicts.add(fname)
                            log.warning("%s: metric %s arrives as %s and %s; the %s points are dropped",
                                        self.id, fname, fam.type, ptype, ptype)
                        continue
                    delta = m.temporality == AGGREGATION_TEMPORALITY_DELTA and m.type != GAUGE
                    for p in m.points:
                        labels = dict(base)
                        for k, v in p.attributes.items():
                            labels[label_name(k)] = v if isinstance(v, str) else _escape(v)
                        key = tuple(sorted(labels.items()))
                        e = fam.series.get(key)
                        if e is None:
                            e = fam.series[key] = _Entry()
                        e.seen = seen
                        e.time_ns = p.time_ns
                        if m.type == HISTOGRAM:
                            if delta and e.bounds == p.bounds and e.counts:
                                e.counts = [a + b for a, b in zip(e.counts, p.bucket_counts, strict=False)]
                                e.count += p.count
                                e.sum += p.sum
                            else:
                                e.bounds, e.counts, e.count, e.sum = p.bounds, list(p.bucket_counts), p.count, p.sum
                            if p.exemplars or not delta:
                                e.exemplars = list(p.exemplars)
                        elif delta:
                            e.value += p.value
                        else:
                            e.value = p.value
        tm.EXPORTER_SENT_POINTS.labels(exporter=self.id).inc(point_count(batch))

    def _expire(self, now: float) -> None:
        horizon = now - self.config.metric_expiration
        for name in list(self._families):
            fam = self._families[name]
            for k in [k for k, e in fam.series.items() if e.seen < horizon]:
                del fam.series[k]
            if not fam.series:
                del self._families[name]
        for k in [k for k, (_, seen) in self._targets.items() if seen < horizon]:
            del self._targets[k]

    # -- exposition ------------------------------------------------------------------------
    def render(self, openmetrics: bool = False) -> str:
        """The exposition of everything held: Prometheus text 0.0.4 or OpenMetrics 1.0."""
        out: list[str] = []
        ts = self.config.send_timestamps
        with self._lock:
            self._expire(time.monotonic())
            for fam in sorted(self._families.values(), key=lambda f: f.name):
                name = fam.name
                head = f"{name}_total" if fam.type == "counter" and not openmetrics else name
                out.append(f"# HELP {head} {_escape(fam.help)}")
                out.append(f"# TYPE {head} {fam.type}")
                for key, e in fam.series.items():
                    lbl = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                    stamp = ""
                    if ts:
                        stamp = f" {e.time_ns / 1e9:.3f}" if openmetrics else f" {e.time_ns // 1_000_000}"
                    if fam.type == "histogram":
                        self._histogram(out, name, lbl, e, stamp, openmetrics)
                    elif fam.type == "counter":
                        out.append(f"{name}_total{{{lbl}}} {_num(e.value)}{stamp}" if lbl
                                   else f"{name}_total {_num(e.value)}{stamp}")
                    else:
                        out.append(f"{name}{{{lbl}}} {_num(e.value)}{stamp}" if lbl else f"{name} {_num(e.value)}")
            if self._targets:
                # OpenMetrics: an info family "target" whose sample is target_info
                fam_name = "target" if openmetrics else "target_info"
                out.append(f"# HELP {fam_name} Target metadata")
                out.append(f"# TYPE {fam_name} " + ("info" if openmetrics else "gauge"))
                for key, (attrs, _) in self._targets.items():
                    labels = dict(key)
                    for k, v in attrs.items():
                        if k not in ("service.name", "service.namespace", "service.instance.id"):
                            labels.setdefault(label_name(k), v if isinstance(v, str) else _escape(v))
                    lbl = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
                    out.append(f"target_info{{{lbl}}} 1")
        if openmetrics:
            out.append("# EOF")
        return "\n".join(out) + "\n"

    @staticmethod
    def _histogram(out: list[str], name: str, lbl: str, e: _Entry, stamp: str, openmetrics: bool) -> None:
        sep = "," if lbl else ""
        ex_by_bucket: dict[int, Any] = {}
        if openmetrics and e.exemplars:
            import bisect
            for x in e.exemplars:
                ex_by_bucket[bisect.bisect_left(e.bounds, x.value)] = x
        acc = 0
        for i, c in enumerate(e.counts):
            acc += c
            le = "+Inf" if i == len(e.bounds) else _num(float(e.bounds[i]))
            line = f'{name}_bucket{{{lbl}{sep}le="{le}"}} {acc}{stamp}'
            x = ex_by_bucket.get(i)
            if x is not None and x.trace_id:
                ex_lbl = f'trace_id="{x.trace_id.hex()}",span_id="{x.span_id.hex()}"'
                if len(ex_lbl) <= MAX_EXEMPLAR_LABELS:
                    line += f" # {{{ex_lbl}}} {_num(x.value)} {x.time_ns / 1e9:.9f}"
            out.append(line)
        out.append(f"{name}_sum{{{lbl}}} {_num(e.sum)}{stamp}" if lbl else f"{name}_sum {_num(e.sum)}{stamp}")
        out.append(f"{name}_count{{{lbl}}} {e.count}{stamp}" if lbl else f"{name}_count {e.count}{stamp}")
