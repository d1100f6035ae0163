"""``filter`` span processor: drop spans nobody wants to pay for (health checks, fast cache hits).

Rules are plain data rather than the Collector's OTTL (which has no Python
implementation): ``spans.exclude`` drops a span that matches any rule;
``spans.include``, when given, keeps only spans that match some rule
(include is applied first, as in the Collector's legacy filterprocessor).
Within one rule every condition given must hold:

- ``name`` / ``name_regex``: span name equality / regex search;
- ``attributes``: {key: value} equality; ``attributes_regex``: {key: regex} search;
- ``protocol``: the wire protocol, from ``rpc.system.name`` (grpc), ``db.system.name``
  (postgresql, mysql, redis, mongodb, memcached, couchbase), ``messaging.system``
  (kafka, mqtt), else ``http`` when ``http.request.method`` is set;
- ``kind``: span kinds (server, client, producer, consumer, internal);
- ``min_duration`` / ``max_duration``: duration >= min and < max;
- ``status``: unset, ok, error.

Dropped spans are counted as ``wirespan_processor_dropped_items{reason="filtered"}``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from processors.attributes import SPAN_KINDS
from service import telemetry
from service.component import ComponentConfig, SpanProcessor
from service.config import Duration
from service.model import Span, StatusCode

__all__ = ["FilterConfig", "FilterProcessor", "Rule", "span_protocol"]

StatusName = Literal["unset", "ok", "error"]
_STATUS = {"unset": int(StatusCode.UNSET), "ok": int(StatusCode.OK), "error": int(StatusCode.ERROR)}
#: Attributes that name a span's protocol, most specific first (gRPC spans also carry HTTP ones).
PROTOCOL_KEYS = ("rpc.system.name", "rpc.system", "db.system.name", "db.system", "messaging.system")


def span_protocol(s: Span) -> str:
    a = s.attributes
    for k in PROTOCOL_KEYS:
        v = a.get(k)
        if v:
            return str(v)
    if "http.request.method" in a:
        return "http"
    return ""


class RuleConfig(ComponentConfig):
    name: str | None = None
    name_regex: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    attributes_regex: dict[str, str] = Field(default_factory=dict)
    protocol: list[str] = Field(default_factory=list)
    kind: list[str] = Field(default_factory=list)
    min_duration: Duration | None = None
    max_duration: Duration | None = None
    status: list[StatusName] = Field(default_factory=list)

    @field_validator("kind")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if k.lower() not in SPAN_KINDS]
        if bad:
            raise ValueError(f"unknown span kind(s) {bad}; use {sorted(SPAN_KINDS)}")
        return [k.lower() for k in v]

    @model_validator(mode="after")
    def _check(self) -> RuleConfig:
        given = [self.name, self.name_regex, self.attributes, self.attributes_regex, self.protocol, self.kind,
                 self.min_duration, self.max_duration, self.status]
        if not any(g not in (None, {}, []) for g in given):
            raise ValueError("an empty rule would match every span")
        for p in [self.name_regex, *self.attributes_regex.values()]:
            if p is not None:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f"invalid regular expression {p!r}: {e}")
        for d in (self.min_duration, self.max_duration):
            if d is not None and d < 0:
                raise ValueError("durations must not be negative")
        if self.min_duration is not None and self.max_duration is not None and self.min_duration >= self.max_duration:
            raise ValueError("min_duration must be less than max_duration")
        return self


class Rule:
    """A compiled rule: every given condition must hold."""

    __slots__ = ("attrs", "attrs_re", "kinds", "max_ns", "min_ns", "name", "name_re", "protocols", "status")

    def __init__(self, c: RuleConfig) -> None:
        self.name = c.name
        self.name_re = re.compile(c.name_regex) if c.name_regex is not None else None
        self.attrs = list(c.attributes.items())
        self.attrs_re = [(k, re.compile(p)) for k, p in c.attributes_regex.items()]
        self.protocols = frozenset(p.lower() for p in c.protocol)
        self.kinds = frozenset(SPAN_KINDS[k] for k in c.kind)
        self.min_ns = None if c.min_duration is None else int(c.min_duration * 1e9)
        self.max_ns = None if c.max_duration is None else int(c.max_duration * 1e9)
        self.status = frozenset(_STATUS[s] for s in c.status)

    def matches(self, s: Span) -> bool:
        if self.name is not None and s.name != self.name:
            return False
        if self.name_re is not None and not self.name_re.search(s.name):
            return False
        if self.kinds and int(s.kind) not in self.kinds:
            return False
        if self.status and int(s.status_code) not in self.status:
            return False
        if self.min_ns is not None or self.max_ns is not None:
            d = s.end_ns - s.start_ns
            if self.min_ns is not None and d < self.min_ns:
                return False
            if self.max_ns is not None and d >= self.max_ns:
                return False
        a = s.attributes
        for k, v in self.attrs:
            if k not in a:
                return False
            got = a[k]
            if got != v and str(got) != str(v):
                return False
        for k, rx in self.attrs_re:
            if k not in a or not rx.search(str(a[k])):
                return False
        if self.protocols and span_protocol(s).lower() not in self.protocols:
            return False
        return True


class SpansConfig(ComponentConfig):
    include: list[RuleConfig] = Field(default_factory=list)
    exclude: list[RuleConfig] = Field(default_factory=list)


class FilterConfig(ComponentConfig):
    spans: SpansConfig

    @model_validator(mode="after")
    def _check(self) -> FilterConfig:
        if not self.spans.include and not self.spans.exclude:
            raise ValueError("spans: give include and/or exclude rules")
        return self


class FilterProcessor(SpanProcessor):
    type: ClassVar[str] = "filter"
    Config = FilterConfig

    def __init__(self, id: str, config: FilterConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._include = [Rule(r) for r in config.spans.include]
        self._exclude = [Rule(r) for r in config.spans.exclude]
        self._dropped = telemetry.PROCESSOR_DROPPED.labels(processor=id, reason="filtered")

    def keep(self, s: Span) -> bool:
        if self._include and not any(r.matches(s) for r in self._include):
            return False
        return not any(r.matches(s) for r in self._exclude)

    def consume_spans(self, spans: list[Span]) -> None:
        keep = self.keep
        kept = [s for s in spans if keep(s)]
        if len(kept) != len(spans):
            self._dropped.inc(len(spans) - len(kept))
        if kept:
            self.next.consume_spans(kept)
