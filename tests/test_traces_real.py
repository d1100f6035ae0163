"""Trace assembly on real processes traced by the ``ebpf`` receiver (root, real kernel).

The application (tests/support/twotier.py) has no tracing library: curl -> a frontend
(thread-per-request, then asyncio) -> a real redis-server on pooled connections, a real
PostgreSQL through psycopg, and a second HTTP service. Every request must be one trace:
curl CLIENT -> frontend SERVER -> {redis CLIENT -> redis SERVER, postgresql CLIENT ->
postgres SERVER, http CLIENT -> backend SERVER}, with no wrong parent ever.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict

import pytest

from processors.protocols.processor import ProtocolsProcessor
from receivers.ebpf import EbpfConfig, EbpfReceiver
from service.model import SpanKind
from service.telemetry import TRACE_UNATTRIBUTED
from tests.support.capture import wait_until
from tests.support.ebpf import needs_ebpf
from tests.support.live_http import SpanSink
from tests.support.postgres import pg_bin
from tests.support.twotier import expected_parents, span_role, two_tier

pytestmark = [needs_ebpf(__name__),
              pytest.mark.skipif(pg_bin() is None or shutil.which("redis-server") is None,
                                 reason="needs Debian's postgresql and redis-server")]
CURL = shutil.which("curl")


def _as_dict(s) -> dict:
    return {"attrs": s.attributes, "kind": SpanKind(s.kind).name, "trace": s.trace_id, "span": s.span_id,
            "parent": s.parent_span_id, "pid": s.resource.attributes.get("process.pid")}


def run_workload(kind: str, n: int = 240, clients: int = 8) -> tuple[dict, dict, object]:
    """``n`` requests from ``clients`` concurrent curl processes; returns the spans by role and
    request number, the stage's assembly stats, and the app."""
    sink = SpanSink()
    stage = ProtocolsProcessor("protocols", {"enabled": ["http", "redis", "postgresql"]}, sink)
    with two_tier(kind) as app:
        rx = EbpfReceiver("ebpf", EbpfConfig(ports=app.ports), stage)
        rx.start()
        try:
            base = f"http://127.0.0.1:{app.frontend_port}/r/"
            procs = [subprocess.Popen([CURL, "-s", "--fail", *[f"{base}{i}" for i in range(c, n, clients)]],
                                      stdout=subprocess.DEVNULL) for c in range(clients)]
            assert all(p.wait(120) == 0 for p in procs)

            def done() -> bool:
                with sink.lock:
                    fe = sum(1 for s in sink.spans if str(s.attributes.get("url.path", "")).startswith("/r/")
                             and s.kind == SpanKind.SERVER)
                return fe >= n

            assert wait_until(done, timeout=30)
        finally:
            rx.shutdown()
            stage.shutdown()
    by: dict = defaultdict(list)
    for s in sink.spans:
        d = _as_dict(s)
        r = span_role(d, app)
        if r is not None:
            by[r].append(d)
    return by, dict(stage.stats.get("traces", {})), app


def score(by: dict, n: int) -> tuple[int, int, list]:
    """(right, wrong, missing): every expected parent link of every request."""
    right, wrong, missing = 0, 0, []
    for i in range(n):
        for role, prole in expected_parents.items():
            kids, parents = by.get((role, i), []), by.get((prole, i), [])
            if len(kids) != 1 or len(parents) != 1:
                missing.append((role, i, len(kids), len(parents)))
                continue
            k, p = kids[0], parents[0]
            if k["parent"] == p["span"] and k["trace"] == p["trace"]:
                right += 1
            elif k["parent"]:
                wrong += 1
            else:
                missing.append((role, i, "root"))
    return right, wrong, missing


def test_thread_per_request_frontend_every_request_is_one_trace() -> None:
    n = 240
    by, stats, _ = run_workload("threaded", n)
    right, wrong, missing = score(by, n)
    total = n * len(expected_parents)
    assert wrong == 0, (wrong, stats)
    assert right >= 0.995 * total, (right, total, missing[:20], stats)
    # one trace per request, each with all eight spans
    traces = {by[("curl", i)][0]["trace"] for i in range(n) if by.get(("curl", i))}
    assert len(traces) >= 0.995 * n


def test_asyncio_frontend_never_a_wrong_parent_and_the_rest_counted() -> None:
    n = 160
    before = sum(TRACE_UNATTRIBUTED.labels(processor="protocols", reason=r)._value.get()
                 for r in ("concurrent_requests", "request_on_other_thread"))
    by, stats, _ = run_workload("asyncio", n)
    right, wrong, missing = score(by, n)
    assert wrong == 0, (wrong, stats)
    # Cross-process links (curl -> frontend, each call -> its server) never depend on threads.
    cross = {"fe", "redis", "pg", "be"}
    cross_right = sum(1 for i in range(n) for role in cross
                      if by.get((role, i)) and by.get((expected_parents[role], i))
                      and by[(role, i)][0]["parent"] == by[(expected_parents[role], i)][0]["span"])
    assert cross_right >= 0.995 * n * len(cross), (cross_right, stats)
    # The calls the event loop made while several requests were open are counted, not guessed.
    after = sum(TRACE_UNATTRIBUTED.labels(processor="protocols", reason=r)._value.get()
                for r in ("concurrent_requests", "request_on_other_thread"))
    unattributed_calls = sum(1 for x in missing if x[0] in ("fe_redis", "fe_pg", "fe_http") and x[-1] == "root")
    assert unattributed_calls > 0  # 8 clients at once: requests overlap on the loop's thread
    assert after - before >= unattributed_calls
    assert right + len(missing) == n * len(expected_parents)
