"""Route templating (processors/routes.py): heuristics, user patterns, and spans named by route."""

from __future__ import annotations

import random
import uuid

import pytest
from pydantic import ValidationError

from processors.routes import Routes, RoutesConfig, apply_route, heuristic_route
from service.model import Span, SpanKind


@pytest.mark.parametrize("path,route", [
    ("/", "/"),
    ("", "/"),
    ("/users/123", "/users/{id}"),
    ("/users/123/orders/", "/users/{id}/orders"),
    ("/api/v1/items/550e8400-e29b-41d4-a716-446655440000", "/api/v1/items/{uuid}"),
    ("/api/v1/items/550e8400e29b41d4a716446655440000/x", "/api/v1/items/{uuid}/x"),
    ("/blob/deadbeef12", "/blob/{hex}"),
    ("/t/eyJhbGciOiJIUzI1NiJ9abc", "/t/{token}"),
    ("/orders/ord12345", "/orders/{id}"),
    ("/v2/api2/oauth2/s3", "/v2/api2/oauth2/s3"),           # versions and names with a digit stay
    ("/static/app.3f9a8b7c.js", "/static/app.3f9a8b7c.js"),  # file names stay
    ("/js/jquery-3.6.0.min.js", "/js/jquery-3.6.0.min.js"),
    ("/img/100003.png", "/img/{id}.png"),                     # unless an id names them
    ("/doc/550e8400-e29b-41d4-a716-446655440000.json", "/doc/{uuid}.json"),
    ("/search/hello", "/search/hello"),
    ("/a/b/c/d/e/f/g/h/i/j/k/l", "/a/b/c/d/e/f/g/h/i/j/*"),
])
def test_heuristic(path: str, route: str) -> None:
    assert heuristic_route(path) == route


def test_100k_numeric_ids_give_a_handful_of_routes() -> None:
    rng = random.Random(7)
    shapes = ["/users/{}", "/users/{}/orders", "/orders/{}/items/{}", "/files/{}", "/health"]
    r = Routes()
    routes = set()
    for i in range(100_000):
        shape = shapes[i % len(shapes)]
        routes.add(r.route(shape.format(rng.randrange(10**9), uuid.UUID(int=rng.getrandbits(128)))))
    assert routes == {"/users/{id}", "/users/{id}/orders", "/orders/{id}/items/{uuid}", "/files/{id}", "/health"}


def test_patterns_first_then_unmatched() -> None:
    r = Routes(RoutesConfig(patterns=["/users/{id}/orders", "/files/**", "/x/:name", "/x/*/y", "/docs/{rest...}"],
                            unmatched="unset"))
    assert r.route("/users/9/orders") == "/users/{id}/orders"
    assert r.route("/users/9/orders/") == "/users/{id}/orders"
    assert r.route("/users/9") is None
    assert r.route("/files") == "/files/**" and r.route("/files/a/b/c") == "/files/**"
    assert r.route("/x/1") == "/x/:name" and r.route("/x/1/y") == "/x/*/y"
    assert r.route("/docs/a/b") == "/docs/{rest...}"
    assert Routes(RoutesConfig(patterns=["/users/{id}"], unmatched="heuristic")).route("/a/77") == "/a/{id}"
    assert Routes(RoutesConfig(unmatched="path")).route("/a/77") == "/a/77"
    assert Routes(RoutesConfig(unmatched="wildcard")).route("/a/77") == "/**"


@pytest.mark.parametrize("bad,msg", [
    ({"patterns": ["users/{id}"]}, "must start with /"),
    ({"patterns": ["/a/**/b"]}, "must be the last segment"),
    ({"unmatched": "guess"}, "Input should be"),
    ({"max_segment": 3}, "Extra inputs"),
])
def test_config_errors(bad: dict, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        RoutesConfig.model_validate(bad)


def test_apply_route_names_the_span() -> None:
    r = Routes()
    s = Span("GET", SpanKind.SERVER, 0, 1, {"http.request.method": "GET", "url.path": "/users/42"})
    apply_route(r, s)
    assert s.name == "GET /users/{id}" and s.attributes["http.route"] == "/users/{id}"
    other = Span("HTTP", SpanKind.SERVER, 0, 1, {"http.request.method": "_OTHER", "url.path": "/a/1"})
    apply_route(r, other)
    assert other.name == "HTTP /a/{id}"
    kept = Span("GET /given", SpanKind.SERVER, 0, 1, {"http.request.method": "GET", "url.path": "/x/1",
                                                     "http.route": "/x/:id"})
    apply_route(r, kept)
    assert kept.name == "GET /given" and kept.attributes["http.route"] == "/x/:id"
    grpc = Span("svc/M", SpanKind.SERVER, 0, 1, {"rpc.system.name": "grpc", "url.path": "/svc/M"})
    apply_route(r, grpc)
    assert "http.route" not in grpc.attributes


def test_protocols_stage_names_http_spans_by_route(tmp_path) -> None:
    """A real capture through the protocols stage: GET /users/{id} instead of GET (and the option off)."""
    from bench.gen_http_capture import generate
    from tests.support.replay import replay_spans

    cap = tmp_path / "c.pcap"
    generate(str(cap), connections=2, requests=10)
    spans = replay_spans(cap)
    names = {s.name for s in spans}
    assert "GET /api/v1/users/{id}" in names and "GET /api/v1/items/{id}/reviews" in names, names
    assert all(s.attributes["http.route"] for s in spans)
    off = replay_spans(cap, {"routes": {"unmatched": "unset"}})
    assert {s.name for s in off} == {"GET"} and not any("http.route" in s.attributes for s in off)
