"""Example third-party components, found through entry points."""

from __future__ import annotations

import json
from typing import ClassVar

from service import telemetry as tm
from service.component import ComponentConfig, Exporter, SpanProcessor


class UppercaseConfig(ComponentConfig):
    suffix: str = ""


class UppercaseProcessor(SpanProcessor):
    """Upper-cases span names (and appends ``suffix``)."""

    type: ClassVar[str] = "uppercase"
    Config = UppercaseConfig

    def consume_spans(self, spans):
        for s in spans:
            s.name = s.name.upper() + self.config.suffix
        self.next.consume_spans(spans)


class CountingConfig(ComponentConfig):
    path: str


class CountingExporter(Exporter):
    """Appends one JSON line per batch with the span names."""

    type: ClassVar[str] = "counting"
    Config = CountingConfig

    def consume_spans(self, spans):
        with open(self.config.path, "a") as f:
            f.write(json.dumps([s.name for s in spans]) + "\n")
        tm.EXPORTER_SENT.labels(exporter=self.id).inc(len(spans))
