"""An example custom span processor: copy this file to write your own.

Loaded by dotted path, no packaging needed (config/custom-processor.yaml)::

    processors:
      tagger:
        class: processors.example_tag:TagProcessor
        value: tagged

It sets one attribute (``wirespan.example`` = ``tagged`` by default) on every
span and passes the batch on. A processor is a class with ``type``, a pydantic
``Config`` (unknown keys are errors), built as ``cls(id, config, next)``; it
may be called from several receiver threads at once, so keep state behind a
lock (this one has none).
"""

from __future__ import annotations

from typing import ClassVar

from service.component import ComponentConfig, SpanProcessor
from service.model import Span

__all__ = ["TagProcessor"]


class TagConfig(ComponentConfig):
    #: The attribute to set on every span.
    key: str = "wirespan.example"
    #: Its value.
    value: str = "tagged"


class TagProcessor(SpanProcessor):
    type: ClassVar[str] = "example_tag"
    Config = TagConfig

    def consume_spans(self, spans: list[Span]) -> None:
        key, value = self.config.key, self.config.value
        for s in spans:
            s.attributes[key] = value
        self.next.consume_spans(spans)
