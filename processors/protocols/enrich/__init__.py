"""What rides on HTTP: enrichers for HTTP/1 and HTTP/2 spans (issue 18, item 4).

Contract. The HTTP sessions (http1.py, http2.py) keep their span and call this package at
four points, only for requests an enricher selected:

``Enricher.select(method, path)``         on a request head that passed the sessions' inline
    pre-test (``path[-2:] in enricher.ends or "/_" in path or path == "/"``: three string
    tests, no call, for every request); None for plain HTTP, which then stays on the
    zero-copy path (no body byte is looked at).
``Enricher.begin(...)``                   a selected request: an ``Exchange`` holding the few
    header values it reads and, when the enricher needs the body, a bounded ``Capture``.
``Exchange.response(...)``                the response head: the body is captured (bounded),
    or split as an SSE stream as it arrives, when the selected kind reads it.
``Enricher.finish(exchange, span, emit)`` the span is built: attributes added, renamed as the
    conventions say, error status refined, child spans emitted (a JSON-RPC batch).

Kinds (one module each): ``genai`` (OpenAI-compatible chat/completions, responses,
embeddings, Anthropic messages), ``graphql``, ``elasticsearch`` (and OpenSearch), ``jsonrpc``
(JSON-RPC 2.0 and MCP). Each exports ``NAME``, ``NEEDS_REQUEST_BODY``, ``resolve``,
``response``, ``apply`` (and ``event`` for SSE). Every outcome is counted
(``wirespan_parser_messages{protocol=<kind>,result=ok|<reason>}`` and the stage's
``stats["enrich"]``); nothing raises out of here (an exception is ``internal_error``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from processors.protocols.enrich import elasticsearch, genai, graphql, jsonrpc
from processors.protocols.enrich.body import Budget, Capture, SseStream, load_json
from service.largebuf import LargeBuffer
from service.model import Span

__all__ = ["EnrichConfig", "Enricher", "Exchange", "KINDS"]

log = logging.getLogger(__name__)

#: Default bounds: bytes of one body captured (as sent, compressed or not), decoded bytes
#: read from it, bytes of one SSE stream read, bytes of one SSE event.
MAX_BODY_BYTES = 256 * 1024
MAX_DECODED_BYTES = 1024 * 1024
MAX_STREAM_BYTES = 8 * 1024 * 1024
MAX_EVENT_BYTES = 256 * 1024
#: Bytes all captures and SSE buffers of the stage hold at once.
MAX_TOTAL_BYTES = 64 * 1024 * 1024

KINDS = {m.NAME: m for m in (genai, graphql, elasticsearch, jsonrpc)}

# The few request/response header fields the enrichers read (credentials are never among them).
_FIELDS = re.compile(
    rb"\r?\n(content-type|content-encoding|x-elastic-product|x-elastic-client-meta|mcp-session-id"
    rb"|mcp-protocol-version|anthropic-version|openai-version)[ \t]*:[ \t]*([^\r\n]{0,512})", re.IGNORECASE)
_H2_FIELDS = (b"content-type", b"content-encoding", b"x-elastic-product", b"x-elastic-client-meta",
              b"mcp-session-id", b"mcp-protocol-version", b"anthropic-version", b"openai-version")


def _path_list(v: list[str]) -> list[str]:
    for p in v:
        if not p.startswith("/") or "?" in p:
            raise ValueError(f"a path starts with '/' and has no query: {p!r}")
    return v


_paths = field_validator("paths")(classmethod(lambda cls, v: _path_list(v)))  # type: ignore[arg-type]


class GenAIConfig(BaseModel):
    """GenAI calls (OpenAI-compatible and Anthropic APIs)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: Record prompts and completions (``gen_ai.input.messages``, ``gen_ai.output.messages``,
    #: ``gen_ai.system_instructions``): user data, off by default.
    capture_content: bool = False
    #: Characters of each content attribute kept when capture_content is on.
    max_content_chars: int = Field(16 * 1024, ge=16, le=16 * 1024 * 1024)
    #: Path suffixes selecting a request (the query is ignored).
    paths: list[str] = ["/chat/completions", "/completions", "/responses", "/embeddings", "/messages"]

    _check_paths = _paths


class GraphQLConfig(BaseModel):
    """GraphQL over HTTP (POST JSON or GET ``?query=``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    paths: list[str] = ["/graphql"]
    #: Name spans ``{type} {name}`` (the conventions' opt-in; default ``{type}``: names are
    #: the client's and may be of high cardinality).
    name_with_operation: bool = False
    #: Record ``graphql.document`` (the query text; literals are not stripped): off by default.
    capture_document: bool = False

    _check_paths = _paths


class ElasticsearchConfig(BaseModel):
    """Elasticsearch and OpenSearch REST calls (selected by an ``/_api`` path segment or the
    official clients' User-Agent, confirmed by the client's or the server's headers)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: ``db.system.name``: auto tells the two apart by the client's User-Agent and the
    #: server's ``X-Elastic-Product``; or say which one.
    system: str = Field("auto", pattern="^(auto|elasticsearch|opensearch)$")


class JsonRpcConfig(BaseModel):
    """JSON-RPC 2.0 over HTTP, and MCP's Streamable HTTP transport (confirmed by the body)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: Path suffixes selecting a POST; "/" is the root only.
    paths: list[str] = ["/", "/rpc", "/jsonrpc", "/json-rpc", "/mcp", "/messages"]
    #: Spans for the calls of a batch, children of the HTTP span (beyond it: counted).
    max_batch_spans: int = Field(100, ge=0, le=10_000)

    _check_paths = _paths


class EnrichConfig(BaseModel):
    """``processors: protocols: enrich:``: HTTP spans that carry GenAI, GraphQL, Elasticsearch
    or JSON-RPC/MCP calls get those conventions' attributes."""

    model_config = ConfigDict(extra="forbid")

    #: All enrichers at once (each also has its own ``enabled``).
    enabled: bool = True
    genai: GenAIConfig = GenAIConfig()
    graphql: GraphQLConfig = GraphQLConfig()
    elasticsearch: ElasticsearchConfig = ElasticsearchConfig()
    jsonrpc: JsonRpcConfig = JsonRpcConfig()
    #: Bytes of one request or response body captured, as sent (compressed or not).
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=256, le=64 * 1024 * 1024)
    #: Bytes decoded from a compressed body (a decompression bomb stops here).
    max_decoded_bytes: int = Field(MAX_DECODED_BYTES, ge=256, le=256 * 1024 * 1024)
    #: Decoded bytes of one SSE response read (a long stream is read up to here).
    max_stream_bytes: int = Field(MAX_STREAM_BYTES, ge=1024, le=1024 * 1024 * 1024)
    #: Bytes of one SSE event (a larger one is skipped and counted).
    max_event_bytes: int = Field(MAX_EVENT_BYTES, ge=256, le=64 * 1024 * 1024)
    #: Bytes all captured bodies and SSE buffers hold at once (every connection together);
    #: beyond, captures stop where they are (counted ``capture_budget``).
    max_total_bytes: int = Field(MAX_TOTAL_BYTES, ge=4096, le=64 * 1024 * 1024 * 1024)

    @model_validator(mode="after")
    def _bounds(self) -> EnrichConfig:
        if self.max_decoded_bytes < self.max_body_bytes:
            raise ValueError("max_decoded_bytes must be >= max_body_bytes")
        if self.max_event_bytes > self.max_stream_bytes:
            raise ValueError("max_event_bytes must be <= max_stream_bytes")
        if self.max_total_bytes < self.max_body_bytes:
            raise ValueError("max_total_bytes must be >= max_body_bytes")
        return self

    @property
    def any_enabled(self) -> bool:
        return self.enabled and any(getattr(self, k).enabled for k in KINDS)


class Exchange:
    """One selected request and its response, as far as an enricher reads them."""

    __slots__ = ("enricher", "h2", "headers", "host", "info", "kind", "kinds", "method", "problem", "req_body",
                 "resp_body", "resp_headers", "sink", "sse", "status", "target", "ua")

    def __init__(self, enricher: Enricher, kinds: tuple[Any, ...], method: str, target: str, host: str,
                 ua: str, headers: dict[str, str]) -> None:
        self.enricher = enricher
        self.kinds = kinds
        self.kind: Any = None
        self.method = method
        self.target = target
        self.host = host
        self.ua = ua
        self.headers = headers
        self.h2 = False
        self.req_body: Capture | None = None
        self.resp_body: Capture | None = None
        self.sse: SseStream | None = None
        #: Where the response body goes (HTTP/2 keeps it here; HTTP/1 on its body reader).
        self.sink: Capture | SseStream | None = None
        self.resp_headers: dict[str, str] = {}
        self.status = 0
        #: What the kind found (its own keys), read by its ``apply``.
        self.info: dict[str, Any] = {}
        self.problem: str | None = None

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def request_json(self) -> Any:
        """The request body parsed (None when absent, truncated or bad: ``problem`` says why)."""
        return self._json(self.req_body, "_req_prefix")

    def response_json(self) -> Any:
        """The response body parsed; a body that is not whole JSON keeps its tail for the enrichers
        that read a usage block from the end (``_resp_tail``)."""
        return self._json(self.resp_body, "_resp_prefix", keep_tail=True)

    def _json(self, cap: Any, prefix_key: str, keep_tail: bool = False) -> Any:
        if cap is None or not cap.seen:
            return None
        if cap.over_budget:
            self.problem = self.problem or "capture_budget"
        data, truncated, problem = cap.decoded(self.enricher.config.max_decoded_bytes)
        if problem is not None:
            self.problem = self.problem or problem
            return None
        v, p = load_json(data)
        if p is not None:
            self.problem = self.problem or ("body_truncated" if truncated else p)
            self.info[prefix_key] = data
            if keep_tail:
                tail = cap.tail_bytes()
                if tail is not None:
                    self.info["_resp_tail"] = tail
        return v

    def lose(self, from_client: bool) -> None:
        """Bytes of this exchange's body were lost (a capture's gap, a full ring): what was
        captured stops there, and the outcome is counted ``gap``."""
        self.problem = "gap"
        cap = self.req_body if from_client else self.resp_body
        if cap is not None:
            cap.limit = len(cap.data)
            cap.tail = None
        if not from_client and self.sse is not None:
            self.sse.problem = "gap"

    def _resolve(self) -> None:
        """Decide the kind once the request is whole (the first candidate that accepts it)."""
        if self.kind is not None or not self.kinds:
            return
        for k in self.kinds:
            if k.resolve(self):
                self.kind = k
                break
        if self.kind is None and self.req_body is not None and self.req_body.over_budget:
            self.enricher.count(self.kinds[0].NAME, "capture_budget")  # refused, not unrecognised
        self.kinds = ()

    def response(self, status: int, head: memoryview | bytes | None = None,
                 fields: dict[bytes, str] | None = None) -> Capture | SseStream | None:
        """The response head arrived: the sink its body goes to (None: not read)."""
        try:
            self.status = status
            if head is not None:
                self.resp_headers = _head_fields(head)
            elif fields is not None:
                self.resp_headers = _h2_fields(fields)
            self._resolve()
            k = self.kind
            if k is None:
                return None
            cfg = self.enricher.config
            ctype = self.resp_headers.get("content-type", "")
            enc = self.resp_headers.get("content-encoding", "")
            if ctype.startswith("text/event-stream"):
                if getattr(k, "event", None) is None:
                    return None
                self.sse = self.sink = SseStream(self._event, enc, cfg.max_event_bytes, cfg.max_stream_bytes,
                                                 self.enricher.budget)
                return self.sse
            if k.response(self):
                self.resp_body = self.sink = Capture(cfg.max_body_bytes, enc, self.enricher.budget)
                return self.resp_body
        except Exception:
            self.enricher._internal(self)
        return None

    def _event(self, name: str, data: bytes) -> None:
        try:
            self.kind.event(self, name, data)
        except Exception:
            self.enricher._internal(self)
            if self.sse is not None:
                self.sse.problem = "internal_error"


def _head_fields(head: memoryview | bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in _FIELDS.findall(head):
        out.setdefault(name.lower().decode("ascii"), value.strip().decode("utf-8", "replace"))
    return out


def _h2_fields(fields: dict[bytes, str]) -> dict[str, str]:
    return {n.decode("ascii"): fields[n] for n in _H2_FIELDS if n in fields}


class Enricher:
    """The stage's enrichers, built once from ``EnrichConfig``; shared by every HTTP session."""

    def __init__(self, config: EnrichConfig | None = None,
                 count: Callable[[str, str], None] | None = None) -> None:
        self.config = config = config if config is not None else EnrichConfig()
        self._count = count
        self.counts: dict[str, int] = {}
        #: What every capture holds at once (``max_total_bytes``).
        self.budget = Budget(config.max_total_bytes)
        on = config.enabled
        self.kinds = {n: m for n, m in KINDS.items() if on and getattr(config, n).enabled}
        by_suffix: dict[bytes, list[Any]] = {}
        root: list[Any] = []
        for name in ("genai", "graphql", "jsonrpc"):  # the order a shared suffix is tried in
            if name not in self.kinds:
                continue
            for p in getattr(config, name).paths:
                if p == "/":
                    root.append(self.kinds[name])
                else:
                    by_suffix.setdefault(p.rstrip("/").encode(), []).append(self.kinds[name])
        self._by_suffix = {k.decode(): tuple(v) for k, v in by_suffix.items()}
        self._suffixes = tuple(k for k in self._by_suffix) + tuple(k + "/" for k in self._by_suffix)
        #: The last two characters of every selecting path: the sessions' inline pre-test
        #: (``path[-2:] in ends or "/_" in path or path == "/"``) lets plain HTTP skip the call.
        self.ends = frozenset(k[-2:] for k in self._suffixes)
        self._root = tuple(root)
        self._es = (self.kinds["elasticsearch"],) if "elasticsearch" in self.kinds else None
        self._logged = False

    @property
    def active(self) -> bool:
        return bool(self.kinds)

    # -- counting ----------------------------------------------------------------------
    def count(self, kind: str, result: str) -> None:
        key = f"{kind}:{result}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if self._count is not None:
            self._count(kind, result)

    def _internal(self, ex: Exchange | None) -> None:
        kind = ex.kind.NAME if ex is not None and ex.kind is not None else "enrich"
        self.count(kind, "internal_error")
        if ex is not None:
            ex.kind = None
            ex.kinds = ()
        if not self._logged:
            self._logged = True
            log.error("internal error in an HTTP enricher (logged once)", exc_info=True)

    # -- selection -----------------------------------------------------------------------
    def select(self, method: str, path: str, ua: bytes | str | None = None) -> tuple[Any, ...] | None:
        """The candidate kinds for a request (``path`` without its query), or None: plain HTTP,
        nothing more is done. Three string tests for a plain request (about 60 ns here: the
        C head parser hands over ``path`` as a str already)."""
        if path[-2:] in self.ends and path.endswith(self._suffixes):
            kinds = self._by_suffix.get(path.rstrip("/")[path.rstrip("/").rfind("/"):])
            if kinds is None:  # a suffix of several segments (/chat/completions)
                p = path.rstrip("/")
                kinds = next((v for k, v in self._by_suffix.items() if p.endswith(k)), None)
            if kinds is not None:
                if method == "POST":
                    return kinds
                if method == "GET" and graphql in kinds:
                    return (graphql,)
        if self._es is not None and "/_" in path:
            return self._es
        if path == "/":
            if self._root and method == "POST":
                return self._root
            if self._es is not None and ua and _es_client(ua):  # info, ping
                return self._es
        return None

    def begin(self, kinds: tuple[Any, ...], method: str, target: bytes | str, host: bytes | str | None,
              ua: bytes | str | None, head: memoryview | bytes | None = None,
              fields: dict[bytes, str] | None = None) -> Exchange | None:
        """A selected request's ``Exchange`` (HTTP/1: ``head`` is the raw head; HTTP/2: ``fields``)."""
        try:
            headers = _head_fields(head) if head is not None else _h2_fields(fields or {})
            ex = Exchange(self, kinds, method, _text(target), _text(host), _text(ua), headers)
            ex.h2 = fields is not None
            if any(k.NEEDS_REQUEST_BODY for k in kinds) and method != "GET":
                ex.req_body = Capture(self.config.max_body_bytes, headers.get("content-encoding", ""), self.budget)
            else:
                ex._resolve()
                if ex.kind is None:
                    return None
            return ex
        except Exception:
            self._internal(None)
            return None

    # -- the span --------------------------------------------------------------------------
    def finish(self, ex: Exchange, span: Span, emit: Callable[[Span], None]) -> None:
        """Add what the exchange said to its HTTP span (never raises)."""
        try:
            ex._resolve()
            if ex.sse is not None:
                ex.sse.close()
            k = ex.kind
            if k is None:
                return
            result = k.apply(ex, span, emit)
            if result is None:
                return  # not this kind after all (an unconfirmed Elasticsearch path): not counted
            sse = ex.sse
            if sse is not None and sse.problem is not None:
                result = sse.problem
            elif sse is not None and sse.oversized:
                result = "sse_event_too_large"
            elif ex.problem is not None and result == "ok":
                result = ex.problem
            self.count(k.NAME, result)
        except Exception:
            self._internal(ex)


def _es_client(ua: bytes | str) -> bool:
    """An official Elasticsearch/OpenSearch client's User-Agent (elasticsearch-py/9.1.0 ...)."""
    if isinstance(ua, str):
        ua = ua.encode("utf-8", "replace")
    return ua.find(b"elasticsearch") >= 0 or ua.find(b"opensearch") >= 0 or ua.find(b"elastic-") >= 0


def _text(v: bytes | str | None) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return v.decode("utf-8", "replace")


def feed(sink: Capture | SseStream | None, buf: LargeBuffer, off: int, n: int) -> None:
    """Hand ``n`` body bytes at ``off`` of ``buf`` to a sink (never raises: a bug is counted
    by the sink's exchange at the end, as a problem)."""
    if sink is None or n <= 0:
        return
    try:
        sink.feed_buf(buf, off, n)
    except Exception:  # pragma: no cover - a bug; the exchange goes on without more body
        log.debug("enrich sink failed", exc_info=True)
