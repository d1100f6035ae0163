"""``attributes`` span processor: insert, update, upsert, delete, hash and extract attributes.

Options follow the Collector's attributesprocessor: an ordered list of
``actions``, each on one ``key`` (or the keys a ``pattern`` matches, for
delete/hash), and optional ``include``/``exclude`` match properties that pick
the spans the actions apply to (``match_type`` strict or regexp; services,
span_names, span_kinds, attributes; all given properties must match, any
entry of a list may). The action list and the matcher are shared with the
``resource`` and ``filter`` processors.

Spans are changed in place (as the Collector's processors do on their own
copy of the data); spans that are not matched pass through untouched.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import MutableMapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from service.component import ComponentConfig, SpanProcessor
from service.model import Span, SpanKind

__all__ = [
    "Action",
    "ActionConfig",
    "AttributesConfig",
    "AttributesProcessor",
    "MatchConfig",
    "Matcher",
    "apply_actions",
    "compile_actions",
    "SPAN_KINDS",
]

ActionName = Literal["insert", "update", "upsert", "delete", "hash", "extract"]
SPAN_KINDS = {k.name.lower(): int(k) for k in SpanKind}
#: Regexes come from configuration, not traffic; this bounds a runaway pattern's text, not its cost.
MAX_PATTERN_LEN = 1024


class ActionConfig(ComponentConfig):
    key: str | None = None
    action: ActionName
    #: Literal value for insert/update/upsert.
    value: Any = None
    #: Copy the value of this attribute instead of a literal (insert/update/upsert).
    from_attribute: str | None = None
    #: delete/hash: act on every key this regex matches; extract: the regex with named groups
    #: applied to the value of ``key``; each group becomes an attribute.
    pattern: str | None = None

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            if len(v) > MAX_PATTERN_LEN:
                raise ValueError(f"pattern longer than {MAX_PATTERN_LEN} characters")
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"invalid regular expression {v!r}: {e}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ActionConfig:
        a = self.action
        if a in ("insert", "update", "upsert"):
            if not self.key:
                raise ValueError(f"action {a} needs key")
            if (self.value is None) == (self.from_attribute is None):
                raise ValueError(f"action {a} needs exactly one of value or from_attribute")
            if self.pattern is not None:
                raise ValueError(f"action {a} does not take pattern")
        elif a in ("delete", "hash"):
            if not self.key and not self.pattern:
                raise ValueError(f"action {a} needs key or pattern")
            if self.value is not None or self.from_attribute is not None:
                raise ValueError(f"action {a} takes no value or from_attribute")
        elif a == "extract":
            if not self.key or not self.pattern:
                raise ValueError("action extract needs key and pattern")
            if not re.compile(self.pattern).groupindex:
                raise ValueError("action extract: pattern needs named groups, e.g. (?P<user>[^/]+)")
            if self.value is not None or self.from_attribute is not None:
                raise ValueError("action extract takes no value or from_attribute")
        return self


class AttributeMatch(ComponentConfig):
    key: str
    #: Without a value, the attribute only has to exist.
    value: Any = None


class MatchConfig(ComponentConfig):
    match_type: Literal["strict", "regexp"] = "strict"
    services: list[str] = Field(default_factory=list)
    span_names: list[str] = Field(default_factory=list)
    span_kinds: list[str] = Field(default_factory=list)
    attributes: list[AttributeMatch] = Field(default_factory=list)

    @field_validator("span_kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if k.lower().removeprefix("span_kind_") not in SPAN_KINDS]
        if bad:
            raise ValueError(f"unknown span kind(s) {bad}; use {sorted(SPAN_KINDS)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> MatchConfig:
        if not (self.services or self.span_names or self.span_kinds or self.attributes):
            raise ValueError("at least one of services, span_names, span_kinds, attributes is required")
        if self.match_type == "regexp":
            for p in [*self.services, *self.span_names,
                      *(str(a.value) for a in self.attributes if a.value is not None)]:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f"invalid regular expression {p!r}: {e}")
        return self


class Matcher:
    """Compiled ``MatchConfig``: does a span match all the given properties?"""

    __slots__ = ("_attrs", "_kinds", "_names", "_regexp", "_services")

    def __init__(self, cfg: MatchConfig) -> None:
        self._regexp = cfg.match_type == "regexp"
        conv = (lambda p: re.compile(p)) if self._regexp else (lambda p: p)
        self._services = [conv(s) for s in cfg.services]
        self._names = [conv(s) for s in cfg.span_names]
        self._kinds = frozenset(SPAN_KINDS[k.lower().removeprefix("span_kind_")] for k in cfg.span_kinds)
        self._attrs = [(a.key, None if a.value is None else conv(str(a.value)) if self._regexp else a.value)
                       for a in cfg.attributes]

    def _one(self, patterns: list[Any], value: str) -> bool:
        if self._regexp:
            return any(p.search(value) for p in patterns)
        return value in patterns

    def matches(self, s: Span) -> bool:
        if self._kinds and int(s.kind) not in self._kinds:
            return False
        if self._names and not self._one(self._names, s.name):
            return False
        if self._services and not self._one(self._services, str(s.resource.attributes.get("service.name", ""))):
            return False
        attrs = s.attributes
        for key, want in self._attrs:
            if key not in attrs:
                return False
            if want is None:
                continue
            got = attrs[key]
            if self._regexp:
                if not want.search(str(got)):
                    return False
            elif got != want and str(got) != str(want):
                return False
        return True


class Action:
    """One compiled action; ``apply`` edits a mapping of attributes in place."""

    __slots__ = ("action", "from_attribute", "key", "regex", "value")

    def __init__(self, cfg: ActionConfig) -> None:
        self.action = cfg.action
        self.key = cfg.key
        self.value = cfg.value
        self.from_attribute = cfg.from_attribute
        self.regex = re.compile(cfg.pattern) if cfg.pattern is not None else None

    def apply(self, attrs: MutableMapping[str, Any]) -> None:
        a, key = self.action, self.key
        if a in ("insert", "update", "upsert"):
            if self.from_attribute is not None:
                if self.from_attribute not in attrs:
                    return
                value = attrs[self.from_attribute]
            else:
                value = self.value
            present = key in attrs
            if (a == "insert" and not present) or (a == "update" and present) or a == "upsert":
                attrs[key] = value
        elif a == "delete":
            if key is not None:
                attrs.pop(key, None)
            if self.regex is not None:
                for k in [k for k in attrs if self.regex.search(k)]:
                    del attrs[k]
        elif a == "hash":
            keys = [key] if key is not None and key in attrs else []
            if self.regex is not None:
                keys += [k for k in attrs if k != key and self.regex.search(k)]
            for k in keys:
                attrs[k] = hash_value(attrs[k])
        else:  # extract
            v = attrs.get(key)
            if isinstance(v, str):
                m = self.regex.search(v)
                if m:
                    for name, got in m.groupdict().items():
                        if got is not None:
                            attrs[name] = got


def hash_value(v: Any) -> str:
    """SHA-256 hex of the value's text (the Collector moved from SHA-1 to SHA-256 for FIPS)."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        data = bytes(v)
    elif isinstance(v, bool):
        data = b"true" if v else b"false"
    else:
        data = str(v).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def compile_actions(actions: Sequence[ActionConfig]) -> list[Action]:
    return [Action(a) for a in actions]


def apply_actions(actions: Sequence[Action], attrs: MutableMapping[str, Any]) -> None:
    for a in actions:
        a.apply(attrs)


class AttributesConfig(ComponentConfig):
    actions: list[ActionConfig]
    include: MatchConfig | None = None
    exclude: MatchConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> AttributesConfig:
        if not self.actions:
            raise ValueError("actions: at least one action is required")
        return self


class AttributesProcessor(SpanProcessor):
    type: ClassVar[str] = "attributes"
    Config = AttributesConfig

    def __init__(self, id: str, config: AttributesConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        self._actions = compile_actions(config.actions)
        self._include = Matcher(config.include) if config.include else None
        self._exclude = Matcher(config.exclude) if config.exclude else None

    def consume_spans(self, spans: list[Span]) -> None:
        actions, inc, exc = self._actions, self._include, self._exclude
        for s in spans:
            if inc is not None and not inc.matches(s):
                continue
            if exc is not None and exc.matches(s):
                continue
            apply_actions(actions, s.attributes)
        self.next.consume_spans(spans)
