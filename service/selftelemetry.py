"""Self-telemetry on the OpenTelemetry metrics SDK, as the Collector's own telemetry.

Contract: ``Counter`` and ``Gauge`` keep the small prometheus_client API the code base uses
(``Counter(name, doc, labelnames)``, ``.labels(...).inc(n)``, ``.labels(...).set(v)``,
``.collect()``), but every measurement goes through an OpenTelemetry SDK instrument of one
``MeterProvider`` (resource: ``service.name=wirespan``, ``service.version``,
``service.instance.id``, overridden by ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` as the
specification says). One SDK reader holds the cumulative values; two kinds of readers, as
``service.telemetry.metrics.readers`` configures them (the Collector's form), read it:

- ``pull`` (Prometheus): ``PullBridge`` presents the SDK's data to prometheus_client's
  ``REGISTRY`` under today's names and labels (a counter ``x`` is ``x_total``), so the
  ``/metrics`` endpoint, ``REGISTRY.get_sample_value`` and prometheus_client's own
  ``process_*`` metrics are as before;
- ``periodic`` (OTLP): ``PeriodicPusher`` exports the SDK's data every ``interval`` with the
  SDK's OTLP metric exporter (gRPC or HTTP/protobuf), which honours ``OTEL_EXPORTER_OTLP_*``.

The instruments are asynchronous (observable counters and gauges): a measurement updates a
running value, the SDK observes the values when a reader collects. Exemplars are off (no spans
of our own to point at) and the per-instrument cardinality limit is raised above the SDK's 2000
(ids are ours, bounded).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import Gauge as SdkGauge
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.metrics.export import Sum as SdkSum
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Counter", "Gauge", "PROVIDER", "RESOURCE", "REGISTRY", "observe", "PeriodicPusher", "snapshot",
           "CARDINALITY_LIMIT"]

log = logging.getLogger("wirespan.telemetry")

#: Label sets an instrument may hold (the SDK's default, 2000, would fold a long-running
#: service's many component ids into its overflow series).
CARDINALITY_LIMIT = 100_000
_VERSION = "0.1.0"


def _resource() -> Resource:
    base = Resource({"service.name": "wirespan", "service.version": _VERSION,
                     "service.instance.id": str(uuid.uuid4())})
    return base.merge(OTELResourceDetector().detect())   # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win


class _ForkSafeMeterProvider(MeterProvider):
    """The SDK's provider without its fork hook's resource detection.

    Since 1.3x the SDK re-detects the resource in every forked child, on a thread pool; in a
    child forked from a threaded process (``replay --workers``, a test's fork) that pool
    hangs before the child runs a line of its own (seen: CI stuck for good in
    test_ebpf_ring). wirespan's resource is fixed at start, so the child only needs fresh
    locks, which is the rest of the SDK's hook.
    """

    def _handle_fork(self) -> None:
        self._lock = threading.Lock()
        self._meter_lock = threading.Lock()
        MeterProvider._all_metric_readers_lock = threading.Lock()


RESOURCE = _resource()
_reader = InMemoryMetricReader()
PROVIDER = _ForkSafeMeterProvider(metric_readers=[_reader], resource=RESOURCE,
                                  exemplar_filter=AlwaysOffExemplarFilter(),
                                  views=[View(instrument_name="*", aggregation_cardinality_limit=CARDINALITY_LIMIT)])
_meter = PROVIDER.get_meter("wirespan", _VERSION)
#: name -> the wrapper, for label order in the Prometheus view
_FAMILIES: dict[str, _Metric] = {}
_snap_lock = threading.Lock()


def snapshot() -> MetricsData:
    """The SDK's current (cumulative) data of every instrument."""
    with _snap_lock:
        return _reader.get_metrics_data()


class _Child:
    """One label set: its running value, observed by the SDK at each collection."""

    __slots__ = ("_counter", "_lock", "attrs", "value")

    def __init__(self, attrs: dict[str, str], counter: bool) -> None:
        self.attrs = attrs
        self.value = 0.0
        self._counter = counter
        self._lock = threading.Lock()

    def inc(self, amount: float = 1) -> None:
        if self._counter and amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1) -> None:
        if self._counter:
            raise ValueError("counters cannot be decremented")
        with self._lock:
            self.value -= amount

    def set(self, value: float) -> None:
        if self._counter:
            raise TypeError("set() is for gauges")
        with self._lock:
            self.value = value

    # prometheus_client's child._value.get(), which tests read
    @property
    def _value(self) -> _Child:
        return self

    def get(self) -> float:
        return self.value


class _Metric:
    """A family of one instrument, by label values (the prometheus_client API).

    The instrument is asynchronous (an observable counter or gauge of the SDK): ``inc``/``set``
    only update the label set's running value under its lock (a fraction of a microsecond, as
    prometheus_client), and the SDK observes every label set's value when it collects. A
    synchronous SDK ``add`` costs ~14 us here, too much for the per-batch counters of hot paths.
    """

    _counter = True

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (), registry: Any = None,
                 unit: str = "") -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        self._lock = threading.Lock()
        make = _meter.create_observable_counter if self._counter else _meter.create_observable_gauge
        self._inst = make(name, callbacks=[self._observe], unit=unit, description=documentation)
        _FAMILIES[name] = self

    def _observe(self, options: CallbackOptions) -> Iterator[Observation]:
        for c in list(self._children.values()):
            yield Observation(c.value, c.attrs)

    def labels(self, *values: Any, **kw: Any) -> _Child:
        key = tuple(str(v) for v in values) if values else tuple(str(kw[n]) for n in self._labelnames)
        c = self._children.get(key)
        if c is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            with self._lock:
                c = self._children.get(key)
                if c is None:
                    c = self._children[key] = _Child(dict(zip(self._labelnames, key, strict=True)), self._counter)
        return c

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def collect(self) -> list[Any]:
        """This metric as prometheus_client families (for ``telemetry.counter_value`` and tests)."""
        return list(_families(snapshot(), only=self._name))


class Counter(_Metric):
    _counter = True


class Gauge(_Metric):
    _counter = False


def observe(name: str, documentation: str, read: Callable[[], float], unit: str = "") -> None:
    """An asynchronous gauge read at each collection (process RSS, CPU, uptime)."""

    def callback(options: CallbackOptions) -> Iterator[Observation]:
        yield Observation(read())

    _meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=documentation)


def _families(data: MetricsData, only: str | None = None) -> Iterator[Any]:
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if only is not None and m.name != only:
                    continue
                fam = _FAMILIES.get(m.name)
                points = list(m.data.data_points)
                names = fam._labelnames if fam is not None else tuple(
                    sorted({k for p in points for k in (p.attributes or {})}))
                if isinstance(m.data, SdkSum) and m.data.is_monotonic:
                    out: Any = CounterMetricFamily(m.name, m.description or m.name, labels=names)
                elif isinstance(m.data, (SdkGauge, SdkSum)):
                    out = GaugeMetricFamily(m.name, m.description or m.name, labels=names)
                else:
                    continue
                for p in points:
                    a = p.attributes or {}
                    if any(n not in a for n in names):
                        continue   # the overflow series (otel.metric.overflow): not one of ours
                    out.add_metric([str(a[n]) for n in names], p.value)
                yield out


class PullBridge(Collector):
    """prometheus_client's view of the SDK's data (the ``pull`` reader's exposition)."""

    def collect(self) -> Iterator[Any]:
        seen = set()
        for fam in _families(snapshot()):
            seen.add(fam.name)
            yield fam
        for name, m in list(_FAMILIES.items()):   # declared but not measured yet: listed, as before
            if name not in seen:
                cls = CounterMetricFamily if m._counter else GaugeMetricFamily
                yield cls(name, m._doc, labels=m._labelnames)

    def describe(self) -> list[Any]:
        return []   # names are checked by the SDK; registering must not collect


REGISTRY.register(PullBridge())


class PeriodicPusher:
    """A ``periodic`` reader: every ``interval`` s the SDK's data to an OTLP endpoint (and at close)."""

    def __init__(self, protocol: str, endpoint: str | None, headers: dict[str, str] | None, interval: float,
                 timeout: float, insecure: bool | None = None, compression: str | None = None) -> None:
        self.interval = interval
        self.timeout = timeout
        comp: Any = None
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            if compression is not None:
                import grpc
                comp = grpc.Compression.Gzip if compression == "gzip" else grpc.Compression.NoCompression
            self._exporter: Any = OTLPMetricExporter(endpoint=endpoint, insecure=insecure, headers=headers or None,
                                                     timeout=timeout, compression=comp)
        else:
            from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
            if compression is not None:
                comp = HttpCompression.Gzip if compression == "gzip" else HttpCompression.NoCompression
            self._exporter = HttpExporter(endpoint=endpoint, headers=headers or None, timeout=timeout,
                                          compression=comp)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wirespan-telemetry-push", daemon=True)
        self._thread.start()

    def push(self) -> bool:
        try:
            result = self._exporter.export(snapshot(), timeout_millis=self.timeout * 1000)
        except Exception as e:  # the exporter logs its own failures; never take the service down
            log.debug("self-telemetry export failed: %s", e)
            return False
        return getattr(result, "name", "") == "SUCCESS"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.push()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)
        self.push()   # the last values
        try:
            self._exporter.shutdown()
        except Exception:
            pass
