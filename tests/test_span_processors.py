"""Span processors: attributes, resource, filter, redaction, memory_limiter.

No real parts are needed: these transform in-memory spans; the memory limiter is
driven by this process's real RSS.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from processors.attributes import AttributesConfig, AttributesProcessor
from processors.filter import FilterConfig, FilterProcessor, span_protocol
from processors.memory_limiter import (
    MemoryLimiterConfig,
    MemoryLimiterProcessor,
    MemoryLimitExceeded,
    process_rss_bytes,
    under_pressure,
)
from processors.redaction import MASK, RedactionConfig, RedactionProcessor
from processors.resource import ResourceConfig, ResourceProcessor
from service.model import Resource, Span, SpanEvent, SpanKind, StatusCode
from service.pipeline import DataRefused
from tests.support.otlp_sink import metric


class Sink:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def consume_spans(self, spans: list[Span]) -> None:
        self.spans.extend(spans)


def make(cls, cfg: dict, pid: str | None = None):
    sink = Sink()
    p = cls(pid or cls.type, cls.Config.model_validate(cfg), sink)
    return p, sink


def span(name="GET /a", kind=SpanKind.SERVER, dur_ns=1_000_000, status=StatusCode.UNSET, res=None, **attrs):
    return Span(name, kind, 0, dur_ns, dict(attrs), resource=res, status_code=status)


# ---------------------------------------------------------------------------
# attributes
# ---------------------------------------------------------------------------
def test_attribute_actions_in_order():
    p, sink = make(AttributesProcessor, {"actions": [
        {"key": "env", "action": "insert", "value": "prod"},
        {"key": "http.request.method", "action": "insert", "value": "NOPE"},   # exists: not inserted
        {"key": "missing", "action": "update", "value": 1},                    # absent: not created
        {"key": "url.path", "action": "update", "value": "/x"},
        {"key": "copy", "action": "upsert", "from_attribute": "http.request.method"},
        {"key": "user.id", "action": "hash"},
        {"key": "url.query", "action": "delete"},
        {"pattern": "^tmp\\.", "action": "delete"},
        {"key": "url.full", "action": "extract", "pattern": r"^/users/(?P<user_id>\d+)/(?P<op>\w+)$"},
    ]})
    s = span(**{"http.request.method": "GET", "url.path": "/a", "user.id": "alice", "url.query": "q=1",
                "tmp.a": 1, "tmp.b": 2, "url.full": "/users/42/orders"})
    p.consume_spans([s])
    assert sink.spans == [s]
    assert s.attributes == {
        "http.request.method": "GET", "url.path": "/x", "user.id": hashlib.sha256(b"alice").hexdigest(),
        "url.full": "/users/42/orders", "env": "prod", "copy": "GET", "user_id": "42", "op": "orders"}


def test_attribute_include_exclude():
    p, sink = make(AttributesProcessor, {
        "actions": [{"key": "tagged", "action": "upsert", "value": True}],
        "include": {"match_type": "regexp", "span_names": ["^GET "], "span_kinds": ["server"]},
        "exclude": {"match_type": "strict", "attributes": [{"key": "url.path", "value": "/health"}]},
    })
    a = span("GET /a", **{"url.path": "/a"})
    b = span("GET /health", **{"url.path": "/health"})
    c = span("POST /a")
    d = span("GET /a", kind=SpanKind.CLIENT)
    p.consume_spans([a, b, c, d])
    assert [("tagged" in s.attributes) for s in sink.spans] == [True, False, False, False]


def test_attribute_include_by_service_and_attribute_presence():
    res = Resource({"service.name": "checkout"})
    p, _ = make(AttributesProcessor, {"actions": [{"key": "x", "action": "insert", "value": 1}],
                                      "include": {"services": ["checkout"], "attributes": [{"key": "db.system.name"}]}})
    a = span(res=res, **{"db.system.name": "redis"})
    b = span(res=res)
    c = span(**{"db.system.name": "redis"})
    p.consume_spans([a, b, c])
    assert ["x" in s.attributes for s in (a, b, c)] == [True, False, False]


@pytest.mark.parametrize("bad", [
    {"actions": []},
    {"actions": [{"key": "a", "action": "insert"}]},                               # no value
    {"actions": [{"key": "a", "action": "insert", "value": 1, "from_attribute": "b"}]},
    {"actions": [{"key": "a", "action": "extract", "pattern": "(no-named-group)"}]},
    {"actions": [{"key": "a", "action": "extract", "pattern": "(?P<x>"}]},          # bad regex
    {"actions": [{"action": "delete"}]},
    {"actions": [{"key": "a", "action": "rename"}]},
    {"actions": [{"key": "a", "action": "delete", "valeu": 1}]},                    # typo
    {"actions": [{"key": "a", "action": "delete"}], "include": {"match_type": "strict"}},
    {"actions": [{"key": "a", "action": "delete"}], "include": {"span_kinds": ["sever"]}},
])
def test_attribute_config_errors(bad):
    with pytest.raises(ValueError):
        AttributesConfig.model_validate(bad)


# ---------------------------------------------------------------------------
# resource
# ---------------------------------------------------------------------------
def test_resource_actions_transform_each_resource_once():
    p, sink = make(ResourceProcessor, {"attributes": [
        {"key": "deployment.environment.name", "action": "upsert", "value": "prod"},
        {"key": "host.name", "action": "delete"},
    ]})
    r1 = Resource({"service.name": "a", "host.name": "n1"})
    r2 = Resource({"service.name": "b", "host.name": "n1"})
    spans = [span(res=r1), span(res=r1), span(res=r2)]
    p.consume_spans(spans)
    assert spans[0].resource is spans[1].resource  # shared output, not a copy per span
    assert spans[0].resource.attributes == {"service.name": "a", "deployment.environment.name": "prod"}
    assert spans[2].resource.attributes == {"service.name": "b", "deployment.environment.name": "prod"}
    assert r1.attributes["host.name"] == "n1"  # the input resource is not mutated
    assert len(sink.spans) == 3


def test_resource_config_errors():
    with pytest.raises(ValueError):
        ResourceConfig.model_validate({"attributes": []})
    with pytest.raises(ValueError):
        ResourceConfig.model_validate({"actions": [{"key": "a", "action": "delete"}]})


# ---------------------------------------------------------------------------
# filter
# ---------------------------------------------------------------------------
def test_filter_exclude_rules_and_count():
    p, sink = make(FilterProcessor, {"spans": {"exclude": [
        {"attributes": {"url.path": "/healthz"}},
        {"attributes_regex": {"url.path": "^/(ready|live)$"}},
        {"protocol": ["redis"], "max_duration": "1ms"},        # fast cache hits
        {"kind": ["internal"]},
        {"name_regex": "^OPTIONS "},
    ]}}, pid="filter/t1")
    keep = [
        span(**{"url.path": "/api"}),
        span("GET", kind=SpanKind.CLIENT, dur_ns=5_000_000, **{"db.system.name": "redis"}),  # slow redis
        span(status=StatusCode.ERROR, **{"url.path": "/live2"}),
    ]
    drop = [
        span(**{"url.path": "/healthz"}),
        span(**{"url.path": "/ready"}),
        span("GET", kind=SpanKind.CLIENT, dur_ns=200_000, **{"db.system.name": "redis"}),
        span("x", kind=SpanKind.INTERNAL),
        span("OPTIONS /a"),
    ]
    p.consume_spans(drop[:2] + keep + drop[2:])
    assert sink.spans == keep
    assert metric("wirespan_processor_dropped_items_total", processor="filter/t1", reason="filtered") == 5


def test_filter_include_status_and_protocols():
    p, sink = make(FilterProcessor, {"spans": {
        "include": [{"status": ["error"]}, {"protocol": ["kafka", "grpc"]}],
        "exclude": [{"protocol": ["grpc"], "status": ["unset"]}],
    }}, pid="filter/t2")
    a = span(status=StatusCode.ERROR, **{"http.request.method": "GET"})
    b = span(**{"messaging.system": "kafka"})
    c = span(**{"rpc.system.name": "grpc", "http.request.method": "POST"})  # grpc, unset: excluded
    d = span(**{"http.request.method": "GET"})                               # not included
    p.consume_spans([a, b, c, d])
    assert sink.spans == [a, b]
    assert span_protocol(c) == "grpc" and span_protocol(d) == "http"
    p.consume_spans([d])  # everything dropped: nothing is passed on
    assert sink.spans == [a, b]


@pytest.mark.parametrize("bad", [
    {"spans": {}},
    {"spans": {"exclude": [{}]}},
    {"spans": {"exclude": [{"kind": ["sever"]}]}},
    {"spans": {"exclude": [{"min_duration": "2s", "max_duration": "1s"}]}},
    {"spans": {"exclude": [{"name_regex": "("}]}},
    {"spans": {"exclude": [{"status": ["failed"]}]}},
    {"spans": {"exlcude": [{"kind": ["server"]}]}},
])
def test_filter_config_errors(bad):
    with pytest.raises(ValueError):
        FilterConfig.model_validate(bad)


# ---------------------------------------------------------------------------
# redaction
# ---------------------------------------------------------------------------
def test_redaction_defaults_keep_credentials_home():
    p, sink = make(RedactionProcessor, {}, pid="redaction/t1")
    res = Resource({"service.name": "a", "db.password": "pw"})
    s = span(res=res, **{
        "http.request.header.authorization": "Bearer abc.def.ghi",
        "http.request.header.cookie": "sid=123",
        "http.response.header.set-cookie": "sid=123; HttpOnly",
        "http.request.header.x-api-key": "k-123",
        "url.query": "page=2&access_token=s3cr3t&x=1",
        "db.query.text": "SELECT * FROM t WHERE id = ?",
        "server.address": "db.local",
        "url.full": "https://bob:hunter2@example.com/a",
        "messaging.client.id": "client-1",
        "note": "token: eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.abc",
        "gen_ai.usage.input_tokens": 12,
    })
    s.events = [SpanEvent("exception", 1, {"exception.message": "login failed for password=hunter2"})]
    p.consume_spans([s])
    a = s.attributes
    for k in ("http.request.header.authorization", "http.request.header.cookie", "http.response.header.set-cookie",
              "http.request.header.x-api-key"):
        assert a[k] == MASK, k
    assert a["url.query"] == "page=2&access_token=****&x=1"
    assert a["url.full"] == "https://bob:****@example.com/a"
    assert "hunter2" not in s.events[0].attributes["exception.message"]
    assert "eyJ" not in a["note"]
    assert a["db.query.text"] == "SELECT * FROM t WHERE id = ?" and a["server.address"] == "db.local"
    assert a["messaging.client.id"] == "client-1" and a["gen_ai.usage.input_tokens"] == 12
    assert s.resource.attributes["db.password"] == MASK and res.attributes["db.password"] == "pw"
    assert p.masked_values == 9
    assert sink.spans == [s]


def test_redaction_allow_list_blocked_values_and_ignored_keys():
    p, _ = make(RedactionProcessor, {
        "allow_all_keys": False,
        "allowed_keys": ["http.request.method", "url.path", "card", "auth.ok"],
        "ignored_keys": ["auth.ok"],
        "blocked_values": [r"\b4[0-9]{12}(?:[0-9]{3})?\b"],   # Visa card numbers
        "allowed_values": [r"^4111111111111111$"],            # the well-known test card
    })
    s = span(**{"http.request.method": "GET", "url.path": "/pay/4012888888881881", "card": "4111111111111111",
                "user.email": "a@b", "auth.ok": "Bearer 0123456789abcdef"})
    p.consume_spans([s])
    assert s.attributes == {"http.request.method": "GET", "url.path": "/pay/****", "card": "4111111111111111",
                            "auth.ok": "Bearer 0123456789abcdef"}


def test_redaction_can_drop_the_defaults():
    p, _ = make(RedactionProcessor, {"default_blocked": False, "blocked_keys": ["^x-internal"]})
    s = span(**{"http.request.header.authorization": "Basic dXNlcjpwYXNz", "x-internal-id": "7"})
    p.consume_spans([s])
    assert s.attributes == {"http.request.header.authorization": "Basic dXNlcjpwYXNz", "x-internal-id": MASK}


def test_redaction_config_errors():
    with pytest.raises(ValueError):
        RedactionConfig.model_validate({"blocked_values": ["("]})
    with pytest.raises(ValueError):
        RedactionConfig.model_validate({"blocked_key": ["x"]})


# ---------------------------------------------------------------------------
# memory_limiter (real RSS of this process)
# ---------------------------------------------------------------------------
def test_memory_limiter_refuses_above_soft_limit_and_recovers():
    base_mib = process_rss_bytes() >> 20
    limit = base_mib + 120
    p, sink = make(MemoryLimiterProcessor, {"check_interval": "50ms", "limit_mib": limit, "spike_limit_mib": 60},
                   pid="memory_limiter/t1")
    p.start()
    try:
        p.consume_spans([span()])
        assert len(sink.spans) == 1 and not p.refusing
        ballast = b"\x01" * (150 << 20)  # touched pages: RSS really grows by 150 MiB
        deadline = time.monotonic() + 5
        while not p.refusing and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.refusing and under_pressure()
        with pytest.raises(MemoryLimitExceeded) as ei:
            p.consume_spans([span()])
        assert isinstance(ei.value, DataRefused)  # what the pipeline's links catch
        assert len(sink.spans) == 1
        del ballast
        deadline = time.monotonic() + 5
        while p.refusing and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not p.refusing and not under_pressure()
        p.consume_spans([span()])
        assert len(sink.spans) == 2
    finally:
        p.shutdown()


def test_memory_limiter_percentage_limits():
    c = MemoryLimiterConfig.model_validate({"limit_percentage": 80, "spike_limit_percentage": 20})
    soft, hard = c.limits_bytes()
    assert 0 < soft < hard and abs(soft / hard - 0.75) < 0.01
    c = MemoryLimiterConfig.model_validate({"limit_mib": 1000})
    assert c.limits_bytes() == (800 << 20, 1000 << 20)  # spike defaults to 20 %


@pytest.mark.parametrize("bad", [
    {},
    {"limit_mib": 100, "limit_percentage": 50},
    {"limit_mib": 100, "spike_limit_mib": 100},
    {"limit_percentage": 50, "spike_limit_percentage": 60},
    {"limit_mib": 100, "spike_limit_percentage": 10},
    {"limit_mib": 100, "check_interval": "0s"},
    {"limit_mib": 100, "check_intreval": "1s"},
])
def test_memory_limiter_config_errors(bad):
    with pytest.raises(ValueError):
        MemoryLimiterConfig.model_validate(bad)
