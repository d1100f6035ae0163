"""``batch`` span processor: fewer, larger batches for the exporters.

Options and defaults are the Collector's batch processor's: a batch is sent
when it holds ``send_batch_size`` spans or when ``timeout`` has passed since
its first span arrived, whichever comes first; ``send_batch_max_size`` (0 =
no limit) splits larger batches. ``timeout: 0`` sends at once (only the max
size applies).

Size-triggered batches are sent from the calling (receiver) thread; timeout
batches from this processor's timer thread, which carries the producers'
backpressure mode (``service.pipeline.blocking``) so a capture-file replay
still waits on a full exporter queue instead of dropping. The lock is held
while sending so batches leave in arrival order.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from pydantic import Field, model_validator

from service import telemetry as tm
from service.component import ComponentConfig, SpanProcessor
from service.config import Duration
from service.model import Span
from service.pipeline import blocking, should_block

__all__ = ["BatchProcessor", "BatchConfig"]

#: Collector batchprocessor defaults (processor/batchprocessor/factory.go).
DEFAULT_SEND_BATCH_SIZE = 8192
DEFAULT_TIMEOUT = 0.2
DEFAULT_SEND_BATCH_MAX_SIZE = 0


class BatchConfig(ComponentConfig):
    #: Spans that make a batch be sent at once (0: only the timeout sends).
    send_batch_size: int = Field(DEFAULT_SEND_BATCH_SIZE, ge=0)
    #: Longest a span waits for its batch to fill (0: send immediately).
    timeout: Duration = DEFAULT_TIMEOUT
    #: Upper bound of a batch; larger ones are split (0: no bound).
    send_batch_max_size: int = Field(DEFAULT_SEND_BATCH_MAX_SIZE, ge=0)

    @model_validator(mode="after")
    def _check(self) -> BatchConfig:
        if self.timeout < 0:
            raise ValueError("timeout must not be negative")
        if self.send_batch_max_size and self.send_batch_max_size < self.send_batch_size:
            raise ValueError("send_batch_max_size must be greater or equal to send_batch_size")
        return self


class BatchProcessor(SpanProcessor):
    type: ClassVar[str] = "batch"
    signals: ClassVar[tuple[str, ...]] = ("traces", "metrics")
    Config = BatchConfig

    def __init__(self, id: str, config: BatchConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._items: list[Span] = []
        self._cond = threading.Condition(threading.Lock())
        self._deadline = 0.0
        self._block = False       # any producer of the pending batch was finite
        self._stopped = False
        self._timer: threading.Thread | None = None
        self._size_trigger = tm.BATCH_SIZE_TRIGGER_SEND.labels(processor=id)
        self._timeout_trigger = tm.BATCH_TIMEOUT_TRIGGER_SEND.labels(processor=id)
        self._sent_items = tm.BATCH_SEND_SIZE.labels(processor=id)

    def start(self) -> None:
        if self.config.timeout > 0:
            self._timer = threading.Thread(target=self._run_timer, name=f"wirespan-{self.id}-timer", daemon=True)
            self._timer.start()

    def consume_metrics(self, batch: list[Any]) -> None:
        """In a metrics pipeline metrics pass straight on: a connector emits one batch a flush
        interval already, so there is nothing to group (accepted so Collector configs carry over)."""
        self.next.consume_metrics(batch)

    def consume_spans(self, spans: list[Span]) -> None:
        cfg = self.config
        if cfg.timeout == 0 or self._stopped:
            with self._cond:
                self._send(spans)
            return
        with self._cond:
            was_empty = not self._items
            self._items.extend(spans)
            self._block = self._block or should_block()
            if was_empty:
                self._deadline = time.monotonic() + cfg.timeout
                self._cond.notify()
            mx = cfg.send_batch_max_size
            while cfg.send_batch_size and len(self._items) >= cfg.send_batch_size:
                take = min(mx, len(self._items)) if mx else len(self._items)
                batch, self._items = self._items[:take], self._items[take:]
                self._size_trigger.inc()
                self._send(batch)
            if not self._items:
                self._block = False

    def _send(self, batch: list[Span]) -> None:
        """Send ``batch`` in max-size pieces. Caller holds the lock (keeps batch order)."""
        mx = self.config.send_batch_max_size or len(batch) or 1
        for i in range(0, len(batch), mx):
            part = batch[i:i + mx]
            self._sent_items.inc(len(part))
            self.next.consume_spans(part)

    def _run_timer(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._items:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                batch, self._items = self._items, []
                block, self._block = self._block, False
                self._timeout_trigger.inc()
                with blocking(block):
                    self._send(batch)

    def flush(self) -> None:
        with self._cond:
            batch, self._items = self._items, []
            block, self._block = self._block, False
            if batch:
                with blocking(block or should_block()):
                    self._send(batch)

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._timer is not None:
            self._timer.join(5)
        self.flush()
