"""processors/protocols/assembly.py: the rule that joins per-process spans into traces.

Events are built by hand as the ``ebpf`` receiver makes them (each process's view of a
socket is its own connection, with pid, tid and ``egress``), so every case of the rule
can be played exactly: thread-per-request servers, an event loop with requests
overlapping on one thread, pooled connections, a call that outlives its request, a
process that exits mid-request, pid reuse, the wire's own context, gaps and captures.
The same rule on real processes is in tests/test_traces_real.py.
"""

from __future__ import annotations

from processors.protocols.processor import ProtocolsProcessor
from service.model import EventKind, Span, SpanKind, TcpEvent
from tests.support.ebpfsim import OK, TP, Sink, World, get, rget

CURL, FE, BE, REDIS = (100, "curl"), (200, "python3"), (300, "python3"), (400, "redis-server")


def child_of(child: Span, parent: Span) -> bool:
    return child.trace_id == parent.trace_id and child.parent_span_id == parent.span_id


def test_thread_per_request_two_requests_at_once_each_call_under_its_own_request() -> None:
    w = World()
    a, b = w.connect(CURL, FE, 8080), w.connect(CURL, FE, 8080)
    rd = w.connect(FE, REDIS, 6379)  # one pooled connection, used by both threads in turn
    fe_be = w.connect(FE, BE, 9090)
    a.call(101, 201, get("/a"))
    b.call(102, 202, get("/b"))
    rd.call(201, 401, rget("key:a"))   # thread 201 serves /a
    rd.answer(401, 201, b"$1\r\nx\r\n")
    fe_be.call(202, 301, get("/be/b"))  # thread 202 serves /b
    fe_be.answer(301, 202, OK)
    rd.call(202, 401, rget("key:b"))
    rd.answer(401, 202, b"$1\r\ny\r\n")
    a.answer(201, 101, OK)
    b.answer(202, 102, OK)
    s = w.sink
    fe_a, fe_b = s.one(200, "/a", SpanKind.SERVER), s.one(200, "/b", SpanKind.SERVER)
    assert child_of(fe_a, s.one(100, "/a", SpanKind.CLIENT)) and child_of(fe_b, s.one(100, "/b", SpanKind.CLIENT))
    assert child_of(s.one(200, "key:a", SpanKind.CLIENT), fe_a)
    assert child_of(s.one(200, "key:b", SpanKind.CLIENT), fe_b)
    assert child_of(s.one(400, "key:a", SpanKind.SERVER), s.one(200, "key:a", SpanKind.CLIENT))
    be_call = s.one(200, "/be/b", SpanKind.CLIENT)
    assert child_of(be_call, fe_b) and child_of(s.one(300, "/be/b", SpanKind.SERVER), be_call)
    assert len({sp.trace_id for sp in s.spans}) == 2  # one trace per curl request
    assert w.stage.stats["traces"].get("linked:thread") == 3


def test_an_event_loop_with_overlapping_requests_never_guesses() -> None:
    w = World()
    a, b = w.connect(CURL, FE, 8080), w.connect(CURL, FE, 8080)
    rd = w.connect(FE, REDIS, 6379)
    before = w.unattributed("concurrent_requests")
    a.call(101, 200, get("/a"))          # one thread (the event loop) reads both requests
    rd.call(200, 401, rget("key:a1"))    # only /a open: this call is /a's
    b.call(102, 200, get("/b"))
    rd.answer(401, 200, b"$-1\r\n")
    rd.call(200, 401, rget("key:x"))     # /a and /b both open: whose? nobody's
    rd.answer(401, 200, b"$-1\r\n")
    a.answer(200, 101, OK)
    rd.call(200, 401, rget("key:b"))     # only /b open again
    rd.answer(401, 200, b"$-1\r\n")
    b.answer(200, 102, OK)
    s = w.sink
    assert child_of(s.one(200, "key:a1", SpanKind.CLIENT), s.one(200, "/a", SpanKind.SERVER))
    assert s.one(200, "key:x", SpanKind.CLIENT).parent_span_id == b""
    assert child_of(s.one(200, "key:b", SpanKind.CLIENT), s.one(200, "/b", SpanKind.SERVER))
    assert w.unattributed("concurrent_requests") == before + 1


def test_a_call_on_a_thread_serving_nothing_while_others_serve_is_counted() -> None:
    w = World()
    a = w.connect(CURL, FE, 8080)
    rd = w.connect(FE, REDIS, 6379)
    before = w.unattributed("request_on_other_thread")
    a.call(101, 201, get("/a"))
    rd.call(299, 401, rget("key:bg"))  # a worker thread: not the one serving /a
    rd.answer(401, 299, b"$-1\r\n")
    a.answer(201, 101, OK)
    assert w.sink.one(200, "key:bg", SpanKind.CLIENT).parent_span_id == b""
    assert w.unattributed("request_on_other_thread") == before + 1


def test_a_call_that_outlives_its_request_keeps_it_as_parent() -> None:
    w = World()
    a = w.connect(CURL, FE, 8080)
    rd = w.connect(FE, REDIS, 6379)
    a.call(101, 200, get("/a"))
    rd.call(200, 401, rget("key:later"))  # started while serving /a ...
    a.answer(200, 101, OK)                # ... /a is answered first
    rd.answer(401, 200, b"$-1\r\n")
    s = w.sink
    assert child_of(s.one(200, "key:later", SpanKind.CLIENT), s.one(200, "/a", SpanKind.SERVER))


def test_a_process_that_exits_mid_request_and_a_reused_pid_leave_no_stale_parent() -> None:
    w = World()
    a = w.connect(CURL, FE, 8080)
    a.call(101, 201, get("/dies"))
    a.close()  # the frontend died: its connections closed, the request never answered
    again = w.connect(CURL, FE, 8080)   # a new process with the same pid, the same thread id
    rd = w.connect(FE, REDIS, 6379)
    rd.call(201, 401, rget("key:new"))
    rd.answer(401, 201, b"$-1\r\n")
    again.call(101, 201, get("/new"))
    again.answer(201, 101, OK)
    assert w.sink.one(200, "key:new", SpanKind.CLIENT).parent_span_id == b""


def test_the_wire_context_wins_and_a_disagreement_is_counted() -> None:
    w = World()
    a = w.connect(CURL, FE, 8080)
    rd = w.connect(FE, REDIS, 6379)
    a.call(101, 201, get("/a", TP))  # an instrumented caller sent its own context
    rd.call(201, 401, rget("key:a"))
    rd.answer(401, 201, b"$-1\r\n")
    a.answer(201, 101, OK)
    s = w.sink
    fe = s.one(200, "/a", SpanKind.SERVER)
    assert fe.trace_id.hex() == TP[3:35] and fe.parent_span_id.hex() == TP[36:52]
    assert child_of(s.one(200, "key:a", SpanKind.CLIENT), fe)
    # our curl span (a child of the same caller span) is not fe's parent: the wire said otherwise
    assert w.stage.stats["traces"].get("conflicts", 0) >= 1


def test_when_only_one_side_is_traced_nothing_is_linked_across() -> None:
    w = World()
    a = w.connect((None, ""), FE, 8080)  # an external client
    out = w.connect(FE, (None, ""), 6379)  # an untraced redis
    a.call(0, 201, get("/a"))
    out.call(201, 0, rget("key:a"))
    out.answer(0, 201, b"$-1\r\n")
    a.answer(201, 0, OK)
    s = w.sink
    fe = s.one(200, "/a", SpanKind.SERVER)
    assert fe.parent_span_id == b"" and child_of(s.one(200, "key:a", SpanKind.CLIENT), fe)


def test_a_request_the_callee_missed_is_skipped_never_taken_for_the_next() -> None:
    w = World()
    a = w.connect(CURL, FE, 8080)
    before = w.unattributed("order_mismatch")
    a.send(101, get("/lost"))  # the callee's view of this request is lost (not fed)
    w.feed(a._ev(FE, 201, OK, False, True, next(w.ts)), a._ev(CURL, 101, OK, False, False, next(w.ts)))
    a.call(101, 201, get("/next"))
    a.answer(201, 101, OK)
    s = w.sink
    fe = s.one(200, "/next", SpanKind.SERVER)
    assert child_of(fe, s.one(100, "/next", SpanKind.CLIENT))
    assert w.unattributed("order_mismatch") == before + 1


def test_a_gap_ends_linking_on_that_connection() -> None:
    w = World()
    a = w.connect(CURL, FE, 8080)
    a.call(101, 201, get("/one"))
    a.answer(201, 101, OK)
    w.feed(TcpEvent(EventKind.GAP, (200, a.sock), a.caddr[0], a.caddr[1], a.saddr[0], a.saddr[1], next(w.ts),
                    None, 100, True, False, 200, 201, "python3"))
    a.call(101, 201, get("/two"))
    a.answer(201, 101, OK)
    s = w.sink
    assert child_of(s.one(200, "/one", SpanKind.SERVER), s.one(100, "/one", SpanKind.CLIENT))
    assert s.one(200, "/two", SpanKind.SERVER).parent_span_id == b""


def test_assembly_off_gives_roots_as_before() -> None:
    w = World(assemble=False)
    a = w.connect(CURL, FE, 8080)
    rd = w.connect(FE, REDIS, 6379)
    a.call(101, 201, get("/a"))
    rd.call(201, 401, rget("k"))
    rd.answer(401, 201, b"$-1\r\n")
    a.answer(201, 101, OK)
    assert all(sp.parent_span_id == b"" for sp in w.sink.spans) and len(w.sink.spans) == 4


# -- captures: assemble: true ---------------------------------------------------------------
def _passive(src: tuple, dst: tuple, data: bytes, ts: int, cid: object, from_client: bool) -> TcpEvent:
    return TcpEvent(EventKind.DATA, cid, src[0], src[1], dst[0], dst[1], ts, memoryview(data), 0, from_client)


def test_captures_nest_a_hosts_calls_under_its_one_open_inbound_request() -> None:
    sink = Sink()
    st = ProtocolsProcessor("protocols", {"enabled": ["http", "redis"], "assemble": True}, sink)
    cl, fe, fe_out, rd = ("10.0.0.1", 50000), ("10.0.0.2", 8080), ("10.0.0.2", 40000), ("10.0.0.3", 6379)
    st.consume_events([
        _passive(cl, fe, get("/a"), 1000, "in", True),
        _passive(fe_out, rd, rget("key:a"), 2000, "out", True),
        _passive(rd, fe_out, b"$-1\r\n", 3000, "out", False),
        _passive(fe, cl, OK, 4000, "in", False),
        # a call after the request ended: no parent
        _passive(fe_out, rd, rget("key:late"), 5000, "out", True),
        _passive(rd, fe_out, b"$-1\r\n", 6000, "out", False),
    ])
    server = next(s for s in sink.spans if s.kind == SpanKind.SERVER)
    calls = {s.attributes["db.query.text"]: s for s in sink.spans if s.kind == SpanKind.CLIENT}
    assert child_of(calls["GET key:a"], server)
    assert calls["GET key:late"].parent_span_id == b""


def test_captures_stay_one_span_per_exchange_by_default() -> None:
    sink = Sink()
    st = ProtocolsProcessor("protocols", {"enabled": ["http", "redis"]}, sink)
    cl, fe, fe_out, rd = ("10.0.0.1", 50000), ("10.0.0.2", 8080), ("10.0.0.2", 40000), ("10.0.0.3", 6379)
    st.consume_events([_passive(cl, fe, get("/a"), 1000, "in", True),
                       _passive(fe_out, rd, rget("key:a"), 2000, "out", True),
                       _passive(rd, fe_out, b"$-1\r\n", 3000, "out", False),
                       _passive(fe, cl, OK, 4000, "in", False)])
    assert len(sink.spans) == 2 and all(s.parent_span_id == b"" for s in sink.spans)


def test_a_callee_read_seen_before_its_callers_write_is_still_linked() -> None:
    """The ring orders records by when each syscall ended: a caller preempted between copying
    its request and returning from write() shows up after the callee's read of it."""
    w = World()
    a = w.connect(CURL, FE, 8080)
    rd = w.connect(FE, REDIS, 6379)
    t_write = next(w.ts)  # the caller's write began here ...
    w.feed(a._ev(FE, 201, get("/late"), True, False, next(w.ts)))   # ... the callee's read is seen first
    w.feed(a._ev(CURL, 101, get("/late"), True, True, t_write))
    rd.call(201, 401, rget("key:late"))
    rd.answer(401, 201, b"$-1\r\n")
    a.answer(201, 101, OK)
    s = w.sink
    fe = s.one(200, "/late", SpanKind.SERVER)
    assert child_of(fe, s.one(100, "/late", SpanKind.CLIENT))
    assert child_of(s.one(200, "key:late", SpanKind.CLIENT), fe)


# -- seeing the structure: replay --tree ----------------------------------------------------
def test_replay_tree_prints_a_captures_assembled_trace(tmp_path) -> None:
    import subprocess
    import sys

    from tests.support.pcapgen import TcpFlow, ether, write_pcap

    inbound = TcpFlow(("10.0.0.1", 50000), ("10.0.0.2", 8080))
    out = TcpFlow(("10.0.0.2", 40000), ("10.0.0.3", 6379))
    pkts = [*inbound.handshake(), *out.handshake(), inbound.send(True, get("/checkout")),
            out.send(True, rget("cart:7")), out.send(False, b"$-1\r\n"), inbound.send(False, OK)]
    cap = tmp_path / "two.pcap"
    write_pcap(cap, [ether(p) for p in pkts])
    run = [sys.executable, "-m", "service.cli", "replay", str(cap), "--tree"]
    flat = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    tree = subprocess.run([*run, "--set", "processors.protocols.assemble=true"], capture_output=True, text=True,
                          check=True).stdout
    assert flat.count("trace ") == 2  # captures: one span per exchange, each its own trace by default
    lines = tree.splitlines()
    assert len(lines) == 3 and lines[0].startswith("trace ") and lines[0].endswith("(2 spans)"), tree
    assert lines[1].startswith("  SERVER GET ") and lines[2].startswith("    CLIENT GET "), tree


def test_the_forest_marks_a_parent_it_does_not_hold_and_survives_cycles() -> None:
    from service.model import Span
    from service.tracetree import format_forest

    t = bytes(16)
    a = Span("a", SpanKind.SERVER, 0, 2_000_000, trace_id=t, span_id=b"A" * 8, parent_span_id=b"Z" * 8)
    b = Span("b", SpanKind.CLIENT, 100, 1_000_000, trace_id=t, span_id=b"B" * 8, parent_span_id=b"A" * 8)
    c = Span("c", SpanKind.CLIENT, 0, 1, trace_id=b"\1" * 16, span_id=b"C" * 8, parent_span_id=b"D" * 8)
    d = Span("d", SpanKind.CLIENT, 0, 1, trace_id=b"\1" * 16, span_id=b"D" * 8, parent_span_id=b"C" * 8)
    text = format_forest([b, a, c, d])
    lines = text.splitlines()
    assert lines[0] == f"trace {t.hex()} (2 spans)"
    assert lines[1].startswith("  SERVER a 2.000ms [") and lines[1].endswith("] ^" + (b"Z" * 8).hex())
    assert lines[2].startswith("    CLIENT b 1.000ms [")
    assert lines[3] == "trace " + "01" * 16 + " (2 spans)" and len(lines) == 6  # the cycle, each once
