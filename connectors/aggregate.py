"""What both connectors share: histogram and counter series, cardinality limits, flushing.

Contract: a ``Series`` is the running aggregate of one attribute set of one metric (a
histogram: count, sum, min, max, bucket counts and one exemplar a bucket; or a counter).
A ``Family`` holds the series of one metric for one resource, bounded by the cardinality
limit: past it, new attribute sets go into one overflow series whose only attribute is
``otel.metric.overflow=true`` (the OpenTelemetry SDK's rule), and each such measurement is
counted (``wirespan_connector_overflow_spans``). ``snapshot`` turns families into
``service.metrics`` points: cumulative (everything since the series began) or delta (since
the last flush; the series are then forgotten, so the limit applies per interval).

``FlushLoop`` is the timer thread every connector uses: it calls ``emit()`` each
``interval`` and once more at ``flush()``/``shutdown()``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from service import telemetry as tm
from service.metrics import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    AGGREGATION_TEMPORALITY_DELTA,
    HISTOGRAM,
    SUM,
    Exemplar,
    HistogramPoint,
    Metric,
    NumberPoint,
)

__all__ = ["Series", "Family", "FlushLoop", "OVERFLOW_ATTRS", "TEMPORALITIES", "Temporality", "temporality_number"]

log = logging.getLogger("wirespan.connector")

#: The attributes of the overflow series (OpenTelemetry metrics SDK: cardinality limits).
OVERFLOW_ATTRS = {"otel.metric.overflow": True}
_OVERFLOW_KEY = ("\0overflow",)

#: The Collector's spellings, and the short ones.
Temporality = Literal["AGGREGATION_TEMPORALITY_CUMULATIVE", "AGGREGATION_TEMPORALITY_DELTA", "cumulative", "delta"]
TEMPORALITIES = {"AGGREGATION_TEMPORALITY_CUMULATIVE": AGGREGATION_TEMPORALITY_CUMULATIVE,
                 "cumulative": AGGREGATION_TEMPORALITY_CUMULATIVE,
                 "AGGREGATION_TEMPORALITY_DELTA": AGGREGATION_TEMPORALITY_DELTA,
                 "delta": AGGREGATION_TEMPORALITY_DELTA}


def temporality_number(name: str) -> int:
    return TEMPORALITIES[name]


class Series:
    """One attribute set's aggregate. A counter uses ``count`` only."""

    __slots__ = ("attrs", "buckets", "count", "exemplars", "last_ns", "max", "min", "start_ns", "sum")

    def __init__(self, attrs: dict[str, Any], nbuckets: int, start_ns: int) -> None:
        self.attrs = attrs
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.buckets = [0] * nbuckets if nbuckets else None
        #: per bucket: (value, time_ns, trace_id, span_id) of the latest measurement, or None
        self.exemplars: list[Any] | None = [None] * nbuckets if nbuckets else None
        self.start_ns = start_ns
        self.last_ns = start_ns


class Family:
    """The series of one metric for one resource, at most ``limit`` of them plus the overflow series."""

    __slots__ = ("bounds", "connector", "exemplars", "limit", "metric", "series")

    def __init__(self, metric: str, bounds: tuple[float, ...] | None, limit: int, connector: str,
                 exemplars: bool = True) -> None:
        self.metric = metric
        self.bounds = bounds               # None: a counter
        self.limit = limit
        self.connector = connector
        self.exemplars = exemplars and bounds is not None
        self.series: dict[tuple[Any, ...], Series] = {}

    def get(self, key: tuple[Any, ...], names: tuple[str, ...], now_ns: int) -> Series:
        """The series of ``key`` (the values of the attributes ``names``; None: absent), or the
        overflow series past the limit."""
        s = self.series.get(key)
        if s is not None:
            return s
        nb = len(self.bounds) + 1 if self.bounds is not None else 0
        if len(self.series) >= self.limit:
            tm.CONNECTOR_OVERFLOW.labels(connector=self.connector, metric=self.metric).inc()
            s = self.series.get(_OVERFLOW_KEY)
            if s is None:
                s = self.series[_OVERFLOW_KEY] = Series(dict(OVERFLOW_ATTRS), nb, now_ns)
            return s
        attrs = {n: v for n, v in zip(names, key, strict=False) if v is not None}
        s = self.series[key] = Series(attrs, nb, now_ns)
        return s

    def observe(self, s: Series, value: float, now_ns: int, trace_id: bytes = b"", span_id: bytes = b"",
                t_ns: int = 0) -> None:
        """One measurement into a histogram series (with its exemplar)."""
        s.count += 1
        s.sum += value
        if value < s.min:
            s.min = value
        if value > s.max:
            s.max = value
        i = bisect.bisect_left(self.bounds, value)  # type: ignore[arg-type]
        s.buckets[i] += 1  # type: ignore[index]
        if self.exemplars and trace_id:
            s.exemplars[i] = (value, t_ns or now_ns, trace_id, span_id)  # type: ignore[index]
        s.last_ns = now_ns

    def expire(self, older_than_ns: int) -> int:
        """Forget series not updated since ``older_than_ns``; returns how many."""
        dead = [k for k, s in self.series.items() if s.last_ns < older_than_ns]
        for k in dead:
            del self.series[k]
        return len(dead)

    def snapshot(self, name: str, unit: str, description: str, temporality: int, now_ns: int,
                 since_ns: int) -> Metric | None:
        """This family's points; a delta snapshot empties the family."""
        if not self.series:
            return None
        delta = temporality == AGGREGATION_TEMPORALITY_DELTA
        points: list[Any] = []
        for s in self.series.values():
            start = since_ns if delta else s.start_ns
            if self.bounds is None:
                points.append(NumberPoint(s.attrs, start, now_ns, s.count))
                continue
            ex = [Exemplar(e[0], e[1], e[2], e[3]) for e in s.exemplars if e is not None] if self.exemplars \
                else None  # type: ignore[union-attr]
            points.append(HistogramPoint(s.attrs, start, now_ns, s.count, s.sum, self.bounds, list(s.buckets),
                                         s.min if s.count else None, s.max if s.count else None, ex))
        if delta:
            self.series = {}
        if self.bounds is None:
            return Metric(name, SUM, points, unit, description, temporality, monotonic=True)
        return Metric(name, HISTOGRAM, points, unit, description, temporality)


class FlushLoop:
    """Calls ``emit()`` every ``interval`` seconds from its own daemon thread."""

    def __init__(self, name: str, interval: float, emit: Callable[[], None]) -> None:
        self.name = name
        self.interval = interval
        self._emit = emit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"wirespan-{self.name}-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._emit()
            except Exception:  # a bug must not end the loop: the next interval tries again
                log.exception("%s: emitting metrics failed", self.name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def now_ns() -> int:
    return time.time_ns()
