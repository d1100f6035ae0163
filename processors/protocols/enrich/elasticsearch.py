"""Elasticsearch and OpenSearch REST calls, as the OpenTelemetry Elasticsearch conventions
name them (database/elasticsearch.md, Development): ``db.system.name`` (``elasticsearch`` or
``opensearch``), ``db.operation.name`` = the endpoint id of the REST API specification
(``search``, ``index``, ``bulk``, ``indices.create``, ``cat.indices`` ...) from method and
path, the index as ``db.collection.name`` and ``db.operation.parameter.index`` (the document id
as ``db.operation.parameter.id``), ``db.response.status_code`` = the HTTP status, the span
named ``{db.operation.name} {db.collection.name}``.

Selected by a ``/_api`` path segment or an official client's User-Agent; taken only when
confirmed: a client's headers (``X-Elastic-Client-Meta``, its User-Agent) or the server's
``X-Elastic-Product: Elasticsearch`` (every Elasticsearch since 7.14 sends it). Bodies are
read only for an error's ``error.type`` (``index_not_found_exception``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from service.model import Span, StatusCode

if TYPE_CHECKING:
    from processors.protocols.enrich import Exchange

NAME = "elasticsearch"
NEEDS_REQUEST_BODY = False

# Endpoints whose path is "/{index}/_{api}[/{id}]" or "/_{api}": api -> endpoint id, per method.
_DOC_API = {
    "_search": "search", "_msearch": "msearch", "_count": "count", "_bulk": "bulk", "_mget": "mget",
    "_delete_by_query": "delete_by_query", "_update_by_query": "update_by_query", "_explain": "explain",
    "_field_caps": "field_caps", "_validate": "indices.validate_query", "_refresh": "indices.refresh",
    "_flush": "indices.flush", "_forcemerge": "indices.forcemerge", "_open": "indices.open",
    "_close": "indices.close", "_stats": "indices.stats", "_settings": "indices.get_settings",
    "_mapping": "indices.get_mapping", "_alias": "indices.get_alias", "_aliases": "indices.update_aliases",
    "_search_shards": "search_shards", "_rank_eval": "rank_eval", "_termvectors": "termvectors",
    "_mtermvectors": "mtermvectors", "_knn_search": "knn_search", "_async_search": "async_search.submit",
    "_eql": "eql.search", "_terms_enum": "terms_enum", "_pit": "open_point_in_time", "_rollover": "indices.rollover",
    "_clone": "indices.clone", "_shrink": "indices.shrink", "_split": "indices.split",
}
_PUT_OVERRIDES = {"_settings": "indices.put_settings", "_mapping": "indices.put_mapping",
                  "_alias": "indices.put_alias"}
# Top-level namespaces: "/_{ns}/{api}" -> "{ns}.{api}" (cat.indices, cluster.health, nodes.stats ...).
_NAMESPACES = frozenset({"_cat", "_cluster", "_nodes", "_snapshot", "_ingest", "_tasks", "_security", "_ml",
                         "_ilm", "_license", "_xpack", "_transform", "_sql", "_index_template", "_component_template",
                         "_data_stream", "_enrich", "_ccr", "_slm", "_watcher", "_query", "_inference",
                         "_plugins", "_opendistro"})
_GLOBAL = {"_search": "search", "_msearch": "msearch", "_bulk": "bulk", "_count": "count", "_mget": "mget",
           "_refresh": "indices.refresh", "_stats": "indices.stats", "_aliases": "indices.update_aliases",
           "_mapping": "indices.get_mapping", "_settings": "indices.get_settings", "_sql": "sql.query",
           "_analyze": "indices.analyze", "_reindex": "reindex", "_scripts": "get_script",
           "_pit": "close_point_in_time",
           "_render": "render_search_template", "_field_caps": "field_caps", "_template": "indices.get_template",
           "_query": "esql.query"}


def endpoint(method: str, path: str) -> tuple[str, str | None, str | None] | None:
    """(endpoint id, index, document id) for a REST path, or None when it is no API path."""
    segs = [unquote(s) for s in path.split("/") if s][:8]
    if not segs:
        return ("info" if method != "HEAD" else "ping", None, None)
    first = segs[0]
    if first.startswith("_"):
        if first == "_search" and len(segs) > 1 and segs[1] == "scroll":
            return ("clear_scroll" if method == "DELETE" else "scroll", None, None)
        if first == "_search" and len(segs) > 1 and segs[1] == "template":
            return ("search_template", None, None)
        if first in _NAMESPACES and len(segs) > 1:
            api = segs[1].lstrip("_") or segs[1]
            return (f"{first[1:]}.{api}", None, None)
        if first in _NAMESPACES:
            return (first[1:], None, None)
        eid = _GLOBAL.get(first)
        if eid is None:
            return None
        if first == "_scripts" and method in ("PUT", "POST"):
            eid = "put_script"
        return (eid, None, None)
    index = first
    if len(segs) == 1:
        return ({"PUT": "indices.create", "DELETE": "indices.delete", "HEAD": "indices.exists",
                 "GET": "indices.get"}.get(method, "indices.get"), index, None)
    api = segs[1]
    doc_id = segs[2] if len(segs) > 2 else None
    if api == "_doc":
        if method == "GET":
            eid = "get"
        elif method == "DELETE":
            eid = "delete"
        elif method == "HEAD":
            eid = "exists"
        else:
            eid = "index"
        return (eid, index, doc_id)
    if api == "_create":
        return ("create", index, doc_id)
    if api == "_update":
        return ("update", index, doc_id)
    if api == "_source":
        return ("get_source" if method != "HEAD" else "exists_source", index, doc_id)
    if api in ("_search", "_msearch") and doc_id == "template":
        return ("search_template" if api == "_search" else "msearch_template", index, None)
    if method == "PUT" and api in _PUT_OVERRIDES:
        return (_PUT_OVERRIDES[api], index, None)
    eid = _DOC_API.get(api)
    if eid is None:
        return None
    if api == "_explain":
        return (eid, index, doc_id)
    return (eid, index, None)


def _system(ex: Exchange) -> str | None:
    """elasticsearch / opensearch, or None when nothing confirms either."""
    forced = ex.enricher.config.elasticsearch.system
    ua = ex.ua.lower()
    product = ex.resp_headers.get("x-elastic-product", "")
    if forced != "auto":
        signal = (product or "x-elastic-client-meta" in ex.headers or "elasticsearch" in ua or "opensearch" in ua
                  or "elastic-transport" in ua)
        return forced if signal or ex.resp_headers.get("content-type", "").startswith("application/") else None
    if "opensearch" in ua:
        return "opensearch"
    vnd = ex.headers.get("content-type", "").startswith("application/vnd.elasticsearch")
    if product.lower() == "elasticsearch" or "x-elastic-client-meta" in ex.headers or "elasticsearch" in ua \
            or "elastic-transport" in ua or vnd:
        return "elasticsearch"
    return None


def resolve(ex: Exchange) -> bool:
    ep = endpoint(ex.method, ex.path)
    if ep is None:
        return False
    ex.info["ep"] = ep
    return True


def response(ex: Exchange) -> bool:
    return ex.status >= 400 and _system(ex) is not None  # the error's type is in the body


def apply(ex: Exchange, span: Span, emit: Any) -> str | None:
    system = _system(ex)
    if system is None:
        return None  # an /_api-looking path of something else: left a plain HTTP span
    eid, index, doc_id = ex.info["ep"]
    a = span.attributes
    a["db.system.name"] = system
    a["db.operation.name"] = eid
    if index:
        a["db.collection.name"] = index[:256]
        a["db.operation.parameter.index"] = index[:256]
    if doc_id:
        a["db.operation.parameter.id"] = doc_id[:256]
    if ex.status:
        a["db.response.status_code"] = str(ex.status)
    if ex.status >= 400:
        v = ex.response_json()
        etype = None
        if isinstance(v, dict):
            e = v.get("error")
            if isinstance(e, dict) and isinstance(e.get("type"), str):
                etype = e["type"][:128]
            elif isinstance(e, str):
                etype = e[:128]
        # A 404 of a get/exists is an answer (not found), not a failure of the call.
        if not (ex.status == 404 and eid in ("get", "exists", "indices.exists", "exists_source", "get_source")):
            a["error.type"] = etype or str(ex.status)
            span.status_code = StatusCode.ERROR
    span.name = f"{eid} {index}" if index else eid
    return "ok"
