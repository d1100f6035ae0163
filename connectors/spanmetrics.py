"""``spanmetrics`` connector: RED metrics (rate, errors, duration) from spans.

Contract: the connector is an exporter of a ``traces`` pipeline and the receiver of a
``metrics`` pipeline. Every span it is given is aggregated, under its lock, into the
series of its resource; every ``metrics_flush_interval`` (and at shutdown) the series
leave as one ``MetricBatch`` (one ``ResourceMetrics`` a resource).

Two styles (``metrics:``), either or both:

- ``semconv`` (the default): the OpenTelemetry semantic conventions' duration histograms,
  in seconds with the conventions' advised buckets, chosen by what the span is (below),
  with the conventions' attributes of each. Their ``_count`` is the rate, ``error.type``
  the errors (set to ``_OTHER`` on an error span that names no type), the buckets the
  duration.
- ``calls``: the Collector spanmetrics connector's ``{namespace}.calls`` counter and
  ``{namespace}.duration`` histogram, by ``service.name``, ``span.name``, ``span.kind`` and
  ``status.code`` (``unit`` ms by default, the Collector's buckets).

Which semconv metric a span feeds:

=====================================  =========================================================
``http.server.request.duration``       ``http.request.method`` set, kind SERVER
``http.client.request.duration``       ``http.request.method`` set, kind CLIENT
``rpc.server.duration``                ``rpc.system.name`` set, kind SERVER
``rpc.client.duration``                ``rpc.system.name`` set, kind CLIENT
``db.client.operation.duration``       ``db.system.name`` set
``messaging.process.duration``         ``messaging.system`` set, ``messaging.operation.type`` process
``messaging.client.operation.duration`` ``messaging.system`` set, kind PRODUCER, CONSUMER or CLIENT
=====================================  =========================================================

Cardinality: ``http.route`` comes from the span, else from its ``url.path`` through the
route templating the protocols stage uses (``processors.routes``), so a path of ids is a
handful of routes; and every metric of every resource holds at most
``aggregation_cardinality_limit`` series, past which measurements go to the overflow series
``otel.metric.overflow=true`` (counted: ``wirespan_connector_overflow_spans``).
``resource_metrics_cache_size`` bounds the resources (spans of more are dropped, counted).
Exemplars: each histogram bucket keeps the trace and span id of its latest span.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, model_validator

from connectors.aggregate import Family, FlushLoop, Temporality, temporality_number
from processors.routes import Routes, RoutesConfig
from service import telemetry as tm
from service.component import ComponentConfig, Connector
from service.config import Duration, parse_duration
from service.metrics import ResourceMetrics
from service.model import Resource, Span, SpanKind, StatusCode

__all__ = ["SpanMetricsConnector", "SpanMetricsConfig", "SEMCONV", "HTTP_BUCKETS", "DB_BUCKETS",
           "COLLECTOR_BUCKETS_MS", "classify"]

SCOPE = "wirespan/spanmetrics"

#: Advised bucket boundaries (seconds) of the semantic conventions: http.*.request.duration,
#: rpc, messaging.*.duration ...
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
#: ... and db.client.operation.duration.
DB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
#: The Collector spanmetrics connector's default buckets, in ms (the ``calls`` style).
COLLECTOR_BUCKETS_MS = (2.0, 4.0, 6.0, 8.0, 10.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1000.0, 1400.0, 2000.0,
                        5000.0, 10000.0, 15000.0)

DEFAULT_FLUSH_INTERVAL = 60.0           # the Collector's metrics_flush_interval
DEFAULT_CARDINALITY_LIMIT = 2000        # the OpenTelemetry metrics SDK's default cardinality limit
DEFAULT_RESOURCE_CACHE = 1000           # the Collector's resource_metrics_cache_size
DEFAULT_NAMESPACE = "traces.span.metrics"

_HTTP_COMMON = ("http.request.method", "http.response.status_code", "error.type", "url.scheme",
                "network.protocol.name", "network.protocol.version")
#: metric -> (attributes, description, default buckets)
SEMCONV: dict[str, tuple[tuple[str, ...], str, tuple[float, ...]]] = {
    "http.server.request.duration": (
        ("http.request.method", "http.route", "http.response.status_code", "error.type", "url.scheme",
         "network.protocol.name", "network.protocol.version"),
        "Duration of HTTP server requests.", HTTP_BUCKETS),
    "http.client.request.duration": (
        (*_HTTP_COMMON, "server.address", "server.port"), "Duration of HTTP client requests.", HTTP_BUCKETS),
    "rpc.server.duration": (
        ("rpc.system.name", "rpc.method", "rpc.response.status_code", "error.type", "server.address",
         "server.port"), "Measures the duration of inbound RPC.", HTTP_BUCKETS),
    "rpc.client.duration": (
        ("rpc.system.name", "rpc.method", "rpc.response.status_code", "error.type", "server.address",
         "server.port"), "Measures the duration of outbound RPC.", HTTP_BUCKETS),
    "db.client.operation.duration": (
        ("db.system.name", "db.operation.name", "db.collection.name", "db.namespace", "db.query.summary",
         "db.response.status_code", "error.type", "server.address", "server.port"),
        "Duration of database client operations.", DB_BUCKETS),
    "messaging.client.operation.duration": (
        ("messaging.system", "messaging.operation.name", "messaging.operation.type", "messaging.destination.name",
         "messaging.destination.partition.id", "error.type", "server.address", "server.port"),
        "Duration of messaging operation initiated by a producer or consumer client.", HTTP_BUCKETS),
    "messaging.process.duration": (
        ("messaging.system", "messaging.operation.name", "messaging.destination.name",
         "messaging.destination.partition.id", "error.type", "server.address", "server.port"),
        "Duration of processing operation.", HTTP_BUCKETS),
}

_SERVER, _CLIENT = int(SpanKind.SERVER), int(SpanKind.CLIENT)
_MSG_KINDS = frozenset((int(SpanKind.PRODUCER), int(SpanKind.CONSUMER), _CLIENT))
_ERROR = int(StatusCode.ERROR)
_KIND_NAMES = {int(k): f"SPAN_KIND_{k.name}" for k in SpanKind}
_STATUS_NAMES = {int(c): f"STATUS_CODE_{c.name}" for c in StatusCode}


def classify(kind: int, a: dict[str, Any]) -> str | None:
    """The semconv duration metric a span with ``kind`` and attributes ``a`` feeds, or None."""
    if "http.request.method" in a:
        if "rpc.system.name" in a:
            pass  # gRPC over HTTP/2: an RPC
        elif kind == _SERVER:
            return "http.server.request.duration"
        elif kind == _CLIENT:
            return "http.client.request.duration"
        else:
            return None
    if "rpc.system.name" in a:
        return "rpc.server.duration" if kind == _SERVER else "rpc.client.duration" if kind == _CLIENT else None
    if "db.system.name" in a:
        return "db.client.operation.duration"
    if "messaging.system" in a:
        if a.get("messaging.operation.type") == "process":
            return "messaging.process.duration"
        return "messaging.client.operation.duration" if kind in _MSG_KINDS else None
    return None


def _bounds(v: Any) -> Any:
    """Bucket bounds: numbers of seconds or durations (``2ms``), as the Collector takes them."""
    if v is None:
        return None
    if not isinstance(v, list):
        raise ValueError("buckets must be a list of durations or numbers of seconds")
    return [parse_duration(x) for x in v]


Bounds = Annotated[list[float] | None, BeforeValidator(_bounds)]


class ExplicitConfig(ComponentConfig):
    #: Bucket upper bounds (``[2ms, 10ms, 100ms, 1s]`` or seconds).
    buckets: Bounds = None


class HistogramConfig(ComponentConfig):
    #: Bounds for every duration histogram (default: each semconv metric's advised ones; the
    #: Collector's for ``calls``).
    explicit: ExplicitConfig = Field(default_factory=ExplicitConfig)
    #: Unit of the ``calls`` style's duration histogram (semconv metrics are always in seconds).
    unit: Literal["ms", "s"] = "ms"
    #: No duration histogram in the ``calls`` style (only calls).
    disable: bool = False


class DimensionConfig(ComponentConfig):
    #: A span attribute added to every series (e.g. ``deployment.environment.name``).
    name: str
    #: Its value when the span lacks it (default: the attribute is left out).
    default: str | None = None


class ExemplarsConfig(ComponentConfig):
    #: One exemplar (trace id, span id) per histogram bucket: the latest span that fell in it.
    enabled: bool = True


class SpanMetricsConfig(ComponentConfig):
    #: Which metrics: the semantic conventions' duration histograms and/or the Collector's calls/duration.
    metrics: list[Literal["semconv", "calls"]] = Field(default_factory=lambda: ["semconv"])
    histogram: HistogramConfig = Field(default_factory=HistogramConfig)
    #: Extra span attributes on every series.
    dimensions: list[DimensionConfig] = Field(default_factory=list)
    #: Semconv attributes to leave out (e.g. ``server.port``).
    exclude_dimensions: list[str] = Field(default_factory=list)
    #: Prefix of the ``calls`` style's metric names.
    namespace: str = DEFAULT_NAMESPACE
    #: Cumulative (since the series began) or delta (since the last flush).
    aggregation_temporality: Temporality = "AGGREGATION_TEMPORALITY_CUMULATIVE"
    #: How often the metrics leave the connector.
    metrics_flush_interval: Duration = DEFAULT_FLUSH_INTERVAL
    #: Forget a cumulative series not updated for this long (0: never).
    metrics_expiration: Duration = 0.0
    #: Series a metric holds per resource before the overflow series takes the rest.
    aggregation_cardinality_limit: int = Field(DEFAULT_CARDINALITY_LIMIT, ge=1)
    #: Resources tracked (spans of further resources are dropped and counted).
    resource_metrics_cache_size: int = Field(DEFAULT_RESOURCE_CACHE, ge=1)
    exemplars: ExemplarsConfig = Field(default_factory=ExemplarsConfig)
    #: Route templating of ``url.path`` for spans without ``http.route`` (processors/routes.py).
    routes: RoutesConfig = Field(default_factory=RoutesConfig)

    @model_validator(mode="after")
    def _check(self) -> SpanMetricsConfig:
        if not self.metrics:
            raise ValueError("metrics: at least one of semconv, calls")
        if self.metrics_flush_interval <= 0:
            raise ValueError("metrics_flush_interval must be > 0")
        if self.metrics_expiration < 0:
            raise ValueError("metrics_expiration must not be negative")
        b = self.histogram.explicit.buckets
        if b is not None and (not b or any(x >= y for x, y in itertools.pairwise(b))):
            raise ValueError("histogram::explicit::buckets must be non-empty and strictly increasing")
        names = [d.name for d in self.dimensions]
        if len(set(names)) != len(names):
            raise ValueError("dimensions: duplicate names")
        return self


class _Spec:
    """One semconv metric as configured: attribute names, where http.route and error.type sit."""

    __slots__ = ("bounds", "description", "err_idx", "keys", "name", "names", "route_idx")

    def __init__(self, name: str, keys: tuple[str, ...], description: str, bounds: tuple[float, ...],
                 extra: tuple[str, ...]) -> None:
        self.name = name
        self.keys = keys
        self.names = keys + extra
        self.description = description
        self.bounds = bounds
        self.route_idx = keys.index("http.route") if "http.route" in keys else None
        self.err_idx = keys.index("error.type") if "error.type" in keys else None


class _ResourceState:
    __slots__ = ("families", "resource")

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.families: dict[str, Family] = {}


class SpanMetricsConnector(Connector):
    type: ClassVar[str] = "spanmetrics"
    Config = SpanMetricsConfig

    def __init__(self, id: str, config: SpanMetricsConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        c = config
        self._lock = threading.Lock()
        self._temporality = temporality_number(c.aggregation_temporality)
        self._semconv = "semconv" in c.metrics
        self._calls = "calls" in c.metrics
        self._routes = Routes(c.routes)
        self._extra = tuple((d.name, d.default) for d in c.dimensions)
        extra_names = tuple(n for n, _ in self._extra)
        excluded = set(c.exclude_dimensions)
        explicit = tuple(c.histogram.explicit.buckets) if c.histogram.explicit.buckets else None
        self._specs = {name: _Spec(name, tuple(k for k in keys if k not in excluded), desc, explicit or bounds,
                                   extra_names) for name, (keys, desc, bounds) in SEMCONV.items()}
        ms = c.histogram.unit == "ms"
        if explicit is not None:
            self._calls_bounds = tuple(b * 1000.0 for b in explicit) if ms else explicit
        else:
            self._calls_bounds = COLLECTOR_BUCKETS_MS if ms else tuple(b / 1000.0 for b in COLLECTOR_BUCKETS_MS)
        self._calls_scale = 1000.0 if ms else 1.0
        self._calls_names = ("service.name", "span.name", "span.kind", "status.code", *extra_names)
        self._by_id: dict[int, tuple[Resource, _ResourceState]] = {}
        self._by_key: dict[tuple[Any, ...], _ResourceState] = {}
        self._last_flush = time.time_ns()
        self._changed = False   # spans since the last emit
        self._loop = FlushLoop(id, c.metrics_flush_interval, self.emit)
        self.stats = {"spans": 0, "unmatched": 0, "dropped_resources": 0}

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._last_flush = time.time_ns()
        self._loop.start()

    def flush(self) -> None:
        self.emit()

    def shutdown(self) -> None:
        self._loop.stop()
        if self._changed:   # flush() emitted already when the pipeline drained
            self.emit()

    # -- aggregation -------------------------------------------------------------------
    def _state(self, r: Resource) -> _ResourceState | None:
        hit = self._by_id.get(id(r))
        if hit is not None and hit[0] is r:
            return hit[1]
        key = r.key()
        st = self._by_key.get(key)
        if st is None:
            if len(self._by_key) >= self.config.resource_metrics_cache_size:
                return None
            st = self._by_key[key] = _ResourceState(r)
        if len(self._by_id) >= 4 * self.config.resource_metrics_cache_size:
            self._by_id.clear()
        self._by_id[id(r)] = (r, st)
        return st

    def _family(self, st: _ResourceState, name: str, bounds: tuple[float, ...] | None) -> Family:
        fam = st.families.get(name)
        if fam is None:
            fam = st.families[name] = Family(name, bounds, self.config.aggregation_cardinality_limit, self.id,
                                             self.config.exemplars.enabled)
        return fam

    def consume_spans(self, spans: list[Span]) -> None:
        now = time.time_ns()
        specs = self._specs
        extra = self._extra
        routes = self._routes
        dropped = unmatched = 0
        with self._lock:
            for s in spans:
                st = self._state(s.resource)
                if st is None:
                    dropped += 1
                    continue
                a = s.attributes
                dur = (s.end_ns - s.start_ns) / 1e9
                if self._semconv:
                    name = classify(s.kind, a)
                    if name is None:
                        unmatched += 1
                    else:
                        spec = specs[name]
                        key = tuple(map(a.get, spec.keys))
                        i = spec.route_idx
                        if i is not None and key[i] is None:
                            path = a.get("url.path")
                            if isinstance(path, str):
                                key = (*key[:i], routes.route(path), *key[i + 1:])
                        i = spec.err_idx
                        if i is not None and key[i] is None and s.status_code == _ERROR:
                            key = (*key[:i], "_OTHER", *key[i + 1:])
                        if extra:
                            key += tuple(a.get(n, d) for n, d in extra)
                        fam = st.families.get(name) or self._family(st, name, spec.bounds)
                        fam.observe(fam.get(key, spec.names, now), dur, now, s.trace_id, s.span_id, s.end_ns)
                if self._calls:
                    key = (s.resource.attributes.get("service.name"), s.name, _KIND_NAMES.get(int(s.kind)),
                           _STATUS_NAMES.get(int(s.status_code)))
                    if extra:
                        key += tuple(a.get(n, d) for n, d in extra)
                    calls = st.families.get("calls") or self._family(st, "calls", None)
                    series = calls.get(key, self._calls_names, now)
                    series.count += 1
                    series.last_ns = now
                    if not self.config.histogram.disable:
                        fam = st.families.get("duration") or self._family(st, "duration", self._calls_bounds)
                        fam.observe(fam.get(key, self._calls_names, now), dur * self._calls_scale, now,
                                    s.trace_id, s.span_id, s.end_ns)
            self._changed = True
            self.stats["spans"] += len(spans) - dropped
            self.stats["unmatched"] += unmatched
            self.stats["dropped_resources"] += dropped
        if dropped:
            tm.CONNECTOR_DROPPED.labels(connector=self.id, reason="resource_limit").inc(dropped)

    # -- emission ----------------------------------------------------------------------
    def _names(self, fam: str) -> tuple[str, str, str]:
        """(metric name, unit, description) of a family."""
        if fam == "calls":
            return f"{self.config.namespace}.calls", "{call}", "Spans, by service, name, kind and status."
        if fam == "duration":
            return f"{self.config.namespace}.duration", self.config.histogram.unit, "Span durations."
        return fam, "s", self._specs[fam].description

    def collect(self) -> list[ResourceMetrics]:
        """The metrics now (a delta collect starts a new interval)."""
        now = time.time_ns()
        out: list[ResourceMetrics] = []
        with self._lock:
            since, self._last_flush = self._last_flush, now
            self._changed = False
            exp = self.config.metrics_expiration
            for st in self._by_key.values():
                metrics = []
                for fname, fam in st.families.items():
                    if exp > 0:
                        fam.expire(now - int(exp * 1e9))
                    name, unit, desc = self._names(fname)
                    m = fam.snapshot(name, unit, desc, self._temporality, now, since)
                    if m is not None:
                        metrics.append(m)
                    tm.CONNECTOR_SERIES.labels(connector=self.id, metric=name).set(len(fam.series))
                if metrics:
                    out.append(ResourceMetrics(st.resource, metrics, SCOPE))
        return out

    def emit(self) -> None:
        batch = self.collect()
        if batch and self.next is not None:
            self.next.consume_metrics(batch)
