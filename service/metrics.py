"""Metric data that flows through ``metrics`` pipelines, and its one OTLP encoding.

Contract: a connector (``connectors/``) turns spans into a ``MetricBatch``: a list of
``ResourceMetrics`` (one resource, one instrumentation scope, its metrics), each
``Metric`` holding the data points of one name: ``NumberPoint`` for sums and gauges,
``HistogramPoint`` for explicit-bucket histograms (with ``Exemplar``s: the trace and span
id of a span that fell in a bucket). Everything downstream (metric processors, exporters)
receives the same objects and must not mutate them: a pipeline fans one batch out to all
its exporters. Items are counted in data points, as the Collector counts metric points.

``metrics_to_otlp`` / ``metrics_to_otlp_bytes`` / ``metrics_to_otlp_json`` are the only
places metrics become OTLP (``ExportMetricsServiceRequest``); every exporter goes through
them. Metrics are few next to spans (one point per series per flush), so the official
protobuf messages are used rather than a hand-written encoder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from service.model import SCOPE_VERSION, Resource

__all__ = [
    "AGGREGATION_TEMPORALITY_DELTA",
    "AGGREGATION_TEMPORALITY_CUMULATIVE",
    "SUM",
    "GAUGE",
    "HISTOGRAM",
    "Exemplar",
    "NumberPoint",
    "HistogramPoint",
    "Metric",
    "ResourceMetrics",
    "MetricBatch",
    "point_count",
    "metrics_to_otlp",
    "metrics_to_otlp_bytes",
    "metrics_to_otlp_dict",
    "metrics_to_otlp_json",
    "otlp_json_to_metrics_proto",
]

#: OTLP ``AggregationTemporality`` numbers (metrics.proto).
AGGREGATION_TEMPORALITY_DELTA = 1
AGGREGATION_TEMPORALITY_CUMULATIVE = 2

SUM, GAUGE, HISTOGRAM = "sum", "gauge", "histogram"


class Exemplar:
    """A measurement that went into a point: its value and time, and the span it came from."""

    __slots__ = ("attributes", "span_id", "time_ns", "trace_id", "value")

    def __init__(self, value: float, time_ns: int, trace_id: bytes = b"", span_id: bytes = b"",
                 attributes: dict[str, Any] | None = None) -> None:
        self.value = value
        self.time_ns = time_ns
        self.trace_id = trace_id
        self.span_id = span_id
        self.attributes = attributes or {}


class NumberPoint:
    """One point of a sum or a gauge: attributes, the interval it covers, an int or float value."""

    __slots__ = ("attributes", "exemplars", "start_ns", "time_ns", "value")

    def __init__(self, attributes: dict[str, Any], start_ns: int, time_ns: int, value: int | float,
                 exemplars: list[Exemplar] | None = None) -> None:
        self.attributes = attributes
        self.start_ns = start_ns
        self.time_ns = time_ns
        self.value = value
        self.exemplars = exemplars or []


class HistogramPoint:
    """One explicit-bucket histogram point. ``bucket_counts`` has ``len(bounds) + 1`` entries:
    bucket i counts values in ``(bounds[i-1], bounds[i]]`` (the last one, above every bound)."""

    __slots__ = ("attributes", "bounds", "bucket_counts", "count", "exemplars", "max", "min", "start_ns",
                 "sum", "time_ns")

    def __init__(self, attributes: dict[str, Any], start_ns: int, time_ns: int, count: int, sum: float,
                 bounds: tuple[float, ...], bucket_counts: list[int], min: float | None = None,
                 max: float | None = None, exemplars: list[Exemplar] | None = None) -> None:
        self.attributes = attributes
        self.start_ns = start_ns
        self.time_ns = time_ns
        self.count = count
        self.sum = sum
        self.bounds = bounds
        self.bucket_counts = bucket_counts
        self.min = min
        self.max = max
        self.exemplars = exemplars or []


class Metric:
    """One metric: its name, unit and type, and its points (one per attribute set)."""

    __slots__ = ("description", "monotonic", "name", "points", "temporality", "type", "unit")

    def __init__(self, name: str, type: str, points: list[Any], unit: str = "", description: str = "",
                 temporality: int = AGGREGATION_TEMPORALITY_CUMULATIVE, monotonic: bool = True) -> None:
        if type not in (SUM, GAUGE, HISTOGRAM):
            raise ValueError(f"unknown metric type {type!r}")
        self.name = name
        self.type = type
        self.points = points
        self.unit = unit
        self.description = description
        self.temporality = temporality
        self.monotonic = monotonic

    def __repr__(self) -> str:
        return f"Metric({self.name!r}, {self.type}, {len(self.points)} points)"


class ResourceMetrics:
    """The metrics of one resource from one instrumentation scope (a connector)."""

    __slots__ = ("metrics", "resource", "scope_name", "scope_version")

    def __init__(self, resource: Resource, metrics: list[Metric], scope_name: str = "wirespan",
                 scope_version: str = SCOPE_VERSION) -> None:
        self.resource = resource
        self.metrics = metrics
        self.scope_name = scope_name
        self.scope_version = scope_version


#: What ``consume_metrics`` receives.
MetricBatch = list[ResourceMetrics]


def point_count(batch: Iterable[ResourceMetrics]) -> int:
    """Data points in a batch: the unit metrics pipelines and exporters count in."""
    return sum(len(m.points) for rm in batch for m in rm.metrics)


# ---------------------------------------------------------------------------
# OTLP protobuf
# ---------------------------------------------------------------------------
def _pb() -> tuple[Any, Any, Any, Any]:  # imported lazily, as in service.model
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.metrics.v1 import metrics_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    return metrics_service_pb2, common_pb2, metrics_pb2, resource_pb2


def _kvs(attrs: Mapping[str, Any]) -> list[Any]:
    from service.model import _kvs as span_kvs  # the one AnyValue conversion
    return span_kvs(_pb()[1], attrs)


def _exemplars(pb: Any, exemplars: list[Exemplar]) -> list[Any]:
    out = []
    for e in exemplars:
        kw: dict[str, Any] = {"time_unix_nano": e.time_ns}
        if isinstance(e.value, int):
            kw["as_int"] = e.value
        else:
            kw["as_double"] = e.value
        if e.trace_id:
            kw["trace_id"] = e.trace_id
            kw["span_id"] = e.span_id
        if e.attributes:
            kw["filtered_attributes"] = _kvs(e.attributes)
        out.append(pb.Exemplar(**kw))
    return out


def _metric_pb(pb: Any, m: Metric) -> Any:
    if m.type == HISTOGRAM:
        pts = []
        for p in m.points:
            kw: dict[str, Any] = {}
            if p.min is not None:
                kw["min"] = p.min
            if p.max is not None:
                kw["max"] = p.max
            pts.append(pb.HistogramDataPoint(
                attributes=_kvs(p.attributes), start_time_unix_nano=p.start_ns, time_unix_nano=p.time_ns,
                count=p.count, sum=p.sum, bucket_counts=p.bucket_counts, explicit_bounds=p.bounds,
                exemplars=_exemplars(pb, p.exemplars), **kw))
        return pb.Metric(name=m.name, description=m.description, unit=m.unit,
                         histogram=pb.Histogram(data_points=pts, aggregation_temporality=m.temporality))
    npts = []
    for p in m.points:
        kw = {"as_int": p.value} if isinstance(p.value, int) and not isinstance(p.value, bool) \
            else {"as_double": float(p.value)}
        npts.append(pb.NumberDataPoint(attributes=_kvs(p.attributes), start_time_unix_nano=p.start_ns,
                                       time_unix_nano=p.time_ns, exemplars=_exemplars(pb, p.exemplars), **kw))
    if m.type == SUM:
        return pb.Metric(name=m.name, description=m.description, unit=m.unit,
                         sum=pb.Sum(data_points=npts, aggregation_temporality=m.temporality,
                                    is_monotonic=m.monotonic))
    return pb.Metric(name=m.name, description=m.description, unit=m.unit, gauge=pb.Gauge(data_points=npts))


def metrics_to_otlp(batch: Iterable[ResourceMetrics]) -> Any:
    """A batch -> ``ExportMetricsServiceRequest`` (one ResourceMetrics per resource and scope)."""
    svc, common_pb2, pb, resource_pb2 = _pb()
    out = []
    for rm in batch:
        scope = common_pb2.InstrumentationScope(name=rm.scope_name, version=rm.scope_version)
        out.append(pb.ResourceMetrics(
            resource=resource_pb2.Resource(attributes=_kvs(rm.resource.attributes)),
            scope_metrics=[pb.ScopeMetrics(scope=scope, metrics=[_metric_pb(pb, m) for m in rm.metrics])]))
    return svc.ExportMetricsServiceRequest(resource_metrics=out)


def metrics_to_otlp_bytes(batch: Iterable[ResourceMetrics]) -> bytes:
    """A batch -> serialized ``ExportMetricsServiceRequest``: what the exporters send."""
    return metrics_to_otlp(batch).SerializeToString()


# ---------------------------------------------------------------------------
# OTLP/JSON (hex ids, integer enums, 64-bit integers as strings)
# ---------------------------------------------------------------------------
def _hex_ids(d: dict[str, Any], to_hex: bool) -> None:
    """Exemplar ids: base64 in protobuf's JSON mapping, hex in OTLP/JSON (both directions)."""
    import base64
    for rm in d.get("resourceMetrics", []):
        for sm in rm.get("scopeMetrics", []):
            for m in sm.get("metrics", []):
                for kind in ("sum", "gauge", "histogram", "exponentialHistogram"):
                    for p in (m.get(kind) or {}).get("dataPoints", []):
                        for e in p.get("exemplars", []):
                            for k in ("traceId", "spanId"):
                                if e.get(k):
                                    e[k] = (base64.b64decode(e[k]).hex() if to_hex
                                            else base64.b64encode(bytes.fromhex(e[k])).decode())


def metrics_to_otlp_dict(batch: Iterable[ResourceMetrics]) -> dict[str, Any]:
    """A batch -> the OTLP/JSON object of one ``ExportMetricsServiceRequest``."""
    from google.protobuf import json_format
    d = json_format.MessageToDict(metrics_to_otlp(batch), use_integers_for_enums=True)
    _hex_ids(d, to_hex=True)
    return d


def metrics_to_otlp_json(batch: Iterable[ResourceMetrics]) -> str:
    """One line of the Collector file exporter's format (no newline)."""
    return json.dumps(metrics_to_otlp_dict(batch), ensure_ascii=False, separators=(",", ":"))


def otlp_json_to_metrics_proto(text: str | bytes) -> Any:
    """Parse an OTLP/JSON ``ExportMetricsServiceRequest`` back to the protobuf message."""
    from google.protobuf import json_format
    d = json.loads(text)
    _hex_ids(d, to_hex=False)
    return json_format.ParseDict(d, _pb()[0].ExportMetricsServiceRequest())
