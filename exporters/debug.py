"""``debug`` exporter: spans (and metrics) to the console, for trying a pipeline out.

Like the Collector's debug exporter, ``verbosity`` picks how much: ``basic``
one line per batch with counts, ``normal`` one line per span, ``detailed``
every field and attribute of every span and its resource. Writes to stdout
(logs go to stderr) under a lock so lines from several pipelines never
interleave. Counts ``wirespan_exporter_sent_spans`` once a batch is written.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, ClassVar, Literal, TextIO

from service import telemetry as tm
from service.component import ComponentConfig, Exporter
from service.metrics import HISTOGRAM, MetricBatch, point_count
from service.model import Span, SpanKind, StatusCode, span_summary

__all__ = ["DebugExporter", "DebugConfig"]


#: Spans ``verbosity: tree`` keeps for the trees it prints at shutdown (beyond: counted, not shown).
MAX_TREE_SPANS = 200_000


class DebugConfig(ComponentConfig):
    #: basic: counts per batch; normal: one line per span with its attributes; detailed: every field;
    #: tree: every trace as an indented tree (service/tracetree.py), printed when the pipeline stops
    #: (a trace's spans arrive in many batches). The Collector's default is basic.
    verbosity: Literal["basic", "normal", "detailed", "tree"] = "basic"


def _fmt_value(v: Any) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "0x" + bytes(v).hex()  # attribute values are small; a copy for display is fine
    return repr(v) if isinstance(v, str) else str(v)


def format_normal(s: Span) -> str:
    """One line: trace id, kind, name, duration, status, then the span's attributes as k=v."""
    attrs = " ".join(f"{k}={_fmt_value(v)}" for k, v in s.attributes.items())
    return f"{s.trace_id.hex()} {span_summary(s)}" + (f" {attrs}" if attrs else "")


def format_detailed(s: Span) -> str:
    lines = [
        f"Span {s.name!r}",
        f"    Trace ID       : {s.trace_id.hex()}",
        f"    Parent ID      : {s.parent_span_id.hex()}",
        f"    ID             : {s.span_id.hex()}",
        f"    Kind           : {SpanKind(s.kind).name}",
        f"    Start time     : {s.start_ns}",
        f"    End time       : {s.end_ns}",
        f"    Duration       : {(s.end_ns - s.start_ns) / 1e6:.3f}ms",
        f"    Status code    : {StatusCode(s.status_code).name}",
        f"    Status message : {s.status_message}",
        "    Attributes:",
    ]
    lines += [f"         -> {k}: {_fmt_value(v)}" for k, v in s.attributes.items()]
    lines.append("    Resource:")
    lines += [f"         -> {k}: {_fmt_value(v)}" for k, v in s.resource.attributes.items()]
    for e in s.events or ():
        lines.append(f"    Event {e.name!r} at {e.ts_ns}")
        lines += [f"         -> {k}: {_fmt_value(v)}" for k, v in e.attributes.items()]
    return "\n".join(lines)


def format_metrics(batch: MetricBatch, detailed: bool) -> str:
    """Metrics as text: one line per metric (``normal``), plus one per data point (``detailed``)."""
    lines = []
    for rm in batch:
        svc = rm.resource.attributes.get("service.name", "")
        for m in rm.metrics:
            lines.append(f"{m.name} {m.type} unit={m.unit or '-'} points={len(m.points)} service.name={svc!r}")
            if not detailed:
                continue
            for p in m.points:
                attrs = " ".join(f"{k}={_fmt_value(v)}" for k, v in p.attributes.items())
                if m.type == HISTOGRAM:
                    b = " ".join(f"le{bound:g}={c}" for bound, c in zip(p.bounds, p.bucket_counts, strict=False))
                    lines.append(f"    {attrs} count={p.count} sum={p.sum:.6g} min={p.min} max={p.max} {b} "
                                 f"inf={p.bucket_counts[-1]} exemplars={len(p.exemplars)}")
                else:
                    lines.append(f"    {attrs} value={p.value}")
    return "".join(line + "\n" for line in lines)


class DebugExporter(Exporter):
    type: ClassVar[str] = "debug"
    signals: ClassVar[tuple[str, ...]] = ("traces", "metrics")
    Config = DebugConfig

    def __init__(self, id: str, config: DebugConfig, next: Any = None, stream: TextIO | None = None) -> None:
        super().__init__(id, config, next)
        self._stream = stream
        self._lock = threading.Lock()
        self._sent = tm.EXPORTER_SENT.labels(exporter=id)
        self._kept: list[Span] = []
        self._not_kept = 0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout  # late: tests swap stdout

    def consume_spans(self, spans: list[Span]) -> None:
        v = self.config.verbosity
        if v == "tree":
            with self._lock:
                room = MAX_TREE_SPANS - len(self._kept)
                self._kept.extend(spans[:max(room, 0)])
                self._not_kept += max(len(spans) - max(room, 0), 0)
            self._sent.inc(len(spans))
            return
        if v == "basic":
            text = f"{self.id}: {len(spans)} spans\n"
        elif v == "normal":
            text = "".join(format_normal(s) + "\n" for s in spans)
        else:
            text = "".join(format_detailed(s) + "\n" for s in spans)
        with self._lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # closed pipe: count, never crash the caller
                tm.EXPORTER_SEND_FAILED.labels(exporter=self.id, reason="write_error").inc(len(spans))
                return
        self._sent.inc(len(spans))

    def consume_metrics(self, batch: MetricBatch) -> None:
        n = point_count(batch)
        v = self.config.verbosity
        if v == "basic":
            text = f"{self.id}: {sum(len(rm.metrics) for rm in batch)} metrics, {n} data points\n"
        else:
            text = format_metrics(batch, detailed=v != "normal")
        with self._lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                tm.EXPORTER_SEND_FAILED_POINTS.labels(exporter=self.id, reason="write_error").inc(n)
                return
        tm.EXPORTER_SENT_POINTS.labels(exporter=self.id).inc(n)

    def shutdown(self) -> None:
        if self.config.verbosity != "tree":
            return
        from service.tracetree import format_forest

        with self._lock:
            kept, self._kept = self._kept, []
            text = format_forest(kept)
            if self._not_kept:
                text += f"({self._not_kept} more spans were not kept for the trees)\n"
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass
