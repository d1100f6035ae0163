"""``resource`` span processor: the attributes actions applied to each span's resource.

Options follow the Collector's resourceprocessor: one ordered ``attributes``
list of actions (insert, update, upsert, delete, hash, extract), as in the
``attributes`` processor. A resource is shared by many spans, so each distinct
input resource is transformed once and the result is cached (bounded); spans
are pointed at the transformed resource rather than copying it per span.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from pydantic import model_validator

from processors.attributes import ActionConfig, apply_actions, compile_actions
from service.component import ComponentConfig, SpanProcessor
from service.model import Resource, Span

__all__ = ["ResourceConfig", "ResourceProcessor", "MAX_CACHED_RESOURCES"]

#: Distinct resources remembered; a node sees few (one per service/process), so this is only
#: a guard against an unbounded stream of distinct resources (e.g. per-pid attributes).
MAX_CACHED_RESOURCES = 4096


class ResourceConfig(ComponentConfig):
    attributes: list[ActionConfig]

    @model_validator(mode="after")
    def _check(self) -> ResourceConfig:
        if not self.attributes:
            raise ValueError("attributes: at least one action is required")
        return self


class ResourceProcessor(SpanProcessor):
    type: ClassVar[str] = "resource"
    signals: ClassVar[tuple[str, ...]] = ("traces", "metrics")
    Config = ResourceConfig

    def __init__(self, id: str, config: ResourceConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._actions = compile_actions(config.attributes)
        self._cache: dict[tuple[Any, ...], Resource] = {}
        self._by_id: dict[int, tuple[Resource, Resource]] = {}  # id(input) -> (input kept alive, output)
        self._lock = threading.Lock()

    def _transform(self, r: Resource) -> Resource:
        hit = self._by_id.get(id(r))
        if hit is not None and hit[0] is r:
            return hit[1]
        with self._lock:
            key = r.key()
            out = self._cache.get(key)
            if out is None:
                attrs = dict(r.attributes)
                apply_actions(self._actions, attrs)
                out = Resource(attrs)
                if len(self._cache) >= MAX_CACHED_RESOURCES:
                    self._cache.clear()
                    self._by_id.clear()
                self._cache[key] = out
            if len(self._by_id) >= MAX_CACHED_RESOURCES:
                self._by_id.clear()
            self._by_id[id(r)] = (r, out)
            return out

    def consume_spans(self, spans: list[Span]) -> None:
        for s in spans:
            s.resource = self._transform(s.resource)
        self.next.consume_spans(spans)

    def consume_metrics(self, batch: list[Any]) -> None:
        """In a metrics pipeline: the same actions on each ResourceMetrics' resource. The batch may
        go to other pipelines too, so it is not changed: new ResourceMetrics share its metrics."""
        from service.metrics import ResourceMetrics
        self.next.consume_metrics([ResourceMetrics(self._transform(rm.resource), rm.metrics, rm.scope_name,
                                                   rm.scope_version) for rm in batch])
