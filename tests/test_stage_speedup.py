"""The protocols stage's C fast path (processors/protocols/_stage.c) against ``_one``, its
pure-Python reference: the same events through the stage with and without it must give the
same spans (every field), the same drops and the same counts, whatever the traffic: recorded
real-server captures, every protocol's conversation whole, a byte a segment and in random
pieces, damaged bytes, a pending budget that sheds, trace assembly, a protocol switch, and
sessions that raise."""

from __future__ import annotations

import glob
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import processors.protocols.processor as stage_mod
from processors.protocols.errors import ProtocolError
from processors.protocols.processor import ProtocolsProcessor
from receivers.pcap import PcapReceiver
from service.model import EventKind, TcpEvent
from tests.support.exchanges import EXCHANGES, h2c_upgrade
from tests.support.speedup import load_accelerator
from tests.support.whole import cut, mutate

_stage = load_accelerator("processors.protocols._stage")
# Imported directly, so these run under WIRESPAN_PURE_PYTHON=1 too (the stage then has no C path
# of its own: each test gives it this one).
_stage.setup(TcpEvent, stage_mod._State, stage_mod.Conn, stage_mod.LargeBuffer, stage_mod.PendingBudget,
             EventKind.DATA, stage_mod._PARSING, EventKind.OPEN, EventKind.CLOSE)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


class _Sink:
    def __init__(self) -> None:
        self.spans: list = []

    def consume_spans(self, spans: list) -> None:
        self.spans.extend(spans)


def _digest(spans: list) -> list:
    """Every field of every span; span and trace ids only as the order they first appear in
    (they are random, their sharing is not)."""
    ids: dict[bytes, int] = {}

    def ref(b: bytes | None) -> int | None:
        return None if not b else ids.setdefault(b, len(ids))

    return [(s.name, int(s.kind), s.start_ns, s.end_ns, int(s.status_code), s.status_message,
             sorted(s.attributes.items(), key=str), ref(s.trace_id), ref(s.span_id), ref(s.parent_span_id),
             s.flags, str(sorted(s.resource.attributes.items())) if s.resource else None) for s in spans]


def _stats(stage: ProtocolsProcessor) -> dict:
    st = {k: v for k, v in stage.stats.items() if k != "enrich"}
    return {**st, "drops": dict(st["drops"]), "protocols": dict(st["protocols"])}


def both(run: object, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """``run()`` -> (spans, stats) with the C path and with ``_one`` alone; asserted equal."""
    with monkeypatch.context() as m:
        m.setattr(stage_mod, "_C_STAGE", _stage)
        got = run()  # type: ignore[operator]
    with monkeypatch.context() as m:
        m.setattr(stage_mod, "_C_STAGE", None)
        want = run()  # type: ignore[operator]
    assert got[0] == want[0]
    assert got[1] == want[1]
    return got


def _events(segments: list[tuple[bool, bytes]], port: int, conn: int = 1, pid: int | None = None,
            ts: int = 1_000_000, views: bool = True, close: bool = True, step: int = 1000) -> list[TcpEvent]:
    """One connection's events: an OPEN, the segments (every other one a memoryview, as the
    pcap receivers give, the rest bytes, as eBPF does), both sides' CLOSE (unless ``close`` is
    false: the capture ends first, and what is cut short ends at the last data's time)."""
    c, s = (f"10.0.{conn // 250}.{conn % 250 + 1}", 40000 + conn % 20000), ("10.9.0.1", port)
    kw = {"pid": pid, "tid": pid, "comm": "app"} if pid is not None else {}
    evs = [TcpEvent(EventKind.OPEN, conn, c[0], c[1], s[0], s[1], ts, client_is_src=True, **kw)]
    for i, (fc, data) in enumerate(segments):
        src, dst = (c, s) if fc else (s, c)
        ts += step
        payload = memoryview(data) if views and i % 2 else data
        eg = {"egress": fc} if pid is not None else {}
        evs.append(TcpEvent(EventKind.DATA, conn, src[0], src[1], dst[0], dst[1], ts, payload,
                            client_is_src=fc, **eg, **kw))
    for fc in (True, False) if close else ():
        src, dst = (c, s) if fc else (s, c)
        ts += 1000
        evs.append(TcpEvent(EventKind.CLOSE, conn, src[0], src[1], dst[0], dst[1], ts, client_is_src=fc, **kw))
    return evs


def _through(events: list[TcpEvent], config: dict | None = None, batches: int = 7) -> tuple:
    """(span digest, stats) of ``events`` through a fresh stage, in batches of 1-``batches``
    events (the same cut both ways: a fixed seed)."""
    sink = _Sink()
    stage = _fed(events, config, batches, 7, sink)
    stage.shutdown()
    return _digest(sink.spans), _stats(stage)


def _fed(events: list[TcpEvent], config: dict | None, batches: int, seed: int, sink: object) -> ProtocolsProcessor:
    """A fresh stage given ``events`` in batches of 1-``batches`` (cut by ``seed``: the same both ways)."""
    stage = ProtocolsProcessor("protocols", config or {}, sink)
    stage.start()
    rng = random.Random(seed)
    i = 0
    while i < len(events):
        k = rng.randint(1, batches)
        stage.consume_events(list(events[i:i + k]))
        i += k
    return stage


def _interleaved(convs: list[list[TcpEvent]]) -> list[TcpEvent]:
    """Several connections' events round-robin, each in its own order."""
    out: list[TcpEvent] = []
    its = [iter(c) for c in convs]
    while its:
        for it in list(its):
            ev = next(it, None)
            if ev is None:
                its.remove(it)
            else:
                out.append(ev)
    return out


_CONVERSATIONS = [(name, k) for name, makers in EXCHANGES.items() for k in range(len(makers))]


@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
@pytest.mark.parametrize("name,k", _CONVERSATIONS)
def test_every_conversation_whole_a_byte_a_segment_and_in_pieces(name: str, k: int, how: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ex = EXCHANGES[name][k](300)
    segs = cut(ex.steps, how, random.Random(3))
    convs = [_events(segs, ex.port, conn=c, ts=1_000_000 + c * 10) for c in range(3)]
    spans, _stats = both(lambda: _through(_interleaved(convs)), monkeypatch)
    if how == "whole" and ex.spans:
        assert len(spans) >= ex.spans  # the C path took part in something real


@pytest.mark.parametrize("name,k", _CONVERSATIONS)
def test_the_capture_ends_inside_a_reply(name: str, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """No CLOSE, the last reply cut in half: the stage's shutdown ends the exchange at the
    connection's last data time, which the C path keeps as the Python path does."""
    ex = EXCHANGES[name][k](300)
    steps = list(ex.steps)
    last = max(i for i, (fc, _) in enumerate(steps) if not fc)
    fc, data = steps[last]
    steps[last:] = [(fc, data[:len(data) // 2])]
    segs = [(True, b""), *steps]  # an empty segment too: the C path takes it as Python does
    convs = [_events(segs, ex.port, conn=c, ts=1_000_000 + c * 10, close=False) for c in range(3)]
    both(lambda: _through(_interleaved(convs)), monkeypatch)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(FIXTURES, "**", "*.pcap*"), recursive=True)),
                         ids=os.path.basename)
def test_recorded_real_server_captures(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def run() -> tuple:
        sink = _Sink()
        stage = ProtocolsProcessor("protocols", {}, sink)
        stage.start()
        PcapReceiver("pcap", {"path": path, "progress": False}, stage).run()
        stage.shutdown()
        return _digest(sink.spans), _stats(stage)

    both(run, monkeypatch)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name_k=hs.sampled_from(_CONVERSATIONS),
       muts=hs.lists(hs.tuples(hs.integers(0, 50), hs.integers(0, 5000), hs.integers(0, 255), hs.booleans()),
                     min_size=1, max_size=6))
def test_damaged_bytes(name_k: tuple[str, int], muts: list, monkeypatch: pytest.MonkeyPatch) -> None:
    name, k = name_k
    ex = EXCHANGES[name][k](100)
    segs = mutate(ex.steps, muts)
    convs = [_events(segs, ex.port, conn=c) for c in range(2)]
    both(lambda: _through(_interleaved(convs)), monkeypatch)


def test_a_pending_budget_that_sheds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests outstanding on many connections at once, over a tiny stage-wide budget: the C
    path hands the event back (SHED) where the Python path sheds."""
    convs = []
    for name in ("postgresql", "redis", "http", "memcached"):
        ex = EXCHANGES[name][0](50)
        client = [(fc, d) for fc, d in ex.steps if fc]
        replies = [(fc, d) for fc, d in ex.steps if not fc]
        for _c in range(6):  # every request first, the replies later: pending entries pile up
            convs.append(_events(client + replies, ex.port, conn=len(convs) + 1))
    config = {"pending": {"max_entries": 5, "max_entries_per_connection": 3}}
    spans, stats = both(lambda: _through(_interleaved(convs), config, batches=40), monkeypatch)
    assert any(k.endswith("pending_budget") for k in stats["drops"]), stats["drops"]
    codes = _Codes()
    with monkeypatch.context() as m:
        m.setattr(stage_mod, "_C_STAGE", codes)
        assert _through(_interleaved(convs), config, batches=40) == (spans, stats)
    assert codes.seen.get(_stage.SHED), codes.seen


def test_trace_assembly_and_a_process_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """eBPF's events (a pid, egress): the C path sets the connection's thread and direction for
    the assembler as the Python path does; parent links come out the same."""
    convs = []
    for name in ("http", "postgresql", "redis", "mongodb"):
        ex = EXCHANGES[name][0](80)
        convs.append(_events(ex.steps, ex.port, conn=len(convs) + 1, pid=4242))
    spans, _ = both(lambda: _through(_interleaved(convs), {"assemble": True}), monkeypatch)
    assert spans


def test_a_protocol_switch_h2c(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP/1 Upgrade: h2c, the 101, then HTTP/2 frames (h2's own): the C path hands back SWITCH
    and the upgraded request is answered on stream 1, as on the Python path."""
    from processors.protocols import http1

    segs = h2c_upgrade()

    real = http1.Http1Session.feed_whole

    def whole(self: http1.Http1Session, from_client: bool, data: memoryview, ts_ns: int) -> bool:
        """HTTP/1's feed_whole declines the 101 (the buffered feed reads it): this one takes it
        through feed, as a session may, so the switch is asked for from the fast path."""
        if not from_client and bytes(data[:12]) == b"HTTP/1.1 101":
            buf = self.conn.server_buf
            buf.append(data, ts_ns)
            self.feed(False, buf, ts_ns)
            return True
        return real(self, from_client, data, ts_ns)

    def run() -> tuple:
        with monkeypatch.context() as m:
            m.setattr(http1.Http1Session, "feed_whole", whole)
            return _through(_events(segs, 80), {"enabled": ["http", "http2"]}, batches=5)

    spans, stats = both(run, monkeypatch)
    assert stats.get("switched") == {"http->http2": 1}, stats
    codes = _Codes()
    with monkeypatch.context() as m:
        m.setattr(stage_mod, "_C_STAGE", codes)
        assert run() == (spans, stats)
    assert codes.seen.get(_stage.SWITCH) == 1, codes.seen  # the 101's event, taken by the C path
    assert [s[6] for s in spans if ("url.path", "/h2") in s[6] and ("network.protocol.version", "2") in s[6]]


class _Codes:
    """The C module, counting the codes ``run`` hands back."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(_stage, name)

    def run(self, *a: object) -> int:
        r = _stage.run(*a)
        self.seen[r & 7] = self.seen.get(r & 7, 0) + 1
        return r


class _Raising:
    """A session method stand-in raising ``exc`` on its ``n``th call (every ``n``th with
    ``every``)."""

    def __init__(self, real: object, exc: BaseException, n: int, every: bool = False) -> None:
        self.real, self.exc, self.n, self.calls, self.every = real, exc, n, 0, every

    def __get__(self, obj: object, cls: type | None = None) -> object:
        if obj is None:
            return self

        def bound(*a: object) -> object:
            self.calls += 1
            if self.calls == self.n or (self.every and self.calls % self.n == 0):
                raise self.exc
            return self.real.__get__(obj, cls)(*a)  # type: ignore[attr-defined]
        return bound


@pytest.mark.parametrize("exc", [ProtocolError("redis", "malformed"), RuntimeError("a bug")], ids=["protocol", "bug"])
def test_a_feed_whole_that_raises(exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    from processors.protocols import redis

    ex = EXCHANGES["redis"][1](60)
    convs = [_events(ex.steps, ex.port, conn=c) for c in range(3)]
    real = redis.Session.feed_whole

    def run() -> tuple:
        with monkeypatch.context() as m:
            m.setattr(redis.Session, "feed_whole", _Raising(real, exc, 3))
            return _through(_interleaved(convs))

    _spans, stats = both(run, monkeypatch)
    reason = "redis:malformed" if isinstance(exc, ProtocolError) else "redis:internal_error"
    assert stats["drops"].get(reason), stats["drops"]


def test_a_slow_conversation_is_not_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments 1.5 s apart under a 2 s idle timeout: every taken event moves the connection's
    last activity on (or the sweep would end it mid-conversation), on the C path as on Python's."""
    ex = EXCHANGES["redis"][0](60)
    events = _events(ex.steps * 6, ex.port, step=1_500_000_000)
    spans, stats = both(lambda: _through(events, {"idle_timeout": "2s"}, batches=1), monkeypatch)
    assert len(spans) == 6 * ex.spans and not stats["drops"], stats["drops"]


def test_errors_in_a_row_are_reset_by_a_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """A protocol error every fourth segment, spans between them: the count of errors in a row
    starts again at each span (or the connection is abandoned after max_consecutive_errors),
    on the C path as on the Python one."""
    from processors.protocols import redis

    ex = EXCHANGES["redis"][0](60)
    events = _events(ex.steps * 12, ex.port)
    real = redis.Session.feed_whole

    def run() -> tuple:
        with monkeypatch.context() as m:
            m.setattr(redis.Session, "feed_whole", _Raising(real, ProtocolError("redis", "malformed"), 4, every=True))
            return _through(events, {"max_consecutive_errors": 2})

    spans, stats = both(run, monkeypatch)
    assert stats["drops"].get("redis:malformed", 0) >= 4, stats["drops"]
    assert len(spans) >= 6


def test_the_c_path_takes_the_data_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only equal: the C path really takes the fast events (``_one`` sees only what it
    hands back: each connection's first data, to detect, and what the session declined)."""
    ex = EXCHANGES["redis"][0](60)
    events = _events(ex.steps * 5, ex.port)  # one connection, the exchange five times over
    seen: list[TcpEvent] = []
    real = ProtocolsProcessor._one

    def spy(self: ProtocolsProcessor, ev: TcpEvent, out: list, declined: bool = False) -> None:
        seen.append(ev)
        real(self, ev, out, declined)

    monkeypatch.setattr(ProtocolsProcessor, "_one", spy)
    monkeypatch.setattr(stage_mod, "_C_STAGE", _stage)
    sink = _Sink()
    stage = ProtocolsProcessor("protocols", {}, sink)
    stage.consume_events(events)
    stage.shutdown()
    data = [e for e in events if e.kind == EventKind.DATA]
    assert sink.spans and len(data) > 2
    assert len(seen) < len(data)


def test_bad_arguments_are_refused() -> None:
    b = stage_mod.PendingBudget()
    with pytest.raises(TypeError):
        _stage.run([], 0, {}, None, [], None)
    with pytest.raises(TypeError):
        _stage.run((), 0, {}, None, [], None, [0], {}, 10)
    with pytest.raises(TypeError):
        _stage.run([], 0, {}, None, [], b, [0], [], 10)  # stats: a dict
    with pytest.raises(ValueError):
        _stage.run([], -1, {}, None, [], b, [0], {}, 10)
    with pytest.raises(TypeError):
        _stage.setup(TcpEvent, stage_mod._State, stage_mod.Conn, stage_mod.LargeBuffer, stage_mod.PendingBudget,
                     EventKind.DATA, stage_mod._PARSING)
    assert _stage.run([], 0, {}, None, [], b, [0], {}, 10) == _stage.DONE


def _ends(events: list[TcpEvent], config: dict | None = None, batches: int = 3) -> tuple:
    """(every tracked connection's state, in the table's order, stats) after ``events``, before
    any shutdown: what the OPEN and CLOSE steps leave behind, which spans alone may not show."""
    stage = _fed(events, config, batches, 11, _Sink())
    states = [(cid, st.closed, st.server_closed, st.client_side, st.egress_side, st.last_ts, st.mode,
               st.a_addr, st.a_port, st.pid, st.comm) for cid, st in stage._conns.items()]
    return states, _stats(stage)


def _flip(ev: TcpEvent, **kw: object) -> TcpEvent:
    """``ev`` with fields replaced."""
    f = {k: getattr(ev, k) for k in TcpEvent.__slots__}
    f.update(kw)
    return TcpEvent(**f)


def _close_orders() -> dict[str, list[TcpEvent]]:
    """Connections' ends in every order the C path must tell apart."""
    ex = EXCHANGES["redis"][0](60)
    client_first = _events(ex.steps, ex.port, conn=1)
    *body, cfin, sfin = client_first
    server_first = [*body, _flip(sfin, ts_ns=cfin.ts_ns), _flip(cfin, ts_ns=sfin.ts_ns)]
    no_data = [client_first[0], cfin, sfin]  # closed while detecting
    half = [*body, cfin]  # the server's FIN never comes
    twice = [*body, cfin, cfin, sfin]  # a repeated FIN
    unknown = [_flip(cfin, conn_id=99), _flip(sfin, conn_id=99), *client_first]
    reopened = [client_first[0], *client_first]  # an OPEN of a tracked connection
    no_roles = [_flip(e, client_is_src=None) for e in client_first]  # roles from the protocol
    late_role = [_flip(client_first[0], client_is_src=None), *client_first[1:]]
    ebpf = _events(ex.steps, ex.port, conn=2, pid=7)
    noegress_open = [_flip(ebpf[0], egress=None), *ebpf[1:]]
    egress_late = [_flip(e, egress=None) if e.kind != EventKind.DATA else e for e in ebpf]
    # Only OPENs: the roles they say stand alone (no data to say them again), a server's OPEN too.
    opens = [client_first[0], _flip(ebpf[0], egress=True), _flip(_events(ex.steps, ex.port, conn=3, pid=8)[0],
             conn_id=4, egress=False), _flip(_events(ex.steps, ex.port, conn=5)[-1], kind=EventKind.OPEN)]
    server_half = [*body, sfin]  # the server is done, the client not yet: its session heard it
    # The server's FIN with a request in flight, then the client goes on: the FIN ends the request.
    req = body[1]
    pending = [body[0], req, _flip(sfin, ts_ns=req.ts_ns + 5), _flip(req, ts_ns=req.ts_ns + 9), cfin]
    lru = [client_first[0], ebpf[0], cfin]  # a FIN is activity: the connection moves to the LRU's end
    return {"opens": opens, "lru": lru, "server_half": server_half, "server_fin_pending": pending,
            "client_first": client_first, "server_first": server_first, "no_data": no_data, "half": half,
            "twice": twice, "unknown": unknown, "reopened": reopened, "no_roles": no_roles,
            "late_role": late_role, "ebpf": ebpf, "noegress_open": noegress_open, "egress_late": egress_late}


@pytest.mark.parametrize("case", sorted(_close_orders()))
def test_opens_and_closes_leave_the_same_state(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C path's OPEN and CLOSE steps against _event's: the same connections tracked, in the
    same LRU order, with the same roles, FIN bits and times, and, after shutdown, the same spans
    and drops; with a batch an event and with several."""
    events = _close_orders()[case]
    for batches in (1, 4):
        both(lambda: _ends(events, batches=batches), monkeypatch)  # noqa: B023
        both(lambda: _through(events, batches=batches), monkeypatch)  # noqa: B023


def test_opens_over_max_connections_evict_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    """More connections open than max_connections: the OPEN over it is Python's (an eviction,
    counted), the C path takes the others."""
    ex = EXCHANGES["redis"][0](60)
    convs = [_events(ex.steps, ex.port, conn=c, ts=1_000_000 + c * 10) for c in range(9)]
    opens = [c[0] for c in convs]
    rest = [e for c in convs for e in c[1:]]
    config = {"max_connections": 4}
    states, stats = both(lambda: _ends(opens, config), monkeypatch)
    assert [s[0] for s in states] == [5, 6, 7, 8] and stats["connections"] == 9
    both(lambda: _ends(opens + rest, config), monkeypatch)
    _spans, stats = both(lambda: _through(opens + rest, config, batches=5), monkeypatch)
    assert stats["drops"], stats  # the evicted connections' data, counted


def test_the_c_path_takes_opens_and_client_fins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only equal: a short connection's OPEN and its client's FIN are the C path's (``_event``
    sees the first data, to detect, and the server's FIN, which its session hears)."""
    ex = EXCHANGES["redis"][0](60)
    events = [e for c in range(3) for e in _events(ex.steps, ex.port, conn=c)]
    seen: list[TcpEvent] = []
    real = ProtocolsProcessor._event

    def spy(self: ProtocolsProcessor, ev: TcpEvent) -> None:
        seen.append(ev)
        real(self, ev)

    monkeypatch.setattr(ProtocolsProcessor, "_event", spy)
    monkeypatch.setattr(stage_mod, "_C_STAGE", _stage)
    sink = _Sink()
    stage = ProtocolsProcessor("protocols", {}, sink)
    stage.consume_events(events)
    stage.shutdown()
    assert sink.spans and stage.stats["connections"] == 3
    assert not [e for e in seen if e.kind == EventKind.OPEN]
    closes = [e for e in seen if e.kind == EventKind.CLOSE]
    assert len(closes) == 3 and all(e.sport == ex.port for e in closes), closes


_SPAN_ARGS = [
    ("GET", 2, 1, 2, {"k": 1}, None, None, None, b"", 0, "", None, "", 1),
    ("q", 3, 5, 4, None, None, b"\x01" * 16, None, b"\x02" * 8, 2, "boom", [], "k=v", 0),
    ("x", 1, 0, 0, {}, "a resource", None, b"\x03" * 8, b"", 1, "", None, "", 257),
]


@pytest.mark.parametrize("args", _SPAN_ARGS)
def test_new_span_is_span(args: tuple) -> None:
    """_stage.c's new_span against Span(...): every slot the same, the ids drawn from the same
    generator in the same order (seeded alike, the same ids), None's defaults alike."""
    import service.model as m

    _stage.span_setup(m.Span, m._rand.getrandbits, m.DEFAULT_RESOURCE)
    state = m._rand.getstate()
    try:
        want = m.Span(*args)
        m._rand.setstate(state)
        got = _stage.new_span(*args)
    finally:
        m._rand.setstate(state)
    assert type(got) is m.Span and __import__("gc").is_tracked(got)
    for k in m.Span.__slots__:
        assert getattr(got, k) == getattr(want, k), k
    if args[4] is not None:
        assert got.attributes is args[4]
    assert got.attributes is not want.attributes or args[4] is not None


def test_new_span_draws_again_while_an_id_is_zero_and_fails_like_span() -> None:
    import sys

    import service.model as m

    draws = iter([0, 0, 5, 0, 7])
    try:
        _stage.span_setup(m.Span, lambda bits: next(draws), m.DEFAULT_RESOURCE)
        s = _stage.new_span(*_SPAN_ARGS[0])
        assert s.trace_id == (5).to_bytes(16, "big") and s.span_id == (7).to_bytes(8, "big")
        _stage.span_setup(m.Span, lambda bits: 1 / 0, m.DEFAULT_RESOURCE)
        name = "a name only this test holds"
        before = sys.getrefcount(name)
        with pytest.raises(ZeroDivisionError):
            _stage.new_span(name, *_SPAN_ARGS[0][1:])
        assert sys.getrefcount(name) == before  # nothing leaked on the way out
        with pytest.raises(TypeError):
            _stage.new_span(*_SPAN_ARGS[0][:13])
    finally:
        _stage.span_setup(m.Span, m._rand.getrandbits, m.DEFAULT_RESOURCE)
    name = "another name"
    before = sys.getrefcount(name)
    s = _stage.new_span(name, *_SPAN_ARGS[0][1:])
    assert sys.getrefcount(name) == before + 1
    del s
    assert sys.getrefcount(name) == before
