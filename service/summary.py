"""A summary of the spans seen, per protocol and per endpoint: what tshark's ``-z http,tree``
and ``-z conv,tcp`` give a capture, from the spans themselves.

Contract: ``SpanSummary.add(spans)`` (thread-safe) counts each span under its endpoint,
``(protocol, service, operation)``: the protocol from its attributes (``db.system.name``,
``messaging.system``, ``rpc.system.name``, ``network.protocol.name`` (``fastcgi``, ``dns``), HTTP's
method: ``http``, ``http2`` for version 2),
the service from its resource's ``service.name``, the operation its name (``GET /users/{id}``,
``SELECT orders``, ``send orders``). Per endpoint: count, errors (status ERROR), latency
percentiles (end - start), body bytes (``http.request.body.size``, ``messaging.message.body.size``
one way, ``http.response.body.size`` the other). ``report()`` gives the JSON document
(``{"endpoints": [...], "protocols": [...], "totals": {...}}``), ``table()`` the text.

Percentiles are nearest-rank (the smallest duration with at least p % of the spans at or
below it, rank ``ceil(p * n / 100)`` in exact arithmetic) over every duration while an endpoint
has at most ``max_samples`` spans; past that over a uniform sample of that many (reservoir
sampling, Algorithm R, fixed seed): exact for a replay of up to 100k spans an endpoint,
bounded memory for a service that runs for months. All endpoints together keep at most
``max_total_samples`` durations (an endpoint that meets that budget keeps what it has, at
least ``MIN_SAMPLES``, as its reservoir), so memory is bounded by
``8 * (max_total_samples + max_endpoints * MIN_SAMPLES)`` bytes whatever the traffic, not by
``max_endpoints * max_samples``. A protocol's row and the totals weigh each endpoint's samples
by the spans they stand for (``count / kept``): a sampled endpoint of 1M spans outweighs an
exact one of 1k, as in the spans themselves; when every endpoint is exact, so are they.
Endpoints are bounded too (``max_endpoints``): later ones are counted under one
``(other)`` row per protocol, so the summary of a service that sees unbounded operations stays
small. ``report()`` copies the samples under the lock and sorts them outside it, so a SIGUSR1
does not hold the exporter up.

``SummaryExporter`` is the component that feeds one: ``replay --stats`` and ``run --stats``
add it to every traces pipeline (by ``class:``), and the summary, named by its ``name``
option, outlives a SIGHUP reload (``summary_for(name)``).
"""

from __future__ import annotations

import heapq
import math
import random
import threading
from array import array
from fractions import Fraction
from itertools import repeat
from typing import Any, ClassVar

from service.component import ComponentConfig, Exporter
from service.model import Span, StatusCode

__all__ = ["MAX_ENDPOINTS", "MAX_SAMPLES", "MAX_TOTAL_SAMPLES", "MIN_SAMPLES", "SpanSummary", "SummaryExporter",
           "endpoint_of", "percentile", "summary_for"]

#: Durations kept per endpoint for exact percentiles (8 bytes each: 800 KB an endpoint at most).
MAX_SAMPLES = 100_000
#: Durations kept by all endpoints together (16 MB): past it an endpoint stops growing its sample.
MAX_TOTAL_SAMPLES = 2_000_000
#: Durations an endpoint may keep even when the total budget is spent (its p99 stays meaningful).
MIN_SAMPLES = 500
#: Endpoints kept apart; the rest are one "(other)" row (their count, errors and bytes exact).
MAX_ENDPOINTS = 10_000
OTHER = "(other)"
PERCENTILES = (50, 95, 99)

_REQ_BYTES = ("http.request.body.size", "messaging.message.body.size")
_RESP_BYTES = ("http.response.body.size",)


def _rank(p: float, n: float) -> Fraction:
    """``p`` % of ``n`` exactly: ``0.95 * 100`` in floats is not always 95 (``0.29 * 100`` is 28.999...)."""
    return Fraction(str(p)) * Fraction(n) / 100


def percentile(sorted_values: list[float] | array, p: float) -> float:
    """Nearest-rank percentile of ascending ``sorted_values`` (0.0 when empty)."""
    n = len(sorted_values)
    if not n:
        return 0.0
    return float(sorted_values[min(n, max(1, math.ceil(_rank(p, n)))) - 1])


def weighted_percentiles(parts: list[tuple[list[float], float]], ps: tuple[float, ...]) -> list[float]:
    """Nearest-rank percentiles of samples that each stand for ``weight`` spans: ``parts`` are
    (ascending samples, weight). The smallest value whose cumulated weight reaches p % of the
    total; with every weight 1, ``percentile`` of all the samples together."""
    parts = [(d, w) for d, w in parts if d]
    if not parts:
        return [0.0 for _ in ps]
    if all(w == 1 for _, w in parts):
        merged = sorted(v for d, _ in parts for v in d) if len(parts) > 1 else parts[0][0]
        return [percentile(merged, p) for p in ps]
    # floats here (Fractions cost ~2 us an addition, and this path is for millions of samples); the
    # relative slack absorbs their rounding, so a target of exactly k spans is met at the k-th
    total = sum(w * len(d) for d, w in parts)
    targets = sorted((float(_rank(p, total)) * (1 - 1e-12), i) for i, p in enumerate(ps))
    out = [0.0] * len(ps)
    acc, k = 0.0, 0
    last = 0.0
    for v, w in heapq.merge(*(zip(d, repeat(w)) for d, w in parts)):
        acc += w
        last = v
        while k < len(targets) and acc >= targets[k][0]:
            out[targets[k][1]] = float(v)
            k += 1
        if k == len(targets):
            break
    for _, i in targets[k:]:  # rounding of the weights: the largest sample
        out[i] = float(last)
    return out


def _size(v: Any) -> int:
    """A body size attribute as an int; anything else (a processor may have rewritten it) is 0."""
    if v.__class__ is int:
        return v if v > 0 else 0
    try:
        n = int(v)
    except (TypeError, ValueError):
        return 0
    return n if n > 0 else 0


def protocol_of(attrs: dict[str, Any]) -> str:
    """The protocol a span describes, from its semantic-convention attributes."""
    v = attrs.get("db.system.name") or attrs.get("messaging.system") or attrs.get("rpc.system.name") \
        or attrs.get("rpc.system")
    if v:
        return str(v)
    name = attrs.get("network.protocol.name")
    if name and str(name) != "http":  # fastcgi carries HTTP's attributes and says what it is
        return str(name)
    if "http.request.method" in attrs:
        return "http2" if str(attrs.get("network.protocol.version", "")) == "2" else "http"
    if "dns.question.name" in attrs:
        return "dns"
    return "other"


def endpoint_of(span: Span) -> tuple[str, str, str]:
    """(protocol, service, operation) of ``span``."""
    res = span.resource
    service = str(res.attributes.get("service.name", "")) if res is not None else ""
    return protocol_of(span.attributes), service, span.name


class _Endpoint:
    __slots__ = ("count", "durations", "errors", "max_ms", "req_bytes", "resp_bytes", "sum_ms")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.req_bytes = 0
        self.resp_bytes = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0
        self.durations = array("d")

    def add(self, ms: float, error: bool, req: int, resp: int, grow: bool, rng: random.Random) -> bool:
        """Count one span; True when its duration was appended (the budget's business)."""
        d = self.durations
        n = len(d)
        all_kept = self.count == n
        self.count += 1
        self.errors += error
        self.req_bytes += req
        self.resp_bytes += resp
        self.sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms
        if all_kept and grow:
            d.append(ms)
            return True
        # Algorithm R over a reservoir of the size it had when it stopped growing (every span
        # before was kept, as R needs): the n-th span replaces a random kept one with probability k/n
        if n:
            j = rng.randrange(self.count)
            if j < n:
                d[j] = ms
        return False

    def snapshot(self) -> _Endpoint:
        """A copy for ``report()`` to work on outside the lock (the samples copied in C)."""
        e = _Endpoint()
        e.count, e.errors, e.req_bytes, e.resp_bytes = self.count, self.errors, self.req_bytes, self.resp_bytes
        e.sum_ms, e.max_ms, e.durations = self.sum_ms, self.max_ms, array("d", self.durations)
        return e

    def weight(self) -> float:
        """The spans each kept duration stands for."""
        return self.count / len(self.durations) if self.durations else 0.0

    def row(self, pcts: list[float] | None = None) -> dict[str, Any]:
        """The JSON row; ``pcts`` (p50, p95, p99) when computed elsewhere (aggregates)."""
        if pcts is None:
            d = sorted(self.durations)
            pcts = [percentile(d, p) for p in PERCENTILES]
        out: dict[str, Any] = {"count": self.count, "errors": self.errors}
        for p, v in zip(PERCENTILES, pcts, strict=True):
            out[f"p{p}_ms"] = round(v, 6)
        out["mean_ms"] = round(self.sum_ms / self.count, 6) if self.count else 0.0
        out["max_ms"] = round(self.max_ms, 6)
        out["request_bytes"] = self.req_bytes
        out["response_bytes"] = self.resp_bytes
        out["bytes"] = self.req_bytes + self.resp_bytes
        out["exact"] = self.count <= len(self.durations)
        return out


def _aggregate(eps: list[_Endpoint], sorted_samples: dict[int, list[float]]) -> dict[str, Any]:
    """One row for several endpoints: sums, and percentiles weighted by what each sample stands for."""
    agg = _Endpoint()
    for e in eps:
        agg.count += e.count
        agg.errors += e.errors
        agg.req_bytes += e.req_bytes
        agg.resp_bytes += e.resp_bytes
        agg.sum_ms += e.sum_ms
        agg.max_ms = max(agg.max_ms, e.max_ms)
    pcts = weighted_percentiles([(sorted_samples[id(e)], e.weight()) for e in eps], PERCENTILES)
    row = agg.row(pcts)
    row["exact"] = all(e.count <= len(e.durations) for e in eps)
    return row


class SpanSummary:
    """Per-endpoint span statistics (see the module docstring)."""

    def __init__(self, max_endpoints: int = MAX_ENDPOINTS, max_samples: int = MAX_SAMPLES,
                 max_total_samples: int = MAX_TOTAL_SAMPLES, min_samples: int = MIN_SAMPLES) -> None:
        self.max_endpoints = max_endpoints
        self.max_samples = max_samples
        self.max_total_samples = max_total_samples
        self.min_samples = min(min_samples, max_samples)
        self._lock = threading.Lock()
        self._endpoints: dict[tuple[str, str, str], _Endpoint] = {}
        self._kept = 0  # durations kept by all endpoints
        self._rng = random.Random(0x5EED)

    def add(self, spans: list[Span]) -> None:
        """Count ``spans`` (an exporter's batch); never raises on odd attribute values."""
        eps = self._endpoints
        cap, rng = self.max_samples, self._rng
        budget, floor = self.max_total_samples, self.min_samples
        with self._lock:
            for s in spans:
                key = endpoint_of(s)
                e = eps.get(key)
                if e is None:
                    if len(eps) >= self.max_endpoints:
                        key = (key[0], OTHER, OTHER)
                        e = eps.get(key)
                    if e is None:
                        e = eps[key] = _Endpoint()
                a = s.attributes
                req = resp = 0
                for k in _REQ_BYTES:
                    if k in a:
                        req += _size(a[k])
                for k in _RESP_BYTES:
                    if k in a:
                        resp += _size(a[k])
                n = len(e.durations)
                grow = n < cap and (self._kept < budget or n < floor)
                if e.add(max(0, s.end_ns - s.start_ns) / 1e6, s.status_code == StatusCode.ERROR, req, resp, grow,
                         rng):
                    self._kept += 1

    def __len__(self) -> int:
        with self._lock:
            return sum(e.count for e in self._endpoints.values())

    @property
    def kept_samples(self) -> int:
        """Durations kept by all endpoints (at most ``max_total_samples`` + endpoints * ``min_samples``)."""
        with self._lock:
            return self._kept

    def clear(self) -> None:
        with self._lock:
            self._endpoints.clear()
            self._kept = 0

    def report(self) -> dict[str, Any]:
        """``{"endpoints": [...], "protocols": [...], "totals": {...}}``, endpoints by protocol,
        then count (most first), then service and operation."""
        with self._lock:  # only the copy under the lock: the exporter's add() waits for nothing else
            items = [(k, e.snapshot()) for k, e in self._endpoints.items()]
        samples = {id(e): sorted(e.durations) for _, e in items}
        by_proto: dict[str, list[_Endpoint]] = {}
        for (proto, _, _), e in items:
            by_proto.setdefault(proto, []).append(e)
        rows = []
        for (p, s, o), e in items:
            d = samples[id(e)]
            rows.append({"protocol": p, "service": s, "operation": o,
                         **e.row([percentile(d, q) for q in PERCENTILES])})
        protos = [{"protocol": p, **_aggregate(eps, samples)} for p, eps in by_proto.items()]
        totals = {**_aggregate([e for _, e in items], samples), "endpoints": len(items)}
        rows.sort(key=lambda r: (r["protocol"], -r["count"], r["service"], r["operation"]))
        protos.sort(key=lambda r: (-r["count"], r["protocol"]))
        return {"endpoints": rows, "protocols": protos, "totals": totals}

    def table(self, title: str = "") -> str:
        """The report as text: one block per protocol (its total first), one line per endpoint."""
        rep = self.report()
        head = ("count", "errors", "p50 ms", "p95 ms", "p99 ms", "bytes")
        rows: list[tuple[str, ...]] = []

        def nums(r: dict[str, Any]) -> tuple[str, ...]:
            return (str(r["count"]), str(r["errors"]), _ms(r["p50_ms"]), _ms(r["p95_ms"]), _ms(r["p99_ms"]),
                    _bytes(r["bytes"]))

        for pr in rep["protocols"]:
            rows.append((pr["protocol"], "", *nums(pr)))
            for r in rep["endpoints"]:
                if r["protocol"] == pr["protocol"]:
                    rows.append(("  " + (r["service"] or "-"), r["operation"], *nums(r)))
        t = rep["totals"]
        rows.append(("total", f"{t['endpoints']} endpoints", *nums(t)))
        header = ("protocol / service", "operation", *head)
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
        widths[1] = min(widths[1], 60)

        def line(cells: tuple[str, ...]) -> str:
            left = f"{cells[0]:<{widths[0]}}  {_clip(cells[1], widths[1]):<{widths[1]}}"
            return (left + "".join(f"  {c:>{w}}" for c, w in zip(cells[2:], widths[2:], strict=True))).rstrip()

        out = [title] if title else []
        out.append(line(header))
        out.append("-" * len(line(header)))
        out += [line(r) for r in rows]
        return "\n".join(out) + "\n"


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


_summaries: dict[str, SpanSummary] = {}
_summaries_lock = threading.Lock()


def summary_for(name: str = "default") -> SpanSummary:
    """The process-wide summary called ``name`` (made on first use; kept across reloads)."""
    with _summaries_lock:
        s = _summaries.get(name)
        if s is None:
            s = _summaries[name] = SpanSummary()
        return s


class SummaryConfig(ComponentConfig):
    #: The summary (``summary_for(name)``) the spans are counted in.
    name: str = "default"


class SummaryExporter(Exporter):
    """Counts the spans it is given in ``summary_for(config.name)``; sends nothing anywhere."""

    type: ClassVar[str] = "summary"
    Config = SummaryConfig

    def __init__(self, id: str, config: SummaryConfig | dict, next: Any = None) -> None:
        if isinstance(config, dict):
            config = SummaryConfig(**config)
        super().__init__(id, config, next)
        self.summary = summary_for(config.name)

    def consume_spans(self, spans: list[Span]) -> None:
        self.summary.add(spans)
