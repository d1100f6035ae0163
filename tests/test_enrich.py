"""The HTTP enrichers (processors/protocols/enrich/): GenAI, GraphQL, Elasticsearch, JSON-RPC/MCP.

Real clients throughout: ``openai``, ``anthropic``, ``elasticsearch`` and httpx (GraphQL,
JSON-RPC) talk to a scripted responder that speaks each API's documented wire format
(tests/support/enrich_responder.py: no real server of these can run here); MCP runs the
real ``mcp`` server (MCPServer on uvicorn) and client. Their traffic is recorded with
tcpdump on loopback and replayed through the pcap receiver and the protocols stage, and one
case goes through the live (AF_PACKET) receiver. Hand-built exchanges cover what the
clients cannot be made to send: every content coding on both sides, SSE split anywhere,
hostile bodies (huge, truncated, deeply nested, invalid UTF-8, decompression bombs) which
must be bounded, counted and never raise; allocation is measured with tracemalloc.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Iterable
from typing import Any

import brotli
import h2.connection
import httpx
import pytest
import zstandard
from pydantic import ValidationError

from processors.protocols import http1
from processors.protocols.base import Conn, Perspective
from processors.protocols.enrich import EnrichConfig, Enricher
from processors.protocols.enrich.body import Capture, SseStream, top_level
from processors.protocols.enrich.elasticsearch import endpoint
from processors.protocols.enrich.graphql import operations
from processors.protocols.http2 import H2Session
from processors.protocols.processor import Config, ProtocolsProcessor
from service.model import Span, SpanKind, StatusCode
from tests.support.capture import free_port, tcpdump, wait_port, wait_until
from tests.support.enrich_responder import h2_responder, responder
from tests.support.h2drive import Driver, H2Pair
from tests.support.replay import replay

# -- helpers ------------------------------------------------------------------------------------


class Run:
    """One HTTP/1 connection fed through ``feed_whole``/``feed`` as the stage does, with the
    enrichers attached; collects spans and the enrichers' counts."""

    def __init__(self, cfg: dict[str, Any] | None = None, perspective: Perspective = Perspective.PASSIVE) -> None:
        self.spans: list[Span] = []
        self.counts: list[tuple[str, str]] = []
        self.drops: list[str] = []
        self.conn = Conn("c", "10.0.0.1", 40000, "10.0.0.2", 8080, self.spans.append,
                         lambda _p, r: self.drops.append(r), perspective=perspective)
        self.enricher = Enricher(EnrichConfig.model_validate(cfg or {}), lambda k, r: self.counts.append((k, r)))
        self.conn.enrich = self.enricher
        self.session = http1.Session(self.conn)

    def feed(self, steps: Iterable[tuple[bool, bytes]], split: int | None = None) -> Run:
        s = self.session
        for fc, data in steps:
            buf = self.conn.client_buf if fc else self.conn.server_buf
            mv = memoryview(data)  # pieces are views: the test itself copies nothing
            pieces = [mv] if split is None else (mv[i:i + split] for i in range(0, len(data), split))
            for p in pieces:
                if not len(buf) and s.feed_whole(fc, p, 1):
                    continue
                buf.append(p, 1)
                s.feed(fc, buf, 1)
        return self

    def close(self) -> Run:
        self.session.close(2)
        return self


def post(path: str, body: Any, headers: bytes = b"", raw: bytes | None = None, host: bytes = b"api.example") -> bytes:
    b = raw if raw is not None else json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n"
            % (path.encode(), host, headers, len(b))) + b


def ok(body: Any, ctype: bytes = b"application/json", enc: str | None = None, raw: bytes | None = None,
       status: bytes = b"200 OK", chunked: bool = False, headers: bytes = b"") -> bytes:
    b = raw if raw is not None else json.dumps(body).encode()
    h = headers
    if enc is not None:
        b = compress(b, enc)
        h += b"Content-Encoding: %s\r\n" % enc.encode()
    if chunked:
        pieces = b"".join(b"%x\r\n%s\r\n" % (len(b[i:i + 37]), b[i:i + 37]) for i in range(0, len(b), 37))
        return b"HTTP/1.1 %s\r\nContent-Type: %s\r\n%sTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (
            status, ctype, h, pieces)
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, ctype, h, len(b), b)


def compress(b: bytes, enc: str) -> bytes:
    if enc == "gzip":
        return gzip.compress(b)
    if enc == "deflate":
        return zlib.compress(b)
    if enc == "br":
        return brotli.compress(b)
    if enc == "zstd":
        return zstandard.ZstdCompressor().compress(b)
    raise ValueError(enc)


def sse(events: list[Any], names: list[str] | None = None) -> bytes:
    out = b""
    for i, e in enumerate(events):
        if names:
            out += b"event: %s\n" % names[i].encode()
        out += b"data: %s\n\n" % (e.encode() if isinstance(e, str) else json.dumps(e).encode())
    return out


def gen(span: Span) -> dict[str, Any]:
    return {k: v for k, v in span.attributes.items() if k.startswith("gen_ai.")}


CHAT_REQ = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "model": "gpt-4o", "temperature": 0.2, "max_tokens": 50}
CHAT_RESP = {"id": "chatcmpl-9", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25}}


# -- config ---------------------------------------------------------------------------------------
def test_config_defaults_and_errors() -> None:
    c = Config.model_validate({})
    assert c.enrich.enabled and c.enrich.genai.enabled and not c.enrich.genai.capture_content
    assert c.enrich.max_body_bytes == 256 * 1024
    for bad in ({"enrich": {"genai": {"captur_content": True}}},           # a typo: unknown keys are errors
                {"enrich": {"max_body_bytes": 10}},                        # below the floor
                {"enrich": {"max_body_bytes": 4096, "max_decoded_bytes": 1024}},
                {"enrich": {"graphql": {"paths": ["graphql"]}}},            # not a path
                {"enrich": {"elasticsearch": {"system": "solr"}}}):
        with pytest.raises(ValidationError):
            Config.model_validate(bad)
    stage = ProtocolsProcessor("protocols", {"enrich": {"enabled": False}})
    assert stage._enricher is None  # nothing attached: plain HTTP only
    stage = ProtocolsProcessor("protocols", {"enrich": {"genai": {"enabled": False}}})
    assert "genai" not in stage._enricher.kinds and "graphql" in stage._enricher.kinds


def test_config_errors_name_their_path(tmp_path) -> None:
    """Through the real config loader: Collector-style paths, every error of the file at once."""
    from service import config as svc_config

    f = tmp_path / "c.yaml"
    f.write_text("receivers: {pcap: {path: x.pcap}}\n"
                 "processors:\n  protocols:\n    enrich:\n      genai: {captur_content: true}\n"
                 "      max_body_bytes: 10\n"
                 "exporters: {debug: {}}\n"
                 "service: {pipelines: {traces: {receivers: [pcap], processors: [protocols], exporters: [debug]}}}\n")
    with pytest.raises(svc_config.ConfigError) as ei:
        svc_config.load([f])
    assert ei.value.errors == ["processors::protocols::enrich::genai: unknown option 'captur_content'",
                               "processors::protocols::enrich::max_body_bytes: Input should be greater than or "
                               "equal to 256"]


def test_selection_is_by_path_and_method() -> None:
    e = Enricher()
    names = lambda m, p: [k.NAME for k in e.select(m, p) or ()]  # noqa: E731
    assert names("POST", "/v1/chat/completions") == ["genai"]
    assert names("POST", "/openai/deployments/gpt4/chat/completions") == ["genai"]
    assert names("POST", "/v1/messages") == ["genai", "jsonrpc"]  # Anthropic, or MCP's legacy endpoint
    assert names("POST", "/graphql") == ["graphql"] and names("GET", "/api/graphql") == ["graphql"]
    assert names("GET", "/v1/chat/completions") == []
    assert names("GET", "/logs-1/_search") == ["elasticsearch"] and names("PUT", "/i/_doc/1") == ["elasticsearch"]
    assert names("POST", "/") == ["jsonrpc"] and names("GET", "/") == [] and names("POST", "/mcp/") == ["jsonrpc"]
    for p in ("/index.html", "/api/users/42", "/static/app.js", "/", "/completion"):
        assert names("GET", p) == []


# -- GenAI on hand-built exchanges -----------------------------------------------------------------
@pytest.mark.parametrize("enc", [None, "gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("split", [None, 1, 7])
def test_chat_completion_every_coding_and_segmentation(enc: str | None, split: int | None) -> None:
    r = Run().feed([(True, post("/v1/chat/completions", CHAT_REQ)), (False, ok(CHAT_RESP, enc=enc))], split)
    (s,) = r.spans
    assert s.name == "chat gpt-4o"
    assert gen(s) == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                      "gen_ai.request.model": "gpt-4o", "gen_ai.request.temperature": 0.2,
                      "gen_ai.request.max_tokens": 50, "gen_ai.response.model": "gpt-4o-2024-08-06",
                      "gen_ai.response.id": "chatcmpl-9", "gen_ai.response.finish_reasons": ["stop"],
                      "gen_ai.usage.input_tokens": 21, "gen_ai.usage.output_tokens": 4}
    assert s.attributes["http.request.method"] == "POST" and s.attributes["url.path"] == "/v1/chat/completions"
    assert r.counts == [("genai", "ok")]


@pytest.mark.parametrize("enc", ["gzip", "br", "zstd"])
def test_compressed_request_body(enc: str) -> None:
    body = compress(json.dumps(CHAT_REQ).encode(), enc)
    r = Run().feed([(True, post("/v1/chat/completions", None, raw=body, headers=b"Content-Encoding: %s\r\n"
                                % enc.encode())), (False, ok(CHAT_RESP))])
    assert r.spans[0].attributes["gen_ai.request.model"] == "gpt-4o" and r.counts == [("genai", "ok")]


@pytest.mark.parametrize("split", [None, 1, 5, 64])
@pytest.mark.parametrize("enc", [None, "gzip"])
def test_chat_stream_sse_chunked(split: int | None, enc: str | None) -> None:
    events = [{"id": "c1", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "Hel"},
                                                                "finish_reason": None}]},
              {"id": "c1", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "lo"},
                                                                "finish_reason": "stop"}]},
              {"id": "c1", "model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 3,
                                                                            "completion_tokens": 2}}, "[DONE]"]
    resp = ok(None, raw=sse(events), ctype=b"text/event-stream", enc=enc, chunked=True)
    r = Run({"genai": {"capture_content": True}}).feed(
        [(True, post("/v1/chat/completions", dict(CHAT_REQ, stream=True))), (False, resp)], split)
    (s,) = r.spans
    a = s.attributes
    assert (a["gen_ai.response.model"], a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"],
            a["gen_ai.response.finish_reasons"]) == ("gpt-4o-mini", 3, 2, ["stop"])
    assert json.loads(a["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Hello"}], "finish_reason": "stop"}]
    assert json.loads(a["gen_ai.system_instructions"]) == [{"type": "text", "content": "be brief"}]
    assert json.loads(a["gen_ai.input.messages"]) == [{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]
    assert r.counts == [("genai", "ok")]


def test_configured_path_operation_from_body() -> None:
    r = Run({"genai": {"paths": ["/v1/generate"]}}).feed(
        [(True, post("/v1/generate", {"model": "llama3", "prompt": "hi"})), (False, ok(CHAT_RESP)),
         (True, post("/v1/chat/completions", CHAT_REQ)), (False, ok(CHAT_RESP))])
    assert [s.name for s in r.spans] == ["text_completion llama3", "POST"]  # the defaults were replaced


def test_content_is_off_by_default() -> None:
    r = Run().feed([(True, post("/v1/chat/completions", CHAT_REQ)), (False, ok(CHAT_RESP))])
    assert not {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"} & set(
        r.spans[0].attributes)
    assert "hello" not in repr(r.spans[0].attributes) and "be brief" not in repr(r.spans[0].attributes)


def test_anthropic_stream_close_delimited() -> None:
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "model": "claude-sonnet-4-5",
                                                  "content": [], "usage": {"input_tokens": 25, "output_tokens": 1}}}
    events = [start, {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
              {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
              {"type": "message_stop"}]
    names = ["message_start", "content_block_delta", "message_delta", "message_stop"]
    req = post("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True,
                                "messages": [{"role": "user", "content": "Hello"}]},
               headers=b"anthropic-version: 2023-06-01\r\n")
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + sse(events, names)  # ends at close
    r = Run().feed([(True, req), (False, resp)], 11).close()
    (s,) = r.spans
    assert s.name == "chat claude-sonnet-4-5"
    assert gen(s) == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                      "gen_ai.request.model": "claude-sonnet-4-5", "gen_ai.request.max_tokens": 1024,
                      "gen_ai.response.model": "claude-sonnet-4-5", "gen_ai.response.id": "msg_1",
                      "gen_ai.response.finish_reasons": ["end_turn"], "gen_ai.usage.input_tokens": 25,
                      "gen_ai.usage.output_tokens": 15}


def test_provider_error_type() -> None:
    err = {"error": {"message": "Rate limit", "type": "rate_limit_exceeded", "code": None}}
    r = Run(perspective=Perspective.CLIENT).feed(
        [(True, post("/v1/chat/completions", CHAT_REQ)), (False, ok(err, status=b"429 Too Many Requests"))])
    s = r.spans[0]
    assert s.status_code == StatusCode.ERROR and s.attributes["error.type"] == "rate_limit_exceeded"
    assert s.kind == SpanKind.CLIENT and s.name == "chat gpt-4o"


def test_truncated_request_keeps_top_level_and_usage_from_tail() -> None:
    """A body over the bound: model is read from the prefix scan, usage from the kept tail."""
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 100_000}]}
    resp = dict(CHAT_RESP, choices=[{"index": 0, "message": {"content": "y" * 100_000}, "finish_reason": "stop"}])
    r = Run({"max_body_bytes": 4096, "max_decoded_bytes": 4096}).feed(
        [(True, post("/v1/chat/completions", big)), (False, ok(resp))], 1460)
    a = r.spans[0].attributes
    assert a["gen_ai.request.model"] == "gpt-4o" and a["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (21, 4)
    assert r.counts == [("genai", "body_truncated")]


def test_embeddings_and_responses() -> None:
    emb = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1] * 16}],
           "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    resp = {"id": "resp_1", "object": "response", "status": "incomplete", "model": "gpt-4.1-2025-04-14",
            "incomplete_details": {"reason": "max_output_tokens"}, "output": [],
            "usage": {"input_tokens": 5, "output_tokens": 16, "input_tokens_details": {"cached_tokens": 2}}}
    r = Run().feed([(True, post("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi",
                                                   "encoding_format": "float"})), (False, ok(emb)),
                    (True, post("/v1/responses", {"model": "gpt-4.1", "input": "hi", "max_output_tokens": 16})),
                    (False, ok(resp))])
    e, s = r.spans
    assert e.name == "embeddings text-embedding-3-small" and gen(e)["gen_ai.usage.input_tokens"] == 8
    assert gen(e)["gen_ai.embeddings.dimension.count"] == 16 and "gen_ai.usage.output_tokens" not in gen(e)
    assert gen(e)["gen_ai.request.encoding_formats"] == ["float"]
    assert s.name == "chat gpt-4.1" and gen(s)["gen_ai.response.finish_reasons"] == ["max_output_tokens"]
    assert gen(s)["gen_ai.request.max_tokens"] == 16 and gen(s)["gen_ai.usage.cache_read.input_tokens"] == 2


# -- hostile bodies ------------------------------------------------------------------------------------
HOSTILE = [
    b"{" * 200_000,                                             # deeply nested
    b'{"model": "gpt-4o", "messages": [' + b"[" * 50_000,      # truncated and nested
    b'{"model": "\xff\xfe\xfa", "messages": []}',                # invalid UTF-8
    b"\x00\x01\x02 not json at all",
    b'{"model": ' + b"9" * 5000 + b"}",                        # a huge number
    b"[]", b"null", b'"str"', b'{"model": {"nested": true}}',
]


@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_request_bodies_never_raise(body: bytes) -> None:
    r = Run({"max_body_bytes": 64 * 1024}).feed([(True, post("/v1/chat/completions", None, raw=body)),
                                                 (False, ok(None, raw=b'{"choices": ' + b"[" * 10_000))])
    (s,) = r.spans  # the HTTP span always
    assert s.attributes["http.response.status_code"] == 200
    assert all(res != "internal_error" for _k, res in r.counts)


@pytest.mark.parametrize("body", [b"{" * 300_000, b"\xff" * 1000, b"data: " + b"x" * 400_000 + b"\n\n",
                                  b"data: {\"a\":\n" * 50_000, b"event: x\n" * 100_000 + b"\n"])
def test_hostile_sse_streams_are_bounded(body: bytes) -> None:
    r = Run({"max_event_bytes": 1024, "max_stream_bytes": 64 * 1024}).feed(
        [(True, post("/v1/chat/completions", dict(CHAT_REQ, stream=True))),
         (False, ok(None, raw=body, ctype=b"text/event-stream", chunked=True))], 4000)
    (s,) = r.spans
    assert s.name == "chat gpt-4o"
    (count,) = r.counts
    assert count[1] in ("ok", "sse_truncated", "sse_event_too_large", "bad_json")


def test_decompression_bomb_is_bounded() -> None:
    bomb = gzip.compress(b'{"model": "gpt-4o", "pad": "' + b"A" * 50_000_000 + b'"}')
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        r = Run({"max_body_bytes": 128 * 1024, "max_decoded_bytes": 256 * 1024}).feed(
            [(True, post("/v1/chat/completions", None, raw=bomb, headers=b"Content-Encoding: gzip\r\n")),
             (False, ok(CHAT_RESP, enc="gzip"))])
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak  # 50 MB of output never materialised
    assert r.spans[0].attributes["gen_ai.request.model"] == "gpt-4o"  # from the decoded prefix
    assert r.counts == [("genai", "body_truncated")]


def test_a_gap_in_a_captured_body_is_counted() -> None:
    """eBPF's per-message cap or a full ring loses the middle of a body: the HTTP span stays
    whole (skip_gap), the enricher uses what came before and counts ``gap``."""
    r = Run()
    req = post("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]})
    head_end = req.index(b"\r\n\r\n") + 4
    r.feed([(True, req[:head_end + 100])])
    assert r.session.skip_gap(True, len(req) - head_end - 100, 1)
    r.feed([(False, ok(CHAT_RESP))])
    (s,) = r.spans
    assert s.attributes["http.request.body.size"] == len(req) - head_end
    assert s.name == "chat gpt-4o"  # the model came before the gap
    assert r.counts == [("genai", "gap")]


def test_corrupt_and_unsupported_codings_are_counted() -> None:
    r = Run().feed([(True, post("/v1/chat/completions", CHAT_REQ)),
                    (False, ok(None, raw=b"\x1f\x8b not gzip", headers=b"Content-Encoding: gzip\r\n")),
                    (True, post("/v1/chat/completions", CHAT_REQ)),
                    (False, ok(None, raw=b"x", headers=b"Content-Encoding: compress\r\n"))])
    assert [c for _k, c in r.counts] == ["decode_error", "unsupported_encoding"]
    assert all(s.name == "chat gpt-4o" for s in r.spans)  # the request still says what it was


# -- GraphQL, Elasticsearch, JSON-RPC on hand-built exchanges ----------------------------------------------
def test_graphql_operations_scan() -> None:
    assert operations("query Q($a: In = {x: 1}) { a }") == [("query", "Q")]
    assert operations("{ a { b } }") == [("query", None)]
    assert operations("# query X\nmutation { x }") == [("mutation", None)]
    assert operations('fragment F on T { a } subscription S @live { ...F, s(q: "{ query Z }") }') == [
        ("subscription", "S")]
    assert operations("query A { a } mutation B { b }") == [("query", "A"), ("mutation", "B")]
    assert operations("{" * 100_000) == [("query", None)]  # linear, no recursion


def test_graphql_spans() -> None:
    doc = "query GetBook { a } mutation AddBook($t: String) { add(t: $t) { id } }"
    r = Run({"graphql": {"capture_document": True}}).feed([
        (True, post("/graphql", {"query": doc, "operationName": "AddBook", "variables": {"t": "x"}})),
        (False, ok({"data": {"add": {"id": 1}}})),
        (True, b"GET /graphql?query=%7B%20me%20%7D HTTP/1.1\r\nHost: h\r\n\r\n"),
        (False, ok({"errors": [{"message": "no", "extensions": {"code": "UNAUTHENTICATED"}}], "data": None}))])
    m, q = r.spans
    assert (m.name, m.attributes["graphql.operation.type"], m.attributes["graphql.operation.name"]) == (
        "mutation", "mutation", "AddBook")
    assert m.attributes["graphql.document"] == doc and m.status_code == StatusCode.UNSET
    assert q.name == "query" and "graphql.operation.name" not in q.attributes
    assert q.status_code == StatusCode.ERROR and q.attributes["error.type"] == "UNAUTHENTICATED"


def test_elasticsearch_endpoints() -> None:
    assert endpoint("POST", "/logs-2026/_search") == ("search", "logs-2026", None)
    assert endpoint("PUT", "/books/_doc/42") == ("index", "books", "42")
    assert endpoint("GET", "/books/_doc/42") == ("get", "books", "42")
    assert endpoint("POST", "/_bulk") == ("bulk", None, None)
    assert endpoint("GET", "/_cat/indices") == ("cat.indices", None, None)
    assert endpoint("GET", "/_cluster/health") == ("cluster.health", None, None)
    assert endpoint("PUT", "/books") == ("indices.create", "books", None)
    assert endpoint("PUT", "/books/_mapping") == ("indices.put_mapping", "books", None)
    assert endpoint("GET", "/_next/static") is None


def test_elasticsearch_needs_confirmation() -> None:
    r = Run().feed([(True, b"GET /_next/data.json HTTP/1.1\r\nHost: h\r\n\r\n"),
                    (False, ok({"x": 1})),
                    (True, b"GET /_api/status HTTP/1.1\r\nHost: h\r\n\r\n"), (False, ok({"x": 1}))])
    assert [s.name for s in r.spans] == ["GET", "GET"] and r.counts == []  # not Elasticsearch: untouched
    r = Run().feed([(True, b"POST /idx/_search HTTP/1.1\r\nHost: h\r\nUser-Agent: opensearch-py/3.0.0\r\n"
                           b"Content-Length: 2\r\n\r\n{}"), (False, ok({"hits": {}}))])
    a = r.spans[0].attributes
    assert r.spans[0].name == "search idx" and a["db.system.name"] == "opensearch"
    assert a["db.collection.name"] == "idx" and a["db.response.status_code"] == "200"


def test_jsonrpc_batch_children_and_errors() -> None:
    batch = [{"jsonrpc": "2.0", "method": "eth_blockNumber", "id": 1},
             {"jsonrpc": "2.0", "method": "eth_getBalance", "params": ["0x0", "latest"], "id": "b"},
             {"jsonrpc": "2.0", "method": "notify_me"}]
    answer = [{"jsonrpc": "2.0", "id": 1, "result": "0x10"},
              {"jsonrpc": "2.0", "id": "b", "error": {"code": -32602, "message": "Invalid params"}}]
    r = Run().feed([(True, post("/", batch)), (False, ok(answer)),
                    (True, post("/rpc", {"jsonrpc": "2.0", "method": "sub", "id": 7})),
                    (False, ok({"jsonrpc": "2.0", "id": 7, "error": {"code": -32601, "message": "Method not found"}})),
                    (True, post("/", {"not": "jsonrpc"})), (False, ok({}))])
    kids = [s for s in r.spans if s.kind == SpanKind.INTERNAL]
    parent = next(s for s in r.spans if s.attributes.get("jsonrpc.batch.size") == 3)
    assert parent.name == "eth_blockNumber (batch)" and len(kids) == 3
    assert all(k.parent_span_id == parent.span_id and k.trace_id == parent.trace_id for k in kids)
    bad = next(k for k in kids if k.name == "eth_getBalance")
    assert bad.status_code == StatusCode.ERROR and bad.attributes["rpc.response.status_code"] == "-32602"
    assert "jsonrpc.request.id" not in next(k for k in kids if k.name == "notify_me").attributes
    single = next(s for s in r.spans if s.attributes.get("rpc.method") == "sub" and s.kind != SpanKind.INTERNAL)
    assert single.name == "sub" and single.attributes["error.type"] == "-32601"
    assert single.attributes["rpc.system.name"] == "jsonrpc" and single.attributes["jsonrpc.request.id"] == "7"
    plain = r.spans[-1]
    assert plain.name == "POST" and "rpc.system.name" not in plain.attributes


def test_mcp_sse_response_and_session() -> None:
    """MCP Streamable HTTP (2025-06-18): the answer as an SSE stream of JSON-RPC messages
    (a notification first), the session in ``Mcp-Session-Id``."""
    call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "search", "arguments": {}}}
    stream = sse([{"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}},
                  {"jsonrpc": "2.0", "id": 5, "result": {"content": [], "isError": False}}], ["message", "message"])
    r = Run().feed([(True, post("/mcp", call, headers=b"Mcp-Session-Id: 1868a90c\r\n"
                                                      b"MCP-Protocol-Version: 2025-06-18\r\n")),
                    (False, ok(None, raw=stream, ctype=b"text/event-stream", chunked=True))], 9)
    (s,) = r.spans
    assert s.name == "tools/call search" and s.status_code == StatusCode.UNSET
    assert (s.attributes["mcp.session.id"], s.attributes["mcp.protocol.version"]) == ("1868a90c", "2025-06-18")
    assert r.counts == [("jsonrpc", "ok")]


def test_http2_stream_enriched() -> None:
    """HTTP/2 (h2's real encoder): the same attributes from DATA frames, split a byte a segment."""
    pair = H2Pair()
    body = json.dumps(CHAT_REQ).encode()
    sid = pair.request([(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "http"),
                        (":authority", "api.openai.com"), ("content-type", "application/json")], body)
    rb = gzip.compress(json.dumps(CHAT_RESP).encode())
    pair.respond(sid, [(":status", "200"), ("content-type", "application/json"), ("content-encoding", "gzip")], rb)
    sid = pair.request([(":method", "POST"), (":path", "/graphql"), (":scheme", "http"), (":authority", "h")],
                       json.dumps({"query": "mutation M { x }"}).encode())
    pair.respond(sid, [(":status", "200"), ("content-type", "application/json")], b'{"data": {"x": 1}}')
    for step in (None, 1):
        drv = Driver()
        counts: list[tuple[str, str]] = []
        drv.conn.enrich = Enricher(EnrichConfig(), lambda k, r, c=counts: c.append((k, r)))
        drv.session = H2Session(drv.conn)
        for fc, data in pair.log:
            if step is None:
                drv.feed(fc, data)
            else:
                drv.feed_split(fc, data, step=step)
        chat, gql = drv.spans
        assert chat.name == "chat gpt-4o" and chat.attributes["gen_ai.usage.output_tokens"] == 4
        assert chat.attributes["network.protocol.version"] == "2"
        assert gql.name == "mutation" and gql.attributes["graphql.operation.name"] == "M"
        assert counts == [("genai", "ok"), ("graphql", "ok")]
    assert h2.connection  # the real h2 stack made the frames


# -- bounded memory and plain HTTP untouched ------------------------------------------------------------
def _alloc(steps: list[tuple[bool, bytes]], cfg: dict[str, Any] | None = None) -> int:
    Run(cfg).feed(steps, 1460)  # warm caches
    tracemalloc.start()
    try:
        Run(cfg).feed(steps, 1460)
        _c, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_plain_http_allocation_is_flat_with_enrichers_on() -> None:
    def ex(n: int) -> list[tuple[bool, bytes]]:
        body = b"b" * n
        return [(True, b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (n, body)),
                (False, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (n, body))]
    small, big = _alloc(ex(10_000)), _alloc(ex(1_000_000))
    assert big < small + 64 * 1024, (small, big)  # the bodies are never copied


def test_selected_body_capture_is_bounded() -> None:
    def ex(n: int) -> list[tuple[bool, bytes]]:
        req = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * n}]}
        return [(True, post("/v1/chat/completions", req)), (False, ok(CHAT_RESP))]
    cfg = {"max_body_bytes": 16 * 1024, "max_decoded_bytes": 16 * 1024}
    small, big = _alloc(ex(20_000), cfg), _alloc(ex(2_000_000), cfg)
    assert big < small + 64 * 1024, (small, big)  # 100x the body: the same bounded capture


def test_the_stage_wide_capture_budget() -> None:
    """Many connections with requests awaiting answers: what their captures hold together stays
    under max_total_bytes (later bytes are refused, counted), and all of it comes back when the
    exchanges end, however they end (answered, or the connection dropped unanswered)."""
    cfg = EnrichConfig(max_body_bytes=4096, max_decoded_bytes=4096, max_total_bytes=64 * 1024)
    counts: list[tuple[str, str]] = []
    en = Enricher(cfg, lambda k, r: counts.append((k, r)))
    req = post("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 8000}]})
    sessions = []
    for i in range(40):  # 40 x 4 KiB wanted, 64 KiB allowed
        conn = Conn(i, "10.0.0.1", 40000 + i, "10.0.0.2", 8080, lambda s: None)
        conn.enrich = en
        s = http1.Session(conn)
        conn.client_buf.append(req, 1)
        s.feed(True, conn.client_buf, 1)
        sessions.append((conn, s))
        assert en.budget.used <= cfg.max_total_bytes
    assert en.budget.used > cfg.max_total_bytes - 8192 and en.budget.refused > 0
    for conn, s in sessions[:20]:  # answered
        conn.server_buf.append(ok(CHAT_RESP), 2)
        s.feed(False, conn.server_buf, 2)
    assert ("genai", "capture_budget") in counts and ("genai", "body_truncated") in counts
    del conn, s
    sessions.clear()  # the rest dropped unanswered, as an evicted connection is
    assert en.budget.used == 0


def test_capture_primitives() -> None:
    c = Capture(10)
    for piece in (b"0123", b"456789ab", b"cdef" * 2000):
        c.feed(memoryview(piece))
    assert bytes(c.data) == b"0123456789" and c.truncated and len(c.tail or b"") == 4096
    got: list[tuple[str, bytes]] = []
    s = SseStream(lambda n, d: got.append((n, d)), "", 100, 10_000)
    for b in b"event: a\r\ndata: 1\r\ndata: 2\r\n\r\n: keepalive\n\ndata:x\n\n":
        s.feed(bytes([b]))
    assert got == [("a", b"1\n2"), ("", b"x")]
    assert top_level(b'{"a": {"model": "no"}, "model": "yes", "n": 3, "s": "q\\"', ("model", "n", "s")) == {
        "model": "yes", "n": 3}


def test_linear_time_byte_a_segment() -> None:
    """An SSE stream of 2000 events a byte a segment costs about what it costs whole x the bytes."""
    events = [{"choices": [{"index": 0, "delta": {"content": "tok"}, "finish_reason": None}]}] * 2000
    steps = [(True, post("/v1/chat/completions", dict(CHAT_REQ, stream=True))),
             (False, ok(None, raw=sse(events), ctype=b"text/event-stream", chunked=True))]
    t = time.perf_counter()
    Run().feed(steps, 64)
    t64 = time.perf_counter() - t
    t = time.perf_counter()
    r = Run().feed(steps, 1)
    t1 = time.perf_counter() - t
    assert r.counts == [("genai", "ok")]
    assert t1 < t64 * 64 * 3, (t1, t64)  # no rescans: a byte a segment is per-call overhead only


# -- real clients, captured with tcpdump and replayed -----------------------------------------------------
def _by(spans: list[Span], **attrs: Any) -> list[Span]:
    return [s for s in spans if all(s.attributes.get(k) == v for k, v in attrs.items())]


def test_openai_and_anthropic_clients_replayed() -> None:
    import anthropic
    import openai

    with responder() as srv, tcpdump(srv.port) as cap:
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        srv.set_encoding("gzip")
        r = oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                        temperature=0.5, max_tokens=2)
        assert r.choices[0].finish_reason == "length"
        stream = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                             stream=True, stream_options={"include_usage": True})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello!"
        srv.set_encoding("br")
        e = oai.embeddings.create(model="text-embedding-3-small", input="hello")
        assert len(e.data[0].embedding) == 8
        srv.set_encoding("zstd")
        resp = oai.responses.create(model="gpt-4.1", input="hi")
        assert resp.output_text == "Hi!"
        srv.set_encoding(None)
        with oai.responses.stream(model="gpt-4.1", input="hi") as rs:
            assert rs.get_final_response().usage.output_tokens == 2
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        ant = anthropic.Anthropic(base_url=srv.url, api_key="sk-ant-test", max_retries=0)
        m = ant.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
        assert m.usage.output_tokens == 6
        with ant.messages.stream(model="claude-haiku-4-5", max_tokens=32,
                                 messages=[{"role": "user", "content": "hi"}]) as ms:
            assert ms.get_final_text() == "Hi, I'm Claude."
        with pytest.raises(anthropic.NotFoundError):
            ant.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    spans, _rs, stats = replay(cap)
    assert len(spans) == 9, [s.name for s in spans]
    chat = _by(spans, **{"gen_ai.request.model": "gpt-4o"})[0]
    assert chat.name == "chat gpt-4o" and chat.kind == SpanKind.SERVER  # a capture: the HTTP span's kind
    assert gen(chat) == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                         "gen_ai.request.model": "gpt-4o", "gen_ai.request.temperature": 0.5,
                         "gen_ai.request.max_tokens": 2, "gen_ai.response.model": "gpt-4o-2024-08-06",
                         "gen_ai.response.id": "chatcmpl-1", "gen_ai.response.finish_reasons": ["length"],
                         "gen_ai.usage.input_tokens": 9, "gen_ai.usage.output_tokens": 2}
    assert chat.attributes["openai.response.service_tier"] == "default"
    st = _by(spans, **{"gen_ai.request.model": "gpt-4o-mini"})[0]
    assert (st.attributes["gen_ai.usage.input_tokens"], st.attributes["gen_ai.usage.output_tokens"],
            st.attributes["gen_ai.response.finish_reasons"]) == (11, 3, ["stop"])
    emb = _by(spans, **{"gen_ai.operation.name": "embeddings"})[0]
    assert emb.name == "embeddings text-embedding-3-small" and emb.attributes["gen_ai.usage.input_tokens"] == 4
    assert emb.attributes["gen_ai.request.encoding_formats"] == ["base64"]  # the openai client's default
    resps = _by(spans, **{"url.path": "/v1/responses"})
    assert len(resps) == 2 and all(s.name == "chat gpt-4.1" for s in resps)
    assert all(s.attributes["gen_ai.response.model"] == "gpt-4.1-2025-04-14" for s in resps)
    assert all(s.attributes["gen_ai.usage.output_tokens"] == 2 for s in resps)
    missing = _by(spans, **{"gen_ai.request.model": "no-such-model"})
    assert {s.attributes.get("error.type") for s in missing} == {"invalid_request_error", "not_found_error"}
    assert all(s.attributes["http.response.status_code"] == 404 for s in missing)
    claude = _by(spans, **{"gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5"})[0]
    assert claude.name == "chat claude-sonnet-4-5" and claude.attributes["gen_ai.usage.input_tokens"] == 12
    assert claude.attributes["gen_ai.response.finish_reasons"] == ["end_turn"]
    haiku = _by(spans, **{"gen_ai.request.model": "claude-haiku-4-5"})[0]
    assert (haiku.attributes["gen_ai.usage.output_tokens"], haiku.attributes["gen_ai.response.finish_reasons"]) == (
        6, ["max_tokens"])
    assert stats["enrich"] == {"genai:ok": 9}


def test_graphql_elasticsearch_jsonrpc_clients_replayed() -> None:
    import elasticsearch

    with responder() as srv, tcpdump(srv.port) as cap:
        with httpx.Client(base_url=srv.url) as c:
            assert c.post("/graphql", json={"query": "query Book { book { title } }",
                                            "operationName": "Book"}).json()["data"]
            assert c.post("/graphql", json={"query": "{ broken }"}).json()["errors"]
            assert c.get("/graphql", params={"query": "subscription Live { t }"}).status_code == 200
        es = elasticsearch.Elasticsearch(srv.url, request_timeout=10, max_retries=0)
        assert es.info()["tagline"] == "You Know, for Search"
        es.indices.create(index="books")
        assert es.index(index="books", id="1", document={"title": "Dune"})["result"] == "created"
        assert es.search(index="books", query={"match": {"title": "dune"}})["hits"]["total"]["value"] == 1
        with pytest.raises(elasticsearch.NotFoundError):
            es.get(index="books", id="missing")
        with pytest.raises(elasticsearch.NotFoundError):
            es.search(index="nope", query={"match_all": {}})
        es.close()
    spans, _rs, stats = replay(cap)
    gql = _by(spans, **{"url.path": "/graphql"})
    assert sorted((s.name, s.attributes.get("graphql.operation.name", "")) for s in gql) == [
        ("query", ""), ("query", "Book"), ("subscription", "Live")]
    broken = next(s for s in gql if s.status_code == StatusCode.ERROR)
    assert broken.attributes["error.type"] == "GRAPHQL_VALIDATION_FAILED"
    es_spans = _by(spans, **{"db.system.name": "elasticsearch"})
    # PUT /books (indices.create) has no /_api segment and is not selected (README: a limit)
    assert sorted(s.name for s in es_spans) == ["get books", "index books", "info", "search books", "search nope"]
    get = next(s for s in es_spans if s.name == "get books")
    assert get.attributes["db.operation.parameter.id"] == "missing" and get.status_code == StatusCode.UNSET
    nope = next(s for s in es_spans if s.name == "search nope")
    assert nope.status_code == StatusCode.ERROR and nope.attributes["error.type"] == "index_not_found_exception"
    assert nope.attributes["db.response.status_code"] == "404"
    assert stats["enrich"] == {"graphql:ok": 3, "elasticsearch:ok": 5}


def test_openai_over_http2_replayed() -> None:
    """The openai client over HTTP/2 (httpx's h2, prior knowledge) against the h2 responder:
    HPACK-coded heads, DATA frames, gzip, an SSE stream; recorded and replayed."""
    import openai

    with h2_responder() as port, tcpdump(port) as cap:
        with httpx.Client(http1=False, http2=True) as hc:
            oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", http_client=hc,
                                max_retries=0)
            r = oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert r.usage.total_tokens == 6
            s = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True})
            assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == "ab"
            assert hc.post(f"http://127.0.0.1:{port}/graphql", json={"query": "query Q { book }"}).status_code == 200
    spans, _rs, stats = replay(cap)
    by_model = {s.attributes.get("gen_ai.request.model"): s for s in spans}
    plain, streamed = by_model["gpt-4o"], by_model["gpt-4o-mini"]
    assert plain.attributes["network.protocol.version"] == "2" and plain.name == "chat gpt-4o"
    assert (plain.attributes["gen_ai.usage.input_tokens"], plain.attributes["gen_ai.usage.output_tokens"]) == (5, 1)
    assert streamed.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert streamed.attributes["gen_ai.usage.output_tokens"] == 2
    q = next(s for s in spans if s.attributes.get("graphql.operation.name") == "Q")
    assert q.name == "query"
    assert stats["enrich"] == {"genai:ok": 2, "graphql:ok": 1}


_MCP_SERVER = r'''
import sys, uvicorn
from mcp.server.mcpserver import MCPServer
srv = MCPServer("wirespan-test")

@srv.tool()
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b

@srv.tool()
def fail(x: str) -> str:
    """Always fails."""
    raise ValueError("nope")

uvicorn.run(srv.streamable_http_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
'''

_MCP_CLIENT = r'''
import sys, anyio
from mcp.client.client import Client

async def main():
    async with Client(f"http://127.0.0.1:{sys.argv[1]}/mcp") as c:
        assert [t.name for t in (await c.list_tools()).tools] == ["add", "fail"]
        assert (await c.call_tool("add", {"a": 2, "b": 3})).structured_content == {"result": 5}
        assert (await c.call_tool("fail", {"x": "y"})).is_error

anyio.run(main)
'''


def test_mcp_real_server_replayed() -> None:
    """The real MCP SDK on both ends (Streamable HTTP: JSON-RPC in POST bodies, answered as
    JSON or SSE), recorded and replayed."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", _MCP_SERVER, str(port)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        with tcpdump(port) as cap:
            subprocess.run([sys.executable, "-c", _MCP_CLIENT, str(port)], check=True, timeout=120,
                           stderr=subprocess.PIPE)
    finally:
        server.terminate()
        server.wait(timeout=20)
    spans, _rs, stats = replay(cap)
    mcp = [s for s in spans if "mcp.method.name" in s.attributes]
    names = sorted(s.name for s in mcp)
    assert "tools/call add" in names and "tools/call fail" in names and "tools/list" in names, names
    add = next(s for s in mcp if s.name == "tools/call add")
    a = add.attributes
    assert (a["rpc.system.name"], a["rpc.method"], a["gen_ai.tool.name"], a["gen_ai.operation.name"]) == (
        "jsonrpc", "tools/call", "add", "execute_tool")
    # mcp 2.x speaks the stateless 2026-07-28 revision: a version header on every request, no session
    assert a["mcp.protocol.version"] == "2026-07-28" and a["jsonrpc.protocol.version"] == "2.0"
    assert a["jsonrpc.request.id"].isdigit()
    assert add.status_code == StatusCode.UNSET
    fail = next(s for s in mcp if s.name == "tools/call fail")
    assert fail.status_code == StatusCode.ERROR and fail.attributes["error.type"] == "tool_error"
    assert stats["enrich"].get("jsonrpc:internal_error") is None


# -- the live receiver ------------------------------------------------------------------------------------
_OPENAI_CLIENT = r'''
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-test", max_retries=0)
r = c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
assert r.usage.total_tokens == 11
'''


def test_live_receiver_enriches() -> None:
    from receivers.live import LiveConfig, LiveReceiver

    class Sink:
        def __init__(self) -> None:
            self.spans: list[Span] = []

        def consume_spans(self, spans: list[Span]) -> None:
            self.spans.extend(spans)

    sink = Sink()
    stage = ProtocolsProcessor("protocols", {"enabled": ["http"]}, sink)
    with responder() as srv:
        rx = LiveReceiver("live", LiveConfig(ports=[srv.port]), stage)
        rx.start()
        try:
            subprocess.run([sys.executable, "-c", _OPENAI_CLIENT, srv.url], check=True, timeout=120)
            assert wait_until(lambda: any("gen_ai.operation.name" in s.attributes for s in sink.spans), 10)
        finally:
            rx.shutdown()
    (s,) = [s for s in sink.spans if "gen_ai.operation.name" in s.attributes]
    assert s.name == "chat gpt-4o" and s.attributes["gen_ai.usage.input_tokens"] == 9
    assert s.attributes["gen_ai.response.model"] == "gpt-4o-2024-08-06"
