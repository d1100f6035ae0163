"""The component API: what a receiver, processor or exporter implements.

A component is a class with a ``type`` name, a pydantic ``Config`` model (defaults,
``extra="forbid"``), and ``start``/``shutdown``. The pipeline builds it as
``cls(component_id, config, next_consumer)`` and calls:

- ``Receiver``: ``start()`` begins producing; it calls ``self.next.consume_events(events)``.
  A finite receiver (a capture file) sets ``self.done`` when it has produced everything.
- ``EventProcessor`` (the protocols stage): ``consume_events(events)``; emits spans with
  ``self.next.consume_spans(spans)``.
- ``SpanProcessor``: ``consume_spans(spans)``; passes (possibly changed) spans on.
- ``Exporter``: ``consume_spans(spans)``; ships them. An exporter that also takes metrics lists
  ``"metrics"`` in ``signals`` and implements ``consume_metrics(batch)``.
- ``Connector``: the exporter of one pipeline and the receiver of another (``traces`` ->
  ``metrics``): ``consume_spans(spans)``, and it emits ``self.next.consume_metrics(batch)``.
- A metric processor (``signals`` holding ``"metrics"``): ``consume_metrics(batch)``.

``flush()`` pushes anything a component holds into ``next``; the pipeline calls it
while draining at shutdown, stage by stage from receivers to exporters.

Calls into ``consume_*`` may come from several receiver threads: a component
that keeps state guards it itself.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from service.model import Span, TcpEvent

__all__ = [
    "ComponentConfig",
    "Component",
    "Receiver",
    "EventProcessor",
    "SpanProcessor",
    "Exporter",
    "EventConsumer",
    "SpanConsumer",
    "Connector",
    "MetricConsumer",
    "RECEIVER",
    "PROCESSOR",
    "EXPORTER",
    "CONNECTOR",
    "TRACES",
    "METRICS",
]

RECEIVER = "receiver"
PROCESSOR = "processor"
EXPORTER = "exporter"
CONNECTOR = "connector"

#: Pipeline types (signals) wirespan carries.
TRACES = "traces"
METRICS = "metrics"


class ComponentConfig(BaseModel):
    """Base for component configs: unknown keys are errors, as in the Collector."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


@runtime_checkable
class EventConsumer(Protocol):
    def consume_events(self, events: list[TcpEvent]) -> None: ...


@runtime_checkable
class SpanConsumer(Protocol):
    def consume_spans(self, spans: list[Span]) -> None: ...


@runtime_checkable
class MetricConsumer(Protocol):
    def consume_metrics(self, batch: list[Any]) -> None: ...


class Component:
    """Base of every component. Subclasses set ``type``, ``kind`` and ``Config``."""

    type: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, id: str, config: Any, next: Any = None) -> None:
        self.id = id
        self.config = config
        self.next = next

    def start(self) -> None:
        """Acquire resources. Raise to refuse to start (the pipeline stops what it started)."""

    def shutdown(self) -> None:
        """Release resources; must be safe to call once after a failed start."""

    def flush(self) -> None:
        """Push anything held into ``next`` (called while draining)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"


class Receiver(Component):
    kind: ClassVar[str] = RECEIVER
    #: True for receivers that end by themselves (files): the pipeline waits on ``done``.
    finite: ClassVar[bool] = False

    def __init__(self, id: str, config: Any, next: EventConsumer | None = None) -> None:
        super().__init__(id, config, next)
        self.done = threading.Event()


class EventProcessor(Component):
    """Turns ``TcpEvent``s into ``Span``s: exactly one per pipeline, first in the chain."""

    kind: ClassVar[str] = PROCESSOR
    consumes: ClassVar[str] = "events"

    def consume_events(self, events: list[TcpEvent]) -> None:
        raise NotImplementedError


class SpanProcessor(Component):
    kind: ClassVar[str] = PROCESSOR
    consumes: ClassVar[str] = "spans"
    #: Pipeline types it may sit in; one that lists "metrics" implements ``consume_metrics``.
    signals: ClassVar[tuple[str, ...]] = (TRACES,)

    def consume_spans(self, spans: list[Span]) -> None:
        self.next.consume_spans(spans)


class Exporter(Component):
    kind: ClassVar[str] = EXPORTER
    #: Pipeline types it takes: "traces" (``consume_spans``), "metrics" (``consume_metrics``).
    signals: ClassVar[tuple[str, ...]] = (TRACES,)

    def consume_spans(self, spans: list[Span]) -> None:
        raise NotImplementedError

    def consume_metrics(self, batch: list[Any]) -> None:
        raise NotImplementedError


class Connector(Component):
    """Exports from one pipeline type and receives into another (``connects``), as the
    Collector's connectors. It is built once per id; its ``next`` fans out to every pipeline
    that lists it as a receiver. It keeps its own state (aggregates) under its own lock."""

    kind: ClassVar[str] = CONNECTOR
    #: (the pipeline type it exports from, the pipeline type it receives into).
    connects: ClassVar[tuple[str, str]] = (TRACES, METRICS)

    def consume_spans(self, spans: list[Span]) -> None:
        raise NotImplementedError
