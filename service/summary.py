"""A summary of the spans seen, per protocol and per endpoint: what tshark's ``-z http,tree``
and ``-z conv,tcp`` give a capture, from the spans themselves.

Contract: ``SpanSummary.add(spans)`` (thread-safe) counts each span under its endpoint,
``(protocol, service, operation)``: the protocol from its attributes (``db.system.name``,
``messaging.system``, ``rpc.system.name``, HTTP's method: ``http``, ``http2`` for version 2),
the service from its resource's ``service.name``, the operation its name (``GET /users/{id}``,
``SELECT orders``, ``send orders``). Per endpoint: count, errors (status ERROR), latency
percentiles (end - start), body bytes (``http.request.body.size``, ``messaging.message.body.size``
one way, ``http.response.body.size`` the other). ``report()`` gives the JSON document
(``{"endpoints": [...], "protocols": [...], "totals": {...}}``), ``table()`` the text.

Percentiles are nearest-rank (the smallest duration with at least p % of the spans at or
below it) over every duration while an endpoint has at most ``max_samples`` spans; past that
over a uniform sample of that many (reservoir sampling, Algorithm R, fixed seed): exact for
a replay of up to 100k spans an endpoint, bounded memory for a service that runs for months.
Endpoints are bounded too (``max_endpoints``): later ones are counted under one
``(other)`` row, so the summary of a service that sees unbounded operations stays small.

``SummaryExporter`` is the component that feeds one: ``replay --stats`` and ``run --stats``
add it to every traces pipeline (by ``class:``), and the summary, named by its ``name``
option, outlives a SIGHUP reload (``summary_for(name)``).
"""

from __future__ import annotations

import math
import random
import threading
from array import array
from typing import Any, ClassVar

from service.component import ComponentConfig, Exporter
from service.model import Span, StatusCode

__all__ = ["MAX_ENDPOINTS", "MAX_SAMPLES", "SpanSummary", "SummaryExporter", "endpoint_of", "percentile",
           "summary_for"]

#: Durations kept per endpoint for exact percentiles (8 bytes each: 800 KB an endpoint at most).
MAX_SAMPLES = 100_000
#: Endpoints kept apart; the rest are one "(other)" row (their count, errors and bytes exact).
MAX_ENDPOINTS = 10_000
OTHER = "(other)"
PERCENTILES = (50, 95, 99)

_REQ_BYTES = ("http.request.body.size", "messaging.message.body.size")
_RESP_BYTES = ("http.response.body.size",)


def percentile(sorted_values: list[float] | array, p: float) -> float:
    """Nearest-rank percentile of ascending ``sorted_values`` (0.0 when empty)."""
    n = len(sorted_values)
    if not n:
        return 0.0
    return float(sorted_values[max(0, math.ceil(p / 100 * n) - 1)])


def protocol_of(attrs: dict[str, Any]) -> str:
    """The protocol a span describes, from its semantic-convention attributes."""
    v = attrs.get("db.system.name") or attrs.get("messaging.system") or attrs.get("rpc.system.name") \
        or attrs.get("rpc.system")
    if v:
        return str(v)
    if "http.request.method" in attrs:
        return "http2" if str(attrs.get("network.protocol.version", "")) == "2" else "http"
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

    def add(self, ms: float, error: bool, req: int, resp: int, cap: int, rng: random.Random) -> None:
        self.count += 1
        self.errors += error
        self.req_bytes += req
        self.resp_bytes += resp
        self.sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms
        d = self.durations
        if len(d) < cap:
            d.append(ms)
        else:  # Algorithm R: the n-th item replaces a random kept one with probability cap/n
            j = rng.randrange(self.count)
            if j < cap:
                d[j] = ms

    def merge(self, other: _Endpoint, cap: int, rng: random.Random) -> None:
        self.count += other.count
        self.errors += other.errors
        self.req_bytes += other.req_bytes
        self.resp_bytes += other.resp_bytes
        self.sum_ms += other.sum_ms
        self.max_ms = max(self.max_ms, other.max_ms)
        d = self.durations
        d.extend(other.durations)
        if len(d) > cap:
            self.durations = array("d", rng.sample(list(d), cap))

    def row(self) -> dict[str, Any]:
        d = sorted(self.durations)
        out: dict[str, Any] = {"count": self.count, "errors": self.errors}
        for p in PERCENTILES:
            out[f"p{p}_ms"] = round(percentile(d, p), 6)
        out["mean_ms"] = round(self.sum_ms / self.count, 6) if self.count else 0.0
        out["max_ms"] = round(self.max_ms, 6)
        out["request_bytes"] = self.req_bytes
        out["response_bytes"] = self.resp_bytes
        out["bytes"] = self.req_bytes + self.resp_bytes
        out["exact"] = self.count <= len(self.durations)
        return out


class SpanSummary:
    """Per-endpoint span statistics (see the module docstring)."""

    def __init__(self, max_endpoints: int = MAX_ENDPOINTS, max_samples: int = MAX_SAMPLES) -> None:
        self.max_endpoints = max_endpoints
        self.max_samples = max_samples
        self._lock = threading.Lock()
        self._endpoints: dict[tuple[str, str, str], _Endpoint] = {}
        self._rng = random.Random(0x5EED)

    def add(self, spans: list[Span]) -> None:
        eps = self._endpoints
        cap, rng = self.max_samples, self._rng
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
                req = sum(int(a.get(k, 0) or 0) for k in _REQ_BYTES if k in a)
                resp = sum(int(a.get(k, 0) or 0) for k in _RESP_BYTES if k in a)
                e.add(max(0, s.end_ns - s.start_ns) / 1e6, s.status_code == StatusCode.ERROR, req, resp, cap, rng)

    def __len__(self) -> int:
        with self._lock:
            return sum(e.count for e in self._endpoints.values())

    def clear(self) -> None:
        with self._lock:
            self._endpoints.clear()

    def report(self) -> dict[str, Any]:
        """``{"endpoints": [...], "protocols": [...], "totals": {...}}``, endpoints by protocol,
        then count (most first), then service and operation."""
        with self._lock:
            items = [(k, e) for k, e in self._endpoints.items()]
            cap, rng = self.max_samples, random.Random(1)
            by_proto: dict[str, _Endpoint] = {}
            total = _Endpoint()
            for (proto, _, _), e in items:
                by_proto.setdefault(proto, _Endpoint()).merge(e, cap, rng)
                total.merge(e, cap, rng)
            rows = [{"protocol": p, "service": s, "operation": o, **e.row()} for (p, s, o), e in items]
            protos = [{"protocol": p, **e.row()} for p, e in by_proto.items()]
            totals = {**total.row(), "endpoints": len(items)}
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
