"""Spans as indented trees, one per trace: see a trace's structure without a backend.

``wirespan replay --tree`` and the ``debug`` exporter's ``verbosity: tree`` print this. A
span whose parent is not among the spans given (a wire ``traceparent`` from an
instrumented caller, or a parent in another batch) heads its own tree, marked ``^`` with
its parent's id, so nothing is hidden and nothing is invented.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from service.model import Span, SpanKind, StatusCode

__all__ = ["format_forest", "line_of"]


def line_of(s: Span) -> str:
    """One span: kind, name, duration, status, and who served it (service, pid)."""
    res = s.resource.attributes
    who = str(res.get("service.name", ""))
    if "process.pid" in res:
        who += f" pid={res['process.pid']}"
    status = "" if s.status_code == StatusCode.UNSET else f" {StatusCode(s.status_code).name}"
    return (f"{SpanKind(s.kind).name} {s.name} {(s.end_ns - s.start_ns) / 1e6:.3f}ms{status}"
            + (f" [{who}]" if who else ""))


def format_forest(spans: Iterable[Span], max_traces: int | None = None) -> str:
    """Every trace of ``spans`` as a tree, traces by their first start, children by start."""
    spans = sorted(spans, key=lambda x: x.start_ns)
    ids = {s.span_id for s in spans}
    kids: dict[bytes, list[Span]] = defaultdict(list)
    tops: list[Span] = []
    for s in spans:
        if s.parent_span_id and s.parent_span_id in ids and s.parent_span_id != s.span_id:
            kids[s.parent_span_id].append(s)
        else:
            tops.append(s)
    seen: set[bytes] = set()
    for t in tops:
        _reach(t, kids, seen)
    for s in spans:  # a cycle of parent ids (possible on the wire) has no top: its earliest heads it
        if s.span_id not in seen:
            tops.append(s)
            _reach(s, kids, seen)
    by_trace: dict[bytes, list[Span]] = {}
    for t in tops:
        by_trace.setdefault(t.trace_id, []).append(t)
    order = sorted(by_trace, key=lambda tid: min(r.start_ns for r in by_trace[tid]))
    out: list[str] = []
    printed: set[bytes] = set()
    for tid in order if max_traces is None else order[:max_traces]:
        head = len(out)
        out.append("")
        for r in by_trace[tid]:
            mark = f" ^{r.parent_span_id.hex()}" if r.parent_span_id and r.parent_span_id not in printed else ""
            _walk(r, kids, out, mark, printed)
        n = len(out) - head - 1
        out[head] = f"trace {tid.hex()} ({n} span{'s' if n != 1 else ''})"
    if max_traces is not None and len(order) > max_traces:
        out.append(f"... {len(order) - max_traces} more traces not shown")
    return "\n".join(out) + ("\n" if out else "")


def _reach(s: Span, kids: dict[bytes, list[Span]], seen: set[bytes]) -> None:
    stack = [s]
    while stack:
        cur = stack.pop()
        if cur.span_id in seen:
            continue
        seen.add(cur.span_id)
        stack.extend(kids.get(cur.span_id, ()))


def _walk(s: Span, kids: dict[bytes, list[Span]], out: list[str], mark: str, printed: set[bytes]) -> None:
    # Iterative: a hostile or broken trace may be deep, and recursion has a limit.
    stack: list[tuple[Span, int, str]] = [(s, 1, mark)]
    while stack:
        cur, d, m = stack.pop()
        if cur.span_id in printed:
            continue
        printed.add(cur.span_id)
        out.append("  " * d + line_of(cur) + m)
        for c in reversed(kids.get(cur.span_id, ())):  # kids are in start order already
            stack.append((c, d + 1, ""))
