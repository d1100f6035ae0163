"""GraphQL over HTTP (the GraphQL-over-HTTP draft: POST JSON ``{query, operationName,
variables}``, or GET with ``?query=``), as the OpenTelemetry GraphQL conventions name it
(graphql-spans.md, Development): ``graphql.operation.type`` (query, mutation,
subscription), ``graphql.operation.name``, the span named ``{type}`` (``{type} {name}`` by
option), ``graphql.document`` only by option. The operation is found by a one-pass scan of
the document's top level (strings, block strings and comments skipped; depth counted), so
a hostile document costs linear time. A response with ``errors`` and no ``data`` is an error.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from processors.protocols.enrich.body import top_level
from service.model import Span, StatusCode

if TYPE_CHECKING:
    from processors.protocols.enrich import Exchange

NAME = "graphql"
NEEDS_REQUEST_BODY = True

# Possessive quantifiers: an unterminated string is linear time, constant memory.
_TOKEN = re.compile(r'#[^\n\r]*+|"""(?:[^"\\]++|\\.|"(?!""))*+(?:"""|\Z)|"(?:[^"\\\n]++|\\.)*+"?|[{}()]'
                    r'|[_A-Za-z][_0-9A-Za-z]*+|[^\s,{}()#"_A-Za-z]++|[\s,]++')
_OPS = frozenset({"query", "mutation", "subscription"})
#: Top-level definitions looked at in one document.
MAX_DEFINITIONS = 1000


def operations(doc: str) -> list[tuple[str, str | None]]:
    """The operation definitions of a document: (type, name or None), in order."""
    out: list[tuple[str, str | None]] = []
    depth = 0
    paren = 0  # variable definitions at depth 0 may hold object defaults: their braces are not a body
    pending: str | None = None  # an operation keyword seen at depth 0, waiting for its name
    named = False
    for m in _TOKEN.finditer(doc):
        t = m.group()
        c = t[0]
        if c == "(":
            paren += 1
        elif c == ")":
            paren = max(0, paren - 1)
        elif paren:
            continue
        elif c == "{":
            if depth == 0:
                if pending is not None:
                    if not named:
                        out.append((pending, None))
                elif not named:
                    out.append(("query", None))  # the shorthand: an anonymous query
                pending = None
                named = False
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        elif depth == 0 and (c.isalpha() or c == "_"):
            if pending is not None and not named:
                out.append((pending, t))
                named = True
            elif t in _OPS and not named:
                pending = t
            elif t == "fragment":
                named = True  # a fragment's braces are not an operation
                pending = None
        if len(out) >= MAX_DEFINITIONS:
            break
    return out


def resolve(ex: Exchange) -> bool:
    doc: Any = None
    opname: Any = None
    if ex.method == "GET":
        qs = parse_qs(ex.query, max_num_fields=64)
        doc = (qs.get("query") or [None])[0]
        opname = (qs.get("operationName") or [None])[0]
    else:
        body = ex.request_json()
        if body is None:
            prefix = ex.info.pop("_req_prefix", None)
            body = top_level(prefix, ("query", "operationName")) if prefix else None
        if isinstance(body, list) and body and isinstance(body[0], dict):
            ex.info["batch"] = len(body)
            body = body[0]
        if not isinstance(body, dict):
            return False
        doc = body.get("query")
        opname = body.get("operationName")
        if doc is None and isinstance(body.get("extensions"), dict) and "persistedQuery" in body["extensions"]:
            doc = ""  # an Automatic Persisted Query: the hash only
    if not isinstance(doc, str):
        return False
    ops = operations(doc[:ex.enricher.config.max_decoded_bytes])
    op: tuple[str, str | None] | None = None
    if isinstance(opname, str) and opname:
        op = next((o for o in ops if o[1] == opname), None) or (ops[0][0] if ops else "query", opname)
    elif ops:
        op = ops[0]
    elif doc == "":
        op = ("query", None)  # a persisted query answered by id: a query unless said otherwise
    if op is None:
        return False
    ex.info["type"], ex.info["name"] = op
    if ex.enricher.config.graphql.capture_document and doc:
        ex.info["doc"] = doc[:16 * 1024]
    return True


def response(ex: Exchange) -> bool:
    return True  # errors without data make the span an error


def apply(ex: Exchange, span: Span, emit: Any) -> str:
    a = span.attributes
    info = ex.info
    a["graphql.operation.type"] = info["type"]
    if info.get("name"):
        a["graphql.operation.name"] = info["name"][:256]
    if info.get("doc"):
        a["graphql.document"] = info["doc"]
    v = ex.response_json()
    if isinstance(v, dict):
        errs = v.get("errors")
        if isinstance(errs, list) and errs and v.get("data") is None:
            code = None
            e0 = errs[0]
            if isinstance(e0, dict) and isinstance(e0.get("extensions"), dict):
                c = e0["extensions"].get("code")
                code = c[:128] if isinstance(c, str) else None
            a["error.type"] = code or "GraphQLError"
            span.status_code = StatusCode.ERROR
    if ex.enricher.config.graphql.name_with_operation and info.get("name"):
        span.name = f"{info['type']} {info['name'][:256]}"
    else:
        span.name = info["type"]
    return "ok"
