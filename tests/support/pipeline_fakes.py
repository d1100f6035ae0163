"""Stand-in components for the runtime's own tests (issue 3).

They are fakes on purpose: the runtime tests check wiring, ordering, draining
and failure handling, which need components that record what happens to them
and can be told to fail. The real pcap receiver and protocols stage (issue 4)
are tested with real traffic in their own tests. Loadable by dotted path
(``class: tests.support.pipeline_fakes:FakeFiniteReceiver``), so subprocess
tests can use them too.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, ClassVar

from service import telemetry as tm
from service.component import ComponentConfig, EventProcessor, Exporter, Receiver, SpanProcessor
from service.model import EventKind, Span, SpanKind, TcpEvent

#: Lifecycle calls in order, e.g. "start exporters-rec"; tests clear it.
LOG: list[str] = []
#: Spans received by each RecordingExporter id.
RECEIVED: dict[str, list[Span]] = {}
_lock = threading.Lock()


def _note(what: str, comp: Any) -> None:
    with _lock:
        LOG.append(f"{what} {comp.id}")


class _Lifecycle:
    def start(self) -> None:
        _note("start", self)
        if getattr(self.config, "fail_start", False):
            raise RuntimeError(f"{self.id} refuses to start")

    def flush(self) -> None:
        _note("flush", self)

    def shutdown(self) -> None:
        _note("shutdown", self)


class FiniteConfig(ComponentConfig):
    #: Ignored; lets ``wirespan replay`` hand this receiver its ``{"path": FILE}``.
    path: str = ""
    events: int = 10
    per_batch: int = 5
    delay: float = 0.0
    fail_start: bool = False


class FakeFiniteReceiver(_Lifecycle, Receiver):
    """Emits ``events`` DATA events in batches from its thread, then sets ``done``."""

    type: ClassVar[str] = "fake_finite"
    finite: ClassVar[bool] = True
    Config = FiniteConfig

    def __init__(self, id: str, config: Any, next: Any = None) -> None:
        super().__init__(id, config, next)
        self.stats = {"packets": 0, "connections": 1, "drops": {}}
        self._t: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        super().start()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        c = self.config
        n = 0
        while n < c.events and not self._stop.is_set():
            batch = []
            for _ in range(min(c.per_batch, c.events - n)):
                batch.append(TcpEvent(EventKind.DATA, ("c", 1), "127.0.0.1", 40000, "127.0.0.1", 80,
                                      time.time_ns(), memoryview(b"GET / HTTP/1.1\r\n\r\n")))
                n += 1
            self.stats["packets"] += len(batch)
            tm.RECEIVER_ACCEPTED.labels(receiver=self.id).inc(len(batch))  # receivers count their own
            self.next.consume_events(batch)
            if c.delay:
                time.sleep(c.delay)
        self.done.set()

    def shutdown(self) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join(5)
        super().shutdown()


class LiveConfig(ComponentConfig):
    interval: float = 0.01
    fail_start: bool = False


class FakeLiveReceiver(_Lifecycle, Receiver):
    """Emits one event every ``interval`` until shut down (a live source)."""

    type: ClassVar[str] = "fake_live"
    Config = LiveConfig

    def __init__(self, id: str, config: Any, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._stop = threading.Event()
        self._t: threading.Thread | None = None
        self.sent = 0

    def start(self) -> None:
        super().start()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval):
            tm.RECEIVER_ACCEPTED.labels(receiver=self.id).inc()
            self.next.consume_events([TcpEvent(EventKind.DATA, ("l", 1), "127.0.0.1", 40001, "127.0.0.1", 80,
                                               time.time_ns(), b"x")])
            self.sent += 1

    def shutdown(self) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join(5)
        super().shutdown()


class EventsConfig(ComponentConfig):
    #: Keep every span until flush() (to prove shutdown drains).
    hold: bool = False
    fail_start: bool = False
    #: Raise on every call (to prove errors are contained and counted).
    explode: bool = False


class FakeEventProcessor(_Lifecycle, EventProcessor):
    """One span per DATA event."""

    type: ClassVar[str] = "fake_events"
    Config = EventsConfig

    def __init__(self, id: str, config: Any, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._held: list[Span] = []
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "drops": {"not_http": 0}}

    def consume_events(self, events: list[TcpEvent]) -> None:
        if self.config.explode:
            raise ValueError("boom")
        tm.PROCESSOR_INCOMING.labels(processor=self.id).inc(len(events))  # as the protocols stage does
        spans = [Span("GET", SpanKind.SERVER, e.ts_ns, e.ts_ns + 1000, {"url.path": "/"}) for e in events]
        with self._lock:
            self.stats["requests"] += len(spans)
            if self.config.hold:
                self._held.extend(spans)
                return
        tm.PROCESSOR_OUTGOING.labels(processor=self.id).inc(len(spans))
        self.next.consume_spans(spans)

    def flush(self) -> None:
        super().flush()
        with self._lock:
            held, self._held = self._held, []
        if held:
            tm.PROCESSOR_OUTGOING.labels(processor=self.id).inc(len(held))
            self.next.consume_spans(held)


class SpanProcConfig(ComponentConfig):
    fail_start: bool = False


class FakeSpanProcessor(_Lifecycle, SpanProcessor):
    type: ClassVar[str] = "fake_spans"
    Config = SpanProcConfig


class RecConfig(ComponentConfig):
    #: Also append each batch as a JSON line here (for subprocess tests).
    path: str = ""
    fail_start: bool = False
    #: Seconds to sleep in shutdown (to trigger the drain timeout).
    slow_shutdown: float = 0.0
    #: Count nothing as sent (an exporter that loses spans).
    lose: bool = False


class RecordingExporter(_Lifecycle, Exporter):
    type: ClassVar[str] = "recording"
    Config = RecConfig
    #: It counts wirespan_exporter_sent_spans, so replay can check delivery.
    reports_delivery: ClassVar[bool] = True

    def consume_spans(self, spans: list[Span]) -> None:
        with _lock:
            RECEIVED.setdefault(self.id, []).extend(spans)
        if self.config.path:
            with open(self.config.path, "a") as f:
                f.write(json.dumps({"n": len(spans), "names": [s.name for s in spans],
                                    "attrs": [s.attributes for s in spans]}) + "\n")
        if not self.config.lose:
            tm.EXPORTER_SENT.labels(exporter=self.id).inc(len(spans))

    def shutdown(self) -> None:
        if self.config.slow_shutdown:
            time.sleep(self.config.slow_shutdown)
        super().shutdown()
