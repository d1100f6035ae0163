"""GenAI calls over HTTP: OpenAI-compatible chat/completions, completions, responses and
embeddings, and Anthropic messages, plain or streamed (SSE), as the OpenTelemetry GenAI
conventions name them (gen-ai-spans.md, openai.md, anthropic.md; status Development).

The HTTP span keeps its HTTP attributes and gets ``gen_ai.operation.name``,
``gen_ai.provider.name``, ``gen_ai.request.*`` (model, max_tokens, temperature, top_p, ...),
``gen_ai.response.model``/``id``/``finish_reasons``, ``gen_ai.usage.input_tokens``/
``output_tokens``, and the name ``{operation} {model}`` (``chat gpt-4o``). Prompts and
completions (``gen_ai.input.messages``, ``gen_ai.output.messages``,
``gen_ai.system_instructions``, as the conventions' JSON) only with ``capture_content``.
A stream is folded event by event: nothing but the running fields (and, with content
capture, the text so far, bounded) is kept.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from processors.protocols.enrich.body import load_json, object_after, top_level
from service.model import Span, StatusCode

if TYPE_CHECKING:
    from processors.protocols.enrich import Exchange

NAME = "genai"
NEEDS_REQUEST_BODY = True

# Path suffix -> gen_ai.operation.name (the Responses API is "chat", as openai.md says).
_OPERATIONS = (("/chat/completions", "chat"), ("/completions", "text_completion"), ("/responses", "chat"),
               ("/embeddings", "embeddings"), ("/messages", "chat"))
_REQUEST_KEYS = ("model", "stream", "max_tokens", "max_completion_tokens", "max_output_tokens", "temperature",
                 "top_p", "top_k", "frequency_penalty", "presence_penalty", "seed", "n", "encoding_format",
                 "dimensions")
_NUM_ATTRS = (("max_tokens", "gen_ai.request.max_tokens"), ("max_completion_tokens", "gen_ai.request.max_tokens"),
              ("max_output_tokens", "gen_ai.request.max_tokens"), ("temperature", "gen_ai.request.temperature"),
              ("top_p", "gen_ai.request.top_p"), ("top_k", "gen_ai.request.top_k"),
              ("frequency_penalty", "gen_ai.request.frequency_penalty"),
              ("presence_penalty", "gen_ai.request.presence_penalty"), ("seed", "gen_ai.request.seed"),
              ("dimensions", "gen_ai.embeddings.dimension.count"))


def _operation(path: str) -> str | None:
    p = path.rstrip("/")
    for suffix, op in _OPERATIONS:
        if p.endswith(suffix):
            return op
    return None


def _provider(ex: Exchange, body: Any) -> str:
    host = ex.host.lower()
    path = ex.path
    if path.rstrip("/").endswith("/messages") and (
            "anthropic-version" in ex.headers or (isinstance(body, dict) and "max_tokens" in body
                                                  and "messages" in body and "choices" not in body)):
        return "anthropic"
    if ".openai.azure.com" in host or "/openai/deployments/" in path:
        return "azure.ai.openai"
    return "openai"


def _operation_of_body(body: dict[str, Any]) -> str | None:
    """A configured path the table does not name: the body says what the call is."""
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "text_completion"
    if "input" in body:
        model = body.get("model")
        return "embeddings" if isinstance(model, str) and "embed" in model else "chat"
    return None


def resolve(ex: Exchange) -> bool:
    op = _operation(ex.path)
    body = ex.request_json()
    if body is None:
        prefix = ex.info.pop("_req_prefix", None)
        body = top_level(prefix, _REQUEST_KEYS) if prefix else None
        if not body:
            return False
    if not isinstance(body, dict):
        return False
    if "jsonrpc" in body:
        return False  # MCP's legacy /messages endpoint: the JSON-RPC enricher's
    if op is None:
        op = _operation_of_body(body)
        if op is None:
            return False
    model = body.get("model")
    provider = _provider(ex, body)
    if op == "chat" and ex.path.rstrip("/").endswith("/messages") and provider != "anthropic":
        return False
    info = ex.info
    info["op"] = op
    info["provider"] = provider
    if isinstance(model, str):
        info["model"] = model[:256]
    elif provider == "azure.ai.openai":  # the deployment names the model in Azure's path
        parts = ex.path.split("/")
        if "deployments" in parts and parts.index("deployments") + 1 < len(parts):
            info["model"] = parts[parts.index("deployments") + 1][:256]
    info["stream"] = body.get("stream") is True
    req: dict[str, Any] = {}
    for key, attr in _NUM_ATTRS:
        v = body.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            req.setdefault(attr, v)
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n != 1:
        req["gen_ai.request.choice.count"] = n
    stop = body.get("stop") if "stop" in body else body.get("stop_sequences")
    if isinstance(stop, str):
        req["gen_ai.request.stop_sequences"] = [stop[:256]]
    elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        req["gen_ai.request.stop_sequences"] = [s[:256] for s in stop[:16]]
    if op == "embeddings" and isinstance(body.get("encoding_format"), str):
        req["gen_ai.request.encoding_formats"] = [body["encoding_format"]]
    info["req"] = req
    cfg = ex.enricher.config.genai
    if cfg.capture_content:
        _request_content(info, body, provider, cfg.max_content_chars)
    return True


def response(ex: Exchange) -> bool:
    return True  # usage, model, finish reasons (and error types) are in every response body


# -- streams ------------------------------------------------------------------------------------
def event(ex: Exchange, name: str, data: bytes) -> None:
    """One SSE event of a streamed response: fold it into the running fields."""
    if data == b"[DONE]":
        return
    v, problem = load_json(data)
    if not isinstance(v, dict):
        ex.problem = ex.problem or problem or "bad_event"
        return
    info = ex.info
    etype = v.get("type") if isinstance(v.get("type"), str) else name
    if info.get("provider") == "anthropic":
        _anthropic_event(info, etype, v, ex)
        return
    if isinstance(etype, str) and etype.startswith("response."):  # the Responses API
        r = v.get("response")
        if isinstance(r, dict):
            _responses_object(info, r, ex)
        elif etype == "response.output_text.delta" and isinstance(v.get("delta"), str):
            _append_text(info, v["delta"], ex)
        elif etype == "error" or etype == "response.failed":
            info["error"] = _error_type(v) or "response.failed"
        return
    if etype == "error" or "error" in v:
        info["error"] = _error_type(v) or "error"
        return
    _chat_object(info, v, ex, streamed=True)


def _anthropic_event(info: dict[str, Any], etype: Any, v: dict[str, Any], ex: Exchange) -> None:
    if etype == "message_start":
        msg = v.get("message")
        if isinstance(msg, dict):
            _anthropic_message(info, msg, ex)
    elif etype == "content_block_delta":
        d = v.get("delta")
        if isinstance(d, dict) and isinstance(d.get("text"), str):
            _append_text(info, d["text"], ex)
    elif etype == "message_delta":
        d = v.get("delta")
        if isinstance(d, dict) and isinstance(d.get("stop_reason"), str):
            info["finish"] = [d["stop_reason"]]
        _usage(info, v.get("usage"), "input_tokens", "output_tokens")
    elif etype == "error":
        info["error"] = _error_type(v) or "error"


# -- bodies -------------------------------------------------------------------------------------
def _chat_object(info: dict[str, Any], v: dict[str, Any], ex: Exchange, streamed: bool = False) -> None:
    """An OpenAI chat.completion / text_completion / embedding list (or one stream chunk)."""
    model = v.get("model")
    if isinstance(model, str) and model:
        info["rmodel"] = model[:256]
    rid = v.get("id")
    if isinstance(rid, str):
        info["id"] = rid[:256]
    for key, attr in (("system_fingerprint", "openai.response.system_fingerprint"),
                      ("service_tier", "openai.response.service_tier")):
        x = v.get(key)
        if isinstance(x, str):
            info.setdefault("extra", {})[attr] = x[:128]
    choices = v.get("choices")
    if isinstance(choices, list):
        fins = info.setdefault("finish_by_index", {})
        for i, c in enumerate(choices[:128]):
            if not isinstance(c, dict):
                continue
            idx = c.get("index", i)
            fr = c.get("finish_reason")
            if isinstance(fr, str):
                fins[idx if isinstance(idx, int) else i] = fr
            if ex.enricher.config.genai.capture_content:
                msg = c.get("delta") if streamed else c.get("message")
                text = msg.get("content") if isinstance(msg, dict) else c.get("text")
                if isinstance(text, str) and (idx == 0 or idx is None):
                    _append_text(info, text, ex)
    _usage(info, v.get("usage"), "prompt_tokens", "completion_tokens")
    data = v.get("data")
    if info.get("op") == "embeddings" and isinstance(data, list) and data and isinstance(data[0], dict):
        emb = data[0].get("embedding")
        if isinstance(emb, list):
            info.setdefault("extra", {})["gen_ai.embeddings.dimension.count"] = len(emb)


def _responses_object(info: dict[str, Any], r: dict[str, Any], ex: Exchange) -> None:
    """An OpenAI Responses API ``response`` object (whole, or a stream's created/completed)."""
    model = r.get("model")
    if isinstance(model, str) and model:
        info["rmodel"] = model[:256]
    if isinstance(r.get("id"), str):
        info["id"] = r["id"][:256]
    status = r.get("status")
    if status == "completed":
        info["finish"] = ["stop"]
    elif status == "incomplete":
        d = r.get("incomplete_details")
        reason = d.get("reason") if isinstance(d, dict) else None
        info["finish"] = [reason if isinstance(reason, str) else "incomplete"]
    elif status == "failed":
        info["error"] = _error_type(r) or "failed"
    _usage(info, r.get("usage"), "input_tokens", "output_tokens")
    if ex.enricher.config.genai.capture_content and status in ("completed", "incomplete"):
        texts = []
        for item in r.get("output") or []:
            if isinstance(item, dict):
                for part in item.get("content") or []:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        texts.append(part["text"])
        if texts and not info.get("text"):
            _append_text(info, "".join(texts), ex)


def _anthropic_message(info: dict[str, Any], msg: dict[str, Any], ex: Exchange) -> None:
    model = msg.get("model")
    if isinstance(model, str) and model:
        info["rmodel"] = model[:256]
    if isinstance(msg.get("id"), str):
        info["id"] = msg["id"][:256]
    if isinstance(msg.get("stop_reason"), str):
        info["finish"] = [msg["stop_reason"]]
    _usage(info, msg.get("usage"), "input_tokens", "output_tokens")
    u = msg.get("usage")
    if isinstance(u, dict):
        for key, attr in (("cache_read_input_tokens", "gen_ai.usage.cache_read.input_tokens"),
                          ("cache_creation_input_tokens", "gen_ai.usage.cache_creation.input_tokens")):
            if isinstance(u.get(key), int):
                info.setdefault("extra", {})[attr] = u[key]
    if ex.enricher.config.genai.capture_content:
        for part in msg.get("content") or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                _append_text(info, part["text"], ex)


def _usage(info: dict[str, Any], u: Any, inp: str, out: str) -> None:
    if not isinstance(u, dict):
        return
    i, o = u.get(inp), u.get(out)
    if isinstance(i, int) and not isinstance(i, bool):
        info["in"] = i
    if isinstance(o, int) and not isinstance(o, bool):
        info["out"] = o
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        info.setdefault("extra", {})["gen_ai.usage.cache_read.input_tokens"] = details["cached_tokens"]


def _error_type(v: dict[str, Any]) -> str | None:
    e = v.get("error")
    if isinstance(e, dict):
        for key in ("type", "code"):
            t = e.get(key)
            if isinstance(t, str) and t:
                return t[:128]
    return None


def _append_text(info: dict[str, Any], text: str, ex: Exchange) -> None:
    if not ex.enricher.config.genai.capture_content:
        return
    limit = ex.enricher.config.genai.max_content_chars
    cur = info.get("text", "")
    if len(cur) < limit:
        info["text"] = (cur + text)[:limit]


def _request_content(info: dict[str, Any], body: dict[str, Any], provider: str, limit: int) -> None:
    """Prompts as the conventions' ``gen_ai.input.messages`` JSON (role and text parts)."""
    msgs: list[dict[str, Any]] = []
    system: list[dict[str, Any]] = []
    raw = body.get("messages")
    if raw is None and isinstance(body.get("input"), (str, list)):
        raw = body["input"] if isinstance(body["input"], list) else [{"role": "user", "content": body["input"]}]
    if raw is None and isinstance(body.get("prompt"), str):
        raw = [{"role": "user", "content": body["prompt"]}]
    if isinstance(raw, list):
        for m in raw[:256]:
            if not isinstance(m, dict):
                if isinstance(m, str):
                    msgs.append({"role": "user", "parts": [{"type": "text", "content": m}]})
                continue
            role = m.get("role") if isinstance(m.get("role"), str) else "user"
            parts = _parts(m.get("content"))
            if role in ("system", "developer"):
                system.extend(parts)
            else:
                msgs.append({"role": role, "parts": parts})
    sysval = body.get("system") if provider == "anthropic" else body.get("instructions")
    if isinstance(sysval, (str, list)):
        system.extend(_parts(sysval))
    if msgs:
        info["input"] = json.dumps(msgs, ensure_ascii=False)[:limit]
    if system:
        info["system"] = json.dumps(system, ensure_ascii=False)[:limit]


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    out = []
    if isinstance(content, list):
        for p in content[:64]:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                out.append({"type": "text", "content": p["text"]})
            elif isinstance(p, dict) and isinstance(p.get("type"), str):
                out.append({"type": p["type"]})
    return out


# -- the span -----------------------------------------------------------------------------------
def apply(ex: Exchange, span: Span, emit: Any) -> str | None:
    info = ex.info
    if ex.sse is None:
        v = ex.response_json()
        if isinstance(v, dict):
            if info.get("provider") == "anthropic":
                if v.get("type") == "error":
                    info["error"] = _error_type(v) or "error"
                else:
                    _anthropic_message(info, v, ex)
            elif info["op"] == "chat" and ex.path.rstrip("/").endswith("/responses"):
                if v.get("error"):
                    info["error"] = _error_type(v) or "error"
                _responses_object(info, v, ex)
            elif v.get("error"):
                info["error"] = _error_type(v) or "error"
            else:
                _chat_object(info, v, ex)
        else:
            prefix = info.pop("_resp_prefix", None)
            if prefix:
                top = top_level(prefix, ("model", "id"))
                if isinstance(top.get("model"), str):
                    info["rmodel"] = top["model"][:256]
                if isinstance(top.get("id"), str):
                    info["id"] = top["id"][:256]
            tail = info.pop("_resp_tail", None)
            if tail:
                u = object_after(tail, b"usage")
                if u is not None:
                    _usage(info, u, "prompt_tokens", "completion_tokens")
                    _usage(info, u, "input_tokens", "output_tokens")
                if "rmodel" not in info:
                    m = top_level(b"{" + tail[tail.find(b'"model"'):], ("model",)) if b'"model"' in tail else {}
                    if isinstance(m.get("model"), str):
                        info["rmodel"] = m["model"][:256]
    a = span.attributes
    op = info["op"]
    a["gen_ai.operation.name"] = op
    a["gen_ai.provider.name"] = info["provider"]
    model = info.get("model")
    if model:
        a["gen_ai.request.model"] = model
    for k, v2 in info.get("req", {}).items():
        a[k] = v2
    if info.get("rmodel"):
        a["gen_ai.response.model"] = info["rmodel"]
    if info.get("id"):
        a["gen_ai.response.id"] = info["id"]
    fins = info.get("finish")
    if fins is None and info.get("finish_by_index"):
        fins = [f for _i, f in sorted(info["finish_by_index"].items(), key=lambda kv: str(kv[0]))]
    if fins:
        a["gen_ai.response.finish_reasons"] = fins
    if "in" in info:
        a["gen_ai.usage.input_tokens"] = info["in"]
    if "out" in info and op != "embeddings":
        a["gen_ai.usage.output_tokens"] = info["out"]
    for k, v2 in info.get("extra", {}).items():
        a.setdefault(k, v2)
    if info.get("input"):
        a["gen_ai.input.messages"] = info["input"]
    if info.get("system"):
        a["gen_ai.system_instructions"] = info["system"]
    if info.get("text"):
        out_msg = {"role": "assistant", "parts": [{"type": "text", "content": info["text"]}]}
        if fins:
            out_msg["finish_reason"] = fins[0]
        a["gen_ai.output.messages"] = json.dumps([out_msg], ensure_ascii=False)[
            :ex.enricher.config.genai.max_content_chars]
    err = info.get("error")
    if err is not None:
        a["error.type"] = err
        span.status_code = StatusCode.ERROR
    elif span.status_code == StatusCode.ERROR and "error.type" not in a:
        a["error.type"] = str(ex.status)
    span.name = f"{op} {model}" if model else op
    return "ok"
