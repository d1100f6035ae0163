"""JSON-RPC 2.0 over HTTP and MCP's Streamable HTTP transport, as the OpenTelemetry
conventions name them (rpc/json-rpc.md and gen-ai/mcp.md, Development).

Every call: ``rpc.system.name=jsonrpc``, ``rpc.method``, ``jsonrpc.protocol.version``,
``jsonrpc.request.id``; an error object gives ``rpc.response.status_code`` (its code as a
string), ``error.type`` (the same) and an ERROR status. An MCP call (a known MCP method, an
``Mcp-Session-Id``/``MCP-Protocol-Version`` header, or an ``/mcp`` path) adds
``mcp.method.name``, ``mcp.session.id``, ``mcp.protocol.version``, ``gen_ai.tool.name`` and
``gen_ai.operation.name=execute_tool`` for ``tools/call`` (a result with ``isError`` is an
error, ``error.type=tool_error``), ``gen_ai.prompt.name``, ``mcp.resource.uri``, and the name
``{mcp.method.name} {target}``. Plain JSON-RPC spans are named ``{rpc.method}``.

A response may be JSON or an SSE stream of JSON-RPC messages (MCP): the message answering
the request's id is the one read. A batch keeps the HTTP span (``rpc.method`` is the first
call's, ``jsonrpc.batch.size`` how many) and gets one INTERNAL child span per call (the
HTTP span stays the one SERVER/CLIENT span), up to ``max_batch_spans`` (beyond: counted
``batch_spans_dropped``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from processors.protocols.enrich.body import load_json, top_level
from service.model import Span, SpanKind, StatusCode

if TYPE_CHECKING:
    from processors.protocols.enrich import Exchange

NAME = "jsonrpc"
NEEDS_REQUEST_BODY = True

#: MCP's methods (the 2025-06-18, 2025-11-25 and 2026-07-28 schemas); a call naming one is MCP.
MCP_METHODS = frozenset({
    "initialize", "ping", "server/discover", "tools/list", "tools/call",
    "resources/list", "resources/read", "resources/templates/list",
    "resources/subscribe", "resources/unsubscribe", "prompts/list", "prompts/get", "completion/complete",
    "logging/setLevel", "sampling/createMessage", "elicitation/create", "roots/list", "tasks/get", "tasks/list",
    "tasks/result", "tasks/cancel", "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/message", "notifications/resources/updated", "notifications/resources/list_changed",
    "notifications/tools/list_changed", "notifications/prompts/list_changed", "notifications/roots/list_changed",
    "notifications/tasks/status",
})


def _call(msg: Any) -> dict[str, Any] | None:
    if not isinstance(msg, dict) or not isinstance(msg.get("method"), str):
        return None
    if msg.get("jsonrpc") != "2.0":
        return None
    return msg


def _rid(v: Any) -> str | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return v[:128]
    if v is None:
        return ""
    return None


def resolve(ex: Exchange) -> bool:
    body = ex.request_json()
    if body is None:
        prefix = ex.info.pop("_req_prefix", None)
        body = top_level(prefix, ("jsonrpc", "method", "id")) if prefix else None
    calls: list[dict[str, Any]] = []
    if isinstance(body, list):
        calls = [c for c in (_call(m) for m in body[:10_000]) if c is not None]
        if not calls:
            return False
        ex.info["batch"] = len(body)
    else:
        c = _call(body)
        if c is None:
            return False
        calls = [c]
    mcp = (any(c["method"] in MCP_METHODS for c in calls) or "mcp-session-id" in ex.headers
           or "mcp-protocol-version" in ex.headers or ex.path.rstrip("/").endswith("/mcp"))
    ex.info["mcp"] = mcp
    # Keep only what the spans need of each call (the params of a few MCP methods).
    ex.info["calls"] = [_summary(c, mcp) for c in calls]
    return True


def _summary(c: dict[str, Any], mcp: bool) -> dict[str, Any]:
    s: dict[str, Any] = {"method": c["method"][:256]}
    if "id" in c:
        s["id"] = _rid(c["id"])
    p = c.get("params")
    if mcp and isinstance(p, dict):
        name = p.get("name")
        if c["method"] == "tools/call" and isinstance(name, str):
            s["tool"] = name[:256]
        elif c["method"] == "prompts/get" and isinstance(name, str):
            s["prompt"] = name[:256]
        uri = p.get("uri")
        if isinstance(uri, str):
            s["uri"] = uri[:1024]
        if c["method"] == "initialize" and isinstance(p.get("protocolVersion"), str):
            s["version"] = p["protocolVersion"][:32]
    return s


def response(ex: Exchange) -> bool:
    return True


def event(ex: Exchange, name: str, data: bytes) -> None:
    """One SSE event of an MCP response stream: a JSON-RPC message (or a batch of them)."""
    if name not in ("", "message"):
        return
    v, problem = load_json(data)
    if v is None:
        ex.problem = ex.problem or problem
        return
    _take(ex.info, v)


def _take(info: dict[str, Any], v: Any) -> None:
    """Responses (by id) into ``info["replies"]``; requests and notifications are not replies."""
    replies = info.setdefault("replies", {})
    for m in v[:10_000] if isinstance(v, list) else [v]:
        if not isinstance(m, dict) or "method" in m or ("result" not in m and "error" not in m):
            continue
        rid = _rid(m.get("id"))
        if rid is None or rid in replies or len(replies) >= 10_000:
            continue
        r: dict[str, Any] = {}
        e = m.get("error")
        if isinstance(e, dict):
            code = e.get("code")
            r["code"] = str(code) if isinstance(code, int) and not isinstance(code, bool) else "error"
            msg = e.get("message")
            r["message"] = msg[:256] if isinstance(msg, str) else ""
        res = m.get("result")
        if isinstance(res, dict):
            if res.get("isError") is True:
                r["tool_error"] = True
            pv = res.get("protocolVersion")
            if isinstance(pv, str):
                r["version"] = pv[:32]
        replies[rid] = r


def _attrs(ex: Exchange, call: dict[str, Any], reply: dict[str, Any] | None, a: dict[str, Any]) -> tuple[str, bool]:
    """Fill ``a`` for one call; returns (span name, error)."""
    info = ex.info
    method = call["method"]
    a["rpc.system.name"] = "jsonrpc"
    a["rpc.method"] = method
    a["jsonrpc.protocol.version"] = "2.0"
    if call.get("id") is not None:
        a["jsonrpc.request.id"] = call["id"]
    name = method
    if info.get("mcp"):
        a["mcp.method.name"] = method
        sid = ex.headers.get("mcp-session-id") or ex.resp_headers.get("mcp-session-id")
        if sid:
            a["mcp.session.id"] = sid[:256]
        ver = (ex.headers.get("mcp-protocol-version") or (reply or {}).get("version") or call.get("version"))
        if ver:
            a["mcp.protocol.version"] = ver
        a["network.transport"] = "tcp"
        if "tool" in call:
            a["gen_ai.tool.name"] = call["tool"]
            a["gen_ai.operation.name"] = "execute_tool"
            name = f"{method} {call['tool']}"
        elif "prompt" in call:
            a["gen_ai.prompt.name"] = call["prompt"]
            name = f"{method} {call['prompt']}"
        if "uri" in call:
            a["mcp.resource.uri"] = call["uri"]
    error = False
    if reply is not None:
        if "code" in reply:
            a["rpc.response.status_code"] = reply["code"]
            a["error.type"] = reply["code"]
            error = True
        elif reply.get("tool_error"):
            a["error.type"] = "tool_error"
            error = True
    return name, error


def apply(ex: Exchange, span: Span, emit: Any) -> str:
    info = ex.info
    if ex.sse is None:
        v = ex.response_json()
        if v is not None:
            _take(info, v)
    replies = info.get("replies", {})
    calls = info["calls"]
    first = calls[0]
    a = span.attributes
    name, error = _attrs(ex, first, replies.get(first.get("id")) if first.get("id") is not None else None, a)
    if error:
        span.status_code = StatusCode.ERROR
        r = replies.get(first.get("id"), {})
        span.status_message = r.get("message", "")
    batch = info.get("batch")
    if batch is None:
        span.name = name
        return "ok"
    a["jsonrpc.batch.size"] = batch
    span.name = f"{name} (batch)" if batch > 1 else name
    limit = ex.enricher.config.jsonrpc.max_batch_spans
    for i, call in enumerate(calls):
        if i >= limit:
            ex.enricher.count(NAME, "batch_spans_dropped")
            break
        ca: dict[str, Any] = {}
        cname, cerr = _attrs(ex, call, replies.get(call.get("id")) if call.get("id") is not None else None, ca)
        child = Span(cname, SpanKind.INTERNAL, span.start_ns, span.end_ns, ca, span.resource, span.trace_id, None,
                     span.span_id, StatusCode.ERROR if cerr else StatusCode.UNSET)
        emit(child)
    return "ok"
