"""A scripted HTTP/1.1 responder speaking the documented wire formats of the OpenAI API
(chat/completions plain and streamed, embeddings, responses), the Anthropic Messages API
(plain and streamed), GraphQL over HTTP and the Elasticsearch REST API, for the enrichers'
tests (tests/test_enrich.py).

No real server of these can run here (they are hosted services, or a JVM server Debian does
not package), so the bytes the *clients* send are the real ones (the ``openai``,
``anthropic`` and ``elasticsearch`` libraries, httpx) and the answers are written from the
APIs' published references: field names, SSE event sequences, headers
(``X-Elastic-Product``, ``Content-Type: application/vnd.elasticsearch+json``). The MCP
tests use the real ``mcp`` server (MCPServer over uvicorn) instead.

``Responder.encoding`` (None, "gzip", "br", "zstd") compresses the JSON answers when the
client accepts that coding, so decoding is exercised on the real clients' traffic.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

__all__ = ["Responder", "responder", "h2_responder"]


def _compress(data: bytes, enc: str) -> bytes:
    if enc == "gzip":
        return gzip.compress(data)
    if enc == "br":
        import brotli
        return brotli.compress(data)
    if enc == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    return data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    encoding: ClassVar[str | None] = None

    def log_message(self, *a: Any) -> None:
        pass

    # -- plumbing ------------------------------------------------------------------------
    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _json(self, code: int, obj: Any, ctype: str = "application/json", extra: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        enc = self.encoding
        accepted = self.headers.get("Accept-Encoding", "")
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if enc and enc in accepted:
            data = _compress(data, enc)
            self.send_header("Content-Encoding", enc)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[tuple[str | None, Any]]) -> None:
        """An SSE body in chunked coding, each event its own chunk (as the APIs stream)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for name, data in events:
            text = (f"event: {name}\n" if name else "") + "data: " + (
                data if isinstance(data, str) else json.dumps(data))
            chunk = (text + "\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    # -- routes --------------------------------------------------------------------------
    def do_POST(self) -> None:
        body = self._body()
        p = self.path.split("?")[0]
        if p.endswith("/chat/completions"):
            return self._chat(body)
        if p.endswith("/embeddings"):
            return self._embeddings(body)
        if p.endswith("/responses"):
            return self._responses(body)
        if p.endswith("/messages"):
            return self._anthropic(body)
        if p.endswith("/graphql"):
            return self._graphql(body)
        return self._es("POST", body)

    def do_PUT(self) -> None:
        self._es("PUT", self._body())

    def do_GET(self) -> None:
        if self.path.split("?")[0].endswith("/graphql"):
            return self._graphql(None)
        self._es("GET", None)

    def do_HEAD(self) -> None:
        self._es("HEAD", None)

    def do_DELETE(self) -> None:
        self._es("DELETE", None)

    # OpenAI: https://platform.openai.com/docs/api-reference/chat/object (and .../chunk)
    def _chat(self, body: dict[str, Any]) -> None:
        model = body.get("model", "")
        if model == "no-such-model":
            return self._json(404, {"error": {"message": f"The model `{model}` does not exist", "type":
                                              "invalid_request_error", "param": None, "code": "model_not_found"}})
        rmodel = model + "-2024-08-06"
        if body.get("stream"):
            chunks: list[tuple[str | None, Any]] = []
            for i, piece in enumerate(["Hel", "lo", "!"]):
                chunks.append((None, {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1,
                                      "model": rmodel, "system_fingerprint": "fp_1",
                                      "choices": [{"index": 0, "delta": ({"role": "assistant", "content": piece}
                                                                         if i == 0 else {"content": piece}),
                                                   "logprobs": None, "finish_reason": None}]}))
            chunks.append((None, {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1,
                                  "model": rmodel, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                                "finish_reason": "stop"}]}))
            if (body.get("stream_options") or {}).get("include_usage"):
                chunks.append((None, {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1,
                                      "model": rmodel, "choices": [],
                                      "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}))
            chunks.append((None, "[DONE]"))
            return self._sse(chunks)
        self._json(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": rmodel,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there", "refusal": None},
                         "logprobs": None, "finish_reason": "length" if body.get("max_tokens") == 2 else "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
            "system_fingerprint": "fp_44709d6fcb", "service_tier": "default"})

    # https://platform.openai.com/docs/api-reference/embeddings/object
    def _embeddings(self, body: dict[str, Any]) -> None:
        vec = [0.25] * 8
        emb: Any = vec
        if body.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack("<8f", *vec)).decode()
        self._json(200, {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": emb}],
                         "model": body.get("model"), "usage": {"prompt_tokens": 4, "total_tokens": 4}})

    # https://platform.openai.com/docs/api-reference/responses/object
    def _responses(self, body: dict[str, Any]) -> None:
        resp = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
                "model": body.get("model", "") + "-2025-04-14", "error": None, "incomplete_details": None,
                "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hi!", "annotations": []}]}],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "usage": {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 9}}
        if body.get("stream"):
            created = dict(resp, status="in_progress", output=[], usage=None)
            item = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": []}
            ev: list[tuple[str, dict[str, Any]]] = [
                ("response.created", {"response": created}),
                ("response.in_progress", {"response": created}),
                ("response.output_item.added", {"output_index": 0, "item": item}),
                ("response.content_part.added", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                 "part": part}),
                ("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                "delta": "Hi!", "logprobs": []}),
                ("response.output_text.done", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                               "text": "Hi!", "logprobs": []}),
                ("response.content_part.done", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                "part": dict(part, text="Hi!")}),
                ("response.output_item.done", {"output_index": 0, "item": resp["output"][0]}),  # type: ignore[index]
                ("response.completed", {"response": resp})]
            return self._sse([(n, dict(e, type=n, sequence_number=i)) for i, (n, e) in enumerate(ev)])
        self._json(200, resp)

    # Anthropic: https://docs.anthropic.com/en/api/messages and .../messages-streaming
    def _anthropic(self, body: dict[str, Any]) -> None:
        model = body.get("model", "")
        if model == "no-such-model":
            return self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                                "message": f"model: {model}"}})
        msg = {"id": "msg_01", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": "Hi, I'm Claude."}], "stop_reason": "end_turn",
               "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 6,
                                                "cache_read_input_tokens": 0}}
        if body.get("stream"):
            start = dict(msg, content=[], stop_reason=None, usage={"input_tokens": 12, "output_tokens": 1})
            return self._sse([
                ("message_start", {"type": "message_start", "message": start}),
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
                ("ping", {"type": "ping"}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": "Hi, "}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": "I'm Claude."}}),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens",
                                                                      "stop_sequence": None},
                                   "usage": {"output_tokens": 6}}),
                ("message_stop", {"type": "message_stop"})])
        self._json(200, msg)

    # GraphQL over HTTP: {"data": ...} or {"errors": [...], "data": null}
    def _graphql(self, body: Any) -> None:
        q = (body or {}).get("query", "") if isinstance(body, dict) else ""
        if "broken" in q:
            return self._json(200, {"errors": [{"message": "Cannot query field 'broken'",
                                                "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}}],
                                    "data": None})
        self._json(200, {"data": {"book": {"title": "Dune"}}})

    # Elasticsearch REST API (https://www.elastic.co/docs/api/doc/elasticsearch/), 8.x/9.x headers
    def _es(self, method: str, body: Any) -> None:
        ctype = "application/vnd.elasticsearch+json;compatible-with=9"
        extra = {"X-Elastic-Product": "Elasticsearch"}
        p = [s for s in self.path.split("?")[0].split("/") if s]
        if method == "HEAD":
            self.send_response(200)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not p:
            return self._json(200, {"name": "node-1", "cluster_name": "test", "version": {"number": "9.1.0"},
                                    "tagline": "You Know, for Search"}, ctype, extra)
        if p[0] == "nope":
            return self._json(404, {"error": {"root_cause": [{"type": "index_not_found_exception",
                                                              "reason": "no such index [nope]"}],
                                              "type": "index_not_found_exception", "reason": "no such index [nope]",
                                              "index": "nope"}, "status": 404}, ctype, extra)
        if len(p) == 1 and method == "PUT":
            return self._json(200, {"acknowledged": True, "shards_acknowledged": True, "index": p[0]}, ctype, extra)
        if len(p) >= 2 and p[1] == "_doc":
            if method == "GET":
                if p[2:] == ["missing"]:
                    return self._json(404, {"_index": p[0], "_id": "missing", "found": False}, ctype, extra)
                return self._json(200, {"_index": p[0], "_id": p[2], "_version": 1, "_seq_no": 0,
                                        "_primary_term": 1, "found": True, "_source": {"title": "Dune"}}, ctype, extra)
            return self._json(201, {"_index": p[0], "_id": p[2] if len(p) > 2 else "gen1", "_version": 1,
                                    "result": "created", "_shards": {"total": 1, "successful": 1, "failed": 0},
                                    "_seq_no": 0, "_primary_term": 1}, ctype, extra)
        if p[-1] == "_search":
            return self._json(200, {"took": 1, "timed_out": False,
                                    "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
                                    "hits": {"total": {"value": 1, "relation": "eq"}, "max_score": 1.0,
                                             "hits": [{"_index": p[0], "_id": "1", "_score": 1.0,
                                                       "_source": {"title": "Dune"}}]}}, ctype, extra)
        if p[-1] == "_bulk":
            return self._json(200, {"took": 1, "errors": False, "items": []}, ctype, extra)
        self._json(200, {"acknowledged": True}, ctype, extra)


class Responder:
    """The responder on a free loopback port, served from a thread."""

    def __init__(self, encoding: str | None = None) -> None:
        handler = type("H", (_Handler,), {"encoding": encoding})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_encoding(self, enc: str | None) -> None:
        self.server.RequestHandlerClass.encoding = enc  # type: ignore[attr-defined]


@contextlib.contextmanager
def responder(encoding: str | None = None) -> Iterator[Responder]:
    r = Responder(encoding)
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


# -- HTTP/2 (prior knowledge), the real h2 state machine: chat/completions and GraphQL -----------------
def _h2_answer(path: str, body: Any) -> tuple[list[tuple[str, str]], list[bytes]]:
    """(response headers, DATA payloads) for one HTTP/2 request, in the formats above."""
    if path.endswith("/chat/completions"):
        model = body.get("model", "") + "-2024-08-06"
        if body.get("stream"):
            chunks = [{"id": "chatcmpl-h2", "object": "chat.completion.chunk", "model": model,
                       "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in ("a", "b")]
            chunks.append({"id": "chatcmpl-h2", "object": "chat.completion.chunk", "model": model,
                           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            chunks.append({"id": "chatcmpl-h2", "object": "chat.completion.chunk", "model": model, "choices": [],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
            data = [b"data: %s\n\n" % json.dumps(c).encode() for c in chunks] + [b"data: [DONE]\n\n"]
            return [(":status", "200"), ("content-type", "text/event-stream")], data
        answer = {"id": "chatcmpl-h2", "object": "chat.completion", "model": model,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
        gz = gzip.compress(json.dumps(answer).encode())
        return [(":status", "200"), ("content-type", "application/json"), ("content-encoding", "gzip")], [gz]
    if path.endswith("/graphql"):
        return [(":status", "200"), ("content-type", "application/json")], [b'{"data": {"book": null}}']
    return [(":status", "404"), ("content-type", "text/plain")], [b"not found"]


def _h2_conn(sock: Any) -> None:
    import h2.config
    import h2.connection
    import h2.events

    with sock:
        sock.settimeout(10)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        reqs: dict[int, tuple[str, bytearray]] = {}
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    hdrs = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                            for k, v in ev.headers}
                    reqs[ev.stream_id] = (hdrs.get(":path", ""), bytearray())
                elif isinstance(ev, h2.events.DataReceived):
                    reqs[ev.stream_id][1].extend(ev.data)
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    path, body = reqs.pop(ev.stream_id)
                    headers, payloads = _h2_answer(path, json.loads(body) if body else {})
                    conn.send_headers(ev.stream_id, headers)
                    for i, p in enumerate(payloads):
                        conn.send_data(ev.stream_id, p, end_stream=i == len(payloads) - 1)
                        sock.sendall(conn.data_to_send())
            out = conn.data_to_send()
            if out:
                sock.sendall(out)


@contextlib.contextmanager
def h2_responder() -> Iterator[int]:
    """An HTTP/2 (prior knowledge) responder on a free loopback port; yields the port."""
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def loop() -> None:
        while True:
            try:
                s, _a = srv.accept()
            except OSError:
                return
            threading.Thread(target=_h2_conn, args=(s,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield port
    finally:
        srv.close()
