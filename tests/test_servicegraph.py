"""servicegraph connector: edges from parent/child pairs, peer mapping, virtual nodes, the bounded store."""

from __future__ import annotations

from typing import Any

from connectors.servicegraph import DEFAULT_BUCKETS, ServiceGraphConfig, ServiceGraphConnector
from service import telemetry as tm
from service.model import Resource, Span, SpanKind, StatusCode

FE, BE, CURL = (Resource({"service.name": n}) for n in ("frontend", "backend", "curl"))


def graph(**cfg: Any) -> ServiceGraphConnector:
    return ServiceGraphConnector(f"servicegraph/t{len(cfg)}{id(cfg)}", ServiceGraphConfig.model_validate(cfg))


def values(conn: ServiceGraphConnector) -> dict[str, dict[tuple, Any]]:
    out: dict[str, dict[tuple, Any]] = {}
    for rm in conn.collect():
        for m in rm.metrics:
            for p in m.points:
                key = (p.attributes["client"], p.attributes["server"], p.attributes["connection_type"])
                out.setdefault(m.name, {})[key] = p.value if hasattr(p, "value") else p
    return out


def pair(client_res: Resource, server_res: Resource, error: bool = False) -> list[Span]:
    c = Span("GET", SpanKind.CLIENT, 0, 9_000_000, {"server.address": "be", "server.port": 80}, resource=client_res)
    s = Span("GET /x", SpanKind.SERVER, 1_000_000, 8_000_000, {}, resource=server_res, trace_id=c.trace_id,
             parent_span_id=c.span_id, status_code=StatusCode.ERROR if error else StatusCode.UNSET)
    return [c, s]


def test_parent_child_pairs_make_edges_in_either_order() -> None:
    g = graph()
    a, b = pair(FE, BE), pair(FE, BE, error=True)
    g.consume_spans([a[1], b[0]])      # server half first for one, client first for the other
    g.consume_spans([a[0], b[1]])
    v = values(g)
    edge = ("frontend", "backend", "")
    assert v["traces_service_graph_request_total"] == {edge: 2}
    assert v["traces_service_graph_request_failed_total"] == {edge: 1}
    srv = v["traces_service_graph_request_server_seconds"][edge]
    cli = v["traces_service_graph_request_client_seconds"][edge]
    assert srv.count == cli.count == 2 and srv.bounds == DEFAULT_BUCKETS
    assert srv.sum == 0.014 and abs(cli.sum - 0.018) < 1e-12
    assert g.stats["paired"] == 2 and not g._store


def test_unpaired_halves_settle_at_the_ttl() -> None:
    g = graph(store={"ttl": "1ms"})
    root = Span("GET /", SpanKind.SERVER, 0, 1_000_000, {"server.address": "be", "server.port": 80}, resource=BE)
    # a curl span whose server half never came: mapped by its peer to the service seen serving be:80
    peer = Span("GET", SpanKind.CLIENT, 0, 2_000_000, {"server.address": "be", "server.port": 80}, resource=CURL)
    db = Span("SELECT", SpanKind.CLIENT, 0, 1_000_000,
              {"db.system.name": "postgresql", "server.address": "127.0.0.1", "server.port": 5432}, resource=BE)
    lonely = Span("x", SpanKind.CLIENT, 0, 1, {}, resource=CURL)
    g.consume_spans([root, peer, db, lonely])
    g._expire(float("inf"))
    v = values(g)["traces_service_graph_request_total"]
    assert v == {("user", "backend", "virtual_node"): 1, ("curl", "backend", ""): 1,
                 ("backend", "postgresql", "database"): 1}
    assert g.stats["peer"] == 1 and g.stats["virtual"] == 1 and g.stats["user"] == 1 and g.stats["expired"] == 1


def test_store_is_bounded_and_counted() -> None:
    g = graph(store={"max_items": 10})
    before = tm.counter_value(tm.SERVICEGRAPH_EDGES, connector=g.id, outcome="store_full")
    g.consume_spans([pair(FE, BE)[0] for _ in range(25)])
    assert len(g._store) == 10 and g.stats["store_full"] == 15
    assert tm.counter_value(tm.SERVICEGRAPH_EDGES, connector=g.id, outcome="store_full") - before == 15


def test_dimensions_and_delta() -> None:
    g = graph(dimensions=["http.request.method"], aggregation_temporality="delta")
    c, s = pair(FE, BE)
    c.attributes["http.request.method"] = "GET"
    g.consume_spans([c, s])
    (rm,) = g.collect()
    p = next(m for m in rm.metrics if m.name == "traces_service_graph_request_total").points[0]
    assert p.attributes == {"client": "frontend", "server": "backend", "connection_type": "",
                            "client_http.request.method": "GET"}
    assert g.collect() == []   # delta: nothing new since
