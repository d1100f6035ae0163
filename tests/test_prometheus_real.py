"""RED metrics end to end: a real Prometheus scrapes wirespan's prometheus exporter while real
traffic runs (nginx + curl, PostgreSQL + psycopg), captured live on loopback (AF_PACKET, root).

``wirespan run`` (a process) captures, makes spans (written to a file: the truth) and, through
the spanmetrics and servicegraph connectors, metrics served on its scrape endpoint; Prometheus
(Debian's, in a temp dir) scrapes it every second. Its HTTP API must return the request counts
and error counts the spans imply, exactly, p50/p99 within the bucket of the spans' own, and
exemplars that name the spans' traces.
"""

from __future__ import annotations

import bisect
import collections
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.spanmetrics import DB_BUCKETS, HTTP_BUCKETS
from tests.support.capture import free_port
from tests.support.nginx import nginx_server
from tests.support.postgres import pg_bin, postgres_server
from tests.support.prometheus_server import PROMETHEUS, prometheus_server
from tests.support.wirespan_proc import wirespan_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the live receiver needs root (AF_PACKET)"),
    pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="Debian's prometheus is not installed"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

psycopg = pytest.importorskip("psycopg")


def wait_until(pred: Any, timeout: float = 45.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: last {last!r}")


def true_quantile(durations: list[float], q: float) -> float:
    s = sorted(durations)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def bucket_of(v: float, bounds: tuple[float, ...]) -> tuple[float, float]:
    i = bisect.bisect_left(bounds, v)
    lo = bounds[i - 1] if i > 0 else 0.0
    hi = bounds[i] if i < len(bounds) else math.inf
    return lo, hi


@pytest.mark.skipif(pg_bin() is None, reason="PostgreSQL is not installed")
def test_prometheus_scrapes_red_metrics_of_real_traffic(tmp_path: Path) -> None:
    prom_port = free_port()
    with nginx_server({"index.html": b"<html>hello</html>\n"}) as web, postgres_server() as pg:
        extra = {
            "connectors": {"spanmetrics": {"metrics_flush_interval": "500ms"},
                           "servicegraph": {"metrics_flush_interval": "500ms", "store": {"ttl": "1s"},
                                            "store_expiration_loop": "500ms"}},
            "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{prom_port}"}},
            "service": {"pipelines": {
                "traces": {"exporters": ["file", "spanmetrics", "servicegraph"]},
                "metrics": {"receivers": ["spanmetrics", "servicegraph"], "exporters": ["prometheus"]}}},
        }
        with prometheus_server([f"127.0.0.1:{prom_port}"]) as prom, \
                wirespan_run(tmp_path, {"live": {"ports": [web.port, pg.port]}}, extra=extra) as w:
            wait_until(prom.targets_up, what="prometheus to scrape wirespan")
            # the workload: curl over keep-alive connections, psycopg on one connection
            urls = ([web.url(f"/api/users/{i}") for i in range(60)] + [web.url(f"/missing/{i}") for i in range(20)]
                    + [web.url("/boom")] * 10 + [web.url("/index.html")] * 10)
            for k in range(0, len(urls), 25):
                args = [a for u in urls[k:k + 25] for a in ("-o", "/dev/null", u)]
                subprocess.run(["curl", "-s", *args], check=True, timeout=60)
            with psycopg.connect(pg.dsn(), autocommit=True) as conn:
                for i in range(30):
                    conn.execute("SELECT %s::int + 1", (i,)).fetchall()
                for _ in range(5):
                    with pytest.raises(psycopg.errors.UndefinedTable):
                        conn.execute("SELECT * FROM no_such_table")
            want_http, want_db = len(urls), 35
            def all_spans() -> list | None:
                got = w.read_spans()
                return got if len(got) >= want_http + want_db else None
            spans = wait_until(all_spans, what="the spans")
            http = [s for s in spans if "http.request.method" in s["attrs"]]
            db = [s for s in spans if s["attrs"].get("db.system.name") == "postgresql"]
            assert len(http) == want_http and len(db) == want_db, collections.Counter(s["name"] for s in spans)

            # request counts per (route, status), exactly as the spans say
            want = collections.Counter((s["attrs"]["http.route"], str(s["attrs"]["http.response.status_code"]))
                                       for s in http)
            assert want == {("/api/users/{id}", "200"): 60, ("/missing/{id}", "404"): 20, ("/boom", "500"): 10,
                            ("/index.html", "200"): 10}

            def counts() -> dict | None:
                r = prom.query("sum by (http_route, http_response_status_code) "
                               "(http_server_request_duration_seconds_count)")
                got = {(x["metric"]["http_route"], x["metric"]["http_response_status_code"]): int(float(x["value"][1]))
                       for x in r}
                return got if got == want else None
            wait_until(counts, what=f"request counts {dict(want)}")
            # errors: the spans in ERROR are the 500s; error.type on their series
            errors = sum(1 for s in http if s["status"] == 2)
            assert errors == 10
            assert prom.scalar('sum(http_server_request_duration_seconds_count{error_type!=""})') == errors
            assert prom.scalar('sum(http_server_request_duration_seconds_count{error_type="500"})') == errors

            # p50 and p99 of one route: within the bucket that holds the spans' own quantile
            durs = [(int(s["end"]) - int(s["start"])) / 1e9 for s in http
                    if s["attrs"]["http.route"] == "/api/users/{id}"]
            for q in (0.5, 0.99):
                est = prom.scalar(f'histogram_quantile({q}, sum by (le) '
                                  f'(http_server_request_duration_seconds_bucket{{http_route="/api/users/{{id}}"}}))')
                lo, hi = bucket_of(true_quantile(durs, q), HTTP_BUCKETS)
                assert est is not None and lo <= est <= hi, (q, est, lo, hi)

            # database: counts and errors
            wait_until(lambda: prom.scalar('sum(db_client_operation_duration_seconds_count'
                                           '{db_system_name="postgresql"})') == want_db, what="db counts")
            db_err = sum(1 for s in db if s["status"] == 2)
            assert db_err == 5
            assert prom.scalar('sum(db_client_operation_duration_seconds_count{db_system_name="postgresql",'
                               'error_type!=""})') == db_err
            ddurs = [(int(s["end"]) - int(s["start"])) / 1e9 for s in db]
            est = prom.scalar("histogram_quantile(0.5, sum by (le) (db_client_operation_duration_seconds_bucket))")
            lo, hi = bucket_of(true_quantile(ddurs, 0.5), DB_BUCKETS)
            assert est is not None and lo <= est <= hi

            # the service graph: the HTTP server's callers (no client spans on a capture: "user")
            # and the database as a virtual node, one request each span
            wait_until(lambda: prom.scalar('sum(traces_service_graph_request_total{connection_type="database"})')
                       == want_db, what="servicegraph database edge")
            assert prom.scalar('sum(traces_service_graph_request_total{client="user"})') == want_http
            assert prom.scalar('sum(traces_service_graph_request_failed_total{connection_type="database"})') == db_err

            # exemplars: trace ids of real spans
            now = time.time()
            ex = prom.query_exemplars("http_server_request_duration_seconds_bucket", now - 600, now + 60)
            ids = {e["labels"]["trace_id"] for series in ex for e in series["exemplars"]}
            assert ids and ids <= {s["trace_id"] for s in spans}
