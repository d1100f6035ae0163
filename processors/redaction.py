"""``redaction`` span processor: credentials and tokens never leave the node.

Options follow the Collector's redactionprocessor, with one deliberate change of
default: ``allow_all_keys`` is true here (wire spans carry only the semantic
convention attributes wirespan itself sets), and a built-in deny list of
credential keys and value patterns is on unless ``default_blocked: false``.

- A key not allowed (``allow_all_keys: false`` and not in ``allowed_keys``) is
  deleted.
- A key matching ``blocked_keys`` (regexes, case-insensitive search) or the
  default credential key patterns keeps its key and gets the value ``****``.
- Any part of a string value matching ``blocked_values`` (or the default
  credential value patterns: bearer/basic authorization, JWTs, ``password=``
  style query and connection-string pairs, cloud access keys) is replaced with
  ``****``, unless the value matches one of ``allowed_values``.
- Values already equal to the mask are left as they are.
- ``ignored_keys`` are never touched.

Applied to span attributes, span event attributes and resource attributes
(resources are shared, so each distinct one is redacted once and cached).
No span is dropped; ``masked_values`` counts the values masked or deleted (the
processor dropped-items metric counts spans, so it is not used for values).
"""

from __future__ import annotations

import re
import threading
from typing import Any, ClassVar

from pydantic import Field, field_validator

from service.component import ComponentConfig, SpanProcessor
from service.model import Resource, Span

__all__ = [
    "RedactionConfig",
    "RedactionProcessor",
    "MASK",
    "DEFAULT_BLOCKED_KEYS",
    "DEFAULT_BLOCKED_VALUES",
]

MASK = "****"  # the Collector's redactionprocessor mask
#: Keys whose values are credentials, wherever they appear (HTTP header attributes such as
#: http.request.header.authorization, cookies, connection parameters...).
DEFAULT_BLOCKED_KEYS = (
    r"authorization",
    r"(^|[._-])(set-)?cookie($|[._-])",
    r"passw(or)?d|(^|[._-])pwd($|[._-])",
    r"secret",
    r"token($|[._-])",  # x-csrf-token, access_token; not gen_ai.usage.input_tokens
    r"api[._-]?key",
    r"credential",
    r"private[._-]?key",
    r"session[._-]?id",
    r"x-amz-security-token|x-goog-api-key",
)
#: Credentials inside values. Where a pattern has a group named ``v`` only that group is
#: masked (the scheme or key name stays readable); otherwise the whole match is.
DEFAULT_BLOCKED_VALUES = (
    r"(?i)\b(?:bearer|basic|digest) (?P<v>[A-Za-z0-9._~+/=-]{8,})",
    r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",  # JWT
    r"(?i)(?:^|[?&;,\s\"'])(?:password|passwd|pwd|secret|token|api_key|apikey|access_token|auth)"
    r"\s*[=:]\s*(?P<v>[^&;,\s\"']+)",
    r"://[^/:@\s]+:(?P<v>[^/@\s]+)@",  # user:password@ in URLs and DSNs
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",  # GitHub tokens
    r"\bxox[abpr]-[A-Za-z0-9-]{10,}\b",  # Slack tokens
)
#: Regexes come from configuration; this bounds their text.
MAX_PATTERN_LEN = 1024


def _mask_match(m: re.Match[str]) -> str:
    if "v" not in m.re.groupindex or m.start("v") < 0:
        return MASK
    whole, off = m.group(0), m.start()
    return whole[:m.start("v") - off] + MASK + whole[m.end("v") - off:]


def _compile_all(patterns: list[str], flags: int = 0) -> list[re.Pattern[str]]:
    return [re.compile(p, flags) for p in patterns]


class RedactionConfig(ComponentConfig):
    #: Keep every key not blocked (Collector default: false, i.e. only allowed_keys survive).
    allow_all_keys: bool = True
    #: With allow_all_keys false: the keys kept; every other key is deleted.
    allowed_keys: list[str] = Field(default_factory=list)
    #: Keys never redacted, not even by value patterns.
    ignored_keys: list[str] = Field(default_factory=list)
    #: Regexes on keys: their values are masked.
    blocked_keys: list[str] = Field(default_factory=list)
    #: Regexes on values: the matching parts are masked.
    blocked_values: list[str] = Field(default_factory=list)
    #: Regexes on values: a value matching one is never masked by blocked_values.
    allowed_values: list[str] = Field(default_factory=list)
    #: Add the built-in credential key and value patterns to the lists above.
    default_blocked: bool = True

    @field_validator("blocked_keys", "blocked_values", "allowed_values")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            if len(p) > MAX_PATTERN_LEN:
                raise ValueError(f"pattern longer than {MAX_PATTERN_LEN} characters")
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"invalid regular expression {p!r}: {e}")
        return v

    def model_post_init(self, __context: Any) -> None:
        if not self.allow_all_keys and not self.allowed_keys:
            # As the Collector: legal, but every attribute is deleted; say so loudly at start.
            import logging
            logging.getLogger("wirespan.processor.redaction").warning(
                "redaction: allow_all_keys is false and allowed_keys is empty: every attribute is deleted")


class RedactionProcessor(SpanProcessor):
    type: ClassVar[str] = "redaction"
    Config = RedactionConfig

    def __init__(self, id: str, config: RedactionConfig, next: Any = None) -> None:
        super().__init__(id, config, next)
        c = config
        self._allow_all = c.allow_all_keys
        self._allowed = frozenset(c.allowed_keys)
        self._ignored = frozenset(c.ignored_keys)
        keys = list(c.blocked_keys) + (list(DEFAULT_BLOCKED_KEYS) if c.default_blocked else [])
        values = list(c.blocked_values) + (list(DEFAULT_BLOCKED_VALUES) if c.default_blocked else [])
        self._key_re = re.compile("|".join(f"(?:{p})" for p in keys), re.IGNORECASE) if keys else None
        self._value_res = _compile_all(values)
        self._allowed_values = _compile_all(c.allowed_values)
        self._key_cache: dict[str, int] = {}  # key -> 0 keep, 1 mask, 2 delete (keys are few and repeat)
        self._res_cache: dict[int, tuple[Resource, Resource]] = {}
        self._lock = threading.Lock()
        self.masked_values = 0

    def _key_verdict(self, k: str) -> int:
        v = self._key_cache.get(k)
        if v is None:
            if k in self._ignored:
                v = 0
            elif not self._allow_all and k not in self._allowed:
                v = 2
            elif self._key_re is not None and self._key_re.search(k):
                v = 1
            else:
                v = 0
            if len(self._key_cache) < 65536:
                self._key_cache[k] = v
        return v

    def _mask_value(self, v: str) -> str:
        for rx in self._allowed_values:
            if rx.search(v):
                return v
        for rx in self._value_res:
            v = rx.sub(_mask_match, v)
        return v

    def redact(self, attrs: dict[str, Any]) -> int:
        """Redact one attribute map in place; returns the number of values masked or deleted."""
        n = 0
        for k in list(attrs):
            verdict = self._key_verdict(k)
            if verdict == 2:
                del attrs[k]
                n += 1
            elif verdict == 1:
                if attrs[k] != MASK:
                    attrs[k] = MASK
                    n += 1
            elif k not in self._ignored and self._value_res:
                v = attrs[k]
                if isinstance(v, str):
                    m = self._mask_value(v)
                    if m is not v and m != v:
                        attrs[k] = m
                        n += 1
                elif isinstance(v, (list, tuple)) and any(isinstance(x, str) for x in v):
                    new = [self._mask_value(x) if isinstance(x, str) else x for x in v]
                    if new != list(v):
                        attrs[k] = new
                        n += 1
        return n

    def _resource(self, r: Resource) -> Resource:
        hit = self._res_cache.get(id(r))
        if hit is not None and hit[0] is r:
            return hit[1]
        attrs = dict(r.attributes)
        n = self.redact(attrs)
        self.masked_values += n
        out = Resource(attrs) if n else r
        with self._lock:
            if len(self._res_cache) >= 4096:
                self._res_cache.clear()
            self._res_cache[id(r)] = (r, out)
        return out

    def consume_spans(self, spans: list[Span]) -> None:
        n = 0
        for s in spans:
            if s.attributes:
                n += self.redact(s.attributes)
            if s.events:
                for e in s.events:
                    if e.attributes:
                        n += self.redact(e.attributes)
            s.resource = self._resource(s.resource)
        if n:
            self.masked_values += n  # approximate under concurrent callers; informational only
        self.next.consume_spans(spans)
