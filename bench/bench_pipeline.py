"""Runtime overhead: what the pipeline's links (counting, error containment,
backpressure mode, fan-out) cost per batch, against the same components
called directly, and the batch processor's cost per span.

    python -m bench pipeline      (or: python bench/bench_pipeline.py)

Prints medians of 7 runs. The links work per batch, never per item, so their
share shrinks as batches grow; the receivers hand over batches of hundreds of
events.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import ClassVar

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service import config as wconfig
from service.component import ComponentConfig, EventProcessor, Exporter, Receiver
from service.model import EventKind, Span, SpanKind, TcpEvent
from service.pipeline import Service
from service.registry import Registry

RUNS = 7
ITEMS = 200_000


class _Rcv(Receiver):
    type: ClassVar[str] = "bench_rcv"
    finite: ClassVar[bool] = True


class _Spans(EventProcessor):
    """One pre-built span per event: the parser's cost is not what is measured here."""

    type: ClassVar[str] = "bench_events"
    SPAN = Span("GET", SpanKind.SERVER, 0, 1)

    def consume_events(self, events: list) -> None:
        self.next.consume_spans([self.SPAN] * len(events))


class _Null(Exporter):
    type: ClassVar[str] = "bench_null"
    Config = ComponentConfig
    n = 0

    def consume_spans(self, spans: list) -> None:
        _Null.n += len(spans)


def _registry() -> Registry:
    r = Registry(entry_points=False)
    r.register("receiver", "bench_rcv", _Rcv)
    r.register("processor", "bench_events", _Spans)
    r.register("exporter", "bench_null", _Null)
    return r


def _service(processors: dict, chain: list[str]) -> Service:
    raw = {"receivers": {"bench_rcv": {}}, "processors": {"bench_events": {}, **processors},
           "exporters": {"bench_null": {}},
           "service": {"pipelines": {"traces": {"receivers": ["bench_rcv"], "processors": ["bench_events", *chain],
                                                "exporters": ["bench_null"]}},
                       "telemetry": {"metrics": {"address": ""}, "health": {"address": ""}}}}
    return Service(wconfig.validate(raw, _registry()))


def _time(fn, batches: list) -> float:
    samples = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ev = TcpEvent(EventKind.DATA, 1, "127.0.0.1", 1, "127.0.0.1", 80, 0, b"x")
    print(f"{'batch':>6} {'direct ns/batch':>16} {'pipeline ns/batch':>18} {'link cost ns/batch':>19} "
          f"{'pipeline spans/s':>17}")
    for size in (1, 64, 512):
        batches = [[ev] * size for _ in range(ITEMS // size)]
        svc = _service({}, [])
        entry = svc.receivers["bench_rcv"].next          # the receiver's view of the pipeline
        direct = _Spans("d", None, _Null("n", None))
        t_direct = _time(direct.consume_events, batches)
        t_pipe = _time(entry.consume_events, batches)
        nb = len(batches)
        print(f"{size:>6} {t_direct / nb * 1e9:>16.0f} {t_pipe / nb * 1e9:>18.0f} "
              f"{(t_pipe - t_direct) / nb * 1e9:>19.0f} {ITEMS / t_pipe:>17.0f}")
    # batch processor: spans/s through protocols-stand-in -> batch -> null, batches of 64 events
    batches = [[ev] * 64 for _ in range(ITEMS // 64)]
    svc = _service({"batch": {"send_batch_size": 8192, "timeout": "1h"}}, ["batch"])
    svc.start()
    entry = svc.receivers["bench_rcv"].next
    t = _time(entry.consume_events, batches)
    svc.shutdown()
    print(f"with batch(8192): {ITEMS / t:,.0f} spans/s ({t / ITEMS * 1e9:.0f} ns/span), median of {RUNS}")


if __name__ == "__main__":
    main()
