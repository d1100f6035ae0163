"""The batch span processor: size and timeout triggers, max-size splits, draining, Collector defaults."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from processors.batch import BatchProcessor
from service import telemetry as tm
from service.model import Span, SpanKind
from service.pipeline import blocking, should_block


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[Span]] = []
        self.modes: list[bool] = []
        self.threads: list[str] = []
        self.got = threading.Event()

    def consume_spans(self, spans: list[Span]) -> None:
        self.batches.append(list(spans))
        self.modes.append(should_block())
        self.threads.append(threading.current_thread().name)
        self.got.set()


def mk(n: int) -> list[Span]:
    return [Span(f"s{i}", SpanKind.SERVER, 0, 1) for i in range(n)]


def proc(**cfg) -> tuple[BatchProcessor, Sink]:
    sink = Sink()
    p = BatchProcessor("batch/t", BatchProcessor.Config(**cfg), sink)
    p.start()
    return p, sink


def test_collector_defaults() -> None:
    c = BatchProcessor.Config()
    assert (c.send_batch_size, c.timeout, c.send_batch_max_size) == (8192, 0.2, 0)


def test_validation() -> None:
    with pytest.raises(ValidationError, match="send_batch_max_size must be greater or equal to send_batch_size"):
        BatchProcessor.Config(send_batch_size=100, send_batch_max_size=10)
    with pytest.raises(ValidationError, match="timeout must not be negative"):
        BatchProcessor.Config(timeout="-1s")
    with pytest.raises(ValidationError):
        BatchProcessor.Config(send_batch_size=-1)
    with pytest.raises(ValidationError, match="send_batch_sise"):
        BatchProcessor.Config(send_batch_sise=1)
    assert BatchProcessor.Config(send_batch_size=100, send_batch_max_size=0).send_batch_max_size == 0


def test_size_trigger_sends_from_the_caller() -> None:
    p, sink = proc(send_batch_size=10, timeout="1h")
    before = tm.counter_value(tm.BATCH_SIZE_TRIGGER_SEND, processor="batch/t")
    p.consume_spans(mk(4))
    p.consume_spans(mk(4))
    assert sink.batches == []
    p.consume_spans(mk(4))
    assert [len(b) for b in sink.batches] == [12]
    assert sink.threads == [threading.current_thread().name]
    assert tm.counter_value(tm.BATCH_SIZE_TRIGGER_SEND, processor="batch/t") - before == 1
    p.shutdown()


def test_timeout_trigger() -> None:
    p, sink = proc(send_batch_size=1000, timeout="50ms")
    t0 = time.monotonic()
    p.consume_spans(mk(3))
    assert sink.got.wait(5)
    elapsed = time.monotonic() - t0
    assert 0.04 <= elapsed < 2
    assert [len(b) for b in sink.batches] == [3]
    assert sink.threads[0] == "wirespan-batch/t-timer"
    p.shutdown()


def test_max_size_splits_in_order() -> None:
    p, sink = proc(send_batch_size=10, send_batch_max_size=25, timeout="1h")
    items = mk(62)
    p.consume_spans(items)
    assert [len(b) for b in sink.batches] == [25, 25, 12]
    p.shutdown()
    assert [s for b in sink.batches for s in b] == items


def test_max_size_remainder_below_size_waits() -> None:
    p, sink = proc(send_batch_size=20, send_batch_max_size=25, timeout="1h")
    p.consume_spans(mk(30))
    assert [len(b) for b in sink.batches] == [25]     # 5 left: below send_batch_size
    p.shutdown()                                      # ... and drained at shutdown
    assert [len(b) for b in sink.batches] == [25, 5]


def test_timeout_zero_sends_immediately_split_by_max() -> None:
    p, sink = proc(timeout=0, send_batch_size=0, send_batch_max_size=4)
    p.consume_spans(mk(10))
    assert [len(b) for b in sink.batches] == [4, 4, 2]
    p.shutdown()


def test_shutdown_drains_everything() -> None:
    p, sink = proc(send_batch_size=10_000, timeout="1h")
    for _ in range(7):
        p.consume_spans(mk(100))
    p.shutdown()
    assert sum(len(b) for b in sink.batches) == 700
    p.consume_spans(mk(2))          # a straggler after shutdown still goes through
    assert sum(len(b) for b in sink.batches) == 702


def test_timer_carries_the_producers_blocking_mode() -> None:
    p, sink = proc(send_batch_size=1000, timeout="20ms")
    with blocking(True):
        p.consume_spans(mk(1))
    assert sink.got.wait(5)
    sink.got.clear()
    p.consume_spans(mk(1))          # from a live (non-blocking) producer
    assert sink.got.wait(5)
    assert sink.modes == [True, False]
    p.shutdown()


def test_many_threads_exact_count() -> None:
    p, sink = proc(send_batch_size=97, timeout="5ms", send_batch_max_size=200)

    def feed() -> None:
        for _ in range(300):
            p.consume_spans(mk(7))
    ts = [threading.Thread(target=feed) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    p.shutdown()
    assert sum(len(b) for b in sink.batches) == 4 * 300 * 7
    assert max(len(b) for b in sink.batches) <= 200
